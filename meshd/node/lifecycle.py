"""A daemon's life, as ``meshd serve`` runs it: settings, device, key, model and span, bind,
telemetry, mDNS, READY=1, serve until SIGTERM/SIGINT, then withdraw the record and drain.

Everything a peer or systemd relies on is in place before READY=1 (bound, span loaded, default size
compiled, advertised); a failure before it is one :class:`StartupError` line naming the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch

from ..auth import AuthError, read_key
from ..config import ConfigError, DaemonConfig, describe_ranges, load_config, parse_blocks
from ..model.access import explain, unwritable_dir
from ..model.compile_events import compiled_event, compiling_event, describe_event, pending_parts
from ..model.compiled import compiler_for
from ..model.files import ModelError, ModelStore
from ..model.runtime import DTYPES, FolderSource, HostedModel, open_source
from ..model.text_encoder import TextEncoderOptions
from ..telemetry.service import serve_telemetry
from .daemon import Daemon
from .discovery import Advertiser, MdnsUnavailable, choose_for, require_zeroconf, txt_record
from .info import ModelInfo
from .nodeid import stable_node_id
from .sdnotify import Notifier

log = logging.getLogger("meshd")

BANNER_INSECURE = """
!!! meshd is running with --insecure: NO AUTHENTICATION. Anyone who can reach this port can run
!!! work on this GPU and read what it computes. Use only on an isolated test machine.
"""

#: The watchdog is withheld once the sampler has been silent for this many of its periods (a hung
#: NVML call or a wedged process), and never sooner than HEALTH_MIN_STALE_S.
HEALTH_STALE_PERIODS = 5
HEALTH_MIN_STALE_S = 10.0
#: The ``meshd serve`` options that override meshd.toml, under the setting's name.
OVERRIDES = ("host", "port", "model", "device", "dtype", "weights", "blocks", "random_weights", "seed", "key_file",
             "insecure", "state_dir", "node_name", "emulate_link", "mdns", "advertise_address", "telemetry_interval",
             "text_encoder_device", "text_encoder_idle", "comfyui_dir", "distilled", "compile")


class StartupError(Exception):
    pass


def settings(args) -> DaemonConfig:
    """meshd.toml (and the instance's drop-in) with the command line's options on top."""
    overrides = {k: getattr(args, k) for k in OVERRIDES}
    # absolute, as written: the stores resolve links themselves, and a ComfyUI models/ linked to another
    # drive is found to be its install's by the path given
    if args.models_dir:
        overrides["models_dir"] = tuple(Path(os.path.abspath(p.expanduser())) for p in args.models_dir)
    if args.lora_dir:
        overrides["lora_dir"] = tuple(Path(os.path.abspath(p.expanduser())) for p in args.lora_dir)
    if args.interfaces:
        overrides["interfaces"] = tuple(args.interfaces)
    try:
        return load_config(args.config, overrides, instance=args.instance)
    except ConfigError as exc:
        raise StartupError(f"configuration: {exc}") from None


def cluster_key(config: DaemonConfig) -> bytes | None:
    if config.insecure:
        print(BANNER_INSECURE, file=sys.stderr)
        log.warning("authentication is OFF (--insecure)")
        return None
    try:
        return read_key(config.key_file)
    except AuthError as exc:
        raise StartupError(str(exc)) from None


def device_of(config: DaemonConfig) -> torch.device:
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StartupError(f"device {name} asked for, but torch sees no CUDA GPU")
        device = torch.device("cuda", device.index if device.index is not None else 0)
    return device


def open_model(config: DaemonConfig, device: torch.device, notifier: Notifier) -> HostedModel:
    """The model this daemon serves, with its configured span loaded and compiled for the default size."""
    try:
        store = ModelStore(config.models_dir, config.cache_dir, config.comfyui_dir, config.lora_dir)
        source = open_source(config.model, store, random_weights=config.random_weights, seed=config.seed,
                             distilled=config.distilled)
        text_encoder = TextEncoderOptions(device=config.text_encoder_device or None, idle=config.text_encoder_idle,
                                          cache_bytes=config.prompt_cache_mib << 20)
        compiler, compile_why = compiler_for(config.compile, device, config.state_dir, source.model_id)
        model = HostedModel(source, device, DTYPES[config.dtype], text_encoder, weights=config.weights,
                            compiler=compiler)
        blocks = parse_blocks(config.blocks, model.preset.num_blocks)
    except (ModelError, ConfigError, KeyError, ValueError, RuntimeError) as exc:  # RuntimeError: a bad device name
        raise StartupError(f"model: {exc}") from None
    if blocks:
        log.info("loading blocks %s of %s", config.blocks, ModelInfo.of(model.identity).describe())
        notifier.status(f"loading blocks {config.blocks} of {model.identity.model_id}")
        try:
            with torch.inference_mode():
                model.load(blocks, 0 in blocks, model.preset.num_blocks - 1 in blocks)
        except ModelError as exc:
            raise StartupError(f"model: {exc}") from None
    if isinstance(source, FolderSource):
        # A plan may make this daemon the head (or place prompt encoding here): say now what would fail.
        try:
            source.check_head_files()
        except ModelError as exc:
            log.warning("as a plan's head this daemon would fail: %s", exc)
    log.info("compiled blocks: %s", compile_why)
    if blocks and compiler is not None:
        _warm_default(model, notifier)
    return model


async def serve(args) -> int:
    """``meshd serve``: start, serve until told to stop, drain; 0 on a clean stop."""
    config = settings(args)
    notifier = Notifier()
    notifier.status("starting")
    _check_writable(config.state_dir, "state_dir", "node id and caches")
    if args.ready_file:
        _check_writable(args.ready_file.parent, "--ready-file", "the ready file")
    key = cluster_key(config)
    model = open_model(config, device_of(config), notifier)
    daemon = Daemon(config, model, key, node_id=stable_node_id(config.state_dir))
    await _run(daemon, notifier, args.ready_file)
    log.info("stopped")
    return 0


async def _run(daemon: Daemon, notifier: Notifier, ready_file: Path | None) -> None:
    config, model = daemon.config, daemon.model
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
        if ready_file:
            _write_ready(ready_file, {"host": host, "port": port, "pid": os.getpid(), "node_id": daemon.node_id})
        # Bound, span loaded, advertised: only now may peers and systemd rely on us.
        notifier.ready(status.line())
        log.info("serving %s on %s:%s (%s)", ModelInfo.of(model.identity).describe(), host, port, mdns_state)
        watchdog = asyncio.ensure_future(notifier.keep_alive(_health(telemetry.sampler, time.monotonic())))
        cleanup.callback(watchdog.cancel)
        await stop.wait()
        notifier.stopping("draining requests")
        log.info("stopping: withdrawing the mDNS record, draining requests")


def _write_ready(path: Path, fields: dict) -> None:
    """The ready file, replaced atomically (a reader never sees half of it)."""
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(fields))
        os.replace(tmp, path)
    except OSError as exc:
        raise StartupError(f"--ready-file: {explain(exc)}") from None


def _check_writable(folder: Path, what: str, holds: str) -> None:
    """A StartupError naming the folder and the permission when ``folder`` cannot be made or written."""
    problem = unwritable_dir(folder)
    if problem is not None:
        raise StartupError(f"{what} ({holds}): {problem}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"{what} ({holds}): {folder}: {exc.strerror or exc}") from None


def _warm_default(model, notifier) -> None:
    """Compile the loaded blocks for the model's default size before serving, so that size never waits."""
    side = model.preset.default_size
    txt_len, img_tokens, decode_hw = model.default_geometry()
    pending = model.compile_pending(txt_len, img_tokens, decode_hw=decode_hw)
    if not pending:
        return
    estimate, cached = model.compiler.estimate(pending)
    line = describe_event(compiling_event("", *pending_parts(model.blocks, pending), f"{side}x{side}", txt_len + img_tokens,
                                          cached, estimate))
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
        d = self.daemon
        gpus = len(self.sampler.inventory())
        return (f"serving blocks {describe_ranges(d.model.blocks)} of {d.model.identity.model_id} on {d.device}; "
                f"{gpus} GPU{'s' if gpus != 1 else ''}; {self.mdns_state}")


def _on_span_change(daemon, sampler, advertiser, notifier, status: _Status):
    """When the hosted blocks change: new TXT hints (re-announced) and a new STATUS line."""
    tasks: set[asyncio.Task] = set()

    async def update_txt() -> None:
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
