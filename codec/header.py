"""The encoded form: a small header of plain types plus a list of byte buffers.

The header says what the tensor is (dtype, shape), how it was encoded (codec, QP) and how its
tokens were cut into chunks; each chunk contributes a fixed number of buffers, in order. Every field
is checked against :mod:`codec.limits` before anything is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import CodecError
from .frames import FrameGeometry
from .limits import FORMAT_VERSION, MAX_CHANNELS, MAX_CHUNKS, MAX_DIM, MAX_ELEMENTS, MAX_NDIM
from .spec import CODEC_NAMES

#: Wire names of the dtypes a tensor may have.
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise CodecError(f"unsupported dtype {dtype}; supported: {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class ChunkInfo:
    """Tokens ``[start, start + count)`` of the flattened ``[tokens, channels]`` view."""

    start: int
    count: int
    geometry: FrameGeometry | None = None  # hevc only

    def to_list(self) -> list:
        out: list = [self.start, self.count]
        if self.geometry is not None:
            out.append(self.geometry.to_list())
        return out


@dataclass(frozen=True)
class Header:
    """Everything a decoder needs besides the buffers."""

    codec: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[ChunkInfo, ...]
    qp: int | None = None
    encoder: str | None = None  # informational: which HEVC encoder produced the frames
    version: int = field(default=FORMAT_VERSION)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def channels(self) -> int:
        return self.shape[-1]

    @property
    def tokens(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def raw_bytes(self) -> int:
        """Size of the tensor itself."""
        return self.tokens * self.channels * self.itemsize

    @property
    def label(self) -> str:
        if self.codec != "hevc":
            return self.codec
        return "hevc-lossless" if self.qp is None else f"hevc-qp{self.qp}"

    def buffers_per_chunk(self, index: int) -> int:
        if self.codec == "raw":
            return 1
        if self.codec == "hevc":
            return 1 + self.chunks[index].geometry.frames
        return 2

    @property
    def buffer_count(self) -> int:
        return sum(self.buffers_per_chunk(i) for i in range(len(self.chunks)))

    def params_bytes(self, index: int) -> int:
        """Size of a chunk's first (parameter) buffer, for the quantising codecs."""
        c = self.channels
        if self.codec == "fp8":
            return 4 * c
        if self.codec == "u8":
            return 8 * c
        if self.codec == "hevc":
            return 8 * c + 8 * self.chunks[index].geometry.frames
        raise AssertionError(self.codec)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": self.version,
            "codec": self.codec,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "chunks": [c.to_list() for c in self.chunks],
        }
        if self.qp is not None:
            out["qp"] = self.qp
        if self.encoder is not None:
            out["encoder"] = self.encoder
        return out

    @classmethod
    def from_dict(cls, data: object) -> Header:
        """Validate a header received from elsewhere; raise CodecError naming the first problem."""
        if not isinstance(data, dict):
            raise CodecError(f"codec header must be a map, got {type(data).__name__}")
        version = data.get("v")
        if version != FORMAT_VERSION:
            raise CodecError(f"codec header version {version!r} is not supported (this side speaks {FORMAT_VERSION})")
        codec = data.get("codec")
        if not isinstance(codec, str) or codec not in CODEC_NAMES:
            raise CodecError(f"unknown codec {codec!r:.40} in header; known: {', '.join(CODEC_NAMES)}")
        dtype = data.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:  # (a list or map would not even hash)
            raise CodecError(f"unknown dtype {dtype!r:.40} in header; known: {', '.join(DTYPES)}")
        if codec != "raw" and dtype not in FLOAT_DTYPES:
            raise CodecError(f"codec {codec} carries floating-point tensors only, not {dtype}")
        shape = _int_list(data.get("shape"), "shape", MAX_NDIM)
        if len(shape) < 1 or any(not 1 <= d <= MAX_DIM for d in shape):
            raise CodecError(f"shape {shape} must have 1-{MAX_NDIM} dimensions, each in 1..{MAX_DIM}")
        if math.prod(shape) > MAX_ELEMENTS:
            raise CodecError(f"shape {shape} declares {math.prod(shape)} elements; the limit is {MAX_ELEMENTS}")
        if codec != "raw" and shape[-1] > MAX_CHANNELS:
            raise CodecError(f"{shape[-1]} channels exceed the limit of {MAX_CHANNELS}")
        qp = data.get("qp")
        if qp is not None and (codec != "hevc" or not isinstance(qp, int) or isinstance(qp, bool) or not 0 <= qp <= 51):
            raise CodecError(f"QP {qp!r:.20} is not valid for codec {codec}")
        encoder = data.get("encoder")
        if encoder is not None and (not isinstance(encoder, str) or encoder not in ("nvenc", "x265")):
            raise CodecError(f"unknown encoder {encoder!r:.40} in header")
        raw_chunks = data.get("chunks")
        if not isinstance(raw_chunks, list) or not 1 <= len(raw_chunks) <= MAX_CHUNKS:
            raise CodecError(f"header must list 1-{MAX_CHUNKS} chunks")
        tokens = math.prod(shape[:-1])
        chunks = []
        expected_start = 0
        for i, item in enumerate(raw_chunks):
            if not isinstance(item, list) or len(item) != (3 if codec == "hevc" else 2):
                raise CodecError(f"chunk {i} entry is malformed")
            start, count = item[0], item[1]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, count)):
                raise CodecError(f"chunk {i} start/count must be integers")
            if start != expected_start or count < 1 or start + count > tokens:
                raise CodecError(
                    f"chunk {i} covers tokens {start}..{start + count}, expected to start at {expected_start} "
                    f"within {tokens} tokens"
                )
            geometry = None
            if codec == "hevc":
                geometry = FrameGeometry.from_list(item[2])
                geometry.check(count, shape[-1])
            chunks.append(ChunkInfo(start, count, geometry))
            expected_start = start + count
        if expected_start != tokens:
            raise CodecError(f"chunks cover {expected_start} of {tokens} tokens")
        return cls(codec=codec, dtype=dtype, shape=tuple(shape), chunks=tuple(chunks), qp=qp, encoder=encoder)


def _int_list(value: object, name: str, max_len: int) -> list[int]:
    if not isinstance(value, (list, tuple)) or len(value) > max_len:
        raise CodecError(f"header {name} must be a list of at most {max_len} integers")
    if any(not isinstance(v, int) or isinstance(v, bool) for v in value):
        raise CodecError(f"header {name} must hold integers only")
    return list(value)
