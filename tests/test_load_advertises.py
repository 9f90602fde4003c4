"""A ``load`` changes what a daemon holds, and what it advertises (mDNS TXT, the systemd status, via
``Daemon.on_change``) follows, even when the warm-up compile after the load fails."""

from __future__ import annotations

import pytest
import torch._dynamo

from meshd import auth
from meshd.config import ranges
from meshd.wire.channel import Channel
from meshd.errors import MeshError
from tests.daemons import running_daemon

KEY = auth.generate_key()


@torch._dynamo.register_backend(name="test-fails-to-lower")
def fails_to_lower(graph, example_inputs):
    """A torch.compile backend that fails as inductor does on a lowering bug (not reproducible on demand)."""
    raise RuntimeError("lowering failed")


async def test_a_load_whose_warm_up_compile_fails_still_advertises_the_blocks_now_held(tmp_path):
    async with running_daemon(tmp_path, KEY, blocks=range(3), compile_backend="test-fails-to-lower") as daemon:
        advertised = []
        daemon.on_change.append(lambda: advertised.append(daemon.node_info()["blocks"]))
        channel = await Channel.connect(*daemon.bound, KEY)
        try:
            with pytest.raises(MeshError, match="could not compile blocks 0-5"):
                await channel.request("load", {"blocks": [[0, 6]]}, timeout=60)
        finally:
            await channel.close()
        held = ranges(daemon.model.blocks)
        assert held == [[0, 6]]
        assert advertised == [held]  # what the record says is what the daemon holds
