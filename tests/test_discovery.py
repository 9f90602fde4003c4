"""Discovery: daemons appear on mDNS by themselves with correct hints and vanish when stopped; a peer is
trusted only after an authenticated handshake; interfaces are chosen sensibly; manual peers come from
a plain file; node ids are stable and not inherited by a copied state directory.

The mDNS test runs real zeroconf and real daemons. As root it uses a private veth link (no other host
on it, so nothing on the CI network can interfere); otherwise the default route's interface.
"""

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import platformdirs
import pytest

from meshd import auth, limits
from meshd.config import DaemonConfig
from meshd.wire.channel import Channel
from meshd.node.discovery import (
    DiscoveredPeer,
    Nic,
    PeerBrowser,
    PeersFileError,
    _decode_properties,
    choose_addresses,
    choose_for,
    default_peers_file,
    default_route_interface,
    instance_name,
    load_peers_file,
    parse_peers,
    txt_record,
    verify,
)
from meshd.errors import MeshError
from meshd.wire.ipc import host_id
from meshd.node.nodeid import NODE_ID_FILE, host_key, read_node_id, stable_node_id
from meshd.pipeline.plan import PeerAddress
from meshd.telemetry.snapshot import GpuSnapshot
from meshd.telemetry.nvml import NvmlGpus
from meshtui.local import LocalCluster
from tests.daemons import running_daemon

KEY = auth.generate_key()


# --- TXT hints ----------------------------------------------------------------------------------


INFO = {
    "node_id": "0123456789abcdef", "version": "0.1.0", "proto": limits.PROTOCOL_VERSION,
    "model": {"model_id": "flux2-klein-9b", "preset": "klein-9b", "hash": "3f2a" * 16, "dtype": "bfloat16"},
    "blocks": [[0, 16]], "key_fingerprint": auth.fingerprint(KEY), "host_id": "8c1f0e2a-boot-id",
}


def test_txt_hints_are_small_and_say_what_a_peer_offers():
    gpus = [GpuSnapshot("GPU-1", 0, "NVIDIA GeForce RTX 4090", vram_total_bytes=24 << 30),
            GpuSnapshot("GPU-2", 1, "NVIDIA GeForce RTX 3080", vram_total_bytes=10 << 30)]
    txt = txt_record(INFO, gpus)
    assert txt == {"txtvers": "1", "proto": str(limits.PROTOCOL_VERSION), "ver": "0.1.0", "id": "0123456789abcdef",
                   "host": host_key("8c1f0e2a-boot-id"),
                   "gpu": "NVIDIA GeForce RTX 4090,NVIDIA GeForce RTX 3080", "vram": "24,10", "model": "klein-9b",
                   "hash": "3f2a" * 4, "blocks": "0-15", "fp": auth.fingerprint(KEY)}
    assert sum(len(k) + len(v) + 2 for k, v in txt.items()) < 220  # RFC 6763: keep TXT small
    values = " ".join(txt.values())
    assert KEY.hex() not in values and KEY.hex().upper() not in values  # only the key's fingerprint goes out
    assert "8c1f0e2a-boot-id" not in values and len(txt["host"]) == 16  # the box, not its boot id


def test_every_daemon_of_one_box_advertises_the_same_host_and_other_boxes_another():
    one, other = txt_record({**INFO, "node_id": "1" * 16}), txt_record({**INFO, "host_id": "another-boot"})
    assert one["host"] == txt_record(INFO)["host"] != other["host"]
    assert txt_record({**INFO, "host_id": ""})["host"] == ""  # unknown: grouped with nothing


def test_txt_hints_without_gpu_or_key_or_blocks():
    txt = txt_record({**INFO, "blocks": [], "key_fingerprint": None}, [GpuSnapshot("GPU-x", 0, "gone", lost=True)])
    assert (txt["gpu"], txt["vram"], txt["blocks"], txt["fp"]) == ("none", "", "none", "insecure")


def test_txt_from_the_network_is_decoded_defensively():
    raw = {b"id": b"abc", b"GPU": b"RTX 4090", b"bad": b"\xff\xfe", "caf\u00e9".encode(): b"x", b"empty": None}
    assert _decode_properties(raw) == {"id": "abc", "gpu": "RTX 4090", "empty": ""}


