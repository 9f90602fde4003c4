"""Can this daemon read what a model needs, and write where it keeps its state? Asked before anything
runs, and answered in one line that names the file, the permission and the user, never with a
traceback or a misleading "missing".

A daemon under systemd runs as its own user (``meshd``, or a transient one), so files a person copied
as root or as themselves are often closed to it. The checks ask the kernel (``os.access`` with the
effective ids) rather than reading the mode bits, so ACLs, groups and read-only mounts count too.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import ModelError

#: A model's component folders hold a handful of files (a text encoder: ~20); a tree far larger than
#: this is not a model component, and is not walked file by file.
MAX_CHECKED_FILES = 4096


def user() -> str:
    """``user meshd (uid 999)``: who the kernel says we are."""
    uid = os.geteuid()
    with contextlib.suppress(KeyError):
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    return f"uid {uid}"


def _owner(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return ""
    with contextlib.suppress(KeyError):
        return f"mode {stat.S_IMODE(st.st_mode):04o}, owner {pwd.getpwuid(st.st_uid).pw_name}"
    return f"mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}"


def denied(path: Path, verb: str) -> str:
    """``/x: permission denied: user meshd (uid 999) cannot read it (mode 0600, owner root)``."""
    owner = _owner(path)
    return f"{path}: permission denied: {user()} cannot {verb} it" + (f" ({owner})" if owner else "")


def _closed_parent(path: Path) -> Path | None:
    """The first folder above ``path`` that this user may not enter (search permission), if any."""
    for parent in reversed(Path(os.path.abspath(path)).parents):
        if parent.is_dir() and not os.access(parent, os.X_OK):
            return parent
    return None


def unreadable(path: Path) -> str | None:
    """Why ``path`` (a file, or a folder to list and enter) cannot be read, in one line; None if it can
    or if it does not exist (the caller says "missing" then, truthfully)."""
    parent = _closed_parent(path)
    if parent is not None:
        return denied(parent, "enter")
    if not os.path.lexists(path):
        return None
    if os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            return denied(path, "list")
    elif not os.access(path, os.R_OK):
        return denied(path, "read")
    return None


def require_readable(path: Path, what: str = "") -> None:
    """A ModelError naming the permission when ``path`` exists but cannot be read."""
    problem = unreadable(path)
    if problem is not None:
        raise ModelError(f"{what}{': ' if what else ''}{problem}")


def require_tree_readable(folders: Iterable[Path], what: str) -> None:
    """Every folder and file below ``folders`` can be read (a component about to be loaded)."""
    seen = 0
    for folder in folders:
        require_readable(folder, what)
        if not folder.is_dir():
            continue
        for root, dirs, names in os.walk(folder):
            for name in dirs + names:
                seen += 1
                if seen > MAX_CHECKED_FILES:
                    return
                require_readable(Path(root) / name, what)


def unwritable_dir(path: Path) -> str | None:
    """Why the folder ``path`` cannot be created or written, in one line; None if it can."""
    parent = _closed_parent(path)
    if parent is not None:
        return denied(parent, "enter")
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return denied(existing, "write" if existing == Path(os.path.abspath(path)) else "create folders in")
    return None


def explain(exc: OSError) -> str:
    """One line for a PermissionError (or other OSError) that reached the top: the file and the permission."""
    name = exc.filename
    if isinstance(exc, PermissionError) and name:
        path = Path(os.fsdecode(name))
        return unreadable(path) or unwritable_dir(path.parent) or f"{path}: permission denied ({user()})"
    return f"{name}: {exc.strerror}" if name and exc.strerror else str(exc)
