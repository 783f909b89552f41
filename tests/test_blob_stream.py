"""StreamReceiver over a real socket pair, on the standard event loop and on uvloop (hivemind's)."""

import asyncio
import os
import socket

import pytest
import uvloop

from node.blobs.stream import StreamClosed, StreamReceiver, StreamStalled
from protocol.blob_wire import BlobResponse

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(loop_name: str, scenario) -> None:
    loop = LOOPS[loop_name]()
    try:
        loop.run_until_complete(asyncio.wait_for(scenario(), 20))
    finally:
        loop.close()


async def receiver_and_peer() -> tuple[StreamReceiver, socket.socket]:
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    theirs.setblocking(False)
    return StreamReceiver(reader, writer), theirs


async def send_slowly(sock: socket.socket, data: bytes, piece: int) -> None:
    loop = asyncio.get_running_loop()
    for offset in range(0, len(data), piece):
        await loop.sock_sendall(sock, data[offset:offset + piece])
        await asyncio.sleep(0)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_headers_and_bodies_arrive_intact_whatever_the_packet_boundaries(loop_name):
    async def scenario():
        stream, peer = await receiver_and_peer()
        bodies = [os.urandom(3 * 1024 * 1024 + 5), os.urandom(10), os.urandom(700_000)]
        wire = b"".join(BlobResponse.ok(len(body)).encode() + body for body in bodies)
        sender = asyncio.create_task(send_slowly(peer, wire, 99_991))
        for body in bodies:
            header = await stream.read_response(5)
            assert header == BlobResponse.ok(len(body))
            received = bytearray(header.length)
            await stream.read_into(received, 5)
            assert received == body
        await sender
        stream.close()
        peer.close()

    run(loop_name, scenario)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_peer_that_stops_sending_mid_body_is_reported_stalled(loop_name):
    async def scenario():
        stream, peer = await receiver_and_peer()
        await asyncio.get_running_loop().sock_sendall(peer, BlobResponse.ok(1000).encode() + b"x" * 400)
        await stream.read_response(5)
        with pytest.raises(StreamStalled, match="no bytes for 0.3 s"):
            await stream.read_into(bytearray(1000), 0.3)
        stream.close()
        peer.close()

    run(loop_name, scenario)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_peer_that_closes_mid_body_is_reported_closed(loop_name):
    async def scenario():
        stream, peer = await receiver_and_peer()
        await asyncio.get_running_loop().sock_sendall(peer, BlobResponse.ok(1000).encode() + b"x" * 10)
        peer.close()
        await stream.read_response(5)
        with pytest.raises(StreamClosed):
            await stream.read_into(bytearray(1000), 5)
        stream.close()

    run(loop_name, scenario)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_what_a_peer_sent_before_closing_is_still_read_when_a_request_written_after_it_fails(loop_name):
    # A provider cut off by a relay: the daemon closes the stream's socket once it has passed on
    # the last bytes, and the downloader's next request then fails to be written (EPIPE). The answer
    # before the cut must still be read: a resumed download counts on it (node.blobs.download).
    async def scenario():
        stream, peer = await receiver_and_peer()
        body = os.urandom(100_000)  # more than the reader takes ahead of a read (32 KiB), less than the socket buffers
        await asyncio.get_running_loop().sock_sendall(peer, BlobResponse.ok(len(body)).encode() + body)
        peer.close()
        await asyncio.sleep(0.2)
        await stream.send(b"the next request")
        await asyncio.sleep(0.2)  # the failed write has closed the transport
        header = await stream.read_response(5)
        received = bytearray(header.length)
        await stream.read_into(received, 5)
        assert received == body
        with pytest.raises(StreamClosed, match="peer closed"):
            await stream.read_response(5)
        stream.close()

    run(loop_name, scenario)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_peer_that_trickles_bytes_below_the_minimum_rate_is_reported_too_slow(loop_name):
    async def scenario():
        stream, peer = await receiver_and_peer()
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(peer, BlobResponse.ok(100_000).encode())
        await stream.read_response(5)

        async def trickle():
            for _ in range(50):
                await loop.sock_sendall(peer, b"x" * 10)
                await asyncio.sleep(0.05)

        sender = asyncio.create_task(trickle())
        with pytest.raises(StreamStalled, match="too slow"):
            await stream.read_into(bytearray(100_000), stall_timeout=0.5, min_rate=200_000)
        sender.cancel()
        stream.close()
        peer.close()

    run(loop_name, scenario)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_body_sent_before_its_reader_asks_waits_in_the_socket_not_in_a_second_copy(loop_name):
    # Bytes read with no target named are copied twice more (scratch, pending, target): a
    # downloader busy hashing must leave them in the kernel, then receive them into its buffer.
    async def scenario():
        stream, peer = await receiver_and_peer()
        body = os.urandom(4 * 1024 * 1024)
        sender = asyncio.create_task(asyncio.get_running_loop().sock_sendall(peer, BlobResponse.ok(len(body)).encode()
                                                                             + body))
        header = await stream.read_response(5)
        await asyncio.sleep(0.3)  # the reader is busy elsewhere; the peer goes on sending
        assert stream.unclaimed_bytes <= 64 * 1024  # of the 4 MiB sent ahead
        received = bytearray(header.length)
        await stream.read_into(received, 5)
        assert received == body
        await sender
        stream.close()
        peer.close()

    run(loop_name, scenario)
