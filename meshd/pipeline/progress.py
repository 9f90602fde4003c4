"""A generation's progress as the head reports it, parsed once at the edge into typed records.

The head streams events (``prepared``, ``step``, ...) and ends with a summary whose ``steps`` are the
same step records. On the wire a hop record names only its receiver (``node``), and only the first
hop of a pass names its sender (``from``): each later hop leaves the stage before it. A
:class:`HopRecord` carries both ends, resolved here once. Its blocks travel inclusive (the receiver's
first and last block) and are held as a half-open :class:`~meshd.pipeline.blocks.BlockRange` like every other.

Untrusted input: a field of the wrong shape reads as unknown (None), never as a crash or a 0.
No torch here: the headless command's output uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..fields import MAX_TEXT, wire_int, wire_number, wire_text
from .blocks import BlockRange

#: At most this many stages, passes and hops are read from one event (plans have at most 64 stages).
MAX_ITEMS = 64
#: The transports that move a stream between daemons of one host without a codec or the network.
SAME_HOST = ("cuda-ipc", "host-shm")


def _maps(value: object) -> list[dict]:
    return [v for v in value[:MAX_ITEMS] if isinstance(v, dict)] if isinstance(value, list) else []


@dataclass(frozen=True)
class HopRecord:
    """One hop of one pass: the stream crossing from ``sender`` to ``receiver``, and what it cost."""

    sender: str  # a node name, "?" when the record does not say
    receiver: str
    blocks: BlockRange | None  # the receiver's blocks
    codec: str | None
    wire_bytes: int | None
    raw_bytes: int | None
    encode_ms: float | None
    wire_ms: float | None
    decode_ms: float | None
    compute_ms: float | None  # the receiver's blocks
    cosine: float | None  # reconstruction error (None: not measured, or a bit-exact codec)
    rel_l2: float | None
    max_abs: float | None
    encoder_note: str | None  # set on the hop where the sender's encoder changed
    transport: str = "tcp"  # "tcp", "cuda-ipc" or "host-shm"
    #: Where a TCP or shared-memory hop's time went, on the threads that did each part (None where the
    #: record does not say: CUDA IPC, older peers): device-to-host copies, sealing, socket writes, socket
    #: reads, opening records, host-to-device copies. Parts overlap: they are pipelined.
    d2h_ms: float | None = None
    seal_ms: float | None = None
    send_ms: float | None = None
    recv_ms: float | None = None
    open_ms: float | None = None
    h2d_ms: float | None = None
    staged_send: bool | None = None  # the stream went through pinned staging at that end
    staged_recv: bool | None = None
    ahead: bool | None = None  # host-shm: the forward went ahead of its stream (rung for when it was there)

    @property
    def link(self) -> str:
        return f"{self.sender} -> {self.receiver}"


#: The parts of a hop's time a record may carry (see :class:`HopRecord`).
BREAKDOWN = ("d2h_ms", "seal_ms", "send_ms", "recv_ms", "open_ms", "h2d_ms")


def _transport(hop: dict) -> str:
    if hop.get("transport") in SAME_HOST:
        return hop["transport"]
    return "cuda-ipc" if hop.get("codec") == "cuda-ipc" else "tcp"  # a CUDA IPC hop names it as its codec


def _flag(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def hops_from_wire(hops: object) -> tuple[HopRecord, ...]:
    """The hops of one pass, in order, each with its sender."""
    out: list[HopRecord] = []
    sender = None
    for hop in _maps(hops):
        error = hop.get("error") if isinstance(hop.get("error"), dict) else {}
        receiver = wire_text(hop.get("node")) or "?"
        out.append(HopRecord(
            sender=wire_text(hop.get("from")) or sender or "?", receiver=receiver,
            blocks=BlockRange.from_inclusive(hop.get("blocks")), codec=wire_text(hop.get("codec")),
            wire_bytes=wire_int(hop.get("bytes")), raw_bytes=wire_int(hop.get("raw_bytes")),
            encode_ms=wire_number(hop.get("encode_ms")), wire_ms=wire_number(hop.get("wire_ms")),
            decode_ms=wire_number(hop.get("decode_ms")), compute_ms=wire_number(hop.get("compute_ms")),
            cosine=wire_number(error.get("cosine")), rel_l2=wire_number(error.get("rel_l2")),
            max_abs=wire_number(error.get("max_abs")), encoder_note=wire_text(hop.get("encoder_note")),
            transport=_transport(hop), **{name: wire_number(hop.get(name)) for name in BREAKDOWN},
            staged_send=_flag(hop.get("staged_send")), staged_recv=_flag(hop.get("staged_recv")),
            ahead=_flag(hop.get("ahead")),
        ))
        sender = receiver
    return tuple(out)


@dataclass(frozen=True)
class PassRecord:
    """One transformer forward of a step: the head's own blocks, then the hops through the stages."""

    compute_ms: float | None  # the head's blocks (and embedding)
    hops: tuple[HopRecord, ...]


