"""The sans-I/O frame format: round trips, incremental parsing, and refusal of bad frames."""

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd import limits
from meshd.wire.frames import (
    PREAUTH_LIMITS,
    PREFIX,
    FrameLimits,
    FrameReader,
    ProtocolError,
    encode_frame,
    frame_bytes,
)


def test_round_trip_with_segments():
    data = frame_bytes({"op": "forward", "id": 7, "job": "x"}, [b"abc", b"", bytes(1000)])
    (frame,) = FrameReader().feed(data)
    assert frame.header == {"op": "forward", "id": 7, "job": "x"}
    assert [bytes(s) for s in frame.segments] == [b"abc", b"", bytes(1000)]


def test_frames_parse_byte_by_byte_and_back_to_back():
    data = frame_bytes({"op": "a", "id": 1}, [b"x" * 10]) + frame_bytes({"op": "b", "id": 2})
    reader = FrameReader()
    frames = []
    for i in range(len(data)):
        frames += reader.feed(data[i : i + 1])
    assert [f.op for f in frames] == ["a", "b"]


def test_segments_are_passed_through_not_copied():
    payload = memoryview(bytearray(1 << 20))
    buffers = encode_frame({"op": "x", "id": 1}, [payload])
    assert buffers[1] is payload


def prefix(magic=limits.MAGIC, version=limits.FRAME_FORMAT, header_len=8, nseg=0) -> bytes:
    return PREFIX.pack(magic, version, 0, header_len, nseg)


@pytest.mark.parametrize(
    "data,match",
    [
        (prefix(magic=b"GET "), "not a meshd frame"),
        (prefix(version=9), "frame format 9"),
        (prefix(header_len=0), "header of 0 bytes"),
        (prefix(header_len=limits.MAX_HEADER_BYTES + 1), "exceeds the limit"),
        (prefix(nseg=limits.MAX_SEGMENTS + 1), "segments exceeds"),
    ],
)
def test_bad_prefixes_are_refused_before_reading_more(data, match):
    with pytest.raises(ProtocolError, match=match):
        FrameReader().feed(data)


def test_huge_declared_segment_is_refused_before_allocating():
    header = msgpack.packb({"op": "x", "id": 1})
    data = prefix(header_len=len(header), nseg=1) + struct.pack("<Q", 1 << 40) + header
    with pytest.raises(ProtocolError, match="segment of 1099511627776 bytes"):
        FrameReader().feed(data)


def test_total_frame_size_is_capped():
    lim = FrameLimits(max_segment=100, max_frame=150)
    header = msgpack.packb({"op": "x", "id": 1})
    data = prefix(header_len=len(header), nseg=2) + struct.pack("<QQ", 100, 100) + header
    with pytest.raises(ProtocolError, match="frame of 200 bytes"):
        FrameReader(lim).feed(data)


@pytest.mark.parametrize(
    "header,match",
    [
        (b"\xc1\xc1\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2, 3]), "must be a map"),
        (msgpack.packb({"id": 1}), "no 'op'"),
        (msgpack.packb({1: "x", "op": "y"}), "not valid msgpack"),  # strict_map_key
        (msgpack.packb({"op": "x", "blob": b"x" * (limits.MAX_HEADER_STRING + 1)}), "not valid msgpack"),
    ],
)
def test_bad_headers(header, match):
    with pytest.raises(ProtocolError, match=match):
        FrameReader().feed(prefix(header_len=len(header)) + header)


def test_preauth_limits_allow_only_a_small_header():
    small = frame_bytes({"op": "hello", "nonce": bytes(32)})
    assert FrameReader(PREAUTH_LIMITS).feed(small)
    with pytest.raises(ProtocolError):
        FrameReader(PREAUTH_LIMITS).feed(frame_bytes({"op": "hello", "pad": "x" * 600}))
    with pytest.raises(ProtocolError):
        FrameReader(PREAUTH_LIMITS).feed(frame_bytes({"op": "hello"}, [b"payload"]))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_parser(data):
    reader = FrameReader()
    try:
        reader.feed(limits.MAGIC + data)
    except ProtocolError:
        pass
