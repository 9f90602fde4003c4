"""Turning a generation summary into the per-hop table people read (and ``--json`` prints)."""

from __future__ import annotations

import statistics
from collections import OrderedDict

from meshd.pipeline.blocks import BlockRange
from meshd.pipeline.progress import StepRecord, passes_from_wire


def hop_totals(summary: dict) -> list[dict]:
    """Per link (in plan order): codec, bytes per step, mean encode/wire/decode/compute ms, worst error."""
    table: OrderedDict[str, dict] = OrderedDict()
    for step in summary.get("steps") or ():
        for p in passes_from_wire(step):
            for hop in p.hops:
                row = table.setdefault(hop.link, {
                    "link": hop.link, "codec": hop.codec, "blocks": hop.blocks.shown() if hop.blocks else None,
                    "bytes": [], "raw_bytes": [], "encode_ms": [], "wire_ms": [], "decode_ms": [], "compute_ms": [],
                    "errors": []})
                for name, value in (("bytes", hop.wire_bytes), ("raw_bytes", hop.raw_bytes),
                                    ("encode_ms", hop.encode_ms), ("wire_ms", hop.wire_ms),
                                    ("decode_ms", hop.decode_ms), ("compute_ms", hop.compute_ms)):
                    if value is not None:
                        row[name].append(value)
                if None not in (hop.cosine, hop.rel_l2, hop.max_abs):
                    row["errors"].append(hop)
                if hop.encoder_note is not None:
                    row.setdefault("encoder_note", hop.encoder_note)  # the first: when the encoder changed
    out = []
    for row in table.values():
        errors = row.pop("errors")
        entry = {"link": row["link"], "codec": row["codec"], "blocks": row["blocks"]}
        if "encoder_note" in row:
            entry["encoder_note"] = row["encoder_note"]
        for name in ("bytes", "raw_bytes"):
            entry[f"{name}_per_step"] = int(statistics.mean(row[name])) if row[name] else None
        for name in ("encode_ms", "wire_ms", "decode_ms", "compute_ms"):
            entry[name] = round(statistics.mean(row[name]), 3) if row[name] else None
        if errors:
            entry["error_worst"] = {
                "cosine": min(e.cosine for e in errors),
                "rel_l2": max(e.rel_l2 for e in errors),
                "max_abs": max(e.max_abs for e in errors),
            }
        out.append(entry)
    return out


def _with_blocks_shown(records: object, *, inclusive: bool) -> object:
    """A list of records (maps with ``blocks``) with each range in the user's notation."""
    if not isinstance(records, list):
        return records
    out = []
    for record in records:
        if isinstance(record, dict):
            parsed = (BlockRange.from_inclusive if inclusive else BlockRange.from_wire)(record.get("blocks"))
            record = {**record, "blocks": parsed.shown()} if parsed is not None else record
        out.append(record)
    return out


def shown_blocks(summary: dict) -> dict:
    """``summary`` with every block range in the user's notation (``0-15``, as ``--split A:0-15`` writes
    it): the stages' ranges travel half-open, the hop records' inclusive; a user reads one notation.
    (:func:`hop_totals` shows its links' blocks so already.)"""
    out = {**summary, "stages": _with_blocks_shown(summary.get("stages"), inclusive=False)}
    if isinstance(summary.get("steps"), list):
        out["steps"] = [{**step, "passes": [{**p, "hops": _with_blocks_shown(p.get("hops"), inclusive=True)}
                                            for p in step.get("passes") or () if isinstance(p, dict)]}
                        if isinstance(step, dict) else step for step in summary["steps"]]
    if isinstance(summary.get("images"), list):
        out["images"] = [shown_blocks(i) if isinstance(i, dict) else i for i in summary["images"]]
    return {k: v for k, v in out.items() if k in summary}


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def step_line(step: StepRecord) -> str:
    """One progress line for a step event (a figure the record lacks shows as 0)."""
    parts = [f"step {step.step}/{step.steps}", f"{step.ms or 0:7.1f} ms"]
    for p in step.passes:
        if not p.hops:
            parts.append(f"local compute {p.compute_ms or 0:.1f} ms")
            continue
        parts.append(f"head {p.compute_ms or 0:.1f} ms")
        for hop in p.hops:
            text = (f"-> {hop.receiver} {hop.codec} {human_bytes(hop.wire_bytes)} "
                    f"enc {hop.encode_ms or 0:.1f} wire {hop.wire_ms or 0:.1f} dec {hop.decode_ms or 0:.1f} "
                    f"run {hop.compute_ms or 0:.1f} ms")
            if hop.cosine is not None:
                text += f" cos {hop.cosine:.5f}"
            if hop.encoder_note is not None:
                text += f" ({hop.encoder_note[:160]})"
            parts.append(text)
    return "  ".join(parts)
