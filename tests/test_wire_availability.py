"""Availability under hostile peers: a flood of half-open connections from 199 addresses, and a key
holder that stops reading its socket, must not keep a cluster member from being served within 5 s.
Loopback only; every hostile part stops by itself."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import psutil
import pytest

from meshd import auth, limits
from meshd.wire.channel import Channel
from meshd.wire.connection import Connection, client_handshake
from tests.daemons import jobs_on, running_daemon
from meshd.pipeline.plan import PeerAddress

KEY = auth.generate_key()

#: A host on the LAN without the key: from each of 127.0.0.2-200 it connects, says nothing, and
#: reconnects as soon as the daemon drops it, for the seconds given; then prints how many connects it made.
FLOOD = r"""
import asyncio, socket, sys, time
port, duration = int(sys.argv[1]), float(sys.argv[2])
made = 0
async def flood(source):
    global made
    loop = asyncio.get_running_loop()
    end = time.monotonic() + duration
    while time.monotonic() < end:
        sock = socket.socket(); sock.setblocking(False); sock.bind((source, 0))
        try:
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), max(0.01, end - time.monotonic()))
            made += 1
            await asyncio.wait_for(loop.sock_recv(sock, 1), max(0.01, end - time.monotonic()))
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            sock.close()
async def main():
    await asyncio.gather(*(flood(f"127.0.0.{i}") for i in range(2, 201)))
asyncio.run(main())
print(made)
"""


async def test_a_member_is_served_within_5_s_while_199_addresses_flood_the_handshake(tmp_path):
    async with running_daemon(tmp_path, KEY) as daemon:
        flood = await asyncio.create_subprocess_exec(sys.executable, "-c", FLOOD, str(daemon.bound[1]), "5",
                                                     stdout=subprocess.PIPE)
        try:
            started = time.monotonic()
            while daemon._preauth < limits.MAX_PREAUTH_CONNECTIONS and time.monotonic() - started < 5:
                await asyncio.sleep(0.05)
            assert daemon._preauth == limits.MAX_PREAUTH_CONNECTIONS  # the flood holds every slot
            started = time.monotonic()
            channel = await Channel.connect("127.0.0.1", daemon.bound[1], KEY)
            reply = await channel.request("info", timeout=5)
            served = time.monotonic() - started
            await channel.close()
            assert reply.op == "reply" and served < 5.0, served
            assert daemon._preauth >= limits.MAX_PREAUTH_CONNECTIONS - 8  # still flooded meanwhile
        finally:
            out, _ = await asyncio.wait_for(flood.communicate(), 30)
        assert int(out) > 500  # the flood really churned (its connects, over 5 s)


async def test_a_valid_hello_then_silence_holds_a_pre_auth_slot_no_longer_than_the_limit(tmp_path):
    """Anyone can send a well-formed hello without the key and then say nothing more: the daemon's
    side of the handshake is bounded by PREAUTH_TIMEOUT_S, the one figure docs/security.md states
    (it was the client's 10 s HANDSHAKE_TIMEOUT_S), and the slot is free again."""
    from meshd.wire.frames import PREAUTH_LIMITS
    from meshd.wire.handshake import ClientHandshake

    async with running_daemon(tmp_path, KEY) as daemon:
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, daemon.bound)
        stalled = Connection(sock, "stalled")
        started = time.monotonic()
        await stalled.send(ClientHandshake(KEY).hello())
        assert (await stalled.recv(PREAUTH_LIMITS)).op == "challenge"
        assert daemon._preauth == 1
        told = await stalled.recv(PREAUTH_LIMITS, idle_timeout=limits.HANDSHAKE_TIMEOUT_S + 5)
        held = time.monotonic() - started
        assert (told.op, told.header["code"]) == ("error", "auth")
        assert told.header["message"] == f"handshake not over within {limits.PREAUTH_TIMEOUT_S:g} s of connecting"
        with pytest.raises(Exception, match="closed by peer|connection lost"):
            await stalled.recv(PREAUTH_LIMITS, idle_timeout=2)
        assert limits.PREAUTH_TIMEOUT_S - 0.2 < held < limits.PREAUTH_TIMEOUT_S + 1.0, held
        assert daemon._preauth == 0
        stalled.abort()


