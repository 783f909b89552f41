"""Talking to one provider over the blob protocol: opening a stream, reading an answer's header,
the `has` probe, and how a provider's failures are sorted (bad faith, gone, busy)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from protocol.blob_wire import BLOB_STREAM_PROTOCOL, BlobRequest
from protocol.errors import InvalidBlobResponse
from node.blobs.stream import StreamClosed, StreamReceiver, StreamStalled


class ProviderFault(Exception):
    """A provider proved itself dishonest (bad bytes, bad digest list, malformed answer): ban it."""


class ProviderGone(Exception):
    """A provider stalled, vanished or lacks the blob: stop using it for this download."""


class ProviderBusy(ProviderGone):
    """A provider has no stream to spare: this stream gives up, the provider's other streams go on."""


@dataclass
class Provider:
    peer: object  # hivemind PeerID
    name: str
    active: bool = True
    holding: set = field(default_factory=set)  # chunks in flight on any of its streams (endgame skips them)
    cuts: int = 0  # its streams cut part way (see node.blobs.download.MIN_RESUMED_BYTES) ...
    cut_bytes: int = 0  # ... and the bytes they had brought, headers included


async def open_stream(p2p, provider: Provider, timeout: float):
    try:
        _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(provider.peer, BLOB_STREAM_PROTOCOL),
                                                   timeout)
    except asyncio.TimeoutError:
        raise ProviderGone(f"no stream within {timeout:.0f} s") from None
    except Exception as error:  # p2pd reports unreachable peers with several exception types
        raise ProviderGone(f"cannot open a stream: {type(error).__name__}: {error}") from None
    return StreamReceiver(reader, writer)


async def expect_ok(stream: StreamReceiver, expected_length: int, timeout: float) -> None:
    try:
        header = await stream.read_response(timeout)
    except InvalidBlobResponse as error:
        raise ProviderFault(f"malformed answer: {error}") from None
    if header.status == "ok" and header.length != expected_length:
        raise ProviderFault(f"answered {header.length} bytes where {expected_length} were asked for")
    if header.status == "busy":
        raise ProviderBusy(f"busy: {header.detail}")
    if header.status != "ok":
        raise ProviderGone(f"answered '{header.status}': {header.detail}")


async def holds(p2p, peer, sha256: str, timeout: float = 10.0) -> bool:
    """Whether `peer` (a hivemind `PeerID`) answers that it holds blob `sha256`: the blob protocol's
    `has` probe. libp2p authenticates the stream, so this is the named peer's own answer; a provider
    record naming a peer that does not serve the blob is worth nothing."""
    stream = None
    try:
        stream = await open_stream(p2p, Provider(peer, str(peer)), timeout)
        await stream.send(BlobRequest.has(sha256).encode())
        await expect_ok(stream, 0, timeout)
        return True
    except (ProviderFault, ProviderGone, StreamStalled, StreamClosed, ConnectionError):
        return False
    finally:
        if stream is not None:
            stream.close()
