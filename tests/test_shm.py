"""Transport host-shm on the CPU: sealed memfd regions, the claim over the abstract Unix socket, raw
streams through a region over a real sealed loopback connection, and split generations between two
daemons of this host. The GPU half (pinned regions, bit-exact over many klein-sized steps) is
tests/test_shm_gpu.py."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import gc
import io
import logging
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codec import CodecSpec, TokenLayout
from meshd import auth, limits
from meshd.errors import MeshError
from meshd.node.gpu import GpuWorker
from meshd.pipeline.progress import StepRecord
from meshd.pipeline.streaming import (LinkPlan, SharedRun, StageInput, pack_raw, raw_header, receive_input, reserve_shared,
                                      send_activation, send_shared, unpack_raw)
from meshd.wire import shm
from meshd.wire.channel import Channel, ServerSession
from meshd.wire.staging import PAGE_BYTES
from meshtui.cli import run_local
from tests.daemons import running_daemon, split_generation
from tests.daemons import eventually, sealed_pair

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd and abstract sockets are Linux's")

KEY = auth.generate_key()
TEXT, SIDE, HIDDEN = 8, 4, 64
SHAPE = (1, TEXT + SIDE * SIDE, HIDDEN)
PARAMS = {"prompt": "a lighthouse at dawn", "seed": 5, "width": 64, "height": 64, "steps": 3, "guidance": 1.0}


class Receiver:
    """The receiving end of one connection as a stage has it: ``shm-offer`` answered from a real
    :class:`ShmServer`, every ``forward`` received through :func:`receive_input` and taken to the device
    on a GPU worker, as StageService.forward does."""

    def __init__(self, served, device: torch.device, shape=SHAPE, dtype=torch.bfloat16) -> None:
        self.server = shm.ShmServer("test-node", device)
        self.device, self.shape, self.dtype = device, shape, dtype
        self.worker = GpuWorker(device)
        self.received: list = []
        self.session = ServerSession(served, self.handle, {})

    async def handle(self, request):
        if request.op == "shm-offer":
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self.server.offer, request.session, request.header["nbytes"]), []
        await self.take(request)
        return {}, []

    async def take(self, request):
        inp, rx = await receive_input(request, self.device, self.shape, self.dtype,
                                      shm=self.server.region(request.session))
        await inp.ready()
        tensor, _ = await self.worker.run(inp.take, self.device)
        inp.count_copy(rx)
        self.received.append((tensor, rx))
        return inp, tensor


class LastStage(Receiver):
    """The receiving end as the last stage has it (StageService.forward): the input taken by the compute,
    and its prediction (here the input's first rows, doubled) given back in the run the stream came in
    when the sender asks for it, else sent over TCP. ``answer`` may rewrite the reply (a lying peer)."""

    def __init__(self, served, device: torch.device, shape=SHAPE, dtype=torch.bfloat16) -> None:
        super().__init__(served, device, shape, dtype)
        self.answer = lambda fields, segments: (fields, segments)
        self.hold: asyncio.Event | None = None  # set: each forward waits for it before it answers
        self.hold_reply: asyncio.Event | None = None  # the same, after its prediction is in the run

    async def handle(self, request):
        if request.op == "shm-offer":
            return await super().handle(request)
        inp, tensor = await self.take(request)
        if self.hold is not None:
            await self.hold.wait()
        prediction = tensor[:, :4] * 2
        if inp.give_back(prediction):
            if self.hold_reply is not None:
                await self.hold_reply.wait()
            return self.answer(*inp.reply({"prediction": raw_header(prediction)}, []))
        headers, buffers = pack_raw([prediction])
        return self.answer(*inp.reply({"prediction": headers[0]}, buffers))


async def shm_link(device=torch.device("cpu"), shape=SHAPE, receiver_type=None):
    """A sealed loopback connection whose receiver gives regions, and a host-shm link over it."""
    client, served = await sealed_pair()
    receiver = (receiver_type or Receiver)(served, device, shape)
    serving = asyncio.ensure_future(receiver.session.run())
    sender = shm.ShmSender("test-peer", device)
    link = LinkPlan("host-shm", CodecSpec("raw", layout=TokenLayout(TEXT, SIDE, SIDE)), {}, shm=sender)
    return Channel(client), receiver, serving, link


async def close_link(channel, receiver, serving, link) -> None:
    await channel.close()
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    link.shm.close()
    receiver.server.close()
    receiver.worker.shutdown()


def activation(step: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)


# --- regions ------------------------------------------------------------------------------------


def test_a_region_is_sealed_so_its_peer_can_neither_shrink_nor_grow_it():
    fd, memory = shm.make_region(2 * PAGE_BYTES)
    try:
        for size in (PAGE_BYTES, 4 * PAGE_BYTES):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)  # what a peer would do to SIGBUS the reader
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)  # the seals themselves are sealed
        mapped = shm.map_region(fd, 2 * PAGE_BYTES)
        mapped[:4] = b"mesh"
        assert memory[:4] == b"mesh", "both mappings see one memory"
    finally:
        os.close(fd)


def test_a_received_descriptor_that_could_shrink_or_has_another_size_is_refused():
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, PAGE_BYTES)
        with pytest.raises(shm.ShmUnavailable, match="not sealed against shrinking and growing"):
            shm.map_region(fd, PAGE_BYTES)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        with pytest.raises(shm.ShmUnavailable, match=f"has {PAGE_BYTES} bytes; the offer said {2 * PAGE_BYTES}"):
            shm.map_region(fd, 2 * PAGE_BYTES)
    finally:
        os.close(fd)
    with open(os.devnull, "rb") as not_memfd:
        with pytest.raises(shm.ShmUnavailable):
            shm.map_region(not_memfd.fileno(), PAGE_BYTES)


def test_a_region_holds_two_streams_in_whole_pages_and_is_bounded():
    assert shm.region_bytes(1) == 2 * PAGE_BYTES
    assert shm.region_bytes(36 << 20) == 72 << 20
    assert shm.region_bytes(limits.MAX_SHM_REGION_BYTES) == limits.MAX_SHM_REGION_BYTES
    with pytest.raises(shm.ShmUnavailable, match="MAX_SHM_REGION_BYTES"):
        shm.region_bytes(limits.MAX_SHM_REGION_BYTES + 1)


# --- the claim over the Unix socket ---------------------------------------------------------------


def claim_raw(name: str, payload: bytes) -> tuple[bytes, list[int]]:
    """Talk to the claim socket as any local process could: send ``payload``, return what came back."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect("\0" + name)
        if payload:
            sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        message, fds, _, _ = socket.recv_fds(sock, 256, 1)
        return message, fds


def test_only_the_offered_token_gets_the_region_once_and_every_refusal_is_one_line(caplog):
    server = shm.ShmServer("node", torch.device("cpu"))
    session = object()
    try:
        offer = server.offer(session, PAGE_BYTES)
        assert offer["socket"].startswith("meshd-shm-node-") and len(offer["token"]) == limits.SHM_TOKEN_BYTES
        with caplog.at_level(logging.WARNING, logger="meshd.wire.shm"):
            for payload, why in ((b"", "got 0 bytes"), (b"GET / HTTP/1.1\r\n", "got 16 bytes"),
                                 (os.urandom(limits.SHM_TOKEN_BYTES), "unknown, used or expired token"),
                                 (os.urandom(4096), "unknown, used or expired token")):
                message, fds = claim_raw(offer["socket"], payload)
                assert fds == [] and message.startswith(b"refused: ") and message.endswith(f"{why}\n".encode())
            refusals = [r.getMessage() for r in caplog.records]
            assert len(refusals) == 4 and all(m.startswith("shared memory: refused a claim") for m in refusals)
            memory, bell, answers = shm.claim(offer["socket"], offer["token"], offer["nbytes"])  # still served, right
            assert isinstance(bell, shm.Bell) and isinstance(answers, shm.Doorbell)  # and its two doorbells
            answers.close()
            memory[:2] = b"ok"
            assert server.region(session).arena.span(0, 2).tobytes() == b"ok"
            with pytest.raises(shm.ShmUnavailable, match="refused the claim: refused: unknown, used or expired"):
                shm.claim(offer["socket"], offer["token"], offer["nbytes"])  # replayed
    finally:
        server.close()


def test_a_claim_answered_with_more_descriptors_than_a_region_and_its_two_bells_is_refused():
    """A peer of another version passing a fourth descriptor: the kernel cuts it off (MSG_CTRUNC); the
    claim is refused, not taken with parts missing, and nothing received stays open."""
    name = f"{shm.SOCKET_PREFIX}fake-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(1)
    fd, _ = shm.make_region(PAGE_BYTES)
    ends = [*os.pipe(), *os.pipe()]

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(limits.SHM_TOKEN_BYTES)
            socket.send_fds(conn, [b"OK"], [fd, ends[1], ends[2], ends[3]])

    server = threading.Thread(target=serve)
    server.start()
    before = len(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(shm.ShmUnavailable, match="sent 3 or more descriptor\\(s\\).*another version") as refused:
            shm.claim(name, b"t" * limits.SHM_TOKEN_BYTES, PAGE_BYTES)
        assert refused.value.lasting
        assert len(os.listdir("/proc/self/fd")) == before, "the descriptors received were closed"
    finally:
        server.join(5)
        listener.close()
        for end in (fd, *ends):
            os.close(end)


async def test_a_setup_given_up_while_its_claim_runs_lets_what_the_claim_brings_go(monkeypatch):
    channel, receiver, serving, link = await shm_link()
    claimed, started = [], threading.Event()
    real = shm.claim

    def slow_claim(*args):
        started.set()
        time.sleep(0.3)
        claimed.append(real(*args))
        return claimed[-1]

    monkeypatch.setattr(shm, "claim", slow_claim)
    try:
        setting_up = asyncio.ensure_future(link.shm.arena(channel, math.prod(SHAPE) * 2, retry=True))
        assert await eventually(started.is_set)
        setting_up.cancel()
        await asyncio.gather(setting_up, return_exceptions=True)
        assert await eventually(lambda: bool(claimed))
        answers = claimed[0][2]
        assert await eventually(lambda: not answers._thread.is_alive(), 3.0), "the answer bell's thread ended"
        assert link.shm._region is None
    finally:
        await close_link(channel, receiver, serving, link)


def test_a_token_expires_and_an_ended_session_takes_its_offer_and_region_with_it(monkeypatch):
    server = shm.ShmServer("node", torch.device("cpu"))
    try:
        monkeypatch.setattr(limits, "SHM_TOKEN_TTL_S", 0.0)
        late = server.offer(object(), PAGE_BYTES)
        with pytest.raises(shm.ShmUnavailable, match="expired"):
            shm.claim(late["socket"], late["token"], late["nbytes"])
        monkeypatch.setattr(limits, "SHM_TOKEN_TTL_S", 5.0)
        session = object()
        gone = server.offer(session, PAGE_BYTES)
        arena = server.region(session).arena
        server.drop(session)
        assert server.region(session) is None and arena.live_runs == 0
        with pytest.raises(shm.ShmUnavailable, match="expired"):
            shm.claim(gone["socket"], gone["token"], gone["nbytes"])
    finally:
        server.close()


def test_the_regions_a_daemon_gives_are_bounded_in_total(monkeypatch):
    monkeypatch.setattr(limits, "MAX_SHM_TOTAL_BYTES", 5 * PAGE_BYTES)
    server = shm.ShmServer("node", torch.device("cpu"))
    try:
        first = object()
        server.offer(first, PAGE_BYTES)  # two pages
        server.offer(object(), PAGE_BYTES)  # four
        with pytest.raises(shm.ShmUnavailable, match="would pass MAX_SHM_TOTAL_BYTES"):
            server.offer(object(), PAGE_BYTES)
        server.offer(first, PAGE_BYTES)  # a session's new region replaces its old one
    finally:
        server.close()


def test_concurrent_offers_cannot_pass_the_caps_together(monkeypatch):
    """Offers are made on the executor's threads and build their region outside the lock: each one
    reserves its bytes and its offer slot first, so eight at once still give at most the cap."""
    monkeypatch.setattr(limits, "MAX_SHM_TOTAL_BYTES", 5 * PAGE_BYTES)  # room for two regions
    made = shm.make_region
    both_checked = threading.Barrier(2, timeout=5)

    def slow_region(nbytes):
        with contextlib.suppress(threading.BrokenBarrierError):
            both_checked.wait()  # the first two have both passed the check before either has a region
        return made(nbytes)

    monkeypatch.setattr(shm, "make_region", slow_region)
    server = shm.ShmServer("node", torch.device("cpu"))
    start = threading.Barrier(8, timeout=5)
    outcomes: list = []

    def one() -> None:
        start.wait()
        try:
            outcomes.append(server.offer(object(), PAGE_BYTES))
        except shm.ShmUnavailable as error:
            outcomes.append(error)

    try:
        threads = [threading.Thread(target=one) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        given = [o for o in outcomes if isinstance(o, dict)]
        refused = [o for o in outcomes if isinstance(o, shm.ShmUnavailable)]
        assert len(outcomes) == 8 and len(given) == 2, outcomes
        assert all("would pass MAX_SHM_TOTAL_BYTES" in str(e) for e in refused)
        assert sum(o["nbytes"] for o in given) <= limits.MAX_SHM_TOTAL_BYTES
        assert server._reserved == {}  # every reservation became a region or was given back
    finally:
        server.close()


def test_an_offer_that_fails_gives_its_reservation_back(monkeypatch):
    monkeypatch.setattr(limits, "MAX_SHM_TOTAL_BYTES", 3 * PAGE_BYTES)  # room for one region
    made = shm.make_region
    monkeypatch.setattr(shm, "make_region", lambda nbytes: (_ for _ in ()).throw(OSError(24, "Too many open files")))
    server = shm.ShmServer("node", torch.device("cpu"))
    try:
        with pytest.raises(OSError, match="Too many open files"):
            server.offer(object(), PAGE_BYTES)
        monkeypatch.setattr(shm, "make_region", made)
        assert server.offer(object(), PAGE_BYTES)["nbytes"] == 2 * PAGE_BYTES  # the failed one holds nothing
    finally:
        server.close()


# --- descriptors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"offset": 2 * PAGE_BYTES - 64}, "not a 64-aligned range of the 2097152-byte region"),
    ({"offset": -64}, "not a 64-aligned range"),
    ({"offset": 3}, "not a 64-aligned range"),
    ({"offset": 1 << 62}, "not a 64-aligned range"),
    ({"offset": "0"}, "shm offset='0' must be an integer"),
    ({"offset": True}, "shm offset=True must be an integer"),
    ({"region": 2}, "shm region 2 is not this connection's (region 1)"),
    ({"nbytes": 64}, "is not the size of a [1, 24, 64] torch.bfloat16 tensor"),
    ({"shape": [1, 24, 32]}, "this stage expects [1, 24, 64]"),
    ({"dtype": "float32"}, "shm input is 'float32'; this stage computes in torch.bfloat16"),
    ({"dtype": "uint8"}, "shm input is 'uint8'"),
])
def test_a_descriptor_outside_the_region_or_unlike_the_input_is_refused(change, message):
    fd, memory = shm.make_region(2 * PAGE_BYTES)
    os.close(fd)  # the mapping keeps the memory
    region = shm.Inbound(1, shm.region_arena(memory, "t", torch.device("cpu")), None, None)  # (no bells: not rung)
    good = {"region": 1, "offset": 0, "nbytes": 24 * 64 * 2, "shape": [1, 24, 64], "dtype": "bfloat16"}
    assert shm.check_descriptor(good, region, SHAPE, torch.bfloat16) == (0, 24 * 64 * 2)
    with pytest.raises(MeshError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        shm.check_descriptor({**good, **change}, region, SHAPE, torch.bfloat16)
    with pytest.raises(MeshError, match="holds no shared region"):
        shm.check_descriptor(good, None, SHAPE, torch.bfloat16)


# --- streams through a region ---------------------------------------------------------------------


async def test_streams_through_the_region_arrive_exact_with_one_region_and_no_chunk_stream():
    channel, receiver, serving, link = await shm_link()
    try:
        for step in range(12):
            tensor = activation(step)
            _, sent = await send_activation(channel, {}, [], tensor, link)
            got, rx = receiver.received.pop()
            assert torch.equal(got, tensor) and rx.transport == "host-shm" and sent.chunks == 0
        region = receiver.server.region(receiver.session)
        assert region.id == 1, "the region was made once and reused"
        # Two steps at once (two generations on one link) take the region's two runs.
        pair = [activation(100), activation(101)]
        await asyncio.gather(*(send_activation(channel, {}, [], t, link) for t in pair))
        # each activation arrived (two overlapping runs would deliver one tensor twice)
        assert len(receiver.received) == 2
        assert all(any(torch.equal(got, t) for got, _ in receiver.received) for t in pair)
        assert await eventually(lambda: link.shm._region[1].live_runs == 0)
    finally:
        await close_link(channel, receiver, serving, link)


async def test_a_bigger_stream_gets_a_bigger_region_and_a_full_region_sends_over_tcp():
    channel, receiver, serving, link = await shm_link()
    try:
        await send_activation(channel, {}, [], activation(0), link)
        first = receiver.server.region(receiver.session).arena
        big = (1, TEXT + SIDE * SIDE, 64 * 1024)  # 3 MiB: more than the first region holds
        receiver.shape = big
        tensor = activation(1, big)
        await send_activation(channel, {}, [], tensor, link)
        got, rx = receiver.received.pop()
        assert torch.equal(got, tensor) and rx.transport == "host-shm"
        assert receiver.server.region(receiver.session).id == 2 and first._closed
        taken = link.shm._region[1].allocate(link.shm._region[1].nbytes)  # every page in use
        await send_activation(channel, {}, [], tensor, link)
        got, rx = receiver.received.pop()
        assert torch.equal(got, tensor) and rx.transport == "tcp", "no room: the same bytes over TCP"
        del taken
    finally:
        await close_link(channel, receiver, serving, link)


async def test_an_out_of_bounds_offset_is_refused_and_the_connection_serves_on(monkeypatch):
    channel, receiver, serving, link = await shm_link()
    try:
        await send_activation(channel, {}, [], activation(0), link)
        arena = link.shm._region[1]
        monkeypatch.setattr(arena, "offset_of", lambda run: arena.nbytes - 64)  # a peer lying about its offset
        with pytest.raises(MeshError, match="are not a 64-aligned range of the 2097152-byte region") as refused:
            await send_activation(channel, {}, [], activation(1), link)
        assert refused.value.code == "bad-request"
        monkeypatch.undo()
        assert not arena.closed, "an answered refusal leaves the region in use (the receiver is done with the run)"
        tensor = activation(2)
        await send_activation(channel, {}, [], tensor, link)
        assert torch.equal(receiver.received.pop()[0], tensor)
        assert receiver.server.region(receiver.session).id == 1
    finally:
        await close_link(channel, receiver, serving, link)


async def test_a_refused_offer_is_one_line_and_the_link_stays_on_tcp(caplog):
    channel, receiver, serving, link = await shm_link()
    receiver.server.close()  # a receiver that cannot give regions any more
    try:
        with caplog.at_level(logging.INFO, logger="meshd.wire.shm"):
            for step in range(3):
                tensor = activation(step)
                await send_activation(channel, {}, [], tensor, link)
                got, rx = receiver.received.pop()
                assert torch.equal(got, tensor) and rx.transport == "tcp"
        lines = [r.getMessage() for r in caplog.records if r.name == "meshd.wire.shm"]
        assert len(lines) == 1 and "shared memory to test-peer unavailable" in lines[0]
        assert "shutting down" in lines[0] and lines[0].endswith("the link uses TCP (asked again in 30 s)")
    finally:
        await close_link(channel, receiver, serving, link)


async def test_a_failed_setup_is_asked_for_again_after_a_doubling_wait_and_the_link_comes_back(
        monkeypatch, caplog):
    """The receiver's regions are at their cap for a while (other heads'), then free. Steps meanwhile go
    over TCP and never ask (a setup is no step's wait); a link chosen again (a generation's prepare, as
    the relay asks) asks after SHM_RETRY_S, then after twice that, and is back on shared memory once it
    can be; the log says it failed once and that it works again."""
    monkeypatch.setattr(limits, "SHM_RETRY_S", 0.4)
    channel, receiver, serving, link = await shm_link()
    offered, full = receiver.server.offer, [True, True]
    asked = []

    def offer(session, nbytes):
        asked.append(nbytes)
        if full and full.pop():
            raise shm.ShmUnavailable("4096 MiB of shared regions are held already (test)")
        return offered(session, nbytes)

    monkeypatch.setattr(receiver.server, "offer", offer)

    async def generation(n: int) -> str:
        """A prepare's link choice, then one step."""
        await link.shm.arena(channel, math.prod(SHAPE) * 2, retry=True)
        await send_activation(channel, {}, [], activation(n), link)
        return receiver.received.pop()[1].transport

    try:
        with caplog.at_level(logging.DEBUG, logger="meshd.wire.shm"):
            assert await generation(0) == "tcp" and len(asked) == 1
            assert await generation(1) == "tcp" and len(asked) == 1, "not asked again before the wait is over"
            await asyncio.sleep(0.5)
            await send_activation(channel, {}, [], activation(2), link)
            assert len(asked) == 1, "a step does not ask"
            assert await generation(2) == "tcp" and len(asked) == 2, "asked again, and full again"
            await asyncio.sleep(0.5)
            assert await generation(3) == "tcp" and len(asked) == 2, "the wait doubled after the second failure"
            await asyncio.sleep(0.4)
            assert await generation(4) == "host-shm" and len(asked) == 3
            assert await generation(5) == "host-shm" and len(asked) == 3
        said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "meshd.wire.shm"]
        assert [level for level, _ in said] == [logging.INFO, logging.DEBUG, logging.INFO], said
        assert "held already (test)); the link uses TCP (asked again in 0 s)" in said[0][1]
        assert said[2][1] == "shared memory to test-peer works again"
    finally:
        await close_link(channel, receiver, serving, link)


async def test_a_setup_that_cannot_work_soon_waits_longest_and_a_lost_connection_is_no_failure(monkeypatch):
    monkeypatch.setattr(limits, "SHM_RETRY_S", 0.2)
    monkeypatch.setattr(limits, "SHM_RETRY_MAX_S", 60.0)
    channel, receiver, serving, link = await shm_link()
    asked = []

    async def refuse(request):  # a peer with shared memory switched off
        asked.append(request.op)
        raise MeshError("bad-request", "B takes no shared memory (same_host_shm = false)")

    receiver.session.handler = refuse
    try:
        nbytes = math.prod(SHAPE) * 2
        assert await link.shm.arena(channel, nbytes, retry=True) is None and len(asked) == 1
        await asyncio.sleep(0.3)
        assert await link.shm.arena(channel, nbytes, retry=True) is None and len(asked) == 1, \
            "switched off at the peer: asked again only after the longest wait"
    finally:
        await close_link(channel, receiver, serving, link)
    sender = shm.ShmSender("gone-peer", torch.device("cpu"))
    client, served = await sealed_pair()
    lost = Channel(client)

    async def setup(channel, nbytes):
        await channel.close()
        raise MeshError("peer-lost", "connection closed")

    monkeypatch.setattr(sender, "_setup", setup)
    assert await sender.arena(lost, nbytes, retry=True) is None
    assert sender.failed is None, "the connection ended, not shared memory: the next connection asks at once"
    await served.close()


def test_a_stream_that_does_not_fill_its_run_is_a_mismatch_not_an_internal_error():
    fd, memory = shm.make_region(2 * PAGE_BYTES)
    os.close(fd)
    arena = shm.region_arena(memory, "t", torch.device("cpu"))
    placed = SharedRun(1, arena, arena.allocate(24 * 64 * 2), None, None)  # (not announced: no bells)
    with pytest.raises(MeshError, match="a stream of 1536 bytes does not fill the 3072-byte run") as refused:
        placed.place(torch.zeros(1, 12, 64, dtype=torch.bfloat16))
    assert refused.value.code == "mismatch"
    placed.place(activation(0))
    assert placed.shape == SHAPE and placed.descriptor()["return"] is True


def prediction_of(reply) -> torch.Tensor:
    (prediction,) = unpack_raw([reply.header["prediction"]], reply.segments, torch.device("cpu"))
    return prediction


async def test_the_prediction_comes_back_in_the_run_and_the_run_goes_back_after():
    channel, receiver, serving, link = await shm_link(receiver_type=LastStage)
    try:
        for step in range(6):
            tensor = activation(step)
            reply, _ = await send_activation(channel, {}, [], tensor, link)
            assert reply.header["prediction_shm"] == {"nbytes": 4 * HIDDEN * 2}, "not over TCP"
            assert torch.equal(prediction_of(reply), tensor[:, :4] * 2)
            assert torch.equal(receiver.received.pop()[0], tensor)
        assert receiver.server.region(receiver.session).id == 1
        assert await eventually(lambda: link.shm._region[1].live_runs == 0)
    finally:
        await close_link(channel, receiver, serving, link)


async def test_a_sender_that_does_not_take_the_prediction_back_gets_it_over_tcp(monkeypatch):
    channel, receiver, serving, link = await shm_link(receiver_type=LastStage)
    described = SharedRun.descriptor
    monkeypatch.setattr(SharedRun, "descriptor", lambda self: {**described(self), "return": False})
    try:
        tensor = activation(0)
        reply, _ = await send_activation(channel, {}, [], tensor, link)
        assert "prediction_shm" not in reply.header and torch.equal(prediction_of(reply), tensor[:, :4] * 2)
        monkeypatch.setattr(SharedRun, "descriptor", lambda self: {**described(self), "return": "yes"})
        with pytest.raises(MeshError, match="shm return='yes' must be true or false") as refused:
            await send_activation(channel, {}, [], tensor, link)
        assert refused.value.code == "bad-request"
    finally:
        await close_link(channel, receiver, serving, link)


@pytest.mark.parametrize("lie", [{"nbytes": 1 << 40}, {"nbytes": 0}, {"nbytes": "8"}, "8", None], ids=str)
async def test_a_prediction_placed_outside_the_run_is_a_protocol_error_naming_the_field(lie):
    channel, receiver, serving, link = await shm_link(receiver_type=LastStage)
    receiver.answer = lambda fields, segments: ({**fields, "prediction_shm": lie}, segments)
    try:
        with pytest.raises(MeshError, match=f"prediction_shm=.* is not a place in the {24 * HIDDEN * 2}-byte run") as refused:
            await send_activation(channel, {}, [], activation(0), link)
        assert refused.value.code == "protocol"
    finally:
        await close_link(channel, receiver, serving, link)


async def test_a_prediction_both_in_the_run_and_over_tcp_is_refused():
    channel, receiver, serving, link = await shm_link(receiver_type=LastStage)
    receiver.answer = lambda fields, segments: (fields, [b"\0" * 64])
    try:
        with pytest.raises(MeshError, match="or the prediction came twice"):
            await send_activation(channel, {}, [], activation(0), link)
    finally:
        await close_link(channel, receiver, serving, link)


async def test_a_forward_given_up_retires_its_region_and_the_next_stream_gets_a_new_one():
    """The receiver may still read the run of a forward the sender stopped waiting for, or write a
    prediction into it: none of that region's runs is handed out again, and the next stream asks for
    a new region (once no forward through the old one is in flight) and arrives exact."""
    channel, receiver, serving, link = await shm_link(receiver_type=LastStage)
    try:
        await send_activation(channel, {}, [], activation(0), link)
        old = link.shm._region[1]
        receiver.hold = asyncio.Event()
        waiting = asyncio.ensure_future(send_activation(channel, {}, [], activation(1), link))
        assert await eventually(lambda: len(receiver.received) == 2)  # the receiver has it, and holds on
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert waiting.cancelled() and old.closed, "the region the given-up forward went through hands out no run"
        del waiting  # (its exception's frames hold the given-up run: the link uses TCP while they live)
        gc.collect()
        assert await eventually(lambda: old.live_runs == 0)
        receiver.hold = None
        tensor = activation(2)
        reply, _ = await send_activation(channel, {}, [], tensor, link)
        assert torch.equal(receiver.received.pop()[0], tensor) and receiver.received.pop()[1].transport == "host-shm"
        assert torch.equal(prediction_of(reply), tensor[:, :4] * 2)
        assert receiver.server.region(receiver.session).id == 2 and link.shm._region[1] is not old
    finally:
        await close_link(channel, receiver, serving, link)


# --- forwards ahead of their stream: the doorbell --------------------------------------------------


async def announced(channel, link, shape=SHAPE) -> SharedRun:
    """A run reserved and announced as the head does it, before its stream is computed."""
    placed = await reserve_shared(channel, link, math.prod(shape) * 2)
    assert placed is not None
    placed.announce(shape, torch.bfloat16)
    return placed


async def test_a_forward_sent_ahead_waits_for_its_doorbell_and_its_stream_arrives_exact():
    channel, receiver, serving, link = await shm_link(receiver_type=LastStage)
    try:
        await send_activation(channel, {}, [], activation(0), link)  # the region is set up
        receiver.received.clear()
        for step in range(1, 5):
            placed = await announced(channel, link)
            tensor = activation(step)
            sending = asyncio.ensure_future(send_shared(channel, {}, [], None, link, placed=placed))
            await asyncio.sleep(0.2)
            assert not receiver.received and not sending.done(), "nothing is taken before the doorbell rings"
            placed.place(tensor)
            placed.ring()
            reply, sent = await sending
            got, rx = receiver.received.pop()
            assert torch.equal(got, tensor) and rx.ahead and rx.breakdown()["ahead"] is True
            assert torch.equal(prediction_of(reply), tensor[:, :4] * 2) and sent.raw_bytes == tensor.numel() * 2
        # Rung before its forward arrives (a compute faster than the frame): kept, and taken at once.
        placed = await announced(channel, link)
        tensor = activation(9)
        placed.place(tensor)
        placed.ring()
        await asyncio.sleep(0.1)
        reply, _ = await send_shared(channel, {}, [], None, link, placed=placed)
        assert torch.equal(receiver.received.pop()[0], tensor) and torch.equal(prediction_of(reply), tensor[:, :4] * 2)
        assert receiver.server.region(receiver.session).id == 1, "one region throughout"
    finally:
        await close_link(channel, receiver, serving, link)


PREDICTION = (1, 4, HIDDEN)  # what LastStage gives back


async def test_the_prediction_of_a_forward_sent_ahead_is_taken_when_it_rings_back_before_the_reply():
    channel, receiver, serving, link = await shm_link(receiver_type=LastStage)
    try:
        await send_activation(channel, {}, [], activation(0), link)  # the region is set up
        receiver.hold_reply = asyncio.Event()
        for step in range(1, 4):
            placed = await announced(channel, link)
            tensor = activation(step)
            sending = asyncio.ensure_future(send_shared(channel, {}, [], None, link, placed=placed))
            placed.place(tensor)
            placed.ring()
            early = await asyncio.wait_for(placed.answered(sending, PREDICTION, torch.bfloat16, "B"), 5)
            assert not sending.done() and torch.equal(early, tensor[:, :4] * 2), "taken before the reply"
            receiver.hold_reply.set()
            reply, _ = await sending
            receiver.hold_reply.clear()
            assert torch.equal(prediction_of(reply), early) and placed.answered_bytes == early.numel() * 2
            assert np.shares_memory(reply.segments[0], placed.run), "not copied again: the reply's view of the run"
        # The reply first (a stage that rang back late, or not at all): the prediction comes with it.
        receiver.hold_reply = None
        placed = await announced(channel, link)
        tensor = activation(9)
        placed.place(tensor)
        reply = asyncio.get_running_loop().create_future()
        reply.set_result(None)
        assert await placed.answered(reply, PREDICTION, torch.bfloat16, "B") is None
        placed.ring()
        reply, _ = await send_shared(channel, {}, [], None, link, placed=placed)
        assert torch.equal(prediction_of(reply), tensor[:, :4] * 2)
        assert receiver.server.region(receiver.session).id == 1, "one region throughout"
    finally:
        await close_link(channel, receiver, serving, link)


@pytest.mark.parametrize("lie, message", [
    (lambda fields, segments: ({**fields, "prediction_shm": {"nbytes": 64}}, segments),
     "prediction_shm=.* is not the 512-byte prediction it rang back"),
    (lambda fields, segments: ({k: v for k, v in fields.items() if k != "prediction_shm"}, [b"\0" * 512]),
     "rang back a prediction in the shared run, then sent one over TCP"),
], ids=["other-place", "over-tcp"])
async def test_a_reply_unlike_the_prediction_rung_back_is_a_protocol_error(lie, message):
    channel, receiver, serving, link = await shm_link(receiver_type=LastStage)
    try:
        await send_activation(channel, {}, [], activation(0), link)
        receiver.answer, receiver.hold_reply = lie, asyncio.Event()
        placed = await announced(channel, link)
        sending = asyncio.ensure_future(send_shared(channel, {}, [], None, link, placed=placed))
        placed.place(activation(1))
        placed.ring()
        assert await asyncio.wait_for(placed.answered(sending, PREDICTION, torch.bfloat16, "B"), 5) is not None
        receiver.hold_reply.set()
        with pytest.raises(MeshError, match=message) as lied:
            await sending
        assert lied.value.code == "protocol"
    finally:
        await close_link(channel, receiver, serving, link)


async def test_a_stage_that_rings_back_before_it_was_rung_is_a_protocol_error():
    """As the head does it: the forward goes, the compute places and rings, then the head waits for the
    answer. A token the stage rang back before the head rang is kept by the bell, and refused: the run
    holds the head's own stream, not a prediction."""
    channel, receiver, serving, link = await shm_link()

    async def lying(request):  # rings the prediction back at once, without waiting or reading
        receiver.server.region(request.session).answer.notify(request.header["shm"]["ring"])
        await asyncio.Event().wait()

    try:
        await send_activation(channel, {}, [], activation(0), link)
        receiver.take = lying
        placed = await announced(channel, link)
        sending = asyncio.ensure_future(send_shared(channel, {}, [], None, link, placed=placed))
        assert await eventually(lambda: placed.token in placed.answers._rung), "rung back, before the head rang"
        placed.place(activation(1))
        placed.ring()
        with pytest.raises(MeshError, match="rang back a prediction before its stream was in the shared run") as lied:
            await asyncio.wait_for(placed.answered(sending, PREDICTION, torch.bfloat16, "B"), 5)
        assert lied.value.code == "protocol" and lied.value.peer == "B"
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
    finally:
        await close_link(channel, receiver, serving, link)


async def test_a_stage_rings_back_only_for_a_sender_that_asks(monkeypatch):
    """A sender of the version before the answer bell (it asks for no ``answer``; it got the bell's
    descriptor cut off by the kernel) is never rung back: nothing would read the pipe."""
    channel, receiver, serving, link = await shm_link(receiver_type=LastStage)
    described = SharedRun.descriptor
    try:
        await send_activation(channel, {}, [], activation(0), link)
        monkeypatch.setattr(SharedRun, "descriptor", lambda self: {k: v for k, v in described(self).items()
                                                                 if k != "answer"})
        placed = await announced(channel, link)
        tensor = activation(1)
        placed.place(tensor)
        placed.ring()
        reply, _ = await send_shared(channel, {}, [], None, link, placed=placed)
        assert torch.equal(prediction_of(reply), tensor[:, :4] * 2)
        await asyncio.sleep(0.1)
        assert placed.token not in placed.answers._rung, "not rung back"
        monkeypatch.setattr(SharedRun, "descriptor", lambda self: {**described(self), "answer": "yes"})
        placed = await announced(channel, link)
        placed.place(tensor)
        placed.ring()
        with pytest.raises(MeshError, match="shm answer='yes' must be true or false") as refused:
            await send_shared(channel, {}, [], None, link, placed=placed)
        assert refused.value.code == "bad-request"
    finally:
        await close_link(channel, receiver, serving, link)


async def test_a_forward_given_up_before_it_rang_stops_the_wait_and_retires_the_region():
    """A head whose compute fails (or whose generation is cancelled) after its forward went: the
    stage stops waiting for a stream that never comes, and the next stream arrives through a new region."""
    channel, receiver, serving, link = await shm_link(receiver_type=LastStage)
    try:
        await send_activation(channel, {}, [], activation(0), link)
        receiver.received.clear()
        old = link.shm._region[1]
        doorbell = receiver.server.region(receiver.session).doorbell
        placed = await announced(channel, link)
        sending = asyncio.ensure_future(send_shared(channel, {}, [], None, link, placed=placed))
        assert await eventually(lambda: len(doorbell._waiting) == 1), "the stage waits for the doorbell"
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        assert await eventually(lambda: not doorbell._waiting), "the cancel stopped the stage's wait"
        assert old.closed and not receiver.received
        del sending, placed
        gc.collect()
        assert await eventually(lambda: old.live_runs == 0)
        tensor = activation(1)
        reply, _ = await send_activation(channel, {}, [], tensor, link)
        assert torch.equal(receiver.received.pop()[0], tensor) and torch.equal(prediction_of(reply), tensor[:, :4] * 2)
        assert receiver.server.region(receiver.session).id == 2
        assert await eventually(lambda: doorbell._thread is not None and not doorbell._thread.is_alive(), 3.0), \
            "the replaced region's doorbell thread ended"
    finally:
        await close_link(channel, receiver, serving, link)


@pytest.mark.parametrize("ring, message", [
    (0, "shm ring=0 must be a doorbell token in 1..2\\*\\*64-1"),
    ("1", "shm ring='1' must be a doorbell token"),
    (True, "shm ring=True must be a doorbell token"),
    (-5, "shm ring=-5 must be a doorbell token"),
])
async def test_a_ring_that_is_no_token_is_refused_naming_the_field(ring, message, monkeypatch):
    channel, receiver, serving, link = await shm_link()
    described = SharedRun.descriptor
    monkeypatch.setattr(SharedRun, "descriptor", lambda self: {**described(self), "ring": ring})
    try:
        with pytest.raises(MeshError, match=message) as refused:
            await send_activation(channel, {}, [], activation(0), link)
        assert refused.value.code == "bad-request"
    finally:
        await close_link(channel, receiver, serving, link)


async def test_a_stream_never_rung_for_is_an_error_within_the_bound_and_the_link_serves_on(monkeypatch):
    channel, receiver, serving, link = await shm_link()
    monkeypatch.setattr(limits, "SHM_READY_TIMEOUT_S", 0.3)
    try:
        await send_activation(channel, {}, [], activation(0), link)
        placed = await announced(channel, link)
        with pytest.raises(MeshError, match="the stream of this forward was not rung within 0 s") as lost:
            await send_shared(channel, {}, [], None, link, placed=placed)
        assert lost.value.code == "peer-lost" and not link.shm._region[1].closed, "answered: the region stays"
        tensor = activation(1)
        await send_activation(channel, {}, [], tensor, link)
        assert torch.equal(receiver.received.pop()[0], tensor)
    finally:
        await close_link(channel, receiver, serving, link)


async def test_a_stage_that_answers_before_it_was_rung_is_a_protocol_error():
    channel, receiver, serving, link = await shm_link()
    receiver.take = lambda request: asyncio.sleep(0)  # a lying stage: answers without waiting or reading
    try:
        await send_activation(channel, {}, [], activation(0), link)
        placed = await announced(channel, link)
        with pytest.raises(MeshError, match="answered a forward before its stream was in the shared run") as lied:
            await send_shared(channel, {}, [], None, link, placed=placed)
        assert lied.value.code == "protocol"
    finally:
        await close_link(channel, receiver, serving, link)


async def claimed_doorbell():
    """A region offered and claimed over the real socket: (server, session, the sender's Bell, the
    receiver's Doorbell, the sender's answer bell). Close the last and the first."""
    server = shm.ShmServer("node", torch.device("cpu"))
    session = object()
    offer = server.offer(session, PAGE_BYTES)
    _, bell, answers = await asyncio.get_running_loop().run_in_executor(
        None, shm.claim, offer["socket"], offer["token"], offer["nbytes"])
    return server, session, bell, server.region(session).doorbell, answers


async def test_a_doorbell_wakes_each_forward_by_its_token_and_fails_them_when_it_ends():
    server, session, bell, doorbell, answers = await claimed_doorbell()
    try:
        first, second = bell.token(), bell.token()
        assert (first, second) == (1, 2)
        waits = [doorbell.wait(second), doorbell.wait(first)]
        with pytest.raises(MeshError, match="shm ring=2 is awaited by another forward"):
            await doorbell.wait(second)
        bell.ring(first)
        await asyncio.wait_for(waits[1], 2)
        assert not waits[0].done(), "a token wakes only its own forward"
        for token in range(100, 100 + shm.RUNG_KEPT + 1):  # rung for forwards that never came: the oldest go
            bell.ring(token)
        bell.ring(second)
        await asyncio.wait_for(waits[0], 2)
        assert await eventually(lambda: 100 not in doorbell._rung and len(doorbell._rung) == shm.RUNG_KEPT)
        kept = doorbell.wait(100 + shm.RUNG_KEPT)
        assert kept.done() and isinstance(kept.result(), float), "a token rung before its forward is kept"
        late = doorbell.wait(7)
        del bell  # the sender lets the region go: the pipe's end closes
        gc.collect()
        with pytest.raises(MeshError, match="the sender closed the shared region's doorbell") as ended:
            await asyncio.wait_for(late, 3)
        assert ended.value.code == "peer-lost"
        with pytest.raises(MeshError, match="closed the shared region's doorbell"):
            await doorbell.wait(8)
    finally:
        answers.close()
        server.close()


async def test_a_dropped_region_fails_the_forwards_waiting_on_its_doorbell():
    server, session, bell, doorbell, answers = await claimed_doorbell()
    try:
        waiting = doorbell.wait(bell.token())
        server.drop(session)  # its connection ended
        with pytest.raises(MeshError, match="the shared region this forward's stream was in is gone"):
            await asyncio.wait_for(waiting, 2)
        assert await eventually(lambda: not doorbell._thread.is_alive(), 3.0)
        with pytest.raises(OSError):
            bell.ring(1)  # the receiver's end is closed: the sender hears it (its forward fails anyway)
    finally:
        answers.close()
        server.close()


async def test_the_answer_bell_rings_the_sender_back_and_ends_when_the_receiver_lets_the_region_go():
    server, session, bell, doorbell, answers = await claimed_doorbell()
    try:
        token = bell.token()
        back = answers.wait(token)
        server.region(session).answer.notify(token)  # the receiver: the prediction is in the run
        await asyncio.wait_for(back, 2)
        waiting = answers.wait(bell.token())
        server.drop(session)  # its connection ended: the receiver's end goes with the region
        gc.collect()
        with pytest.raises(MeshError, match="the receiver closed the shared region's doorbell") as ended:
            await asyncio.wait_for(waiting, 3)
        assert ended.value.code == "peer-lost"
        assert await eventually(lambda: not answers._thread.is_alive(), 3.0)
    finally:
        answers.close()
        server.close()


def test_a_doorbell_descriptor_that_is_no_pipe_we_can_only_write_is_refused(tmp_path):
    read_end, write_end = os.pipe()
    path = tmp_path / "f"
    path.write_bytes(b"")
    regular = os.open(path, os.O_WRONLY)
    try:
        for fd in (read_end, regular):
            with pytest.raises(shm.ShmUnavailable, match="the received doorbell is not the write end of a pipe"):
                shm.bell_from(fd)
        assert isinstance(shm.bell_from(write_end), shm.Bell)
        for fd in (write_end, regular):
            with pytest.raises(shm.ShmUnavailable, match="the received answer bell is not the read end of a pipe"):
                shm.answers_from(fd, "t")
        answers = shm.answers_from(read_end, "t")
        assert isinstance(answers, shm.Doorbell)
        answers.close()
    finally:
        for fd in (read_end, write_end, regular):
            os.close(fd)


# --- split generations between daemons of this host -------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The all-local run and the folder of its tiny model (the daemons below load the same one)."""
    models = tmp_path_factory.mktemp("models")
    args = argparse.Namespace(device="cpu", models_dir=[models], model="tiny", random_weights=False,
                              size=(64, 64), steps=PARAMS["steps"], guidance=1.0, prompt=PARAMS["prompt"],
                              seed=PARAMS["seed"])
    png, _ = asyncio.run(run_local(args))
    return np.asarray(Image.open(io.BytesIO(png))), models


def transports(outcome) -> tuple[str, list[str]]:
    link = outcome.summary["stages"][0]["link"]["transport"]
    hops = [hop.get("transport", "tcp") for step in outcome.summary["steps"] for p in step["passes"] for hop in p["hops"]]
    return link, hops


@pytest.mark.parametrize("a_config, b_config, expected", [
    ({"same_host_ipc": False}, {"same_host_ipc": False}, "host-shm"),
    ({"same_host_shm": False}, {}, "tcp"),
    ({}, {"same_host_shm": False}, "tcp"),
], ids=["shm", "sender-off", "receiver-off"])
async def test_a_split_between_daemons_of_this_host_uses_shared_memory_unless_switched_off(
        tmp_path, reference, caplog, a_config, b_config, expected):
    local, models = reference
    async with running_daemon(tmp_path / "a", KEY, blocks=range(0, 3), models_dir=models, **a_config) as a, \
            running_daemon(tmp_path / "b", KEY, blocks=range(3, 6), models_dir=models, **b_config) as b:
        with caplog.at_level(logging.INFO, logger="meshd.wire.shm"):
            for _ in range(2):  # the second generation reuses the link's region
                outcome = await split_generation(KEY, [a.bound, b.bound], "A:0-2,B:3-5", PARAMS, codec="raw")
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(outcome.png))), local)
                link, hops = transports(outcome)
                assert link == expected and hops == [expected] * PARAMS["steps"]
        said = [r.getMessage() for r in caplog.records if r.name == "meshd.wire.shm"]
        if "same_host_shm" in b_config:  # B refused A's offer: said once, then TCP
            assert len(said) == 1 and "same_host_shm = false" in said[0], said
        else:
            assert said == []
        if expected == "host-shm":
            hops = [hop for step in outcome.summary["steps"] for p in step["passes"] for hop in p["hops"]]
            assert all(hop["d2h_ms"] is not None and hop["h2d_ms"] is not None and hop["chunks"] == 0 for hop in hops)
            assert all(hop["ahead"] is True for hop in hops), "the head's forwards went ahead of their streams"
            # (which comes first, the answer bell or the reply, is the event loop's: the bell, as a rule)
            answered = [p["answered"] for step in outcome.summary["steps"] for p in step["passes"]]
            assert any(answered), "the head took predictions on the stage's answer bell, before the reply"
            assert len(b.shm._regions) == 1 and next(iter(b.shm._regions.values())).id == 1
        # The prediction came back in the run its stream went out in, never over TCP, where it could.
        returns = [p["return_via"] for step in outcome.summary["steps"] for p in step["passes"]]
        assert returns == ["host-shm" if expected == "host-shm" else "tcp"] * PARAMS["steps"]
    gc.collect()


