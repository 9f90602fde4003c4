"""Safetensors files as meshd reads them: opened with errors that name the file, indexed from the
header without reading data, and hashed once.

Only ``.safetensors`` is ever read. Pickle-based formats (``.ckpt``, ``.pt``, ``.bin``, ``.pth``)
can run code when loaded, so they are refused by name rather than opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .access import unreadable
from .errors import ModelError  # noqa: F401 - re-exported: every loader raises it from here

HASH_CHUNK = 8 << 20
SAFETENSORS_SUFFIX = ".safetensors"
GGUF_SUFFIX = ".gguf"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")

log = logging.getLogger(__name__)


#: A model's JSON files (config.json, model_index.json, a shard index) are kilobytes; a sharded
#: checkpoint's index of every tensor stays well under a MiB. Anything far larger is not one of them.
MAX_JSON_BYTES = 16 << 20


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a ModelError that says what is wrong with the file. At most
    MAX_JSON_BYTES are read."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise ModelError(f"{path} is over {MAX_JSON_BYTES >> 20} MiB: not a model's JSON file")
        data = json.loads(raw)
    except FileNotFoundError:
        raise ModelError(f"{path} is missing") from None
    except PermissionError:
        raise ModelError(_unreadable(path) or f"{path}: permission denied") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return data


def refuse_pickle(path: Path) -> None:
    """Refuse a weight file that is not safetensors, naming why."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(f"{path} is a pickle-based file; meshd reads only .safetensors, because loading a pickle "
                         "can run code. Convert it once on a trusted machine, or get the .safetensors release")
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise ModelError(f"{path} is not a .safetensors file")


def require_safetensors(folder: Path) -> list[Path]:
    """The ``.safetensors`` files of a component folder; a ModelError naming the folder when it has none
    (a folder of ``.bin``/``.pt`` weights only is refused here, before any library could load them)."""
    files = sorted(p for p in folder.iterdir() if p.suffix == SAFETENSORS_SUFFIX) if folder.is_dir() else []
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES) if folder.is_dir() else []
        raise ModelError(f"{folder} holds no .safetensors weights"
                         + (f" (only {', '.join(others)}: meshd reads .safetensors only)" if others else ""))
    return files


def _unreadable(path: Path) -> str | None:
    return unreadable(path)


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator:
    """``safe_open`` on CPU, with a truncated or foreign file reported as a ModelError naming it."""
    refuse_pickle(path)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError:
        # safetensors reports a file it may not open as not found: say which it is
        raise ModelError(_unreadable(path) or f"{path} is missing") from None
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path} is not a complete safetensors file (truncated, still downloading, or another "
                         f"format): {exc}") from None
    try:
        with handle as f:
            yield f
    except SafetensorError as exc:
        raise ModelError(f"{path} could not be read: {exc}") from None


def file_stamp(path: Path) -> tuple:
    """What changes when a file is replaced (size, mtime): a cache key for what was read from its header."""
    try:
        st = Path(path).stat()
    except OSError:
        raise ModelError(f"{path} is missing or unreadable") from None
    return (st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it: no data is read to know this."""

    key: str
    file: Path
    dtype: str  # safetensors' code: "BF16", "F8_E4M3", ...
    shape: tuple[int, ...]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Every tensor's name, dtype and shape, plus the file's metadata, from the header alone."""
    with open_safetensors(path) as f:
        infos = {}
        for key in f.keys():
            view = f.get_slice(key)
            infos[key] = TensorInfo(key, path, view.get_dtype(), tuple(view.get_shape()))
        return infos, dict(f.metadata() or {})


class FileHashes:
    """sha256 of files, remembered across runs by path, size and mtime, so an 18 GB checkpoint is hashed
    once rather than at every start. The value is what ``sha256sum`` prints, so users can compare."""

    _lock = threading.Lock()
    _warned: set[Path] = set()  # cache files already warned about (once per process, not per file hashed)

    def __init__(self, cache_dir: Path | None) -> None:
        self.path = cache_dir / "file-hashes.json" if cache_dir else None

    def _table(self) -> dict:
        if self.path and self.path.exists():
            try:
                table = json.loads(self.path.read_text())
                return table if isinstance(table, dict) else {}
            except (OSError, ValueError):
                return {}
        return {}

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        cached = self._table().get(key)
        if isinstance(cached, str):
            return cached
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(HASH_CHUNK):
                digest.update(block)
        value = digest.hexdigest()
        if self.path:
            with self._lock:
                table = self._table()
                table[key] = value
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = self.path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
                    tmp.write_text(json.dumps(table))
                    os.replace(tmp, self.path)
                except OSError as exc:  # the hash is right either way; only the next start pays again
                    from .access import explain  # noqa: PLC0415

                    if self.path not in FileHashes._warned:
                        FileHashes._warned.add(self.path)
                        log.warning("cannot keep file hashes in %s (%s): large files are hashed again at every "
                                    "start", self.path, explain(exc))
        return value
