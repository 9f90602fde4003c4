"""Every codec round-trips on the CPU, whole and chunk by chunk, within its quality bound."""

import random

import pytest
import torch

import codec
from codec import CodecSpec, TokenLayout
from codec.frames import near_square_grid, plan_geometry, tile, untile
from tests.fixtures import noise_stream, structured_stream

LAYOUT = TokenLayout(prefix=32, height=16, width=16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("chunk_tokens", [0, 1, 100, 1024])
def test_raw_is_bit_exact(dtype, chunk_tokens):
    x = structured_stream(dtype=dtype)
    enc = codec.encode(x, CodecSpec("raw", chunk_tokens=chunk_tokens))
    y = codec.decode(enc, "cpu")
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.view(torch.uint8) if dtype != torch.float32 else y, x.view(torch.uint8) if dtype != torch.float32 else x)
    assert enc.nbytes == x.numel() * x.element_size()


def test_raw_carries_integer_tensors_exactly():
    ids = torch.arange(4 * 300).view(300, 4)
    assert torch.equal(codec.decode(codec.encode(ids, "raw")), ids)


@pytest.mark.parametrize("name", ["fp8", "u8"])
@pytest.mark.parametrize("make", [structured_stream, noise_stream], ids=["structured", "noise"])
def test_eight_bit_codecs_keep_cosine_above_0999(name, make):
    x = make()
    enc = codec.encode(x, CodecSpec(name, chunk_tokens=64), measure=True)
    assert enc.error.cosine >= 0.999, enc.error
    # One byte per value plus float32 parameters per channel and chunk.
    per_channel = {"fp8": 4, "u8": 8}[name]
    chunks = len(enc.header.chunks)
    assert enc.nbytes == x.numel() + chunks * x.shape[-1] * per_channel


def test_u8_rounds_instead_of_truncating():
    """The per-channel error is at most half a step: rounding, not truncation."""
    x = noise_stream(tokens=512, channels=8).float()
    y = codec.decode(codec.encode(x, CodecSpec("u8", chunk_tokens=0)))
    step = (x.amax(dim=1) - x.amin(dim=1)) / 255
    assert ((y - x).abs() <= step * 0.5 + 1e-6).all()
    assert abs(float((y - x).mean())) < 1e-3  # no -0.5 LSB bias


def test_u8_constant_channel_is_exact():
    x = torch.ones(1, 64, 4) * torch.tensor([0.0, 3.5, -2.0, 1e4])
    assert torch.equal(codec.decode(codec.encode(x, "u8")), x)


def test_fp8_keeps_outlier_channels_and_small_ones():
    x = structured_stream(outliers=4)
    y = codec.decode(codec.encode(x, "fp8")).float()
    per_channel = codec.reconstruction_error(x.float()[0].T.contiguous(), y[0].T.contiguous())
    assert per_channel.cosine > 0.999


def test_hevc_lossless_is_exact_on_the_uint8_codes():
    """HEVC lossless reproduces exactly what u8 decodes to (same quantiser, lossless video)."""
    x = structured_stream()
    via_u8 = codec.decode(codec.encode(x, CodecSpec("u8", chunk_tokens=64, layout=LAYOUT)))
    enc = codec.encode(x, CodecSpec("hevc", chunk_tokens=64, layout=LAYOUT))
    assert enc.header.encoder == "x265"
    assert torch.equal(codec.decode(enc), via_u8)


def test_hevc_qp18_on_structured_data():
    x = structured_stream(tokens_h=32, tokens_w=32, prefix=64, channels=96)
    enc = codec.encode(x, CodecSpec("hevc", qp=18, layout=TokenLayout(64, 32, 32)), measure=True)
    assert enc.error.cosine >= 0.995, enc.error
    lossless = codec.encode(x, CodecSpec("hevc", layout=TokenLayout(64, 32, 32)))
    assert enc.nbytes < lossless.nbytes


def test_hevc_without_layout_uses_near_square_chunks():
    x = noise_stream(tokens=200, channels=40)
    enc = codec.encode(x, CodecSpec("hevc", chunk_tokens=64))
    assert [c.count for c in enc.header.chunks] == [64, 64, 64, 8]
    assert torch.equal(codec.decode(enc), codec.decode(codec.encode(x, CodecSpec("u8", chunk_tokens=64))))


def test_streaming_chunks_decode_in_any_order():
    x = structured_stream()
    spec = CodecSpec("hevc", qp=10, chunk_tokens=48, layout=LAYOUT)
    header, chunks = codec.encode_chunks(x, spec)
    chunks = list(chunks)
    wire_header = header.to_dict()  # what travels: plain types only
    assert len(chunks) == len(header.chunks) > 3
    random.Random(3).shuffle(chunks)
    decoder = codec.ChunkDecoder(wire_header, "cpu")
    for chunk in chunks:
        assert not decoder.complete
        decoder.feed(chunk.index, chunk.buffers)
    assert decoder.complete
    assert torch.equal(decoder.result(), codec.decode(codec.encode(x, spec)))


def test_layout_chunks_follow_image_rows():
    x = structured_stream()
    plan = codec.plan_chunks(x.shape, CodecSpec("hevc", chunk_tokens=64, layout=LAYOUT))
    assert plan[0] == (0, 32, None)  # text tokens: no grid
    assert plan[1] == (32, 64, (4, 16))  # four image rows of 16 tokens
    assert sum(c for _, c, _ in plan) == x.shape[1]


def test_batched_layout_repeats_per_item():
    x = torch.cat([structured_stream(seed=1), structured_stream(seed=2)])
    enc = codec.encode(x, CodecSpec("u8", chunk_tokens=128, layout=LAYOUT))
    assert enc.header.shape == (2, 288, 64)
    assert codec.reconstruction_error(x, codec.decode(enc)).cosine > 0.999


@pytest.mark.parametrize("count,channels", [(1, 1), (16, 3), (1024, 4096), (4096, 4096), (512, 3072), (7, 1000)])
def test_frame_geometry_is_valid_and_tiling_inverts(count, channels):
    g = plan_geometry(count, channels)
    g.check(count, channels)
    if count * channels <= 1 << 20:
        q = torch.randint(0, 256, (count, channels), dtype=torch.uint8)
        frames = tile(q, g)
        assert frames.shape == (g.frames, 3 * g.height, g.width)
        assert torch.equal(untile(frames, g, count, channels), q)


def test_tiles_keep_each_channel_on_its_token_grid():
    """A channel's tile in the frame is its values on the image grid, row by row."""
    q = torch.arange(12 * 16, dtype=torch.int64).view(12 * 16, 1).repeat(1, 5).to(torch.uint8)
    g = plan_geometry(12 * 16, 5, (12, 16))
    frames = tile(q, g)
    assert torch.equal(frames[0, :12, :16], q[:, 0].view(12, 16))


def test_near_square_grid():
    assert near_square_grid(512) in ((16, 32), (32, 16))
    assert near_square_grid(4096) == (64, 64)
    rows, cols = near_square_grid(97)
    assert rows * cols >= 97 and abs(rows - cols) <= 2
