"""Quantised weights turned back into numbers on the device, straight into the compute dtype.

GGUF packs a block of 32 (Q8_0) or 256 (the K-quants) values as one or two float16 block scales, small
integer sub-block scales and 4- to 8-bit codes; a value is ``d * sc * q`` (minus ``dmin * m`` for Q4_K and
Q5_K). Every such product is exact in float32 (an f16 scale has 11 significant bits, a sub-block scale at
most 7, a code at most 6: 24 bits at most), so computed in float32 a value is exact, or rounded once where
the K-quants subtract their minimum, and it is rounded once more into the compute dtype. That is exactly
what gguf's numpy reference (float32) gives rounded to bf16, and what diffusers' torch ports give when
asked for float32 (tests/test_precision.py checks both bit for bit). Called as diffusers calls them they
compute in float16 (three roundings) and round again to bf16: within one bf16 rounding of these.

These replace diffusers' ports at forward time because of what a layer cost there per call, profiled on
the CPU (the tiny model, and a layer of 3 M values): each port creates its shift tables from Python lists
(on CUDA a blocking host-to-device copy per layer per call), every step writes a tensor the size of the
layer (uint8 shifts, int8 codes, float16 products), and the result was cast again to bf16. The tiny
model's GGUF forward cost 18.9 ms more than its bf16 one, 3.3 ms more with these (one CPU thread). Here:

- shifts and masks are Python integers, the sub-block scales are unpacked on the small per-block tensors,
  and the codes are unpacked in uint8 (one byte per value);
- eagerly, one TensorIterator kernel (``torch.mul`` / ``torch.addcmul`` with an ``out=`` in the compute
  dtype) widens the codes, multiplies and subtracts in float32 and writes the compute dtype: no float32
  tensor the size of the layer is ever made;
- under torch.compile (a span's blocks under :class:`.compiled.BlockCompiler`) the same arithmetic is
  written as plain ops, which inductor fuses into one kernel that reads the packed bytes and writes the
  dense weight for the matmul. Both paths round the same exact products once: the same bits.

Nothing per layer is precomputed at load: the sub-block scales as float32 would add 44% to a Q4_K layer
(8 bytes per 32 values to 18), while unpacking them per call touches 1/32 of the values and is fused.
"""

from __future__ import annotations

import torch

#: GGUF's super-block length (the K-quants).
QK_K = 256


