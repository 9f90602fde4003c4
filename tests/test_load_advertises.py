"""A ``load`` changes what a daemon holds, and what it advertises (mDNS TXT, the systemd status, via
``Daemon.on_change``) follows, even when the warm-up compile after the load fails."""

from __future__ import annotations

import pytest
import torch._dynamo

from meshd import auth
from meshd.config import ranges
from meshd.wire.channel import Channel
from meshd.errors import MeshError
from meshtui.events import Step
from tests.daemons import running_daemon, split_generation

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


@pytest.mark.parametrize("backend", ["eager", None], ids=["compiled", "not-compiled"])
async def test_a_vae_file_broken_after_start_fails_the_generation_before_its_steps_in_one_line(tmp_path, caplog,
                                                                                               backend):
    """The head's VAE is read before step 1 (when its decoder is compiled, or when the generation is
    prepared): a file damaged since the daemon started is the file's fault, said in one line naming it
    before any step runs, not an internal error with a traceback in the log after all of them."""
    params = {"prompt": "a lighthouse at dawn", "seed": 7, "width": 64, "height": 64, "steps": 2, "guidance": 1.0}
    events = []
    async with running_daemon(tmp_path, KEY, blocks=range(6), compile_backend=backend) as daemon:
        (vae,) = (tmp_path / "models").rglob("vae/*.safetensors")
        vae.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
        with pytest.raises(MeshError) as raised:
            await split_generation(KEY, [daemon.bound], "A:0-5", params, codec="raw", on_event=events.append)
    assert not [e for e in events if isinstance(e, Step)]
    assert raised.value.code == "not-found", raised.value
    assert vae.name in raised.value.message and "\n" not in raised.value.message
    assert "Traceback" not in caplog.text
