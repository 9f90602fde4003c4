"""Live telemetry over the protocol: what this box's GPUs, host and meshd links are doing.

The daemon's :class:`~meshd.telemetry.sampler.TelemetrySampler` reads the sources; subscribers (request
op ``telemetry``) are pushed the latest snapshot, so ten dashboards cost the same NVML calls as one,
and a slow subscriber only receives fewer snapshots (its sends wait on the socket). The client side
(:func:`subscribe`, :func:`first_snapshot`) is here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from ..errors import MeshError
from ..fields import wire_number
from .sampler import DEFAULT_INTERVAL_S, MAX_INTERVAL_S, TelemetrySampler
from .snapshot import NodeSnapshot

#: Request op of a telemetry subscription, and the kind of the events it pushes.
TELEMETRY_OP = "telemetry"
TELEMETRY_EVENT = "telemetry"
#: A subscriber's requested period is clamped to this range.
MIN_INTERVAL_S = 0.5
#: A subscription re-checks whether the daemon is draining at least this often.
DRAIN_CHECK_S = 1.0


def clamp_interval(value: object) -> float:
    """A subscriber's requested period, clamped to MIN_INTERVAL_S..MAX_INTERVAL_S."""
    if value is None:
        return DEFAULT_INTERVAL_S
    if wire_number(value) is None:
        raise MeshError("bad-request", f"telemetry interval must be a number of seconds, got {value!r:.40}")
    return min(max(float(value), MIN_INTERVAL_S), MAX_INTERVAL_S)


class TelemetryService:
    """The daemon side of telemetry: the ``telemetry`` request and the ``telemetry`` field of node info.

    Create it inside the running event loop; :meth:`attach` registers it on a daemon and
    :meth:`close` ends every subscription (a final reply ``{"ended": ...}``) and stops the sampler.
    """

    def __init__(self, sampler: TelemetrySampler) -> None:
        self.sampler = sampler
        self._loop = asyncio.get_running_loop()
        self._tick: asyncio.Future = self._loop.create_future()
        self._closed = asyncio.Event()
        self._daemon = None
        sampler.listeners.append(self._from_thread)

    def attach(self, daemon) -> TelemetryService:
        """Serve ``telemetry`` requests on ``daemon`` and add the latest snapshot to its node info."""
        self._daemon = daemon
        daemon.extra_ops[TELEMETRY_OP] = self.handle
        daemon.info_providers.append(self.info)
        return self

    def info(self) -> dict:
        latest = self.sampler.latest
        return {"telemetry": latest.to_dict() if latest is not None else None}

    def _from_thread(self, snapshot: NodeSnapshot) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(self._publish, snapshot)

    def _publish(self, snapshot: NodeSnapshot | None) -> None:
        tick, self._tick = self._tick, self._loop.create_future()
        if not tick.done():
            tick.set_result(snapshot)

    def _ending(self) -> str | None:
        if self._closed.is_set():
            return "telemetry stopped"
        if self._daemon is not None and self._daemon.draining:
            return "daemon is shutting down"
        return None

    async def handle(self, request) -> tuple[dict, list]:
        """Push ``{"kind": "telemetry", "snapshot": {...}}`` events until the client cancels."""
        interval = clamp_interval(request.header.get("interval"))
        sent: NodeSnapshot | None = None
        while (reason := self._ending()) is None:
            latest = self.sampler.latest
            if latest is None or latest is sent:
                # Wait for the sampler's next snapshot (subscribers never trigger a reading).
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._tick), DRAIN_CHECK_S)
                continue
            await request.event({"kind": TELEMETRY_EVENT, "snapshot": latest.to_dict()})
            sent = latest
            await self._pause(interval)
        return {"ended": reason}, []

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, waking early when telemetry closes or the daemon starts draining."""
        deadline = time.monotonic() + seconds
        while self._ending() is None and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closed.wait(), min(left, DRAIN_CHECK_S))

    async def close(self) -> None:
        """End the subscriptions and stop the sampler thread (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._publish(None)
        with contextlib.suppress(ValueError):
            self.sampler.listeners.remove(self._from_thread)
        await asyncio.to_thread(self.sampler.stop)


def serve_telemetry(daemon, *, interval: float | None = None, nvml: Any | None = None) -> TelemetryService:
    """Start a sampler for ``daemon`` (its node id, its links) and serve it; call in the event loop."""
    sampler = TelemetrySampler(daemon.node_id, interval=interval or daemon.config.telemetry_interval,
                               links=daemon.links, nvml=nvml)
    sampler.start()
    return TelemetryService(sampler).attach(daemon)


# --- the client side ----------------------------------------------------------------------------------


async def subscribe(channel, on_snapshot: Callable[[NodeSnapshot], Any], interval: float = DEFAULT_INTERVAL_S) -> dict:
    """Receive a peer's snapshots until cancelled (or until the daemon ends the subscription, whose
    final reply header is returned). A malformed snapshot raises MeshError: the peer is broken."""

    async def event(frame) -> None:
        if frame.header.get("kind") != TELEMETRY_EVENT:
            return
        try:
            snapshot = NodeSnapshot.from_dict(frame.header.get("snapshot"))
        except (ValueError, TypeError) as exc:
            raise MeshError("protocol", f"bad telemetry snapshot: {exc}", peer=channel.name) from None
        result = on_snapshot(snapshot)
        if asyncio.iscoroutine(result):
            await result

    reply = await channel.request(TELEMETRY_OP, {"interval": interval}, on_event=event, timeout=None)
    return {k: v for k, v in reply.header.items() if k not in ("op", "id")}


async def first_snapshot(channel, timeout: float = 10.0) -> NodeSnapshot:
    """One snapshot from a peer: subscribe, take the first push, cancel."""
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    def take(snapshot: NodeSnapshot) -> None:
        if not got.done():
            got.set_result(snapshot)

    task = asyncio.ensure_future(subscribe(channel, take))
    try:
        await asyncio.wait({got, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if got.done():
            return got.result()
        if task.done():
            task.result()  # raises the peer's error
            raise MeshError("peer-lost", "telemetry ended before the first snapshot", peer=channel.name)
        raise MeshError("peer-lost", f"no telemetry within {timeout:.0f} s", peer=channel.name)
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
