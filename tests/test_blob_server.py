"""BlobServer's stream handler fed directly over a unix socket pair (the same asyncio reader and
writer types p2pd hands it): answers, limits, and no crash on any input."""

import asyncio
import socket

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from node.blobs.server import BlobServer
from node.blobs.store import BlobStore
from protocol.blob_wire import FRAME_PREFIX_BYTES, BlobRequest, decode_response_frame
from protocol.limits import CHUNK_BYTES


class _Info:
    peer_id = "test-peer"


async def open_stream(server: BlobServer):
    """A client socket connected to a running `server.handle_stream`."""
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    handler = asyncio.create_task(server.handle_stream(_Info(), reader, writer))
    client_reader, client_writer = await asyncio.open_unix_connection(sock=ours)
    return client_reader, client_writer, handler


async def read_answer(reader):
    prefix = await asyncio.wait_for(reader.readexactly(FRAME_PREFIX_BYTES), 5)
    header = decode_response_frame(prefix + await reader.readexactly(int.from_bytes(prefix, "big")))
    return header, await reader.readexactly(header.length)


@pytest.fixture(scope="module")
def blob_store(tmp_path_factory):
    store = BlobStore(tmp_path_factory.mktemp("server-store"))
    data = bytes(range(256)) * (CHUNK_BYTES // 128 + 3)
    return store, store.put_bytes(data), data


def test_one_stream_serves_digests_and_ranges_in_order(blob_store):
    store, ref, data = blob_store

    async def scenario():
        server = BlobServer(store)
        reader, writer, handler = await open_stream(server)
        writer.write(BlobRequest.digests(ref.sha256).encode() + BlobRequest.range(ref.sha256, 5, CHUNK_BYTES + 9).encode())
        header, digests = await read_answer(reader)
        assert header.status == "ok" and digests == store.digest_bytes(ref.sha256)
        header, body = await read_answer(reader)
        assert header.length == CHUNK_BYTES + 4 and body == data[5:CHUNK_BYTES + 9]
        writer.close()
        await asyncio.wait_for(handler, 5)
        assert server.stats.ok == 2 and server.stats.bytes_served == len(digests) + len(body)

    asyncio.run(scenario())


def test_streams_beyond_the_limit_are_told_busy(blob_store):
    store, ref, _ = blob_store

    async def scenario():
        server = BlobServer(store, max_streams=1)
        _, first_writer, first = await open_stream(server)
        await asyncio.sleep(0.05)
        reader, writer, second = await open_stream(server)
        header, _ = await read_answer(reader)
        assert header.status == "busy" and "retry" in header.detail
        await asyncio.wait_for(second, 5)
        first_writer.close()
        await asyncio.wait_for(first, 5)
        assert server.stats.streams_busy == 1

    asyncio.run(scenario())


def test_a_peer_that_asks_and_never_reads_loses_its_stream(blob_store):
    store, ref, _ = blob_store

    async def scenario():
        server = BlobServer(store, request_timeout=0.3, min_send_rate=1e9)
        reader, writer, handler = await open_stream(server)
        writer.write(BlobRequest.range(ref.sha256, 0, ref.size).encode() * 4)
        await asyncio.wait_for(handler, 5)  # the slot is free again, without the peer reading a byte
        assert server._active == 0
        writer.close()

    asyncio.run(scenario())


def test_a_silent_stream_is_closed_after_the_idle_timeout(blob_store):
    store, _, _ = blob_store

    async def scenario():
        server = BlobServer(store, idle_timeout=0.2)
        reader, _, handler = await open_stream(server)
        await asyncio.wait_for(handler, 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""

    asyncio.run(scenario())


@st.composite
def peer_input(draw, sha: str, size: int) -> bytes:
    """What a peer might send: well-formed requests (for the stored blob or another, any range,
    inside the blob or not) and garbage, in any mix."""
    frames = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["digests", "range", "garbage"]))
        target = draw(st.sampled_from([sha, "f" * 64]))
        if kind == "digests":
            frames.append(BlobRequest.digests(target).encode())
        elif kind == "range":
            start = draw(st.integers(0, size + 10))
            frames.append(BlobRequest.range(target, start, start + draw(st.integers(1, 3 * CHUNK_BYTES))).encode())
        else:
            frames.append(draw(st.binary(max_size=300)))
    return b"".join(frames)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_input_from_a_peer_gets_well_formed_answers_and_never_hits_a_handler_bug(blob_store, caplog, data):
    store, ref, _ = blob_store
    garbage = data.draw(peer_input(ref.sha256, ref.size))
    caplog.clear()

    async def scenario():
        server = BlobServer(store, idle_timeout=0.2, request_timeout=0.2)
        reader, writer, handler = await open_stream(server)
        writer.write(garbage)
        writer.write_eof()

        async def answers() -> bytes:
            try:
                return await reader.read()
            except ConnectionResetError:  # the server closed with our garbage unread: the kernel resets
                return b""
        _, rest = await asyncio.wait_for(asyncio.gather(handler, answers()), 10)
        while rest:  # whatever came back is a sequence of well-formed answers
            length = int.from_bytes(rest[:FRAME_PREFIX_BYTES], "big")
            header = decode_response_frame(rest[:FRAME_PREFIX_BYTES + length])
            rest = rest[FRAME_PREFIX_BYTES + length + header.length:]
        writer.close()

    asyncio.run(scenario())
    assert not [record for record in caplog.records if record.levelname == "ERROR"]  # the handler caught a bug
