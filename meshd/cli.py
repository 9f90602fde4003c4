"""The ``meshd`` command: ``serve``, ``keygen``, ``telemetry``, ``check``, ``install-unit``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import __version__
from .config import COMPUTE_DTYPES, WEIGHTS_CHOICES

log = logging.getLogger("meshd")

#: Where ``install-unit`` puts things by default.
UNIT_DIR = Path("/etc/systemd/system")
CONFIG_DIR = Path("/etc/meshd")
SYSUSERS_DIR = Path("/etc/sysusers.d")
#: The unit of a box with one daemon, the template of a box with one daemon per GPU, and the sysusers.d
#: entry of the system user every instance of the template runs as (as installed, and as shipped).
UNIT_FILE, TEMPLATE_FILE = "meshd.service", "meshd@.service"
SYSUSERS_FILE, SHIPPED_SYSUSERS = "meshd.conf", "meshd.sysusers"
#: The path ExecStart= names in systemd/meshd.service; install-unit replaces it with the real one.
TEMPLATE_EXEC = "/usr/local/bin/meshd"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the daemon", description="Host a span of FLUX.2 blocks and serve "
                       "authenticated requests. Flags override the config file.")
    p.add_argument("--config", type=Path, help="TOML config (default /etc/meshd/meshd.toml if it exists)")
    p.add_argument("--instance", type=int, metavar="N",
                   help="run as instance N of meshd@.service: GPU N, port + N, its own state dir, the config's "
                        "[\"meshd@N\"] section and meshd@N.toml drop-in")
    p.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="TCP port (default 7777; 0 picks a free one)")
    p.add_argument("--model", help="preset name (tiny, klein-4b, klein-9b, dev) or model folder name/path")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if present)")
    p.add_argument("--dtype", choices=list(COMPUTE_DTYPES))
    p.add_argument("--weights", choices=list(WEIGHTS_CHOICES),
                   help="weight precision on the GPU: auto (as the file stores them, the default), bf16 (dequantise "
                        "at load), fp8 / gguf-q8_0 / gguf-q4_k (quantise a bf16 file's block weights at load)")
    p.add_argument("--blocks", help="blocks to load at start: none, all, or ranges like 0-15 (default none: "
                                    "wait for a plan)")
    p.add_argument("--random-weights", action="store_true", default=None,
                   help="build the preset's real-size config with seeded weights on the device (benchmarks)")
    p.add_argument("--seed", type=int, help="seed of --random-weights")
    p.add_argument("--key-file", type=Path, help="cluster key (from meshd keygen)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="no authentication at all (isolated experiments only; loud)")
    p.add_argument("--models-dir", type=Path, action="append", help="model folder (repeatable)")
    p.add_argument("--lora-dir", type=Path, action="append", help="LoRA folder (repeatable)")
    p.add_argument("--comfyui-dir", type=Path, help="a ComfyUI install: its models/ tree, LoRAs and Qwen tokenizer")
    p.add_argument("--distilled", action=argparse.BooleanOptionalAction, default=None,
                   help="klein: step-distilled (4 steps) or --no-distilled for the base model (CFG); default: detected")
    p.add_argument("--state-dir", type=Path, help="node id, caches (default /var/lib/meshd or user state dir)")
    p.add_argument("--name", dest="node_name", help="node name shown to peers (default: hostname)")
    p.add_argument("--emulate-link", help="shape what this daemon sends to other daemons, e.g. 1gbit,0.3ms (benchmarks)")
    p.add_argument("--mdns", action=argparse.BooleanOptionalAction, default=None,
                   help="advertise over mDNS (default on; --no-mdns on boxes without python-zeroconf)")
    p.add_argument("--advertise-address", help="IP to advertise over mDNS (default: the default route's interface)")
    p.add_argument("--interface", dest="interfaces", action="append",
                   help="network interface mDNS advertises on (repeatable; default: the default route's)")
    p.add_argument("--telemetry-interval", type=float, help="seconds between telemetry samples (default 1)")
    p.add_argument("--text-encoder-device", help="where the head encodes prompts, e.g. cpu (default: the model's device)")
    p.add_argument("--text-encoder-idle", choices=["release", "cpu", "keep"],
                   help="after encoding, free the text encoder (release, default), park it in RAM (cpu) or keep it")
    p.add_argument("--compile", choices=["auto", "on", "off"],
                   help="run the blocks through torch.compile (default auto: on CUDA devices, off on the CPU)")
    p.add_argument("--ready-file", type=Path, help="write {host, port, pid, node_id} as JSON here once serving")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshd", description="flux-mesh daemon")
    parser.add_argument("--version", action="version", version=f"meshd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    k = sub.add_parser("keygen", help="make a cluster key file")
    k.add_argument("--out", type=Path, required=True, help="where to write the key (mode 0600)")
    k.add_argument("--force", action="store_true", help="replace an existing key file")

    t = sub.add_parser("telemetry", help="what this box's GPUs and host are doing, once",
                       description="Sample this box's GPUs (NVML) and host (CPU, RAM, network) once, or ask a "
                                   "running daemon for its latest snapshot (which adds its per-peer links).")
    t.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    t.add_argument("--peer", help="HOST:PORT of a daemon to ask instead of sampling here")
    t.add_argument("--key-file", type=Path, help="cluster key for --peer (default: the user's or /etc/meshd's)")
    t.add_argument("--window", type=float, default=1.0, help="seconds over which rates are measured (default 1)")

    c = sub.add_parser("check", help="what this box can do, in plain words",
                       description="GPUs, NVENC/NVDEC (probed), codecs, models, the interfaces mDNS will use, "
                                   "the cluster key and the systemd unit. Exit status 1 if something is wrong.")
    c.add_argument("--config", type=Path, help="TOML config (default /etc/meshd/meshd.toml if it exists)")
    c.add_argument("--instance", type=int, metavar="N", help="check instance N of meshd@.service (its settings)")
    c.add_argument("--json", action="store_true", help="print the findings as JSON")
    c.add_argument("--no-codec-probe", dest="codecs", action="store_false",
                   help="skip the NVENC/NVDEC probe (it imports torch and opens a tiny encoder)")
    c.add_argument("--selftest", action="store_true",
                   help="also encode and decode a [1, 4608, 4096] stream through this box's best HEVC path "
                        "(NVENC or libx265, NVDEC or FFmpeg): ms, bytes, error")
    c.add_argument("--selftest-shape", type=_shape, default=None, help=argparse.SUPPRESS)  # tests: smaller

    u = sub.add_parser("install-unit", help="install the systemd unit, config and key (as root)",
                       description="Write meshd.service (ExecStart pointing at this meshd), an example "
                                   "/etc/meshd/meshd.toml and a cluster key if they are missing, then reload systemd. "
                                   "With --gpus: the template meshd@.service instead, the system user all its "
                                   "instances share (sysusers.d), and one enabled instance per GPU.")
    u.add_argument("--gpus", help="all, or GPU indices like 0,1: one daemon per GPU (meshd@N, port 7777+N)")
    u.add_argument("--root", type=Path, help="install into this root directory instead of / (an image, a test): "
                                             "paths below it, systemctl --root and systemd-sysusers --root")
    u.add_argument("--unit-dir", type=Path, help=f"default {UNIT_DIR}")
    u.add_argument("--config-dir", type=Path, help=f"default {CONFIG_DIR}")
    u.add_argument("--sysusers-dir", type=Path, help=f"default {SYSUSERS_DIR} (with --gpus)")
    u.add_argument("--exec", dest="executable", help="the meshd program ExecStart runs (default: this one)")
    u.add_argument("--print", dest="print_only", action="store_true", help="print the unit, change nothing")
    u.add_argument("--force", action="store_true", help="replace an existing unit file")
    u.add_argument("--no-reload", dest="reload", action="store_false",
                   help="run neither systemctl (daemon-reload, enable) nor systemd-sysusers")

    args = parser.parse_args(argv)
    if args.command == "keygen":
        return _keygen(args)
    if args.command == "telemetry":
        return _telemetry(args)
    if args.command == "check":
        return _check(args)
    if args.command == "install-unit":
        return _install_unit(args)
    return _serve(args)


def _keygen(args) -> int:
    from .auth import fingerprint, generate_key, write_key  # noqa: PLC0415

    key = generate_key()
    try:
        write_key(args.out, key, force=args.force)
    except FileExistsError as exc:
        print(f"meshd keygen: {exc}", file=sys.stderr)
        return 1
    print(f"wrote cluster key {args.out} (fingerprint {fingerprint(key)}); copy it to every box of the cluster")
    return 0


# --- serve -----------------------------------------------------------------------------------------


def _serve(args) -> int:
    from .logs import setup_logging  # noqa: PLC0415
    from .node.lifecycle import StartupError, serve  # noqa: PLC0415 - torch and the model code: serve only
    from .node.sdnotify import Notifier  # noqa: PLC0415

    setup_logging(args.log_level)
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0
    except (StartupError, PermissionError) as exc:
        if isinstance(exc, PermissionError):  # one not foreseen below: still the file and the permission
            from .model.access import explain  # noqa: PLC0415

            exc = StartupError(explain(exc))
        log.error("%s", exc)
        Notifier().status(f"failed to start: {exc}")
        return 2


# --- telemetry -------------------------------------------------------------------------------------


def _telemetry(args) -> int:
    from .telemetry.text import snapshot_lines  # noqa: PLC0415

    try:
        snapshot = asyncio.run(_peer_snapshot(args)) if args.peer else _local_snapshot(args.window)
    except Exception as exc:  # noqa: BLE001 - MeshError, AuthError, PlanError: one line, not a traceback
        print(f"meshd telemetry: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(snapshot.to_dict(), indent=2))
    else:
        print("\n".join(snapshot_lines(snapshot)))
    return 0


def _local_snapshot(window: float):
    from .config import default_state_dir  # noqa: PLC0415
    from .node.nodeid import read_node_id  # noqa: PLC0415
    from .telemetry.sampler import TelemetrySampler  # noqa: PLC0415

    sampler = TelemetrySampler(read_node_id(default_state_dir()) or socket.gethostname()).open()
    try:
        time.sleep(max(0.1, window))  # rates (CPU, bytes/s) are measured over this window
        return sampler.sample()
    finally:
        sampler.stop()


async def _peer_snapshot(args):
    from .auth import read_key  # noqa: PLC0415
    from .config import default_key_file  # noqa: PLC0415
    from .wire.channel import Channel  # noqa: PLC0415
    from .pipeline.plan import PeerAddress  # noqa: PLC0415
    from .telemetry.service import first_snapshot  # noqa: PLC0415

    address = PeerAddress.parse(args.peer)
    key = read_key(args.key_file or default_key_file())
    channel = await Channel.connect(address.host, address.port, key, hello={"node": "meshd telemetry"})
    try:
        return await first_snapshot(channel)
    finally:
        await channel.close()


# --- check -----------------------------------------------------------------------------------------


def _shape(text: str) -> tuple[int, int, int]:
    """``1x4608x4096`` -> (1, 4608, 4096)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not BATCHxTOKENSxCHANNELS")
    return shape


