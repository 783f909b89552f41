"""Frames of the blob protocol over one hivemind binary stream (an asyncio reader/writer pair).

Every read has a deadline: a peer that stops sending is a stalled peer (`StreamStalled`), never a
hung task. Frames are checked against their size limit before their body is read.
"""

from __future__ import annotations

import asyncio

from protocol.blob_wire import (FRAME_PREFIX_BYTES, BlobRequest, BlobResponse, decode_request, decode_response,
                                request_body_length, response_body_length)

# Bodies are read in pieces of this size, each under its own deadline, so a slow but live peer
# is told apart from a stalled one.
BODY_PIECE_BYTES = 1 << 20


class StreamStalled(TimeoutError):
    """The peer sent nothing for longer than the stall timeout."""


class StreamClosed(ConnectionError):
    """The peer closed the stream (or its daemon dropped it) in the middle of a frame."""


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


async def read_response(reader: asyncio.StreamReader, timeout: float) -> BlobResponse:
    """Next response header. Raises `InvalidBlobResponse`, `StreamStalled`, `StreamClosed`."""
    prefix = await _read_exactly(reader, FRAME_PREFIX_BYTES, timeout)
    body = await _read_exactly(reader, response_body_length(prefix), timeout)
    return decode_response(body)


async def read_body(reader: asyncio.StreamReader, count: int, stall_timeout: float) -> bytes:
    """Exactly `count` raw bytes that follow an "ok" header; each MiB must arrive within `stall_timeout`."""
    if count <= BODY_PIECE_BYTES:
        return await _read_exactly(reader, count, stall_timeout)
    pieces = []
    remaining = count
    while remaining:
        piece = await _read_exactly(reader, min(remaining, BODY_PIECE_BYTES), stall_timeout)
        pieces.append(piece)
        remaining -= len(piece)
    return b"".join(pieces)


async def send_frame(writer: asyncio.StreamWriter, frame: bytes) -> None:
    writer.write(frame)
    await writer.drain()


def close_quietly(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except Exception:  # the transport may already be gone; closing is best effort
        pass
