"""Daemons started on this machine, on loopback: for ``meshtui demo``, tests and benchmarks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from meshd.auth import generate_key, write_key
from meshd.pipeline.plan import PeerAddress


@dataclass
class LocalDaemon:
    """One ``meshd serve`` child process."""

    name: str
    args: list[str]
    workdir: Path
    env: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None
    address: PeerAddress | None = None
    log_path: Path | None = None
    port: int = 0  # 0: any free port

    def start(self) -> LocalDaemon:
        ready = self.workdir / f"{self.name}.ready"
        ready.unlink(missing_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        cmd = [sys.executable, "-m", "meshd", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--name", self.name, "--no-mdns", "--ready-file", str(ready), *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as log:  # appended: a restarted daemon keeps its earlier log
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        self._ready_file = ready
        return self

    def wait_ready(self, timeout: float = 120.0) -> PeerAddress:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready_file.exists():
                info = json.loads(self._ready_file.read_text())
                self.address = PeerAddress(info["host"], int(info["port"]))
                return self.address
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon {self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"daemon {self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path and self.log_path.exists():
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def signal(self, sig: int) -> None:
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def restart(self, timeout: float = 120.0) -> PeerAddress:
        """Stop (if it still runs) and start again on the same port, as a service manager would."""
        self.stop()
        self.port = self.address.port
        self.start()
        return self.wait_ready(timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (drain), then SIGKILL if it does not exit in time; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


class LocalCluster:
    """A few daemons on loopback sharing one key file and model folder."""

    def __init__(self, workdir: Path | None = None, key_file: Path | None = None, models_dir: Path | None = None,
                 common_args: list[str] | None = None) -> None:
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="flux-mesh-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.key_file = key_file or workdir / "cluster.key"
        if not self.key_file.exists():
            write_key(self.key_file, generate_key())
        self.models_dir = models_dir or workdir / "models"
        self.common_args = common_args or []
        self.daemons: list[LocalDaemon] = []

    def add(self, name: str, *args: str, env: dict | None = None) -> LocalDaemon:
        base = ["--key-file", str(self.key_file), "--models-dir", str(self.models_dir),
                "--state-dir", str(self.workdir / f"state-{name}"), *self.common_args]
        daemon = LocalDaemon(name, [*base, *args], self.workdir, env or {})
        self.daemons.append(daemon)
        return daemon

    def start(self, timeout: float = 120.0) -> list[PeerAddress]:
        for d in self.daemons:
            if d.process is None:
                d.start()
        return [d.wait_ready(timeout) for d in self.daemons]

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