def test_instance_names_fit_a_dns_label_and_stay_unique():
    name = instance_name("a" * 100, "0123456789abcdef")
    assert len(name.encode()) <= 63 and name.endswith("-012345")
    assert instance_name("box.lan", "fedcba9876543210") == "box-lan-fedcba"


# --- interfaces ---------------------------------------------------------------------------------


LAN = Nic("enp5s0", True, False, True, ("192.168.1.20",))
WIFI = Nic("wlan0", True, False, True, ("192.168.7.3",))
DOCKER = Nic("docker0", True, False, True, ("172.17.0.1",))
VETH = Nic("veth12ab", True, False, True, ("169.254.3.1",))
TAILSCALE = Nic("tailscale0", True, False, False, ("100.64.0.5",))
LO = Nic("lo", True, True, False, ("127.0.0.1",))
BOX = [LO, DOCKER, LAN, TAILSCALE, VETH, WIFI]


def test_the_default_route_interface_is_chosen_and_bridges_vpns_never():
    choice = choose_addresses(BOX, default_interface="enp5s0")
    assert choice.advertise == choice.send_on == ("192.168.1.20",)
    assert "default route" in choice.reason
    assert {"docker0", "veth12ab", "tailscale0"} <= {s.split()[0] for s in choice.skipped}


def test_without_a_usable_default_route_every_real_interface_is_used():
    choice = choose_addresses(BOX, default_interface="docker0")
    assert choice.advertise == ("192.168.1.20", "192.168.7.3")


def test_only_container_interfaces_means_nothing_to_advertise_and_says_so():
    choice = choose_addresses([LO, DOCKER, VETH], default_interface="docker0")
    assert choice.advertise == ()
    assert "advertise_address" in choice.reason


def test_a_pinned_address_or_interface_wins():
    pinned = choose_addresses(BOX, advertise_address="192.168.7.3", default_interface="enp5s0")
    assert pinned.advertise == pinned.send_on == ("192.168.7.3",)
    nat = choose_addresses(BOX, advertise_address="203.0.113.9", default_interface="enp5s0")
    assert (nat.advertise, nat.send_on) == (("203.0.113.9",), ("192.168.1.20",))
    assert choose_addresses(BOX, interfaces=["docker0"]).advertise == ("172.17.0.1",)  # explicit is allowed
    with pytest.raises(ValueError, match="interface 'eth9'"):
        choose_addresses(BOX, interfaces=["eth9"])
    with pytest.raises(ValueError, match="must be an IP"):
        choose_addresses(BOX, advertise_address="box.local")


def test_a_daemon_listening_on_loopback_is_not_advertised():
    choice = choose_addresses(BOX, listen_host="127.0.0.1", default_interface="enp5s0")
    assert choice.advertise == () and "127.0.0.1" in choice.reason
    assert choose_addresses(BOX, listen_host="192.168.7.3").advertise == ("192.168.7.3",)


def test_default_route_is_read_from_the_kernel_table(tmp_path):
    table = tmp_path / "route"
    table.write_text("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
                     "docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\n"
                     "enp5s0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\n")
    assert default_route_interface(table) == "enp5s0"
    assert default_route_interface(tmp_path / "missing") is None


# --- manual peers -------------------------------------------------------------------------------


def test_peers_file_one_address_per_line_with_comments(tmp_path):
    path = tmp_path / "peers"
    path.write_text("# my boxes across the VPN\n"
                    "10.8.0.7:7777   # desktop\n"
                    "\n"
                    "old-box.lan\n"
                    "[fd00::7]:7000\n"
                    "10.8.0.7:7777\n")
    assert load_peers_file(path) == [PeerAddress("10.8.0.7", 7777), PeerAddress("old-box.lan", 7777),
                                     PeerAddress("fd00::7", 7000)]
    assert load_peers_file(tmp_path / "none") == []


def test_a_bad_peers_line_names_the_file_and_line():
    with pytest.raises(PeersFileError, match=r"peers:2: .*port 'x'"):
        parse_peers("a:1\nb:x\n", "peers")


def test_the_default_peers_file_lives_in_the_user_config_dir():
    assert default_peers_file() == Path(platformdirs.user_config_dir("flux-mesh")) / "peers"


# --- stable node ids ----------------------------------------------------------------------------


