"""One thread per daemon that reads every source (:mod:`.nvml`, :mod:`.host`, :mod:`.links`) into
frozen :class:`~meshd.telemetry.snapshot.NodeSnapshot` records, about once a second."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..wire.link import LinkRegistry
from .host import HostReader
from .links import LinkReader
from .nvml import NvmlGpus
from .snapshot import GpuSnapshot, NodeSnapshot

log = logging.getLogger(__name__)

#: Sampling period of the daemon's sampler, unless configured (``telemetry_interval``).
DEFAULT_INTERVAL_S = 1.0
MAX_INTERVAL_S = 10.0
#: The sampler itself may run faster than subscribers may ask (benchmarks, tests), never faster than this.
MIN_SAMPLER_INTERVAL_S = 0.1
#: The first sample after start-up waits at most this long, so that rates (CPU, bytes/s) cover a
#: real window instead of reading "n/a" in the first snapshot.
PRIME_S = 0.5


class TelemetrySampler:
    """Samples GPUs, host and links on one thread into :class:`NodeSnapshot` records.

    :meth:`start` opens NVML and probes it (so :meth:`inventory` answers at once), then the thread
    publishes a snapshot every ``interval`` seconds to :attr:`latest` and to each listener.
    """

    def __init__(self, node_id: str, *, interval: float = DEFAULT_INTERVAL_S, links: LinkRegistry | None = None,
                 nvml: Any | None = None) -> None:
        self.node_id = node_id
        self.interval = min(max(float(interval), MIN_SAMPLER_INTERVAL_S), MAX_INTERVAL_S)
        self.gpus = NvmlGpus(nvml)
        self.host = HostReader()
        self.links = LinkReader(links) if links is not None else None
        self.listeners: list[Callable[[NodeSnapshot], None]] = []
        self.latest: NodeSnapshot | None = None
        self.samples = 0
        self._opened = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> TelemetrySampler:
        """Open NVML and take a first, unpublished reading so that rates have a start."""
        with self._lock:
            if not self._opened:
                self.gpus.open()
                self._opened = True
                now = time.monotonic()
                self.host.read(now)
                if self.links is not None:
                    self.links.read(now)
        return self

    def sample(self) -> NodeSnapshot:
        """Read everything now (thread-safe; opens NVML on first use)."""
        self.open()
        with self._lock:
            now = time.monotonic()
            return NodeSnapshot(
                node_id=self.node_id,
                time=time.time(),
                monotonic=now,
                gpus=self.gpus.read(),
                host=self.host.read(now),
                links=self.links.read(now) if self.links is not None else (),
                nvml=self.gpus.reason,
            )

    def inventory(self) -> tuple[GpuSnapshot, ...]:
        return self.gpus.inventory()

    def age(self) -> float | None:
        """Seconds since the latest snapshot, None before the first."""
        latest = self.latest
        return None if latest is None else time.monotonic() - latest.monotonic

    def start(self) -> TelemetrySampler:
        self.open()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="meshd-telemetry", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            self.gpus.close()

    def _run(self) -> None:
        next_at = time.monotonic() + min(self.interval, PRIME_S)
        failures = 0
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            try:
                snapshot = self.sample()
            except Exception:  # noqa: BLE001 - a bad reading must not end telemetry for good
                failures += 1
                if failures == 1 or failures % 600 == 0:
                    log.exception("telemetry sample failed (%d times so far)", failures)
            else:
                self.latest = snapshot
                self.samples += 1
                for listener in list(self.listeners):
                    try:
                        listener(snapshot)
                    except Exception:  # noqa: BLE001
                        log.exception("telemetry listener failed")
            # Fixed cadence without drift; after a stall (suspend, a hung call) skip the missed ticks.
            next_at += self.interval
            now = time.monotonic()
            if next_at < now:
                next_at = now + self.interval
