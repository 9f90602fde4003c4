"""Benchmark only: a meshd started with this folder first on PYTHONPATH records a step timeline.

bench/split_bench.py --trace DIR starts its daemons so: the spans of bench/steptrace.py (executor
hand-offs, frames, CUDA waits, the pipeline's coroutines) go to DIR/<pid>.jsonl, named after the
daemon's --name. The daemon itself has no switch for this; the folder comes from FLUX_MESH_TRACE_DIR,
which only split_bench sets.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sitehooks import run_next_sitecustomize  # noqa: E402

if os.environ.get("FLUX_MESH_TRACE_DIR"):
    from bench import steptrace  # noqa: E402

    argv = sys.argv
    label = argv[argv.index("--name") + 1] if "--name" in argv[:-1] else f"pid{os.getpid()}"
    steptrace.install(os.environ["FLUX_MESH_TRACE_DIR"], label)
run_next_sitecustomize(__file__)
