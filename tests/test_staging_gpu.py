"""On the GPU machine: a raw klein-9B-sized stream over sealed loopback TCP through the pinned
staging, step after step (run: ``python3 -m pytest tests/test_staging_gpu.py -q -m gpu``).

What must hold: every tensor arrives bit-exact; both ends really staged (pinned memory, async
copies); the arenas are made once and every run goes back after each step (nothing leaks, nothing
crashes over many steps, the failure the earlier pinned-block design had)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
import torch

from codec import CodecSpec, TokenLayout
from meshd.wire.channel import Channel, ServerSession
from meshd.pipeline.streaming import receive_stream, send_stream
from meshd.wire.staging import PinnedArena
from tests.daemons import eventually, sealed_pair

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

#: klein-9B at 1024x1024: 512 text + 64x64 image tokens of 4096 channels, bf16 (36 MiB).
TEXT, SIDE, HIDDEN = 512, 64, 4096
STEPS = 60


def _holders(runs: list) -> str:
    """What still references the runs that did not go back, for the failure message."""
    gc.collect()
    alive = [r() for r in runs if r() is not None]
    lines = []
    for run in alive[:3]:
        for holder in gc.get_referrers(run):
            if holder is not alive:
                lines.append(f"{type(holder).__name__}: {repr(holder)[:160]}")
    return f"{len(alive)} runs alive; held by: " + "; ".join(lines[:12])


async def test_raw_streams_through_pinned_staging_stay_bit_exact_and_reuse_one_arena_per_direction(monkeypatch):
    runs: list = []  # weak references to every run handed out, to name what holds one at the end
    allocate = PinnedArena.allocate

    def tracked(self, nbytes):
        run = allocate(self, nbytes)
        if run is not None:
            runs.append(weakref.ref(run))
        return run

    monkeypatch.setattr(PinnedArena, "allocate", tracked)
    device = torch.device("cuda", torch.cuda.current_device())
    shape = (1, TEXT + SIDE * SIDE, HIDDEN)
    spec = CodecSpec("raw", layout=TokenLayout(TEXT, SIDE, SIDE))
    client, served = await sealed_pair()
    received: list = []

    async def handler(request):
        tensor, stats = await receive_stream(request, device, shape, torch.bfloat16)
        received.append((tensor, stats))
        return {}, []

    session = ServerSession(served, handler, {})
    serving = asyncio.ensure_future(session.run())
    channel = Channel(client)
    arenas = set()
    try:
        for step in range(STEPS):
            g = torch.Generator(device=device).manual_seed(step)
            sent_tensor = torch.randn(shape, generator=g, device=device).to(torch.bfloat16)
            torch.cuda.synchronize(device)
            _, sent = await send_stream(channel, "forward", {}, [], sent_tensor, spec)
            tensor, rx = received.pop()
            assert torch.equal(tensor, sent_tensor), f"step {step}: the stream changed on the way"
            assert sent.staged and sent.d2h_ms is not None and sent.seal_ms > 0
            if step:  # the first stream of a connection arrives before it is known to go to the GPU
                assert rx.staged and rx.h2d_ms is not None and rx.open_ms > 0
                # (not at step 0: the receiving arena does not exist until the second stream)
                arenas.add((client.outbound.current, served.inbound.current))  # held: ids of freed ones repeat
            del tensor
        out, into = client.outbound.current, served.inbound.current
        assert out.pinned and into.pinned
        assert len(arenas) == 1, "the arenas were made once and reused"
        # Every run went back after its step (once the I/O threads let go of their last work items).
        assert await eventually(lambda: out.live_runs == 0 and into.live_runs == 0), (
            f"runs still live: sending {out.live_runs}, receiving {into.live_runs}; {_holders(runs)}")
        print(f"last step: d2h {sent.d2h_ms:.2f} ms, seal {sent.seal_ms:.2f} ms, send {sent.send_ms:.2f} ms, "
              f"recv {rx.recv_ms:.2f} ms, open {rx.open_ms:.2f} ms, h2d {rx.h2d_ms:.2f} ms")
    finally:
        await channel.close()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
