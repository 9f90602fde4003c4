#!/usr/bin/env python3
"""Codec figures on deterministic fixtures: ratio vs bf16, error, encode and decode time.

    python bench/codec_bench.py --device cpu --json
    python bench/codec_bench.py --device cuda --json

Fixture (a): [1, 4608, 4096] bf16 with spatial structure on a 64x64 token grid and 8 outlier channels
(100-1000x); fixture (b): the same shape, plain noise. Each row says which fixture it comes from and
which engines ran (on a GPU without NVENC, HEVC is encoded by libx265 on the CPU and decoded by NVDEC).
Times are medians of --repeat runs after a warm-up (sessions opened, pinned buffers cached).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import codec  # noqa: E402
from bench.fixtures import noise_stream, structured_stream  # noqa: E402
from bench.timing import median_ms  # noqa: E402
from codec import CodecSpec, TokenLayout  # noqa: E402

LAYOUT = TokenLayout(prefix=512, height=64, width=64)
DEFAULT_CODECS = "raw,fp8,u8,hevc-lossless,hevc-qp12,hevc-qp18,hevc-qp24"


def quantiser_kernels_ms(x: torch.Tensor, name: str, repeat: int) -> dict:
    """GPU-only time of the 8-bit quantisers (no host copies): what the fast path overlaps with sends."""
    from codec.quant import fp8_dequantize, fp8_quantize, u8_dequantize, u8_quantize

    flat = x.reshape(-1, x.shape[-1])
    q, d = (fp8_quantize, fp8_dequantize) if name == "fp8" else (u8_quantize, u8_dequantize)
    codes, params = q(flat)
    enc_ms, _, _ = median_ms(lambda: q(flat), x.device, repeat, warmup=0)
    dec_ms, _, _ = median_ms(lambda: d(codes, params, x.dtype), x.device, repeat, warmup=0)
    return {"quantise_ms": round(enc_ms, 3), "dequantise_ms": round(dec_ms, 3)}


def bench_one(x: torch.Tensor, fixture: str, label: str, repeat: int) -> dict:
    device = x.device
    spec = CodecSpec.parse(label, layout=LAYOUT)
    caps = codec.probe(device)
    enc = codec.encode(x, spec, measure=True)  # warm-up: opens sessions, caches pinned memory
    codec.decode(enc, device)
    enc_ms, _, enc = median_ms(lambda: codec.encode(x, spec), device, repeat, warmup=0)
    dec_ms, _, y = median_ms(lambda: codec.decode(enc, device), device, repeat, warmup=0)
    err = codec.reconstruction_error(x, y)
    row = {
        "fixture": fixture,
        "codec": spec.label,
        "shape": list(x.shape),
        "raw_bytes": enc.header.raw_bytes,
        "wire_bytes": enc.nbytes,
        "ratio_vs_bf16": round(enc.ratio, 3),
        "cosine": round(err.cosine, 6),
        "rel_l2": round(err.rel_l2, 6),
        "max_abs": err.max_abs,
        "encode_ms": round(enc_ms, 3),
        "decode_ms": round(dec_ms, 3),
        "chunks": len(enc.header.chunks),
    }
    if spec.name == "hevc":
        row["frames"] = sum(c.geometry.frames for c in enc.header.chunks)
        row["encoder"] = enc.header.encoder
        row["decoder"] = caps.hevc_decoder
        if device.type == "cuda":
            # NVDEC alone: all frames of the tensor submitted at once over the decoder sessions.
            decoder = codec.core.hevc_decoder(device)
            pos, groups = 0, []
            for i, c in enumerate(enc.header.chunks):
                n = enc.header.buffers_per_chunk(i)
                groups.append((c.geometry, enc.buffers[pos + 1 : pos + n]))
                pos += n

            def nvdec_only():
                pending = [decoder.submit(frames, g.width, g.height) for g, frames in groups]
                return [p.result() for p in pending]

            nvdec_only()
            nvdec_ms, _, _ = median_ms(nvdec_only, device, repeat, warmup=0)
            row["nvdec_frames_ms"] = round(nvdec_ms, 3)
    elif spec.name in ("fp8", "u8") and device.type == "cuda":
        row.update(quantiser_kernels_ms(x, spec.name, repeat))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--codecs", default=DEFAULT_CODECS)
    parser.add_argument("--fixtures", default="a,b", help="a (structured), b (noise)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    fixtures = {"a": ("a-structured", structured_stream), "b": ("b-noise", noise_stream)}
    caps = codec.probe(device)
    rows = []
    for key in args.fixtures.split(","):
        name, make = fixtures[key]
        x = make().to(device)
        for label in args.codecs.split(","):
            if label.startswith("hevc") and not (caps.can_encode("hevc") and caps.can_decode("hevc")):
                continue
            repeat = args.repeat if not (label.startswith("hevc") and device.type == "cpu") else max(1, args.repeat // 3)
            row = bench_one(x, name, label, repeat)
            rows.append(row)
            if not args.json:
                print(json.dumps(row), flush=True)
    result = {
        "bench": "codec",
        "device": str(device),
        "gpu": caps.gpu_name,
        "host": platform.node(),
        "cpu_count": __import__("os").cpu_count(),
        "torch": torch.__version__,
        "capabilities": caps.to_dict(),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
