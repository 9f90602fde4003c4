"""Hostile input: whatever a peer sends, the daemon answers with an error naming the cause (or closes
that one connection), allocates nothing beyond its limits, and keeps serving everyone else.

Properties run ``MESHD_FUZZ_EXAMPLES`` hypothesis examples each (a CI-sized default; the long run
and its figures are in docs/reliability.md, the libFuzzer harness is bench/fuzz_atheris.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
import zlib

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import codec
from codec import CodecError, CodecSpec, Encoded
from meshd import auth, limits
from meshd.wire.channel import Channel
from meshd.wire.connection import Connection, client_handshake
from meshd.errors import MeshError
from meshd.wire.frames import (
    DEFAULT_LIMITS,
    LENGTH,
    PREAUTH_LIMITS,
    PREFIX,
    FrameLimits,
    FrameReader,
    ProtocolError,
    encode_frame,
    frame_bytes,
)
from meshd.node.admission import source_of
from meshd.pipeline.streaming import pack_raw
from tests.daemons import running_daemon, server_side_of
from tests.fixtures import structured_stream

KEY = auth.generate_key()
EXAMPLES = int(os.environ.get("MESHD_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Values of every msgpack type, including the awkward ones (NaN, bools where ints go, huge ints).
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.sampled_from([-1, 0, 1, 3, 2**31, 2**63 - 1, -(2**63), 2**64 - 1]),
    st.floats(), st.text(max_size=12), st.binary(max_size=24),
    st.lists(st.integers(-3, 8), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(-9, 9), max_size=2),
)


def mutated(template):
    """Mostly ``template``, with any part (a field, a list item, a whole map) replaced by a hostile
    value or dropped now and then: deep enough to get past the first checks."""
    if isinstance(template, dict):
        full = st.fixed_dictionaries({k: mutated(v) for k, v in template.items()})
        some = st.fixed_dictionaries({}, optional={k: mutated(v) for k, v in template.items()})
        return st.integers(0, 7).flatmap(lambda r: HOSTILE if r == 7 else some if r == 6 else full)
    if isinstance(template, list) and template:
        exact = st.tuples(*[mutated(v) for v in template]).map(list)
        return st.integers(0, 7).flatmap(lambda r: HOSTILE if r == 7 else exact)
    return st.integers(0, 7).flatmap(lambda r: HOSTILE if r == 7 else st.just(template))


# --- the frame parser (sans I/O) ---------------------------------------------------------------------

headers = st.fixed_dictionaries({"op": st.text(max_size=10), "id": st.integers(0, 2**32)},
                                optional={"job": st.text(max_size=20), "n": st.integers(-(2**63), 2**63 - 1),
                                          "blob": st.binary(max_size=50),
                                          "xs": st.lists(st.floats(allow_nan=False), max_size=5)})
segment_lists = st.lists(st.binary(max_size=64), max_size=4)
SMALL_LIMITS = FrameLimits(max_header=64, max_segments=2, max_segment=32, max_frame=48)


def largest_read(lim: FrameLimits) -> int:
    """The most bytes the parser may ever ask the transport to read (and so allocate) at once."""
    return max(PREFIX.size, LENGTH.size * lim.max_segments + lim.max_header, lim.max_segment)


@FUZZ
@given(headers, segment_lists, st.lists(st.integers(0, 10_000), max_size=6))
def test_a_frame_parses_the_same_however_its_bytes_are_split(header, segments, cuts):
    raw = frame_bytes(header, segments) * 2
    reader, frames, start = FrameReader(), [], 0
    for cut in sorted(c % (len(raw) + 1) for c in cuts) + [len(raw)]:
        frames += reader.feed(raw[start:cut])
        start = max(start, cut)
    assert [(f.header, [bytes(s) for s in f.segments]) for f in frames] == [(header, segments)] * 2


def damage(raw: bytes, data) -> bytes:
    """Flip bytes, overwrite the declared sizes, cut or extend: what a broken or hostile peer sends."""
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "header_len", "segments", "length", "cut", "extend"]))
        if kind == "flip" and out:
            out[data.draw(st.integers(0, len(out) - 1))] ^= data.draw(st.integers(1, 255))
        elif kind in ("header_len", "segments") and len(out) >= PREFIX.size:
            offset = 8 if kind == "header_len" else 12
            out[offset : offset + 4] = struct.pack("<I", data.draw(st.sampled_from([0, 1, 2**31, 2**32 - 1])
                                                                   | st.integers(0, 2**32 - 1)))
        elif kind == "length" and len(out) >= PREFIX.size + LENGTH.size:
            out[PREFIX.size : PREFIX.size + LENGTH.size] = LENGTH.pack(data.draw(st.integers(0, 2**64 - 1)))
        elif kind == "cut":
            del out[data.draw(st.integers(0, len(out))) :]
        elif kind == "extend":
            out += data.draw(st.binary(min_size=1, max_size=64))
    return bytes(out)


@FUZZ
@given(headers, segment_lists, st.sampled_from([DEFAULT_LIMITS, PREAUTH_LIMITS, SMALL_LIMITS]), st.data())
def test_a_damaged_frame_is_refused_before_anything_beyond_the_limits_is_read(header, segments, lim, data):
    """The transport reads (and allocates) exactly what ``needed()`` says: it never exceeds the limits,
    whatever sizes the frame declares, and a bad frame is a ProtocolError, never another exception."""
    intact = frame_bytes(header, segments)
    raw = damage(intact, data)
    reader, pos, outcome = FrameReader(lim), 0, "incomplete: waits for more bytes"
    try:
        while pos + reader.needed() <= len(raw):
            n = reader.needed()
            assert n <= largest_read(lim)
            frame = reader.push(raw[pos : pos + n])
            pos += n
            if frame is not None:
                outcome = "parsed"
                assert isinstance(frame.header["op"], str)
                assert len(frame.segments) <= lim.max_segments
                assert sum(len(s) for s in frame.segments) <= lim.max_frame
    except ProtocolError as exc:
        outcome = f"refused: {exc.code}"
    event(f"{'damaged' if raw != intact else 'intact'} frame -> {outcome}")


# --- the codec decoders ------------------------------------------------------------------------------

CODECS = ("raw", "fp8", "u8", "hevc-lossless")


@pytest.fixture(scope="module")
def encoded_streams() -> dict[str, Encoded]:
    tensor = structured_stream(tokens_h=8, tokens_w=8, prefix=16, channels=32)
    return {name: codec.encode(tensor, CodecSpec.parse(name, chunk_tokens=40)) for name in CODECS}


def relabel_hevc_table(header: dict, buffers: list) -> None:
    """Rewrite each HEVC chunk's length/CRC table to match its (damaged) frames: a sender that lies
    consistently gets past the checksums, so FFmpeg itself sees the garbage."""
    channels, pos = header["shape"][-1], 0
    for chunk in header["chunks"]:
        frames = chunk[2][2]
        table = [(len(b), zlib.crc32(b)) for b in buffers[pos + 1 : pos + 1 + frames]]
        params = bytes(buffers[pos])[: 8 * channels]
        buffers[pos] = params + np.array(table, dtype="<u4").tobytes()
        pos += 1 + frames


@FUZZ
@given(st.sampled_from(CODECS), st.data())
def test_damaged_encoded_tensors_are_codec_errors_or_the_declared_tensor(encoded_streams, name, data):
    enc = encoded_streams[name]
    header = data.draw(mutated(enc.header.to_dict()))
    buffers = [bytes(b) for b in enc.buffers]
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(0, len(buffers) - 1))
        kind = data.draw(st.sampled_from(["cut", "extend", "flip", "drop", "garbage"]))
        if kind == "cut":
            buffers[i] = buffers[i][: data.draw(st.integers(0, len(buffers[i])))]
        elif kind == "extend":
            buffers[i] += data.draw(st.binary(min_size=1, max_size=32))
        elif kind == "flip" and buffers[i]:
            b = bytearray(buffers[i])
            b[data.draw(st.integers(0, len(b) - 1))] ^= 0x41
            buffers[i] = bytes(b)
        elif kind == "drop" and len(buffers) > 1:
            del buffers[i]
        elif kind == "garbage":
            buffers[i] = data.draw(st.binary(max_size=400))
    if name.startswith("hevc") and header == enc.header.to_dict() and len(buffers) == len(enc.buffers) \
            and data.draw(st.booleans()):
        relabel_hevc_table(header, buffers)
    expect = data.draw(st.sampled_from([None, tuple(enc.header.shape)]))
    try:
        out = codec.decode(Encoded.from_wire(header, buffers), "cpu", expect_shape=expect)
    except CodecError:
        event(f"{name}: refused (CodecError)")
        return
    event(f"{name}: decoded")
    declared = codec.Header.from_dict(header)
    assert tuple(out.shape) == declared.shape and out.dtype == declared.torch_dtype


@FUZZ
@given(st.sampled_from(CODECS), st.lists(st.tuples(st.integers(-2, 8), st.integers(0, 4)), max_size=8))
def test_chunks_fed_in_any_order_count_or_shape_are_codec_errors(encoded_streams, name, feeds):
    """The streaming decoder: chunks out of order, repeated, out of range, with the wrong buffers."""
    enc = encoded_streams[name]
    per_chunk, pos = [], 0
    for i in range(len(enc.header.chunks)):
        n = enc.header.buffers_per_chunk(i)
        per_chunk.append(enc.buffers[pos : pos + n])
        pos += n
    decoder = codec.ChunkDecoder(enc.header.to_dict(), "cpu", expect_shape=enc.header.shape)
    for index, source in feeds:
        buffers = per_chunk[source % len(per_chunk)]
        try:
            decoder.feed(index, buffers)
        except CodecError:
            pass
    try:
        out = decoder.result()
    except CodecError:
        return
    assert tuple(out.shape) == enc.header.shape


# --- the handshake, over a real socket pair ------------------------------------------------------------

nonces = st.one_of(st.binary(min_size=32, max_size=32), HOSTILE)
hellos = st.fixed_dictionaries({"op": st.sampled_from(["hello", "proof", "HELLO", ""])},
                               optional={"proto": st.one_of(st.just(limits.PROTOCOL_VERSION), HOSTILE),
                                         "nonce": nonces, "insecure": HOSTILE, "node": HOSTILE, "pad": st.binary()})
proofs = st.fixed_dictionaries({"op": st.sampled_from(["proof", "hello", "welcome"])},
                               optional={"proof": st.one_of(st.binary(min_size=32, max_size=32), HOSTILE)})
preauth_streams = st.one_of(
    st.tuples(hellos, proofs).map(lambda fs: b"".join(frame_bytes(f) for f in fs)),
    st.tuples(hellos, st.binary(max_size=64)).map(lambda t: frame_bytes(t[0]) + t[1]),
    st.binary(max_size=600),
    st.builds(lambda n, tail: PREFIX.pack(limits.MAGIC, limits.FRAME_FORMAT, 0, n, 0) + tail,
              st.integers(0, 2**32 - 1), st.binary(max_size=64)),
)


@FUZZ
@given(preauth_streams)
def test_no_byte_stream_without_the_key_gets_past_the_handshake(stream):
    outcome = asyncio.run(server_side_of(stream, KEY))
    assert isinstance(outcome, MeshError), f"let in without the key: {outcome}"
    assert outcome.code in ("auth", "protocol", "version", "peer-lost")
    event(f"refused: {outcome.code}")


# --- requests after authentication, against a live daemon ---------------------------------------------


class LiveDaemon:
    """An in-process daemon holding every block of ``tiny``, on its own event-loop thread, so that
    synchronous hypothesis tests can send it requests one after another."""

    def __init__(self, tmp) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-daemon", daemon=True)
        self.thread.start()
        self._context = running_daemon(tmp, KEY, blocks=range(6))
        self.daemon = self.run(self._context.__aenter__())
        self.channel: Channel | None = None

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def request(self, op: str, fields, segments, chunks=()) -> MeshError | None:
        """Send one request (and its chunk frames) on the shared channel; its error, or None."""
        if self.channel is None or not self.channel.alive:
            self.channel = await Channel.connect(*self.daemon.bound, KEY)

        async def stream():
            for item in chunks:
                yield item

        try:
            await self.channel.request(op, fields, segments, chunks=stream() if chunks else None, timeout=30)
        except MeshError as exc:
            return exc
        return None

    def close(self) -> None:
        if self.channel is not None:
            self.run(self.channel.close())
        self.run(self._context.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    daemon = LiveDaemon(tmp_path_factory.mktemp("live"))
    yield daemon
    daemon.close()


def request_templates(live: LiveDaemon) -> dict[str, tuple[dict, list, list]]:
    """A valid request of every op (fields, segments, chunk frames): the fuzz damages these."""
    d = live.daemon
    me = "%s:%d" % d.bound
    geometry = {"batch": 1, "txt_len": 32, "img_h": 4, "img_w": 4}
    ids_headers, ids_buffers = pack_raw([torch.zeros(1, 32, 4, dtype=torch.int64),
                                         torch.zeros(1, 16, 4, dtype=torch.int64)])
    cond_headers, cond_buffers = pack_raw([torch.zeros(1, 192, dtype=torch.bfloat16),
                                           torch.zeros(1, 64, dtype=torch.bfloat16)])
    stream = codec.encode(torch.zeros(1, 48, 64, dtype=torch.bfloat16), CodecSpec("raw", chunk_tokens=24))
    prepare = {"job": "fuzz", "model": d.model.identity.to_dict(), "stages": [{"peer": me, "start": 3, "end": 6}],
               "geometry": geometry, "ids": ids_headers, "loras": [], "measure_error": False, "quality_floor": 0.99}
    params = {"prompt": "x", "seed": 1, "width": 16, "height": 16, "steps": 1, "guidance": 1.0, "loras": []}
    return {
        "info": ({"reset_peak": True}, [], []),
        "echo": ({}, [], []),
        "probe": ({}, [b"x" * 10], []),
        "ipc-probe": ({"ipc": {"gpu": "x", "handle": b"", "size": 1}}, [], []),
        "load": ({"blocks": [[0, 6]]}, [], []),
        "prepare": (dict(prepare, job="p"), ids_buffers, []),
        "release": ({"job": "p"}, [], []),
        "forward": ({"job": "stage", "step": 0, "cond": cond_headers, "cond_names": ["mod_single", "temb"],
                     "stream": stream.header.to_dict(), "chunks": 2}, cond_buffers,
                    [(i, [b]) for i, b in enumerate(stream.buffers)]),
        "generate": ({"params": params, "codec": "raw", "quality_floor": 0.99, "measure_error": True,
                      "plan": [{"peer": me, "start": 0, "end": 3}, {"peer": me, "start": 3, "end": 6}],
                      "return_latents": False}, [], []),
    }, (dict(prepare, job="stage"), ids_buffers)


@FUZZ
@given(st.data())
def test_damaged_requests_get_errors_that_name_the_cause_never_a_crash(live, data):
    """Every op with damaged fields, segments and chunk frames: a well-formed error (never "internal",
    which would be an unhandled exception in the daemon), and the daemon goes on serving."""
    templates, stage_job = request_templates(live)
    if "stage" not in live.daemon.jobs:  # the job the forwards address (owned by the shared channel)
        assert live.run(live.request("prepare", *stage_job)) is None
    op = data.draw(st.sampled_from(sorted(templates)))
    fields, segments, chunks = templates[op]
    fields = data.draw(mutated(fields))
    if not isinstance(fields, dict):
        fields = {"damaged": fields}
    segments = data.draw(st.one_of(st.just(segments), st.lists(st.binary(max_size=64), max_size=3)))
    announced = fields.get("chunks")
    if isinstance(announced, int) and not isinstance(announced, bool) and 0 <= announced <= len(chunks):
        chunks = [data.draw(st.one_of(st.just(c), st.tuples(HOSTILE, st.lists(st.binary(max_size=64), max_size=2))))
                  for c in chunks[:announced]]
    else:
        chunks = []
    error = live.run(live.request(op, fields, segments, chunks))
    assert error is None or error.code != "internal", f"{op}: {error}"
    event(f"{op}: {error.code if error else 'ok'}")
    if live.daemon.model.blocks != tuple(range(6)):  # a damaged load may have left fewer blocks: restore
        assert live.run(live.request("load", {"blocks": [[0, 6]]}, [])) is None
    assert live.run(live.request("echo", {}, [])) is None


# --- hostile clients on real sockets ----------------------------------------------------------------


async def good_client_works(daemon) -> None:
    channel = await Channel.connect(*daemon.bound, KEY)
    assert (await channel.request("echo")).op == "reply"
    await channel.close()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the daemon sends until it closes the connection (which must happen in time). A
    reset counts as closed: the daemon closes with the client's last bytes unread."""
    try:
        return await asyncio.wait_for(reader.read(), seconds)
    except ConnectionError:
        return b""