async def test_a_chain_of_three_daemons_of_this_host_sends_every_hop_ahead_and_equals_all_local(tmp_path, reference):
    """The middle stage's forward goes ahead of its stream too, and the prediction rung back by the last
    stage is passed back up before either reply: every hop through shared memory, exact."""
    local, models = reference
    config = {"same_host_ipc": False}
    async with running_daemon(tmp_path / "a", KEY, blocks=range(0, 2), models_dir=models, **config) as a, \
            running_daemon(tmp_path / "b", KEY, blocks=range(2, 4), models_dir=models, **config) as b, \
            running_daemon(tmp_path / "c", KEY, blocks=range(4, 6), models_dir=models, **config) as c:
        answered = []  # (whose answer bell, whether the prediction was taken from it before the reply)
        original = SharedRun.answered

        async def recorded(self, reply, shape, dtype, peer):
            got = await original(self, reply, shape, dtype, peer)
            answered.append((peer, got is not None))
            return got

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(SharedRun, "answered", recorded)
            for _ in range(2):
                outcome = await split_generation(KEY, [a.bound, b.bound, c.bound], "A:0-1,B:2-3,C:4-5", PARAMS,
                                                 codec="raw")
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(outcome.png))), local)
                passes = [p for step in outcome.summary["steps"] for p in step["passes"]]
                assert all([hop["transport"] for hop in p["hops"]] == ["host-shm"] * 2 for p in passes)
                assert all(hop["ahead"] is True for p in passes for hop in p["hops"]), "both hops went ahead"
                assert [p["return_via"] for p in passes] == ["host-shm"] * PARAMS["steps"]
        by_middle = [early for peer, early in answered if peer == f"{c.bound[0]}:{c.bound[1]}"]
        assert len(by_middle) == 2 * PARAMS["steps"], answered
        # (which comes first, the answer bell or the reply, is the event loop's: the bell, as a rule)
        assert any(by_middle), "the middle took predictions on the last stage's answer bell and passed them up"
    gc.collect()