def _check(args) -> int:
    from .check import OK, PROBLEM, Finding, check_instances, exit_status, render, run_checks  # noqa: PLC0415
    from .config import DEFAULT_CONFIG, ConfigError, DaemonConfig, load_config  # noqa: PLC0415

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    head = []
    try:
        config = load_config(args.config, instance=args.instance)
        source = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
        head.append(Finding("config", OK, str(source) if source else f"defaults ({DEFAULT_CONFIG} does not exist)"))
    except ConfigError as exc:
        config = DaemonConfig()
        head.append(Finding("config", PROBLEM, f"{exc}; checking with the defaults"))
    from .check import SELFTEST_SHAPE  # noqa: PLC0415

    shape = (args.selftest_shape or SELFTEST_SHAPE) if args.selftest else None
    findings = head + run_checks(config, codecs=args.codecs, selftest_shape=shape) + list(check_instances(args.config))
    if args.json:
        print(json.dumps([f.to_dict() for f in findings], indent=2))
    else:
        print(render(findings))
    return exit_status(findings)


# --- install-unit ----------------------------------------------------------------------------------


def _shipped(name: str) -> Path:
    """A file of the repository's systemd/ folder (source checkout, or installed under share/)."""
    for folder in (REPO_ROOT / "systemd", Path(sys.prefix) / "share" / "flux-mesh" / "systemd"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"cannot find systemd/{name} of flux-mesh (looked in the source checkout and "
                            f"{sys.prefix}/share/flux-mesh); copy it from the repository by hand")