async def test_a_silent_connection_gives_its_slot_back_after_the_hello_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "PREAUTH_TIMEOUT_S", 0.5)
    async with running_daemon(tmp_path, KEY) as daemon:
        reader, writer = await asyncio.open_connection(*daemon.bound)
        started = time.monotonic()
        told = await closed_within(reader, 3)
        assert 0.4 < time.monotonic() - started < 2.0  # not HANDSHAKE_TIMEOUT_S (10 s)
        assert b"no hello within 0.5 s of connecting" in told  # one error frame says why
        assert daemon._preauth == 0
        writer.close()
        await good_client_works(daemon)


async def test_a_trickled_hello_is_cut_off_at_the_hello_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "PREAUTH_TIMEOUT_S", 0.5)
    async with running_daemon(tmp_path, KEY) as daemon:
        reader, writer = await asyncio.open_connection(*daemon.bound)
        hello = frame_bytes({"op": "hello", "proto": limits.PROTOCOL_VERSION, "nonce": bytes(32)})
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):  # writing after the daemon closed may fail
            for byte in hello:  # one byte every 50 ms (~4 s in all): always within FRAME_PROGRESS_TIMEOUT_S
                if reader.at_eof():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)
        await closed_within(reader, 3)
        assert time.monotonic() - started < 2.0
        writer.close()
        await good_client_works(daemon)


