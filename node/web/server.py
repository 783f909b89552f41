"""The status web server of `ddm-swarm status --serve PORT` and `ddm-swarm bootstrap --web PORT`.

    GET  /             the page (`node.web.page`), reloading itself
    GET  /api/status   the same as JSON: the latest snapshot, each job's metric history, events
    GET  /samples.png  the latest sample grid (404 until one was made)
    POST /samples      ask for a new sample grid (made in the background), then back to /

HTTP is aiohttp's (a maintained server, not a parser of ours). Two threads do the slow work, so that
no request ever waits on the DHT or on sampling: the collector reads a snapshot of the swarm every
`period_s` into a `StatusHistory`, and a `SampleGrid` makes sample grids on request (and, with
`samples_every_s`, periodically). Requests only read what those two hold. The server binds to
127.0.0.1 unless told otherwise: the page shows peer addresses and can start sampling jobs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Optional

from aiohttp import web

from node.errors import NodeError
from node.swarm.status import collect_status
from node.web.history import StatusHistory
from node.web.page import render
from node.web.samples import SampleGrid

logger = logging.getLogger("ddm_swarm.web")
DEFAULT_HOST = "127.0.0.1"


class StatusServer:
    """Serve the status of the swarm `membership` belongs to on http://host:port/ (port 0: any free)."""

    def __init__(self, membership, *, host: str = DEFAULT_HOST, port: int = 0, period_s: float = 3.0,
                 samples: Optional[SampleGrid] = None, samples_every_s: Optional[float] = None):
        self.membership, self.host, self.port, self.period_s = membership, host, port, period_s
        self.history = StatusHistory()
        self.samples, self.samples_every_s = samples, samples_every_s
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._error: Optional[BaseException] = None
        self._collector = threading.Thread(target=self._collect, name="ddm-web-collector", daemon=True)
        self._server = threading.Thread(target=self._serve, name="ddm-web-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> "StatusServer":
        """Start both threads; return once the port is bound (raises `NodeError` if it cannot be)."""
        self._collector.start()
        self._server.start()
        self._ready.wait(30)
        if self._error is not None:
            raise NodeError(f"cannot serve the status page on {self.host}:{self.port}: {self._error}")
        return self

    # --- the collector ---------------------------------------------------------------------------
    def _collect(self) -> None:
        last_samples = 0.0
        while not self._stop.is_set():
            try:
                self.history.add(collect_status(self.membership))
            except Exception as error:  # the DHT had a hiccup, or is shutting down: the page keeps the last one
                logger.warning(f"could not read the swarm's status this round: {type(error).__name__}: {error}")
            if self.samples is not None and self.samples_every_s:
                now = time.monotonic()
                if now - last_samples >= self.samples_every_s:
                    self.samples.request()
                    last_samples = now
            self._stop.wait(self.period_s)

    # --- HTTP ------------------------------------------------------------------------------------
    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/samples.png", self._samples_png)
        app.router.add_post("/samples", self._ask_samples)
        return app

    async def _page(self, _request: web.Request) -> web.Response:
        return web.Response(text=render(self.history.view(), self._samples_state()), content_type="text/html")

    async def _status(self, _request: web.Request) -> web.Response:
        return web.json_response({**self.history.view(), "samples": self._samples_state()})

    async def _samples_png(self, _request: web.Request) -> web.Response:
        if self.samples is None or self.samples.png is None:
            raise web.HTTPNotFound(text="no sample grid yet")
        return web.Response(body=self.samples.png, content_type="image/png")

    async def _ask_samples(self, _request: web.Request) -> web.Response:
        if self.samples is None:
            raise web.HTTPNotFound(text="this server makes no samples")
        self.samples.request()
        raise web.HTTPSeeOther("/")

    def _samples_state(self) -> dict:
        if self.samples is None:
            return {"state": "failed", "message": "this server makes no samples", "made_at": None, "prompts": [],
                    "steps": 0}
        return self.samples.describe()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        runner = web.AppRunner(self._app(), access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port)
            loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]  # the port bound when 0 was asked for
        except OSError as error:
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        logger.info(f"status page on {self.url}")
        try:
            loop.run_until_complete(self._wait_stop())
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    async def _wait_stop(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        if self._server.is_alive():
            self._server.join(timeout=5)
        if self.samples is not None:
            self.samples.stop()
