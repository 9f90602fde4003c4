"""Regional compilation of a span's transformer blocks: one compiled graph per block class and shape.

A span runs FLUX.2's double and single blocks one after another. Each block call goes through one
``torch.compile``d function (``fullgraph=True, dynamic=False``) that takes the block module as an
argument. Dynamo lifts the block's parameters to graph inputs, so every block of one class shares one
graph per input shape: klein-9B's 32 blocks cost two compiles per resolution, not 32 (diffusers'
``compile_repeated_blocks`` and PyTorch's regional-compilation recipe do the same).

Compiling per block, never a whole span, is what keeps a split exact: a block's numerics depend only
on its class and input shape, never on where a span starts or ends, so blocks 0-15 here plus 16-31
on a peer compute the same bits as 0-31 compiled in one process (the raw codec carries them unchanged).
That holds only with inductor's deterministic mode on (see ``BlockCompiler``): kernel configs chosen by
rule, not by timing them in each process.

The head's VAE decoder is compiled the same way (``torch.compile`` over the decoder module, one graph per
latent grid): measured on an H100 for klein's VAE at 1024², 91 ms eager against 39 ms compiled (25 s to
compile, ``bench/decode_bench.py``), a sixth of a compiled 4-step generation. Only the head decodes, so a
split and the all-local run decode with the same graph.

Compilation happens before a generation's first step, never inside one, so every step of every
generation runs the same graphs; the caller announces it (``compiling`` / ``compiled`` events). The
compiled code lands in inductor's on-disk caches under the daemon's state dir, so a restart compiles
from the cache in seconds. An index beside them records which shapes were compiled and how long
each took, for estimates ("first time, ~18 s") and for ``meshd check``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, parse_compile

log = logging.getLogger(__name__)

INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
INDEX_FILE = "index.json"
MAX_INDEX_BYTES = 1 << 20  # the index is a few hundred bytes per shape; anything larger is not ours
#: Inductor's deterministic mode: without it, each process benchmarks candidate configs for reduction
#: kernels (RBLOCK, warps) and keeps the fastest, so two daemons can pick different summation orders for
#: one graph. Measured on the H200 before this flag: a compiled klein-9B split differed from the compiled
#: all-local run (final-latent rel L2 2.3e-3; the tiny model, with one candidate per kernel, was exact).
#: The flag picks configs by rule, never by timing.
INDUCTOR_OPTIONS = {"deterministic": True}
#: Dynamo keeps this many graphs per compiled function (block classes x shapes) before it falls back
#: to eager for new ones, which would silently mix numerics: raised far above what a daemon meets.
RECOMPILE_LIMIT = 256


def wanted(setting: str, device: torch.device) -> tuple[bool, str]:
    """Whether blocks on ``device`` are compiled under ``setting``, and why, in words."""
    setting = parse_compile(setting)
    if setting == "off":
        return False, "off (compile = false)"
    if setting == "on":
        return True, f"on (compile = true) on {device}"
    if device.type == "cuda":
        return True, f"on: {device} is a CUDA device (compile = false turns it off)"
    return False, f"off: {device} is not a CUDA device (compile = true forces it; needs a C++ compiler)"


@dataclass(frozen=True)
class BlockShape:
    """What one compiled graph is specialised to: a block class and its input geometry."""

    kind: str  # "double" or "single"
    txt_len: int
    img_tokens: int
    dtype: str
    device: str

    def key(self, model: str) -> str:
        # Single blocks see the joint stream only, so sizes with equal token counts share their graph;
        # the index keys them by what was compiled, with the torch build (its caches do the same).
        tokens = f"{self.txt_len + self.img_tokens}" if self.kind == "single" else f"{self.txt_len}+{self.img_tokens}"
        return f"{model}|{self.kind}|{tokens}|{self.dtype}|{self.device}|torch {torch.__version__}"


@dataclass(frozen=True)
class DecoderShape:
    """What the VAE decoder's compiled graph is specialised to: the latent grid it decodes."""

    channels: int
    height: int
    width: int
    dtype: str
    device: str
    kind: str = "vae"

    def key(self, model: str) -> str:
        return f"{model}|vae|{self.channels}x{self.height}x{self.width}|{self.dtype}|{self.device}|torch {torch.__version__}"


