"""No key, a wrong key, a wrong protocol version, or a plan that does not match: each is refused with
a clear error, and the daemon keeps serving the next good client."""

import asyncio

import pytest

from meshd import auth, limits
from meshd.wire.channel import Channel
from meshd.wire.connection import Connection, client_handshake, connect_socket
from meshd.errors import MeshError
from meshd.wire.frames import frame_bytes
from tests.daemons import running_daemon

KEY = auth.generate_key()


async def good_client_works(daemon) -> None:
    host, port = daemon.bound
    channel = await Channel.connect(host, port, KEY)
    reply = await channel.request("info")
    assert reply.header["node"]["model"]["preset"] == "tiny"
    await channel.close()


async def test_good_key_is_welcomed_and_sees_node_info(tmp_path):
    async with running_daemon(tmp_path, KEY) as daemon:
        host, port = daemon.bound
        channel = await Channel.connect(host, port, KEY)
        assert channel.node["key_fingerprint"] == auth.fingerprint(KEY)
        await channel.close()


async def test_client_without_key_is_refused(tmp_path):
    async with running_daemon(tmp_path, KEY) as daemon:
        with pytest.raises(MeshError, match="requires the cluster key") as info:
            await Channel.connect(*daemon.bound, None)
        assert info.value.code == "auth"
        await good_client_works(daemon)


async def test_wrong_key_is_refused_both_ways(tmp_path):
    async with running_daemon(tmp_path, KEY) as daemon:
        with pytest.raises(MeshError, match="does not hold our cluster key") as info:
            await Channel.connect(*daemon.bound, auth.generate_key())
        assert info.value.code == "auth"
        await good_client_works(daemon)


async def test_server_without_our_key_cannot_fake_the_handshake(tmp_path):
    """A rogue daemon with another key is caught by the client before it says anything."""
    async with running_daemon(tmp_path, auth.generate_key()) as rogue:
        with pytest.raises(MeshError, match="server does not hold our cluster key"):
            await Channel.connect(*rogue.bound, KEY)


async def test_wrong_protocol_version_names_both_versions(tmp_path):
    async with running_daemon(tmp_path, KEY) as daemon:
        conn = Connection(await connect_socket(*daemon.bound), "test")
        with pytest.raises(MeshError, match=rf"protocol 99.*speaks {limits.PROTOCOL_VERSION}") as info:
            await client_handshake(conn, KEY, {"proto": 99})
        assert info.value.code == "version"
        await conn.close()
        await good_client_works(daemon)


async def test_a_version_1_peer_is_told_to_upgrade(tmp_path):
    """Protocol 1 sent frames unsealed after the handshake: such a peer is refused, and told why."""
    async with running_daemon(tmp_path, KEY) as daemon:
        conn = Connection(await connect_socket(*daemon.bound), "test")
        with pytest.raises(MeshError, match=r"protocol 1; this daemon speaks 2 \(protocol 2 seals every frame\): "
                                            r"upgrade meshd") as info:
            await client_handshake(conn, KEY, {"proto": 1})
        assert info.value.code == "version"
        await conn.close()
        await good_client_works(daemon)


@pytest.mark.parametrize("payload", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 64, b"FXMH" + b"\xff" * 40])
async def test_garbage_before_auth_closes_only_that_connection(tmp_path, payload):
    async with running_daemon(tmp_path, KEY) as daemon:
        reader, writer = await asyncio.open_connection(*daemon.bound)
        writer.write(payload)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(4096), 5)
        assert b"FXMH" in data or data == b""  # an error frame, or a plain close
        writer.close()
        await good_client_works(daemon)


async def test_oversized_hello_is_refused(tmp_path):
    async with running_daemon(tmp_path, KEY) as daemon:
        reader, writer = await asyncio.open_connection(*daemon.bound)
        writer.write(frame_bytes({"op": "hello", "proto": 1, "pad": "x" * 4000}))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(4096), 5)
        assert b"exceeds the limit" in data
        writer.close()
        await good_client_works(daemon)


async def test_requests_after_auth_must_name_known_ops(tmp_path):
    async with running_daemon(tmp_path, KEY) as daemon:
        channel = await Channel.connect(*daemon.bound, KEY)
        with pytest.raises(MeshError, match="unknown request"):
            await channel.request("format-disk")
        assert (await channel.request("echo")).op == "reply"
        await channel.close()


def plan_fields(daemon, stages, model=None):
    return {
        "job": "job1",
        "model": model or daemon.model.identity.to_dict(),
        "stages": stages,
        "geometry": {"batch": 1, "txt_len": 32, "img_h": 16, "img_w": 16},
        "ids": [],
    }


async def test_prepare_with_blocks_the_peer_does_not_hold_names_both(tmp_path):
    async with running_daemon(tmp_path, KEY, blocks=range(3, 6)) as daemon:
        channel = await Channel.connect(*daemon.bound, KEY)
        stage = {"peer": "%s:%d" % daemon.bound, "start": 2, "end": 6}
        with pytest.raises(MeshError, match=r"holds blocks 3-5 of tiny; the plan asks it for blocks 2-5") as info:
            await channel.request("prepare", plan_fields(daemon, [stage]))
        assert info.value.code == "mismatch"
        await channel.close()
        await good_client_works(daemon)


async def test_prepare_for_another_model_names_both(tmp_path):
    async with running_daemon(tmp_path, KEY, blocks=range(3, 6)) as daemon:
        channel = await Channel.connect(*daemon.bound, KEY)
        stage = {"peer": "%s:%d" % daemon.bound, "start": 3, "end": 6}
        other = {"model_id": "klein", "preset": "klein-4b", "hash": "ab" * 32, "dtype": "bfloat16"}
        with pytest.raises(MeshError, match=r"holds tiny \(tiny, bfloat16, sha256 .*the plan expects klein \(klein-4b"):
            await channel.request("prepare", plan_fields(daemon, [stage], other))
        await channel.close()


async def test_forward_for_unknown_job_is_refused(tmp_path):
    async with running_daemon(tmp_path, KEY, blocks=range(3, 6)) as daemon:
        channel = await Channel.connect(*daemon.bound, KEY)
        with pytest.raises(MeshError, match="no job"):
            await channel.request("forward", {"job": "nope"})
        await channel.close()


async def test_flood_of_unauthenticated_connections_is_bounded(tmp_path):
    async with running_daemon(tmp_path, KEY) as daemon:
        opened = []
        for _ in range(limits.MAX_PREAUTH_CONNECTIONS + 10):
            opened.append(await asyncio.open_connection(*daemon.bound))
        await asyncio.sleep(0.2)
        assert daemon._preauth <= limits.MAX_PREAUTH_CONNECTIONS
        for _, writer in opened:
            writer.close()
        await asyncio.sleep(0.2)
        await good_client_works(daemon)
