"""Load: several clients generating at once against the same daemons get every image, each its own
(never another client's), in fair turns; and a soak of many generations leaves the daemons' memory
and file descriptors where they were. (The long soak is bench/soak.py; figures in docs/reliability.md.)"""

from __future__ import annotations

import asyncio
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from bench.soak import soak
from meshd.auth import read_key
from meshd.pipeline.request import GenerationParams
from meshd.pipeline.plan import parse_split
from meshtui.local import LocalCluster
from meshtui.mesh import Mesh

CLIENTS = 6
PER_CLIENT = 3
SPLIT = "A:0-2,B:3-5"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(workdir=tmp_path_factory.mktemp("load"), models_dir=tmp_path_factory.mktemp("models"),
                      common_args=["--model", "tiny", "--device", "cpu"]) as c:
        c.add("a")
        c.add("b")
        c.start()
        yield c


def params(client: int, n: int) -> GenerationParams:
    return GenerationParams(f"client {client}: a lighthouse, take {n}", seed=100 * client + n, width=64, height=64,
                            steps=4, guidance=1.0)


async def client_mesh(cluster) -> tuple[Mesh, object]:
    mesh = Mesh(read_key(cluster.key_file))
    for d in cluster.daemons:
        mesh.add(d.address)
    await mesh.connect_all()
    return mesh, parse_split(SPLIT, {p.label: p.address for p in mesh.peers.values()}, 6)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def png_params(png: bytes) -> dict:
    return json.loads(Image.open(io.BytesIO(png)).text["flux-mesh"])["params"]


async def test_concurrent_clients_each_get_their_own_images_none_lost_in_fair_turns(cluster):
    # The image each request must produce, from runs one at a time.
    mesh, plan = await client_mesh(cluster)
    try:
        await mesh.apply(plan)
        expected = {(c, n): pixels((await mesh.generate(plan, params(c, n), codec="raw")).png)
                    for c in range(CLIENTS) for n in range(PER_CLIENT)}
    finally:
        await mesh.close()
    assert len({e.tobytes() for e in expected.values()}) == len(expected)  # all different: a mix-up shows

    async def client(c: int) -> list[tuple[int, bytes, float]]:
        """One user: its own connections, its generations one after another."""
        mesh, plan = await client_mesh(cluster)
        try:
            done = []
            for n in range(PER_CLIENT):
                outcome = await mesh.generate(plan, params(c, n), codec="raw")
                done.append((n, outcome.png, time.monotonic()))
            return done
        finally:
            await mesh.close()

    started = time.monotonic()
    results = await asyncio.gather(*(client(c) for c in range(CLIENTS)))
    total = time.monotonic() - started
    for c, done in enumerate(results):
        assert [n for n, _, _ in done] == list(range(PER_CLIENT))  # none lost
        for n, png, _ in done:
            assert png_params(png)["seed"] == 100 * c + n and png_params(png)["prompt"] == params(c, n).prompt
            assert np.array_equal(pixels(png), expected[(c, n)]), f"client {c} image {n} is not its own"
    # Fair turns: every client did the same work, so under FIFO queueing and step interleaving they
    # finish close together; serving one client at a time would finish the first at ~1/6 of the total.
    finished = sorted(done[-1][2] - started for done in results)
    assert finished[0] > 0.5 * finished[-1], (finished, total)


async def test_a_short_soak_leaves_memory_and_descriptors_where_they_were(cluster):
    pids = {d.name: d.process.pid for d in cluster.daemons}
    figures = await soak(read_key(cluster.key_file), [d.address for d in cluster.daemons], pids,
                         generations=64, clients=4, warmup=24)
    assert figures["failed"] == 0 and figures["mixed_up"] == 0
    assert not any(figures["jobs_left"].values())
    for name, growth in figures["growth"].items():
        assert growth["fds"] <= 0, (name, figures["before"], figures["after"])
        assert growth["rss_mib"] < 24, (name, figures["before"], figures["after"])
