#!/usr/bin/env python3
"""Benchmark only: does the host-shm hand-over gain from going in pieces?

A host-shm hop moves the stream twice: the sender's GPU copies it into a shared region (device to
host), then the receiver's GPU copies it out (host to device). Today the second copy starts when the
first has finished. Cut into K pieces, the receiver could copy piece i while the sender copies piece
i + 1, so the hand-over would take about one copy plus a piece instead of two copies: if the two
copies can run at once. Between two processes on one GPU (two CUDA contexts, time-sliced) that is
the open question; between two GPUs it should hold. This bench answers it before the pipeline is
built that way.

    python bench/copy_overlap.py --devices cuda:0,cuda:0 --mib 36 --pieces 1,2,4,8 --repeat 30 --json

Two processes (sender, receiver) on the given devices, as two daemons: each maps the same sealed
memfd region (meshd.wire.shm) and registers it with its driver (pinned), as the daemons do. For each
K, every repeat: the receiver says go on a pipe; the sender copies K pieces device-to-host, each
followed by its event's synchronisation and one byte on a second pipe (the doorbell's role); the
receiver copies each piece host-to-device once its byte arrives, and synchronises at the end. The
hand-over is the sender's start to the receiver's end (one clock: time.perf_counter is
CLOCK_MONOTONIC on Linux, shared by the processes of a host). K = 1 is today's hand-over; its d2h
and h2d alone (CUDA events) say what full overlap would leave. ``--devices cpu,cpu`` runs the same
protocol with plain memory (a smoke test: copies are memcpy there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bounds(nbytes: int, pieces: int) -> list[tuple[int, int]]:
    """K contiguous pieces of ``nbytes``, cut at 64-byte multiples, none empty."""
    cuts = [0] + [((nbytes * i // pieces) // 64) * 64 for i in range(1, pieces)] + [nbytes]
    out = list(zip(cuts, cuts[1:]))
    if any(lo >= hi for lo, hi in out):
        raise SystemExit(f"copy_overlap: {nbytes} bytes cannot be cut into {pieces} pieces of 64-byte multiples")
    return out


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = os.read(fd, n - len(data))
        if not piece:
            raise SystemExit("copy_overlap: the other process went away")
        data += piece
    return data


def role(args) -> None:
    """One process: the sender or the receiver, for every K in turn; prints its timings as JSON."""
    import torch

    from meshd.wire import shm

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    memory = shm.map_region(args.fd, args.region_bytes)
    arena = shm.region_arena(memory, args.role, device)
    host = torch.from_numpy(arena.span(0, args.nbytes))
    gpu = torch.empty(args.nbytes, dtype=torch.uint8, device=device)
    if args.role == "sender":
        gpu.copy_(torch.randint(0, 256, (args.nbytes,), dtype=torch.uint8))
    cuda = device.type == "cuda"
    stream = torch.cuda.current_stream(device) if cuda else None

    def event():
        e = torch.cuda.Event(enable_timing=True)
        e.record(stream)
        return e

    out: dict[str, list] = {}
    for pieces in args.pieces:
        cuts = bounds(args.nbytes, pieces)
        starts, ends, copy_ms = [], [], []
        for _ in range(args.warmup + args.repeat):
            if args.role == "sender":
                _read_exact(args.go, 1)
                t0 = time.perf_counter()
                first = event() if cuda else None
                for i, (lo, hi) in enumerate(cuts):
                    host[lo:hi].copy_(gpu[lo:hi], non_blocking=cuda)
                    if cuda:
                        last = event()
                        last.synchronize()
                    os.write(args.bell, bytes([i]))
                starts.append(t0)
                copy_ms.append(first.elapsed_time(last) if cuda else (time.perf_counter() - t0) * 1e3)
            else:
                os.write(args.go, b"g")
                first = t = None
                for i, (lo, hi) in enumerate(cuts):
                    if _read_exact(args.bell, 1)[0] != i:
                        raise SystemExit("copy_overlap: pieces out of order")
                    if first is None:  # (from the first piece's copy: what waits for the later ones counts)
                        first, t = event() if cuda else True, time.perf_counter()
                    gpu[lo:hi].copy_(host[lo:hi], non_blocking=cuda)
                if cuda:
                    last = event()
                    last.synchronize()
                ends.append(time.perf_counter())
                copy_ms.append(first.elapsed_time(last) if cuda else (ends[-1] - t) * 1e3)
        skip = args.warmup
        out[str(pieces)] = {"starts": starts[skip:], "ends": ends[skip:], "copy_ms": copy_ms[skip:]}
    if args.role == "receiver":
        assert torch.equal(host, gpu.cpu()), "the bytes changed on the way"
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="cuda:0,cuda:0", help="sender,receiver")
    parser.add_argument("--mib", type=float, default=36.0, help="the stream (klein-9B at 1024²: 36 MiB)")
    parser.add_argument("--pieces", default="1,2,4,8")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--role", choices=("sender", "receiver"), help=argparse.SUPPRESS)
    for hidden in ("--device", "--fd", "--go", "--bell", "--nbytes", "--region-bytes"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        args.pieces = [int(p) for p in args.pieces.split(",")]
        for name in ("fd", "go", "bell", "nbytes", "region_bytes"):
            setattr(args, name, int(getattr(args, name)))
        role(args)
        return

    from meshd.wire import shm, staging

    devices = args.devices.split(",")
    if len(devices) != 2:
        raise SystemExit(f"copy_overlap: --devices names a sender and a receiver, not {args.devices!r}")
    pieces = [int(p) for p in args.pieces.split(",")]
    nbytes = int(args.mib * (1 << 20)) // 64 * 64
    for k in pieces:
        bounds(nbytes, k)
    region_bytes = -(-nbytes // staging.PAGE_BYTES) * staging.PAGE_BYTES
    fd, _ = shm.make_region(region_bytes)
    go_r, go_w = os.pipe()  # receiver -> sender: start a repeat
    bell_r, bell_w = os.pipe()  # sender -> receiver: piece i is in the region
    common = [sys.executable, __file__, "--pieces", args.pieces, "--repeat", str(args.repeat), "--warmup",
              str(args.warmup), "--fd", str(fd), "--nbytes", str(nbytes), "--region-bytes", str(region_bytes)]
    procs = {
        "sender": subprocess.Popen(common + ["--role", "sender", "--device", devices[0], "--go", str(go_r),
                                             "--bell", str(bell_w)], pass_fds=(fd, go_r, bell_w),
                                   stdout=subprocess.PIPE, text=True),
        "receiver": subprocess.Popen(common + ["--role", "receiver", "--device", devices[1], "--go", str(go_w),
                                               "--bell", str(bell_r)], pass_fds=(fd, go_w, bell_r),
                                     stdout=subprocess.PIPE, text=True),
    }
    for end in (fd, go_r, go_w, bell_r, bell_w):
        os.close(end)
    got = {}
    for name, proc in procs.items():
        stdout, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"copy_overlap: the {name} failed (exit {proc.returncode})")
        got[name] = json.loads(stdout)
    rows = []
    for k in pieces:
        s, r = got["sender"][str(k)], got["receiver"][str(k)]
        handover = [(end - start) * 1e3 for start, end in zip(s["starts"], r["ends"])]
        rows.append({"pieces": k, "handover_ms": statistics.median(handover),
                     "d2h_ms": statistics.median(s["copy_ms"]), "h2d_ms": statistics.median(r["copy_ms"])})
    serial = rows[0]["handover_ms"] if pieces[0] == 1 else None
    for row in rows:
        row["over_one_piece"] = row["handover_ms"] / serial if serial else None
    import torch

    result = {
        "bench": "copy_overlap",
        "machine": {"host": platform.node(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "cpus": os.cpu_count(), "torch": torch.__version__},
        "config": {"devices": devices, "bytes": nbytes, "repeat": args.repeat,
                   "timing": "median over repeats; handover: sender's start to receiver's end, wall clock"},
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    for row in rows:
        print(f"# {row['pieces']} piece(s): hand-over {row['handover_ms']:.3f} ms "
              f"(d2h {row['d2h_ms']:.3f}, h2d {row['h2d_ms']:.3f} ms as timed in each process)", file=sys.stderr)


if __name__ == "__main__":
    main()
