"""Files meshd writes are readable by the daemon that reads them, and files it cannot read or write
are named with the permission missing: one line, never a traceback, never a misleading cause."""

import os
import shutil
import time
from pathlib import Path

import pytest

from meshd.model.files import ModelStore
from meshd.model.tiny import STALE_TMP_S, TMP_PREFIX, write_tiny


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """The tiny model as the tiny writer leaves it, written once under umask 027."""
    root = tmp_path_factory.mktemp("models") / "tiny"
    old = os.umask(0o027)
    try:
        write_tiny(root)
    finally:
        os.umask(old)
    return root


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def test_the_tiny_writer_gives_its_files_the_modes_the_umask_asks_for(tiny_root):
    found = modes(tiny_root)
    assert any(name.endswith(".safetensors") for name in found)
    folders = {name: mode for name, mode in found.items() if (tiny_root / name).is_dir()}
    files = {name: mode for name, mode in found.items() if not (tiny_root / name).is_dir()}
    # mkdtemp's 0700 and safetensors' 0600 would lock out a daemon of another user in the same group
    assert set(folders.values()) == {0o750}, folders
    assert set(files.values()) == {0o640}, files


def test_interrupted_tiny_writes_are_cleaned_up_and_never_listed_as_models(tiny_root, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_root, models / f"{TMP_PREFIX}stale")  # what a killed writer leaves: a whole model
    shutil.copytree(tiny_root, models / f"{TMP_PREFIX}busy")  # another writer, still at work
    old = time.time() - STALE_TMP_S - 60
    os.utime(models / f"{TMP_PREFIX}stale", (old, old))
    store = ModelStore([models])
    assert store.available() == []
    write_tiny(models / "tiny")
    assert sorted(p.name for p in models.iterdir()) == [f"{TMP_PREFIX}busy", "tiny"]
    assert store.available() == [("tiny", models / "tiny")]
