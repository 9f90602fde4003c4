"""Linear layers whose weights stay on the device at the precision they are stored in.

- :class:`Fp8Linear`: fp8 (e4m3fn or e5m2) weights with one float32 scale per tensor or per output row.
  Where the GPU has fp8 tensor cores (compute capability >= 8.9, and a tiny real ``torch._scaled_mm``
  call works), e4m3 layers run a native fp8 matmul: the activations are quantised per token, the
  weight scale is applied per row, and the product comes out in the compute dtype. Elsewhere (an RTX
  3080, the CPU, e5m2 weights) each layer is dequantised just before its matmul and the copy dropped,
  as ComfyUI does: VRAM holds fp8, the arithmetic is bf16.
- :class:`GgufLinear`: a GGUF block-quantised weight kept as its packed bytes, dequantised at every
  forward straight into the compute dtype (:mod:`.dequant`: exact float32 products rounded once, bit for
  bit diffusers' torch ports in float32; under torch.compile one fused kernel per layer).

Both are torch.compile-friendly: the path is a Python constant fixed at construction, forward has
no ``.item()`` and no branch on tensor values. LoRA forward hooks attach to them as to ``nn.Linear``
(they receive the input and add to the output; see :mod:`.lora`).

:class:`LinearFormat` says how one layer is held; :func:`quantise` turns a dense weight into a format's
tensors on the device, a chunk of rows at a time (``weights = "fp8"`` and the benchmark's GGUF formats
quantise at load).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .dequant import affine, dequantise_fp8, dequantise_gguf

FP8_DTYPES = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {"e4m3fn": 448.0, "e5m2": 57344.0}
#: GGUF types a file may hold quantised block weights in (:mod:`.dequant` dequantises each).
GGUF_QUANTISED = ("Q8_0", "Q6_K", "Q5_K", "Q4_K")
#: GGUF types that are plain floats: read and cast like safetensors' bf16/fp16/fp32.
GGUF_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
#: Formats ``weights = ...`` can quantise a dense file's block weights to at load.
LOAD_FORMATS = ("fp8", "gguf-q8_0", "gguf-q4_k")
#: Smallest activation/weight magnitude a scale is computed from (an all-zero row must not divide by 0).
_AMAX_FLOOR = 1e-12
#: A dequantised layer is built and multiplied at most this many weights at a time, so the transient dense
#: copy (and the dequantiser's intermediates) stays ~128 MiB however large the layer: dev's fused
#: single-block input layer (55296 x 6144) would otherwise need ~2 GiB of temporaries per forward.
DEQUANT_CHUNK = 1 << 26
#: A chunk's rows are rounded up to a multiple of this (the last chunk takes the rows left, so it is
#: shorter when they do not divide evenly, and aligned too where the layer's rows are): each chunk's
#: matmul output is then [tokens, rows] with a row pitch that is a multiple of cuBLAS's 16-byte
#: alignment, as the whole layer's is. Chunks of DEQUANT_CHUNK // in_features rows were not: dev's
#: 55296-row layer went as five chunks of 10922 rows and one of 686, and its eager GGUF forward took
#: 13-16 ms against 3.9 ms bf16 plus 1.6-4.5 ms of dequantising, while klein's aligned 16384-row chunks
#: ran at 1.13-1.25x bf16 (docs/results/h200-gguf-layers-*.txt). The misalignment is the likely cause;
#: the H200 re-run decides.
DEQUANT_ROW_ALIGN = 128
#: Quantising at load works through a weight this many values at a time (a 64 MiB float32 working copy).
QUANTISE_CHUNK = 1 << 24


@dataclass(frozen=True)
class LinearFormat:
    """How one linear layer's weight is held on the device."""

    kind: str  # "dense", "fp8" or "gguf"
    fp8: str = ""  # fp8: "e4m3fn" or "e5m2"
    per_row: bool = False  # fp8: one scale per output row (else one for the tensor)
    qtype: str = ""  # gguf: "Q8_0", "Q6_K", "Q5_K", "Q4_K"

    def label(self) -> str:
        """What ``meshd check`` and the identity call it: "fp8 e4m3fn per-row", "gguf Q4_K", "dense"."""
        if self.kind == "fp8":
            return f"fp8 {self.fp8} {'per-row' if self.per_row else 'per-tensor'}"
        if self.kind == "gguf":
            return f"gguf {self.qtype}"
        return "dense"

    def weight_bytes(self, out_features: int, in_features: int, dense_itemsize: int) -> int:
        """Bytes this layer's weight (and its scales) take on the device."""
        n = out_features * in_features
        if self.kind == "fp8":
            return n + 4 * (out_features if self.per_row else 1)
        if self.kind == "gguf":
            block, size = gguf_sizes(self.qtype)
            return n // block * size
        return n * dense_itemsize