async def test_a_middle_stage_whose_compute_fails_after_its_forward_went_ends_the_generation_and_all_serve_on(
        tmp_path, reference, monkeypatch):
    local, models = reference
    config = {"same_host_ipc": False}
    async with running_daemon(tmp_path / "a", KEY, blocks=range(0, 2), models_dir=models, **config) as a, \
            running_daemon(tmp_path / "b", KEY, blocks=range(2, 4), models_dir=models, **config) as b, \
            running_daemon(tmp_path / "c", KEY, blocks=range(4, 6), models_dir=models, **config) as c:
        rang = SharedRun.ring
        calls = []

        def failing(self):
            calls.append(self.token)
            if len(calls) == 4:  # the second step's ring by the middle stage (the head rings first)
                raise MeshError("oom", "GPU cpu ran out of memory (test)")
            rang(self)

        monkeypatch.setattr(SharedRun, "ring", failing)
        plan = "A:0-1,B:2-3,C:4-5"
        with pytest.raises(MeshError, match="ran out of memory \\(test\\)") as failed:
            await asyncio.wait_for(split_generation(KEY, [a.bound, b.bound, c.bound], plan, PARAMS, codec="raw"), 20)
        assert failed.value.code == "oom"
        monkeypatch.undo()
        assert await eventually(lambda: not b.stage.jobs and not c.stage.jobs, 5.0), "both stages dropped the job"
        outcome = await split_generation(KEY, [a.bound, b.bound, c.bound], plan, PARAMS, codec="raw")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(outcome.png))), local)
    gc.collect()