def passes_from_wire(record: object) -> tuple[PassRecord, ...]:
    """The passes of a ``step`` event or of a summary's step record."""
    passes = record.get("passes") if isinstance(record, dict) else None
    return tuple(PassRecord(wire_number(p.get("compute_ms")), hops_from_wire(p.get("hops"))) for p in _maps(passes))


@dataclass(frozen=True)
class StepRecord:
    """One denoising step: its passes (two with classifier-free guidance)."""

    step: int  # 1-based in a ``step`` event, 0-based in a summary's ``steps``
    steps: int | None  # of how many (events only)
    ms: float | None
    passes: tuple[PassRecord, ...]

    @classmethod
    def from_wire(cls, record: object) -> StepRecord | None:
        """A ``step`` event or a summary's step record; None when it does not say which step it is."""
        step = wire_int(record.get("step")) if isinstance(record, dict) else None
        if step is None:
            return None
        return cls(step, wire_int(record.get("steps")), wire_number(record.get("ms")), passes_from_wire(record))


@dataclass(frozen=True)
class LinkInfo:
    """The link out of a stage as the head measured and chose it when it prepared the split."""

    to: str  # the receiving peer's address
    transport: str  # "tcp"; or, between daemons of one host, "cuda-ipc" or "host-shm" (no codec, no wire)
    bandwidth_bytes_per_s: float | None  # meshd.pipeline.peers.measure_bandwidth (the wire calls it bandwidth_bps)
    rtt_ms: float | None
    codec: str | None
    why: str | None
    emulated: bool

    @classmethod
    def from_wire(cls, link: object) -> LinkInfo | None:
        if not isinstance(link, dict) or not isinstance(link.get("to"), str):
            return None
        positive = lambda key: v if (v := wire_number(link.get(key))) is not None and v > 0 else None  # noqa: E731
        return cls(link["to"][:MAX_TEXT], link.get("transport") if link.get("transport") in SAME_HOST else "tcp",
                   positive("bandwidth_bps"), positive("rtt_ms"), wire_text(link.get("codec")), wire_text(link.get("why")),
                   link.get("emulated") is True)


@dataclass(frozen=True)
class StageInfo:
    """One stage of a split as the head prepared it."""

    peer: str  # its address, as the plan names it
    node: str | None  # its name
    blocks: BlockRange | None  # half-open, as the wire sends stage blocks
    link: LinkInfo | None  # the link to the next stage (None for the last)

    @classmethod
    def many_from_wire(cls, stages: object) -> tuple[StageInfo, ...]:
        """The stages of a ``prepared`` event, in plan order (entries without an address are skipped)."""
        return tuple(cls(s["peer"][:MAX_TEXT], wire_text(s.get("node")), BlockRange.from_wire(s.get("blocks")),
                         LinkInfo.from_wire(s.get("link")))
                     for s in _maps(stages) if isinstance(s.get("peer"), str))
