"""Benchmark only: what the bench folders' ``sitecustomize`` modules share.

Python imports one module named ``sitecustomize`` at start-up, the first on ``sys.path``. A bench that
puts several hook folders on a daemon's PYTHONPATH (``bench/unsealed``, ``bench/hevc_ahead``) has each
hook run the next one found after its own folder, so that every folder named takes effect, and a
``sitecustomize`` the environment had already (a venv's, a distribution's) still runs after them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def run_next_sitecustomize(this_file: str) -> None:
    """Execute the first ``sitecustomize.py`` on ``sys.path`` after the folder of ``this_file``."""
    here = Path(this_file).resolve().parent
    folders = [Path(p or os.getcwd()).resolve() for p in sys.path]
    after = folders[folders.index(here) + 1 :] if here in folders else []
    for folder in after:
        candidate = folder / "sitecustomize.py"
        if candidate.is_file() and candidate.resolve() != Path(this_file).resolve():
            spec = importlib.util.spec_from_file_location(f"_sitecustomize_{len(after)}", candidate)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return
