"""The ``meshd`` command: ``serve``, ``keygen``, ``telemetry``, ``check``, ``install-unit``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import __version__

log = logging.getLogger("meshd")

BANNER_INSECURE = """
!!! meshd is running with --insecure: NO AUTHENTICATION. Anyone who can reach this port can run
!!! work on this GPU and read what it computes. Use only on an isolated test machine.
"""

#: The watchdog is withheld once the sampler has been silent for this many of its periods (a hung
#: NVML call or a wedged process), and never sooner than HEALTH_MIN_STALE_S.
HEALTH_STALE_PERIODS = 5
HEALTH_MIN_STALE_S = 10.0
#: Where ``install-unit`` puts things by default.
UNIT_DIR = Path("/etc/systemd/system")
CONFIG_DIR = Path("/etc/meshd")
#: The path ExecStart= names in systemd/meshd.service; install-unit replaces it with the real one.
TEMPLATE_EXEC = "/usr/local/bin/meshd"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the daemon", description="Host a span of FLUX.2 blocks and serve "
                       "authenticated requests. Flags override the config file.")
    p.add_argument("--config", type=Path, help="TOML config (default /etc/meshd/meshd.toml if it exists)")
    p.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="TCP port (default 7777; 0 picks a free one)")
    p.add_argument("--model", help="preset name (tiny, klein-4b, klein-9b, dev) or model folder name/path")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if present)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
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
    c.add_argument("--json", action="store_true", help="print the findings as JSON")
    c.add_argument("--no-codec-probe", dest="codecs", action="store_false",
                   help="skip the NVENC/NVDEC probe (it imports torch and opens a tiny encoder)")

    u = sub.add_parser("install-unit", help="install the systemd unit, config and key (as root)",
                       description="Write meshd.service (ExecStart pointing at this meshd), an example "
                                   "/etc/meshd/meshd.toml and a cluster key if they are missing, then reload systemd.")
    u.add_argument("--unit-dir", type=Path, default=UNIT_DIR, help=f"default {UNIT_DIR}")
    u.add_argument("--config-dir", type=Path, default=CONFIG_DIR, help=f"default {CONFIG_DIR}")
    u.add_argument("--exec", dest="executable", help="the meshd program ExecStart runs (default: this one)")
    u.add_argument("--print", dest="print_only", action="store_true", help="print the unit, change nothing")
    u.add_argument("--force", action="store_true", help="replace an existing unit file")
    u.add_argument("--no-reload", dest="reload", action="store_false", help="do not run systemctl daemon-reload")

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

    setup_logging(args.log_level)
    try:
        return asyncio.run(_serve_async(args))
    except KeyboardInterrupt:
        return 0
    except StartupError as exc:
        log.error("%s", exc)
        from .sdnotify import Notifier  # noqa: PLC0415

        Notifier().status(f"failed to start: {exc}")
        return 2


class StartupError(Exception):
    pass


async def _serve_async(args) -> int:
    import torch  # noqa: PLC0415

    from .auth import AuthError, read_key  # noqa: PLC0415
    from .config import ConfigError, load_config, parse_blocks  # noqa: PLC0415
    from .model.files import ModelError, ModelStore  # noqa: PLC0415
    from .model.compiled import compiler_for  # noqa: PLC0415
    from .model.runtime import DTYPES, HostedModel, open_source  # noqa: PLC0415
    from .model.text_encoder import TextEncoderOptions  # noqa: PLC0415
    from .nodeid import stable_node_id  # noqa: PLC0415
    from .sdnotify import Notifier  # noqa: PLC0415
    from .server import Daemon  # noqa: PLC0415
    from .telemetry import serve_telemetry  # noqa: PLC0415

    overrides = {k: getattr(args, k) for k in ("host", "port", "model", "device", "dtype", "blocks", "random_weights",
                                               "seed", "key_file", "insecure", "state_dir", "node_name",
                                               "emulate_link", "mdns", "advertise_address", "telemetry_interval",
                                               "text_encoder_device", "text_encoder_idle", "compile")}
    if args.models_dir:
        overrides["models_dir"] = tuple(p.expanduser().resolve() for p in args.models_dir)
    if args.lora_dir:
        overrides["lora_dir"] = tuple(p.expanduser().resolve() for p in args.lora_dir)
    if args.interfaces:
        overrides["interfaces"] = tuple(args.interfaces)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        raise StartupError(f"configuration: {exc}") from None
    notifier = Notifier()
    notifier.status("starting")
    if config.insecure:
        print(BANNER_INSECURE, file=sys.stderr)
        log.warning("authentication is OFF (--insecure)")
        key = None
    else:
        try:
            key = read_key(config.key_file)
        except AuthError as exc:
            raise StartupError(str(exc)) from None
    device_name = config.device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StartupError(f"device {device_name} asked for, but torch sees no CUDA GPU")
        device = torch.device("cuda", device.index if device.index is not None else 0)
    store = ModelStore(config.models_dir, config.cache_dir)
    try:
        source = open_source(config.model, store, random_weights=config.random_weights, seed=config.seed)
        text_encoder = TextEncoderOptions(device=config.text_encoder_device or None, idle=config.text_encoder_idle,
                                          cache_bytes=config.prompt_cache_mib << 20)
        compiler, compile_why = compiler_for(config.compile, device, config.state_dir, source.model_id)
        model = HostedModel(source, device, DTYPES[config.dtype], text_encoder, compiler)
        blocks = parse_blocks(config.blocks, model.preset.num_blocks)
    except (ModelError, ConfigError, KeyError, ValueError, RuntimeError) as exc:  # RuntimeError: a bad device name
        raise StartupError(f"model: {exc}") from None
    if blocks:
        log.info("loading blocks %s of %s", config.blocks, model.identity.describe())
        notifier.status(f"loading blocks {config.blocks} of {model.identity.model_id}")
        with torch.inference_mode():
            model.load(blocks, 0 in blocks, model.preset.num_blocks - 1 in blocks)
    log.info("compiled blocks: %s", compile_why)
    if blocks and compiler is not None:
        _warm_default(model, notifier)
    daemon = Daemon(config, model, key, node_id=stable_node_id(config.state_dir))
    # Clean-up runs in reverse: withdraw the mDNS record first (peers stop routing work here), end the
    # telemetry subscriptions (so draining does not wait on them), then drain and close the daemon.
    async with contextlib.AsyncExitStack() as cleanup:
        try:
            host, port = await daemon.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
        cleanup.push_async_callback(daemon.stop)
        telemetry = serve_telemetry(daemon)
        cleanup.push_async_callback(telemetry.close)
        advertiser, mdns_state = await _advertise(daemon, telemetry.sampler, config, port)
        if advertiser is not None:
            cleanup.push_async_callback(advertiser.close)
        status = _Status(daemon, telemetry.sampler, mdns_state)
        daemon.on_change.append(_on_span_change(daemon, telemetry.sampler, advertiser, notifier, status))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if args.ready_file:
            tmp = args.ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"host": host, "port": port, "pid": os.getpid(), "node_id": daemon.node_id}))
            os.replace(tmp, args.ready_file)
        # Bound, span loaded, advertised: only now may peers and systemd rely on us.
        notifier.ready(status.line())
        log.info("serving %s on %s:%s (%s)", model.identity.describe(), host, port, mdns_state)
        watchdog = asyncio.ensure_future(notifier.keep_alive(_health(telemetry.sampler, time.monotonic())))
        cleanup.callback(watchdog.cancel)
        await stop.wait()
        notifier.stopping("draining requests")
        log.info("stopping: withdrawing the mDNS record, draining requests")
    log.info("stopped")
    return 0


def _warm_default(model, notifier) -> None:
    """Compile the loaded blocks for the model's default size before serving, so that size never waits."""
    import torch  # noqa: PLC0415

    from .config import describe_ranges  # noqa: PLC0415
    from .model.compile_events import compiled_event, compiling_event, describe_event  # noqa: PLC0415

    side = model.preset.default_size
    pending = model.compile_pending(model.preset.max_sequence_length, (side // model.preset.size_multiple) ** 2)
    if not pending:
        return
    estimate, cached = model.compiler.estimate(pending)
    tokens = model.preset.max_sequence_length + (side // model.preset.size_multiple) ** 2
    line = describe_event(compiling_event("", describe_ranges(model.blocks), f"{side}x{side}", tokens, cached, estimate))
    log.info("%s", line)
    notifier.status(line)
    device = torch.cuda.device(model.device) if model.device.type == "cuda" else contextlib.nullcontext()
    try:
        with torch.inference_mode(), device:
            seconds = model.warm_default()
    except Exception as exc:  # noqa: BLE001 - inductor's failures: say which setting avoids them
        log.debug("compile failed", exc_info=True)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise StartupError(f"compiling the blocks failed: {type(exc).__name__}: {first} (compile = false, or "
                           "--compile off, runs them eagerly)") from None
    log.info("%s", describe_event(compiled_event("", seconds)))


async def _advertise(daemon, sampler, config, port: int):
    """Register the mDNS record; returns (advertiser or None, its state in words)."""
    if not config.mdns:
        return None, "mDNS off"
    from .discovery import Advertiser, MdnsUnavailable, choose_for, require_zeroconf, txt_record  # noqa: PLC0415

    try:
        require_zeroconf()
        choice = choose_for(config)
    except (MdnsUnavailable, ValueError) as exc:
        raise StartupError(f"mDNS: {exc}") from None
    if not choice.advertise:
        log.warning("mDNS: not advertising: %s; peers must add %s:%d by hand", choice.reason, daemon.name, port)
        return None, f"mDNS off ({choice.reason})"
    advertiser = Advertiser(choice, port, daemon.name, daemon.node_id)
    try:
        name = await advertiser.register(txt_record(daemon.node_info(), sampler.inventory()))
    except Exception as exc:  # noqa: BLE001 - serve anyway: manual peers still work
        log.error("mDNS: could not advertise on %s (%s); peers must add this box by hand (%s:%d)",
                  ", ".join(choice.send_on), exc, choice.advertise[0], port)
        return None, f"mDNS failed: {exc}"
    return advertiser, f"mDNS {name.split('.')[0]}"


class _Status:
    """The one-line STATUS= systemd shows."""

    def __init__(self, daemon, sampler, mdns_state: str) -> None:
        self.daemon, self.sampler, self.mdns_state = daemon, sampler, mdns_state

    def line(self) -> str:
        from .config import describe_ranges  # noqa: PLC0415

        d = self.daemon
        gpus = len(self.sampler.inventory())
        return (f"serving blocks {describe_ranges(d.model.blocks)} of {d.model.identity.model_id} on {d.device}; "
                f"{gpus} GPU{'s' if gpus != 1 else ''}; {self.mdns_state}")


def _on_span_change(daemon, sampler, advertiser, notifier, status: _Status):
    """When the hosted blocks change: new TXT hints (re-announced) and a new STATUS line."""
    tasks: set[asyncio.Task] = set()

    async def update_txt() -> None:
        from .discovery import txt_record  # noqa: PLC0415

        try:
            await advertiser.update(txt_record(daemon.node_info(), sampler.inventory()))
        except Exception as exc:  # noqa: BLE001
            log.warning("mDNS: could not update the record: %s", exc)

    def changed() -> None:
        notifier.status(status.line())
        if advertiser is not None:
            task = asyncio.ensure_future(update_txt())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    return changed


def _health(sampler, started: float):
    """The watchdog's health check: the telemetry thread still samples (so NVML answers)."""
    limit = max(HEALTH_STALE_PERIODS * sampler.interval, HEALTH_MIN_STALE_S)

    def check() -> str | None:
        age = sampler.age()
        if age is None:
            return None if time.monotonic() - started < limit else "telemetry has produced no sample"
        if age > limit:
            return f"telemetry sampler silent for {age:.0f} s (a hung NVML call?)"
        return None

    return check


# --- telemetry -------------------------------------------------------------------------------------


def _telemetry(args) -> int:
    from .telemetry import snapshot_lines  # noqa: PLC0415

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
    from .nodeid import read_node_id  # noqa: PLC0415
    from .telemetry import TelemetrySampler  # noqa: PLC0415

    sampler = TelemetrySampler(read_node_id(default_state_dir()) or socket.gethostname()).open()
    try:
        time.sleep(max(0.1, window))  # rates (CPU, bytes/s) are measured over this window
        return sampler.sample()
    finally:
        sampler.stop()


async def _peer_snapshot(args):
    from .auth import read_key  # noqa: PLC0415
    from .config import default_key_file  # noqa: PLC0415
    from .connection import Channel  # noqa: PLC0415
    from .plan import PeerAddress  # noqa: PLC0415
    from .telemetry import first_snapshot  # noqa: PLC0415

    address = PeerAddress.parse(args.peer)
    key = read_key(args.key_file or default_key_file())
    channel = await Channel.connect(address.host, address.port, key, hello={"node": "meshd telemetry"})
    try:
        return await first_snapshot(channel)
    finally:
        await channel.close()


# --- check -----------------------------------------------------------------------------------------


def _check(args) -> int:
    from .check import OK, PROBLEM, Finding, exit_status, render, run_checks  # noqa: PLC0415
    from .config import DEFAULT_CONFIG, ConfigError, DaemonConfig, load_config  # noqa: PLC0415

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    head = []
    try:
        config = load_config(args.config)
        source = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
        head.append(Finding("config", OK, str(source) if source else f"defaults ({DEFAULT_CONFIG} does not exist)"))
    except ConfigError as exc:
        config = DaemonConfig()
        head.append(Finding("config", PROBLEM, f"{exc}; checking with the defaults"))
    findings = head + run_checks(config, codecs=args.codecs)
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


def render_unit(executable: str, template: str | None = None) -> str:
    """systemd/meshd.service with ExecStart running ``executable``."""
    text = template if template is not None else _shipped("meshd.service").read_text()
    if f"ExecStart={TEMPLATE_EXEC} " not in text:
        raise ValueError(f"the unit template has no 'ExecStart={TEMPLATE_EXEC} ...' line to fill in")
    return text.replace(f"ExecStart={TEMPLATE_EXEC} ", f"ExecStart={executable} ", 1)


def _install_unit(args) -> int:
    from .auth import fingerprint, generate_key, read_key, write_key  # noqa: PLC0415
    from .config import CREDENTIAL_NAME  # noqa: PLC0415

    executable = args.executable or meshd_executable()
    try:
        unit = render_unit(executable)
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
    unit_path = args.unit_dir / "meshd.service"
    config_path = args.config_dir / "meshd.toml"
    key_path = args.config_dir / CREDENTIAL_NAME
    try:
        if unit_path.exists() and not args.force and unit_path.read_text() != unit:
            print(f"meshd install-unit: {unit_path} exists and differs; pass --force to replace it", file=sys.stderr)
            return 1
        args.unit_dir.mkdir(parents=True, exist_ok=True)
        unit_path.write_text(unit)
        unit_path.chmod(0o644)
        print(f"wrote {unit_path} (ExecStart={executable} serve ...)")
        args.config_dir.mkdir(parents=True, exist_ok=True)
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
    if args.reload and shutil.which("systemctl"):
        result = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True)
        if result.returncode != 0:
            print(f"systemctl daemon-reload failed: {result.stderr.strip()}", file=sys.stderr)
            return 1
    print("next: sudo systemctl enable --now meshd; journalctl -u meshd -f; meshd check")
    return 0
