"""Installing the FAKE PyNvVideoCodec 2.2.4 (tests/fakes/PyNvVideoCodec) for a test.

The fake is imported by the product's own lazy import (``codec.hevc_nv.import_nvc``): its folder
goes first on ``sys.path``, and every probe, encoder and session of the codec is reset before and
after, so nothing of the fake outlives the test.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

import codec

FAKES = str(Path(__file__).with_name("fakes"))


def _forget_module() -> None:
    for name in [n for n in sys.modules if n == "PyNvVideoCodec" or n.startswith("PyNvVideoCodec.")]:
        del sys.modules[name]


@contextlib.contextmanager
def fake_nvenc(mode: str = "geforce", *, host_pointers: bool = True, budget: int = 2):
    """The fake binding, in ``mode``; yields its :class:`FakeState` (``FAKE``)."""
    codec.core.reset_backends()
    _forget_module()
    sys.path.insert(0, FAKES)
    try:
        fake = importlib.import_module("PyNvVideoCodec")
        assert fake.__file__.startswith(FAKES), f"a real PyNvVideoCodec shadows the fake: {fake.__file__}"
        fake.FAKE.reset()
        fake.FAKE.mode = mode
        fake.FAKE.host_pointers = host_pointers
        codec.core.set_nvenc_session_budget(budget)
        yield fake.FAKE
    finally:
        codec.core.reset_backends()
        codec.core.set_nvenc_session_budget(2)
        sys.path.remove(FAKES)
        _forget_module()


#: Set to 1 on a machine that has NVENC (a GeForce): a GPU test that would skip for want of NVENC
#: fails instead, so a card whose probe wrongly says "absent" cannot pass its tests.
EXPECT_NVENC_ENV = "FLUX_MESH_EXPECT_NVENC"


def skip_unless_nvenc(caps) -> None:
    """Skip the calling test when ``caps`` has no NVENC, or fail it under FLUX_MESH_EXPECT_NVENC=1."""
    import os  # noqa: PLC0415

    import pytest  # noqa: PLC0415

    if caps.nvenc:
        return
    message = f"no NVENC on {caps.device} ({caps.nvenc_state or 'unknown'}): {caps.nvenc_reason}"
    if os.environ.get(EXPECT_NVENC_ENV) == "1":
        pytest.fail(f"{EXPECT_NVENC_ENV}=1 but {message}")
    pytest.skip(message)
