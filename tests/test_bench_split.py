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
    acc = run["step_accounting_ms"]  # the parts and the rest add up to the step
    assert acc["compute_ms"] > 0 and acc["transfer_ms"] > 0
    assert set(result["local"]["step_accounting_ms"]) == set(acc)


def test_step_accounting_splits_a_step_into_head_blocks_hand_overs_and_the_rest():
    sys.path.insert(0, str(ROOT / "bench"))
    from split_bench import step_accounting  # noqa: PLC0415

    hop = {"from": "a", "node": "b", "codec": "raw", "bytes": 10, "encode_ms": 1.0, "wire_ms": 0.5, "decode_ms": 0.25,
           "compute_ms": 40.0}
    steps = [{"step": i, "ms": ms, "head_ms": 2.0, "passes": [{"compute_ms": 50.0, "hops": [hop]}]}
             for i, ms in enumerate((100.0, 110.0, 105.0))]
    assert step_accounting({"steps": steps}) == {"step_ms": 105.0, "head_ms": 2.0, "compute_ms": 90.0,
                                                 "transfer_ms": 1.75, "other_ms": 11.25}
    assert step_accounting({"steps": []}) == {}


def test_a_traced_split_bench_reports_each_step_across_the_processes(tmp_path):
    """``--trace DIR``: the daemons (through bench/trace's sitecustomize) and the bench record their spans,
    and bench/steptrace.py lays a step out across all three processes with its GPU-free stretches."""
    trace = tmp_path / "trace"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "split_bench.py"), "--model", "tiny", "--random-weights", "--device", "cpu",
         "--size", "64", "--steps", "2", "--codecs", "raw", "--repeat", "1", "--transport", "shm",
         "--trace", str(trace), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(trace.glob("*.jsonl"))) == 3, "the bench and both daemons wrote their spans"
    report = subprocess.run([sys.executable, str(ROOT / "bench" / "steptrace.py"), str(trace), "--steps", "2"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert report.returncode == 0, report.stderr[-2000:]
    lines = report.stdout.splitlines()
    assert sum(line.startswith("head forward ") for line in lines) == 2
    spans = " ".join(lines)
    for part in ("A      gpu-cpu", "B      gpu-cpu", "run SplitRunner.forward.<locals>.head_compute",
                 "run StageService.forward.<locals>.compute", "send forward", "recv forward", "bench  MainThread"):
        assert part in spans, part
    assert any(line.startswith("GPU-free time over 2 step(s)") for line in lines)
    assert any(line.startswith("last split generation, client's request to its reply") for line in lines)
