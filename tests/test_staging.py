"""The TCP fast path on the CPU: staging arenas, the staged chunk pipeline, and big segments sealed on
one thread while written on another (and received on one while opened on another), over real
loopback sockets. The GPU half (pinned memory, async copies, bit-exactness over many steps) is
tests/test_staging_gpu.py."""

from __future__ import annotations

import asyncio
import gc
import logging
import os

import numpy as np
import pytest
import torch

import codec
from codec import CodecSpec, TokenLayout
from meshd.wire import staging
from meshd.wire.bulk import SendTiming
from meshd.wire.channel import Channel, ServerSession
from meshd.wire.connection import BIG_SEGMENT, Connection
from meshd.errors import PeerLost
from meshd.wire.frames import encode_frame
from meshd.pipeline.streaming import SendStats, staged_raw_chunks
from meshd.wire import seal as sealing
from tests.daemons import eventually, sealed_pair


def unpinned(conn: Connection) -> staging.LinkStaging:
    """This CPU machine cannot pin memory: the same arena over ordinary pages stands in for it."""
    conn.inbound = staging.LinkStaging("stage-in test", pin=False)
    return conn.inbound


# --- arenas -------------------------------------------------------------------------------------


def test_a_run_returns_to_the_arena_only_when_nothing_points_into_it():
    arena = staging.PinnedArena(4 * staging.PAGE_BYTES, pin=False)
    run = arena.allocate(staging.PAGE_BYTES + 1)  # two pages
    assert run.nbytes == staging.PAGE_BYTES + 1 and arena.live_runs == 1
    assert arena.free_bytes == 2 * staging.PAGE_BYTES
    derived = [memoryview(run)[10:20], torch.from_numpy(run)[5:], run[3:]]
    del run
    gc.collect()
    assert arena.live_runs == 1, "a slice, a memoryview or a tensor over the run still reads it"
    derived.clear()
    assert arena.live_runs == 0 and arena.free_bytes == 4 * staging.PAGE_BYTES


def test_a_full_arena_says_so_and_the_pages_come_back_in_any_order():
    arena = staging.PinnedArena(3 * staging.PAGE_BYTES, pin=False)
    a, b, c = (arena.allocate(staging.PAGE_BYTES) for _ in range(3))
    assert arena.allocate(1) is None  # the caller falls back to pageable memory for this buffer
    del b
    assert arena.allocate(2 * staging.PAGE_BYTES) is None  # one free page is not two
    again = arena.allocate(staging.PAGE_BYTES)
    assert again is not None and arena.holds(again) and not arena.holds(bytearray(8))
    del a, c, again
    assert arena.live_runs == 0


def test_a_closed_arena_hands_out_nothing_and_its_live_runs_stay_readable():
    arena = staging.PinnedArena(staging.PAGE_BYTES, pin=False)
    run = arena.allocate(100)
    run[:] = 7
    arena.close()
    assert arena.allocate(1) is None
    assert bytes(run[:3]) == b"\x07\x07\x07"
    del run
    assert arena.live_runs == 0


