"""The split as the dashboard edits it: propose, move a boundary, reorder, pick codecs, predict, check.

Pure functions over :class:`~meshd.pipeline.plan.SplitPlan` and peer views; no I/O. Predictions use what has
been measured: each peer's free memory (from ``info``), its block speed (from the compute times of
earlier steps) and link bandwidth (measured by the head when it prepares a split; before that, this
client's own measurement to the receiving peer stands in, marked as an estimate).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from codec import Capabilities, CodecError, CodecSpec
from codec.policy import Calibration, choose_codec, engines
from meshd.model.presets import PRESETS, ModelPreset
from meshd.node.info import compute_difference, disagreement
from meshd.pipeline.plan import (PeerAddress, PeerResources, PlanError, SplitPlan, Stage, WeightBytes,
                                 stage_extra_bytes, propose, span_bytes, workspace_bytes)
from meshd.pipeline.progress import SAME_HOST, LinkInfo, StageInfo, StepRecord

from .views import PeerView

#: The codec choices a link cycles through ("auto": the head's policy picks per link).
CODEC_CHOICES = ("auto", "raw", "fp8", "u8", "hevc-lossless", "hevc-qp18")

_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
_EMA = 0.3


def itemsize(dtype: str | None) -> int:
    return _ITEMSIZE.get(dtype or "", 2)


def tokens_for(preset: ModelPreset, width: int, height: int) -> int:
    """Sequence length of one image: text tokens plus image tokens."""
    m = preset.size_multiple
    return preset.max_sequence_length + (width // m) * (height // m)


class BlockSpeeds:
    """Measured compute time per block of each peer (by address), from step timings.

    Per block, as the planner counts time: FLUX.2's double and single blocks cost about the same.
    """

    def __init__(self) -> None:
        self._ms_per_block: dict[str, float] = {}
        self.revision = 0  # counts changes, so that what is derived from the speeds knows when to follow

    def observe(self, address: str, blocks: int, ms: float) -> None:
        if blocks <= 0 or ms <= 0:
            return
        rate = ms / blocks
        old = self._ms_per_block.get(address)
        self._ms_per_block[address] = rate if old is None else (1 - _EMA) * old + _EMA * rate
        self.revision += old != self._ms_per_block[address]

    def observe_step(self, stages: Sequence[tuple[str, int, int]], step: StepRecord) -> None:
        """Fold one step's timings in; ``stages`` are (address, start, end) in plan order, as prepared."""
        if not stages:
            return
        head, start, end = stages[0]
        for p in step.passes:
            if p.compute_ms is not None:
                self.observe(head, end - start, p.compute_ms)
            for (address, start, end), hop in zip(stages[1:], p.hops):
                if hop.compute_ms is not None:
                    self.observe(address, end - start, hop.compute_ms)

    def ms(self, address: PeerAddress, blocks: int) -> float | None:
        rate = self._ms_per_block.get(str(address))
        return None if rate is None else rate * blocks

    def relative_speed(self, address: PeerAddress) -> float:
        """Speed for the planner: 1 / ms-per-block; unmeasured peers count as the median one."""
        if not self._ms_per_block:
            return 1.0
        known = sorted(self._ms_per_block.values())
        rate = self._ms_per_block.get(str(address), known[len(known) // 2])
        return 1.0 / rate


class LinkBook:
    """Peer-to-peer links as the head measured and chose them (from ``prepared`` events), and each
    link's codec calibration, learned from the hops of every step (encode, decode, ratio)."""

    def __init__(self) -> None:
        self._links: dict[tuple[str, str], LinkInfo] = {}
        self._calibrations: dict[tuple[str, str], Calibration] = {}
        self.revision = 0  # counts changes, like BlockSpeeds.revision

    def calibration(self, sender: PeerAddress | str, receiver: PeerAddress | str) -> Calibration:
        """The codec figures of the link ``sender`` -> ``receiver`` (the benchmark's until it is measured)."""
        return self._calibrations.setdefault((str(sender), str(receiver)), Calibration())

    def observe_hops(self, stages: Sequence[tuple[str, int, int]], step: StepRecord,
                     caps: Mapping[str, Capabilities | None]) -> None:
        """Fold one step's hops into their links' calibrations; ``stages`` as for
        :meth:`BlockSpeeds.observe_step`, ``caps`` by address (to know which engine did the work)."""
        for p in step.passes:
            for (sender, _, _), (receiver, _, _), hop in zip(stages, stages[1:], p.hops):
                figures = (hop.raw_bytes, hop.wire_bytes, hop.encode_ms, hop.decode_ms)
                if hop.codec is None or any(v is None or v <= 0 for v in figures):
                    continue  # a record without every figure teaches nothing
                self.calibration(sender, receiver).observe_hop(hop.codec[:32], caps.get(sender), caps.get(receiver),
                                                               hop.raw_bytes, hop.wire_bytes, hop.encode_ms / 1e3,
                                                               hop.decode_ms / 1e3)
                self.revision += 1

    def observe_prepared(self, stages: Iterable[StageInfo]) -> None:
        """Take the links the head measured and chose as it prepared a split (a ``prepared`` event's stages)."""
        for stage in stages:
            link = stage.link
            if link is None or (link.transport == "tcp" and link.bandwidth_bytes_per_s is None):
                continue
            key = (stage.peer, link.to)
            self.revision += self._links.get(key) != link
            self._links[key] = link

    def get(self, sender: PeerAddress, receiver: PeerAddress) -> LinkInfo | None:
        return self._links.get((str(sender), str(receiver)))


# --- proposing and editing -------------------------------------------------------------------------


def plan_preset(peers: Iterable[PeerView]) -> ModelPreset:
    """The model the online peers serve; PlanError if there is none or they disagree."""
    online = [p for p in peers if p.online]
    if not online:
        raise PlanError("no peer is online")
    problem = disagreement((p.label, p.model) for p in online)
    if problem:
        raise PlanError(problem)
    preset = online[0].preset
    if preset not in PRESETS:
        raise PlanError(f"{online[0].label} serves an unknown model preset {preset!r:.40}")
    return PRESETS[preset]


def weight_bytes(peer: PeerView | None, preset: ModelPreset) -> WeightBytes:
    """The real bytes of the model's weights at the precision ``peer`` holds them (dense if it did not say)."""
    reported = WeightBytes.from_wire(peer.weight_bytes, preset) if peer is not None else None
    return reported or WeightBytes.dense(preset, itemsize(peer.dtype if peer is not None else None))


def available_bytes(peer: PeerView, preset: ModelPreset) -> int:
    """Free memory plus what its current blocks occupy (a new plan replaces them)."""
    sizes = weight_bytes(peer, preset)
    held = sum(sizes.span(a, b) for a, b in peer.blocks)
    return (peer.free_bytes or 0) + held


def propose_plan(peers: Sequence[PeerView], tokens: int, speeds: BlockSpeeds) -> SplitPlan:
    """Every online peer, in the given order (the first is the head) with the GPUs of one box kept
    together, balanced by measured speed."""
    online = [p for p in peers if p.online]
    preset = plan_preset(online)
    resources = [PeerResources(p.address, p.label, available_bytes(p, preset), speeds.relative_speed(p.address),
                               p.box or "") for p in online]
    return propose(preset, resources, tokens, itemsize(online[0].dtype), weight_bytes(online[0], preset))


def move_boundary(plan: SplitPlan, index: int, delta: int) -> SplitPlan:
    """Move the boundary after stage ``index`` by ``delta`` blocks (each stage keeps at least one)."""
    stages = list(plan.stages)
    if not 0 <= index < len(stages) - 1:
        raise PlanError("the last stage always ends at the last block: select a stage with one after it")
    left, right = stages[index], stages[index + 1]
    cut = min(max(left.end + delta, left.start + 1), right.end - 1)
    stages[index] = replace(left, end=cut)
    stages[index + 1] = replace(right, start=cut)
    return SplitPlan(tuple(stages))


def move_stage(plan: SplitPlan, index: int, delta: int) -> SplitPlan:
    """Swap the peer of stage ``index`` with its neighbour's; block ranges and link codecs stay put."""
    other = index + delta
    stages = list(plan.stages)
    if not (0 <= index < len(stages) and 0 <= other < len(stages)) or other == index:
        return plan
    a, b = stages[index], stages[other]
    stages[index] = replace(a, peer=b.peer, label=b.label)
    stages[other] = replace(b, peer=a.peer, label=a.label)
    return SplitPlan(tuple(stages))


def cycle_codec(plan: SplitPlan, index: int) -> SplitPlan:
    """Next codec for the link out of stage ``index``."""
    stages = list(plan.stages)
    if not 0 <= index < len(stages) - 1:
        raise PlanError("the last stage sends no activations (its output returns to the head)")
    current = stages[index].codec
    position = CODEC_CHOICES.index(current) if current in CODEC_CHOICES else 0
    stages[index] = replace(stages[index], codec=CODEC_CHOICES[(position + 1) % len(CODEC_CHOICES)])
    return SplitPlan(tuple(stages))


# --- predicting and checking -------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkForecast:
    codec: str  # the codec it would use (auto resolved by the policy)
    bandwidth_bytes_per_s: float | None
    measured: bool  # False: this client's measurement to the receiver (the same formula) stands in
    ms: float | None  # encode + wire + decode, chunks overlapped
    wire_bytes: int | None
    same_host: bool = False  # both ends run on one box: CUDA IPC where the daemons share a user


@dataclass(frozen=True)
class StageForecast:
    stage: Stage
    need_bytes: int  # weights + workspace (+ the head's embedders and VAE)
    available_bytes: int | None
    compute_ms: float | None
    link: LinkForecast | None  # the link to the next stage

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.need_bytes <= self.available_bytes


@dataclass(frozen=True)
class Forecast:
    stages: tuple[StageForecast, ...]
    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()  # what the user should know, though the plan can run (peers computing unalike)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def step_ms(self) -> float | None:
        """Predicted transformer time of one step (stages run one after another), if all is known."""
        parts = [s.compute_ms for s in self.stages] + [s.link.ms for s in self.stages if s.link is not None]
        return None if any(p is None for p in parts) else sum(parts)


def forecast(plan: SplitPlan, peers: Mapping[PeerAddress, PeerView], width: int, height: int,
             speeds: BlockSpeeds, links: LinkBook, default_codec: str = "auto") -> Forecast:
    """What running ``plan`` would need and take, and every reason it cannot run as it is.

    ``default_codec`` is the run's codec, which applies to the links the plan leaves on ``auto``."""
    problems: list[str] = []
    try:
        preset = plan_preset(peers.values())
    except PlanError as exc:
        return Forecast((), (str(exc),))
    try:
        plan.validate(preset.num_blocks)
    except PlanError as exc:
        problems.append(str(exc))
    tokens = tokens_for(preset, width, height)
    head = peers.get(plan.stages[0].peer) if plan.stages else None
    size = itemsize(head.dtype if head else None)
    stream_bytes = tokens * preset.hidden * size
    need_per_peer: dict[PeerAddress, int] = {}
    out: list[StageForecast] = []
    for i, stage in enumerate(plan.stages):
        peer = peers.get(stage.peer)
        name = stage.label or str(stage.peer)
        if peer is None:
            problems.append(f"stage {i} names {stage.peer}, which is not a known peer")
        elif not peer.online:
            problems.append(f"{name} is {peer.status}: {peer.error or 'no answer'}")
        elif head is not None and peer.model_key != head.model_key:
            problems.append(f"{name} serves {peer.model_id}, the head serves {head.model_id}")
        sizes = weight_bytes(head, preset)
        need = span_bytes(preset, stage.start, stage.end, size, sizes) + workspace_bytes(preset, tokens, size)
        need += stage_extra_bytes(preset, i == 0, i == len(plan.stages) - 1, size, sizes)
        need_per_peer[stage.peer] = need_per_peer.get(stage.peer, 0) + need
        available = available_bytes(peer, preset) if peer is not None and peer.free_bytes is not None else None
        compute = speeds.ms(stage.peer, stage.blocks)
        link = None
        if i + 1 < len(plan.stages):
            codec = stage.codec if stage.codec != "auto" else default_codec
            link, problem = _link_forecast(replace(stage, codec=codec), plan.stages[i + 1], peers, stream_bytes, links)
            receiver = peers.get(plan.stages[i + 1].peer)
            if peer is not None and receiver is not None and peer.box and peer.box == receiver.box:
                link = replace(link, same_host=True)
            if problem:
                problems.append(problem)
        out.append(StageForecast(stage, need, available, compute, link))
    for address, need in need_per_peer.items():
        peer = peers.get(address)
        if peer is not None and peer.free_bytes is not None and need > available_bytes(peer, preset):
            kind = "VRAM" if peer.memory_kind == "gpu" else "memory"
            problems.append(f"{peer.label} needs {need / 2**30:.2f} GiB of {kind} for its blocks; "
                            f"it has {available_bytes(peer, preset) / 2**30:.2f} GiB")
    staged = {stage.peer: peers[stage.peer] for stage in plan.stages if stage.peer in peers}
    note = compute_difference((peer.label, peer.model) for peer in staged.values())
    return Forecast(tuple(out), tuple(problems), (note,) if note else ())


def _link_forecast(stage: Stage, nxt: Stage, peers: Mapping[PeerAddress, PeerView], stream_bytes: int,
                   links: LinkBook) -> tuple[LinkForecast, str | None]:
    sender, receiver = peers.get(stage.peer), peers.get(nxt.peer)
    measured = links.get(stage.peer, nxt.peer)
    if measured is not None and measured.transport in SAME_HOST and stage.codec in ("auto", "raw"):
        # GPU to GPU, or through shared host memory, on one host: nothing on a wire
        return LinkForecast(measured.transport, None, True, 0.0, 0), None
    # The head's measurement of this very link if there is one, else this client's to the receiver.
    head_measured = measured is not None and measured.bandwidth_bytes_per_s is not None
    bps = measured.bandwidth_bytes_per_s if head_measured else (receiver.bandwidth_bytes_per_s if receiver else None)
    label = stage.codec
    if sender is None or receiver is None or sender.caps is None or receiver.caps is None:
        return LinkForecast(label, bps, head_measured, None, None), None
    if label != "auto":
        name = CodecSpec.parse(label).name
        if engines(sender.caps, name, "encode") is None:
            return (LinkForecast(label, bps, head_measured, None, None),
                    f"{sender.label} cannot encode {label} ({_reason(sender, name, 'encode')})")
        if engines(receiver.caps, name, "decode") is None:
            return (LinkForecast(label, bps, head_measured, None, None),
                    f"{receiver.label} cannot decode {label} ({_reason(receiver, name, 'decode')})")
    if not bps:
        return LinkForecast(label, None, False, None, None), None
    try:
        choice = choose_codec(stream_bytes, bps, sender.caps, receiver.caps, force=None if label == "auto" else label,
                              calibration=links.calibration(stage.peer, nxt.peer))
    except CodecError as exc:
        return LinkForecast(label, bps, head_measured, None, None), f"link {sender.label} -> {receiver.label}: {exc}"
    est = choice.estimate
    return LinkForecast(choice.spec.label, bps, head_measured, est.total_ms or None, est.wire_bytes), None


def _reason(peer: PeerView, codec: str, direction: str) -> str:
    caps = peer.caps
    if codec == "hevc":
        return caps.nvenc_reason if direction == "encode" else caps.nvdec_reason
    return "not supported by its torch"
