"""Files meshd writes are readable by the daemon that reads them, and files it cannot read or write
are named with the permission missing: one line, never a traceback, never a misleading cause."""

import ctypes
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshd.model.files import ModelStore
from meshd.model.tiny import STALE_TMP_S, TMP_PREFIX, write_tiny


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """The tiny model as the tiny writer leaves it, written once under umask 027."""
    root = tmp_path_factory.mktemp("models") / "tiny"
    old = os.umask(0o027)
    try:
        write_tiny(root)
    finally:
        os.umask(old)
    return root


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def test_the_tiny_writer_gives_its_files_the_modes_the_umask_asks_for(tiny_root):
    found = modes(tiny_root)
    assert any(name.endswith(".safetensors") for name in found)
    folders = {name: mode for name, mode in found.items() if (tiny_root / name).is_dir()}
    files = {name: mode for name, mode in found.items() if not (tiny_root / name).is_dir()}
    # mkdtemp's 0700 and safetensors' 0600 would lock out a daemon of another user in the same group
    assert set(folders.values()) == {0o750}, folders
    assert set(files.values()) == {0o640}, files


def test_interrupted_tiny_writes_are_cleaned_up_and_never_listed_as_models(tiny_root, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_root, models / f"{TMP_PREFIX}stale")  # what a killed writer leaves: a whole model
    shutil.copytree(tiny_root, models / f"{TMP_PREFIX}busy")  # another writer, still at work
    old = time.time() - STALE_TMP_S - 60
    os.utime(models / f"{TMP_PREFIX}stale", (old, old))
    store = ModelStore([models])
    assert store.available() == []
    write_tiny(models / "tiny")
    assert sorted(p.name for p in models.iterdir()) == [f"{TMP_PREFIX}busy", "tiny"]
    # a store walks its folders once (a daemon sees new files at its next start): list with a new one
    assert ModelStore([models]).available() == [("tiny", models / "tiny")]


# --- files closed to the daemon's user ---------------------------------------------------------------
# Tests run as root here, and chmod does not stop root. So the closed files belong to another user
# (nobody) and the commands run without the capabilities that let root past file modes
# (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, dropped from the bounding set before exec): the
# kernel then refuses them exactly as it refuses a daemon's user. (Switching to nobody outright would
# lock the child out of this Python, which lives under root's 0700 home.) As a plain user, chmod alone
# already closes the files.

OTHER_UID = 65534  # nobody
ROOT = Path(__file__).resolve().parent.parent
PR_CAPBSET_DROP = 24
DAC_CAPABILITIES = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
IS_ROOT = os.geteuid() == 0


def _drop_dac_capabilities() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in DAC_CAPABILITIES:
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def unprivileged(argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``argv`` so that file modes bind it (see above)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
                          preexec_fn=_drop_dac_capabilities if IS_ROOT else None)


def close(path: Path, mode: int) -> None:
    """Make ``path`` another user's with ``mode`` (as root; as a plain user, our own with ``mode``)."""
    if IS_ROOT:
        os.chown(path, OTHER_UID, OTHER_UID)
    path.chmod(mode)


def denied(path: Path, verb: str, mode: int) -> str:
    who = f"user {pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
    owner = pwd.getpwuid(OTHER_UID if IS_ROOT else os.geteuid()).pw_name
    return f"{path}: permission denied: {who} cannot {verb} it (mode {mode:04o}, owner {owner})"