def meshd_executable() -> str:
    """The meshd program to run: the one next to this Python, else on PATH, else ``python -m meshd``."""
    beside = Path(sys.executable).parent / "meshd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("meshd")
    return str(Path(found).resolve()) if found else f"{sys.executable} -m meshd"


def render_unit(executable: str, template: str | None = None, name: str = UNIT_FILE) -> str:
    """systemd/``name`` (meshd.service or meshd@.service) with ExecStart running ``executable``."""
    text = template if template is not None else _shipped(name).read_text()
    if f"ExecStart={TEMPLATE_EXEC} " not in text:
        raise ValueError(f"the unit template has no 'ExecStart={TEMPLATE_EXEC} ...' line to fill in")
    return text.replace(f"ExecStart={TEMPLATE_EXEC} ", f"ExecStart={executable} ", 1)


def parse_gpus(text: str, nvml=None) -> list[int]:
    """``all`` (every GPU NVML lists, in its PCI bus order) or indices ``0,1``; a ValueError says why not."""
    from .config import MAX_INSTANCE  # noqa: PLC0415

    if text.strip().lower() == "all":
        from .telemetry.nvml import NvmlGpus  # noqa: PLC0415

        gpus = NvmlGpus(nvml).open()
        try:
            found = [g.index for g in gpus.gpus]
        finally:
            gpus.close()
        if not found:
            raise ValueError(f"--gpus all: no NVIDIA GPU found ({gpus.reason or 'NVML lists none'}); "
                             "name them instead, e.g. --gpus 0,1")
        return found
    try:
        found = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--gpus {text!r}: write all, or GPU indices like 0,1") from None
    if len(set(found)) != len(found) or not all(0 <= n <= MAX_INSTANCE for n in found):
        raise ValueError(f"--gpus {text!r}: indices must be distinct, 0-{MAX_INSTANCE}")
    return found


