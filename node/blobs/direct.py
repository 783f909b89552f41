"""A direct-TCP fast path for blob chunks, beside the p2p streams (which stay the fallback).

Why: on loopback a p2pd stream (TLS, yamux, two daemon hops through unix sockets) costs ~5 CPU s
per GB before a byte is hashed, against ~1.5 s/GB for a plain TCP copy with sha256 (see
BENCHMARKS.md, `benchmarks/transfer.py`). The bytes of a blob need no secrecy and no sender
authentication: every chunk is checked against the digest list of a *signed* record, whatever
carried it. So chunks may travel over a plain TCP connection, where the provider `sendfile`s them.

How:
1. A provider runs `DirectServer` on a TCP port next to its `BlobServer` and answers the p2p
   handler `DIRECT_PROTOCOL` (over the authenticated libp2p connection) with that port and a
   fresh random ticket.
2. A fetcher (`DirectRoutes.open`) asks for them once per provider and dials the port at the IP
   address its p2pd is connected to that provider on (never an address the provider names, so a
   provider cannot point fetchers at a third party; relayed-only providers have no such address
   and use p2p). It sends the ticket first; then the connection carries exactly the blob protocol
   of `protocol.blob_wire` and is read by the same `StreamReceiver`.
3. `fetch_blob` verifies each chunk exactly as on the p2p path. A fault on a direct connection
   (wrong bytes, reset, stall) does not ban the provider, because an on-path forger could cause
   it: the route is refused for this provider and its stream goes on over p2p, where a fault bans.
   The digest list itself always comes over p2p.

The server takes only ticket holders (peers that asked over p2p, known by peer id for the logs)
and shares `BlobServer`'s stream limit, timeouts and send deadlines.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from protocol.encoding import canonical_decode, canonical_encode
from protocol.errors import InvalidRecord
from protocol.limits import PROTOCOL_VERSION
from node.blobs.server import BlobServer
from node.blobs.stream import StreamReceiver, close_quietly
from node.swarm.reachability import connected_ip

logger = logging.getLogger(__name__)

DIRECT_PROTOCOL = f"/ddm-swarm/blob-direct/{PROTOCOL_VERSION}"
TICKET_BYTES = 16
TICKET_LIFETIME_S = 600.0
MAX_OFFER_BYTES = 256
NO_ROUTE_RETRY_S = 300.0
MAX_HANDSHAKES = 64  # a provider without a usable route is asked again after this long


@dataclass(frozen=True)
class _Peer:
    """What `BlobServer.handle_stream` logs about the other side."""

    peer_id: str


class DirectServer:
    """Serve `blob_server`'s store on a TCP port to holders of a ticket handed out over p2p."""

    def __init__(self, blob_server: BlobServer, host: str = "0.0.0.0", port: int = 0) -> None:
        self.blob_server, self.host, self.port = blob_server, host, port
        self._tickets: Dict[bytes, Tuple[str, float]] = {}  # ticket -> (peer id, expiry on the monotonic clock)
        self._server: Optional[asyncio.base_events.Server] = None
        self._handshakes = 0  # connections that have not shown a ticket yet
        self._p2p = None

    async def start(self, p2p) -> None:
        self._server = await asyncio.start_server(self._handle_connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        await p2p.add_binary_stream_handler(DIRECT_PROTOCOL, self._offer)
        self._p2p = p2p

    async def stop(self) -> None:
        if self._p2p is not None:
            await self._p2p.remove_binary_stream_handler(DIRECT_PROTOCOL)
            self._p2p = None
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _offer(self, info, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """p2p handler: give the (authenticated) caller this server's port and a ticket."""
        now = time.monotonic()
        self._tickets = {t: v for t, v in self._tickets.items() if v[1] > now}
        if len(self._tickets) >= 4096:  # a flood of askers must not grow this without bound
            self._tickets.pop(next(iter(self._tickets)))
        ticket = secrets.token_bytes(TICKET_BYTES)
        self._tickets[ticket] = (str(getattr(info, "peer_id", "?")), now + TICKET_LIFETIME_S)
        try:
            body = canonical_encode({"port": self.port, "ticket": ticket})
            writer.write(len(body).to_bytes(4, "big") + body)
            await asyncio.wait_for(writer.drain(), 5.0)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            close_quietly(writer)

    async def _handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._handshakes >= MAX_HANDSHAKES:  # anyone can connect: unticketed ones must not pile up
            close_quietly(writer)
            return
        self._handshakes += 1
        try:
            ticket = await asyncio.wait_for(reader.readexactly(TICKET_BYTES), 5.0)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            close_quietly(writer)
            return
        finally:
            self._handshakes -= 1
        holder = self._tickets.get(ticket)
        if holder is None or holder[1] < time.monotonic():
            close_quietly(writer)  # not asked for over p2p: no answer at all
            return
        await self.blob_server.handle_stream(_Peer(f"direct:{holder[0]}"), reader, writer)


@dataclass
class _Route:
    host: Optional[str]  # None: no usable route (until `retry_at`)
    port: int = 0
    ticket: bytes = b""
    retry_at: float = 0.0


class DirectRoutes:
    """A fetcher's direct routes to providers, learned over p2p and cached per provider."""

    def __init__(self, connect_timeout: float = 2.0) -> None:
        self.connect_timeout = connect_timeout
        self._routes: Dict[str, _Route] = {}
        self.refusals: Dict[str, str] = {}  # provider -> why its direct route was given up
        self.opened = 0

    def refuse(self, provider: str, reason: str) -> None:
        """Stop using the direct route to `provider` (its streams go over p2p from now on)."""
        logger.info("direct route to %s given up: %s; using p2p", provider, reason)
        self._routes[provider] = _Route(None, retry_at=time.monotonic() + NO_ROUTE_RETRY_S)
        self.refusals[provider] = reason

    @staticmethod
    def carried(stream) -> bool:
        return isinstance(stream, DirectStream)

    async def open(self, p2p, peer, timeout: float) -> Optional["DirectStream"]:
        """A direct connection to provider `peer` (a hivemind PeerID), or None: use p2p."""
        name = peer.to_base58()
        route = self._routes.get(name)
        if route is None or (route.host is None and route.retry_at <= time.monotonic()):
            route = await self._learn(p2p, peer, min(timeout, 5.0))
            self._routes[name] = route
        if route.host is None:
            return None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(route.host, route.port),
                                                    self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as error:
            self.refuse(name, f"cannot connect to {route.host}:{route.port}: {error or 'timeout'}")
            return None
        writer.write(route.ticket)
        self.opened += 1
        return DirectStream(reader, writer)

    async def _learn(self, p2p, peer, timeout: float) -> _Route:
        no_route = _Route(None, retry_at=time.monotonic() + NO_ROUTE_RETRY_S)
        host = await connected_ip(p2p, peer)
        if host is None:
            return no_route
        try:
            _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer, DIRECT_PROTOCOL), timeout)
        except Exception:  # an older peer without the handler, or one unreachable now: p2p only
            return no_route
        try:
            length = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), timeout), "big")
            if length > MAX_OFFER_BYTES:
                return no_route
            offer = canonical_decode(await asyncio.wait_for(reader.readexactly(length), timeout),
                                     max_bytes=MAX_OFFER_BYTES, what="direct offer")
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, InvalidRecord):
            return no_route
        finally:
            close_quietly(writer)
        port, ticket = (offer.get("port"), offer.get("ticket")) if isinstance(offer, dict) else (None, None)
        if not isinstance(port, int) or not 0 < port < 65536 or not isinstance(ticket, bytes) \
                or len(ticket) != TICKET_BYTES:
            return no_route
        return _Route(host, port, ticket)


class DirectStream(StreamReceiver):
    """A `StreamReceiver` on a direct TCP connection (what `DirectRoutes.carried` recognises)."""
