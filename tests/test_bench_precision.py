"""bench/precision_bench.py's generation sweep end to end on the tiny model, on the CPU. It calls the
split bench's run_local and run_split with its own arguments; when split_bench grew --interleave those
read ``args.interleave``, which the precision bench has no option for, and every sweep stopped with an
AttributeError before its first figure (found before the H200 run that needed it)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_precision_sweep_runs_and_each_split_equals_its_all_local_run(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "precision_bench.py"), "--model", "tiny", "--device", "cpu",
         "--size", "64", "--steps", "2", "--weights", "bf16,fp8", "--workdir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    rows = {row["weights"]: row for row in result["rows"]}
    assert set(rows) == {"bf16", "fp8"}
    for row in rows.values():
        assert row["split"]["bit_identical_to_local"] is True, row
    assert "vs_bf16" not in rows["bf16"]
    error = rows["fp8"]["vs_bf16"]
    assert error["final_latent_rel_l2"] > 0 and error["label"].startswith("random weights")
    # Every row's ratios are against the bf16 eager row of the same run; the tail is attributed.
    assert result["config"]["compile"] == ["off"]
    assert rows["bf16"]["over_bf16_eager"] == {part: {"generation": 1.0, "step": 1.0} for part in ("local", "split")}
    assert all(ratio > 0 for part in rows["fp8"]["over_bf16_eager"].values() for ratio in part.values())
    for row in rows.values():
        assert row["compile"] == "off"
        assert all(row["local"][part] >= 0 for part in ("prepare_ms", "vae_ms", "png_ms", "decode_ms")), row["local"]


def test_an_unknown_compile_mode_is_one_line_naming_the_option():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "precision_bench.py"), "--compile", "fast"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert "--compile: on, off or on,off, not fast" in done.stderr and "Traceback" not in done.stderr
