"""Sealed records and the handshake, without sockets (and the sealed transport over a socket pair):
what arrives is exactly what was sent, and anything else is named for what it is."""

import asyncio
import os
import socket

import pytest

from meshd import auth, limits
from meshd.wire.connection import Connection
from meshd.errors import MeshError
from meshd.wire.link import LinkEmulation
from meshd.wire.frames import encode_frame, frame_bytes
from meshd.wire.handshake import ClientHandshake, ServerHandshake
from meshd.wire.seal import RECORD, Opener, SealedReader, SealError, Sealer, session_keys

KEY = auth.generate_key()


def pair(record_bytes: int = 64, **kw) -> tuple[Sealer, SealedReader]:
    key = os.urandom(32)
    return Sealer(key, record_bytes=record_bytes, **kw), SealedReader(Opener(key, record_bytes=record_bytes, **kw))


def records_of(sealer: Sealer, header: dict, segments=()) -> list[bytes]:
    return [bytes(r) for r in sealer.seal_frame(encode_frame(header, list(segments)))]


def test_frames_come_back_whole_through_records_of_any_size():
    sealer, reader = pair(record_bytes=64)
    segments = [b"", os.urandom(1), os.urandom(64), os.urandom(65), os.urandom(1000)]
    stream = b"".join(records_of(sealer, {"op": "forward", "id": 3}, segments) + records_of(sealer, {"op": "echo", "id": 4}))
    frames = []
    for i in range(0, len(stream), 7):  # any split of the byte stream
        frames += reader.feed(stream[i : i + 7])
    assert [f.op for f in frames] == ["forward", "echo"]
    assert [bytes(s) for s in frames[0].segments] == segments
    assert reader.opener.sequence == sealer.sequence == 1 + 0 + 1 + 1 + 2 + 16 + 1


def test_nothing_of_the_plaintext_is_visible():
    sealer, _ = pair(record_bytes=1 << 20)
    prompt = b"a lighthouse at dusk, oil painting"
    wire = b"".join(records_of(sealer, {"op": "generate", "id": 1, "prompt": prompt.decode()}, [prompt * 4]))
    assert prompt not in wire and prompt[:8] not in wire


@pytest.mark.parametrize("where,cause", [
    ("length", "record 1 holds 268435496 bytes where a segment piece of 40 was due"),
    ("ciphertext", "record 1 failed authentication: altered in transit"),
    ("tag", "record 1 failed authentication: altered in transit"),
])
def test_a_flipped_bit_is_caught(where, cause):
    sealer, reader = pair()
    first, second = records_of(sealer, {"op": "probe", "id": 1}, [bytes(40)])
    position = {"length": 15, "ciphertext": RECORD.size + 3, "tag": len(second) - 1}[where]
    damaged = bytearray(second)
    damaged[position] ^= 0x10
    reader.feed(first)
    with pytest.raises(SealError, match=cause):
        reader.feed(bytes(damaged))


def test_replayed_dropped_reordered_and_injected_records_are_named():
    sealer, _ = pair()
    records = [records_of(sealer, {"op": "echo", "id": i})[0] for i in range(4)]

    def reader_after(*fed: bytes) -> SealedReader:
        reader = SealedReader(Opener(sealer_key, record_bytes=64))
        for r in fed:
            reader.feed(r)
        return reader

    sealer_key = sealer._dir.key  # no rekey happened: still the first key
    with pytest.raises(SealError, match="record 1 arrived again where record 2 was due: a replayed frame"):
        reader_after(records[0], records[1]).feed(records[1])
    with pytest.raises(SealError, match=r"record 2 arrived where record 1 was due: 1 record\(s\) dropped, or frames "
                                        "reordered"):
        reader_after(records[0]).feed(records[2])
    forged = RECORD.pack(b"FXMS", 1, 20) + os.urandom(36)  # well formed, the right number, no key
    with pytest.raises(SealError, match="record 1 failed authentication.*injected"):
        reader_after(records[0]).feed(forged)
    with pytest.raises(SealError, match="an unsealed frame arrived where sealed record 1 was due"):
        reader_after(records[0]).feed(frame_bytes({"op": "echo", "id": 9}))