def _under(root: Path | None, given: Path | None, default: Path) -> Path:
    if given is not None:
        return given
    return root / default.relative_to("/") if root is not None else default


def _put(path: Path, text: str, force: bool) -> str:
    """Write a file meshd ships (mode 0644); an existing different one is kept unless ``force``."""
    if path.exists() and path.read_text() == text:
        return f"kept {path} (unchanged)"
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists and differs; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o644)
    return f"wrote {path}"


def _run(command: list[str]) -> str | None:
    """Run a systemd tool; its complaint in one line, or None when it worked."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{command[0]}: {exc}"
    if result.returncode != 0:
        return f"{' '.join(command)} failed: {result.stderr.strip() or result.stdout.strip()}"
    return None


def _activate(args, template: bool, sysusers_dir: Path, instances: list[str]) -> bool | None:
    """Create the shared user, reload systemd and enable the instances, saying what each step did.
    A tool this machine lacks (a container, an image being built) is not run: the commands left for
    the user are printed instead. True if the instances were enabled, None if a step failed."""
    root = [f"--root={args.root}"] if args.root is not None else []
    steps: list[tuple[list[str], str]] = []  # the command, and what it did when it worked
    if template:
        steps.append((["systemd-sysusers", *root, str(sysusers_dir / SYSUSERS_FILE)],
                      f"created the shared system user from {sysusers_dir / SYSUSERS_FILE}"))
    if args.root is None:
        steps.append((["systemctl", "daemon-reload"], "reloaded systemd"))
    if instances:
        steps.append((["systemctl", *root, "enable", *instances], f"enabled {', '.join(instances)}"))
    left: list[list[str]] = []
    enabled = False
    for command, done in steps:
        if not args.reload or shutil.which(command[0]) is None:
            left.append(command)
            continue
        if (problem := _run(command)) is not None:
            print(problem, file=sys.stderr)
            return None
        print(done)
        enabled |= "enable" in command
    if left:
        why = ("--no-reload: not run" if not args.reload else
               f"{' and '.join(dict.fromkeys(c[0] for c in left))} not found on this machine: not run")
        print(f"{why}; run these where systemd's tools are:", file=sys.stderr)
        for command in left:
            print(f"  sudo {shlex.join(command)}", file=sys.stderr)
    return enabled


def _install_unit(args) -> int:
    from .auth import fingerprint, generate_key, read_key, write_key  # noqa: PLC0415
    from .config import CREDENTIAL_NAME  # noqa: PLC0415

    executable = args.executable or meshd_executable()
    try:
        gpus = parse_gpus(args.gpus) if args.gpus else None
        unit = render_unit(executable, name=TEMPLATE_FILE if gpus is not None else UNIT_FILE)
    except (OSError, ValueError) as exc:
        print(f"meshd install-unit: {exc}", file=sys.stderr)
        return 1
    if args.print_only:
        print(unit, end="")
        return 0
    program = Path(executable.split()[0])
    if program.is_relative_to("/home") or program.is_relative_to("/root"):
        print(f"warning: {program} is under /home or /root, which the unit hides (ProtectHome=yes); install "
              "meshd elsewhere (for example python3 -m venv /opt/flux-mesh) or relax ProtectHome in a drop-in",
              file=sys.stderr)
    unit_dir = _under(args.root, args.unit_dir, UNIT_DIR)
    config_dir = _under(args.root, args.config_dir, CONFIG_DIR)
    sysusers_dir = _under(args.root, args.sysusers_dir, SYSUSERS_DIR)
    unit_path = unit_dir / (TEMPLATE_FILE if gpus is not None else UNIT_FILE)
    config_path = config_dir / "meshd.toml"
    key_path = config_dir / CREDENTIAL_NAME
    try:
        print(_put(unit_path, unit, args.force) + f" (ExecStart={executable} serve ...)")
        if gpus is not None:
            print(_put(sysusers_dir / SYSUSERS_FILE, _shipped(SHIPPED_SYSUSERS).read_text(), args.force))
        config_dir.mkdir(parents=True, exist_ok=True)
        if config_path.exists():
            print(f"kept {config_path}")
        else:
            config_path.write_text(_shipped("meshd.toml").read_text())
            config_path.chmod(0o644)
            print(f"wrote {config_path} (every key documented; edit model and blocks)")
        if key_path.exists():
            print(f"kept {key_path} (fingerprint {fingerprint(read_key(key_path))})")
        else:
            key = generate_key()
            write_key(key_path, key)
            print(f"wrote {key_path} (fingerprint {fingerprint(key)}); copy it to every box of the cluster")
    except PermissionError as exc:
        print(f"meshd install-unit: {exc.filename}: permission denied (run it with sudo)", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - AuthError on a bad existing key, OSError: one line
        print(f"meshd install-unit: {exc}", file=sys.stderr)
        return 1
    instances = [f"meshd@{n}.service" for n in gpus or ()]
    if gpus is not None and (unit_dir / UNIT_FILE).exists():
        print(f"note: {unit_dir / UNIT_FILE} is installed too; it and meshd@0 both listen on port 7777 by default: "
              "sudo systemctl disable --now meshd", file=sys.stderr)
    enabled = _activate(args, gpus is not None, sysusers_dir, instances)
    if enabled is None:
        return 1
    if gpus is None:
        print("next: sudo systemctl enable --now meshd; journalctl -u meshd -f; meshd check")
    else:
        names = " ".join(i.removesuffix(".service") for i in instances)
        start = "start" if enabled else "enable --now"
        print(f"next: edit {config_path} (shared) or {config_dir}/meshd@N.toml (one GPU); sudo systemctl {start} "
              f"{names}; journalctl -u 'meshd@*' -f; meshd check")
    return 0
