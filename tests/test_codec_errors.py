"""Bad encoded input is a CodecError naming the cause: never a crash, never a huge allocation."""

import copy
import resource

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import codec
from codec import CodecError, CodecSpec, Encoded, Header
from tests.fixtures import structured_stream


def encoded(name: str = "u8", **kw) -> Encoded:
    return codec.encode(structured_stream(), CodecSpec.parse(name, chunk_tokens=96, **kw))


def wire(enc: Encoded) -> tuple[dict, list]:
    return enc.header.to_dict(), [bytes(b) for b in enc.buffers]


def decode_wire(header: dict, buffers: list) -> torch.Tensor:
    return codec.decode(Encoded.from_wire(header, buffers))


def test_wire_round_trip_is_plain_data():
    header, buffers = wire(encoded("hevc-qp20"))
    import msgpack

    header = msgpack.unpackb(msgpack.packb(header), strict_map_key=True)
    assert decode_wire(header, buffers).shape == (1, 288, 64)


@pytest.mark.parametrize("name", ["raw", "fp8", "u8", "hevc-lossless"])
def test_missing_buffer(name):
    header, buffers = wire(encoded(name))
    with pytest.raises(CodecError, match="buffers"):
        decode_wire(header, buffers[:-1])


@pytest.mark.parametrize("name", ["raw", "fp8", "u8"])
def test_buffer_of_the_wrong_size(name):
    header, buffers = wire(encoded(name))
    buffers[-1] = buffers[-1][:-1]
    with pytest.raises(CodecError, match="bytes; the header implies"):
        decode_wire(header, buffers)


def test_truncated_hevc_frame_is_caught_by_its_length():
    header, buffers = wire(encoded("hevc-qp18"))
    buffers[-1] = buffers[-1][: len(buffers[-1]) // 2]
    with pytest.raises(CodecError, match="truncated stream"):
        decode_wire(header, buffers)


def test_damaged_hevc_frame_is_caught_by_its_crc():
    header, buffers = wire(encoded("hevc-lossless"))
    frame = bytearray(buffers[1])
    frame[len(frame) // 2] ^= 0x55
    buffers[1] = bytes(frame)
    with pytest.raises(CodecError, match="CRC"):
        decode_wire(header, buffers)


def test_garbage_hevc_with_matching_table_is_a_codec_error():
    """A sender that lies consistently (lengths and CRCs of garbage) still gets a clean error."""
    import zlib

    import numpy as np

    header, buffers = wire(encoded("hevc-lossless"))
    channels = header["shape"][-1]
    garbage = bytes(range(256)) * 4
    params = bytearray(buffers[0])
    table = np.frombuffer(bytes(params[8 * channels :]), dtype="<u4").reshape(-1, 2).copy()
    table[0] = (len(garbage), zlib.crc32(garbage))
    params[8 * channels :] = table.tobytes()
    buffers[0], buffers[1] = bytes(params), garbage
    with pytest.raises(CodecError):
        decode_wire(header, buffers)


def mutate(header: dict, **changes) -> dict:
    out = copy.deepcopy(header)
    out.update(changes)
    return out


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"codec": "zstd"}, "unknown codec"),
        ({"dtype": "complex64"}, "unknown dtype"),
        ({"dtype": "int64"}, "floating-point"),
        ({"v": 99}, "version"),
        ({"shape": [1, 288]}, "covers tokens 0..96"),
        ({"shape": [1 << 20, 1 << 20, 64]}, "elements"),
        ({"shape": [-1, 288, 64]}, "each in"),
        ({"shape": "1x288x64"}, "shape"),
        ({"shape": [1, 288, 1 << 20]}, "channels exceed|elements"),
        ({"chunks": []}, "chunks"),
        ({"chunks": [[0, 288]] * 5000}, "chunks"),
        ({"chunks": [[0, 100], [50, 238]]}, "expected to start"),
        ({"chunks": [[0, 100]]}, "cover 100 of 288"),
        ({"chunks": [[0, "288"]]}, "integers"),
        ({"qp": 18}, "QP"),
    ],
)
def test_malformed_headers_are_refused_with_their_cause(changes, match):
    header, buffers = wire(encoded("u8"))
    with pytest.raises(CodecError, match=match):
        decode_wire(mutate(header, **changes), buffers)


@pytest.mark.parametrize(
    "geometry,match",
    [
        ([16, 16, 1, 1, 1, 16, 16], "multiple of 16 in"),
        ([16, 16, 1, 4, 4, 1 << 20, 160], "multiple of 16 in"),
        ([16, 16, 100000, 4, 4, 160, 160], "frames"),
        ([2, 2, 1, 4, 4, 160, 160], "cannot hold"),
        ([16, 16, 1, 40, 40, 160, 160], "do not fit"),
        ([16, 16, 1, 1, 1, 160, 160], "fewer than"),
        ([16, 16, 9, 4, 4, 160, 160], "whole frame empty"),
        ([16, 16, 1, 4, 4, 160], "7 integers"),
    ],
)
def test_absurd_frame_geometry_is_refused(geometry, match):
    header, buffers = wire(encoded("hevc-lossless", layout=codec.TokenLayout(32, 16, 16)))
    header["chunks"][1][2] = geometry
    with pytest.raises(CodecError, match=match):
        decode_wire(header, buffers)


def test_huge_declared_size_is_refused_before_allocating():
    header = {"v": 1, "codec": "raw", "dtype": "bfloat16", "shape": [1 << 16, 1 << 15, 2], "chunks": [[0, 1 << 31]]}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CodecError, match="elements"):
        codec.ChunkDecoder(header, "cpu")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def test_a_receiver_can_insist_on_the_shape_it_expects():
    enc = encoded("u8")
    with pytest.raises(CodecError, match="expected"):
        codec.ChunkDecoder(enc.header.to_dict(), "cpu", expect_shape=(1, 4608, 4096))
    assert codec.decode(enc, "cpu", expect_shape=(1, 288, 64)).shape == (1, 288, 64)


def test_chunk_fed_twice_or_out_of_range():
    enc = encoded("raw")
    dec = codec.ChunkDecoder(enc.header.to_dict(), "cpu")
    dec.feed(0, enc.buffers[:1])
    with pytest.raises(CodecError, match="twice"):
        dec.feed(0, enc.buffers[:1])
    with pytest.raises(CodecError, match="outside"):
        dec.feed(99, enc.buffers[:1])
    with pytest.raises(CodecError, match="never arrived"):
        dec.result()


def test_unknown_codec_names_and_bad_specs():
    with pytest.raises(CodecError, match="unknown codec"):
        CodecSpec.parse("jpeg")
    with pytest.raises(CodecError, match="0-51"):
        CodecSpec.parse("hevc-qp77")
    with pytest.raises(CodecError, match="no QP"):
        CodecSpec("u8", qp=3)
    with pytest.raises(CodecError, match="floating-point"):
        codec.encode(torch.arange(10).view(2, 5), "u8")
    with pytest.raises(CodecError, match="unsupported dtype"):
        codec.encode(torch.zeros(2, 2, dtype=torch.complex64), "raw")


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["v", "codec", "dtype", "shape", "chunks", "qp", "encoder", "extra"]),
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8) | st.binary(max_size=8),
            lambda inner: st.lists(inner, max_size=6),
            max_leaves=20,
        ),
    )
)
def test_fuzzed_headers_never_crash(header):
    try:
        Header.from_dict(header)
    except CodecError:
        pass
