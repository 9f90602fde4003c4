"""The ``meshd`` command: ``serve``, ``keygen``, ``check``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from . import __version__

log = logging.getLogger("meshd")

BANNER_INSECURE = """
!!! meshd is running with --insecure: NO AUTHENTICATION. Anyone who can reach this port can run
!!! work on this GPU and read what it computes. Use only on an isolated test machine.
"""


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
    p.add_argument("--state-dir", type=Path, help="node id, caches (default /var/lib/meshd or user state dir)")
    p.add_argument("--name", dest="node_name", help="node name shown to peers (default: hostname)")
    p.add_argument("--emulate-link", help="shape what this daemon sends, e.g. 1gbit,0.3ms (benchmarks)")
    p.add_argument("--no-mdns", dest="mdns", action="store_false", default=None, help="do not advertise over mDNS")
    p.add_argument("--advertise-address", help="address to advertise over mDNS")
    p.add_argument("--ready-file", type=Path, help="write {host, port, pid} as JSON here once serving")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshd", description="flux-mesh daemon")
    parser.add_argument("--version", action="version", version=f"meshd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    k = sub.add_parser("keygen", help="make a cluster key file")
    k.add_argument("--out", type=Path, required=True, help="where to write the key (mode 0600)")
    k.add_argument("--force", action="store_true", help="replace an existing key file")
    args = parser.parse_args(argv)
    if args.command == "keygen":
        return _keygen(args)
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


def _serve(args) -> int:
    from .logs import setup_logging  # noqa: PLC0415

    setup_logging(args.log_level)
    try:
        return asyncio.run(_serve_async(args))
    except KeyboardInterrupt:
        return 0
    except StartupError as exc:
        log.error("%s", exc)
        return 2


class StartupError(Exception):
    pass


async def _serve_async(args) -> int:
    import torch  # noqa: PLC0415

    from .auth import AuthError, read_key  # noqa: PLC0415
    from .config import ConfigError, load_config, parse_blocks  # noqa: PLC0415
    from .model.files import ModelError, ModelStore  # noqa: PLC0415
    from .model.runtime import DTYPES, HostedModel, open_source  # noqa: PLC0415
    from .server import Daemon, node_id_file  # noqa: PLC0415

    overrides = {k: getattr(args, k) for k in ("host", "port", "model", "device", "dtype", "blocks", "random_weights",
                                               "seed", "key_file", "insecure", "state_dir", "node_name",
                                               "emulate_link", "mdns", "advertise_address")}
    if args.models_dir:
        overrides["models_dir"] = tuple(p.expanduser().resolve() for p in args.models_dir)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        raise StartupError(f"configuration: {exc}") from None
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
        model = HostedModel(source, device, DTYPES[config.dtype])
        blocks = parse_blocks(config.blocks, model.preset.num_blocks)
    except (ModelError, ConfigError, KeyError) as exc:
        raise StartupError(f"model: {exc}") from None
    if blocks:
        log.info("loading blocks %s of %s", config.blocks, model.identity.describe())
        with torch.inference_mode():
            model.load(blocks, 0 in blocks, model.preset.num_blocks - 1 in blocks)
    daemon = Daemon(config, model, key, node_id=node_id_file(config.state_dir))
    host, port = await daemon.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.ready_file:
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"host": host, "port": port, "pid": os.getpid(), "node_id": daemon.node_id}))
        os.replace(tmp, args.ready_file)
    log.info("serving %s on %s:%s", model.identity.describe(), host, port)
    await stop.wait()
    log.info("stopping: draining requests")
    await daemon.stop()
    log.info("stopped")
    return 0