async def connect_from(source: str, address: tuple) -> Connection:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address)
    return Connection(sock, f"client@{source}")


async def test_a_flood_from_one_host_does_not_lock_out_another(tmp_path):
    """Connections that never authenticate, from 127.0.0.1, while a cluster member on 127.0.0.2
    connects: it is let in at once (the flood holds at most MAX_PREAUTH_PER_SOURCE slots)."""
    async with running_daemon(tmp_path, KEY) as daemon:
        flood = [await asyncio.open_connection("127.0.0.1", daemon.bound[1])
                 for _ in range(limits.MAX_PREAUTH_CONNECTIONS + 8)]
        await asyncio.sleep(0.2)
        assert daemon._preauth == limits.MAX_PREAUTH_PER_SOURCE
        conn = await connect_from("127.0.0.2", daemon.bound)
        node = await client_handshake(conn, KEY)
        assert node["name"] == daemon.name
        await conn.close()
        for _, writer in flood:
            writer.close()


@pytest.mark.parametrize("a,b,same", [
    (("10.0.0.7", 40000), ("10.0.0.7", 40001), True),
    (("10.0.0.7", 40000), ("10.0.0.8", 40000), False),
    (("2001:db8:1:2::1", 1, 0, 0), ("2001:db8:1:2:ffff::9", 2, 0, 0), True),  # one host holds the /64
    (("2001:db8:1:2::1", 1, 0, 0), ("2001:db8:1:3::1", 1, 0, 0), False),
    (("::ffff:10.0.0.7", 1, 0, 0), ("10.0.0.7", 2), True),  # IPv4 on a dual-stack socket
])
def test_handshake_slots_are_counted_per_host(a, b, same):
    assert (source_of(a) == source_of(b)) is same