def test_a_head_record_larger_than_any_frame_head_is_refused_before_reading_it():
    _, reader = pair()
    with pytest.raises(SealError, match="outside 16.."):
        reader.feed(RECORD.pack(b"FXMS", 0, 0xFFFFFFFF))


def test_keys_rotate_in_step_and_each_epoch_really_uses_a_new_key():
    key = os.urandom(32)
    sealer = Sealer(key, record_bytes=64, rekey_records=3)
    reader = SealedReader(Opener(key, record_bytes=64, rekey_records=3))
    for i in range(10):
        (frame,) = reader.feed(b"".join(records_of(sealer, {"op": "echo", "id": i}, [bytes([i]) * 100])))
        assert bytes(frame.segments[0]) == bytes([i]) * 100
    assert sealer.epoch == reader.opener.epoch == 10  # 10 frames of 3 records (head + 2 pieces)
    first_key_only = Opener(key, record_bytes=64)  # never rotates: record 30 is sealed under another key
    first_key_only._dir.seq = sealer.sequence
    with pytest.raises(SealError, match="record 30 failed authentication"):
        SealedReader(first_key_only).feed(records_of(sealer, {"op": "echo", "id": 10})[0])


def test_keys_also_rotate_by_bytes():
    sealer, reader = pair(record_bytes=1 << 20, rekey_bytes=1000)
    for _ in range(3):
        reader.feed(b"".join(records_of(sealer, {"op": "probe", "id": 1}, [bytes(1000)])))  # each frame passes 1000 bytes
    assert sealer.epoch == reader.opener.epoch == 3


def test_the_sequence_number_never_wraps(monkeypatch):
    sealer, _ = pair()
    sealer._dir.seq = limits.MAX_RECORD_SEQUENCE
    with pytest.raises(SealError, match="counter exhausted"):
        sealer.seal(b"x")


def test_directions_have_their_own_keys_and_both_sides_agree():
    transcript, shared = os.urandom(32), os.urandom(32)
    client = session_keys(KEY, transcript, shared, client=True)
    server = session_keys(KEY, transcript, shared, client=False)
    assert client.send == server.receive and client.receive == server.send and client.send != client.receive
    assert session_keys(KEY, os.urandom(32), shared, client=True).send != client.send  # fresh per connection


def run_handshake(client_key, server_key, fields=None):
    client, server = ClientHandshake(client_key, fields), ServerHandshake(server_key)
    challenge = server.on_hello(client.hello())
    server.on_proof(client.on_challenge(challenge))
    return client, server


def test_the_handshake_without_io_agrees_on_the_session_keys():
    client, server = run_handshake(KEY, KEY)
    assert client.keys.send == server.keys.receive and client.keys.receive == server.keys.send
    assert client.on_welcome({"op": "welcome", "node": {"name": "a"}}) == {"name": "a"}


@pytest.mark.parametrize("client_key,server_key,fields,cause", [
    (KEY, auth.generate_key(), None, "server does not hold our cluster key"),
    (None, KEY, None, "requires the cluster key"),
    (KEY, KEY, {"proto": 1}, "protocol 1; this daemon speaks 2 .protocol 2 seals every frame.: upgrade"),
    (KEY, KEY, {"nonce": b"short"}, "malformed nonce"),
], ids=["server without our key", "client without a key", "a version 1 client", "a short nonce"])
def test_the_handshake_without_io_refuses_with_the_cause(client_key, server_key, fields, cause):
    with pytest.raises(MeshError, match=cause):
        run_handshake(client_key, server_key, fields)


REWRITES = {
    "the hello's node name": ("hello", lambda h: {**h, "node": "mallory"}),
    "the hello's daemon flag": ("hello", lambda h: {**h, "daemon": False}),
    "a field added to the hello": ("hello", lambda h: {**h, "ipc": True}),
    "the challenge's protocol": ("challenge", lambda h: {**h, "proto": 3}),
    "a field added to the challenge": ("challenge", lambda h: {**h, "note": "x"}),
}


