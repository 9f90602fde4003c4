"""On the GPU machine: the sealed transport carries what it carried before (run: pytest -m gpu)."""

from __future__ import annotations

import asyncio

import pytest

from meshd.auth import read_key
from meshd.pipeline.request import GenerationParams
from meshd.pipeline.plan import parse_split
from meshtui.events import Prepared
from meshtui.local import LocalCluster
from meshtui.mesh import Mesh

pytestmark = pytest.mark.gpu

PARAMS = GenerationParams("a lighthouse at dawn", seed=3, width=128, height=128, steps=3, guidance=1.0)


@pytest.mark.parametrize("transport", ["cuda-ipc", "tcp"])
def test_a_split_generation_on_one_gpu_over_sealed_connections(tmp_path, transport):
    """Two daemons on cuda:0: their link is CUDA IPC (descriptors inside sealed frames) or, with
    both same-host paths off, loopback TCP whose big segments are sealed on the I/O threads; either way
    the image comes back and the link chosen is the one asked for."""
    args = ["--model", "tiny", "--device", "cuda:0"]
    if transport == "tcp":
        config = tmp_path / "tcp.toml"
        config.write_text("[meshd]\nsame_host_ipc = false\nsame_host_shm = false\n")
        args += ["--config", str(config)]
    with LocalCluster(workdir=tmp_path, models_dir=tmp_path / "models", common_args=args) as cluster:
        cluster.add("a")
        cluster.add("b")
        addresses = cluster.start(timeout=300)

        async def run():
            mesh = Mesh(read_key(cluster.key_file))
            for address in addresses:
                mesh.add(address)
            await mesh.connect_all()
            try:
                plan = parse_split("A:0-2,B:3-5", {p.label: p.address for p in mesh.peers.values()}, 6)
                await mesh.apply(plan)
                events = []
                result = await mesh.generate(plan, PARAMS, codec="raw", on_event=events.append)
                return result, events
            finally:
                await mesh.close()

        result, events = asyncio.run(run())
    assert result.png.startswith(b"\x89PNG")
    (prepared,) = [e for e in events if isinstance(e, Prepared)]
    links = [stage.link for stage in prepared.stages if stage.link is not None]
    assert any(link.transport == transport for link in links), links
