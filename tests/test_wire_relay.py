"""A man in the middle between a client and a daemon (real sockets on loopback). It cannot read what
passes (not even the prompt), and whatever it does to the sealed records (flip a bit, replay, reorder,
drop, inject) ends that one connection within a second with an error naming the cause, while the
daemon serves the next generation."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshd import auth, limits
from meshd.wire.channel import Channel
from meshd.errors import MeshError
from meshd.wire.frames import LENGTH, PREFIX, frame_bytes, unpack_header
from meshd.wire import seal
from meshd.wire.seal import RECORD
from tests.daemons import running_daemon

KEY = auth.generate_key()
PROMPT = "a lighthouse at dawn, painted by zq7-unique-marker"
PARAMS = {"prompt": PROMPT, "seed": 3, "width": 64, "height": 64, "steps": 2, "guidance": 1.0}


def passthrough(index: int, record: bytes, held: list) -> list[bytes]:
    return [record]


def flip_a_bit_of_record_1(index, record, held):
    if index != 1:
        return [record]
    damaged = bytearray(record)
    damaged[RECORD.size + 5] ^= 0x01
    return [bytes(damaged)]


def replay_record_0(index, record, held):
    return [record, record] if index == 0 else [record]


def swap_records_0_and_1(index, record, held):
    if index == 0:
        held.append(record)
        return []
    return [record, *held] if index == 1 else [record]


def drop_record_0(index, record, held):
    return [] if index == 0 else [record]


def inject_before_record_0(index, record, held):
    if index != 0:
        return [record]
    _, seq, _ = RECORD.unpack(record[: RECORD.size])
    forged = RECORD.pack(seal.RECORD_MAGIC, seq, 24) + os.urandom(24 + seal.TAG_BYTES)  # well formed, no key
    return [forged, record]


class TamperingRelay:
    """Sits between client and daemon: the handshake passes as is, then each client->daemon sealed
    record goes through the next connection's tampering rule. Keeps every byte it saw, both ways."""

    def __init__(self, target: tuple) -> None:
        self.target = target
        self.rule = passthrough
        self.rewrite_hello = None  # for the next connection: a new header for the client's hello
        self.seen = bytearray()
        self.tampered_at: float | None = None

    async def start(self) -> tuple:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]

    async def _relay(self, reader, writer) -> None:
        rule, self.rule = self.rule, passthrough
        rewrite, self.rewrite_hello = self.rewrite_hello, None
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def plain_frame(prefix: bytes) -> bytes:
            _, _, _, header_len, segments = PREFIX.unpack(prefix)
            table = await reader.readexactly(LENGTH.size * segments)
            sizes = sum(LENGTH.unpack_from(table, i * LENGTH.size)[0] for i in range(segments))
            return prefix + table + await reader.readexactly(header_len + sizes)

        async def upstream() -> None:
            for i in range(2):  # hello and proof: plain frames, before any key is in use
                frame = await plain_frame(await reader.readexactly(PREFIX.size))
                if i == 0 and rewrite is not None:
                    frame = frame_bytes(rewrite(unpack_header(frame[PREFIX.size :])))  # a well-formed frame again
                    self.tampered_at = time.monotonic()
                await self._forward(up_writer, [frame])
            held: list[bytes] = []
            index = 0
            while True:
                head = await reader.readexactly(RECORD.size)
                if head[:4] == limits.MAGIC:  # a build without sealing: frames stay plain
                    await self._forward(up_writer, [await plain_frame(head)])
                    continue
                record = head + await reader.readexactly(RECORD.unpack(head)[2] + seal.TAG_BYTES)
                out = rule(index, record, held)
                if out != [record]:
                    self.tampered_at = time.monotonic()
                await self._forward(up_writer, out)
                index += 1

        async def downstream() -> None:
            while data := await up_reader.read(1 << 16):
                await self._forward(writer, [data])

        try:
            await asyncio.gather(upstream(), downstream())
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()
            up_writer.close()

    async def _forward(self, writer, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.seen += chunk
            writer.write(chunk)
        await writer.drain()

    async def close(self) -> None:
        self.server.close()


async def generate(channel: Channel, daemon) -> bytes:
    me = "%s:%d" % daemon.bound
    reply = await channel.request("generate", {"params": PARAMS, "plan": [{"peer": me, "start": 0, "end": 6}],
                                               "codec": "raw"}, timeout=60)
    return bytes(reply.segments[0])


async def probe_then_echo(channel):
    await channel.request("probe", {}, [os.urandom(1000)], timeout=5)
    await channel.request("echo", timeout=5)


async def echo_twice(channel):
    await channel.request("echo", timeout=5)
    await channel.request("echo", timeout=5)


async def two_echoes_at_once(channel):
    await asyncio.gather(channel.request("echo", timeout=5), channel.request("echo", timeout=5))


TAMPERING = {
    "a flipped bit in a segment": (flip_a_bit_of_record_1, probe_then_echo, "record 1 failed authentication: altered"),
    "a replayed frame": (replay_record_0, echo_twice, "record 0 arrived again where record 1 was due: a replayed"),
    "two frames reordered": (swap_records_0_and_1, two_echoes_at_once,
                             r"record 1 arrived where record 0 was due: 1 record\(s\) dropped, or frames reordered"),
    "a dropped frame": (drop_record_0, two_echoes_at_once, r"record 1 arrived where record 0 was due: 1 record\(s\) "
                                                          "dropped"),
    "an injected frame": (inject_before_record_0, echo_twice, "record 0 failed authentication.*injected"),
}


@pytest.mark.parametrize("rule,traffic,cause", TAMPERING.values(), ids=TAMPERING.keys())
async def test_tampering_ends_that_connection_with_the_cause_and_the_next_generation_runs(tmp_path, rule, traffic,
                                                                                        cause):
    async with running_daemon(tmp_path, KEY, blocks=range(6)) as daemon:
        relay = TamperingRelay(daemon.bound)
        address = await relay.start()
        bystander = await Channel.connect(*daemon.bound, KEY)
        relay.rule = rule
        victim = await Channel.connect(*address, KEY)
        with pytest.raises(MeshError, match=cause) as error:
            await traffic(victim)
        assert error.value.code == "protocol"
        assert time.monotonic() - relay.tampered_at < 1.0
        await victim.close()
        assert (await bystander.request("echo")).op == "reply"
        channel = await Channel.connect(*address, KEY)  # through the relay again, untouched this time
        png = await generate(channel, daemon)
        assert png.startswith(b"\x89PNG")
        await channel.close()
        await bystander.close()
        await relay.close()
        assert PROMPT.encode() not in relay.seen and png[8:64] not in relay.seen


HELLO_REWRITES = {
    "the node name": lambda hello: {**hello, "node": "mallory"},
    "the daemon flag (an emulated link's shaping)": lambda hello: {**hello, "daemon": True},
    "a field added": lambda hello: {**hello, "note": "from the relay"},
}


@pytest.mark.parametrize("rewrite", HELLO_REWRITES.values(), ids=HELLO_REWRITES.keys())
async def test_a_hello_rewritten_on_the_way_ends_the_handshake_and_the_daemon_serves_on(tmp_path, rewrite):
    """The hello travels in clear (no key exists yet), but both hellos are bound into the MACs and
    the session keys: a relay that rewrites one of its fields is caught within the handshake."""
    async with running_daemon(tmp_path, KEY) as daemon:
        relay = TamperingRelay(daemon.bound)
        address = await relay.start()
        relay.rewrite_hello = rewrite
        with pytest.raises(MeshError, match="handshake failed: either the server does not hold our cluster key "
                                            r"\(wrong key file\?\), or the handshake was altered on the way") as error:
            await Channel.connect(*address, KEY, hello={"node": "alice"})
        assert error.value.code == "auth"
        assert time.monotonic() - relay.tampered_at < 1.0
        channel = await Channel.connect(*address, KEY, hello={"node": "alice"})  # untouched this time
        assert (await channel.request("echo")).op == "reply"
        await channel.close()
        await relay.close()


async def test_the_relay_would_see_the_prompt_if_frames_were_not_sealed(tmp_path, monkeypatch):
    """The control for the test above: the same relay, a build without sealing, the prompt in clear."""
    monkeypatch.setattr(seal, "BENCH_UNSEALED", True)
    async with running_daemon(tmp_path, KEY) as daemon:
        relay = TamperingRelay(daemon.bound)
        channel = await Channel.connect(*await relay.start(), KEY)
        await channel.request("echo", {"note": PROMPT})
        await channel.close()
        await relay.close()
        assert PROMPT.encode() in relay.seen



UNSEALED_CLIENT = r"""
import asyncio, sys
from meshd.wire.channel import Channel
from meshd.errors import MeshError
from meshd.wire import seal
async def main():
    try:
        channel = await Channel.connect("127.0.0.1", int(sys.argv[1]), bytes.fromhex(sys.argv[2]))
        await channel.request("echo", timeout=5)
        print("served", seal.BENCH_UNSEALED)
    except MeshError as exc:
        print(exc.code, exc.message)
asyncio.run(main())
"""


async def test_the_bench_only_unsealed_build_is_refused_by_a_sealed_daemon(tmp_path):
    """bench/unsealed turns sealing off in the process it starts (split_bench --unsealed): a sealed
    daemon refuses such a client at its first frame, naming why."""
    root = Path(__file__).resolve().parent.parent
    async with running_daemon(tmp_path, KEY) as daemon:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", UNSEALED_CLIENT, str(daemon.bound[1]), KEY.hex(), stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(root / "bench" / "unsealed")})
        out, _ = await asyncio.wait_for(child.communicate(), 60)
    assert out.decode().strip() == ("protocol a sealed record arrived where an unsealed frame was due (the peer "
                                    "seals its frames; this side was built without sealing)")


async def test_a_daemon_takes_no_unsealed_frame_after_the_handshake_not_even_an_error(tmp_path):
    """Only a client may be refused with one unsealed error (before the server's first record); an
    unsealed frame to a daemon after the handshake is an injection, whatever its op."""
    async with running_daemon(tmp_path, KEY) as daemon:
        channel = await Channel.connect(*daemon.bound, KEY)
        await asyncio.get_running_loop().sock_sendall(
            channel.conn.sock, frame_bytes({"op": "error", "id": 1, "code": "auth", "message": "x"}))
        with pytest.raises(MeshError, match="an unsealed frame arrived where sealed record 0 was due"):
            await channel.request("echo", timeout=5)
        await channel.close()
