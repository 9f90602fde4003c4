"""Benchmark only: makes a meshd started with this folder first on PYTHONPATH seal nothing.

bench/split_bench.py --unsealed starts its daemons so, to measure what sealing costs against the same
transport unsealed. Python imports ``sitecustomize`` at start-up; nothing in meshd reads an
environment variable or a setting for this, and a sealed peer refuses such a daemon at its first frame.
"""

import sys
from pathlib import Path

# The checkout this bench belongs to, first: the daemons must run the same meshd as the bench
# (split_bench.py puts it first on its own sys.path too). sys.path[0] is not set yet at this point.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import meshd.wire.seal  # noqa: E402
from bench.sitehooks import run_next_sitecustomize  # noqa: E402

meshd.wire.seal.BENCH_UNSEALED = True
run_next_sitecustomize(__file__)  # e.g. bench/hevc_ahead, when split_bench names both
