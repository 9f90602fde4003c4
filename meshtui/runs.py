"""Generation runs as the dashboard records them: parameters, live per-step progress, the saved image.

A :class:`RunRecord` is immutable; each event from the head gives a new one (:func:`apply_event`).
Finished runs are appended to ``runs.jsonl`` beside the saved images, so the history survives a
restart. The PNG itself carries its parameters (the head writes them into a ``flux-mesh`` text chunk).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from meshd.pipeline.progress import HopRecord
from meshd.pipeline.request import GenerationParams, LoraByName

from .events import Compiled, Compiling, Decoding, Encoding, Event, Prepared, Queued, Step
from .report import hop_totals

HISTORY_FILE = "runs.jsonl"
HISTORY_KEPT = 50


class RunState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class HopRow:
    """One hop of one step: the activations crossing from one stage to the next."""

    link: str
    codec: str
    bytes: int | None
    encode_ms: float | None
    wire_ms: float | None
    decode_ms: float | None
    compute_ms: float | None  # the receiving stage's blocks
    cosine: float | None  # reconstruction error (None: not measured, or bit-exact codec)
    rel_l2: float | None


@dataclass(frozen=True)
class StepRow:
    step: int
    steps: int
    ms: float
    head_ms: float  # the head's own blocks (and embedding) of the first pass
    hops: tuple[HopRow, ...]


@dataclass(frozen=True)
class RunRecord:
    id: int
    started: float
    params: GenerationParams
    plan: str
    codec: str = "auto"  # the run's codec for the links the plan leaves on auto (it travels beside the params)
    state: RunState = RunState.RUNNING
    phase: str = "sending"  # queued, preparing, step n/N, decoding, ...
    steps: tuple[StepRow, ...] = ()
    stages: tuple[tuple[str, int, int], ...] = ()  # (address, start, end) as the head prepared them
    hops: tuple[dict, ...] = ()  # per-link totals once done (report.hop_totals)
    total_s: float | None = None
    path: Path | None = None
    error: str | None = None
    summary: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def done_steps(self) -> int:
        return self.steps[-1].step if self.steps else 0

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("steps")
        data.pop("summary")
        data["path"] = str(self.path) if self.path else None
        return json.dumps(data, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        data = json.loads(text)
        params = dict(data["params"])
        codec = data.get("codec", params.pop("codec", "auto"))  # older history lines kept it in the params
        params["loras"] = tuple(LoraByName(str(lora["name"]), float(lora.get("strength", 1.0)))
                                for lora in params.get("loras") or ())
        return cls(
            id=int(data["id"]), started=float(data["started"]), params=GenerationParams(**params),
            plan=str(data["plan"]), codec=str(codec), state=RunState(data["state"]), phase=str(data.get("phase", "")),
            stages=tuple(tuple(s) for s in data.get("stages", ())), hops=tuple(data.get("hops", ())),
            total_s=data.get("total_s"), path=Path(data["path"]) if data.get("path") else None,
            error=data.get("error"),
        )


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def hop_row(hop: HopRecord) -> HopRow:
    return HopRow(link=f"{hop.sender}→{hop.receiver}", codec=hop.codec or "?", bytes=hop.wire_bytes,
                  encode_ms=hop.encode_ms, wire_ms=hop.wire_ms, decode_ms=hop.decode_ms, compute_ms=hop.compute_ms,
                  cosine=hop.cosine, rel_l2=hop.rel_l2)


def apply_event(record: RunRecord, event: Event) -> RunRecord:
    """The record after one event from the head (kinds a run does not show leave it as it is)."""
    match event:
        case Queued(position=position):
            return replace(record, phase=f"queued at position {position}" if position > 1 else "starting")
        case Prepared(plan=plan, stages=stages):
            held = tuple((s.peer, s.blocks.start, s.blocks.end) for s in stages if s.blocks is not None)
            return replace(record, phase="prepared", stages=held, plan=plan or record.plan)
        case Step(step=step, steps=steps, ms=ms, passes=passes):
            head_ms = passes[0].compute_ms if passes else None
            row = StepRow(step, steps, ms or 0.0, head_ms or 0.0, tuple(hop_row(hop) for p in passes for hop in p.hops))
            return replace(record, phase=f"step {step}/{steps}", steps=(*record.steps, row))
        case Compiling() | Compiled():
            # "compiling blocks 0-15 on a for 1024x1024 (first time, ~18 s)": a new size's first run waits on it.
            return replace(record, phase=event.describe())
        case Decoding():
            return replace(record, phase="decoding the image")
        case Encoding(text_encoder=where):
            return replace(record, phase=f"encoding the prompt on {where[:80]}")
    return record


def finish(record: RunRecord, summary: dict, path: Path | None) -> RunRecord:
    total = _num(summary.get("total_s"))
    return replace(record, state=RunState.DONE, phase="done", hops=tuple(hop_totals(summary)), total_s=total,
                   path=path, summary=summary)


def fail(record: RunRecord, state: RunState, message: str) -> RunRecord:
    return replace(record, state=state, phase=str(state), error=message, total_s=time.time() - record.started)


def save_png(directory: Path, png: bytes, record: RunRecord) -> Path:
    """Write the image as ``flux-mesh-YYYYmmdd-HHMMSS-seedN.png`` (never over an existing file)."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(record.started))
    path = directory / f"flux-mesh-{stamp}-seed{record.params.seed}.png"
    n = 1
    while path.exists():
        path = directory / f"flux-mesh-{stamp}-seed{record.params.seed}-{n}.png"
        n += 1
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(png)
    tmp.replace(path)
    return path


def append_history(directory: Path, record: RunRecord) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / HISTORY_FILE, "a", encoding="utf-8") as f:
        f.write(record.to_json() + "\n")


def load_history(directory: Path, keep: int = HISTORY_KEPT) -> list[RunRecord]:
    """The last ``keep`` runs recorded in ``directory`` (unreadable lines are skipped)."""
    try:
        lines = (directory / HISTORY_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines[-keep:]:
        try:
            out.append(RunRecord.from_json(line))
        except (ValueError, KeyError, TypeError):
            continue
    return out