SCENARIOS = r"""
import json, logging, sys
from pathlib import Path
import torch
from meshd.node.lifecycle import StartupError, _check_writable
from meshd.model.files import ModelStore
from meshd.model.runtime import HostedModel, open_source
from meshd.model.tensorfiles import FileHashes, ModelError

root = Path(sys.argv[1])
out = {}

def attempt(name, fn):
    try:
        fn()
        out[name] = "no error"
    except (ModelError, StartupError) as exc:
        out[name] = str(exc)
    except Exception as exc:  # the defect under test: report its type
        out[name] = f"{type(exc).__name__}: {exc}"

attempt("closed models_dir", lambda: open_source("tiny", ModelStore([root / "closed"])))
attempt("closed model folder", lambda: ModelStore([root / "folder"]).open("tiny"))
attempt("closed weights", lambda: ModelStore([root / "weights"]).open("tiny"))
vae_model = HostedModel(open_source("tiny", ModelStore([root / "vae"])), torch.device("cpu"), torch.bfloat16)
attempt("closed VAE", lambda: vae_model.load(range(vae_model.preset.num_blocks), True, True))
te = open_source("tiny", ModelStore([root / "te"]))
attempt("closed text encoder", lambda: te.text_encoder(torch.device("cpu"), torch.bfloat16))
warnings = []
logging.getLogger("meshd").addHandler(type("H", (logging.Handler,), {"emit": lambda s, r: warnings.append(r.getMessage())})())
weights = root / "te" / "tiny" / "transformer" / "diffusion_pytorch_model.safetensors"
attempt("closed state dir: hashing", lambda: FileHashes(root / "state" / "cache").sha256(weights))
out["closed state dir: warning"] = " ".join(warnings)
attempt("closed ready-file folder", lambda: _check_writable(root / "state" / "run", "--ready-file", "the ready file"))
from meshd.check import check_models
from meshd.config import DaemonConfig
out["meshd check, closed models_dir"] = [(f.level, f.text) for f in check_models(
    DaemonConfig(models_dir=(root / "closed",), state_dir=root / "state"))]
print(json.dumps(out))
"""


def test_each_file_closed_to_the_daemons_user_is_named_with_its_permission(tiny_root, tmp_path):
    closed = {  # model folder -> what in it is closed
        "closed": ".", "folder": "tiny", "weights": "tiny/transformer/diffusion_pytorch_model.safetensors",
        "vae": "tiny/vae/diffusion_pytorch_model.safetensors", "te": "tiny/text_encoder/model.safetensors",
    }
    for folder, part in closed.items():
        shutil.copytree(tiny_root, tmp_path / folder / "tiny")
        target = (tmp_path / folder / part).resolve()
        close(target, 0o700 if target.is_dir() else 0o600)
    (tmp_path / "state").mkdir()
    close(tmp_path / "state", 0o755)
    result = unprivileged([sys.executable, "-c", SCENARIOS, str(tmp_path)])
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["closed models_dir"] == "models_dir: " + denied(tmp_path / "closed", "list", 0o700)
    assert found["closed model folder"] == denied(tmp_path / "folder" / "tiny", "list", 0o700)
    for case, folder, label in (("closed weights", "weights", ""), ("closed VAE", "vae", "the head's VAE: "),
                                ("closed text encoder", "te", "the text encoder: ")):
        assert found[case] == label + denied((tmp_path / folder / closed[folder]).resolve(), "read", 0o600), case
    # The hash is still computed; the cache that could not be kept is named once, as a warning.
    assert found["closed state dir: hashing"] == "no error"
    assert denied(tmp_path / "state", "write", 0o755) in found["closed state dir: warning"]
    assert found["closed ready-file folder"] == ("--ready-file (the ready file): "
                                                 + denied(tmp_path / "state", "create folders in", 0o755))
    assert found["meshd check, closed models_dir"] == [
        ["problem", "models_dir: " + denied(tmp_path / "closed", "list", 0o700)]]


def test_a_daemon_whose_state_dir_is_closed_stops_with_one_line_naming_it(tiny_root, tmp_path):
    shutil.copytree(tiny_root, tmp_path / "models" / "tiny")
    state = tmp_path / "state"
    state.mkdir()
    close(state, 0o755)
    result = unprivileged([sys.executable, "-m", "meshd", "serve", "--port", "0", "--device", "cpu", "--insecure",
                           "--no-mdns", "--models-dir", str(tmp_path / "models"), "--state-dir", str(state)])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "state_dir (node id and caches): " + denied(state, "write", 0o755) in result.stderr