DENSE = LinearFormat("dense")


def gguf_sizes(qtype: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGUF type."""
    import gguf  # noqa: PLC0415

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]


def load_format(name: str) -> LinearFormat:
    """The format ``weights = name`` quantises block weights to (fp8 per-row, q8_0, q4_k)."""
    if name == "fp8":
        return LinearFormat("fp8", "e4m3fn", per_row=True)
    if name in ("gguf-q8_0", "gguf-q4_k"):
        return LinearFormat("gguf", qtype=name.removeprefix("gguf-").upper())
    raise ValueError(f"weights {name!r}: meshd quantises at load to {', '.join(LOAD_FORMATS)} only")


# --- the device's fp8 compute path -------------------------------------------------------------------

@dataclass(frozen=True)
class Fp8Compute:
    """Whether a device runs fp8 matmuls natively, with which scaling, and why (shown by ``meshd check``)."""

    native: bool
    reason: str
    #: "rowwise": per-token activation and per-row weight scales inside the matmul (H100/H200, newer
    #: builds on RTX 40); "tensorwise": one activation scale per call, the weight's row scales applied to
    #: the output (builds whose row-wise kernel needs SM 9.0); "" when not native.
    scaling: str = ""

    def describe(self) -> str:
        if not self.native:
            return f"per-layer dequantise then matmul in the compute dtype: {self.reason}"
        how = "activations scaled per token" if self.scaling == "rowwise" else "activations scaled per call"
        return f"native fp8 matmul (torch._scaled_mm, {how}): {self.reason}"


@functools.lru_cache(maxsize=None)
def fp8_compute(device: str) -> Fp8Compute:
    """Probe ``device`` once: compute capability >= 8.9 and a tiny real ``torch._scaled_mm`` call that
    gives the right numbers (an old driver or torch build can have the capability but not the kernel),
    row-wise scaling first, then tensor-wise."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return Fp8Compute(False, f"{dev.type} has no fp8 tensor cores")
    capability = torch.cuda.get_device_capability(dev)
    if capability < (8, 9):
        return Fp8Compute(False, f"compute capability {capability[0]}.{capability[1]} < 8.9 (no fp8 tensor cores)")
    if not hasattr(torch, "_scaled_mm"):
        return Fp8Compute(False, f"torch {torch.__version__} has no _scaled_mm")
    failures = []
    for scaling in ("rowwise", "tensorwise"):
        try:
            g = torch.Generator(device=dev).manual_seed(0)
            x = torch.randn(32, 64, device=dev, generator=g, dtype=torch.bfloat16)
            w = torch.randn(48, 64, device=dev, generator=g, dtype=torch.bfloat16)
            q, scale = quantise_fp8(w, "e4m3fn", per_row=True)
            got = scaled_matmul(x, q, scale, torch.bfloat16, scaling)
            want = x.float() @ (q.float() * scale).t()
            err = float((got.float() - want).norm() / want.norm())
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            failures.append(f"{scaling}: {str(exc).splitlines()[0][:100]}")
            continue
        if err < 0.1:
            return Fp8Compute(True, f"compute capability {capability[0]}.{capability[1]}", scaling)
        failures.append(f"{scaling}: wrong results (relative error {err:.2f})")
    return Fp8Compute(False, "torch._scaled_mm does not work here (" + "; ".join(failures) + ")")


def scaled_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, out_dtype: torch.dtype,
                  scaling: str = "rowwise") -> torch.Tensor:
    """``x @ (weight * weight_scale).T`` on fp8 tensor cores, x quantised to e4m3 per token ("rowwise") or
    with one scale for the whole call ("tensorwise", the weight's scale applied to the output)."""
    flat = x.reshape(-1, x.shape[-1])
    n = weight.shape[0]
    if scaling == "rowwise":
        amax = flat.abs().amax(dim=-1, keepdim=True).float().clamp_min(_AMAX_FLOOR)
    else:
        amax = flat.abs().amax().float().clamp_min(_AMAX_FLOOR)
    scale_a = amax / FP8_MAX["e4m3fn"]
    xq = (flat.float() / scale_a).clamp(-FP8_MAX["e4m3fn"], FP8_MAX["e4m3fn"]).to(torch.float8_e4m3fn)
    if scaling == "rowwise":
        scale_b = weight_scale.float().reshape(1, -1).expand(1, n).contiguous()
        out = torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    elif weight_scale.numel() == 1:  # one scale per tensor: both scales go into the kernel's float32 epilogue
        out = torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=weight_scale.float().reshape(()),
                               out_dtype=out_dtype)
    else:
        # The kernel scales by one number only: the product comes out in float32 and is rounded once, after
        # the float32 row scales (a row scale rounded to bf16 is off by up to 0.2%, for every token alike).
        one = torch.ones((), device=x.device, dtype=torch.float32)
        out = torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=one, out_dtype=torch.float32)
        out = affine(out, weight_scale.float().reshape(1, -1), None, out_dtype)
    return out.reshape(*x.shape[:-1], n)