async def test_a_head_whose_compute_fails_after_its_forward_went_ends_the_generation_and_the_stage_serves_on(
        tmp_path, reference, monkeypatch):
    """The forward goes while the head's blocks run; the head's compute then fails (out of memory, say,
    after its blocks): the generation ends with that error at once, the stage stops waiting, and the
    next one is exact."""
    local, models = reference
    config = {"same_host_ipc": False}
    async with running_daemon(tmp_path / "a", KEY, blocks=range(0, 3), models_dir=models, **config) as a, \
            running_daemon(tmp_path / "b", KEY, blocks=range(3, 6), models_dir=models, **config) as b:
        rang = SharedRun.ring
        calls = []

        def failing(self):
            calls.append(self.token)
            if len(calls) == 2:  # the second step's
                raise MeshError("oom", "GPU cpu ran out of memory (test)")
            rang(self)

        monkeypatch.setattr(SharedRun, "ring", failing)
        with pytest.raises(MeshError, match="ran out of memory \\(test\\)") as failed:
            await asyncio.wait_for(split_generation(KEY, [a.bound, b.bound], "A:0-2,B:3-5", PARAMS, codec="raw"), 20)
        assert failed.value.code == "oom"
        monkeypatch.undo()
        assert await eventually(lambda: not b.stage.jobs, 5.0), "the stage dropped the failed generation's job"
        outcome = await split_generation(KEY, [a.bound, b.bound], "A:0-2,B:3-5", PARAMS, codec="raw")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(outcome.png))), local)
        assert transports(outcome)[1] == ["host-shm"] * PARAMS["steps"]
    gc.collect()


