#!/usr/bin/env python3
"""Benchmark only: a timeline of a split step across the processes that ran it.

``split_bench.py --trace DIR`` starts its daemons with ``bench/trace`` first on their PYTHONPATH and
records the same spans in its own process: every executor hand-off (queued, run on its thread, seen
again by the event loop), every frame sent and received, every wait on a CUDA stream or event, and
the pipeline's own coroutines. Each process writes its spans to ``DIR/<pid>.jsonl``; the clocks are
``time.perf_counter`` (CLOCK_MONOTONIC on Linux), one clock for every process of the host.

    python bench/steptrace.py DIR            # the last step of the last split generation, as a timeline
    python bench/steptrace.py DIR --steps 3  # the last three, and the gaps summed over them

The report lists, for each step, every span inside it (offset from the step's start, duration,
process, thread, name), then the step's *GPU-free* time: the stretches in which no process had work
on a GPU thread (the GPU worker's calls, copies into and out of host memory), with what ran
meanwhile. Those stretches are what a split adds to all-local, where the GPU never waits between
blocks.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import sys
import threading
import time
from pathlib import Path

_records: list[tuple] = []
_lock = threading.Lock()
_out: Path | None = None
_label = ""
#: Spans kept in memory before they are appended to the file.
FLUSH_EVERY = 20000


def span(name: str, t0: float, t1: float, **extra) -> None:
    _records.append((name, threading.current_thread().name, t0, t1, extra or None))
    if len(_records) >= FLUSH_EVERY:
        flush()


def flush() -> None:
    if _out is None:
        return
    with _lock:
        taken = _records[:]
        del _records[: len(taken)]  # spans other threads appended meanwhile stay for the next flush
        with open(_out, "a", encoding="utf-8") as f:
            for name, thread, t0, t1, extra in taken:
                f.write(json.dumps({"p": _label, "n": name, "th": thread, "t0": t0, "t1": t1, "x": extra}) + "\n")


def _name(fn) -> str:
    while isinstance(fn, functools.partial):
        # GpuWorker.run hands its executor partial(_run, fn, *args): name the work, not the wrapper.
        fn = fn.args[0] if fn.func.__name__ == "_run" and fn.args else fn.func
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _timed_coroutine(owner, attr: str, label: str) -> None:
    original = getattr(owner, attr)

    @functools.wraps(original)
    async def traced(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            span(label, t0, time.perf_counter())

    setattr(owner, attr, traced)


def _timed_call(owner, attr: str, label: str) -> None:
    original = getattr(owner, attr)

    @functools.wraps(original)
    def traced(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            span(label, t0, time.perf_counter())

    setattr(owner, attr, traced)


def install(folder: str, label: str) -> None:
    """Record this process's spans into ``folder`` (called by bench/trace's sitecustomize, and by the
    bench for its own process)."""
    global _out, _label
    import asyncio.base_events  # noqa: PLC0415

    import torch  # noqa: PLC0415

    Path(folder).mkdir(parents=True, exist_ok=True)
    _out, _label = Path(folder) / f"{os.getpid()}.jsonl", label
    atexit.register(flush)

    loop_cls = asyncio.base_events.BaseEventLoop
    run_in_executor = loop_cls.run_in_executor

    def traced_executor(self, executor, func, *args):
        name, queued = _name(func), time.perf_counter()

        def run(*a):
            t0 = time.perf_counter()
            try:
                return func(*a)
            finally:
                span(f"run {name}", t0, time.perf_counter(), queued=t0 - queued)

        future = run_in_executor(self, executor, run, *args)
        future.add_done_callback(lambda _: span(f"hop {name}", queued, time.perf_counter()))
        return future

    loop_cls.run_in_executor = traced_executor

    from meshd.wire import connection  # noqa: PLC0415

    send = connection.Connection.send

    async def traced_send(self, header, segments=(), **kw):
        t0 = time.perf_counter()
        segments = list(segments)
        try:
            return await send(self, header, segments, **kw)
        finally:
            span(f"send {header.get('op')}", t0, time.perf_counter(), peer=self.name,
                 bytes=sum(memoryview(s).nbytes for s in segments))

    connection.Connection.send = traced_send
    recv = connection.Connection.recv

    async def traced_recv(self, *a, **kw):
        frame = await recv(self, *a, **kw)
        span(f"recv {frame.op}", frame.started_at, frame.finished_at, peer=self.name,
             bytes=frame.payload_bytes, seen=time.perf_counter())
        return frame

    connection.Connection.recv = traced_recv
    _timed_call(torch.cuda.Stream, "synchronize", "wait stream")
    _timed_call(torch.cuda.Event, "synchronize", "wait event")

    from meshd.pipeline import generation, head, relay, stage, streaming  # noqa: PLC0415

    for owner, attr, label in ((head.SplitRunner, "forward", "head forward"),
                               (stage.StageService, "forward", "stage forward"),
                               (relay.Relay, "send_step", "send_step"),
                               (streaming, "send_shared", "send_shared"),
                               (streaming, "send_stream", "send_stream"),
                               (streaming, "receive_shared", "receive_shared"),
                               (streaming, "receive_input", "receive_input"),
                               (streaming, "receive_stream", "receive_stream"),
                               (streaming, "reserve_shared", "reserve_shared"),
                               (getattr(streaming, "StageInput", None), "ready", "stage waits for its doorbell"),
                               (generation.LocalRunner, "forward", "local forward")):
        if hasattr(owner, attr):  # (older trees name some of them otherwise)
            original = getattr(owner, attr)
            _timed_coroutine(owner, attr, label)
            for module in (head, relay, stage):  # the modules that took the name at import
                if getattr(module, attr, None) is original:
                    setattr(module, attr, getattr(owner, attr))


# --- the report ---------------------------------------------------------------------------------

#: Thread-side spans during which a process has work on its GPU (or copies to or from host memory).
GPU_WORK = ("run ", "wait stream", "wait event")


def load(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return sorted(rows, key=lambda r: r["t0"])


def _gpu_side(row: dict) -> bool:
    if not row["n"].startswith(GPU_WORK):
        return False
    thread = row["th"]
    return thread.startswith(("gpu-", "shm-in", "shm-out", "stage-")) or row["n"].startswith("wait")


def free_stretches(rows: list[dict], t0: float, t1: float) -> list[tuple[float, float]]:
    """Stretches of [t0, t1] in which no GPU-side span of any process ran."""
    busy = sorted((max(r["t0"], t0), min(r["t1"], t1)) for r in rows if _gpu_side(r) and r["t1"] > t0 and r["t0"] < t1)
    free, at = [], t0
    for a, b in busy:
        if a > at:
            free.append((at, a))
        at = max(at, b)
    if at < t1:
        free.append((at, t1))
    return free


def _short(row: dict | None) -> str:
    if row is None:
        return "(edge)"
    return f"{row['p']}:{row['n'].removeprefix('run ').replace('.<locals>.', '.')}"


def report(folder: Path, steps: int) -> str:
    rows = load(folder)
    forwards = [r for r in rows if r["n"] == "head forward"]
    if not forwards:
        return f"{folder}: no split step recorded (was the bench run with --trace?)"
    lines, totals = [], {}
    for fwd in forwards[-steps:]:
        t0 = fwd["t0"]
        # Up to the head's next GPU call (the scheduler step that takes the prediction).
        t1 = min((r["t0"] for r in rows if r["p"] == fwd["p"] and _gpu_side(r) and r["t0"] >= fwd["t1"]),
                 default=fwd["t1"])
        inside = [r for r in rows if r["t1"] >= t0 and r["t0"] <= t1]
        lines.append(f"head forward {1e3 * (fwd['t1'] - t0):.2f} ms, to the head's next GPU call {1e3 * (t1 - t0):.2f} ms")
        for r in inside:
            extra = "" if not r.get("x") else " " + json.dumps(r["x"])
            lines.append(f"  {1e3 * (r['t0'] - t0):9.3f} +{1e3 * (r['t1'] - r['t0']):8.3f}  {r['p']:<6} "
                         f"{r['th'][:18]:<18} {r['n']}{extra}")
        lines.append("  GPU-free stretches (no process had GPU-side work): the GPU-side span before and after, and the "
                     "spans that began inside:")
        gpu = [r for r in inside if _gpu_side(r)]
        for a, b in free_stretches(inside, t0, t1):
            if b - a < 20e-6:
                continue
            before = max((r for r in gpu if r["t1"] <= a + 1e-9), key=lambda r: r["t1"], default=None)
            after = min((r for r in gpu if r["t0"] >= b - 1e-9), key=lambda r: r["t0"], default=None)
            began = [f"{r['p']}:{r['n']}" for r in inside if a <= r["t0"] < b and not _gpu_side(r)]
            key = f"{_short(before)} -> {_short(after)}"
            totals[key] = totals.get(key, 0.0) + (b - a)
            lines.append(f"    {1e3 * (a - t0):9.3f} +{1e3 * (b - a):7.3f} ms  {key}: {', '.join(began) or '-'}")
    lines.append(f"GPU-free time over {min(steps, len(forwards))} step(s), by the GPU-side spans around it (ms):")
    for key, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {1e3 * seconds:8.3f}  {key}")
    return "\n".join(lines)


def generation_report(folder: Path) -> str:
    """The last split generation as the bench's client saw it, outside its steps: every span of any
    process longer than 0.1 ms that lies outside the head's step forwards (the prepare, the events, the
    decode, the reply with the image), so its time beyond the steps can be read off."""
    rows = load(folder)
    asks = [r for r in rows if r["p"] == "bench" and r["n"] == "send generate"]
    if not asks:
        return ""
    t0 = asks[-1]["t0"]
    t1 = min((r["t1"] for r in rows if r["p"] == "bench" and r["n"] == "recv reply" and r["t0"] > t0), default=None)
    if t1 is None:
        return ""
    steps = [(r["t0"], r["t1"]) for r in rows if r["n"] == "head forward" and t0 <= r["t0"] <= t1]
    lines = [f"last split generation, client's request to its reply: {1e3 * (t1 - t0):.2f} ms; "
             f"{len(steps)} head forwards {sum(1e3 * (b - a) for a, b in steps):.2f} ms; outside them:"]
    for r in rows:
        if r["t0"] < t0 or r["t1"] > t1 or r["t1"] - r["t0"] < 1e-4:
            continue
        if any(a <= r["t0"] and r["t1"] <= b for a, b in steps):
            continue
        lines.append(f"  {1e3 * (r['t0'] - t0):9.3f} +{1e3 * (r['t1'] - r['t0']):8.3f}  {r['p']:<6} "
                     f"{r['th'][:18]:<18} {r['n']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()
    print(report(args.folder, args.steps))
    print(generation_report(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
