"""``Mesh.model``: the model a mesh runs, by the one rule the dashboard's proposal also follows
(meshtui.splitting.plan_preset), so ``meshtui generate`` and the Split screen never disagree on it."""

from __future__ import annotations

import pytest

from meshd.errors import Mismatch, PeerLost
from meshd.model.presets import PRESETS
from meshd.node.info import NodeInfo
from meshd.pipeline.plan import PeerAddress, PlanError
from meshd.wire.channel import Channel
from meshtui import splitting
from meshtui.mesh import Mesh
from tests.daemons import sealed_pair

TINY = {"model_id": "tiny", "preset": "tiny", "hash": "3f2a", "dtype": "bfloat16"}


async def mesh_serving(*models: dict) -> tuple[Mesh, list]:
    """A mesh of peers A, B, ... connected over real sealed loopback connections, each serving ``models[i]``."""
    mesh, connections = Mesh(None), []
    for i, model in enumerate(models):
        client, served = await sealed_pair()
        connections.append(served)
        peer = mesh.add(PeerAddress("127.0.0.1", 7001 + i))
        peer.channel = Channel(client)
        peer.info = NodeInfo.from_wire({"name": f"node-{i}", "model": model})
    return mesh, connections


async def close(mesh: Mesh, connections: list) -> None:
    await mesh.close()
    for conn in connections:
        await conn.close()


async def test_peers_that_agree_run_their_preset():
    mesh, connections = await mesh_serving(TINY, TINY)
    try:
        assert mesh.model() is PRESETS["tiny"]
    finally:
        await close(mesh, connections)


@pytest.mark.parametrize("second, problem", [
    ({**TINY, "hash": "9e1b"}, "peers serve different models: A serves tiny"),
    ({**TINY, "dtype": "float16"}, "peers serve different models"),
])
async def test_peers_that_disagree_are_a_mismatch_in_the_dashboards_words(second, problem):
    mesh, connections = await mesh_serving(TINY, second)
    try:
        with pytest.raises(Mismatch, match=problem) as error:
            mesh.model()
        with pytest.raises(PlanError) as shown:  # the Split screen's proposal over the same peers
            splitting.plan_preset(p.view() for p in mesh.peers.values())
        assert error.value.message == str(shown.value)
    finally:
        await close(mesh, connections)


async def test_an_unknown_preset_and_an_empty_mesh_are_refused_with_the_cause():
    mesh, connections = await mesh_serving({**TINY, "preset": "klein-99b"})
    try:
        with pytest.raises(Mismatch, match="A serves an unknown model preset 'klein-99b'"):
            mesh.model()
    finally:
        await close(mesh, connections)
    with pytest.raises(PeerLost, match="no peer to run on"):
        Mesh(None).model()