async def test_a_frame_that_stalls_after_auth_closes_only_that_connection(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "FRAME_PROGRESS_TIMEOUT_S", 0.5)
    async with running_daemon(tmp_path, KEY) as daemon:
        bystander = await Channel.connect(*daemon.bound, KEY)
        stalled = await Channel.connect(*daemon.bound, KEY)
        frame = sealed_frame(stalled.conn, {"op": "probe", "id": 99}, [bytes(1000)])
        await asyncio.get_running_loop().sock_sendall(stalled.conn.sock, frame[: len(frame) // 2])
        started = time.monotonic()
        while stalled.alive and time.monotonic() - started < 5:
            await asyncio.sleep(0.05)
        assert not stalled.alive and time.monotonic() - started < 2.0
        assert (await bystander.request("echo")).op == "reply"
        await stalled.close()
        await bystander.close()


def raw_frame(header: bytes, lengths: tuple = (), frame_format: int = limits.FRAME_FORMAT) -> bytes:
    """A frame from its parts, whatever they say (the encoder refuses to write bad ones)."""
    table = b"".join(LENGTH.pack(n) for n in lengths)
    return PREFIX.pack(limits.MAGIC, frame_format, 0, len(header), len(lengths)) + table + header


MALFORMED_AFTER_AUTH = {  # what a hostile (or broken) authenticated peer sends -> the cause it is told
    "bad magic": (b"GET / HTTP/1.1\r\n\r\n" + bytes(16), "not a meshd frame"),
    "another frame format": (raw_frame(msgpack.packb({"op": "echo", "id": 1}), frame_format=9), "frame format 9"),
    "header too big": (PREFIX.pack(limits.MAGIC, limits.FRAME_FORMAT, 0, limits.MAX_HEADER_BYTES + 1, 0),
                       "exceeds the limit"),
    "too many segments": (PREFIX.pack(limits.MAGIC, limits.FRAME_FORMAT, 0, 8, limits.MAX_SEGMENTS + 1),
                          "segments exceeds the limit"),
    "a 1 TiB segment": (raw_frame(msgpack.packb({"op": "probe", "id": 1}), (1 << 40,)), "segment of 1099511627776"),
    "not msgpack": (raw_frame(b"\xc1\xc1\xc1"), "not valid msgpack"),
    "a list header": (raw_frame(msgpack.packb(["op", "echo"])), "must be a map"),
    "integer map keys": (raw_frame(msgpack.packb({1: 2, "op": "echo", "id": 1})), "not valid msgpack"),
    "no integer id": (frame_bytes({"op": "echo", "id": "1"}), "no integer id"),
    "a chunk for a request never sent": (({"op": "chunk", "id": 10_000, "index": 0}, [b"x"]), "never sent"),
}


def sealed_frame(conn: Connection, header: dict, segments: list = ()) -> bytes:
    """A frame sealed as ``conn`` seals them (a key holder can seal anything it likes)."""
    return b"".join(bytes(r) for r in conn.sealer.seal_frame(encode_frame(header, list(segments))))


@pytest.mark.parametrize("payload,cause", MALFORMED_AFTER_AUTH.values(), ids=MALFORMED_AFTER_AUTH.keys())
async def test_a_malformed_frame_after_auth_closes_that_connection_with_the_cause(tmp_path, payload, cause):
    async with running_daemon(tmp_path, KEY) as daemon:
        bystander = await Channel.connect(*daemon.bound, KEY)
        hostile = await Channel.connect(*daemon.bound, KEY)
        # A key holder seals what it sends, so a malformed frame reaches the frame parser.
        payload = sealed_frame(hostile.conn, *payload) if isinstance(payload, tuple) else hostile.conn.sealer.seal(payload)
        await asyncio.get_running_loop().sock_sendall(hostile.conn.sock, payload)
        with pytest.raises(MeshError, match=cause) as error:
            await hostile.request("echo", timeout=5)
        assert error.value.code in ("protocol", "version")
        assert (await bystander.request("echo")).op == "reply"
        await hostile.close()
        await bystander.close()


async def test_more_chunk_frames_than_a_request_announced_close_the_connection(tmp_path):
    """A request's chunk queue holds at most what it announced: one frame more is a protocol error."""
    async with running_daemon(tmp_path, KEY) as daemon:
        hostile = await Channel.connect(*daemon.bound, KEY)
        burst = sealed_frame(hostile.conn, {"op": "forward", "id": 1000, "job": "j", "chunks": 1})
        for _ in range(2):
            burst += sealed_frame(hostile.conn, {"op": "chunk", "id": 1000, "index": 0}, [bytes(64)])
        await asyncio.get_running_loop().sock_sendall(hostile.conn.sock, burst)
        with pytest.raises(MeshError, match="announced 1 chunk frames; more arrived"):
            await hostile.request("echo", timeout=5)
        await hostile.close()
        await good_client_works(daemon)


async def test_a_request_that_takes_no_stream_refuses_one(tmp_path):
    """Chunk frames must not pile up behind a long request (a generation) that never reads them."""
    async with running_daemon(tmp_path, KEY) as daemon:
        channel = await Channel.connect(*daemon.bound, KEY)
        with pytest.raises(MeshError, match="generate takes no chunk stream") as error:
            await channel.request("generate", {"chunks": 3}, timeout=5)
        assert error.value.code == "bad-request"
        assert (await channel.request("echo")).op == "reply"
        await channel.close()


async def test_requests_beyond_the_per_connection_cap_are_busy_and_the_rest_run(tmp_path, monkeypatch):
    """Each running request may hold memory: one connection runs at most MAX_REQUESTS_PER_SESSION."""
    monkeypatch.setattr(limits, "MAX_REQUESTS_PER_SESSION", 3)
    async with running_daemon(tmp_path, KEY) as daemon:
        gate = asyncio.Event()

        async def held(request):
            await gate.wait()
            return {}, []

        daemon.extra_ops["held"] = held
        channel = await Channel.connect(*daemon.bound, KEY)
        running = [asyncio.ensure_future(channel.request("held", timeout=10)) for _ in range(3)]
        await asyncio.sleep(0.2)
        with pytest.raises(MeshError, match="3 requests already run on this connection") as error:
            await channel.request("echo", timeout=5)
        assert error.value.code == "busy"
        other = await Channel.connect(*daemon.bound, KEY)  # the cap is per connection
        assert (await other.request("echo")).op == "reply"
        gate.set()
        assert [r.op for r in await asyncio.gather(*running)] == ["reply"] * 3
        assert (await channel.request("echo")).op == "reply"
        await channel.close()
        await other.close()


async def test_requests_the_fuzz_found_crashing_now_get_errors(tmp_path):
    """Kept as plain examples: before the fix each was an unhandled TypeError ("internal")."""
    async with running_daemon(tmp_path, KEY, blocks=range(6)) as daemon:
        channel = await Channel.connect(*daemon.bound, KEY)
        me = "%s:%d" % daemon.bound
        ids_headers, ids_buffers = pack_raw([torch.zeros(1, 32, 4, dtype=torch.int64),
                                             torch.zeros(1, 16, 4, dtype=torch.int64)])
        await channel.request("prepare", {"job": "j", "model": daemon.model.identity.to_dict(), "ids": ids_headers,
                                          "stages": [{"peer": me, "start": 3, "end": 6}],
                                          "geometry": {"batch": 1, "txt_len": 32, "img_h": 4, "img_w": 4}},
                              ids_buffers)
        with pytest.raises(MeshError, match="must carry exactly the vectors") as error:
            await channel.request("forward", {"job": "j", "cond_names": [[7], "temb"], "cond": []})
        assert error.value.code == "bad-request"
        await channel.close()


@pytest.mark.parametrize("field", ["codec", "dtype", "encoder"])
def test_codec_header_fields_of_the_wrong_type_are_codec_errors(field):
    """Found by the fuzz above: a list where a name goes raised TypeError (unhashable), not CodecError."""
    header = {"v": 1, "codec": "raw", "dtype": "bfloat16", "shape": [2, 4], "chunks": [[0, 2]], field: ["raw"]}
    with pytest.raises(CodecError):
        codec.Header.from_dict(header)


async def test_a_daemon_keeps_a_bounded_number_of_channels_to_other_daemons(tmp_path, monkeypatch):
    """Plans name peers, so a key holder could make a head dial many addresses: idle channels beyond
    MAX_POOLED_PEERS are closed, least recently used first; failed addresses leave nothing behind."""
    from meshd.pipeline import peers
    from meshd.wire.link import LinkRegistry
    from meshd.pipeline.plan import PeerAddress

    monkeypatch.setattr(limits, "MAX_POOLED_PEERS", 2)
    async with running_daemon(tmp_path / "a", KEY) as a, running_daemon(tmp_path / "b", KEY) as b, \
               running_daemon(tmp_path / "c", KEY) as c:
        pool = peers.PeerPool(KEY, LinkRegistry())
        first = await pool.get(PeerAddress(*a.bound))
        await pool.get(PeerAddress(*b.bound))
        await pool.get(PeerAddress(*a.bound))  # a is now the most recent
        await pool.get(PeerAddress(*c.bound))
        assert set(pool._channels) == {"%s:%d" % a.bound, "%s:%d" % c.bound}
        assert (await pool.get(PeerAddress(*a.bound))) is first and first.alive
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        with pytest.raises(MeshError):
            await pool.get(PeerAddress("127.0.0.1", closed_port))
        assert f"127.0.0.1:{closed_port}" not in pool._locks
        await pool.close()
