"""The ``tiny`` model: FLUX.2's structure at toy size, written once as a real model folder.

Weights are seeded per tensor (see :mod:`.seeded`), so every machine writes the same bytes; the
folder is then loaded by the same code that loads a real checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from safetensors.torch import save_file

from .presets import PRESETS
from .seeded import seeded_state
from .text_encoder import StandInTextEncoder

TINY_SEED = "tiny"
#: Prefix of the folder a tiny model is written into before it is renamed into place. Dot-folders are
#: never models (ModelStore skips them).
TMP_PREFIX = ".tiny-"
#: A temp folder older than this was left by an interrupted write (writing takes seconds), not by a
#: writer still at work, and is removed by the next write.
STALE_TMP_S = 600.0


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, racing other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def _open_up(root: Path) -> None:
    """Give a written folder the modes a plain ``cp`` would (0755/0644 under umask 022): mkdtemp makes
    0700 and safetensors writes 0600, which a daemon running as another user cannot read."""
    mask = _umask()
    for folder, _, names in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in names:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def _remove_stale(parent: Path, now: float | None = None) -> None:
    """Remove temp folders that interrupted writes left in ``parent``."""
    now = time.time() if now is None else now
    with contextlib.suppress(OSError):
        for path in parent.glob(f"{TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink() and now - path.lstat().st_mtime > STALE_TMP_S:
                    shutil.rmtree(path)


def _save_component(module: torch.nn.Module, config: dict, folder: Path, dtype: torch.dtype) -> None:
    folder.mkdir(parents=True)
    state = seeded_state(module, f"{TINY_SEED}/{folder.name}", "cpu", dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=list))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))


def write_tiny(root: Path) -> Path:
    """Write the tiny model into ``root`` (atomically); return ``root``. Existing folders are kept."""
    if (root / "model_index.json").exists():
        return root
    preset = PRESETS["tiny"]
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(root.parent)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root.parent))
    try:
        with torch.device("meta"):
            transformer = Flux2Transformer2DModel(**preset.transformer)
            vae = AutoencoderKLFlux2(**preset.vae)
        t_config = {"_class_name": "Flux2Transformer2DModel", **preset.transformer}
        v_config = {"_class_name": "AutoencoderKLFlux2", **preset.vae}
        _save_component(transformer, t_config, tmp / "transformer", torch.bfloat16)
        _save_component(vae, v_config, tmp / "vae", torch.bfloat16)
        StandInTextEncoder.create(int(preset.transformer["joint_attention_dim"]), preset.max_sequence_length).save(
            tmp / "text_encoder"
        )
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", **preset.scheduler}, indent=2)
        )
        (tmp / "model_index.json").write_text(
            json.dumps(
                {
                    "_class_name": "Flux2KleinPipeline",
                    "is_distilled": True,
                    "flux_mesh_preset": "tiny",
                    "note": "flux-mesh tiny test model: seeded weights, stand-in text encoder",
                },
                indent=2,
            )
        )
        _open_up(tmp)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "model_index.json").exists():  # lost a race to a half-written folder?
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
