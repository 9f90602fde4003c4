"""GGUF transformer files (city96's ComfyUI-GGUF layout), read one span at a time.

A GGUF file is memory-mapped by the ``gguf`` package's ``GGUFReader``: opening it parses the header
only, and each tensor's data is a lazy ``np.memmap`` view, so a peer touches the pages of its own
span's tensors and nothing else. The layout ComfyUI-GGUF's converter writes (and the public FLUX.2
GGUF files follow): BFL tensor names, optionally under ``model.diffusion_model.``; ``general.architecture``
"flux" (or none, for stable-diffusion.cpp files); block linears quantised; 1-D tensors and the
embedders / final layer in F32, F16 or BF16. Shapes are GGUF's ``ne`` reversed, unless a
``comfy.gguf.orig_shape.<name>`` field gives the original.

Quantised tensors are handed out as their packed bytes, ``[rows, bytes per row]`` uint8: rows stay
whole blocks, so the row splits of the BFL-to-diffusers converter (``qkv``) apply to them unchanged.
Types other than those listed below are refused by name when the file is opened.
"""

from __future__ import annotations

import contextlib
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .precision import GGUF_FLOATS, GGUF_QUANTISED
from .tensorfiles import GGUF_SUFFIX, ModelError, TensorInfo

#: ``general.architecture`` values of FLUX-family image models (None: an stable-diffusion.cpp file).
ARCHITECTURES = ("flux", "flux2", None)
#: What a malformed file makes the reader raise (it parses untrusted bytes).
_PARSE_ERRORS = (ValueError, OSError, IndexError, KeyError, TypeError, struct.error, RuntimeError, EOFError)
#: The dtype code a GGUF tensor gets in TensorInfo: "GGUF:Q4_K", "GGUF:F32", ...
DTYPE_PREFIX = "GGUF:"


def _reader(path: Path):
    import gguf  # noqa: PLC0415

    try:
        return gguf.GGUFReader(str(path), "r")
    except FileNotFoundError:
        raise ModelError(f"{path} is missing") from None
    except _PARSE_ERRORS as exc:
        raise ModelError(f"{path} is not a readable GGUF file (truncated, still downloading, or another format): "
                         f"{str(exc)[:200]}") from None


def _string_field(reader, name: str) -> str | None:
    field = reader.get_field(name)
    if field is None:
        return None
    try:
        return bytes(field.parts[field.data[-1]]).decode()
    except (IndexError, UnicodeDecodeError, TypeError):
        return "(unreadable)"


def _orig_shape(reader, name: str) -> tuple[int, ...] | None:
    field = reader.get_field(f"comfy.gguf.orig_shape.{name}")
    if field is None:
        return None
    return tuple(int(field.parts[i][0]) for i in field.data)


def gguf_type(info: TensorInfo) -> str | None:
    """The GGUF type name of a tensor read from a GGUF header ("Q4_K", "F32"), None for safetensors."""
    return info.dtype[len(DTYPE_PREFIX):] if info.dtype.startswith(DTYPE_PREFIX) else None


def read_gguf_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Every tensor's name, GGUF type and logical shape, plus the file's string metadata; a ModelError
    naming a type meshd cannot dequantise or an architecture that is not FLUX."""
    reader = _reader(path)
    arch = _string_field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(f"{path} is a GGUF file of architecture {arch!r}, not a FLUX.2 transformer "
                         "(a text encoder or another model?)")
    infos = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in GGUF_QUANTISED and kind not in GGUF_FLOATS:
            raise ModelError(f"{path}: {tensor.name} is stored as GGUF {kind}; meshd reads "
                             f"{', '.join(GGUF_QUANTISED + tuple(GGUF_FLOATS))} (get a file in one of those)")
        shape = _orig_shape(reader, tensor.name) or tuple(int(v) for v in reversed(tensor.shape.tolist()))
        infos[tensor.name] = TensorInfo(tensor.name, path, DTYPE_PREFIX + kind, shape)
    metadata = {"general.architecture": arch or ""}
    return infos, metadata


class GgufTensors:
    """An open GGUF file that hands out tensors by name, as ``safe_open`` does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader = _reader(path)
        self._tensors = {t.name: t for t in self._reader.tensors}

    def get_tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A float tensor in its stored dtype and logical ``shape``, or a quantised one as
        ``[rows, bytes per row]`` uint8 bytes (copied out of the memory map)."""
        tensor = self._tensors[key]
        kind = tensor.tensor_type.name
        with warnings.catch_warnings():  # the memmap is read-only; we copy before torch sees it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = np.array(tensor.data, copy=True)
        if kind in GGUF_FLOATS:
            if kind == "BF16":  # numpy has no bfloat16: the reader hands out the raw 16-bit words
                return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16).reshape(shape)
            return torch.from_numpy(data).reshape(shape)
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return torch.from_numpy(data.view(np.uint8)).reshape(rows, -1)


@contextlib.contextmanager
def open_gguf(path: Path) -> Iterator[GgufTensors]:
    """A GGUF file opened for reading tensors; errors name the file."""
    yield GgufTensors(path)  # the memory map closes when the handle is collected
