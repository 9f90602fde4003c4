"""bench/split_bench.py end to end on the tiny model: the benchmark-only unsealed build reaches the
daemons it starts, not only the bench's own client (a merge once computed the daemons' environment in
one function and used another's, so every `--unsealed` run on the H200 ended in "a sealed record
arrived where an unsealed frame was due")."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_unsealed_split_bench_runs_and_stays_exact(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "split_bench.py"), "--model", "tiny", "--random-weights", "--device", "cpu",
         "--size", "64", "--steps", "2", "--codecs", "raw", "--repeat", "1", "--transport", "tcp", "--unsealed",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["config"]["frames"] == "unsealed (benchmark-only build)"
    (run,) = result["runs"]
    assert run["bit_identical_latents"] and run["chosen"] == ["raw"]
