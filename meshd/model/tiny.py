"""The ``tiny`` model: FLUX.2's structure at toy size, written once as a real model folder.

Weights are seeded per tensor (see :mod:`.seeded`), so every machine writes the same bytes; the
folder is then loaded by the same code that loads a real checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from safetensors.torch import save_file

from .presets import PRESETS
from .seeded import seeded_state
from .text_encoder import StandInTextEncoder

TINY_SEED = "tiny"


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
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root.parent))
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
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "model_index.json").exists():  # lost a race to a half-written folder?
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
