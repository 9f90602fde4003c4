"""What the screens show of a peer: an immutable view built from the client's :class:`~meshtui.mesh.Peer`.

Workers build views and post them; widgets only read them. A peer that stops answering keeps its
last-known facts (GPU, model, memory) with the time they were true, so the screen can say
"offline since 12 s" next to what it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from enum import StrEnum

from codec import Capabilities
from meshd.config import describe_ranges
from meshd.errors import AuthRefused, MeshError, ProtocolViolation, VersionMismatch
from meshd.node.info import ModelInfo, NodeInfo
from meshd.pipeline.plan import PeerAddress


class PeerStatus(StrEnum):
    CONNECTING = "connecting"
    ONLINE = "online"
    UNREACHABLE = "unreachable"
    UNAUTHENTICATED = "unauthenticated"
    INCOMPATIBLE = "incompatible"

    @classmethod
    def for_error(cls, error: MeshError | None) -> PeerStatus:
        """The state a failed connection puts a peer in, from the error's type."""
        if isinstance(error, AuthRefused):
            return cls.UNAUTHENTICATED
        if isinstance(error, (VersionMismatch, ProtocolViolation)):
            return cls.INCOMPATIBLE
        return cls.UNREACHABLE


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
    bandwidth_bytes_per_s: float | None = None
    seen: float | None = None  # wall time of the last good answer
    hints: dict[str, str] = field(default_factory=dict)  # mDNS TXT hints (unverified)

    @property
    def online(self) -> bool:
        return self.status is PeerStatus.ONLINE

    @property
    def model(self) -> ModelInfo:
        """The model it serves, as its info said (the fields below, kept while it is offline)."""
        return ModelInfo(self.model_id, self.preset, self.model_hash, self.dtype, self.weights, self.compute,
                         self.weight_bytes, self.num_blocks)

    @property
    def model_key(self) -> tuple:
        """What two peers must share to serve one plan (:attr:`meshd.node.info.ModelInfo.agreement`)."""
        return self.model.agreement

    @property
    def box(self) -> str | None:
        """The box this peer runs on, verified (from ``info``) or else as mDNS hinted it; None: unknown."""
        return self.host or self.hints.get("host") or None

    @property
    def title(self) -> str:
        return self.name or self.hints.get("name") or str(self.address)

    def with_info(self, info: NodeInfo, rtt_ms: float | None, now: float | None = None) -> PeerView:
        """This view updated from a successful ``info`` reply."""
        model = info.model
        return replace(
            self,
            status=PeerStatus.ONLINE,
            error=None,
            name=info.name,
            node_id=info.node_id,
            version=info.version,
            device=info.device,
            gpu_name=info.gpu_name,
            memory_kind=info.memory_kind,
            free_bytes=info.free_bytes,
            total_bytes=info.total_bytes,
            model_id=model.model_id,
            preset=model.preset,
            model_hash=model.hash,
            dtype=model.dtype,
            weights=model.weights,
            compute=model.compute,
            weight_bytes=model.weight_bytes,
            num_blocks=model.num_blocks,
            blocks=tuple((r.start, r.end) for r in info.blocks),
            caps=info.caps,
            key_fingerprint=info.key_fingerprint,
            emulated_link=info.emulated_link,
            jobs=info.jobs,
            text_encoder=info.text_encoder,
            host=info.host,
            rtt_ms=rtt_ms,
            seen=time.time() if now is None else now,
        )

    def failed(self, error: MeshError | None, message: str) -> PeerView:
        """This view after a failed connection or poll; last-known facts stay."""
        return replace(self, status=PeerStatus.for_error(error), error=message)


def describe_blocks(blocks: tuple[tuple[int, int], ...]) -> str:
    """``((0, 2), (4, 5))`` -> ``"0-1,4"``; no blocks -> ``"none"`` (meshd's own wording)."""
    return describe_ranges(b for a, end in blocks for b in range(a, end))
