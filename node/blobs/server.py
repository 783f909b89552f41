"""Serves the blobs of a `BlobStore` to other peers over a hivemind binary stream handler.

A downloader opens a stream on `BLOB_STREAM_PROTOCOL` and sends requests one after another (see
`protocol.blob_wire`); each gets a header and, if "ok", the bytes. A malformed frame is answered
"bad-request" and the stream is closed (it cannot be re-synchronised); a well-formed request for an
unknown blob or a range outside the blob is answered and the stream stays usable. Streams beyond
`max_streams` get "busy". No input from a peer can make the handler raise.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from protocol.blob_wire import BLOB_STREAM_PROTOCOL, BlobRequest, BlobResponse
from protocol.errors import InvalidBlobRequest
from node.blobs.stream import StreamClosed, StreamStalled, close_quietly, read_request, send_frame
from node.blobs.store import BlobNotFound, BlobStore

logger = logging.getLogger(__name__)


@dataclass
class ServerStats:
    """Counters since start: streams accepted and refused, requests by answer, body bytes sent."""

    streams: int = 0
    streams_busy: int = 0
    ok: int = 0
    not_found: int = 0
    bad_request: int = 0
    bytes_served: int = 0


class BlobServer:
    """Answer blob requests for every complete blob in `store`.

    Register it on a hivemind `P2P` (for a node, the one from `await dht.replicate_p2p()`) with
    `await server.start(p2p)`; it then runs inside that event loop until `await server.stop()`.
    """

    def __init__(self, store: BlobStore, *, max_streams: int = 32, idle_timeout: float = 60.0,
                 request_timeout: float = 10.0, min_send_rate: float = 64 * 1024) -> None:
        self.store = store
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        # An answer must drain within request_timeout + bytes / min_send_rate seconds: a peer that
        # asks and never reads must not hold one of the `max_streams` slots for ever.
        self.min_send_rate = min_send_rate
        self.stats = ServerStats()
        self._active = 0
        self._p2p = None

    async def start(self, p2p) -> None:
        await p2p.add_binary_stream_handler(BLOB_STREAM_PROTOCOL, self.handle_stream)
        self._p2p = p2p

    async def stop(self) -> None:
        if self._p2p is not None:
            await self._p2p.remove_binary_stream_handler(BLOB_STREAM_PROTOCOL)
            self._p2p = None

    async def handle_stream(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one stream until the peer closes it, stalls, or sends a malformed frame."""
        peer = str(getattr(info, "peer_id", "?"))[:16]
        if self._active >= self.max_streams:
            self.stats.streams_busy += 1
            await self._refuse_quietly(writer, "busy", f"serving {self._active} streams already; retry later")
            return
        self._active += 1
        self.stats.streams += 1
        try:
            while True:
                try:
                    request = await read_request(reader, self.idle_timeout, self.request_timeout)
                except InvalidBlobRequest as error:
                    logger.info("blob request from %s refused: %s", peer, error)
                    self.stats.bad_request += 1
                    await self._refuse_quietly(writer, "bad-request", str(error))
                    return
                if request is None:
                    return
                try:
                    async with asyncio.timeout(self.request_timeout + request.length / self.min_send_rate):
                        await self._answer(request, writer)
                except TimeoutError:
                    raise StreamStalled("the peer does not read its answer") from None
        except (StreamClosed, StreamStalled, ConnectionError) as error:
            logger.debug("blob stream from %s ended: %s", peer, error)
        except Exception:  # a bug here must cost one stream, never the node
            logger.exception("blob stream from %s failed", peer)
        finally:
            self._active -= 1
            close_quietly(writer)

    async def _answer(self, request: BlobRequest, writer: asyncio.StreamWriter) -> None:
        try:
            if request.op == "has":
                self.store.path(request.sha256)  # raises BlobNotFound
                await send_frame(writer, BlobResponse.ok(0).encode())
                self.stats.ok += 1
                return
            if request.op == "digests":
                digests = self.store.digest_bytes(request.sha256)
                await send_frame(writer, BlobResponse.ok(len(digests)).encode() + digests)
                self.stats.ok += 1
                self.stats.bytes_served += len(digests)
                return
            path = self.store.path(request.sha256)
        except BlobNotFound:
            self.stats.not_found += 1
            await send_frame(writer, BlobResponse.refuse("not-found", f"no blob {request.sha256[:12]} here").encode())
            return
        size = path.stat().st_size
        if request.end > size:
            self.stats.bad_request += 1
            detail = f"range [{request.start}, {request.end}) is outside blob {request.sha256[:12]} of {size} bytes"
            await send_frame(writer, BlobResponse.refuse("bad-request", detail).encode())
            return
        self.stats.ok += 1
        await self.send_range(writer, path, request.start, request.end)
        self.stats.bytes_served += request.length

    async def send_range(self, writer: asyncio.StreamWriter, path: Path, start: int, end: int) -> None:
        """Send an "ok" header and bytes [start, end) of the file: zero-copy with sendfile where the
        transport allows it."""
        with open(path, "rb", buffering=0) as source:  # opened first: a concurrent gc cannot pull it away
            await send_frame(writer, BlobResponse.ok(end - start).encode())
            await asyncio.get_running_loop().sendfile(writer.transport, source, start, end - start)

    async def _refuse_quietly(self, writer: asyncio.StreamWriter, status: str, detail: str) -> None:
        try:
            await asyncio.wait_for(send_frame(writer, BlobResponse.refuse(status, detail).encode()), 5.0)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            close_quietly(writer)

