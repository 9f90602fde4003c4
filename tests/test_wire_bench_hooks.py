"""The daemon has no benchmark switch: benchmark-only behaviour (frames unsealed, libx265 frames
replayed) is installed by a bench folder's sitecustomize in the daemon's process, and several such
folders on one PYTHONPATH all take effect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

#: What a daemon started with the hook folders would see, printed by a child python.
REPORT = r"""
import codec.core, meshd.wire.seal
encoder = codec.core._encoders.get(("x265", "cpu"))
print(type(encoder).__name__, getattr(encoder, "max_bytes", 0), meshd.wire.seal.BENCH_UNSEALED)
"""


def report(*folders: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(BENCH / f) for f in folders)}
    child = subprocess.run([sys.executable, "-c", REPORT], env=env, capture_output=True, text=True, timeout=120,
                           cwd=ROOT)
    assert child.returncode == 0, child.stderr[-2000:]
    return child.stdout.strip()


@pytest.mark.parametrize("folders,expected", [
    ((), "NoneType 0 False"),
    (("hevc_ahead",), f"ReplayCache {4 << 30} False"),
    (("unsealed",), "NoneType 0 True"),
    (("unsealed", "hevc_ahead"), f"ReplayCache {4 << 30} True"),
    (("hevc_ahead", "unsealed"), f"ReplayCache {4 << 30} True"),
], ids=["none", "hevc ahead", "unsealed", "both", "both, other order"])
def test_the_bench_hook_folders_patch_the_process_and_combine(folders, expected):
    assert report(*folders) == expected


def test_the_daemon_reads_no_benchmark_switch_from_its_environment():
    """A replay cache or unsealed frames in production would be a silent lie in every figure: nothing
    in meshd or codec may turn them on from the environment."""
    for path in [*(ROOT / "meshd").rglob("*.py"), *(ROOT / "codec").rglob("*.py")]:
        text = path.read_text()
        assert "MESHD_BENCH" not in text, path
        assert "enable_hevc_replay(" not in text or path.name == "core.py", path


def test_split_bench_gives_its_daemons_the_hooks_it_was_asked_for():
    """--unsealed and --hevc-ahead reach the daemons (the client side is patched in split_bench itself)."""
    from argparse import Namespace

    sys.path.insert(0, str(BENCH))
    try:
        import split_bench
    finally:
        sys.path.remove(str(BENCH))
    assert split_bench.daemon_env(Namespace(unsealed=False, hevc_ahead=False, trace=None)) == {}
    paths = split_bench.daemon_env(Namespace(unsealed=True, hevc_ahead=True, trace=None))["PYTHONPATH"].split(os.pathsep)
    assert paths[:2] == [str(BENCH / "unsealed"), str(BENCH / "hevc_ahead")]
    traced = split_bench.daemon_env(Namespace(unsealed=False, hevc_ahead=False, trace=Path("spans")))
    assert traced["PYTHONPATH"].split(os.pathsep)[0] == str(BENCH / "trace")
    assert traced["FLUX_MESH_TRACE_DIR"] == str(Path("spans").resolve())
