"""What the screens show of a peer: an immutable view built from the client's :class:`~meshtui.mesh.Peer`.

Workers build views and post them; widgets only read them. A peer that stops answering keeps its
last-known facts (GPU, model, memory) with the time they were true, so the screen can say
"offline since 12 s" next to what it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from codec import Capabilities
from meshd.config import describe_ranges
from meshd.node.nodeid import host_key
from meshd.pipeline.plan import PeerAddress


class PeerStatus(StrEnum):
    CONNECTING = "connecting"
    ONLINE = "online"
    UNREACHABLE = "unreachable"
    UNAUTHENTICATED = "unauthenticated"
    INCOMPATIBLE = "incompatible"

    @classmethod
    def for_error(cls, code: str | None) -> PeerStatus:
        """The state a failed connection puts a peer in, from the error's wire code."""
        if code == "auth":
            return cls.UNAUTHENTICATED
        if code in ("version", "protocol"):
            return cls.INCOMPATIBLE
        return cls.UNREACHABLE


#: How a peer came to be known.


@dataclass(frozen=True)
class PeerView:
    label: str
    address: PeerAddress
    sources: frozenset[str] = frozenset({"manual"})
    status: PeerStatus = PeerStatus.CONNECTING
    error: str | None = None
    # Facts from the peer's last good ``info`` (kept while it is offline):
    name: str | None = None
    node_id: str | None = None
    version: str | None = None
    device: str | None = None
    gpu_name: str | None = None
    memory_kind: str | None = None  # "gpu" (VRAM) or "host" (a CPU daemon's RAM)
    free_bytes: int | None = None
    total_bytes: int | None = None
    model_id: str | None = None
    preset: str | None = None
    model_hash: str | None = None
    dtype: str | None = None
    weights: str | None = None  # the precision it holds the weights at, e.g. "fp8 e4m3fn per-row 192, bf16 9"
    compute: str | None = None  # how its quantised layers compute (native fp8 matmul or per-layer dequantise)
    weight_bytes: dict | None = None  # its weights' real bytes per block (meshd.pipeline.plan.WeightBytes on the wire)
    num_blocks: int | None = None
    blocks: tuple[tuple[int, int], ...] = ()  # held ranges, [start, end)
    caps: Capabilities | None = None  # what its device can encode and decode
    key_fingerprint: str | None = None
    emulated_link: str | None = None
    jobs: int | None = None
    text_encoder: bool | None = None  # its model folder has a text encoder (it can encode prompts)
    host: str | None = None  # the box it runs on (meshd.node.nodeid.host_key of its host id)
    # Measured from this client:
    rtt_ms: float | None = None
    bandwidth_bps: float | None = None  # bytes/s
    seen: float | None = None  # wall time of the last good answer
    hints: dict[str, str] = field(default_factory=dict)  # mDNS TXT hints (unverified)

    @property
    def online(self) -> bool:
        return self.status is PeerStatus.ONLINE

    @property
    def model_key(self) -> tuple:
        """What two peers must share to serve one plan: the head's prepare refuses any other difference
        (meshd.node.daemon.Daemon._check_model): preset, content hash, dtype and the precision the weights are at."""
        return (self.preset, self.model_hash, self.dtype, self.weights)

    @property
    def box(self) -> str | None:
        """The box this peer runs on, verified (from ``info``) or else as mDNS hinted it; None: unknown."""
        return self.host or self.hints.get("host") or None

    @property
    def title(self) -> str:
        return self.name or self.hints.get("name") or str(self.address)

    def with_info(self, info: dict[str, Any], rtt_ms: float | None, now: float | None = None) -> PeerView:
        """This view updated from a successful ``info`` reply (untrusted: only known shapes are read)."""
        model = info.get("model") if isinstance(info.get("model"), dict) else {}
        memory = info.get("memory") if isinstance(info.get("memory"), dict) else {}
        blocks = tuple((int(a), int(b)) for a, b in _pairs(info.get("blocks")))
        return replace(
            self,
            status=PeerStatus.ONLINE,
            error=None,
            name=_text(info.get("name")),
            node_id=_text(info.get("node_id")),
            version=_text(info.get("version")),
            device=_text(info.get("device")),
            gpu_name=_text(info.get("gpu_name")),
            memory_kind=_text(memory.get("kind")),
            free_bytes=_int(memory.get("free")),
            total_bytes=_int(memory.get("total")),
            model_id=_text(model.get("model_id")),
            preset=_text(model.get("preset")),
            model_hash=_text(model.get("hash")),
            dtype=_text(model.get("dtype")),
            weights=_text(model.get("weights")),
            compute=_text(model.get("compute")),
            weight_bytes=model.get("weight_bytes") if isinstance(model.get("weight_bytes"), dict) else None,
            num_blocks=_int(model.get("num_blocks")),
            blocks=blocks,
            caps=_caps(info.get("caps")),
            key_fingerprint=_text(info.get("key_fingerprint")),
            emulated_link=_text(info.get("emulated_link")),
            jobs=_int(info.get("jobs")),
            text_encoder=info.get("text_encoder") if isinstance(info.get("text_encoder"), bool) else None,
            host=host_key(_text(info.get("host_id")) or "") or None,
            rtt_ms=rtt_ms,
            seen=time.time() if now is None else now,
        )

    def failed(self, code: str | None, message: str) -> PeerView:
        """This view after a failed connection or poll; last-known facts stay."""
        return replace(self, status=PeerStatus.for_error(code), error=message)


def _text(value: object) -> str | None:
    return value[:200] if isinstance(value, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _caps(value: object) -> Capabilities | None:
    try:
        return Capabilities.from_dict(value)
    except ValueError:
        return None


def _pairs(value: object) -> list[tuple[int, int]]:
    if not isinstance(value, list):
        return []
    return [(a, b) for a, b in (item for item in value if isinstance(item, list) and len(item) == 2)
            if _int(a) is not None and _int(b) is not None]


def describe_blocks(blocks: tuple[tuple[int, int], ...]) -> str:
    """``((0, 2), (4, 5))`` -> ``"0-1,4"``; no blocks -> ``"none"`` (meshd's own wording)."""
    return describe_ranges(b for a, end in blocks for b in range(a, end))