@pytest.mark.parametrize("which,rewrite", REWRITES.values(), ids=REWRITES.keys())
def test_a_plain_field_rewritten_on_the_way_fails_the_handshake(which, rewrite):
    """Every byte of both hellos is bound into the MACs (as TLS 1.3 binds its transcript): a rewrite
    that a key holder's MACs never saw is caught by the side that receives the next proof."""
    client, server = ClientHandshake(KEY, {"node": "alice", "daemon": True}), ServerHandshake(KEY)
    hello = client.hello()
    challenge = server.on_hello(rewrite(hello) if which == "hello" else hello)
    with pytest.raises(MeshError, match="handshake failed: either the server does not hold our cluster key .*, "
                                        "or the handshake was altered on the way") as error:
        client.on_challenge(rewrite(challenge) if which == "challenge" else challenge)
    assert error.value.code == "auth" and client.keys is None


def test_a_proof_over_another_transcript_is_refused_by_the_server():
    """The server checks the client's proof over the hello and challenge it handled: a key holder
    that saw the challenge with a field more proves a transcript the server never had."""
    from meshd.wire.handshake import Transcript

    client, server = ClientHandshake(KEY), ServerHandshake(KEY)
    hello = client.hello()
    challenge = server.on_hello(hello)
    seen = Transcript()
    seen.add(hello)
    forged = {"op": "proof", "proof": auth.client_proof(KEY, seen.digest({**challenge, "note": "x"}))}
    with pytest.raises(MeshError, match="handshake failed: either the client does not hold this cluster's key, "
                                        "or the handshake was altered"):
        server.on_proof(forged)
    assert server.keys is None
    server.on_proof(client.on_challenge(challenge))  # the untouched exchange still completes
    assert server.keys.receive == client.keys.send


def test_a_handshake_frame_is_read_only_in_the_encoding_the_transcript_binds():
    """A hello re-encoded (a wider integer, same value) or flagged would leave the transcript's bytes
    and the wire's apart: refused before it is parsed further."""
    import msgpack

    from meshd.wire.frames import PREAUTH_LIMITS, PREFIX, FrameReader, ProtocolError

    hello = ClientHandshake(KEY).hello()
    wide = msgpack.packb({**hello, "proto": 0}, use_bin_type=True).replace(b"\xa5proto\x00", b"\xa5proto\xcd\x00\x02")
    assert msgpack.unpackb(wide)["proto"] == 2
    with pytest.raises(ProtocolError, match="not msgpack as meshd writes it"):
        FrameReader(PREAUTH_LIMITS).feed(PREFIX.pack(limits.MAGIC, limits.FRAME_FORMAT, 0, len(wide), 0) + wide)
    plain = frame_bytes(hello)
    flagged = plain[:6] + b"\x01\x00" + plain[8:]
    with pytest.raises(ProtocolError, match="flags 0"):
        FrameReader(PREAUTH_LIMITS).feed(flagged)
    assert FrameReader(PREAUTH_LIMITS).feed(plain)[0].header == hello


def test_a_client_proof_without_the_key_is_refused():
    server = ServerHandshake(KEY)
    server.on_hello(ClientHandshake(KEY).hello())
    with pytest.raises(MeshError, match="does not hold this cluster's key") as error:
        server.on_proof({"op": "proof", "proof": os.urandom(32)})
    assert error.value.code == "auth" and server.keys is None


@pytest.mark.parametrize("emulated", [False, True], ids=["bulk threads", "paced"])
async def test_sealed_connections_carry_big_and_small_segments_both_ways(emulated):
    """Big segments are sealed and opened on the bulk-I/O threads record by record; under link
    emulation they are paced. Both ends see exactly what the other sent."""
    a, b = socket.socketpair()
    emulation = LinkEmulation.parse("20gbit,0ms") if emulated else None
    left, right = Connection(a, "left", emulation=emulation), Connection(b, "right", emulation=emulation)
    transcript = os.urandom(32)
    left.seal(session_keys(KEY, transcript, client=True))
    right.seal(session_keys(KEY, transcript, client=False))
    big, small = os.urandom(3 * limits.SEAL_RECORD_BYTES + 5), os.urandom(1000)
    try:
        sent = asyncio.ensure_future(left.send({"op": "probe", "id": 1}, [small, big, b""]))
        frame = await asyncio.wait_for(right.recv(), 10)
        size = await sent
        assert [bytes(s) for s in frame.segments] == [small, big, b""]
        assert size > len(big) + len(small)  # the records' headers and tags went too
        back = asyncio.ensure_future(right.send({"op": "reply", "id": 1}, [big]))
        assert bytes((await asyncio.wait_for(left.recv(), 10)).segments[0]) == big
        await back
    finally:
        left.abort()
        right.abort()


