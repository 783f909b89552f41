"""Frames of the blob protocol over one hivemind binary stream (an asyncio reader/writer pair).

Every read has a deadline: a peer that stops sending is a stalled peer (`StreamStalled`), never a
hung task. Frames are checked against their size limit before their body is read.

The server reads its (tiny) requests through the stream's `StreamReader`. The downloader receives
megabytes per request, so `StreamReceiver` takes the stream's transport over with a
`BufferedProtocol`: the socket is read with `recv_into` straight into the chunk's own buffer (no
copies through the reader's 64 KiB buffer, one callback per socket read).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Optional

from protocol.blob_wire import (FRAME_PREFIX_BYTES, BlobRequest, BlobResponse, decode_request, decode_response,
                                request_body_length, response_body_length)


class StreamStalled(TimeoutError):
    """The peer sent nothing for longer than the stall timeout."""


class StreamClosed(ConnectionError):
    """The peer closed the stream (or its daemon dropped it) in the middle of a frame. `filled`: the
    bytes of the body being read that had arrived (`StreamReceiver.read_into`), else 0."""

    filled = 0


async def _read_exactly(reader: asyncio.StreamReader, count: int, timeout: float) -> bytes:
    try:
        async with asyncio.timeout(timeout):
            return await reader.readexactly(count)
    except TimeoutError:
        raise StreamStalled(f"no bytes for {timeout:.1f} s") from None
    except asyncio.IncompleteReadError as error:
        raise StreamClosed(f"stream closed after {len(error.partial)} of {count} bytes") from None


async def read_request(reader: asyncio.StreamReader, idle_timeout: float, timeout: float) -> BlobRequest | None:
    """Next request on a stream, or None when the peer has closed it cleanly between requests.

    Raises `InvalidBlobRequest` for a malformed frame, `StreamStalled`, `StreamClosed`.
    """
    try:
        async with asyncio.timeout(idle_timeout):
            prefix = await reader.readexactly(FRAME_PREFIX_BYTES)
    except TimeoutError:
        raise StreamStalled(f"no request for {idle_timeout:.1f} s") from None
    except asyncio.IncompleteReadError as error:
        if not error.partial:
            return None
        raise StreamClosed("stream closed inside a request prefix") from None
    body = await _read_exactly(reader, request_body_length(prefix), timeout)
    return decode_request(body)


async def send_frame(writer: asyncio.StreamWriter, frame: bytes) -> None:
    writer.write(frame)
    await writer.drain()


def close_quietly(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except Exception:  # the transport may already be gone; closing is best effort
        pass


class _ReceiveProtocol(asyncio.BufferedProtocol):
    """Reads into the current target buffer if there is one, else into `pending` (headers)."""

    # Without a target, stop reading beyond this: the rest stays in the kernel's socket buffer until
    # `read_into` names its buffer, and is then received straight into it. Bytes read without a
    # target are copied twice more (scratch -> pending -> target); with a 1 MiB bound about a quarter
    # of a download took that path while the worker waited for a chunk's hash (benchmarks/transfer.py).
    MAX_PENDING = 16 * 1024

    def __init__(self, transport: asyncio.Transport, leftover: bytes) -> None:
        self.transport = transport
        self.pending = bytearray(leftover)
        self.target: Optional[memoryview] = None
        self.filled = 0
        self.received = 0  # total bytes, for stall detection
        self.closed: Optional[str] = None
        self.waiter: Optional[asyncio.Future] = None
        self._scratch = bytearray(self.MAX_PENDING)  # headers are tens of bytes

    def get_buffer(self, sizehint: int) -> memoryview | bytearray:
        if self.target is not None and self.filled < len(self.target):
            return self.target[self.filled:]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        if self.target is not None and self.filled < len(self.target):
            self.filled += nbytes
            if self.filled == len(self.target):
                self.wake()
            return
        self.pending += memoryview(self._scratch)[:nbytes]
        if len(self.pending) > self.MAX_PENDING:
            self.transport.pause_reading()
        self.wake()

    def eof_received(self) -> bool:
        self.closed = "the peer closed the stream"
        self.wake()
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if exc is not None and self.closed is None and self._read_what_is_left():
            self.closed = f"the peer closed the stream (a request could not be sent: {exc})"
        self.closed = self.closed or f"the stream was lost ({exc or 'closed'})"
        self.wake()

    def _read_what_is_left(self) -> bool:
        """Receive what the peer sent before it closed; True if its end of stream was reached.

        A request written after the daemon closed this stream's socket (its peer closed the stream:
        a provider cut off by a relay, or cutting it itself) fails, and asyncio then closes the
        transport at once, dropping the bytes still waiting in the socket. They are the answers the
        peer did send, and a resumed download needs them counted (see node.blobs.download): asyncio
        calls `connection_lost` before it closes the socket, so they are read here, through a
        duplicate of its descriptor (the transport's socket object refuses reads)."""
        try:
            duplicate = socket.socket(fileno=os.dup(self.transport.get_extra_info("socket").fileno()))
        except (AttributeError, OSError, ValueError):  # no socket, or already closed
            return False
        with duplicate:
            duplicate.setblocking(False)
            while True:
                try:
                    count = duplicate.recv_into(self.get_buffer(-1))
                except OSError:  # nothing more for now (the peer has not closed), or a reset
                    return False
                if count == 0:
                    return True
                self.buffer_updated(count)

    def pause_writing(self) -> None:  # requests are tiny; the writer never needs to wait
        pass

    def resume_writing(self) -> None:
        pass

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class StreamReceiver:
    """Downloader's side of one blob stream: small frames and large bodies, each under a stall timeout."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        leftover = bytes(getattr(reader, "_buffer", b""))  # normally empty: nothing was asked yet
        self._protocol = _ReceiveProtocol(writer.transport, leftover)
        writer.transport.set_protocol(self._protocol)

    async def _wait(self, done, stall_timeout: float, what: str, deadline: Optional[float] = None) -> None:
        """Wait until `done()`. Raise `StreamStalled` if no byte arrives for `stall_timeout` s, or
        if `deadline` (a `time.monotonic()` instant) passes first."""
        protocol = self._protocol
        loop = asyncio.get_running_loop()
        while not done():
            if protocol.closed:
                raise StreamClosed(f"{protocol.closed} while reading {what}")
            if deadline is not None and time.monotonic() >= deadline:
                raise StreamStalled(f"too slow: {what} did not arrive in time")
            if self.writer.transport.is_reading() is False:
                self.writer.transport.resume_reading()
            seen, since = protocol.received, time.monotonic()
            timeout = stall_timeout if deadline is None else max(0.0, min(stall_timeout, deadline - since))
            protocol.waiter = loop.create_future()
            try:
                await asyncio.wait([protocol.waiter], timeout=timeout)
            finally:
                protocol.waiter = None
            if protocol.received == seen and time.monotonic() - since >= stall_timeout and not done():
                raise StreamStalled(f"no bytes for {stall_timeout:.1f} s while reading {what}")

    async def read_exactly(self, count: int, stall_timeout: float, deadline: Optional[float] = None) -> bytes:
        """The next `count` bytes (a small frame). They must all arrive before `deadline` (default:
        `stall_timeout` from now): a peer trickling a header a byte at a time is dropped, not waited on."""
        pending = self._protocol.pending
        deadline = time.monotonic() + stall_timeout if deadline is None else deadline
        await self._wait(lambda: len(pending) >= count, stall_timeout, f"a {count}-byte frame", deadline)
        data = bytes(pending[:count])
        del pending[:count]
        return data

    async def read_response(self, timeout: float) -> BlobResponse:
        """Next response header, whole within `timeout` s. Raises `InvalidBlobResponse`,
        `StreamStalled`, `StreamClosed`."""
        deadline = time.monotonic() + timeout
        prefix = await self.read_exactly(FRAME_PREFIX_BYTES, timeout, deadline)
        return decode_response(await self.read_exactly(response_body_length(prefix), timeout, deadline))

    async def read_into(self, target: bytearray | memoryview, stall_timeout: float,
                        min_rate: Optional[float] = None) -> None:
        """Fill `target` with the next `len(target)` bytes of the stream. `min_rate` (bytes/s), if
        given, bounds the whole read to `stall_timeout + len(target) / min_rate` seconds, so a peer
        that trickles bytes just fast enough to dodge the stall timeout is caught as well."""
        deadline = None if not min_rate else time.monotonic() + stall_timeout + len(target) / min_rate
        protocol = self._protocol
        view = memoryview(target)
        take = min(len(protocol.pending), len(view))
        view[:take] = protocol.pending[:take]
        del protocol.pending[:take]
        protocol.target, protocol.filled = view[take:], 0
        try:
            await self._wait(lambda: protocol.filled == len(protocol.target), stall_timeout,
                             f"a {len(target)}-byte body", deadline)
        except StreamClosed as error:
            error.filled = take + protocol.filled
            raise
        finally:
            protocol.target = None

    @property
    def received(self) -> int:
        """Bytes received on this stream so far, headers and bodies."""
        return self._protocol.received

    @property
    def unclaimed_bytes(self) -> int:
        """Bytes read off the connection that no read has claimed yet: at most `MAX_PENDING` plus
        one read of the scratch buffer, whatever the peer sends ahead (the rest waits in the kernel)."""
        return len(self._protocol.pending)

    async def send(self, frame: bytes) -> None:
        if self._protocol.closed:
            raise StreamClosed(self._protocol.closed)
        self.writer.write(frame)

    def close(self) -> None:
        close_quietly(self.writer)