def test_without_pinnable_memory_the_link_says_why_once_and_uses_pageable_buffers(caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine can pin memory")
    staging._said.clear()
    link = staging.LinkStaging("stage-out test")
    with caplog.at_level(logging.WARNING, logger="meshd.wire.staging"):
        assert link.arena() is None
        assert link.arena(10 << 20) is None
        assert staging.LinkStaging("another link").arena() is None
    (record,) = caplog.records
    assert "CUDA is not available" in record.getMessage() and "pageable" in record.getMessage()


def test_a_stream_beyond_the_staging_limit_goes_pageable():
    link = staging.LinkStaging("stage-out big", pin=False)
    assert link.arena(staging.MAX_ARENA_BYTES + 1) is None
    small = link.arena(8 << 20)
    assert small is not None and link.arena(2 * staging.ARENA_BYTES).nbytes == 2 * staging.ARENA_BYTES
    assert small.allocate(1) is None, "the outgrown arena is closed; its runs finish with it"


# --- the staged chunk pipeline ------------------------------------------------------------------


def klein_like(seed: int = 0, tokens: int = 16 + 8 * 8, channels: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, channels, generator=g).to(torch.bfloat16)


def test_staged_chunks_carry_exactly_the_tensor_bytes_in_codec_order_and_give_their_runs_back():
    tensor = klein_like()
    spec = CodecSpec("raw", chunk_tokens=24, layout=TokenLayout(16, 8, 8))
    header, _ = codec.encode_chunks(tensor, spec)
    arena = staging.PinnedArena(8 * staging.PAGE_BYTES, pin=False)
    stats = SendStats()
    chunks = list(staged_raw_chunks(tensor, header, arena, None, stats))
    assert [c.index for c in chunks] == list(range(len(header.chunks))) and len(chunks) > 2
    assert all(arena.holds(c.buffers[0]) for c in chunks)
    decoded = codec.decode(codec.Encoded(header, [c.buffers[0] for c in chunks]))
    assert torch.equal(decoded, tensor)  # raw is bit-exact, through staging as without it
    assert stats.d2h_ms is not None and stats.d2h_ms >= 0
    del chunks, decoded
    assert arena.live_runs == 0


def test_chunks_that_find_the_arena_full_are_copied_through_pageable_memory():
    tensor = klein_like(1)
    header, _ = codec.encode_chunks(tensor, CodecSpec("raw", chunk_tokens=24, layout=TokenLayout(16, 8, 8)))
    arena = staging.PinnedArena(staging.PAGE_BYTES, pin=False)  # room for one chunk only
    chunks = list(staged_raw_chunks(tensor, header, arena, None, SendStats()))
    assert [arena.holds(c.buffers[0]) for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert torch.equal(codec.decode(codec.Encoded(header, [c.buffers[0] for c in chunks])), tensor)


# --- big segments through the two-thread record pipeline ----------------------------------------


async def test_big_sealed_segments_arrive_bit_exact_in_the_staged_arena_with_their_times():
    client, served = await sealed_pair()
    try:
        unpinned(served)
        assert served.stage_inbound() is not None
        payload = np.random.default_rng(5).integers(0, 256, 5 * BIG_SEGMENT + 12345, dtype=np.uint8)
        small = b"x" * 100
        timing = SendTiming()
        for step in range(3):  # the arena's runs are reused frame after frame
            sending = asyncio.ensure_future(client.send({"op": "chunk", "id": 1, "index": step},
                                                        [memoryview(payload), small], timing=timing))
            frame = await served.recv()
            await sending
            big, tail = frame.segments
            assert served.inbound.current.holds(big) and bytes(tail) == small
            assert np.array_equal(np.frombuffer(big, dtype=np.uint8), payload)
            assert frame.recv_s > 0 and frame.open_s > 0
            del frame, big
            # Back once the threads that filled it have let go of their work items as well.
            assert await eventually(lambda: served.inbound.current.live_runs == 0)
        assert timing.seal_s > 0 and timing.send_s > 0
        assert client.sealer.sequence == served.opener.sequence  # every record sealed was opened, in order
    finally:
        await client.close()
        await served.close()


async def test_sessions_keep_no_staged_frame_once_it_is_handled():
    """A stream's last chunk goes back to its arena once the handler is done with it, not when the
    next frame arrives (the read loops held their last frame: on the GPU test's last step the
    receiving arena kept one run live). Both directions: the server's chunks, the client's reply."""
    client, served = await sealed_pair()
    unpinned(served)
    served.stage_inbound()
    unpinned(client)
    client.stage_inbound()
    payload = np.random.default_rng(6).integers(0, 256, 2 * BIG_SEGMENT, dtype=np.uint8)
    got: list = []

    async def handler(request):
        async for frame in request.chunks(request.announced_chunks):
            got.append(served.inbound.current.holds(frame.segments[0]))
        return {}, [memoryview(payload)]  # a big reply: staged on the client's side

    session = ServerSession(served, handler, {})
    serving = asyncio.ensure_future(session.run())
    channel = Channel(client)

    async def chunks():
        for index in range(2):
            yield index, [memoryview(payload)]

    try:
        reply = await channel.request("forward", {"chunks": 2}, [], chunks=chunks())
        assert got == [True, True] and client.inbound.current.holds(reply.segments[0])
        del reply
        assert await eventually(lambda: served.inbound.current.live_runs == 0), "the server kept a chunk"
        assert await eventually(lambda: client.inbound.current.live_runs == 0), "the client kept its reply"
    finally:
        await channel.close()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def test_unstaged_connections_receive_big_segments_into_the_allocator_buffers():
    client, served = await sealed_pair()
    try:
        payload = bytes(range(256)) * (BIG_SEGMENT // 128)
        sending = asyncio.ensure_future(client.send({"op": "x", "id": 1}, [payload]))
        frame = await served.recv()
        await sending
        assert isinstance(frame.segments[0], bytearray) and frame.segments[0] == payload
        assert served.inbound.current is None  # nothing was pinned for a connection nobody staged
    finally:
        await client.close()
        await served.close()


async def test_a_record_altered_inside_a_big_segment_fails_its_tag_and_gives_its_run_back():
    client, served = await sealed_pair()
    try:
        unpinned(served)
        served.stage_inbound()
        payload = os.urandom(3 * BIG_SEGMENT)
        records = client.sealer.seal_frame(encode_frame({"op": "chunk", "id": 1, "index": 0}, [payload]))
        damaged = bytearray(records[2])
        damaged[len(damaged) // 2] ^= 1  # inside the second record of the segment
        wire = b"".join(bytes(r) for r in (records[0], records[1], damaged, *records[3:]))
        await asyncio.get_running_loop().sock_sendall(client.sock, wire)
        with pytest.raises(sealing.SealError, match="record 2 failed authentication"):
            await asyncio.wait_for(served.recv(), 10)
        # The half-filled run goes back once the opening thread has let go of its work item too.
        assert await eventually(lambda: served.inbound.current.live_runs == 0)
    finally:
        await client.close()
        await served.close()


async def test_a_peer_that_dies_inside_a_big_segment_is_lost_within_seconds_not_hung():
    client, served = await sealed_pair()
    try:
        payload = os.urandom(4 * BIG_SEGMENT)
        records = client.sealer.seal_frame(encode_frame({"op": "chunk", "id": 1, "index": 0}, [payload]))
        wire = b"".join(bytes(r) for r in records)
        await asyncio.get_running_loop().sock_sendall(client.sock, wire[: len(wire) // 2])
        client.abort()
        with pytest.raises(PeerLost, match="closed by peer|connection lost"):
            await asyncio.wait_for(served.recv(), 10)
    finally:
        await client.close()
        await served.close()


async def test_a_hop_over_tcp_reports_where_its_time_went_at_both_ends():
    """CPU stages take the pageable path (nothing to pin for), yet the hop's breakdown is measured."""
    from meshd.wire.channel import Channel, ServerSession  # noqa: PLC0415
    from meshd.pipeline.streaming import receive_stream, send_stream  # noqa: PLC0415

    shape = (1, 16 + 32 * 32, 1024)  # chunks of 2 MiB: big segments, through the record pipeline
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    client, served = await sealed_pair()
    got: list = []

    async def handler(request):
        got.append(await receive_stream(request, torch.device("cpu"), shape, torch.bfloat16))
        return {}, []

    serving = asyncio.ensure_future(ServerSession(served, handler, {}).run())
    channel = Channel(client)
    try:
        _, sent = await send_stream(channel, "forward", {}, [], tensor, CodecSpec("raw", layout=TokenLayout(16, 32, 32)))
        ((received, rx),) = got
        assert torch.equal(received, tensor)
        hop = {**rx.breakdown(), **sent.to_dict()}
        assert hop["seal_ms"] > 0 and hop["send_ms"] > 0 and hop["recv_ms"] > 0 and hop["open_ms"] > 0
        assert hop["d2h_ms"] is None and hop["h2d_ms"] is not None  # no device copy to time on the send side
        assert hop["staged_send"] is False and hop["staged_recv"] is False
    finally:
        await channel.close()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


def test_an_unindexed_cuda_device_becomes_the_creating_threads_gpu(monkeypatch):
    """An arena's owner thread is told its GPU by index: "cuda" alone (how in-process daemons are built)
    made torch.cuda.set_device raise on the H200, failing every arena and shared region of them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert staging._indexed(torch.device("cuda")) == torch.device("cuda", 3)
    assert staging._indexed(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert staging._indexed(torch.device("cpu")) == torch.device("cpu")
    assert staging._indexed(None) is None


def test_a_run_let_go_inside_another_executors_submit_neither_deadlocks_nor_stays_registered():
    """A run returns to its arena from a finaliser, which the garbage collector may run anywhere: once it
    ran inside a GPU worker's submit (holding concurrent.futures' global lock) and the closed arena's
    retirement submitted to its owner thread there, so the event loop waited on itself (test_shm hung
    for 300 s). Retiring only queues the arena now; the retirer thread unregisters it on the owner."""
    import threading
    from concurrent.futures import thread as futures_thread

    arena = staging.PinnedArena(staging.PAGE_BYTES, pin=False)
    unregistered = threading.Event()
    arena._unregister = unregistered.set  # (a pinned arena unregisters its memory here, on the owner thread)
    held = [arena.allocate(64)]
    arena.close()  # the run still lives: retired when it goes
    done = threading.Event()

    def let_go() -> None:
        with futures_thread._global_shutdown_lock:  # where a collection inside any submit runs finalisers
            held.clear()
        done.set()

    worker = threading.Thread(target=let_go, daemon=True)
    worker.start()
    worker.join(5)
    assert done.is_set(), "letting a run go under the executors' lock deadlocked"
    assert unregistered.wait(5) and arena.live_runs == 0
