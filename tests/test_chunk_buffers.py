"""The download's chunk buffers (node/blobs/buffers.py) and the whole-file hasher that hands them
back (node/blobs/schedule.py): reused, never handed out twice, and the whole-file sha256 right
whatever order the chunks arrive in."""

import asyncio
import hashlib
import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from node.blobs.buffers import ChunkBuffers
from node.blobs.schedule import OrderedHasher

CHUNK = 64 * 1024


def test_a_buffer_given_back_is_the_next_one_taken_and_a_short_one_is_not_kept():
    buffers = ChunkBuffers(CHUNK)
    first = buffers.take(CHUNK)
    buffers.give_back(first)
    assert buffers.take(CHUNK) is first
    short = buffers.take(100)
    assert len(short) == 100
    buffers.give_back(short)
    assert buffers.take(100) is not short
    assert buffers.allocated == 3


def test_a_buffer_given_back_twice_is_refused_rather_than_handed_to_two_chunks():
    buffers = ChunkBuffers(CHUNK)
    buffer = buffers.take(CHUNK)
    buffers.give_back(buffer)
    with pytest.raises(RuntimeError, match="twice"):
        buffers.give_back(buffer)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chunks_offered_out_of_order_hash_to_the_whole_file_and_every_buffer_comes_back_once(seed):
    blob = os.urandom(20 * CHUNK + 123)
    spans = [(start, min(start + CHUNK, len(blob))) for start in range(0, len(blob), CHUNK)]
    order = list(range(len(spans)))
    random.Random(seed).shuffle(order)
    given_back: list[int] = []
    offered: list[int] = []

    async def scenario() -> str:
        with ThreadPoolExecutor(1) as executor:
            hasher = OrderedHasher(len(spans), lambda i: blob[spans[i][0]:spans[i][1]], executor, max_buffered=3,
                                   give_back=lambda buffer: given_back.append(id(buffer)))
            kept = []
            for index in order:
                data = bytearray(blob[spans[index][0]:spans[index][1]])
                kept.append(data)  # alive to the end, so no id is reused
                offered.append(id(data))
                hasher.offer(index, data)
                kept.append(second := bytearray(data))
                hasher.offer(index, second)  # endgame's second copy: refused, handed back at once
                await asyncio.sleep(0)
            return await hasher.hexdigest()

    assert asyncio.run(scenario()) == hashlib.sha256(blob).hexdigest()
    assert sorted(set(given_back) & set(offered)) == sorted(offered)  # every first copy came back
    assert len(given_back) == 2 * len(spans) and len(set(given_back)) == len(given_back)
