"""bench/copy_overlap.py end to end on the CPU (the protocol it times on a GPU: two processes, one
sealed shared region, pieces rung across a pipe), so that a GPU session spends its time on numbers,
not on a script that fails."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from copy_overlap import bounds  # noqa: E402


def test_pieces_cover_the_stream_in_order_at_64_byte_cuts():
    for nbytes, k in ((37748736, 1), (37748736, 4), (36864, 8), (64 * 5, 5)):
        cuts = bounds(nbytes, k)
        assert len(cuts) == k and cuts[0][0] == 0 and cuts[-1][1] == nbytes
        assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:])) and all(lo % 64 == 0 for lo, _ in cuts)
    with pytest.raises(SystemExit, match="cannot be cut into 6 pieces"):
        bounds(64 * 5, 6)


def test_the_bench_times_the_hand_over_in_pieces_between_two_processes_and_the_bytes_arrive():
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "copy_overlap.py"), "--devices", "cpu,cpu", "--mib", "1",
         "--pieces", "1,4", "--repeat", "3", "--warmup", "1", "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert [row["pieces"] for row in result["rows"]] == [1, 4] and result["config"]["bytes"] == 1 << 20
    assert all(row["handover_ms"] > 0 and row["d2h_ms"] > 0 and row["h2d_ms"] > 0 for row in result["rows"])
    assert result["rows"][0]["over_one_piece"] == 1.0
