"""Turning a prompt into FLUX.2 prompt embeddings.

Real models use a large language model (Qwen3 for klein, Mistral Small for dev) whose stacked
hidden states become ``[1, L, joint_attention_dim]``. The ``tiny`` model uses
:class:`StandInTextEncoder`: a few seeded layers over the prompt's UTF-8 bytes. It is **not a
language model** — it only gives the tiny transformer deterministic, prompt-dependent input of the
right shape, so that the whole data path (prompt -> embeddings -> blocks -> image) is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .seeded import seeded_state

STAND_IN_CLASS = "StandInTextEncoder"


class StandInTextEncoder(torch.nn.Module):
    """Deterministic stand-in for a text encoder (tiny model only): bytes -> seeded tanh layers."""

    def __init__(self, hidden: int, layers: int, max_length: int) -> None:
        super().__init__()
        self.max_length = max_length
        self.embed = torch.nn.Embedding(257, hidden)  # 0 = padding, 1..256 = byte values
        self.position = torch.nn.Parameter(torch.zeros(max_length, hidden))
        self.layers = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(layers))

    def token_ids(self, prompt: str) -> torch.Tensor:
        data = list(prompt.encode("utf-8"))[: self.max_length]
        ids = [b + 1 for b in data] + [0] * (self.max_length - len(data))
        return torch.tensor([ids], dtype=torch.long)

    @torch.no_grad()
    def forward(self, prompt: str) -> torch.Tensor:
        h = self.embed(self.token_ids(prompt).to(self.embed.weight.device)) + self.position
        states = []
        for layer in self.layers:
            h = torch.tanh(layer(h))
            states.append(h)
        return torch.cat(states, dim=-1)  # like stacking the LLM's chosen hidden layers

    @classmethod
    def create(cls, joint_dim: int, max_length: int, layers: int = 3) -> StandInTextEncoder:
        enc = cls(joint_dim // layers, layers, max_length)
        enc.load_state_dict(seeded_state(enc, "tiny/text_encoder", "cpu", torch.float32))
        return enc

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "_class_name": STAND_IN_CLASS,
            "note": "deterministic stand-in for a text encoder; not a language model",
            "hidden": self.embed.embedding_dim,
            "layers": len(self.layers),
            "max_length": self.max_length,
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))

    @classmethod
    def load(cls, folder: Path) -> StandInTextEncoder:
        config = json.loads((folder / "config.json").read_text())
        if config.get("_class_name") != STAND_IN_CLASS:
            raise ValueError(f"{folder} does not hold a {STAND_IN_CLASS}")
        enc = cls(int(config["hidden"]), int(config["layers"]), int(config["max_length"]))
        enc.load_state_dict(load_file(str(folder / "model.safetensors")))
        return enc