def test_without_in_place_cipher_calls_the_records_are_the_same(monkeypatch):
    """Older cryptography releases lack encrypt_into/decrypt_into: the copy path seals identically."""
    from meshd.wire import seal

    key, data = os.urandom(32), os.urandom(300)
    fast = bytes(Sealer(key).seal(data, bytearray(400)))
    monkeypatch.setattr(seal, "_IN_PLACE", False)
    assert bytes(Sealer(key).seal(data, bytearray(400))) == fast
    out = bytearray(300)
    Opener(key).open_into(fast[: RECORD.size], fast[RECORD.size :], out)
    assert out == data


def test_the_session_keys_need_the_ephemeral_secret_not_only_the_cluster_key():
    """Forward secrecy: someone who recorded a handshake (both nonces) and later steals the cluster key
    still lacks the X25519 secret the session keys were derived with."""
    client, server = run_handshake(KEY, KEY)
    recorded = session_keys(KEY, server._transcript, client=True)  # all but the X25519 secret
    assert recorded.send != client.keys.send and recorded.receive != client.keys.receive


def test_a_low_order_point_as_nonce_is_refused():
    server = ServerHandshake(KEY)
    client = ClientHandshake(KEY)
    zero_point = bytes(32)
    client.nonce = zero_point  # a key holder misbehaving: its MACs are right, its X25519 point is not
    challenge = server.on_hello(client.hello())
    proof = {"op": "proof", "proof": auth.client_proof(KEY, server._transcript)}
    with pytest.raises(MeshError, match="not a usable X25519 key"):
        server.on_proof(proof)


async def test_a_live_connection_rotates_its_keys_under_a_tiny_forced_limit(tmp_path, monkeypatch):
    """With a key change every 3 records, a daemon and its client rotate dozens of times, in step, over
    small frames and a big segment, and every reply still comes back right."""
    from meshd.wire.channel import Channel
    from tests.daemons import running_daemon

    monkeypatch.setattr(limits, "REKEY_RECORDS", 3)
    async with running_daemon(tmp_path, KEY) as daemon:
        channel = await Channel.connect(*daemon.bound, KEY)
        big = os.urandom(2 * limits.SEAL_RECORD_BYTES + 3)
        for _ in range(20):
            assert (await channel.request("echo")).op == "reply"
        assert (await channel.request("probe", {}, [big])).header["bytes"] == len(big)
        (session,) = daemon.sessions
        assert channel.conn.sealer.epoch == session.conn.opener.epoch >= 7
        assert channel.conn.opener.epoch == session.conn.sealer.epoch >= 7
        await channel.close()


async def test_a_client_hears_a_refusal_sent_unsealed_in_place_of_the_welcome():
    """A server may refuse after checking the proof (its one unsealed frame then); the client reports
    that refusal, not a sealing error."""
    from meshd.wire.connection import client_handshake
    from meshd.wire.frames import PREAUTH_LIMITS

    ours, theirs = socket.socketpair()
    client, server = Connection(ours, "client"), Connection(theirs, "server")
    rules = ServerHandshake(KEY)

    async def refusing_server():
        await server.send(rules.on_hello((await server.recv(PREAUTH_LIMITS)).header))
        rules.on_proof((await server.recv(PREAUTH_LIMITS)).header)
        await server.send({"op": "error", "code": "busy", "message": "too many sessions"})

    try:
        refusing = asyncio.ensure_future(refusing_server())
        with pytest.raises(MeshError, match="too many sessions") as error:
            await client_handshake(client, KEY)
        assert error.value.code == "busy"
        await refusing
    finally:
        client.abort()
        server.abort()
