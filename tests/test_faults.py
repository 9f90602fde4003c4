"""Faults: a peer killed mid-step, a peer frozen without closing, a link that drops and returns, a
daemon restarted during a generation, a GPU out of memory on one stage.

Each must end in a clear error on the client within seconds (naming the peer), the job released on
every daemon, and the daemons serving the next job; ``meshtui generate --retry`` finishes on the peers
left in one action. Real daemon processes and real signals where the fault is a process's; in-process
daemons where the test injects the fault (named as such).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from meshd import auth, limits
from meshd.auth import read_key
from meshd.wire.channel import Channel
from meshd.errors import MeshError, PeerLost
from meshd.pipeline.request import GenerationParams
from meshd.pipeline.plan import PeerAddress, parse_split
from meshd.pipeline.streaming import pack_raw
from meshtui.events import Step
from meshtui.local import LocalCluster
from meshtui.mesh import Mesh
from tests.daemons import jobs_on, running_daemon

#: Long enough to be interrupted mid-run (~25 ms a step here), short enough to finish when it must.
LONG = GenerationParams("a lighthouse at dawn", seed=3, width=64, height=64, steps=200, guidance=1.0)
SHORT = replace(LONG, steps=2)
SPLIT = "A:0-1,B:2-3,C:4-5"
KEY = auth.generate_key()  # for the in-process daemons (the cluster has its own key file)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(workdir=tmp_path_factory.mktemp("faults"), models_dir=tmp_path_factory.mktemp("models"),
                      common_args=["--model", "tiny", "--device", "cpu"]) as c:
        for name in ("a", "b", "c"):
            c.add(name)
        c.start()
        yield c


def record(fault: str, seconds: float) -> None:
    """With MESHD_FAULT_FIGURES=FILE, append how long the client waited for the error (the long
    runs in docs/reliability.md collect these)."""
    path = os.environ.get("MESHD_FAULT_FIGURES")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"fault": fault, "error_after_s": round(seconds, 3)}) + "\n")


async def until(predicate, timeout: float, what: str) -> float:
    """Poll ``predicate`` (sync or async) until true; returns the seconds it took."""
    start = time.monotonic()
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def connected_mesh(key: bytes, addresses) -> Mesh:
    mesh = Mesh(key)
    for address in addresses:
        mesh.add(address)
    await mesh.connect_all()
    mesh.require_online()
    return mesh


def split_plan(mesh: Mesh, spec: str = SPLIT):
    return parse_split(spec, {p.label: p.address for p in mesh.peers.values()}, 6)


async def no_jobs_anywhere(key: bytes, addresses) -> bool:
    counts = await asyncio.gather(*(jobs_on(key, a) for a in addresses))
    return not any(counts)


async def interrupted_run(mesh: Mesh, plan, fault, *, after_steps: int = 3) -> tuple[MeshError, float]:
    """Start a long generation, inject ``fault`` once a few steps are done; returns the error the
    client got and how long after the fault it came."""
    steps = []
    run = asyncio.ensure_future(mesh.generate(plan, LONG, codec="raw",
                                              on_event=lambda e: steps.append(e) if isinstance(e, Step) else None))
    await until(lambda: len(steps) >= after_steps or run.done(), 60, f"{after_steps} steps")
    assert not run.done(), run.exception()
    await fault()
    started = time.monotonic()
    with pytest.raises(MeshError) as error:
        await asyncio.wait_for(run, 30)
    return error.value, time.monotonic() - started


# --- process faults (real daemons, real signals) -------------------------------------------------------


@pytest.mark.parametrize("victim", [0, 1], ids=["head", "middle-stage"])
async def test_a_peer_killed_mid_step_is_an_error_naming_it_and_the_rest_serve_on(cluster, victim):
    key = read_key(cluster.key_file)
    dead = cluster.daemons[victim]
    survivors = [d.address for d in cluster.daemons if d is not dead]
    mesh = await connected_mesh(key, [d.address for d in cluster.daemons])
    try:
        plan = split_plan(mesh)
        await mesh.apply(plan)

        async def kill():
            dead.signal(signal.SIGKILL)

        error, took = await interrupted_run(mesh, plan, kill)
        record(f"{'head' if victim == 0 else 'stage'} killed (SIGKILL)", took)
        assert took < 3.0, took
        assert error.code == "peer-lost" and str(dead.address) in str(error), error
        # The others let go of the job, down to the tail (whose client, B, may be the one gone).
        await until(lambda: no_jobs_anywhere(key, survivors), 5, "jobs released on the survivors")
        dead.restart()
        await mesh.apply(plan)  # it came back empty: the plan is loaded again
        outcome = await mesh.generate(plan, SHORT, codec="raw")
        assert outcome.png.startswith(b"\x89PNG")
    finally:
        await mesh.close()


async def test_a_frozen_stage_is_an_error_within_the_silence_timeout(cluster):
    """SIGSTOP: the process neither answers nor closes its sockets (the kernel still accepts bytes)."""
    a, b, c = cluster.daemons
    key = read_key(cluster.key_file)
    mesh = await connected_mesh(key, [d.address for d in cluster.daemons])
    try:
        plan = split_plan(mesh)
        await mesh.apply(plan)

        async def freeze_c():
            c.signal(signal.SIGSTOP)

        try:
            error, took = await interrupted_run(mesh, plan, freeze_c)
            record("stage frozen (SIGSTOP)", took)
            assert took < limits.PEER_SILENCE_TIMEOUT_S + 2.5, (took, str(error))
            assert error.code == "peer-lost" and str(c.address) in str(error), error
            assert "stopped answering" in str(error)
            await until(lambda: no_jobs_anywhere(key, [a.address, b.address]), 5, "jobs released on A and B")
        finally:
            c.signal(signal.SIGCONT)
        # Thawed, C finds its client (B) gone and drops the job it held for it.
        await until(lambda: no_jobs_anywhere(key, [c.address]), 10, "job released on C")
        outcome = await mesh.generate(plan, SHORT, codec="raw")
        assert outcome.png.startswith(b"\x89PNG")
    finally:
        await mesh.close()


async def test_a_stage_restarted_during_a_generation_drains_it_first(cluster):
    """``systemctl restart``: SIGTERM lets the generation in flight finish, then the daemon exits; once
    it is back (on the same port, holding nothing) the next generation loads the plan again and runs."""
    a, b, c = cluster.daemons
    key = read_key(cluster.key_file)
    mesh = await connected_mesh(key, [d.address for d in cluster.daemons])
    try:
        plan = split_plan(mesh)
        await mesh.apply(plan)
        steps = []
        run = asyncio.ensure_future(mesh.generate(plan, replace(LONG, steps=60), codec="raw",
                                                  on_event=lambda e: steps.append(e) if isinstance(e, Step) else None))
        await until(lambda: len(steps) >= 3, 60, "3 steps")
        b.signal(signal.SIGTERM)
        outcome = await asyncio.wait_for(run, 60)
        assert len(steps) == 60 and outcome.png.startswith(b"\x89PNG")
        assert await asyncio.to_thread(b.process.wait, 30) == 0
        b.restart()
        await mesh.apply(plan)
        assert (await mesh.generate(plan, SHORT, codec="raw")).png.startswith(b"\x89PNG")
        # the release after a generation travels down the stages on its own: within seconds, not at once
        await until(lambda: no_jobs_anywhere(key, [d.address for d in cluster.daemons]), 5, "jobs released")
    finally:
        await mesh.close()


# --- link faults: a relay in front of a daemon ------------------------------------------------------------


class LinkProxy:
    """A TCP relay in front of a daemon, to break the link to it: :meth:`cut` resets every connection
    and refuses new ones (a cable pulled, a VPN down), :meth:`restore` lets connections through again."""

    def __init__(self, target: PeerAddress) -> None:
        self.target = target
        self.refusing = False
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> PeerAddress:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return PeerAddress("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)
        self.writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self.writers -= {writer, up_writer}

    def cut(self) -> None:
        self.refusing = True
        for writer in list(self.writers):
            writer.transport.abort()  # RST both ways

    def restore(self) -> None:
        self.refusing = False

    async def close(self) -> None:
        self.cut()
        self.server.close()
        await self.server.wait_closed()


async def test_a_link_that_drops_is_an_error_and_when_it_returns_the_next_run_works(cluster):
    a, b, c = cluster.daemons
    key = read_key(cluster.key_file)
    proxy = LinkProxy(b.address)
    b_via_link = await proxy.start()
    mesh = await connected_mesh(key, [a.address, b_via_link, c.address])
    try:
        plan = split_plan(mesh)
        await mesh.apply(plan)

        async def cut():
            proxy.cut()

        error, took = await interrupted_run(mesh, plan, cut)
        record("link cut", took)
        assert took < 3.0, took
        assert error.code == "peer-lost" and str(b_via_link) in str(error), error
        await until(lambda: no_jobs_anywhere(key, [d.address for d in cluster.daemons]), 5, "jobs released")
        proxy.restore()
        # Nothing to do on the client: the head reconnects through the link by itself.
        assert (await mesh.generate(plan, SHORT, codec="raw")).png.startswith(b"\x89PNG")
    finally:
        await mesh.close()
        await proxy.close()


# --- retry on the peers left, in one action ---------------------------------------------------------------


def test_meshtui_generate_retry_finishes_on_the_peers_left(cluster, tmp_path):
    """``meshtui generate --retry``: C is killed mid-run; the command drops it, re-plans over A and B,
    loads that plan and delivers the image, in one invocation."""
    a, b, c = cluster.daemons
    out = tmp_path / "image.png"
    cmd = [sys.executable, "-m", "meshtui", "generate", "--key-file", str(cluster.key_file),
           *[arg for d in cluster.daemons for arg in ("--peer", str(d.address))], "--split", SPLIT,
           "--size", "64", "--steps", "150", "--codec", "raw", "--retry", "--json", "--out", str(out)]
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in client.stderr:
            if line.startswith("step 5/"):
                c.signal(signal.SIGKILL)
                break
        stdout, rest = client.communicate(timeout=120)
        assert client.returncode == 0, rest
        assert "lost peer C" in rest and "re-planning over the peers left" in rest
        summary = json.loads(stdout)
        assert "C:" not in summary["plan"] and summary["plan"].startswith("A:0-")
        assert out.read_bytes().startswith(b"\x89PNG")
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        c.restart()


# --- faults injected into in-process daemons -------------------------------------------------------------


@contextlib.asynccontextmanager
async def two_stages(tmp_path):
    """Head A (blocks 0-2) and stage B (3-5), in this process, and a client mesh over them."""
    models = tmp_path / "models"
    async with running_daemon(tmp_path / "a", KEY, blocks=range(0, 3), models_dir=models) as a, \
            running_daemon(tmp_path / "b", KEY, blocks=range(3, 6), models_dir=models) as b:
        mesh = await connected_mesh(KEY, [PeerAddress(*a.bound), PeerAddress(*b.bound)])
        try:
            yield a, b, mesh, split_plan(mesh, "A:0-2,B:3-5")
        finally:
            await mesh.close()


def out_of_memory_once(daemon, after_calls: int = 1):
    """FAULT INJECTION (tests only): the next span forward on ``daemon``'s model after ``after_calls``
    raises the error torch raises when CUDA memory runs out. This CPU-only machine cannot run out
    of GPU memory; nothing a peer sends can trigger this."""
    span = daemon.model.span
    real, calls = span.run, []

    def run(*args, **kwargs):
        calls.append(1)
        if len(calls) == after_calls + 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fault injection)")
        return real(*args, **kwargs)

    span.run = run
    return calls


@pytest.mark.parametrize("where", ["head", "stage"])
async def test_out_of_memory_on_one_stage_is_an_oom_error_and_frees_the_job(tmp_path, where):
    async with two_stages(tmp_path) as (a, b, mesh, plan):
        victim = a if where == "head" else b
        out_of_memory_once(victim)
        started = time.monotonic()
        with pytest.raises(MeshError, match="ran out of memory") as error:
            await mesh.generate_with_retry(plan, replace(SHORT, steps=4), retries=1, codec="raw")
        record(f"GPU out of memory on the {where} (injected)", time.monotonic() - started)
        assert error.value.code == "oom"
        assert len(mesh.peers) == 2  # not a lost peer: nothing dropped, nothing re-planned
        assert victim.name in str(error.value) or str(PeerAddress(*victim.bound)) in str(error.value)
        await until(lambda: not a.jobs and not b.jobs, 5, "the job released on both")
        assert victim.worker.queued == 0
        assert (await mesh.generate(plan, SHORT, codec="raw")).png.startswith(b"\x89PNG")


@pytest.mark.parametrize("where", ["head", "stage"])
async def test_a_link_lost_while_choosing_the_codec_leaves_no_job_behind(tmp_path, where):
    """The link to the next stage drops right after it prepared the job (during the bandwidth probe):
    every stage that prepared it releases it again."""
    models = tmp_path / "models"
    tcp = {"same_host_shm": False}  # a link is probed (and its codec chosen) only where it is TCP
    async with running_daemon(tmp_path / "a", KEY, blocks=range(0, 2), models_dir=models, **tcp) as a, \
            running_daemon(tmp_path / "b", KEY, blocks=range(2, 4), models_dir=models, **tcp) as b, \
            running_daemon(tmp_path / "c", KEY, blocks=range(4, 6), models_dir=models, **tcp) as c:
        mesh = await connected_mesh(KEY, [PeerAddress(*d.bound) for d in (a, b, c)])
        try:
            prober = a if where == "head" else b

            async def link_drops(address):  # FAULT INJECTION: the probe's link drops
                raise PeerLost(str(address), "connection lost: fault injection")

            prober.pool.bandwidth = link_drops
            with pytest.raises(MeshError, match="fault injection"):
                await mesh.generate(split_plan(mesh), SHORT, codec="auto")
            await until(lambda: not (a.jobs or b.jobs or c.jobs), 5, "no job left on any stage")
        finally:
            await mesh.close()


async def test_a_frozen_client_of_a_stage_loses_its_jobs_within_seconds(tmp_path, monkeypatch):
    """A head that freezes between two steps (no request running) still holds a job on the stage; the
    stage pings it, hears nothing, closes the connection and frees the job."""
    monkeypatch.setattr(limits, "PEER_SILENCE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(limits, "PING_INTERVAL_S", 0.25)
    async with running_daemon(tmp_path, KEY, blocks=range(3, 6)) as stage:
        head = await Channel.connect(*stage.bound, KEY)
        ids_headers, ids_buffers = pack_raw([torch.zeros(1, 32, 4, dtype=torch.int64),
                                             torch.zeros(1, 16, 4, dtype=torch.int64)])
        await head.request("prepare", {"job": "j", "model": stage.model.identity.to_dict(), "ids": ids_headers,
                                       "stages": [{"peer": "%s:%d" % stage.bound, "start": 3, "end": 6}],
                                       "geometry": {"batch": 1, "txt_len": 32, "img_h": 4, "img_w": 4}},
                           ids_buffers)
        assert list(stage.jobs) == ["j"]
        head._reader.cancel()  # frozen: reads nothing, answers no ping, closes nothing
        head._pinger.cancel()
        took = await until(lambda: not stage.jobs, 5, "the job released")
        assert took < 3.0
        await head.conn.close()


async def test_a_request_given_up_by_its_client_stops_on_the_daemon(tmp_path):
    """A client-side timeout (or a failing chunk stream) cancels the request on the daemon: the
    generation stops instead of running on for nobody."""
    async with running_daemon(tmp_path, KEY, blocks=range(6)) as daemon:
        channel = await Channel.connect(*daemon.bound, KEY)
        me = "%s:%d" % daemon.bound
        with pytest.raises(MeshError, match="no reply within"):
            await channel.request("generate", {"params": LONG.to_wire(), "plan": [{"peer": me, "start": 0, "end": 6}],
                                               "codec": "raw"}, timeout=0.5)
        await until(lambda: not any(s.tasks for s in daemon.sessions), 3, "the generation stopped")
        assert (await channel.request("echo")).op == "reply"
        await channel.close()


async def test_a_request_cancelled_while_its_frame_is_on_the_wire_leaves_the_connection_usable(tmp_path):
    """Other requests share the connection (a head's link to a stage carries every job): cancelling one
    mid-frame must not leave half a frame, or a bulk-I/O thread still writing, behind."""
    async with running_daemon(tmp_path, KEY) as daemon:
        channel = await Channel.connect(*daemon.bound, KEY)
        payload = bytes(64 << 20)
        for _ in range(4):
            probe = asyncio.ensure_future(channel.request("probe", {}, [payload]))
            await asyncio.sleep(0.005)
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
            assert (await channel.request("echo", timeout=10)).op == "reply"
        await channel.close()
