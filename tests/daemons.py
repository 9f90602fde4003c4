"""In-process daemons on loopback for tests (real sockets, real handshake, real tiny model)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from meshd.config import DaemonConfig
from meshd.model.files import ModelStore
from meshd.model.runtime import HostedModel, open_source
from meshd.server import Daemon


@contextlib.asynccontextmanager
async def running_daemon(tmp: Path, key: bytes | None, blocks=(), models_dir: Path | None = None, model: str = "tiny",
                         **config):
    models = models_dir or tmp / "models"
    cfg = DaemonConfig(host="127.0.0.1", port=0, device="cpu", models_dir=(models,), state_dir=tmp / "state",
                       mdns=False, insecure=key is None, **config)
    source = open_source(model, ModelStore([models]))
    model = HostedModel(source, torch.device("cpu"), torch.bfloat16)
    blocks = sorted(blocks)
    if blocks:
        with torch.inference_mode():
            model.load(blocks, 0 in blocks, model.preset.num_blocks - 1 in blocks)
    daemon = Daemon(cfg, model, key)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop(grace=2)