def _writable(folder: Path) -> bool:
    """Whether this user can create files in ``folder`` (or create it, where it does not exist yet)."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return os.access(folder, os.W_OK | os.X_OK)


class CompileCache:
    """The compile caches in the state dir: inductor's (kernels, FX and AOT graphs) and our index."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inductor = root / "inductor"

    def activate(self) -> Path:
        """Point inductor's caches here (unless the user set TORCHINDUCTOR_CACHE_DIR); returns where they are."""
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # noqa: PLC0415

        current = os.environ.get(INDUCTOR_ENV)
        # Importing diffusers already makes inductor write its default (/tmp/torchinductor_USER) into the
        # environment: only another value is the user's choice.
        if current and os.path.abspath(current) != os.path.abspath(default_cache_dir()):
            if _writable(Path(current)):
                return Path(current)
            # Inherited from another user's environment (a daemon started by root as meshd, say: seen on
            # the H200 as "Permission denied: /tmp/torchinductor_root/..."): not a choice this user made.
            log.warning("%s=%s is not writable by this user: compiled code goes to %s instead", INDUCTOR_ENV,
                        current, self.inductor)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)  # compiled code: meshd's user only
        self.inductor.mkdir(exist_ok=True, mode=0o700)
        for folder in (self.root, self.inductor):  # mkdir's mode applies only to a folder it creates
            os.chmod(folder, 0o700)
        os.environ[INDUCTOR_ENV] = str(self.inductor)
        from torch._inductor.utils import clear_caches  # noqa: PLC0415 - paths inductor memoised from the old dir

        clear_caches()
        return self.inductor

    def index(self) -> dict[str, dict]:
        """Shape key -> {"cold_s", "cached_s", "at"} as recorded; an unreadable index counts as empty."""
        path = self.root / INDEX_FILE
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_INDEX_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("compile index %s unreadable (%s): treating the cache as empty", path, exc)
            return {}
        try:
            data = json.loads(raw) if len(raw) <= MAX_INDEX_BYTES else None
        except (ValueError, UnicodeDecodeError):
            data = None
        entries = data.get("entries") if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            log.warning("compile index %s is not a meshd compile index: treating the cache as empty", path)
            return {}
        return {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, dict)}

    def record(self, key: str, seconds: float, cached: bool) -> None:
        """Remember that ``key`` was compiled (``cached``: from inductor's cache) in ``seconds``."""
        entries = self.index()
        entry = dict(entries.get(key, {}))
        entry["cached_s" if cached else "cold_s"] = round(seconds, 3)
        entry["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entries[key] = entry
        tmp = self.root / f".{INDEX_FILE}.{os.getpid()}.tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp.write_text(json.dumps({"version": 1, "entries": entries}, indent=1, sort_keys=True))
            os.replace(tmp, self.root / INDEX_FILE)
        except OSError as exc:  # the compiled graphs work without the index; only the estimates suffer
            log.warning("cannot write the compile index %s: %s", self.root / INDEX_FILE, exc)

    def size_bytes(self) -> int:
        """Bytes under the inductor cache (0 when it does not exist)."""
        total = 0
        for dirpath, _, files in os.walk(self.inductor):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
        return total


def _call_block(block: torch.nn.Module, kwargs: dict):
    return block(**kwargs)


def _canonical(value):
    # Dynamo guards on every input's dispatch keys and strides (size-1 dimensions included), and the
    # graphs were traced on fresh contiguous tensors made in inference mode, as the head's are. A stage's
    # received stream and per-step vectors are made outside inference mode, and its image stream is a
    # view of the joint one (batch stride 6144, not 4096, at the tiny size): without this copy a stage
    # would compile every block class again at its first step, silently, and might pick other kernels.
    # Only such inputs are copied (the first block's stream, the small vectors).
    if isinstance(value, torch.Tensor):
        if value.is_inference() and value.stride() == _contiguous_strides(value.shape):
            return value
        return value.clone(memory_format=torch.contiguous_format)
    if isinstance(value, tuple):
        return tuple(_canonical(v) for v in value)
    return value


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class BlockCompiler:
    """Runs a span's blocks through compiled graphs and compiles the shapes a generation will need.

    ``backend`` is torch.compile's: "inductor" in production; tests on CPU may pass "aot_eager", which
    traces the same graphs without generating C++ (the guards and the graph-per-shape logic are the same).
    """

    def __init__(self, cache: CompileCache | None, model: str, backend: str = "inductor") -> None:
        self.cache = cache
        self.model = model
        self.backend = backend
        if cache is not None and backend == "inductor":  # the only backend that writes those caches
            cache.activate()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        options = INDUCTOR_OPTIONS if backend == "inductor" else None
        self._fn = torch.compile(_call_block, fullgraph=True, dynamic=False, backend=backend, options=options)
        self._ready: set[BlockShape] = set()
        self._lock = threading.Lock()
        self.compiling: dict | None = None  # the compile in progress, for node info
        self.last: dict | None = None  # the last compile done: shapes and seconds

    def call(self, block: torch.nn.Module, **kwargs):
        """``block(**kwargs)`` through the compiled graph of its class and shape."""
        _raise_recompile_limit()
        if torch.is_inference_mode_enabled():
            kwargs = {name: _canonical(value) for name, value in kwargs.items()}
        return self._fn(block, kwargs)

    def shapes(self, span, txt_len: int, img_tokens: int) -> list[BlockShape]:
        """The graphs ``span`` needs for one generation's geometry."""
        kinds = [k for k, blocks in (("double", span.transformer_blocks), ("single", span.single_transformer_blocks))
                 if len(blocks)]
        if not kinds:
            return []
        param = next(span.parameters())
        dtype = str(param.dtype).removeprefix("torch.")
        return [BlockShape(k, txt_len, img_tokens, dtype, str(param.device)) for k in kinds]

    def compiled_decoder(self, decoder: torch.nn.Module) -> torch.nn.Module:
        """``decoder`` (a VAE's) run through torch.compile: one graph per latent grid, compiled when
        :meth:`warm` meets its :class:`DecoderShape` (the head's VAE, before a generation's first step)."""
        if isinstance(decoder, torch._dynamo.eval_frame.OptimizedModule):
            return decoder
        if self.backend == "inductor":
            return torch.compile(decoder, dynamic=False, backend="inductor", options=INDUCTOR_OPTIONS)
        # Tests' aot_eager fails on the decoder on the CPU (torch 2.13: "Expected X.is_contiguous(memory_format)"
        # in its group norm); Dynamo's eager backend keeps the guards and the graph per latent grid.
        return torch.compile(decoder, dynamic=False, backend="eager")

    def pending(self, span, txt_len: int, img_tokens: int, decode: DecoderShape | None = None) -> list:
        """The shapes not yet compiled in this process: ``span``'s blocks (None: none of them) and the
        decoder's ``decode``."""
        shapes = self.shapes(span, txt_len, img_tokens) if span is not None else []
        with self._lock:
            return [s for s in shapes + ([decode] if decode else []) if s not in self._ready]

    def estimate(self, shapes: Iterable[BlockShape]) -> tuple[float | None, bool]:
        """(seconds expected, whether every shape is in the on-disk cache) from the index's records."""
        index = self.cache.index() if self.cache is not None else {}
        total, cached, known = 0.0, True, True
        for shape in shapes:
            entry = index.get(shape.key(self.model))
            if entry and isinstance(entry.get("cached_s", entry.get("cold_s")), (int, float)):
                total += float(entry.get("cached_s", entry.get("cold_s")))
                continue
            cached = False
            # A new shape of a class compiled before costs about what that class cost then.
            same_kind = [float(v["cold_s"]) for k, v in index.items()
                         if k.startswith(f"{self.model}|{shape.kind}|") and isinstance(v.get("cold_s"), (int, float))]
            if same_kind:
                total += max(same_kind)
            else:
                known = False
        return (round(total, 1) if known else None), cached

    def warm(self, span, txt_len: int, img_tokens: int, vae=None, decode: DecoderShape | None = None) -> float:
        """Compile every pending shape of ``span`` for this geometry (one dummy call per block class), and
        ``vae``'s decoder for ``decode``; returns the seconds it took. Runs where the blocks run (the GPU
        thread)."""
        todo = self.pending(span, txt_len, img_tokens, decode if vae is not None else None)
        if not todo:
            return 0.0
        _, cached = self.estimate(todo)
        start = time.perf_counter()
        self.compiling = {"shapes": [s.key(self.model) for s in todo], "since": time.time()}
        try:
            for shape in todo:
                t0 = time.perf_counter()
                if isinstance(shape, DecoderShape):
                    _compile_decoder(vae, shape)
                else:
                    self._compile_one(span, shape)
                seconds = time.perf_counter() - t0
                with self._lock:
                    self._ready.add(shape)
                if self.cache is not None:
                    self.cache.record(shape.key(self.model), seconds, cached)
                what = (f"the VAE decoder for {shape.height}x{shape.width} latents" if isinstance(shape, DecoderShape)
                        else f"{shape.kind} blocks for {txt_len}+{img_tokens} tokens")
                log.info("compiled %s in %.1f s%s", what, seconds, " (from the cache)" if cached else "")
        finally:
            self.compiling = None
        total = time.perf_counter() - start
        self.last = {"tokens": txt_len + img_tokens, "seconds": round(total, 2), "cached": cached}
        return total

    def _compile_one(self, span, shape: BlockShape) -> None:
        param = next(span.parameters())
        device, dtype = param.device, param.dtype
        dim = span.preset.hidden
        rotary = span.rotary(torch.zeros(shape.txt_len, 4, dtype=torch.long, device=device),
                             torch.zeros(shape.img_tokens, 4, dtype=torch.long, device=device))
        # Zeros: the graph depends on shapes, dtypes and strides only, never on values.
        zeros = lambda *size: torch.zeros(*size, device=device, dtype=dtype)  # noqa: E731
        if shape.kind == "double":
            block = next(iter(span.transformer_blocks.values()))
            self.call(block, hidden_states=zeros(1, shape.img_tokens, dim),
                      encoder_hidden_states=zeros(1, shape.txt_len, dim), temb_mod_img=zeros(1, 6 * dim),
                      temb_mod_txt=zeros(1, 6 * dim), image_rotary_emb=rotary, joint_attention_kwargs=None)
        else:
            block = next(iter(span.single_transformer_blocks.values()))
            self.call(block, hidden_states=zeros(1, shape.txt_len + shape.img_tokens, dim),
                      encoder_hidden_states=None, temb_mod=zeros(1, 3 * dim), image_rotary_emb=rotary,
                      joint_attention_kwargs=None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def status(self) -> dict:
        """What node info and the dashboard show: on, the compile in progress, the last one."""
        return {"on": True, "backend": self.backend, "compiled_shapes": len(self._ready),
                "compiling": self.compiling, "last": self.last,
                "cache_dir": os.environ.get(INDUCTOR_ENV) if self.cache is not None else None}


def _raise_recompile_limit() -> None:
    # Dynamo's config is per thread (a ContextVar): the limit raised in BlockCompiler.__init__ holds in the
    # thread that made the compiler, not in the GPU thread that compiles, where the 9th graph failed
    # (fullgraph).
    if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT


def _compile_decoder(vae, shape: DecoderShape) -> None:
    """Decode zeros of ``shape`` through ``vae`` (its decoder compiled): the same call, input dtype, layout and
    inference mode as a generation's decode, so that one meets the graph made here and never compiles again."""
    _raise_recompile_limit()
    device = torch.device(shape.device)
    z = torch.zeros(1, shape.channels, shape.height, shape.width, device=device, dtype=getattr(torch, shape.dtype))
    vae.decode(z, return_dict=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiler_for(setting: str, device: torch.device, state_dir: Path, model: str) -> tuple[BlockCompiler | None, str]:
    """The daemon's block compiler (None when compile is off for ``device``) and why, in words."""
    on, why = wanted(setting, device)
    if not on:
        return None, why
    if device.type == "cpu" and shutil.which(os.environ.get("CXX", "c++")) is None:
        raise ConfigError(f"compile is on for {device}, but no C++ compiler ({os.environ.get('CXX', 'c++')}) is "
                           "on PATH: install one or set compile = false")
    return BlockCompiler(CompileCache(state_dir / "compile"), model), why
