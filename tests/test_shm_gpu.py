"""On the GPU machine: transport host-shm with the regions registered pinned at both ends (run:
``python3 -m pytest tests/test_shm_gpu.py -q -m gpu -s``).

What must hold: a klein-9B-sized raw activation (36 MiB) crosses the shared region bit-exact step
after step, both mappings are driver-registered (so both copies are DMA), the region is made once
and every run goes back after its step; and a split generation between two daemons of this GPU with
CUDA IPC off goes through shared memory and equals the all-local image."""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import statistics
import time

import numpy as np
import pytest
import torch
from PIL import Image

from meshd.node.gpu import GpuWorker
from meshd.pipeline.streaming import reserve_shared, send_activation, send_shared
from meshtui.cli import run_local
from tests.daemons import running_daemon, split_generation
from tests.test_shm import KEY, PARAMS, LastStage, close_link, shm_link, transports
from tests.daemons import eventually

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

#: klein-9B at 1024x1024: 512 text + 64x64 image tokens of 4096 channels, bf16 (36 MiB).
KLEIN = (1, 512 + 64 * 64, 4096)
STEPS = 60


async def test_klein_sized_streams_through_a_pinned_region_stay_bit_exact_over_many_steps():
    device = torch.device("cuda", torch.cuda.current_device())
    channel, receiver, serving, link = await shm_link(device, KLEIN)
    hop_ms, d2h_ms, h2d_ms = [], [], []
    try:
        for step in range(STEPS):
            g = torch.Generator(device=device).manual_seed(step)
            tensor = torch.randn(KLEIN, generator=g, device=device).to(torch.bfloat16)
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            _, sent = await send_activation(channel, {}, [], tensor, link)
            hop_ms.append((time.perf_counter() - t0) * 1e3)
            got, rx = receiver.received.pop()
            assert rx.transport == "host-shm" and got.device == device
            assert torch.equal(got, tensor), f"step {step}: the activation changed on the way"
            d2h_ms.append(sent.d2h_ms)
            h2d_ms.append(rx.h2d_ms)
            del got
        region = receiver.server.region(receiver.session)
        assert region.id == 1, "the region was made once and reused"
        assert region.arena.pinned and link.shm._region[1].pinned, "both mappings are registered with the driver"
        assert rx.staged
        assert await eventually(lambda: link.shm._region[1].live_runs == 0 and region.arena.live_runs == 0)
        print(f"host-shm 36 MiB hop, median of {STEPS}: {statistics.median(hop_ms):.2f} ms "
              f"(d2h {statistics.median(d2h_ms):.2f} ms, h2d {statistics.median(h2d_ms):.2f} ms)")
    finally:
        await close_link(channel, receiver, serving, link)


async def test_klein_sized_streams_sent_ahead_are_rung_from_the_gpu_worker_and_stay_bit_exact():
    """As the head does it: the forward goes first, the GPU worker's call computes the stream, copies it
    into the announced run on its own stream and rings once that copy is done."""
    device = torch.device("cuda", torch.cuda.current_device())
    channel, receiver, serving, link = await shm_link(device, KLEIN)
    worker = GpuWorker(device)
    try:
        await send_activation(channel, {}, [], torch.zeros(KLEIN, dtype=torch.bfloat16, device=device), link)
        receiver.received.clear()
        for step in range(20):
            placed = await reserve_shared(channel, link, math.prod(KLEIN) * 2)
            assert placed is not None
            placed.announce(KLEIN, torch.bfloat16)
            sending = asyncio.ensure_future(send_shared(channel, {}, [], None, link, placed=placed))

            def compute(step=step, placed=placed):
                g = torch.Generator(device=device).manual_seed(step)
                tensor = torch.randn(KLEIN, generator=g, device=device).to(torch.bfloat16)
                placed.place(tensor)  # queued behind the kernels that made it
                placed.ring()
                return tensor

            tensor, _ = await worker.run(compute)
            _, sent = await sending
            got, rx = receiver.received.pop()
            assert rx.ahead and rx.transport == "host-shm" and got.device == device
            assert torch.equal(got, tensor), f"step {step}: the activation changed on the way"
            assert sent.d2h_ms > 0
            del got, placed
        assert receiver.server.region(receiver.session).id == 1
    finally:
        worker.shutdown()
        await close_link(channel, receiver, serving, link)


async def test_a_prediction_given_back_from_the_gpu_rings_back_once_its_copy_is_done_and_is_exact():
    """The last stage's prediction, on its GPU, copied into the run and rung back once that copy has
    finished: the sender takes it from the run before the reply, bit-exact."""
    device = torch.device("cuda", torch.cuda.current_device())
    channel, receiver, serving, link = await shm_link(device, KLEIN, receiver_type=LastStage)
    try:
        await send_activation(channel, {}, [], torch.zeros(KLEIN, dtype=torch.bfloat16, device=device), link)
        receiver.hold_reply = asyncio.Event()
        for step in range(10):
            placed = await reserve_shared(channel, link, math.prod(KLEIN) * 2)
            assert placed is not None
            placed.announce(KLEIN, torch.bfloat16)
            sending = asyncio.ensure_future(send_shared(channel, {}, [], None, link, placed=placed))
            g = torch.Generator(device=device).manual_seed(step)
            tensor = torch.randn(KLEIN, generator=g, device=device).to(torch.bfloat16)
            placed.place(tensor)
            placed.ring()
            early = await asyncio.wait_for(placed.answered(sending, (1, 4, KLEIN[-1]), torch.bfloat16, "B"), 10)
            assert early is not None and not sending.done(), "taken on the answer bell, before the reply"
            assert torch.equal(early, (tensor[:, :4] * 2).cpu()), f"step {step}: the prediction changed on the way"
            receiver.hold_reply.set()
            await sending
            receiver.hold_reply.clear()
            receiver.received.clear()
            del early, placed
    finally:
        await close_link(channel, receiver, serving, link)


async def test_a_split_on_one_gpu_without_cuda_ipc_goes_through_shared_memory_and_equals_all_local(tmp_path):
    models = tmp_path / "models"
    args = argparse.Namespace(device="cuda", models_dir=[models], model="tiny", random_weights=False, size=(64, 64),
                              steps=PARAMS["steps"], guidance=1.0, prompt=PARAMS["prompt"], seed=PARAMS["seed"])
    png, _ = await run_local(args)
    local = np.asarray(Image.open(io.BytesIO(png)))
    async with running_daemon(tmp_path / "a", KEY, blocks=range(0, 3), models_dir=models, device="cuda",
                              same_host_ipc=False) as a, \
            running_daemon(tmp_path / "b", KEY, blocks=range(3, 6), models_dir=models, device="cuda",
                           same_host_ipc=False) as b:
        for _ in range(3):
            outcome = await split_generation(KEY, [a.bound, b.bound], "A:0-2,B:3-5", PARAMS, codec="raw")
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(outcome.png))), local)
            assert transports(outcome) == ("host-shm", ["host-shm"] * PARAMS["steps"])
            assert all(hop["ahead"] is True for step in outcome.summary["steps"] for p in step["passes"]
                       for hop in p["hops"]), "the head's forwards went ahead of their streams"
            assert any(p["answered"] for step in outcome.summary["steps"] for p in step["passes"]), \
                "the head took predictions on the stage's answer bell"
        region = next(iter(b.shm._regions.values()))
        assert region.arena.pinned
