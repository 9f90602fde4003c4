"""All of the dashboard's network I/O. Each coroutine here runs as a Textual worker and reports by
posting typed messages (``post`` is the app's thread-safe ``post_message``); nothing here touches a
widget. A peer that is slow or dead costs a worker some waiting, never the UI.

Per peer one :class:`PeerMonitor` keeps the connection up, polls ``info`` (health, memory, blocks,
round-trip time), measures the link, and streams telemetry: pushed snapshots where the daemon
supports the ``telemetry`` request, else readings derived from the health polls. The next poll is
scheduled only after the previous one finished, so a slow peer never piles up work.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from textual.message import Message

from meshd import limits
from meshd.errors import BadRequest, MeshError, PeerLost, ProtocolViolation
from meshd.node.discovery import PeerBrowser
from meshd.node.info import NodeInfo
from meshd.pipeline.peers import measure_bandwidth
from meshd.pipeline.plan import PeerAddress, SplitPlan
from meshd.telemetry.host import counter_rate
from meshd.telemetry.service import subscribe
from meshd.telemetry.snapshot import GpuSnapshot, HostSnapshot, LinkSnapshot, NodeSnapshot
from meshd.wire.channel import Channel

from .events import Compiled, Compiling, Event, LoadProgress
from .mesh import Mesh, Peer
from .messages import (DiscoveryState, GenerationDone, GenerationEvent, PeerDiscovered, PeerUpdated, PeerVanished,
                       SpanCompiling, SpanLoading, SplitApplied, TelemetryNote, TelemetrySampled)
from .runs import RunRecord
from .views import PeerView

Post = Callable[[Message], object]

#: Bytes sent to measure this client's bandwidth to a peer, and how often it is measured again.
LINK_PROBE_BYTES = limits.BANDWIDTH_PROBE_BYTES
LINK_MAX_AGE_S = limits.BANDWIDTH_MAX_AGE_S
LINK_TIMEOUT_S = 30.0
#: Retry delays for a peer that cannot be reached: doubling up to this.
MAX_BACKOFF_S = 15.0

TELEMETRY_UNSUPPORTED = ("waiting for daemon support: this meshd does not stream telemetry yet, so GPU load, "
                         "NVENC/NVDEC and PCIe are n/a; memory and link throughput come from health polls")


class InfoTelemetry:
    """Telemetry derived from health polls, for daemons without the ``telemetry`` request:
    memory from ``info``, link throughput from the differences of its byte counters."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int, int]] = {}

    def snapshot(self, info: NodeInfo, links: list, at: float) -> NodeSnapshot:
        free, total = info.free_bytes, info.total_bytes
        used = total - free if free is not None and total is not None else None
        gpus: tuple[GpuSnapshot, ...] = ()
        host = HostSnapshot()
        if info.memory_kind == "gpu":
            device = info.device or "cuda"
            _, _, index = device.partition(":")
            gpus = (GpuSnapshot(uuid=f"{info.node_id}/{device}", index=int(index) if index.isdigit() else 0,
                                name=info.gpu_name or device, vram_used_bytes=used, vram_total_bytes=total),)
        else:
            host = HostSnapshot(ram_used_bytes=used, ram_total_bytes=total)
        out = []
        for link in links[:64]:
            if not isinstance(link, dict) or not isinstance(link.get("peer"), str):
                continue
            sent, received = link.get("bytes_sent"), link.get("bytes_received")
            if not isinstance(sent, int) or not isinstance(received, int):
                continue
            name = link["peer"]
            before = self._last.get(name)
            self._last[name] = (at, sent, received)
            tx = rx = None
            if before is not None:  # a counter that went backwards (the daemon restarted) is n/a, not 0
                tx = counter_rate(sent, before[1], at - before[0])
                rx = counter_rate(received, before[2], at - before[0])
            out.append(LinkSnapshot(peer=name, sent_bytes_per_s=tx, received_bytes_per_s=rx, bytes_sent=sent,
                                    bytes_received=received))
        return NodeSnapshot(node_id=info.node_id or "?", time=at, monotonic=time.monotonic(),
                            gpus=gpus, host=host, links=tuple(out), nvml=TELEMETRY_UNSUPPORTED)


