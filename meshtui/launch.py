"""Opening the dashboard: ``meshtui`` on configured or given peers, ``meshtui demo`` on two local daemons.

An entry point: it imports the app, the app never imports it. ``run_demo_app`` first starts two
``tiny`` daemons on loopback and applies a split, so the user lands one key away from a run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from meshd.auth import AuthError, read_key
from meshd.config import default_key_file, default_models_dir
from meshd.node.discovery import PeersFileError, load_peers_file
from meshd.pipeline.plan import PeerAddress, PlanError

from .app import MeshApp
from .config import ConfigError, TuiConfig, default_config_path, load_config
from .local import LocalCluster
from .widgets.image_view import detect_image_mode


def _key(key_file: Path | None) -> tuple[bytes | None, str | None]:
    path = key_file or default_key_file()
    try:
        return read_key(path), None
    except (AuthError, OSError) as exc:
        return None, (f"No usable cluster key ({exc}). Daemons will refuse us: copy their key to {path} "
                      "or start meshtui with --key-file.")


def run_app(args: argparse.Namespace) -> int:
    """``meshtui`` with no subcommand: the dashboard on configured peers, plus any ``--peer``."""
    path = getattr(args, "config", None) or default_config_path()
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"meshtui: {exc}", file=sys.stderr)
        return 2
    key_file = getattr(args, "key_file", None) or config.key_file
    key, note = _key(key_file)
    try:
        peers = [PeerAddress.parse(p) for p in getattr(args, "peer", None) or ()]
        # The peers file that ``meshtui peers`` and the daemons read counts as manual peers too.
        peers += load_peers_file(getattr(args, "peers_file", None))
    except (PlanError, PeersFileError) as exc:
        print(f"meshtui: {exc}", file=sys.stderr)
        return 2
    app = MeshApp(config, path, key=key, key_note=note, peers=peers, image_mode=detect_image_mode(config.image_mode))
    app.run()
    return app.return_code or 0


def run_demo_app(given: dict) -> int:
    """``meshtui demo``: two ``tiny`` daemons on loopback (started and stopped here) and the dashboard.

    ``given`` holds the generation flags the user actually gave; they override the remembered settings."""
    path = default_config_path()
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"meshtui: {exc} (the demo runs with default settings)", file=sys.stderr)
        config, path = TuiConfig(), None
    settings = config.generate
    for name in ("prompt", "seed", "steps", "guidance", "codec"):
        if name in given:
            settings = replace(settings, **{name: given[name]})
    if "size" in given:
        settings = replace(settings, width=given["size"][0], height=given["size"][1])
    # The demo's peers are its own loopback daemons: the user's remembered peers stay out of it.
    session = replace(config, peers=(), generate=settings, discovery=False)
    cluster = LocalCluster(models_dir=default_models_dir(), common_args=["--model", "tiny", "--device", "cpu"])
    cluster.add("demo-a")
    cluster.add("demo-b")
    try:
        app = MeshApp(session, path, key=read_key(cluster.key_file), demo=cluster, stored=config,
                      image_mode=detect_image_mode(config.image_mode))
        app.run()
        return app.return_code or 0
    finally:
        cluster.stop()