@pytest.mark.parametrize("failing", [2, 3], ids=["a-middle-step", "the-last-step"])
async def test_a_reply_that_fails_after_its_prediction_rang_back_ends_the_generation_with_its_error(
        tmp_path, reference, monkeypatch, failing):
    """The head takes a prediction on the answer bell and goes on; the reply that follows is an error
    (the stage's last part of that forward failed): the generation ends with it, at the next forward
    or, after the last step, before the decode, and the next generation is exact. Each step's event
    carries its hop records, in order."""
    local, models = reference
    config = {"same_host_ipc": False}
    async with running_daemon(tmp_path / "a", KEY, blocks=range(0, 3), models_dir=models, **config) as a, \
            running_daemon(tmp_path / "b", KEY, blocks=range(3, 6), models_dir=models, **config) as b:
        outcome = await split_generation(KEY, [a.bound, b.bound], "A:0-2,B:3-5", PARAMS, codec="raw")
        steps = [e for e in outcome.events if isinstance(e, StepRecord)]
        assert [e.step for e in steps] == [1, 2, 3] and all(p.hops for e in steps for p in e.passes)
        replied = StageInput.reply
        seen = []

        def reply(self, fields, segments):
            seen.append(self.returned)
            if len(seen) == failing:
                assert self.returned, "its prediction is in the run (rung back) before the reply"
                raise MeshError("internal", "the stage's reply failed (test)")
            return replied(self, fields, segments)

        monkeypatch.setattr(StageInput, "reply", reply)
        with pytest.raises(MeshError, match="the stage's reply failed \\(test\\)"):
            await asyncio.wait_for(split_generation(KEY, [a.bound, b.bound], "A:0-2,B:3-5", PARAMS, codec="raw"), 20)
        monkeypatch.undo()
        assert await eventually(lambda: not b.stage.jobs, 5.0)
        outcome = await split_generation(KEY, [a.bound, b.bound], "A:0-2,B:3-5", PARAMS, codec="raw")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(outcome.png))), local)
        assert transports(outcome)[1] == ["host-shm"] * PARAMS["steps"]
    gc.collect()


