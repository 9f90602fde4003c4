"""Benchmark only: a meshd started with this folder first on PYTHONPATH replays its libx265 frames.

bench/split_bench.py --hevc-ahead starts its daemons so, on GPUs without NVENC: the frames libx265
made in the warm-up run are kept (codec.core.ReplayCache, up to REPLAY_BYTES) and returned when the
same frames are encoded again, so the timed runs measure HEVC "encoded ahead of time". The daemon
itself has no switch for this (no environment variable, no setting); this hook patches codec.core in
the daemon's process before meshd starts, as bench/unsealed does for sealing.
"""

import sys
from pathlib import Path

# The checkout this bench belongs to, first: the daemons must run the same code as the bench.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import codec.core  # noqa: E402
from bench.sitehooks import run_next_sitecustomize  # noqa: E402

#: What the replay cache may hold: a 1024² klein-9B run's hops at 4 steps fit with room to spare.
REPLAY_BYTES = 4 << 30

codec.core.enable_hevc_replay(REPLAY_BYTES)
run_next_sitecustomize(__file__)
