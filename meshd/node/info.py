"""What a daemon says about itself (its ``info`` reply), parsed once at the edge into typed records.

The wire map is untrusted: a field of the wrong shape reads as unknown (None, or empty), never as a
crash and never as 0. Every reader of a peer's info (the client's mesh, the dashboard's views and
monitor, discovery, ``meshtui peers``) reads these records, not the map.

Held blocks are :class:`~meshd.pipeline.blocks.BlockRange`: half-open inside, inclusive only when shown.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from codec import Capabilities

from ..fields import wire_int, wire_text
from ..pipeline.blocks import BlockRange
from .nodeid import host_key

if TYPE_CHECKING:  # (the model code pulls in torch; this module is read by the dashboard too)
    from ..model.runtime import ModelIdentity

#: Text fields longer than this are cut (frame headers are capped already; this bounds what is kept).
MAX_TEXT = 1000
_text = functools.partial(wire_text, limit=MAX_TEXT)


def _map(value: object) -> dict:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class ModelInfo:
    """The model a peer serves, and the precision it holds the weights at."""

    model_id: str | None = None
    preset: str | None = None
    hash: str | None = None  # sha256 of the weights' content
    dtype: str | None = None
    weights: str | None = None  # e.g. "fp8 e4m3fn per-row 192, bf16 9"
    compute: str | None = None  # how quantised layers compute (native fp8 matmul, per-layer dequantise)
    weight_bytes: dict | None = None  # real bytes per block (meshd.pipeline.plan.WeightBytes on the wire)
    num_blocks: int | None = None

    @classmethod
    def from_wire(cls, value: object) -> ModelInfo:
        m = _map(value)
        return cls(_text(m.get("model_id")), _text(m.get("preset")), _text(m.get("hash")), _text(m.get("dtype")),
                   _text(m.get("weights")), _text(m.get("compute")),
                   m.get("weight_bytes") if isinstance(m.get("weight_bytes"), dict) else None, wire_int(m.get("num_blocks")))

    @classmethod
    def of(cls, identity: ModelIdentity) -> ModelInfo:
        """This daemon's own model as its peers read it (so both sides of a comparison are one record)."""
        return cls.from_wire(identity.to_dict())

    @property
    def agreement(self) -> tuple:
        """What every peer of one plan must share, and all the head's prepare checks: the preset, the
        content hash, the dtype and the precision of the weights (an fp8 span cannot continue a bf16 one)."""
        return (self.preset, self.hash, self.dtype, self.weights)

    def describe(self) -> str:
        """The model in one line, as every message naming a peer's model (or this daemon's) shows it."""
        return (f"{self.model_id} ({self.preset}, {self.dtype}, sha256 {(self.hash or '')[:12]}, "
                f"weights {self.weights})")


@dataclass(frozen=True)
class NodeInfo:
    """One daemon's ``info``: who it is, what it serves and holds, what its device can do, its memory."""

    node_id: str | None = None
    name: str | None = None
    version: str | None = None
    device: str | None = None
    gpu_name: str | None = None
    host_id: str | None = None
    model: ModelInfo = ModelInfo()
    blocks: tuple[BlockRange, ...] = ()  # held, half-open
    caps: Capabilities | None = None
    memory_kind: str | None = None  # "gpu" (VRAM) or "host" (a CPU daemon's RAM)
    free_bytes: int | None = None
    total_bytes: int | None = None
    jobs: int | None = None
    text_encoder: bool | None = None  # its model folder has a text encoder (it can encode prompts)
    key_fingerprint: str | None = None
    emulated_link: str | None = None

    @classmethod
    def from_wire(cls, value: object) -> NodeInfo:
        info, memory = _map(value), _map(_map(value).get("memory"))
        try:
            caps = Capabilities.from_dict(info.get("caps"))
        except ValueError:
            caps = None
        return cls(
            node_id=_text(info.get("node_id")), name=_text(info.get("name")), version=_text(info.get("version")),
            device=_text(info.get("device")), gpu_name=_text(info.get("gpu_name")), host_id=_text(info.get("host_id")),
            model=ModelInfo.from_wire(info.get("model")), blocks=BlockRange.many_from_wire(info.get("blocks")),
            caps=caps, memory_kind=_text(memory.get("kind")), free_bytes=wire_int(memory.get("free")),
            total_bytes=wire_int(memory.get("total")), jobs=wire_int(info.get("jobs")),
            text_encoder=info.get("text_encoder") if isinstance(info.get("text_encoder"), bool) else None,
            key_fingerprint=_text(info.get("key_fingerprint")), emulated_link=_text(info.get("emulated_link")),
        )

    @property
    def host(self) -> str | None:
        """The box it runs on (:func:`~meshd.node.nodeid.host_key`: the same for every daemon of one box)."""
        return host_key(self.host_id or "") or None

    @property
    def held(self) -> frozenset[int]:
        """Every block it holds."""
        return frozenset(i for r in self.blocks for i in r)


def disagreement(models: Iterable[tuple[str, ModelInfo]]) -> str | None:
    """Why peers (by label) cannot serve one plan together, or None when they agree on
    :attr:`ModelInfo.agreement`. The one rule: the dashboard and ``meshtui generate`` check this, and
    the head's prepare (``Daemon.check_model``) compares the same ``agreement``, so nothing proposes a
    plan the head would refuse."""
    models = list(models)
    if len({m.agreement for _, m in models}) <= 1:
        return None
    return "peers serve different models: " + "; ".join(f"{label} serves {m.describe()}" for label, m in models)


def fp8_compute_kind(compute: str | None) -> str | None:
    """How a peer's fp8 layers compute, in words two peers' can be compared by (None: it holds no fp8
    layers, or did not say). ``compute`` is its ``HostedModel.compute_path()``: the device's reason is
    left out, so two GPUs that run the same path compare equal."""
    part = next((p for p in (compute or "").split("; ") if p.startswith("fp8: ")), None)
    if part is None:
        return None
    if "native fp8 matmul" in part:
        return "native fp8 matmul, activations scaled " + ("per token" if "per token" in part else "per call")
    return "dequantised to the compute dtype"


def compute_difference(models: Iterable[tuple[str, ModelInfo]]) -> str | None:
    """A note where the peers (by label) compute fp8 layers by different paths (a 4090's native fp8 matmul
    quantises activations, a 3090 dequantises the weights instead): such a split runs, but its image is
    not any one GPU's all-local image. None when they compute alike."""
    kinds = {label: kind for label, m in models if (kind := fp8_compute_kind(m.compute))}
    if len(set(kinds.values())) <= 1:
        return None
    return ("peers compute fp8 layers differently (" + "; ".join(f"{label}: {kind}" for label, kind in kinds.items())
            + "): the image differs slightly from an all-local run on any one of them")

