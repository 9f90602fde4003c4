"""The systemd unit passes ``systemd-analyze verify`` and keeps the promises a GPU daemon needs
(notify, watchdog, restart, /dev/nvidia* reachable, AF_NETLINK for zeroconf, no W^X for PyTorch, the key
via LoadCredential); the example config documents every key; ``meshd install-unit`` installs it all.

``systemd-analyze`` comes with the ``systemd`` package: ``make test`` installs it when run as root
with apt-get; elsewhere the verify tests skip and say so.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from meshd.auth import fingerprint, key_is_private, read_key
from meshd.cli import TEMPLATE_EXEC, meshd_executable, render_unit
from meshd.config import CREDENTIAL_NAME, DaemonConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "meshd.service"
EXAMPLE = ROOT / "systemd" / "meshd.toml"

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (make test installs the systemd package when run as root with apt-get)",
)


def directives(text: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (systemd allows a key several times)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def verify(path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", *extra, str(path)], capture_output=True, text=True, timeout=60)


@needs_analyze
def test_the_unit_as_installed_passes_systemd_analyze_verify(tmp_path):
    """What install-unit writes: the shipped unit with ExecStart pointing at this meshd."""
    unit = tmp_path / "meshd.service"
    unit.write_text(render_unit(meshd_executable()))
    result = verify(unit)
    assert result.returncode == 0, result.stderr
    complaints = [line for line in result.stderr.splitlines() if "meshd.service" in line]
    assert complaints == [], complaints  # not even a warning about an unknown or misspelt key


@needs_analyze
def test_the_shipped_unit_file_itself_passes_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify systemd/meshd.service` verbatim. verify insists that ExecStart's program
    exists, so meshd is made to appear at /usr/local/bin/meshd in a private mount namespace only."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or not Path("/usr/local/bin").is_dir():
        pytest.skip("needs root and unshare to show meshd at /usr/local/bin/meshd in a private mount namespace")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "meshd").symlink_to(meshd_executable().split()[0])
    cannot_mount = 97
    script = (f'mount --bind "{bin_dir}" /usr/local/bin || exit {cannot_mount}; '
              f'exec systemd-analyze verify "{UNIT}"')
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, timeout=60)
    if result.returncode == cannot_mount or result.stderr.startswith("unshare:"):
        pytest.skip(f"no private mount namespace here (a container without CAP_SYS_ADMIN?): {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "meshd.service" in line] == []


def test_the_unit_keeps_the_promises_of_a_gpu_daemon():
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"] and d["Restart"] == ["on-failure"]
    assert d.get("DynamicUser") == ["yes"] or d.get("User")
    assert d["ExecStart"] == [f"{TEMPLATE_EXEC} serve --config /etc/meshd/meshd.toml"]
    # The cluster key arrives as a credential, under the name meshd looks for.
    assert d["LoadCredential"] == [f"{CREDENTIAL_NAME}:/etc/meshd/{CREDENTIAL_NAME}"]
    # /dev/nvidia* stays reachable; zeroconf can enumerate interfaces; PyTorch may JIT.
    assert d["PrivateDevices"] == ["no"] and d["DevicePolicy"] == ["closed"]
    assert any(v.startswith("char-nvidia-uvm ") for v in d["DeviceAllow"])
    assert any(v.startswith(("char-nvidia ", "char-nvidia-frontend ")) for v in d["DeviceAllow"])
    assert "AF_NETLINK" in d["RestrictAddressFamilies"][0].split()
    assert "MemoryDenyWriteExecute" not in d
    assert "ProcSubset" not in d
    # Stopping drains for up to 30 s (Daemon.stop's grace): systemd must wait longer than that.
    assert int(d["TimeoutStopSec"][0].removesuffix("s")) > 30


def test_the_example_config_documents_every_key_and_its_defaults_load(tmp_path):
    text = EXAMPLE.read_text()
    commented = dict(re.findall(r"^#(\w+) = (.+)$", text, flags=re.MULTILINE))
    assert set(commented) == {f.name for f in fields(DaemonConfig)}
    assert load_config(EXAMPLE) is not None  # as shipped (everything commented out)
    uncommented = tmp_path / "meshd.toml"
    uncommented.write_text(re.sub(r"^#(\w+ = )", r"\1", text, flags=re.MULTILINE))
    config = load_config(uncommented)
    defaults = DaemonConfig()
    # These defaults depend on who runs meshd and where (root, a user, the unit): the file shows the unit's.
    by_environment = {"key_file", "models_dir", "state_dir"}
    for f in fields(DaemonConfig):
        if f.name not in by_environment:
            assert getattr(config, f.name) == getattr(defaults, f.name), f"meshd.toml: wrong default for {f.name}"


def meshd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshd", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_install_unit_writes_the_unit_the_config_and_a_private_key(tmp_path):
    args = ["install-unit", "--unit-dir", str(tmp_path / "units"), "--config-dir", str(tmp_path / "etc"),
            "--exec", "/opt/flux-mesh/bin/meshd", "--no-reload"]
    first = meshd(*args)
    assert first.returncode == 0, first.stderr
    unit = (tmp_path / "units" / "meshd.service").read_text()
    assert directives(unit)["ExecStart"] == ["/opt/flux-mesh/bin/meshd serve --config /etc/meshd/meshd.toml"]
    assert (tmp_path / "etc" / "meshd.toml").read_text() == EXAMPLE.read_text()
    key_path = tmp_path / "etc" / CREDENTIAL_NAME
    assert key_is_private(key_path)
    key = read_key(key_path)
    assert fingerprint(key) in first.stdout
    # Again: nothing is replaced, least of all the key every box shares.
    again = meshd(*args)
    assert again.returncode == 0 and read_key(key_path) == key
    assert "kept" in again.stdout
    other = meshd(*args[:-3], "--exec", "/usr/bin/meshd", "--no-reload")
    assert other.returncode == 1 and "--force" in other.stderr


def test_install_unit_print_changes_nothing():
    result = meshd("install-unit", "--print", "--exec", "/opt/x/meshd")
    assert result.returncode == 0
    assert "ExecStart=/opt/x/meshd serve --config /etc/meshd/meshd.toml" in result.stdout
    assert result.stdout.replace("/opt/x/meshd", TEMPLATE_EXEC) == UNIT.read_text()


def test_meshd_check_reports_in_plain_words_and_fails_on_real_problems(tmp_path, capsys):
    from meshd.auth import generate_key, write_key  # noqa: PLC0415
    from meshd.cli import main  # noqa: PLC0415 - in this process: a fresh one spends seconds importing diffusers

    key = tmp_path / "cluster.key"
    write_key(key, generate_key())
    good = tmp_path / "good.toml"
    good.write_text(f'[meshd]\nkey_file = "{key}"\nmdns = false\nstate_dir = "{tmp_path / "state"}"\n'
                    f'models_dir = ["{tmp_path / "models"}"]\n')
    status = main(["check", "--config", str(good), "--json"])
    findings = json.loads(capsys.readouterr().out)
    assert status == 0, findings
    topics = {f["topic"] for f in findings}
    assert {"config", "GPU", "NVENC", "codecs", "models", "mDNS", "key", "systemd", "node"} <= topics
    codecs = next(f["text"] for f in findings if f["topic"] == "codecs")
    assert "raw" in codecs and "u8" in codecs
    assert any(f["topic"] == "key" and f["level"] == "ok" and "fingerprint" in f["text"] for f in findings)

    key.chmod(0o644)
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("mdns = false", 'mdns = true\ninterfaces = ["no-such-nic0"]')
                   + 'model = "klein-9b-that-is-not-here"\n')
    status = main(["check", "--config", str(bad), "--no-codec-probe"])
    out = capsys.readouterr().out
    assert status == 1
    assert "[FAIL] key" in out and "chmod 600" in out
    assert "no-such-nic0" in out
    assert "klein-9b-that-is-not-here" in out