def test_the_split_bench_forces_shared_memory_and_stays_exact(tmp_path):
    """``--transport shm``: CUDA IPC off, shared memory on (``--transport tcp``: tests/test_bench_split.py)."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "bench" / "split_bench.py"), "--model", "tiny", "--random-weights",
         "--device", "cpu", "--size", "64", "--steps", "2", "--codecs", "raw", "--repeat", "1",
         "--transport", "shm", "--interleave", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    (run,) = result["runs"]
    assert run["transports"] == ["host-shm"] and run["bit_identical_latents"] and run["chosen"] == ["raw"]
    assert run["returns"] == ["host-shm"], "the predictions came back in the region"
    assert run["ahead"] == [True], "every forward went ahead of its stream"
    assert result["config"]["link"] == "same host, shared host memory (CUDA IPC off)"
    assert [part["link"] for part in run["hop_breakdown_ms"]] and run["hop_breakdown_ms"][0]["h2d_ms"] is not None
    # --interleave: one all-local generation after each timed split one, its ratio beside the plain one
    assert len(run["local_interleaved_s"]) == len(run["split_seconds"]) == 1
    assert run["split_over_local_interleaved"] > 0 and run["step_split_over_local_interleaved"] > 0


def test_the_split_bench_runs_a_chain_of_three_daemons_with_every_hop_ahead(tmp_path):
    """``--devices cpu,cpu,cpu``: one daemon per device named, the planner's split over all three."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "bench" / "split_bench.py"), "--model", "tiny", "--random-weights",
         "--device", "cpu", "--devices", "cpu,cpu,cpu", "--size", "64", "--steps", "2", "--codecs", "raw",
         "--repeat", "1", "--transport", "shm", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    (run,) = result["runs"]
    assert result["plan"].count("->") == 2 and result["config"]["devices"] == ["cpu"] * 3
    assert run["transports"] == ["host-shm"] and run["bit_identical_latents"] and run["ahead"] == [True]
    assert [part["link"] for part in run["hop_breakdown_ms"]] == ["A -> B", "B -> C"]