def test_the_security_notes_state_the_pre_auth_limit_the_daemon_applies():
    from pathlib import Path

    notes = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    assert f"`PREAUTH_TIMEOUT_S` ({limits.PREAUTH_TIMEOUT_S:g} s)" in notes
    assert f"at most {limits.PREAUTH_TIMEOUT_S:g} s each" in notes


LONG = {"prompt": "a lighthouse at dawn", "seed": 3, "width": 64, "height": 64, "steps": 200, "guidance": 1.0}
SHORT = {**LONG, "steps": 2}


async def test_a_client_that_stops_reading_gives_its_slots_and_jobs_up_and_another_is_served(tmp_path):
    """A key holder submits more generations than run at once, over a two-stage plan, then stops
    reading (and keeps pinging). It holds at most MAX_ACTIVE_GENERATIONS_PER_SOURCE slots, so another
    client's generation runs within 5 s of asking; its sends stall, and within SEND_PROGRESS_TIMEOUT_S
    its connection ends, its generations stop and release their jobs on the other stage; the head's
    memory grows by less than 64 MiB meanwhile."""
    async with running_daemon(tmp_path / "head", KEY, blocks=range(3)) as head, \
            running_daemon(tmp_path / "stage", KEY, blocks=range(3, 6)) as stage:
        plan = [{"peer": "%s:%d" % head.bound, "start": 0, "end": 3},
                {"peer": "%s:%d" % stage.bound, "start": 3, "end": 6}]
        sock = socket.socket()
        sock.bind(("127.0.0.3", 0))  # another host than the client served meanwhile
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that takes almost nothing
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, head.bound)
        slow = Connection(sock, "slow client")
        await client_handshake(slow, KEY)
        # The head's side of that connection: a small send buffer, as on a link whose buffers are full,
        # so that the stall comes after a few events instead of after megabytes.
        (server_side,) = [c for c in head._connections if c.address and c.address[1] == sock.getsockname()[1]]
        server_side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        rss = psutil.Process().memory_info().rss
        for rid in range(1, limits.MAX_ACTIVE_GENERATIONS + 3):
            await slow.send({"op": "generate", "id": rid, "params": LONG, "plan": plan, "codec": "raw"})

        async def keep_pinging():
            while not slow.closed:
                await slow.send({"op": "ping", "id": 0})
                await asyncio.sleep(0.5)

        pinging = asyncio.ensure_future(keep_pinging())
        try:
            while sum(1 for s in head.sessions for t in s.tasks) < limits.MAX_ACTIVE_GENERATIONS:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # the slow client's generations run, and its buffers fill
            started = time.monotonic()
            other = await Channel.connect(*head.bound, KEY)
            reply = await other.request("generate", {"params": SHORT, "plan": plan, "codec": "raw"}, timeout=30)
            served = time.monotonic() - started
            assert bytes(reply.segments[0]).startswith(b"\x89PNG") and served < 5.0, served
            await other.close()
            assert psutil.Process().memory_info().rss - rss < 64 << 20
            until = time.monotonic() + 5
            while await jobs_on(KEY, PeerAddress(*stage.bound)) and time.monotonic() < until:
                await asyncio.sleep(0.1)
            assert await jobs_on(KEY, PeerAddress(*stage.bound)) == 0  # released on the other stage too
            assert not any(s.tasks for s in head.sessions)  # nothing of the slow client's runs on
        finally:
            pinging.cancel()
            slow.abort()


async def test_generation_slots_leave_one_for_another_source_and_pass_on_when_given_up():
    from meshd.node.admission import GenerationSlots

    slots = GenerationSlots(total=4, per_source=3)
    for _ in range(3):
        await slots.acquire("10.0.0.7")
    fourth = asyncio.ensure_future(slots.acquire("10.0.0.7"))
    await asyncio.sleep(0)
    assert not fourth.done()  # the flooding source waits ...
    await asyncio.wait_for(slots.acquire("10.0.0.8"), 1)  # ... another is let in at once
    later = asyncio.ensure_future(slots.acquire("10.0.0.9"))
    slots.release("10.0.0.7")
    await asyncio.sleep(0)
    assert fourth.done() and not later.done()  # first come, first served among those that may take
    fourth_waiter = asyncio.ensure_future(slots.acquire("10.0.0.7"))
    await asyncio.sleep(0)
    fourth_waiter.cancel()  # gave up while waiting: holds nothing
    slots.release("10.0.0.8")
    await asyncio.sleep(0)
    assert later.done() and slots.held == {"10.0.0.7": 3, "10.0.0.9": 1}