COMFY_SCENARIO = r"""
import sys
from pathlib import Path
import torch
from meshd.model.files import ModelStore
from meshd.model.runtime import HostedModel, open_source
from meshd.model.tensorfiles import ModelError

root = Path(sys.argv[1])
model = HostedModel(open_source(sys.argv[2], ModelStore([], comfyui_dir=root)), torch.device("cpu"), torch.bfloat16)
try:
    model.load(range(model.preset.num_blocks), True, True)
    print("no error")
except ModelError as exc:
    print(exc)
"""


def test_a_closed_vae_file_in_a_comfyui_tree_is_named_at_load_not_reported_absent_at_decode(tmp_path):
    # Found by review: an unreadable single-file VAE was left out of the head's parts, so the head ran
    # every step and then failed at decode with "no VAE single file".
    from tests.comfyui_files import TRANSFORMER, write_comfyui

    root = tmp_path / "ComfyUI"
    root.mkdir()
    write_comfyui(root, tmp_path / "scratch")
    vae = root / "models" / "vae" / "flux2-vae.safetensors"
    close(vae, 0o600)
    result = unprivileged([sys.executable, "-c", COMFY_SCENARIO, str(root), TRANSFORMER])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "the head's VAE cannot be read: " + denied(vae, "read", 0o600)


@pytest.mark.parametrize("content, cause", [
    (b"{" + b" " * (16 << 20) + b"}", "over 16 MiB"),  # read up to the cap, never whole
    (b"\xff\xfe not text", "not readable JSON"),
    (b"[1, 2]", "does not hold a JSON object"),
], ids=["oversized", "not-utf8", "not-an-object"])
def test_a_model_json_file_is_read_bounded_and_refused_in_one_line(tmp_path, content, cause):
    from meshd.model.errors import ModelError
    from meshd.model.tensorfiles import read_json

    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=cause) as raised:
        read_json(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


PARTS_SCENARIO = r"""
import json, sys
from pathlib import Path
from meshd.model.files import ModelStore
from meshd.model.presets import PRESETS

root = Path(sys.argv[1])
parts = ModelStore([root]).head_parts(PRESETS["tiny"], components=root / "tiny")
print(json.dumps([parts.vae_problem, parts.text_encoder_problem]))
"""


def test_a_closed_file_where_vaes_go_does_not_fault_a_head_whose_folder_holds_its_vae(tiny_root, tmp_path):
    # Found by review: the head's parts were said to be unreadable (and check_head_files refused the head)
    # because some other file in a vae/ folder was closed, though the diffusers folder's own vae/ served.
    root = tmp_path / "models"
    shutil.copytree(tiny_root, root / "tiny")
    other = root / "vae" / "someone-elses.safetensors"
    other.parent.mkdir()
    other.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    close(other, 0o600)
    result = unprivileged([sys.executable, "-c", PARTS_SCENARIO, str(root)])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["", ""]


@pytest.mark.parametrize("change", [
    {"latent_channels": 64},  # the weights' shapes no longer fit: torch's size-mismatch report, many lines
    {"block_out_channels": "abc"},  # a value of the wrong type
], ids=["shapes", "type"])
def test_a_vae_config_that_does_not_fit_its_weights_is_one_line_naming_the_folder(tiny_root, tmp_path, change):
    import torch

    from meshd.model.errors import ModelError
    from meshd.model.runtime import open_source

    root = tmp_path / "models"
    shutil.copytree(tiny_root, root / "tiny")
    config = root / "tiny" / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(ModelError) as raised:
        open_source("tiny", ModelStore([root])).vae(torch.device("cpu"), torch.float32)
    message = str(raised.value)
    assert message.startswith(f"could not load the VAE from {root / 'tiny' / 'vae'}: ") and "\n" not in message