def test_node_id_is_stable_across_restarts(tmp_path):
    first = stable_node_id(tmp_path, machine="m1")
    assert stable_node_id(tmp_path, machine="m1") == first
    assert len(first) == 16 and read_node_id(tmp_path, machine="m1") == first


def test_a_state_dir_copied_to_another_machine_gets_a_new_id(tmp_path, caplog):
    original = stable_node_id(tmp_path / "a", machine="box-a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # e.g. a cloned disk or rsync of /var/lib/meshd
    assert read_node_id(tmp_path / "b", machine="box-b") is None
    copied = stable_node_id(tmp_path / "b", machine="box-b")
    assert copied != original
    assert "another machine" in caplog.text
    assert stable_node_id(tmp_path / "b", machine="box-b") == copied  # and it sticks
    assert stable_node_id(tmp_path / "a", machine="box-a") == original


def test_an_id_file_from_before_machine_stamps_is_adopted(tmp_path):
    (tmp_path / NODE_ID_FILE).write_text("00112233aabbccdd\n")
    assert stable_node_id(tmp_path, machine="m") == "00112233aabbccdd"
    assert (tmp_path / NODE_ID_FILE).read_text().strip().endswith("00112233aabbccdd m")


def test_read_node_id_never_creates_one(tmp_path):
    assert read_node_id(tmp_path / "state") is None
    assert not (tmp_path / "state").exists()


# --- verification -------------------------------------------------------------------------------


async def test_verify_returns_node_info_only_with_the_right_key(tmp_path):
    async with running_daemon(tmp_path, KEY) as daemon:
        address = PeerAddress(*daemon.bound)
        info = await verify(address, KEY)
        assert info["node_id"] == daemon.node_id
        with pytest.raises(MeshError) as wrong:
            await verify(address, auth.generate_key())
        assert wrong.value.code == "auth"


async def test_a_record_from_another_cluster_or_naming_another_node_is_refused(tmp_path):
    async with running_daemon(tmp_path, KEY) as daemon:
        host, port = daemon.bound
        good = DiscoveredPeer("box-123456", daemon.node_id, host, port, txt_record(daemon.node_info()))
        assert (await verify(good, KEY))["node_id"] == daemon.node_id
        other = DiscoveredPeer("box-123456", daemon.node_id, host, port, {**good.txt, "fp": "feedfacefeedface"})
        with pytest.raises(MeshError, match="belongs to another cluster") as info:
            await verify(other, KEY)
        assert info.value.code == "auth"
        stale = DiscoveredPeer("box-123456", "ffffffffffffffff", host, port, good.txt)
        with pytest.raises(MeshError, match="names node ffffffffffffffff") as info:
            await verify(stale, KEY)
        assert info.value.code == "mismatch"


async def test_an_unreachable_peer_is_a_clear_error():
    with pytest.raises(MeshError) as info:
        await verify(PeerAddress("127.0.0.1", 9), KEY)
    assert info.value.code == "peer-lost"


# --- real mDNS ----------------------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def private_veth_link():
    """A veth pair with nothing on the far end: multicast sent on it loops back to this host only.
    Yields its local address, or None where links cannot be made (not root, no CAP_NET_ADMIN, no veth)."""
    tag = os.getpid() % 100000
    host_end, far_end, address = f"fmh{tag}", f"fmp{tag}", f"10.231.{200 + tag % 50}.1"
    if os.geteuid() != 0 or not shutil.which("ip"):
        yield None
        return
    try:
        _ip("link", "add", host_end, "type", "veth", "peer", "name", far_end)
    except subprocess.CalledProcessError:
        yield None
        return
    try:
        _ip("addr", "add", f"{address}/24", "dev", host_end)
        _ip("link", "set", far_end, "up")
        _ip("link", "set", host_end, "up")
        yield address
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)


@pytest.fixture(scope="module")
def mdns_address():
    """A local IPv4 address on a multicast-capable link for daemons and browser to meet on: a private
    veth link where possible (nothing else on the CI network can interfere), else the default route's."""
    with private_veth_link() as address:
        if address is not None:
            yield address
            return
    choice = choose_for(DaemonConfig())
    if not choice.advertise:
        pytest.skip(f"no private link and no interface for mDNS: {choice.reason}")
    yield choice.advertise[0]


