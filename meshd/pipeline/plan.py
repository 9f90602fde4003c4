"""Split plans: which peer runs which contiguous range of blocks, validated and proposed.

Blocks are numbered in FLUX.2's flat order (double-stream blocks first). A plan's stages cover
``0 .. N-1`` exactly, in order; stage 0 runs on the head. Users write ranges inclusively
(``A:0-15,B:16-31``); internally a stage is ``[start, end)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from codec import CodecSpec

from .. import limits
from ..fields import wire_int
from ..model.presets import ModelPreset

_STAGE = re.compile(r"^\s*([^:\s]+)\s*:\s*(\d+)\s*-\s*(\d+)\s*(?:@\s*([\w:-]+))?\s*$")


class PlanError(ValueError):
    """A plan that is malformed or cannot work; the message says why."""


@dataclass(frozen=True)
class PeerAddress:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_port: int = 7777) -> PeerAddress:
        """``host``, ``host:port``, ``[v6]:port``."""
        text = text.strip()
        if not text:
            raise PlanError("empty peer address")
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        elif text.count(":") == 1:
            host, port = text.split(":")
        else:
            host, port = text, ""
        try:
            number = int(port) if port else default_port
        except ValueError:
            raise PlanError(f"peer {text!r}: port {port!r} is not a number") from None
        if not 0 < number < 65536 or not host:
            raise PlanError(f"peer {text!r} is not HOST:PORT")
        return cls(host, number)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Stage:
    peer: PeerAddress
    start: int
    end: int  # exclusive
    codec: str = "auto"  # codec of the link out of this stage ("auto": chosen by policy)
    label: str = ""

    @property
    def blocks(self) -> int:
        return self.end - self.start

    def describe(self) -> str:
        name = self.label or str(self.peer)
        return f"{name}:{self.start}-{self.end - 1}"

    def to_wire(self) -> dict:
        return {"peer": str(self.peer), "start": self.start, "end": self.end, "codec": self.codec, "label": self.label}

    @classmethod
    def from_wire(cls, data: object) -> Stage:
        if not isinstance(data, dict):
            raise PlanError("a stage must be a map")
        peer, start, end = data.get("peer"), data.get("start"), data.get("end")
        codec, label = data.get("codec", "auto"), data.get("label", "")
        if not isinstance(peer, str) or not isinstance(codec, str) or not isinstance(label, str):
            raise PlanError("stage peer, codec and label must be text")
        if wire_int(start) is None or wire_int(end) is None:
            raise PlanError("stage start and end must be integers")
        if codec != "auto":
            CodecSpec.parse(codec)
        return cls(PeerAddress.parse(peer), start, end, codec, label[:32])


@dataclass(frozen=True)
class SplitPlan:
    stages: tuple[Stage, ...]

    def validate(self, num_blocks: int) -> SplitPlan:
        if not self.stages:
            raise PlanError("a plan needs at least one stage")
        expected = 0
        for i, stage in enumerate(self.stages):
            if stage.start != expected:
                raise PlanError(
                    f"stage {i} ({stage.describe()}) starts at block {stage.start}; expected {expected} "
                    "(stages must cover the blocks contiguously, in order)"
                )
            if stage.end <= stage.start:
                raise PlanError(f"stage {i} ({stage.describe()}) holds no blocks")
            expected = stage.end
        if expected != num_blocks:
            raise PlanError(f"the plan covers blocks 0-{expected - 1}; the model has {num_blocks} (0-{num_blocks - 1})")
        return self

    def describe(self) -> str:
        return " -> ".join(s.describe() for s in self.stages)

    def to_wire(self) -> list[dict]:
        return [s.to_wire() for s in self.stages]

    @classmethod
    def from_wire(cls, data: object) -> SplitPlan:
        if not isinstance(data, list) or not 1 <= len(data) <= limits.MAX_PLAN_STAGES:
            raise PlanError(f"a plan must be a list of 1-{limits.MAX_PLAN_STAGES} stages")
        return cls(tuple(Stage.from_wire(s) for s in data))


def parse_split(spec: str, peers: dict[str, PeerAddress], num_blocks: int) -> SplitPlan:
    """``A:0-15,B:16-31`` (inclusive ranges; ``@codec`` after a range forces its outgoing link's codec).

    Labels are the keys of ``peers`` (``A``, ``B``, ... in ``--peer`` order) or a ``host:port``.
    """
    stages = []
    for part in spec.split(","):
        m = _STAGE.match(part)
        if not m:
            raise PlanError(f"cannot read stage {part.strip()!r}: write LABEL:FIRST-LAST, e.g. A:0-15")
        label, first, last, codec = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4) or "auto"
        if label in peers:
            peer = peers[label]
        else:
            try:
                peer = PeerAddress.parse(label)
            except PlanError:
                raise PlanError(f"unknown peer {label!r} in split; known: {', '.join(peers)}") from None
        if last < first:
            raise PlanError(f"stage {part.strip()!r}: last block {last} is before first block {first}")
        if codec != "auto":
            codec = CodecSpec.parse(codec).label
        stages.append(Stage(peer, first, last + 1, codec, label))
    return SplitPlan(tuple(stages)).validate(num_blocks)


# --- proposing a plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerResources:
    """What the planner knows of a peer."""

    peer: PeerAddress
    label: str
    free_bytes: int
    speed: float = 1.0  # relative compute speed (higher is faster)
    host: str = ""  # the box it runs on (meshd.node.nodeid.host_key); "": unknown, a box of its own


def box_order(peers: Sequence[PeerResources]) -> list[PeerResources]:
    """``peers`` with the GPUs of one box next to each other, so a split crosses the network once per
    box: boxes in the order their first GPU appears (the head's box first), GPUs of a box in the order
    given. Peers of unknown box stay where they are among the boxes."""
    groups: dict[str, list[PeerResources]] = {}
    for i, peer in enumerate(peers):
        groups.setdefault(peer.host or f"\0unknown {i}", []).append(peer)
    return [peer for group in groups.values() for peer in group]


def same_host_links(plan: SplitPlan, hosts: dict[PeerAddress, str]) -> tuple[bool, ...]:
    """For each link of ``plan`` (stage i -> i+1): do both ends run on one box (a same-host link:
    CUDA IPC where the two daemons share a user, never the network)? Unknown boxes count as different."""
    return tuple(bool(hosts.get(a.peer)) and hosts.get(a.peer) == hosts.get(b.peer)
                 for a, b in zip(plan.stages, plan.stages[1:]))


def network_crossings(plan: SplitPlan, hosts: dict[PeerAddress, str]) -> int:
    """How many of ``plan``'s links cross the network (between boxes)."""
    return sum(not same for same in same_host_links(plan, hosts))


@dataclass(frozen=True)
class WeightBytes:
    """Device bytes of a model's weights at the precision the peers hold them (fp8, GGUF or dense): per
    block in flat order, the head's modules (embedders, timestep embedding, modulation: the first stage
    holds them) and the tail's (final norm and projection: the last stage holds them). A daemon reports its
    own in ``info``; without one the planner assumes dense weights."""

    blocks: tuple[int, ...]
    head: int
    tail: int

    @classmethod
    def dense(cls, preset: ModelPreset, itemsize: int = 2) -> WeightBytes:
        """The dense estimate: parameters times ``itemsize``."""
        return cls(tuple(preset.block_params(i) * itemsize for i in range(preset.num_blocks)),
                   _head_params(preset) * itemsize, _tail_params(preset) * itemsize)

    def span(self, start: int, end: int) -> int:
        return sum(self.blocks[start:end])

    def to_wire(self) -> dict:
        return {"blocks": list(self.blocks), "head": self.head, "tail": self.tail}

    @classmethod
    def from_wire(cls, data: object, preset: ModelPreset) -> WeightBytes | None:
        """A peer's report, or None when it sent none or one that does not fit ``preset``."""
        if not isinstance(data, dict):
            return None
        blocks, head, tail = data.get("blocks"), data.get("head"), data.get("tail")
        values = [*blocks, head, tail] if isinstance(blocks, list) else []
        if len(values) != preset.num_blocks + 2 or not all(wire_int(v) is not None and v >= 0
                                                           for v in values):
            return None
        return cls(tuple(blocks), head, tail)


def span_bytes(preset: ModelPreset, start: int, end: int, itemsize: int = 2, weights: WeightBytes | None = None) -> int:
    """Weight bytes of blocks ``[start, end)``: as ``weights`` reports them, else dense at ``itemsize``."""
    if weights is not None:
        return weights.span(start, end)
    return sum(preset.block_params(i) for i in range(start, end)) * itemsize


def _head_params(preset: ModelPreset) -> int:
    d = preset.hidden
    cfg = preset.transformer
    timestep = d * int(cfg["timestep_guidance_channels"]) + d * d  # a two-layer MLP
    return (
        d * int(cfg["in_channels"]) + d * int(cfg["joint_attention_dim"])  # x / context embedders
        + timestep * (2 if cfg["guidance_embeds"] else 1)  # the timestep MLP, and dev's guidance MLP
        + 15 * d * d  # double img/txt (6D each) and single (3D) modulation
    )


def _tail_params(preset: ModelPreset) -> int:
    d = preset.hidden
    patch = int(preset.transformer["patch_size"])
    return 2 * d * d + d * patch * patch * preset.out_channels  # norm_out's shift/scale, proj_out


def _vae_params(preset: ModelPreset) -> int:
    return 84_000_000 if preset.name != "tiny" else 50_000


def stage_extra_bytes(preset: ModelPreset, first: bool, last: bool, itemsize: int = 2,
                      weights: WeightBytes | None = None) -> int:
    """What a stage holds besides its blocks: the first (the head) the embedders, timestep embedding and
    modulation and the VAE it decodes with (klein-9B: 320 M + 84 M params); the last the final norm and
    projection (34 M). One stage alone holds both; the text encoder is placed apart."""
    head = weights.head if weights is not None else _head_params(preset) * itemsize
    tail = weights.tail if weights is not None else _tail_params(preset) * itemsize
    return (head + _vae_params(preset) * itemsize if first else 0) + (tail if last else 0)


def workspace_bytes(preset: ModelPreset, tokens: int, itemsize: int = 2) -> int:
    """Activations of one block at ``tokens`` tokens (attention + MLP intermediates), with margin."""
    return int(tokens * preset.hidden * itemsize * 40)


def propose(preset: ModelPreset, peers: Sequence[PeerResources], tokens: int, itemsize: int = 2,
            weights: WeightBytes | None = None) -> SplitPlan:
    """Use every peer, in order (the first is the head) but with the GPUs of one box kept adjacent
    (:func:`box_order`), each for one contiguous range, so that the slowest stage is as fast as
    possible without exceeding any peer's free memory.

    Time is counted in blocks (FLUX.2's double and single blocks cost about the same FLOPs per
    token, research/flux2.md 1.6) over the peer's relative speed; memory in parameters (a double
    block holds twice a single one's). Among equally fast plans the one that keeps the weights most
    even wins. One step runs the stages one after another, so a split pools memory rather than
    making one image faster; balanced stages matter when several images are in flight. ``weights``
    gives the real bytes at the precision the peers hold (fp8 blocks weigh half of bf16 ones).
    """
    peers = box_order(peers)
    n, p = preset.num_blocks, len(peers)
    if p == 0:
        raise PlanError("no peers to plan over")
    if p > n:
        raise PlanError(f"{p} peers for {n} blocks: every peer needs at least one block")
    work = workspace_bytes(preset, tokens, itemsize)

    def stage_cost(k: int, s: int, e: int) -> tuple[float, float]:
        mem = span_bytes(preset, s, e, itemsize, weights) + work + stage_extra_bytes(preset, k == 0, e == n, itemsize,
                                                                                      weights)
        if mem > peers[k].free_bytes:
            return (math.inf, math.inf)
        return ((e - s) / max(peers[k].speed, 1e-9), mem / max(peers[k].free_bytes, 1))

    # best[k][e]: minimal (max stage time, max memory fraction) covering blocks [0, e) with peers 0..k.
    best = [[(math.inf, math.inf)] * (n + 1) for _ in range(p)]
    cut = [[0] * (n + 1) for _ in range(p)]
    for e in range(1, n + 1):
        best[0][e] = stage_cost(0, 0, e)
    for k in range(1, p):
        for e in range(k + 1, n + 1):
            for s in range(k, e):
                here = stage_cost(k, s, e)
                value = (max(best[k - 1][s][0], here[0]), max(best[k - 1][s][1], here[1]))
                if value < best[k][e]:
                    best[k][e], cut[k][e] = value, s
    if math.isinf(best[p - 1][n][0]):
        need = span_bytes(preset, 0, n, itemsize, weights) + stage_extra_bytes(preset, True, True, itemsize, weights) \
            + p * work
        have = sum(x.free_bytes for x in peers)
        raise PlanError(
            f"{preset.name} does not fit: it needs about {need / 2**30:.1f} GiB across the peers "
            f"(weights + workspace); they have {have / 2**30:.1f} GiB free together"
        )
    bounds, e = [], n
    for k in range(p - 1, -1, -1):
        s = cut[k][e] if k else 0
        bounds.append((s, e))
        e = s
    bounds.reverse()
    return SplitPlan(tuple(Stage(peers[k].peer, s, e, "auto", peers[k].label) for k, (s, e) in enumerate(bounds)))
