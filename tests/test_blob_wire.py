"""Blob protocol framing: strict, bounded decoders that refuse everything but canonical frames."""

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from protocol.blob_wire import (FRAME_PREFIX_BYTES, BlobRequest, BlobResponse, decode_request, decode_request_frame,
                                decode_response, decode_response_frame, request_body_length, response_body_length)
from protocol.errors import InvalidBlobRequest, InvalidBlobResponse, ProtocolError
from protocol.limits import MAX_BLOB_BYTES, MAX_BLOB_REQUEST_BYTES, MAX_RANGE_BYTES
from tests import fuzz_targets

SHA = "ab" * 32
hex64, requests, responses = fuzz_targets.hex64, fuzz_targets.blob_requests, fuzz_targets.blob_responses


# Anything msgpack can carry, to build maps that look almost like requests.
scalars = fuzz_targets.msgpack_scalars
near_requests = st.fixed_dictionaries(
    {},
    optional={"op": st.one_of(st.sampled_from(["digests", "range", "write"]), scalars),
              "sha256": st.one_of(hex64, scalars), "start": st.one_of(st.integers(-5, 2**40), scalars),
              "end": st.one_of(st.integers(-5, 2**40), scalars), "extra": scalars})


@given(requests())
def test_every_request_round_trips_through_its_frame(request):
    assert decode_request_frame(request.encode()) == request


@given(responses)
def test_every_response_header_round_trips_through_its_frame(response):
    assert decode_response_frame(response.encode()) == response


@settings(max_examples=500)
@given(st.binary(max_size=MAX_BLOB_REQUEST_BYTES + 8))
def test_random_bytes_never_decode_to_a_request_unless_they_are_its_canonical_frame(data):
    try:
        request = decode_request_frame(data)
    except InvalidBlobRequest:
        return
    assert request.encode() == data


@settings(max_examples=500)
@given(requests(), st.data())
def test_a_request_frame_with_a_mutated_byte_is_refused_or_is_another_canonical_request(request, data):
    frame = bytearray(request.encode())
    position = data.draw(st.integers(0, len(frame) - 1))
    frame[position] = data.draw(st.integers(0, 255).filter(lambda b: b != frame[position]))
    try:
        mutated = decode_request_frame(bytes(frame))
    except InvalidBlobRequest:
        return
    assert mutated != request and mutated.encode() == bytes(frame)


@settings(max_examples=500)
@given(st.binary(max_size=MAX_BLOB_REQUEST_BYTES))
def test_random_bodies_never_decode_to_a_response_unless_canonical(data):
    try:
        response = decode_response(data)
    except InvalidBlobResponse:
        return
    assert response.encode()[FRAME_PREFIX_BYTES:] == data


@settings(max_examples=500)
@given(near_requests)
def test_maps_that_almost_look_like_requests_are_refused_or_exact(fields):
    body = msgpack.packb(fields, use_bin_type=True)
    try:
        request = decode_request(body)
    except InvalidBlobRequest:
        return
    assert request.encode()[FRAME_PREFIX_BYTES:] == body


def test_a_prefix_announcing_an_oversized_request_is_refused_before_the_body_is_read():
    with pytest.raises(InvalidBlobRequest, match="outside"):
        request_body_length((MAX_BLOB_REQUEST_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(InvalidBlobRequest):
        request_body_length((0).to_bytes(4, "big"))
    with pytest.raises(InvalidBlobResponse):
        response_body_length((2**32 - 1).to_bytes(4, "big"))


def test_a_range_longer_than_the_limit_is_refused():
    body = msgpack.packb({"end": MAX_RANGE_BYTES + 1, "op": "range", "sha256": SHA, "start": 0})
    with pytest.raises(InvalidBlobRequest, match="over the limit"):
        decode_request(body)


@pytest.mark.parametrize("start, end", [(5, 5), (9, 3), (-1, 4), (MAX_BLOB_BYTES, MAX_BLOB_BYTES + 1)])
def test_an_empty_inverted_or_out_of_bounds_range_is_refused(start, end):
    with pytest.raises(InvalidBlobRequest):
        BlobRequest.range(SHA, start, end)


def test_non_canonical_msgpack_is_refused():
    canonical = BlobRequest.range(SHA, 0, 10).encode()[FRAME_PREFIX_BYTES:]
    unsorted = msgpack.packb({"start": 0, "end": 10, "op": "range", "sha256": SHA})
    assert unsorted != canonical
    with pytest.raises(InvalidBlobRequest, match="canonical"):
        decode_request(unsorted)


def test_a_frame_with_trailing_bytes_is_refused():
    with pytest.raises(InvalidBlobRequest):
        decode_request_frame(BlobRequest.digests(SHA).encode() + b"\x00")


def test_an_ok_answer_bigger_than_a_range_is_refused():
    with pytest.raises(InvalidBlobResponse):
        BlobResponse.ok(MAX_RANGE_BYTES + 1)


def test_a_refusal_that_carries_bytes_is_refused():
    body = msgpack.packb({"detail": "", "length": 7, "status": "busy"})
    with pytest.raises(InvalidBlobResponse, match="carries no bytes"):
        decode_response(body)


def test_wire_errors_are_protocol_errors():
    assert issubclass(InvalidBlobRequest, ProtocolError) and issubclass(InvalidBlobResponse, ProtocolError)