async def _wait_for(condition, timeout: float, what: str) -> float:
    start = asyncio.get_running_loop().time()
    while not condition():
        if asyncio.get_running_loop().time() - start > timeout:
            pytest.fail(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.05)
    return asyncio.get_running_loop().time() - start


async def test_two_daemons_appear_with_correct_hints_and_one_vanishes_when_stopped(tmp_path, mdns_address):
    added: dict[str, DiscoveredPeer] = {}
    removed: dict[str, DiscoveredPeer] = {}
    browser = PeerBrowser(interfaces=[mdns_address])
    await browser.start(lambda p: added.__setitem__(p.node_id, p), lambda p: removed.__setitem__(p.node_id, p))
    cluster = LocalCluster(workdir=tmp_path, common_args=[
        "--device", "cpu", "--host", "0.0.0.0", "--mdns", "--advertise-address", mdns_address])
    try:
        a = cluster.add("mdns-a", "--blocks", "0-2")
        b = cluster.add("mdns-b")
        await asyncio.to_thread(cluster.start)
        ready = {d.name: json.loads((tmp_path / f"{d.name}.ready").read_text()) for d in (a, b)}
        ids = {name: r["node_id"] for name, r in ready.items()}
        await _wait_for(lambda: set(ids.values()) <= set(added), 10, "discovery of both daemons")

        gpus = NvmlGpus().open().inventory()  # the daemons run on this same box
        for name, blocks in (("mdns-a", "0-2"), ("mdns-b", "none")):
            peer = added[ids[name]]
            assert (peer.host, peer.port) == (mdns_address, ready[name]["port"])
            assert peer.name.startswith(f"{name}-{ids[name][:6]}")
            txt = peer.txt
            assert (txt["txtvers"], txt["proto"], txt["id"]) == ("1", str(limits.PROTOCOL_VERSION), ids[name])
            assert (txt["model"], txt["blocks"]) == ("tiny", blocks)
            assert txt["host"] == host_key(host_id())  # both daemons: this box
            assert txt["fp"] == auth.fingerprint(auth.read_key(cluster.key_file))
            assert txt["gpu"] == (",".join(g.name for g in gpus) or "none")
            info = await verify(peer, auth.read_key(cluster.key_file))  # trusted only after this
            assert info["node_id"] == ids[name] and txt["hash"] == info["model"]["hash"][:16]

        # A plan loads blocks on b: its record is re-announced with the new span.
        channel = await Channel.connect(mdns_address, ready["mdns-b"]["port"], auth.read_key(cluster.key_file))
        await channel.request("load", {"blocks": [[3, 6]]}, timeout=60)
        await channel.close()
        await _wait_for(lambda: added[ids["mdns-b"]].txt["blocks"] == "3-5", 5, "the TXT update")

        # `meshtui peers --json`: both daemons, verified, each once (a is also in the peers file,
        # by another address), with their latest telemetry snapshots.
        peers_file = tmp_path / "peers"
        peers_file.write_text(f"# a, by hand\n127.0.0.1:{ready['mdns-a']['port']}\n")
        listing = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "meshtui", "peers", "--json", "--browse", "2", "--key-file", str(cluster.key_file),
            "--peers-file", str(peers_file)], capture_output=True, text=True, timeout=60)
        assert listing.returncode == 0, listing.stderr
        mine = {p["node_id"]: p for p in json.loads(listing.stdout) if p["node_id"] in ids.values()}
        assert set(mine) == set(ids.values())
        assert sorted(mine[ids["mdns-a"]]["sources"]) == ["manual", "mdns"]
        for peer in mine.values():
            assert peer["verified"] and peer["error"] is None
            assert peer["telemetry"]["node_id"] == peer["node_id"]
            assert peer["telemetry"]["host"]["ram_total_bytes"] > 0

        await asyncio.to_thread(b.stop)
        took = await _wait_for(lambda: ids["mdns-b"] in removed, 5, "removal of the stopped daemon")
        assert took < 5
        assert ids["mdns-a"] not in removed
        assert ids["mdns-a"] in {p.node_id for p in browser.peers.values()}
        assert ids["mdns-b"] not in {p.node_id for p in browser.peers.values()}
    finally:
        await browser.stop()
        await asyncio.to_thread(cluster.stop)