# --- the layers ----------------------------------------------------------------------------------

class Fp8Linear(torch.nn.Module):
    """A bias-free linear layer with an fp8 weight and float32 scale(s): native fp8 matmul or per-layer
    dequantisation, fixed when the layer is made."""

    def __init__(self, in_features: int, out_features: int, fmt: LinearFormat, native: bool,
                 scaling: str = "rowwise") -> None:
        super().__init__()
        self.in_features, self.out_features, self.format, self.scaling = in_features, out_features, fmt, scaling
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPES[fmt.fp8]))
        self.register_buffer("weight_scale", torch.empty((out_features, 1) if fmt.per_row else (), dtype=torch.float32))
        # _scaled_mm takes e4m3 weights here and dimensions that are multiples of 16.
        self.native = bool(native and fmt.fp8 == "e4m3fn" and in_features % 16 == 0 and out_features % 16 == 0)

    def dequantized(self, dtype: torch.dtype, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows ``[start, end)`` of the weight as numbers in ``dtype`` (product taken in float32, rounded once)."""
        scale = self.weight_scale[start:end] if self.format.per_row else self.weight_scale
        return dequantise_fp8(self.weight[start:end], scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and x.dtype == torch.bfloat16 and x.is_cuda:
            return scaled_matmul(x, self.weight, self.weight_scale, x.dtype, self.scaling)
        return _dequantised_linear(x, self, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        path = f"native {self.scaling}" if self.native else "dequantise"
        return f"{self.in_features}, {self.out_features}, {self.format.label()}, {path}"


class GgufLinear(torch.nn.Module):
    """A bias-free linear layer whose weight is GGUF blocks (``[out, packed bytes per row]`` uint8),
    dequantised at every forward straight into the compute dtype (:mod:`.dequant`; under torch.compile
    the dequantisation is one fused kernel feeding the matmul)."""

    def __init__(self, in_features: int, out_features: int, fmt: LinearFormat) -> None:
        super().__init__()
        self.in_features, self.out_features, self.format = in_features, out_features, fmt
        self.block_size, self.type_size = gguf_sizes(fmt.qtype)
        if in_features % self.block_size:
            raise ValueError(f"{fmt.qtype} needs rows of a multiple of {self.block_size} values, not {in_features}")
        self.register_buffer("weight", torch.empty(out_features, in_features // self.block_size * self.type_size,
                                                   dtype=torch.uint8))

    def dequantized(self, dtype: torch.dtype, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows ``[start, end)`` of the weight as numbers in ``dtype`` (exact in float32, rounded once)."""
        return dequantise_gguf(self.weight[start:end], self.format.qtype, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dequantised_linear(x, self, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.format.label()}"


def dequant_chunk_rows(out_features: int, in_features: int) -> int:
    """Rows per chunk a layer is dequantised and multiplied in: all of them when the layer has at most
    :data:`DEQUANT_CHUNK` weights, else the rows of the fewest chunks of about that size, rounded up to a
    multiple of :data:`DEQUANT_ROW_ALIGN` (never past the layer). Every chunk has that many rows but the
    last, which takes the rest: the chunks come out equal where the rounded size divides the layer's rows
    (the real layers' do), and the rounding may leave fewer chunks than the estimate. Fixed by the shape,
    so every peer computes a layer the same way."""
    if out_features * in_features <= DEQUANT_CHUNK:
        return out_features
    chunks = math.ceil(out_features * in_features / DEQUANT_CHUNK)
    rows = math.ceil(math.ceil(out_features / chunks) / DEQUANT_ROW_ALIGN) * DEQUANT_ROW_ALIGN
    return min(rows, out_features)


def _dequantised_linear(x: torch.Tensor, layer, out_features: int, in_features: int) -> torch.Tensor:
    """``x @ W.T`` with ``W`` dequantised by ``layer`` in row chunks of :func:`dequant_chunk_rows` (one
    chunk, i.e. a plain linear, for all but the largest layers)."""
    rows = dequant_chunk_rows(out_features, in_features)
    if out_features <= rows:
        return torch.nn.functional.linear(x, layer.dequantized(x.dtype))
    parts = [torch.nn.functional.linear(x, layer.dequantized(x.dtype, start, min(start + rows, out_features)))
             for start in range(0, out_features, rows)]
    return torch.cat(parts, dim=-1)


#: Every module type that is a linear layer to LoRA hooks, the planner and ``meshd check``.
LINEAR_TYPES = (torch.nn.Linear, Fp8Linear, GgufLinear)


def quantised_layers(span: torch.nn.Module, formats: dict[str, LinearFormat], device: torch.device | str) -> None:
    """Replace ``span``'s linear layers named in ``formats`` by the quantised layer of that format (on the
    meta device, ready to receive loaded tensors); dense entries stay ``nn.Linear``."""
    compute = fp8_compute(str(device))
    for name, fmt in formats.items():
        if fmt.kind == "dense":
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = span.get_submodule(parent_name) if parent_name else span
        old = getattr(parent, leaf)
        if not isinstance(old, torch.nn.Linear) or old.bias is not None:
            raise ValueError(f"{name} is not a bias-free linear layer")
        with torch.device("meta"):
            if fmt.kind == "fp8":
                new = Fp8Linear(old.in_features, old.out_features, fmt, compute.native, compute.scaling)
            else:
                new = GgufLinear(old.in_features, old.out_features, fmt)
        setattr(parent, leaf, new)


# --- quantising on the device (weights = "fp8", and the benchmark's GGUF formats) ------------------------

def row_chunks(rows: int, cols: int) -> list[slice]:
    """Slices of whole rows of at most :data:`QUANTISE_CHUNK` values (at least one row each)."""
    step = max(1, QUANTISE_CHUNK // max(cols, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _rows(weight: torch.Tensor, rows: slice, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Rows of ``weight`` on ``device`` in float32, in a copy of their own (the quantisers work in place),
    after rounding them to ``dtype``: the numbers a dense layer of that dtype would have held."""
    part = weight[rows].to(device=device, dtype=dtype or weight.dtype)
    return part.to(torch.float32, copy=True)


def quantise_fp8(weight: torch.Tensor, fp8: str = "e4m3fn", per_row: bool = True,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 values, float32 scale) of a 2-D weight on ``device``: scale = amax / fp8 max per row (or per
    tensor), one row chunk at a time."""
    device = weight.device if device is None else torch.device(device)
    rows, cols = weight.shape
    chunks = row_chunks(rows, cols)
    q = torch.empty(rows, cols, dtype=FP8_DTYPES[fp8], device=device)
    if per_row:
        scale = torch.empty(rows, 1, dtype=torch.float32, device=device)
    else:  # the tensor's amax first, a chunk at a time (max is exact, so the order does not matter)
        amax = torch.zeros((), dtype=torch.float32, device=device)
        for part in chunks:
            amax = torch.maximum(amax, _rows(weight, part, device, dtype).abs().amax())
        scale = amax.clamp_min(_AMAX_FLOOR) / FP8_MAX[fp8]
    for part in chunks:
        w = _rows(weight, part, device, dtype)
        if per_row:
            scale[part] = w.abs().amax(dim=1, keepdim=True).clamp_min(_AMAX_FLOOR) / FP8_MAX[fp8]
        q[part] = w.div_(scale[part] if per_row else scale).clamp_(-FP8_MAX[fp8], FP8_MAX[fp8])
    return q, scale


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, as ggml's roundf (torch.round rounds half to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _packed_by_rows(weight: torch.Tensor, qtype: str, pack, device, dtype) -> torch.Tensor:
    """GGUF ``qtype`` rows of ``weight`` on ``device``, packed by ``pack`` (float32 rows -> uint8 rows) one row
    chunk at a time, so its float32 intermediates never exist for the whole tensor."""
    device = weight.device if device is None else torch.device(device)
    rows, cols = weight.shape
    block, size = gguf_sizes(qtype)
    out = torch.empty(rows, cols // block * size, dtype=torch.uint8, device=device)
    for part in row_chunks(rows, cols):
        out[part] = pack(_rows(weight, part, device, dtype))
    return out


def quantise_q8_0(weight: torch.Tensor, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """GGUF Q8_0 blocks of a 2-D weight, bit for bit what gguf's reference quantiser writes."""
    return _packed_by_rows(weight, "Q8_0", _pack_q8_0, device, dtype)


def _pack_q8_0(rows: torch.Tensor) -> torch.Tensor:
    out_f, in_f = rows.shape
    blocks = rows.reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    qs = _round_away(blocks * inv).to(torch.int8)
    packed = torch.cat([d.to(torch.float16).view(torch.uint8), qs.view(torch.uint8)], dim=1)
    return packed.reshape(out_f, in_f // 32 * 34)


def quantise_q4_k(weight: torch.Tensor, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """GGUF Q4_K blocks of a 2-D weight: per 32 values a 6-bit scale and min, per 256 an f16 scale of
    each. A direct min/max fit (llama.cpp's search for the best scale is slower and slightly better);
    the layout is GGUF's, checked against gguf's reference dequantiser."""
    return _packed_by_rows(weight, "Q4_K", _pack_q4_k, device, dtype)


def _pack_q4_k(rows: torch.Tensor) -> torch.Tensor:
    out_f, in_f = rows.shape
    x = rows.reshape(-1, 8, 32)  # super-blocks of 8 sub-blocks of 32
    lo = x.amin(dim=2).clamp(max=0)
    hi = x.amax(dim=2)
    scale = (hi - lo) / 15  # per sub-block
    mins = -lo
    d = (scale.amax(dim=1, keepdim=True) / 63).to(torch.float16)
    dmin = (mins.amax(dim=1, keepdim=True) / 63).to(torch.float16)
    d32, dmin32 = d.float(), dmin.float()
    sc = torch.where(d32 > 0, _round_away(scale / d32.clamp_min(1e-30)), torch.zeros_like(scale)).clamp(0, 63)
    m = torch.where(dmin32 > 0, _round_away(mins / dmin32.clamp_min(1e-30)), torch.zeros_like(mins)).clamp(0, 63)
    step = (d32 * sc).unsqueeze(2)
    offset = (dmin32 * m).unsqueeze(2)
    q = torch.where(step > 0, _round_away((x + offset) / step.clamp_min(1e-30)), torch.zeros_like(x)).clamp(0, 15)
    q = q.to(torch.uint8)
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    # 12 scale bytes: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7 split
    # into low nibbles in bytes 8-11 and their top 2 bits in the high bits of bytes 0-7.
    scales = torch.empty(x.shape[0], 12, dtype=torch.uint8, device=x.device)
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    # 128 value bytes: each 64 values (two sub-blocks) share 32 bytes, low nibble first sub-block.
    pairs = q.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    packed = torch.cat([d.view(torch.uint8), dmin.view(torch.uint8), scales, qs], dim=1)
    return packed.reshape(out_f, in_f // 256 * 144)


def quantise(weight: torch.Tensor, fmt: LinearFormat, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A dense weight (on any device) as the tensors of ``fmt``'s layer on ``device`` (``weight``, and
    ``weight_scale`` for fp8), from its values rounded to ``dtype``. It works through the rows in chunks of
    :data:`QUANTISE_CHUNK` values, each moved and quantised on its own, so the peak while loading is the
    quantised layer plus one chunk's working copies, not a float32 copy of the whole weight (dev's fused
    single-block layer: 1.3 GiB, several times that in Q4_K's intermediates)."""
    if fmt.kind == "fp8":
        q, scale = quantise_fp8(weight, fmt.fp8, fmt.per_row, device, dtype)
        return {"weight": q, "weight_scale": scale}
    if fmt.kind == "gguf" and fmt.qtype == "Q8_0":
        return {"weight": quantise_q8_0(weight, device, dtype)}
    if fmt.kind == "gguf" and fmt.qtype == "Q4_K":
        return {"weight": quantise_q4_k(weight, device, dtype)}
    raise ValueError(f"meshd cannot quantise to {fmt.label()}")
