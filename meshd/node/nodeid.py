"""A stable id for this box's meshd, kept in its state directory.

Peers, the dashboard and mDNS records name a daemon by this id, so it must survive restarts and
upgrades, yet two boxes must never share one. A state directory copied to another machine (a
cloned disk, an rsync of /var/lib/meshd, a container image with state baked in) would carry the
old id along; so the file also records an app-specific digest of the machine id, and a mismatch
gives this box a fresh id (with a warning) instead of impersonating the original.

File format (``<state_dir>/node-id``), one line after comments: ``<16 hex digits> <machine digest>``.
A bare id (the format before machine digests) is adopted and stamped.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

NODE_ID_FILE = "node-id"
NODE_ID_LENGTH = 16
#: Where systemd and D-Bus keep the machine id (machine-id(5)).
MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
_HEX = frozenset("0123456789abcdef")
_HEADER = "# flux-mesh node id of this box, and a digest of the machine it belongs to. Delete to get a new id.\n"


def host_key(host_id: str) -> str:
    """The box a daemon runs on, as mDNS and the dashboard show it: a digest of its host id (the machine
    boot that decides whether CUDA IPC can work, see meshd.wire.ipc.host_id), equal for every daemon of one
    box (one per GPU) and different on every other. The boot id itself stays on authenticated channels."""
    if not host_id:
        return ""
    return hashlib.sha256(b"flux-mesh host\0" + host_id.encode()).hexdigest()[:NODE_ID_LENGTH]


def is_node_id(value: str) -> bool:
    return len(value) == NODE_ID_LENGTH and set(value) <= _HEX


def machine_digest(machine_id_files: tuple[Path, ...] = MACHINE_ID_FILES) -> str:
    """A digest of this machine's id (never the id itself: machine-id(5) asks apps not to expose it).

    Falls back to the host name where there is no machine id (minimal containers).
    """
    source = ""
    for path in machine_id_files:
        with contextlib.suppress(OSError):
            source = path.read_text().strip()
        if source:
            break
    source = source or "hostname:" + socket.gethostname()
    return hashlib.sha256(b"flux-mesh node id\0" + source.encode()).hexdigest()[:NODE_ID_LENGTH]


def _read(path: Path) -> tuple[str, str | None] | None:
    """(id, machine digest or None for the old bare format), or None if absent or unreadable."""
    try:
        lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError:
        return None
    if len(lines) != 1 or not 1 <= len(lines[0]) <= 2 or not is_node_id(lines[0][0]):
        log.warning("ignoring malformed node id file %s", path)
        return None
    return lines[0][0], (lines[0][1] if len(lines[0]) == 2 else None)


def _write(path: Path, node_id: str, machine: str) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{_HEADER}{node_id} {machine}\n")
        os.replace(tmp, path)
        return True
    except OSError as exc:
        log.warning("cannot keep the node id in %s (%s): this daemon gets a new id at every start", path, exc)
        return False


def read_node_id(state_dir: Path, *, machine: str | None = None) -> str | None:
    """The id stored for this machine in ``state_dir``, without creating one (for ``meshd check``)."""
    stored = _read(Path(state_dir) / NODE_ID_FILE)
    if stored is None:
        return None
    node_id, stamp = stored
    return node_id if stamp is None or stamp == (machine or machine_digest()) else None


def stable_node_id(state_dir: Path, *, machine: str | None = None) -> str:
    """This box's node id: the one kept in ``state_dir``, or a new one if there is none or it was copied
    from another machine. ``machine`` overrides the machine digest (tests)."""
    machine = machine or machine_digest()
    path = Path(state_dir) / NODE_ID_FILE
    stored = _read(path)
    if stored is not None:
        node_id, stamp = stored
        if stamp == machine:
            return node_id
        if stamp is None:  # written before ids were bound to a machine: adopt it
            _write(path, node_id, machine)
            return node_id
        log.warning("%s holds node id %s of another machine (the state directory was copied); "
                    "this box gets a new node id", path, node_id)
    node_id = uuid.uuid4().hex[:NODE_ID_LENGTH]
    _write(path, node_id, machine)
    return node_id
