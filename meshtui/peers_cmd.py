"""``meshtui peers``: the daemons this machine can find, each verified, with its latest telemetry.

Peers come from mDNS (browsed for a few seconds) and by hand (``--peer`` and the peers file). Every
one is checked over an authenticated connection (:func:`meshd.node.discovery.verify`); a peer found
under two addresses (a host name by hand, an IP on mDNS) is listed once, by node id.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from meshd.auth import AuthError, read_key
from meshd.config import default_key_file
from meshd.pipeline.blocks import blocks_shown
from meshd.errors import MeshError
from meshd.telemetry.snapshot import NodeSnapshot
from meshd.telemetry.text import snapshot_lines

#: How long ``meshtui peers`` listens for mDNS answers by default.
DEFAULT_BROWSE_S = 3.0


def add_peers_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("peers", help="list the daemons found (mDNS and by hand), verified, with telemetry",
                       description="Find meshd daemons on mDNS and in the peers file, verify each with the cluster "
                                   "key, and print them with their latest telemetry snapshot.")
    p.add_argument("--peer", action="append", default=[], help="HOST:PORT of a daemon (repeatable)")
    p.add_argument("--peers-file", type=Path,
                   help="one host:port per line, '#' comments (default: ~/.config/flux-mesh/peers)")
    p.add_argument("--key-file", type=Path, help="cluster key (default: the user's flux-mesh key)")
    p.add_argument("--browse", type=float, default=DEFAULT_BROWSE_S, metavar="SECONDS",
                   help=f"how long to listen for mDNS (default {DEFAULT_BROWSE_S:g}; 0: no mDNS)")
    p.add_argument("--json", action="store_true", help="print the peers as JSON")
    return p


@dataclass
class PeerReport:
    """One daemon as ``meshtui peers`` shows it."""

    address: str
    sources: list[str]
    name: str
    node_id: str | None = None
    verified: bool = False
    error: str | None = None
    txt: dict[str, str] | None = None
    info: dict = field(default_factory=dict)  # the daemon's own map, printed by --json as it sent it
    node: object = None  # meshd.node.info.NodeInfo of a verified peer (the info, parsed)
    telemetry: object = None  # meshd.telemetry.snapshot.NodeSnapshot

    def to_dict(self) -> dict:
        info = self.info
        return {
            "name": self.name,
            "address": self.address,
            "sources": self.sources,
            "node_id": self.node_id,
            "verified": self.verified,
            "error": self.error,
            "txt": self.txt,
            "version": info.get("version"),
            "model": info.get("model"),
            "blocks": info.get("blocks"),
            "device": info.get("device"),
            "telemetry": self.telemetry.to_dict() if self.telemetry is not None else None,
        }


async def find_peers(key: bytes | None, manual: list, browse_s: float, *,
                     key_problem: str | None = None) -> list[PeerReport]:
    """Browse mDNS for ``browse_s`` seconds, add the ``manual`` addresses, verify every one."""
    # meshd.node.discovery loads torch (through meshd.pipeline.plan): ``meshtui`` imports this module for its parser.
    from meshd.node.discovery import MdnsUnavailable, browse, verify  # noqa: PLC0415
    from meshd.node.info import NodeInfo  # noqa: PLC0415 - loads torch (through codec) as well

    # By address; the target is what verify() checks: an mDNS record (its node id and key fingerprint
    # too) where there is one, else the bare address.
    candidates: dict[str, tuple[object, PeerReport]] = {}
    for address in manual:
        candidates[str(address)] = (address, PeerReport(str(address), ["manual"], str(address)))
    found = []
    if browse_s > 0:
        try:
            found = await browse(browse_s)
        except MdnsUnavailable as exc:
            print(f"meshtui peers: {exc}", file=sys.stderr)
    for peer in found:
        where = str(peer.address)
        _, report = candidates.get(where) or (None, PeerReport(where, [], peer.name))
        report.sources.append("mdns")
        report.txt, report.node_id = dict(peer.txt), peer.node_id
        candidates[where] = (peer, report)

    async def check(target, report: PeerReport) -> None:
        if key_problem is not None:
            report.error = f"not verified: {key_problem}"
            return
        try:
            info = await verify(target, key)
        except MeshError as exc:
            report.error = str(exc)
            return
        report.verified, report.info, report.node = True, info, NodeInfo.from_wire(info)
        report.node_id = report.node.node_id or report.node_id
        report.name = report.node.name or report.name
        try:
            report.telemetry = NodeSnapshot.from_dict(info["telemetry"]) if info.get("telemetry") else None
        except (ValueError, TypeError) as exc:
            report.error = f"bad telemetry from the peer: {exc}"

    await asyncio.gather(*(check(target, report) for target, report in candidates.values()))
    merged: dict[str, PeerReport] = {}
    out: list[PeerReport] = []
    for _, report in candidates.values():
        same = merged.get(report.node_id) if report.verified and report.node_id else None
        if same is not None:
            same.sources = sorted(set(same.sources) | set(report.sources))
            same.txt = same.txt or report.txt
            continue
        if report.verified and report.node_id:
            merged[report.node_id] = report
        out.append(report)
    return out


def _lines(report: PeerReport) -> list[str]:
    head = f"{report.name}  {report.address}  ({'+'.join(report.sources)})"
    if not report.verified:
        return [f"{head}  NOT VERIFIED: {report.error}"]
    node = report.node
    lines = [f"{head}  verified, node {report.node_id}, {node.model.model_id or '?'}, "
             f"blocks {blocks_shown(node.blocks)}, {node.device or '?'}"]
    if report.telemetry is not None:
        lines += ["    " + line for line in snapshot_lines(report.telemetry)[1:]]
    return lines


def peers_command(args) -> int:
    # These load torch (through meshd.pipeline.plan): only this command pays for it.
    from meshd.node.discovery import PeersFileError, load_peers_file  # noqa: PLC0415
    from meshd.pipeline.plan import PeerAddress, PlanError  # noqa: PLC0415

    try:
        manual = [PeerAddress.parse(text) for text in args.peer] + load_peers_file(args.peers_file)
    except (PlanError, PeersFileError) as exc:
        print(f"meshtui peers: {exc}", file=sys.stderr)
        return 2
    key, key_problem = None, None
    try:
        key = read_key(args.key_file or default_key_file())
    except AuthError as exc:
        key_problem = str(exc)
    reports = asyncio.run(find_peers(key, list(dict.fromkeys(manual)), args.browse, key_problem=key_problem))
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    elif not reports:
        print("no peers found (none on mDNS; add host:port lines to the peers file or pass --peer)")
    else:
        for report in reports:
            print("\n".join(_lines(report)))
    return 0
