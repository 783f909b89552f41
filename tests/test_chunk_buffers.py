"""The download's chunk buffers (node/blobs/buffers.py): reused, never handed out twice."""

import pytest

from node.blobs.buffers import ChunkBuffers

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

