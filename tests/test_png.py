"""The generation's PNG writer and its pixels: what PIL and diffusers would give, bit for bit."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from PIL import Image

from meshd.pipeline import png
from meshd.pipeline.generation import png_bytes, to_pixels


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # reads every chunk: a bad CRC, length or zlib stream raises here
    return image


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 3), (64, 48, 4), (33, 17, 1), (1024, 1024, 3)])
def test_any_image_decodes_to_the_same_pixels(shape):
    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    image = _decoded(png.encode_png(pixels))
    assert image.mode == {1: "L", 3: "RGB", 4: "RGBA"}[shape[2]]
    assert np.array_equal(np.asarray(image).reshape(shape), pixels)


def test_a_large_image_is_deflated_in_bands_that_form_one_stream(monkeypatch):
    """Above the threshold the bands are compressed on the pool; the stream must still be one valid
    zlib stream whose checksum covers every band (a wrong Adler-32 or a missing flush fails here)."""
    monkeypatch.setattr(png, "_BANDS", 5)
    y, x = np.mgrid[0:700, 0:900]
    pixels = np.stack([x % 256, y % 256, (x * y) % 256], -1).astype(np.uint8)
    data = png.encode_png(pixels)
    stream = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    assert zlib.decompress(stream) == png._sub_filtered(pixels)
    assert np.array_equal(np.asarray(_decoded(data)), pixels)


def test_smooth_images_compress_like_pil_at_the_same_level():
    """One Sub filter for every row against PIL's per-row choice: no more than a few per cent larger."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:512, 0:512]
    smooth = np.stack([x // 2, y // 2, (x + y) // 4], -1) % 256
    pixels = np.clip(smooth + rng.integers(-3, 4, smooth.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    assert len(png.encode_png(pixels)) <= 1.05 * len(buf.getvalue())


def test_text_chunks_carry_the_generation_and_any_prompt():
    info = {"flux-mesh": "1", "params": {"prompt": "a café at dusk, 東京"}, "seed": 3}
    image = _decoded(png_bytes(np.zeros((4, 4, 3), np.uint8), info))
    assert json.loads(image.text["flux-mesh"]) == info
    assert image.text["parameters"] == "a café at dusk, 東京"  # iTXt: not Latin-1
    latin = _decoded(png.encode_png(np.zeros((2, 2, 3), np.uint8), {"parameters": "café"}))
    assert latin.text["parameters"] == "café"


def _text_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every tEXt and iTXt chunk, read by the PNG layout itself."""
    out, at = [], len(png._SIGNATURE)
    while at < len(data):
        (length,), kind = struct.unpack(">I", data[at:at + 4]), data[at + 4:at + 8]
        if kind in (b"tEXt", b"iTXt"):
            out.append((kind, data[at + 8:at + 8 + length]))
        at += 12 + length
    return out


@pytest.mark.parametrize(("prompt", "kind"), [("a\x00b at dusk\x00", b"tEXt"), ("\x00東京\x00の夜", b"iTXt")],
                         ids=["latin-1", "utf-8"])
def test_a_prompt_with_nul_characters_still_gives_a_valid_png(prompt, kind):
    """No NUL in a text chunk's text (libpng reads it as a C string: the prompt would end there): the
    prompt is written without them; the flux-mesh chunk keeps it exactly (JSON writes it as \\u0000)."""
    info = {"flux-mesh": "1", "params": {"prompt": prompt}}
    data = png_bytes(np.zeros((4, 4, 3), np.uint8), info)
    image = _decoded(data)
    assert image.text["parameters"] == prompt.replace("\x00", "")
    assert json.loads(image.text["flux-mesh"]) == info
    chunks = dict((body.split(b"\0", 1)[0], (chunk, body)) for chunk, body in _text_chunks(data))
    assert chunks[b"flux-mesh"][0] == b"tEXt" and chunks[b"parameters"][0] == kind
    for chunk, body in chunks.values():
        if chunk == b"tEXt":  # keyword NUL text
            assert body.count(b"\0") == 1
        else:  # keyword NUL flag method language NUL translated-keyword NUL text
            assert b"\0" not in body.split(b"\0", 1)[1][2:].split(b"\0", 2)[2]


@pytest.mark.parametrize("keyword", ["", "k" * 80, " lead", "trail ", "two  spaces", "tab\there", "nul\x00",
                                     "del\x7f", "no-break\xa0space", "\u6771"])
def test_text_keywords_follow_the_png_rules(keyword):
    """1-79 printable Latin-1 characters (32-126, 161-255), no leading, trailing or consecutive spaces."""
    with pytest.raises(ValueError, match="keyword"):
        png.encode_png(np.zeros((2, 2, 3), np.uint8), {keyword: "x"})


def test_a_keyword_may_use_any_printable_latin_1():
    image = _decoded(png.encode_png(np.zeros((2, 2, 3), np.uint8), {"Créé le ~ 2026 [a b]": "x"}))
    assert image.text == {"Créé le ~ 2026 [a b]": "x"}


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8),
                                 np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4, 3), np.uint8)])
def test_what_is_not_an_image_is_refused_by_shape_and_dtype(bad):
    with pytest.raises(ValueError, match="encode_png"):
        png.encode_png(bad)


def test_pixels_equal_diffusers_postprocess_bit_for_bit():
    """The device-side conversion against diffusers' own, on every bf16 value in [-1.5, 1.5] — the
    only exact tie, 0 (127.5 after scaling), must round to even — and on random images."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 128, 96, generator=generator).mul(0.8).to(torch.bfloat16)
    every = torch.arange(0, 2 ** 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    every = every[every.float().abs() <= 1.5]  # also drops NaN
    flat = images.view(-1)
    assert every.numel() < flat.numel()
    flat[:every.numel()] = every
    theirs = Flux2ImageProcessor(vae_scale_factor=16).postprocess(images, output_type="pil")
    ours = to_pixels(images)
    assert ours.dtype == np.uint8 and ours.shape == (2, 128, 96, 3) and ours.flags.c_contiguous
    for mine, reference in zip(ours, theirs):
        assert np.array_equal(mine, np.asarray(reference))