class PeerMonitor:
    """Keeps one peer connected and reported: health, link bandwidth, telemetry."""

    def __init__(self, mesh: Mesh, view: PeerView, post: Post, *, poll_interval: float = 2.0,
                 telemetry_interval: float = 1.0) -> None:
        self.mesh = mesh
        self.view = view
        self.post = post
        self.poll_interval = poll_interval
        self.telemetry_interval = telemetry_interval
        self._wake = asyncio.Event()
        self._measure = True
        self._measured_at = 0.0
        self._subscription: asyncio.Task | None = None
        self._channel: Channel | None = None
        self._streams: bool | None = None  # does the daemon stream telemetry? None: not asked yet
        self._fallback = InfoTelemetry()

    @property
    def label(self) -> str:
        return self.view.label

    def wake(self, measure_link: bool = False) -> None:
        """Poll now instead of waiting (and measure the link again if asked)."""
        self._measure = self._measure or measure_link
        self._wake.set()

    def publish(self, view: PeerView) -> None:
        self.view = view
        self.post(PeerUpdated(view))

    async def run(self) -> None:
        backoff = self.poll_interval
        try:
            while True:
                await self.poll_once()
                if self.view.online:
                    delay = backoff = self.poll_interval
                else:
                    delay, backoff = backoff, min(backoff * 2, MAX_BACKOFF_S)
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
        finally:
            self._stop_subscription()

    async def poll_once(self) -> None:
        """One health poll; then measure the link if due, and keep telemetry flowing."""
        peer = self.mesh.peers.get(self.label)
        if peer is None:
            return
        await self.mesh.connect(peer, limits.POLL_TIMEOUT_S)
        if not peer.online:
            self._stop_subscription()
            self.publish(self.view.failed(peer.failure, peer.error or "offline"))
            return
        if peer.channel is not self._channel:  # a new connection: ask again what it supports
            self._stop_subscription()
            self._channel, self._streams = peer.channel, None
        view = self.view.with_info(peer.info, peer.rtt_ms)
        self.publish(view)
        if self._measure or time.monotonic() - self._measured_at > LINK_MAX_AGE_S:
            await self._measure_link(peer)
        if self._streams is False:
            self.post(TelemetrySampled(self.label, self._fallback.snapshot(peer.info, peer.links, time.time()), "info"))
        elif self._subscription is None or self._subscription.done():
            self._subscription = asyncio.ensure_future(self._subscribe(peer.channel))

    async def _measure_link(self, peer: Peer) -> None:
        self._measure = False
        self._measured_at = time.monotonic()
        try:
            link = await measure_bandwidth(peer.channel, LINK_PROBE_BYTES, LINK_TIMEOUT_S)
        except MeshError:
            return  # the next health poll reports the peer's state
        self.publish(replace(self.view, bandwidth_bytes_per_s=link.bytes_per_s, rtt_ms=link.rtt_ms))

    async def _subscribe(self, channel: Channel) -> None:
        """Stream the daemon's telemetry until cancelled, the daemon ends it, or the link fails."""

        def on_snapshot(snapshot: NodeSnapshot) -> None:
            if self._streams is not True:
                self._streams = True
                self.post(TelemetryNote(self.label, None))
            self.post(TelemetrySampled(self.label, snapshot, "daemon"))

        try:
            await subscribe(channel, on_snapshot, self.telemetry_interval)
        except MeshError as exc:
            if isinstance(exc, BadRequest) and self._streams is None:
                self._streams = False  # an older daemon: fall back to health polls
                self.post(TelemetryNote(self.label, TELEMETRY_UNSUPPORTED))
                self.wake()
            elif isinstance(exc, ProtocolViolation):
                self.post(TelemetryNote(self.label, f"this peer sent telemetry we cannot read: {exc.message}"))
            # Otherwise the link failed: the next health poll reports it and subscribes again.

    def _stop_subscription(self) -> None:
        if self._subscription is not None and not self._subscription.done():
            self._subscription.cancel()  # Channel.request sends the daemon a cancel frame
        self._subscription = None


# --- one-shot jobs -----------------------------------------------------------------------------------


async def apply_split(mesh: Mesh, plan: SplitPlan, post: Post) -> SplitPlan:
    """Make every stage's peer hold its blocks (progress per peer), then report the plan applied."""
    t0 = time.perf_counter()

    def on_event(event: Event) -> None:
        match event:
            case LoadProgress(peer=peer, blocks_done=done, blocks_total=total):
                post(SpanLoading(str(peer), done, total))
            case Compiling() | Compiled():
                post(SpanCompiling(str(event.peer), event.describe()))

    require_online(mesh, plan)
    await mesh.apply(plan, on_event=on_event)
    post(SplitApplied(plan, time.perf_counter() - t0))
    return plan


def require_online(mesh: Mesh, plan: SplitPlan) -> None:
    """MeshError naming every peer of the plan that is not connected now."""
    down = []
    for stage in plan.stages:
        peer = mesh.peer_at(stage.peer)
        if not peer.online:
            down.append(f"{peer.label} ({peer.address}): {peer.error or 'not connected'}")
    if down:
        raise PeerLost(None, "the split needs peers that are offline: " + "; ".join(down))


async def generate(mesh: Mesh, plan: SplitPlan, run: RunRecord, post: Post, *,
                   save: Callable[[bytes], Path], text_encoder: PeerAddress | None = None) -> Path:
    """Apply the plan if a peer lost its blocks, run the generation with live events, save the PNG.
    ``text_encoder``: the peer that encodes the prompt, when not the head."""
    require_online(mesh, plan)
    await mesh.apply(plan)
    outcome = await mesh.generate(plan, run.params, codec=run.codec, text_encoder=text_encoder,
                                  on_event=lambda event: post(GenerationEvent(run.id, event)))
    path = await asyncio.to_thread(save, outcome.png)
    post(GenerationDone(run.id, outcome.summary, outcome.png, path))
    return path


async def start_local_daemons(cluster) -> list[PeerAddress]:
    """``meshtui demo``: start the loopback daemons (blocking waits run on a thread)."""
    return await asyncio.to_thread(cluster.start)


async def browse(post: Post) -> None:
    """Find daemons over mDNS until cancelled (without python-zeroconf or multicast the app goes on)."""

    def added(found) -> None:
        hints = {str(k)[:32]: str(v)[:64] for k, v in (found.txt or {}).items()}
        post(PeerDiscovered(str(found.name), found.node_id, PeerAddress(str(found.host), int(found.port)), hints))

    def removed(found) -> None:
        post(PeerVanished(str(found.name), PeerAddress(str(found.host), int(found.port))))

    browser = PeerBrowser()
    try:
        await browser.start(added, removed)
    except Exception as exc:  # noqa: BLE001 - no zeroconf, no multicast, no network: the app works without it
        post(DiscoveryState(False, f"mDNS discovery could not start ({type(exc).__name__}: {exc}); "
                                   "add peers by hand (a)"))
        return
    post(DiscoveryState(True, "browsing mDNS for meshd daemons"))
    try:
        await asyncio.get_running_loop().create_future()  # browse until the worker is cancelled
    finally:
        await browser.stop()