def affine(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale - offset`` computed in float32 (``q`` integer or a float that widens exactly; ``scale`` and
    ``offset`` float32, broadcast over ``q``), rounded once into ``dtype``."""
    if torch.compiler.is_compiling():
        value = q * scale if offset is None else q * scale - offset
        return value.to(dtype)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    if offset is None:
        return torch.mul(q, scale, out=out)
    return torch.addcmul(offset.neg(), q, scale, out=out)


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 scale at byte ``at`` of each block (``[n, bytes]``) as float32 ``[n, 1]``. Read through an
    int16 view of the whole blocks, so the float16 view is a same-size bitcast that inductor fuses (a
    float16 view of a 2-byte uint8 slice makes it copy the slice out first)."""
    return blocks.view(torch.int16)[:, at // 2:at // 2 + 1].view(torch.float16).float()


def _scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit sub-block scales and mins of Q4_K/Q5_K from their 12 packed bytes (``[n, 12]``):
    sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7 in the nibbles of bytes 8-11
    with their top two bits in the high bits of bytes 0-7 (llama.cpp's get_scale_min_k4). Chosen per half by
    a ``where`` rather than joined by a ``cat``, so inductor keeps it inside the one fused kernel."""
    a, b, c = (packed[:, i:i + 4].unsqueeze(1) for i in (0, 4, 8))
    first = torch.arange(2, device=packed.device).reshape(1, 2, 1) == 0
    sc = torch.where(first, a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30))
    m = torch.where(first, b & 0x3F, (c >> 4) | ((b >> 2) & 0x30))
    return sc.reshape(-1, 8), m.reshape(-1, 8)


def _nibbles(qs: torch.Tensor, run: int) -> torch.Tensor:
    """``[n, bytes]`` as ``[n, groups, 2, run]`` 4-bit codes: each ``run`` bytes hold ``2 * run`` consecutive
    values, the first ``run`` in the low nibbles."""
    runs = qs.reshape(qs.shape[0], -1, 1, run)
    if torch.compiler.is_compiling():  # an index expression inside the one fused kernel (a cat is not fused)
        return (runs >> _shifts(2, 4, qs.device)) & 0x0F
    # Eagerly two scalar ops and a copy: vectorised on the CPU, where a broadcast tensor shift is not
    # (7x slower, measured on a layer of 3 M values). Integer ops: both ways give the same codes.
    return torch.cat((runs & 0x0F, runs >> 4), dim=2)


def _shifts(count: int, step: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, count, 1]`` shift amounts ``0, step, 2 step, ...``: an arange, so eagerly it is one tiny kernel on
    the device (a tensor built from a Python list is a host-to-device copy that waits for the GPU), and under
    compile an index expression inside the fused kernel rather than a buffer."""
    return (torch.arange(count, device=device, dtype=torch.uint8) * step).reshape(1, 1, count, 1)


def _q8_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # 34 bytes: f16 d, 32 int8 codes.
    return affine(blocks[:, 2:].view(torch.int8), _f16(blocks, 0), None, dtype)


def _q6_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # 210 bytes: 128 bytes of low nibbles, 64 of 2-bit high parts, 16 int8 scales (one per 16 values), f16 d.
    n = blocks.shape[0]
    low = _nibbles(blocks[:, 0:128], 64).reshape(n, 2, 128)  # per half of 128: 64 low nibbles, then 64 high
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    # The 2-bit part k of byte l belongs to value 32k + l of its half.
    high = ((qh >> _shifts(4, 2, qh.device)) & 0x03).reshape(n, 2, 128) << 4
    q = (low | high).reshape(n, QK_K // 16, 16)  # 0..63, the code plus 32
    scale = (_f16(blocks, 208) * blocks[:, 192:208].view(torch.int8)).unsqueeze(2)
    # d * sc * (q - 32) as d*sc*q - 32*d*sc: both products exact, and so is their difference.
    return affine(q, scale, scale * 32, dtype).reshape(n, QK_K)


def _q5_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # 176 bytes: f16 d, f16 dmin, 12 bytes of scales/mins, 32 bytes of fifth bits, 128 of low nibbles.
    n = blocks.shape[0]
    low = _nibbles(blocks[:, 48:176], 32).reshape(n, 8, 32)
    # Bit i of byte l is the fifth bit of value l of sub-block i.
    high = ((blocks[:, 16:48].reshape(n, 1, 1, 32) >> _shifts(8, 1, blocks.device)) & 0x01).reshape(n, 8, 32) << 4
    sc, m = _scale_min(blocks[:, 4:16])
    scale = (_f16(blocks, 0) * sc).unsqueeze(2)
    mins = (_f16(blocks, 2) * m).unsqueeze(2)
    return affine(low | high, scale, mins, dtype).reshape(n, QK_K)


def _q4_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # 144 bytes: f16 d, f16 dmin, 12 bytes of scales/mins, 128 of nibbles.
    n = blocks.shape[0]
    sc, m = _scale_min(blocks[:, 4:16])
    scale = (_f16(blocks, 0) * sc).unsqueeze(2)
    mins = (_f16(blocks, 2) * m).unsqueeze(2)
    return affine(_nibbles(blocks[:, 16:144], 32).reshape(n, 8, 32), scale, mins, dtype).reshape(n, QK_K)


#: GGUF type -> (values per block, bytes per block, dequantiser of ``[blocks, bytes]`` uint8).
GGUF_BLOCKS = {"Q8_0": (32, 34, _q8_0), "Q6_K": (QK_K, 210, _q6_k), "Q5_K": (QK_K, 176, _q5_k),
               "Q4_K": (QK_K, 144, _q4_k)}


def dequantise_gguf(packed: torch.Tensor, qtype: str, dtype: torch.dtype) -> torch.Tensor:
    """``[rows, packed bytes]`` uint8 rows of GGUF ``qtype`` blocks as ``[rows, values]`` numbers in ``dtype``."""
    block, size, dequantise = GGUF_BLOCKS[qtype]
    rows = packed.shape[0]
    return dequantise(packed.reshape(-1, size), dtype).reshape(rows, packed.shape[1] // size * block)


def dequantise_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 ``weight`` times its float32 ``scale`` (one, or one per row as ``[rows, 1]``), product in float32,
    rounded once into ``dtype``. e4m3 and e5m2 values widen exactly to bf16/fp16, which halves what the
    eager path writes before the product; a 0-d scale is given the weight's number of dimensions so that it
    takes part in the type promotion (as a 0-d tensor it would be rounded to the weight's dtype first) and
    broadcasts without changing the weight's shape (a text encoder's fp8 norm weight is 1-d)."""
    return affine(weight.to(dtype), scale.float().reshape(-1, *(1,) * (weight.ndim - 1)), None, dtype)
