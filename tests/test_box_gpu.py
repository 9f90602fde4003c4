"""On the GPU machine: two daemons of one box, run as template instances meshd@0 and meshd@1 under
one shared non-root user (as meshd@.service runs them), pass the stream by CUDA IPC and produce the
all-local result bit for bit. Both share the one GPU there (meshd@1.toml says device = "cuda:0").

Run there: ``python3 -m pytest tests/test_box_gpu.py -q -m gpu``.
"""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from meshd.auth import generate_key, write_key
from meshd.pipeline.plan import PeerAddress
from tests.daemons import split_generation

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parent.parent
#: The shared user: as root, nobody stands in for the meshd system user; as a plain user, oneself.
SHARED_UID = 65534 if os.geteuid() == 0 else os.geteuid()
PARAMS = {"prompt": "a lighthouse at dawn", "seed": 11, "width": 256, "height": 256, "steps": 4, "guidance": 1.0}


def _become_shared_user() -> None:
    if os.geteuid() != SHARED_UID:
        os.setgroups([])
        os.setgid(SHARED_UID)
        os.setuid(SHARED_UID)


def _as_shared_user(argv: list[str], log: Path) -> subprocess.Popen:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # keep carried wheels
    env = {**os.environ, "PYTHONPATH": path, "HOME": str(log.parent), "XDG_CACHE_HOME": str(log.parent / "cache")}
    with log.open("w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                preexec_fn=_become_shared_user)


@pytest.fixture()
def box():
    """meshd@0 and meshd@1 from one config, both as the shared user; yields their addresses and key."""
    work = Path(tempfile.mkdtemp(prefix="meshd-box-"))
    work.chmod(0o755)
    key = generate_key()
    write_key(work / "cluster.key", key)
    (work / "meshd.toml").write_text(
        f'[meshd]\nhost = "127.0.0.1"\nport = 0\nmdns = false\nmodel = "tiny"\nkey_file = "{work / "cluster.key"}"\n'
        f'models_dir = ["{work / "models"}"]\nstate_dir = "{work / "state"}"\n')
    (work / "meshd@1.toml").write_text('[meshd]\ndevice = "cuda:0"\n')  # one GPU here: both instances on it
    for path in [work, *work.rglob("*")]:
        os.chown(path, SHARED_UID, -1)
    try:
        check = subprocess.run([sys.executable, "-c", "import torch"], preexec_fn=_become_shared_user, cwd="/",
                               capture_output=True, text=True)
        problem = check.stderr.strip()[-200:] if check.returncode else None
    except OSError as exc:
        problem = str(exc)
    if problem:
        shutil.rmtree(work, ignore_errors=True)
        pytest.skip(f"uid {SHARED_UID} cannot run this Python with torch ({problem}); install torch where it can")
    daemons = [_as_shared_user([sys.executable, "-m", "meshd", "serve", "--config", str(work / "meshd.toml"),
                                "--instance", str(n), "--ready-file", str(work / f"ready-{n}.json")],
                               work / f"meshd@{n}.log") for n in (0, 1)]
    try:
        addresses = []
        for n, process in enumerate(daemons):
            ready = work / f"ready-{n}.json"
            deadline = time.monotonic() + 180
            while not ready.exists():
                assert process.poll() is None, (work / f"meshd@{n}.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "meshd@{n} did not become ready"
                time.sleep(0.2)
            addresses.append(PeerAddress("127.0.0.1", json.loads(ready.read_text())["port"]))
        yield addresses, key
    finally:
        for process in daemons:
            process.terminate()
        for process in daemons:
            process.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def test_two_instances_under_one_user_choose_cuda_ipc_and_stay_bit_identical(box):
    (a, b), key = box
    local = asyncio.run(split_generation(key, [a], "A:0-5", PARAMS, codec="raw", return_latents=True))
    split = asyncio.run(split_generation(key, [a, b], "A:0-2,B:3-5", PARAMS, codec="raw", return_latents=True))
    link = split.summary["stages"][0]["link"]
    assert link["transport"] == "cuda-ipc", link  # not the loopback TCP fallback of two DynamicUsers
    assert torch.equal(split.latents, local.latents)
