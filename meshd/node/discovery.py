"""Finding daemons: mDNS (``_meshd._tcp.local.``) on the LAN, and a peers file where mDNS cannot go.

A daemon advertises itself with small, non-secret TXT hints (see :func:`txt_record`) that change
only when what it hosts changes; live figures travel over the authenticated protocol, never in
TXT (listeners cache TXT for 75 minutes). A :class:`PeerBrowser` reports daemons as they appear
and disappear; nothing it reports is trusted until :func:`verify` has completed the mutual-HMAC
handshake with it, since anyone on the LAN can multicast a record.

Interfaces: by default the daemon advertises on the interface of the default route, never on
container bridges, veths or VPN tunnels (multicast does not cross VPNs, and a docker bridge address
is unreachable from other boxes); ``advertise_address`` or ``interfaces`` in the config pin it.

``zeroconf`` is imported lazily: a box running ``meshd serve --no-mdns`` does not need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs
import psutil

from .. import __version__, auth, limits
from ..config import describe_ranges
from ..errors import AuthRefused, Mismatch, PeerLost
from ..pipeline.plan import PeerAddress, PlanError
from ..telemetry.host import VIRTUAL_INTERFACE_PREFIXES
from ..telemetry.snapshot import GpuSnapshot
from ..wire.channel import Channel
from .info import NodeInfo
from .nodeid import host_key

log = logging.getLogger(__name__)

SERVICE_TYPE = "_meshd._tcp.local."
#: Version of the TXT layout below (``txtvers``), bumped if keys change meaning.
TXT_VERSION = "1"
#: RFC 6763 asks for small TXT records; each value is cut to this many bytes.
MAX_TXT_VALUE_BYTES = 100
#: A DNS label (the instance name) is at most 63 bytes.
MAX_INSTANCE_BYTES = 63
#: How long a browser waits for a discovered service's SRV/TXT/A records.
RESOLVE_TIMEOUT_MS = 3000
#: An authenticated check of a discovered or manual peer must finish within this long.
VERIFY_TIMEOUT_S = limits.CONNECT_TIMEOUT_S + limits.HANDSHAKE_TIMEOUT_S
#: The manual peers file, under the user's config directory.
PEERS_FILE_NAME = "peers"
#: Port of a manual peer written without one.
DEFAULT_PORT = 7777


# --- TXT hints ----------------------------------------------------------------------------------


def _cut(value: str, limit: int = MAX_TXT_VALUE_BYTES) -> str:
    data = value.encode()[:limit]
    return data.decode(errors="ignore")


def txt_record(info: dict, gpus: Sequence[GpuSnapshot] = ()) -> dict[str, str]:
    """The TXT hints of a daemon, from its node info and its GPUs (all text, well under 400 bytes).

    ``txtvers`` layout version, ``proto`` protocol version, ``ver`` meshd version, ``id`` node id,
    ``host`` the box (:func:`~meshd.node.nodeid.host_key`: the same for every daemon of one box), ``gpu`` GPU names (``none``), ``vram`` each GPU's VRAM in GiB, ``model`` preset, ``hash`` the
    model's content hash (16 hex), ``blocks`` hosted span (``0-15``, ``none``), ``fp`` cluster-key
    fingerprint (``insecure`` without a key).
    """
    model = info.get("model") or {}
    usable = [g for g in gpus if not g.lost]
    blocks = [i for a, b in info.get("blocks") or () for i in range(a, b)]
    return {
        "txtvers": TXT_VERSION,
        "proto": str(info.get("proto", limits.PROTOCOL_VERSION)),
        "ver": _cut(str(info.get("version", __version__)), 16),
        "id": str(info.get("node_id", "")),
        "host": host_key(str(info.get("host_id") or "")),
        "gpu": _cut(",".join(g.name for g in usable) or "none"),
        "vram": ",".join(f"{g.vram_total_bytes / (1 << 30):.0f}" if g.vram_total_bytes else "?" for g in usable),
        "model": _cut(str(model.get("preset", "")), 32),
        "hash": str(model.get("hash", ""))[:16],
        "blocks": _cut(describe_ranges(blocks)),
        "fp": info.get("key_fingerprint") or "insecure",
    }


def _decode_properties(properties: dict) -> dict[str, str]:
    """TXT properties from the network: ASCII keys, UTF-8 values; anything else is dropped."""
    out: dict[str, str] = {}
    for key, value in list(properties.items())[:64]:
        try:
            name = key.decode("ascii") if isinstance(key, bytes) else str(key)
            text = "" if value is None else (value.decode("utf-8") if isinstance(value, bytes) else str(value))
        except UnicodeDecodeError:
            continue
        if name and len(name) <= 32:
            out[name.lower()] = text[:255]
    return out


# --- interfaces ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Nic:
    """A network interface as mDNS cares about it."""

    name: str
    up: bool
    loopback: bool
    multicast: bool
    ipv4: tuple[str, ...] = ()

    @property
    def virtual(self) -> bool:
        return self.name.startswith(VIRTUAL_INTERFACE_PREFIXES)

    def unusable(self) -> str | None:
        """Why mDNS would not pick this interface by itself, or None if it would."""
        if not self.ipv4:
            return "no IPv4 address"
        if self.loopback:
            return "loopback"
        if not self.up:
            return "down"
        if not self.multicast:
            return "no multicast"
        if self.virtual:
            return "container, VM or VPN interface"
        return None


@dataclass(frozen=True)
class AddressChoice:
    """What to put in the A records (``advertise``), which local addresses to send multicast from
    (``send_on``), and why, in plain words."""

    advertise: tuple[str, ...]
    send_on: tuple[str, ...]
    reason: str
    skipped: tuple[str, ...] = ()


def list_nics() -> list[Nic]:
    stats = psutil.net_if_stats()
    addrs = psutil.net_if_addrs()
    nics = []
    for name, st in sorted(stats.items()):
        flags = set(str(getattr(st, "flags", "")).split(","))
        ipv4 = tuple(a.address for a in addrs.get(name, ()) if a.family.name == "AF_INET")
        loopback = "loopback" in flags or (bool(ipv4) and all(ipaddress.ip_address(a).is_loopback for a in ipv4))
        # Old psutil has no flags: assume multicast on every non-loopback interface.
        multicast = "multicast" in flags if flags != {""} else not loopback
        nics.append(Nic(name, st.isup, loopback, multicast, ipv4))
    return nics


def default_route_interface(route_table: Path = Path("/proc/net/route")) -> str | None:
    """The interface of the IPv4 default route (Linux), or None."""
    try:
        lines = route_table.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) > 3 and parts[1] == "00000000" and int(parts[3], 16) & 0x1:  # RTF_UP
            return parts[0]
    return None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def choose_addresses(nics: Iterable[Nic], *, advertise_address: str = "", interfaces: Sequence[str] = (),
                     listen_host: str = "0.0.0.0", default_interface: str | None = None) -> AddressChoice:
    """Where mDNS should advertise this daemon; empty ``advertise`` means nowhere (``reason`` says why)."""
    nics = list(nics)
    by_name = {n.name: n for n in nics}
    local = {ip: n for n in nics for ip in n.ipv4}
    skipped = tuple(f"{n.name} ({n.unusable()})" for n in nics if n.ipv4 and not n.loopback and n.unusable())
    if advertise_address:
        if not _is_ip(advertise_address):
            raise ValueError(f"advertise_address {advertise_address!r} must be an IP address")
        if advertise_address in local:
            return AddressChoice((advertise_address,), (advertise_address,),
                                 f"advertise_address {advertise_address} ({local[advertise_address].name})")
        auto = choose_addresses(nics, default_interface=default_interface)
        return AddressChoice((advertise_address,), auto.send_on,
                             f"advertise_address {advertise_address} (not on this box: NAT or VPN?), sent on "
                             f"{', '.join(auto.send_on) or 'no interface'}", auto.skipped)
    if listen_host not in ("", "0.0.0.0", "::"):
        if _is_ip(listen_host) and ipaddress.ip_address(listen_host).is_loopback:
            return AddressChoice((), (), f"listening on {listen_host} only: other boxes cannot reach it")
        if listen_host in local:
            return AddressChoice((listen_host,), (listen_host,), f"the listen address {listen_host}")
    if interfaces:
        chosen: list[str] = []
        for name in interfaces:
            nic = by_name.get(name)
            if nic is None or not nic.ipv4:
                raise ValueError(f"interface {name!r} from the config has no IPv4 address here "
                                 f"(interfaces: {', '.join(n.name for n in nics)})")
            chosen.extend(nic.ipv4)
        return AddressChoice(tuple(chosen), tuple(chosen), f"configured interfaces {', '.join(interfaces)}")
    real = [n for n in nics if n.unusable() is None]
    preferred = [n for n in real if n.name == default_interface]
    picked = preferred or real
    if not picked:
        return AddressChoice((), (), "no interface that is up, has IPv4 and multicast, and is not a container, "
                                     "VM or VPN interface (set advertise_address or interfaces)", skipped)
    addresses = tuple(ip for n in picked for ip in n.ipv4)
    why = f"default route interface {picked[0].name}" if preferred else \
        f"interfaces {', '.join(n.name for n in picked)} (no usable default route)"
    return AddressChoice(addresses, addresses, why, skipped)


def choose_for(config) -> AddressChoice:
    """:func:`choose_addresses` for this box and a :class:`meshd.config.DaemonConfig`."""
    return choose_addresses(list_nics(), advertise_address=config.advertise_address, interfaces=config.interfaces,
                            listen_host=config.host, default_interface=default_route_interface())


def instance_name(node_name: str, node_id: str) -> str:
    """``name-1a2b3c``: readable, and unique even when two boxes share a host name."""
    suffix = f"-{node_id[:6]}"
    base = node_name.replace(".", "-").encode()[: MAX_INSTANCE_BYTES - len(suffix)].decode(errors="ignore")
    return base + suffix


# --- advertising --------------------------------------------------------------------------------


class MdnsUnavailable(RuntimeError):
    """python-zeroconf is not installed."""


def require_zeroconf():
    """The zeroconf package, imported on first use (MdnsUnavailable when it is not installed)."""
    try:
        import zeroconf  # noqa: PLC0415 - lazy: optional on boxes that run --no-mdns
        import zeroconf.asyncio  # noqa: PLC0415
    except ImportError:
        raise MdnsUnavailable("mDNS needs python-zeroconf (pip install zeroconf), "
                              "or run meshd with --no-mdns") from None
    return zeroconf


def _ip_version(zc, addresses: Iterable[str]):
    v6 = any(ipaddress.ip_address(a).version == 6 for a in addresses)
    return zc.IPVersion.All if v6 else zc.IPVersion.V4Only


class Advertiser:
    """This daemon's ``_meshd._tcp.local.`` record: registered, updated when the span changes, and
    withdrawn (goodbye packets, so browsers drop it at once) on shutdown."""

    def __init__(self, choice: AddressChoice, port: int, node_name: str, node_id: str) -> None:
        if not choice.advertise:
            raise ValueError(f"nothing to advertise: {choice.reason}")
        self.choice = choice
        self.port = port
        self.instance = instance_name(node_name, node_id)
        self.node_id = node_id
        self._aiozc = None
        self._info = None

    def _service(self, txt: dict[str, str], name: str):
        zc = require_zeroconf()
        return zc.asyncio.AsyncServiceInfo(
            SERVICE_TYPE, name,
            parsed_addresses=list(self.choice.advertise), port=self.port, properties=txt,
            server=f"meshd-{self.node_id}.local.",
        )

    async def register(self, txt: dict[str, str]) -> str:
        """Announce the record (returns the registered instance name, renamed if it collided)."""
        zc = require_zeroconf()
        self._aiozc = zc.asyncio.AsyncZeroconf(interfaces=list(self.choice.send_on),
                                               ip_version=_ip_version(zc, self.choice.send_on))
        self._info = self._service(txt, f"{self.instance}.{SERVICE_TYPE}")
        try:
            await (await self._aiozc.async_register_service(self._info, allow_name_change=True))
        except BaseException:
            await self._aiozc.async_close()
            self._aiozc = None
            raise
        log.info("mDNS: advertising %s on %s (%s)", self._info.name, ", ".join(self.choice.advertise),
                 self.choice.reason)
        return self._info.name

    async def update(self, txt: dict[str, str]) -> None:
        if self._aiozc is None or self._info is None:
            return
        info = self._service(txt, self._info.name)  # the registered name: it may have been renamed on a collision
        self._info = info
        await (await self._aiozc.async_update_service(info))

    async def close(self) -> None:
        """Withdraw the record and close the mDNS sockets (never raises)."""
        aiozc, info, self._aiozc = self._aiozc, self._info, None
        if aiozc is None:
            return
        try:
            if info is not None:
                await (await aiozc.async_unregister_service(info))
        except Exception as exc:  # noqa: BLE001 - shutting down: say it, carry on
            log.warning("mDNS: could not withdraw %s: %s", info.name if info else "record", exc)
        finally:
            with contextlib.suppress(Exception):
                await aiozc.async_close()


# --- browsing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscoveredPeer:
    """A daemon seen on mDNS: not trusted until :func:`verify` succeeds."""

    name: str  # the instance name, e.g. "gpu-box-1a2b3c"
    node_id: str
    host: str
    port: int
    txt: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def address(self) -> PeerAddress:
        return PeerAddress(self.host, self.port)


PeerCallback = Callable[[DiscoveredPeer], Awaitable[None] | None]


def _peer_from_info(info) -> DiscoveredPeer | None:
    txt = _decode_properties(info.properties or {})
    node_id = txt.get("id", "")
    addresses = [a for a in info.parsed_scoped_addresses() if _is_ip(a)]
    # Prefer IPv4, and routable over link-local, when a record carries several.
    addresses.sort(key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a).is_link_local))
    if not node_id or len(node_id) > 64 or not addresses or not info.port:
        log.debug("mDNS: ignoring %s (no node id, address or port)", info.name)
        return None
    name = info.name[: -len(SERVICE_TYPE) - 1] if info.name.endswith("." + SERVICE_TYPE) else info.name
    return DiscoveredPeer(name, node_id, addresses[0], int(info.port), txt)


async def _call(callback: PeerCallback, peer: DiscoveredPeer) -> None:
    try:
        result = callback(peer)
        if asyncio.iscoroutine(result):
            await result
    except Exception:  # noqa: BLE001 - a consumer's bug must not stop discovery
        log.exception("peer callback failed for %s", peer.name)


class PeerBrowser:
    """Daemons appearing and disappearing on mDNS, reported live.

    ``on_add`` is called when a daemon appears and again when its record changes (same ``name``,
    new TXT); ``on_remove`` when it withdraws its record. ``interfaces``: local IPs to listen on
    (default: all).
    """

    def __init__(self, *, interfaces: Sequence[str] | None = None,
                 resolve_timeout_ms: int = RESOLVE_TIMEOUT_MS) -> None:
        self.interfaces = list(interfaces) if interfaces else None
        self.resolve_timeout_ms = resolve_timeout_ms
        self.peers: dict[str, DiscoveredPeer] = {}  # by full service name
        self._changes: dict[str, int] = {}  # per name: how many state changes so far
        self._aiozc = None
        self._browser = None
        self._tasks: set[asyncio.Task] = set()
        self._on_add: PeerCallback | None = None
        self._on_remove: PeerCallback | None = None

    async def start(self, on_add: PeerCallback, on_remove: PeerCallback) -> None:
        zc = require_zeroconf()
        self._on_add, self._on_remove = on_add, on_remove
        kwargs = {"interfaces": self.interfaces} if self.interfaces else {}
        version = _ip_version(zc, self.interfaces) if self.interfaces else zc.IPVersion.V4Only
        self._aiozc = zc.asyncio.AsyncZeroconf(ip_version=version, **kwargs)
        self._browser = zc.asyncio.AsyncServiceBrowser(self._aiozc.zeroconf, [SERVICE_TYPE],
                                                       handlers=[self._on_state_change])

    def _on_state_change(self, zeroconf, service_type: str, name: str, state_change) -> None:
        # Called on the event loop, synchronously: resolving needs a task.
        seq = self._changes[name] = self._changes.get(name, 0) + 1
        coro = self._removed(name) if state_change.name == "Removed" else self._resolve(name, seq)
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str, seq: int) -> None:
        zc = require_zeroconf()
        info = zc.asyncio.AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._aiozc.zeroconf, self.resolve_timeout_ms):
            log.debug("mDNS: %s did not resolve within %d ms", name, self.resolve_timeout_ms)
            return
        if self._changes.get(name) != seq:
            return  # removed or updated meanwhile: the later change decides
        peer = _peer_from_info(info)
        if peer is None or self.peers.get(name) == peer:
            return
        self.peers[name] = peer
        await _call(self._on_add, peer)

    async def _removed(self, name: str) -> None:
        peer = self.peers.pop(name, None)
        if peer is not None:
            await _call(self._on_remove, peer)

    async def stop(self) -> None:
        browser, aiozc = self._browser, self._aiozc
        self._browser = self._aiozc = None
        for task in list(self._tasks):
            task.cancel()
        if browser is not None:
            with contextlib.suppress(Exception):
                await browser.async_cancel()
        if aiozc is not None:
            with contextlib.suppress(Exception):
                await aiozc.async_close()


async def browse(seconds: float, *, interfaces: Sequence[str] | None = None) -> list[DiscoveredPeer]:
    """The daemons seen within ``seconds`` (for one-shot commands)."""
    browser = PeerBrowser(interfaces=interfaces)
    await browser.start(lambda peer: None, lambda peer: None)
    try:
        await asyncio.sleep(seconds)
        return list(browser.peers.values())
    finally:
        await browser.stop()


async def verify(peer: DiscoveredPeer | PeerAddress, key: bytes | None, *, timeout: float = VERIFY_TIMEOUT_S) -> dict:
    """Prove ``peer`` holds our cluster key (mutual HMAC handshake) and return its node info (the map
    it sent, with any extra fields such as its telemetry; :class:`~meshd.node.info.NodeInfo` reads it).

    Raises AuthRefused when it belongs to another cluster (its advertised key fingerprint already says
    so, or the handshake fails), Mismatch when the daemon that answers is not the node the mDNS record
    names, PeerLost when it cannot be reached.
    """
    address = peer.address if isinstance(peer, DiscoveredPeer) else peer
    if isinstance(peer, DiscoveredPeer) and key is not None:
        theirs, ours = peer.txt.get("fp"), auth.fingerprint(key)
        if theirs and theirs != ours:
            raise AuthRefused(f"{peer.name} advertises cluster key fingerprint {theirs:.16}; ours is {ours}: "
                              "it belongs to another cluster", peer=str(address))
    try:
        channel = await asyncio.wait_for(
            Channel.connect(address.host, address.port, key, hello={"node": "discovery"}), timeout)
    except asyncio.TimeoutError:
        raise PeerLost(str(address), f"no authenticated answer within {timeout:.0f} s") from None
    try:
        info = dict(channel.node)
    finally:
        await channel.close()
    answered = NodeInfo.from_wire(info).node_id
    if isinstance(peer, DiscoveredPeer) and answered != peer.node_id:
        raise Mismatch(f"the daemon at {address} is node {answered!s:.20}, but the mDNS record {peer.name} names "
                       f"node {peer.node_id} (a stale record, or the address moved)", peer=str(address))
    return info


# --- manual peers -------------------------------------------------------------------------------


class PeersFileError(ValueError):
    """A peers file line that is not ``host[:port]``."""


def default_peers_file() -> Path:
    """``~/.config/flux-mesh/peers`` (platformdirs' user config directory)."""
    return Path(platformdirs.user_config_dir("flux-mesh")) / PEERS_FILE_NAME


def parse_peers(text: str, source: str = "peers") -> list[PeerAddress]:
    """One ``host``, ``host:port`` or ``[v6]:port`` per line; ``#`` starts a comment; duplicates dropped."""
    out: list[PeerAddress] = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            address = PeerAddress.parse(entry, default_port=DEFAULT_PORT)
        except PlanError as exc:
            raise PeersFileError(f"{source}:{number}: {exc} (write one host:port per line)") from None
        if address not in out:
            out.append(address)
    return out


def load_peers_file(path: Path | None = None) -> list[PeerAddress]:
    """The manual peers in ``path`` (default :func:`default_peers_file`); a missing file is no peers."""
    path = Path(path) if path is not None else default_peers_file()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise PeersFileError(f"cannot read peers file {path}: {exc.strerror or exc}") from None
    return parse_peers(text, str(path))
