"""Telemetry: every NVML reading is probed once and reads None (never 0) where unsupported; no driver,
no GPU and a lost GPU are normal states; host and link figures are real rates; subscribers are
pushed snapshots from one shared sampler; and sampling is cheap.

CI has no GPU, so NVML itself is replaced by FakeNvml, a stand-in for the ``pynvml`` module that
answers like a driver would (values, NotSupported, NoPermission, GPU lost). Everything else is real:
psutil, sockets, the daemon, the protocol.
"""

import asyncio
import contextlib
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from meshd import auth
from meshd.wire.channel import Channel
from meshd.errors import MeshError
from meshd.wire.link import LinkRegistry
from meshd.telemetry.snapshot import GpuSnapshot, NodeSnapshot
from meshd.telemetry.host import HostReader
from meshd.telemetry.links import LinkReader
from meshd.telemetry.nvml import GPU_READINGS, NvmlGpus
from meshd.telemetry.sampler import TelemetrySampler
from meshd.telemetry.service import first_snapshot, serve_telemetry, subscribe
from meshd.telemetry.text import snapshot_lines
from tests.daemons import running_daemon

ROOT = Path(__file__).resolve().parent.parent
KEY = auth.generate_key()
FAST = 0.2  # sampler period in these tests (the daemon's default is 1 s)


# --- a fake NVML binding ------------------------------------------------------------------------


class FakeNvmlError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__({3: "Not Supported", 4: "Insufficient Permissions", 12: "NVML Shared Library Not Found",
                          13: "Function Not Found", 15: "GPU is lost"}.get(value, f"NVML error {value}"))
        self.value = value


@dataclass
class FakeGpu:
    uuid: str
    name: str
    answers: dict = field(default_factory=dict)  # function name (or (name, arg)) -> value
    errors: dict = field(default_factory=dict)  # function name -> NVML error code
    lost_after_reads: int | None = None  # every call fails with GPU_IS_LOST after this many utilization reads


class FakeNvml:
    """Stands in for the ``pynvml`` module (same names, same error codes); counts every call."""

    NVMLError = FakeNvmlError
    NVML_ERROR_INVALID_ARGUMENT = 2
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NO_PERMISSION = 4
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_FUNCTION_NOT_FOUND = 13
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_PCIE_UTIL_TX_BYTES = 0
    NVML_PCIE_UTIL_RX_BYTES = 1
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.calls: Counter = Counter()  # (function, gpu index) -> calls
        self.shut_down = False
        self._lock = threading.Lock()

    def _answer(self, function: str, handle: int, arg=None):
        with self._lock:
            self.calls[function, handle] += 1
        gpu = self.gpus[handle]
        reads = self.calls["nvmlDeviceGetUtilizationRates", handle]
        if gpu.lost_after_reads is not None and reads > gpu.lost_after_reads:
            raise FakeNvmlError(self.NVML_ERROR_GPU_IS_LOST)
        if function in gpu.errors:
            raise FakeNvmlError(gpu.errors[function])
        return gpu.answers.get((function, arg), gpu.answers.get(function))

    def nvmlInit(self):
        if self.init_error is not None:
            raise FakeNvmlError(self.init_error)

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetUUID(self, handle):
        return self.gpus[handle].uuid

    def nvmlDeviceGetName(self, handle):
        return self.gpus[handle].name.encode()  # old bindings return bytes

    def nvmlDeviceGetUtilizationRates(self, handle):
        gpu, memory = self._answer("nvmlDeviceGetUtilizationRates", handle)
        return SimpleNamespace(gpu=gpu, memory=memory)

    def nvmlDeviceGetEncoderUtilization(self, handle):
        return [self._answer("nvmlDeviceGetEncoderUtilization", handle), 167000]

    def nvmlDeviceGetDecoderUtilization(self, handle):
        return [self._answer("nvmlDeviceGetDecoderUtilization", handle), 167000]

    def nvmlDeviceGetMemoryInfo(self, handle):
        used, total = self._answer("nvmlDeviceGetMemoryInfo", handle)
        return SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetPcieThroughput(self, handle, counter):
        return self._answer("nvmlDeviceGetPcieThroughput", handle, counter)

    def nvmlDeviceGetPowerUsage(self, handle):
        return self._answer("nvmlDeviceGetPowerUsage", handle)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return self._answer("nvmlDeviceGetEnforcedPowerLimit", handle)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return self._answer("nvmlDeviceGetTemperature", handle, sensor)

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return self._answer("nvmlDeviceGetClockInfo", handle, clock)


def full_answers(**over) -> dict:
    answers = {
        "nvmlDeviceGetUtilizationRates": (35, 12),
        "nvmlDeviceGetEncoderUtilization": 0,
        "nvmlDeviceGetDecoderUtilization": 40,
        "nvmlDeviceGetMemoryInfo": (12 << 30, 141 << 30),
        ("nvmlDeviceGetPcieThroughput", 0): 1024,  # KiB/s
        ("nvmlDeviceGetPcieThroughput", 1): 2048,
        "nvmlDeviceGetPowerUsage": 350_000,  # mW
        "nvmlDeviceGetEnforcedPowerLimit": 700_000,
        "nvmlDeviceGetTemperature": 45,
        ("nvmlDeviceGetClockInfo", 1): 1980,
        ("nvmlDeviceGetClockInfo", 2): 2619,
    }
    answers.update(over)
    return answers


def fake_h200_and_old_card() -> FakeNvml:
    return FakeNvml([
        FakeGpu("GPU-aaaa", "FAKE H200", full_answers(),
                errors={"nvmlDeviceGetEncoderUtilization": FakeNvml.NVML_ERROR_NOT_SUPPORTED}),
        FakeGpu("GPU-bbbb", "FAKE OLD CARD", full_answers(),
                errors={"nvmlDeviceGetPcieThroughput": FakeNvml.NVML_ERROR_NO_PERMISSION,
                        "nvmlDeviceGetClockInfo": FakeNvml.NVML_ERROR_FUNCTION_NOT_FOUND}),
    ])


# --- NVML: probe once, None when unsupported ----------------------------------------------------


def test_readings_cover_every_gpu_snapshot_field():
    filled = {name for reading in GPU_READINGS for name in reading.fields}
    measured = set(GpuSnapshot.__dataclass_fields__) - {"uuid", "index", "name", "lost"}
    assert filled == measured


def test_each_reading_is_probed_once_and_an_unsupported_one_reads_none_not_zero():
    nvml = fake_h200_and_old_card()
    sampler = TelemetrySampler("node", nvml=nvml).open()
    snapshots = [sampler.sample() for _ in range(3)]
    h200, old = snapshots[-1].gpus
    assert (h200.uuid, h200.name, old.name) == ("GPU-aaaa", "FAKE H200", "FAKE OLD CARD")
    # Unsupported: None, and never asked again after the probe.
    assert h200.encoder_util_pct is None
    assert nvml.calls["nvmlDeviceGetEncoderUtilization", 0] == 1
    assert (old.pcie_tx_bytes_per_s, old.pcie_rx_bytes_per_s, old.sm_clock_mhz, old.mem_clock_mhz) == (None,) * 4
    assert nvml.calls["nvmlDeviceGetPcieThroughput", 1] == 2  # TX and RX probes, nothing after
    assert nvml.calls["nvmlDeviceGetClockInfo", 1] == 2
    # Supported: read every sample, in the snapshot's units.
    assert nvml.calls["nvmlDeviceGetDecoderUtilization", 0] == 1 + 3
    assert (h200.gpu_util_pct, h200.mem_util_pct, h200.decoder_util_pct) == (35.0, 12.0, 40.0)
    assert (h200.vram_used_bytes, h200.vram_total_bytes) == (12 << 30, 141 << 30)
    assert (h200.pcie_tx_bytes_per_s, h200.pcie_rx_bytes_per_s) == (1024 * 1024.0, 2048 * 1024.0)
    assert (h200.power_w, h200.power_limit_w, h200.temperature_c) == (350.0, 700.0, 45.0)
    assert (h200.sm_clock_mhz, h200.mem_clock_mhz) == (1980.0, 2619.0)
    assert old.encoder_util_pct == 0.0  # a real 0 % stays 0
    assert snapshots[-1].nvml is None
    sampler.stop()
    assert nvml.shut_down


def test_a_lost_gpu_is_marked_lost_and_the_others_keep_reporting():
    nvml = FakeNvml([FakeGpu("GPU-aaaa", "FAKE A", full_answers()),
                     FakeGpu("GPU-bbbb", "FAKE B", full_answers(), lost_after_reads=2)])
    sampler = TelemetrySampler("node", nvml=nvml).open()
    first = sampler.sample()  # utilization read #2 on B (the probe was #1)
    assert not first.gpus[1].lost and first.gpus[1].gpu_util_pct == 35.0
    second = sampler.sample()
    a, b = second.gpus
    assert b.lost and b.uuid == "GPU-bbbb"
    assert all(getattr(b, name) is None for reading in GPU_READINGS for name in reading.fields)
    assert not a.lost and a.gpu_util_pct == 35.0
    calls_on_b = sum(n for (_, gpu), n in nvml.calls.items() if gpu == 1)
    sampler.sample()
    assert sum(n for (_, gpu), n in nvml.calls.items() if gpu == 1) == calls_on_b  # left alone once lost
    assert "LOST" in "\n".join(snapshot_lines(second))


def test_no_driver_is_a_normal_state_with_the_reason_given():
    sampler = TelemetrySampler("node", nvml=FakeNvml([], init_error=FakeNvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    snapshot = sampler.sample()
    assert snapshot.gpus == ()
    assert "no NVIDIA driver" in snapshot.nvml
    assert snapshot.host.ram_total_bytes == psutil.virtual_memory().total


def test_a_driver_without_gpus_is_a_normal_state():
    snapshot = TelemetrySampler("node", nvml=FakeNvml([])).sample()
    assert (snapshot.gpus, snapshot.nvml) == ((), "NVML found no NVIDIA GPU")


def test_missing_nvidia_ml_py_is_a_normal_state(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail, as on a box without it
    gpus = NvmlGpus().open()
    assert gpus.read() == ()
    assert "nvidia-ml-py" in gpus.reason


def test_the_real_nvml_on_a_box_without_a_gpu():
    gpus = NvmlGpus().open()
    if gpus.reason is None:
        pytest.skip("this box has an NVIDIA GPU")
    assert gpus.read() == () and gpus.inventory() == ()


# --- host and links -----------------------------------------------------------------------------


def _drain(sock: socket.socket, nbytes: int) -> None:
    got = 0
    while got < nbytes and (chunk := sock.recv(1 << 20)):
        got += len(chunk)


def _push_through_loopback(nbytes: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            reader = threading.Thread(target=_drain, args=(peer, nbytes))
            reader.start()
            client.sendall(bytes(nbytes))
            reader.join(10)


def test_host_figures_are_real_rates():
    reader = HostReader()
    t0 = time.monotonic()
    first = reader.read(t0)
    assert first.cpu_pct is None  # psutil's first CPU figure is meaningless: n/a, not 0
    assert all(i.rx_bytes_per_s is None for i in first.interfaces)
    _push_through_loopback(16 << 20)
    time.sleep(0.05)
    t1 = time.monotonic()
    second = reader.read(t1)
    assert second.cpu_pct is not None and 0 <= second.cpu_pct <= 100
    assert second.ram_total_bytes == psutil.virtual_memory().total
    assert 0 < second.ram_used_bytes < second.ram_total_bytes
    lo = next(i for i in second.interfaces if i.name == "lo")
    assert lo.rx_bytes_per_s >= (16 << 20) / (t1 - t0) * 0.95


def test_links_report_rates_and_hops_and_idle_ones_leave():
    links = LinkRegistry()
    reader = LinkReader(links)
    busy, idle = links.get("10.0.0.7:7777"), links.get("10.0.0.8:7777")
    busy.sent(1000)
    idle.received(10)
    reader.read(100.0)
    busy.sent(5000)
    busy.received(2000)
    busy.hop(4096, 12.5)
    (first, second) = reader.read(102.0)
    assert first.peer == "10.0.0.7:7777"  # most recently active first
    assert (first.sent_bytes_per_s, first.received_bytes_per_s) == (2500.0, 1000.0)
    assert (first.bytes_sent, first.recent_hop_ms) == (6000, (12.5,))
    assert second.peer == "10.0.0.8:7777" and second.sent_bytes_per_s == 0.0
    later = reader.read(150.0 + 60.0)
    assert later == ()  # nothing moved for over a minute


def test_a_snapshot_survives_the_wire():
    snapshot = TelemetrySampler("node", nvml=fake_h200_and_old_card(), links=LinkRegistry()).sample()
    assert NodeSnapshot.from_dict(json.loads(json.dumps(snapshot.to_dict()))) == snapshot


# --- subscriptions over the protocol ------------------------------------------------------------


@contextlib.asynccontextmanager
async def telemetry_daemon(tmp_path, nvml=None, interval: float = FAST):
    async with running_daemon(tmp_path, KEY) as daemon:
        service = serve_telemetry(daemon, interval=interval, nvml=nvml or fake_h200_and_old_card())
        try:
            yield daemon, service
        finally:
            await service.close()


async def collect(channel, seconds: float, interval: float) -> list[tuple[float, NodeSnapshot]]:
    got: list[tuple[float, NodeSnapshot]] = []
    task = asyncio.ensure_future(subscribe(channel, lambda s: got.append((time.monotonic(), s)), interval))
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return got


async def test_a_subscriber_is_pushed_snapshots_until_it_cancels(tmp_path):
    async with telemetry_daemon(tmp_path) as (daemon, _):
        channel = await Channel.connect(*daemon.bound, KEY)
        start = time.monotonic()
        got = await collect(channel, 1.8, interval=0.5)
        assert 3 <= len(got) <= 5, [t - start for t, _ in got]
        assert got[0][0] - start < 0.6  # the first one at once (the sampler's first sample takes 0.2 s)
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(got)]
        assert min(gaps) > 0.4
        snapshot = got[-1][1]
        assert snapshot.node_id == daemon.node_id
        assert [g.name for g in snapshot.gpus] == ["FAKE H200", "FAKE OLD CARD"]
        mine = [link for link in snapshot.links if link.bytes_sent > 0]
        assert mine, "the subscriber's own connection is one of the daemon's links"
        # Cancelling the request cancelled the handler on the daemon.
        for _ in range(50):
            if not any(s.tasks for s in daemon.sessions):
                break
            await asyncio.sleep(0.02)
        assert not any(s.tasks for s in daemon.sessions)
        await channel.close()


async def test_many_subscribers_share_one_sampler(tmp_path):
    nvml = fake_h200_and_old_card()
    async with telemetry_daemon(tmp_path, nvml=nvml) as (daemon, service):
        channels = [await Channel.connect(*daemon.bound, KEY) for _ in range(4)]
        results = await asyncio.gather(*(collect(c, 1.5, interval=0.5) for c in channels))
        assert all(len(r) >= 3 for r in results)
        reads = nvml.calls["nvmlDeviceGetUtilizationRates", 0] - 1  # minus the probe
        assert reads == service.sampler.samples  # one NVML read per sample, not per subscriber
        assert reads <= 1.5 / FAST + 3
        for c in channels:
            await c.close()


async def test_the_interval_is_checked_and_clamped(tmp_path):
    async with telemetry_daemon(tmp_path) as (daemon, _):
        channel = await Channel.connect(*daemon.bound, KEY)
        with pytest.raises(MeshError, match="interval must be a number") as info:
            await channel.request("telemetry", {"interval": "fast"}, timeout=5)
        assert info.value.code == "bad-request"
        got = await collect(channel, 1.3, interval=0.01)  # clamped to 0.5 s
        assert 2 <= len(got) <= 3
        await channel.close()


async def test_node_info_and_first_snapshot_carry_the_latest_sample(tmp_path):
    async with telemetry_daemon(tmp_path) as (daemon, _):
        channel = await Channel.connect(*daemon.bound, KEY)
        snapshot = await first_snapshot(channel)
        assert snapshot.node_id == daemon.node_id
        await channel.close()
        channel = await Channel.connect(*daemon.bound, KEY)
        summary = NodeSnapshot.from_dict(channel.node["telemetry"])
        assert summary.node_id == daemon.node_id and len(summary.gpus) == 2
        await channel.close()


async def test_closing_telemetry_ends_subscriptions_so_shutdown_does_not_wait(tmp_path):
    async with telemetry_daemon(tmp_path) as (daemon, service):
        channel = await Channel.connect(*daemon.bound, KEY)
        task = asyncio.ensure_future(subscribe(channel, lambda s: None, 5.0))
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        await service.close()
        assert await asyncio.wait_for(task, 3) == {"ended": "telemetry stopped"}
        assert time.monotonic() - t0 < 2.5
        await channel.close()


# --- the command and its cost -------------------------------------------------------------------


def test_meshd_telemetry_json_without_a_gpu_prints_host_figures_and_no_gpus():
    if NvmlGpus().open().reason is None:
        pytest.skip("this box has an NVIDIA GPU")
    result = subprocess.run([sys.executable, "-m", "meshd", "telemetry", "--json", "--window", "0.3"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    snapshot = NodeSnapshot.from_dict(data)
    assert data["gpus"] == [] and snapshot.nvml
    assert snapshot.host.cpu_pct is not None
    assert snapshot.host.ram_total_bytes == psutil.virtual_memory().total
    assert "lo" in [i.name for i in snapshot.host.interfaces]
    assert all(i.rx_bytes_per_s is not None for i in snapshot.host.interfaces)


def test_sampling_costs_well_under_one_percent_of_a_core_at_one_hertz():
    """At 1 Hz, 1 % of one core is 10 ms of CPU per sample."""
    links = LinkRegistry()
    for i in range(8):
        links.get(f"10.0.0.{i}:7777").sent(1000)
    sampler = TelemetrySampler("node", links=links).open()
    sampler.sample()
    t0 = time.thread_time()
    for _ in range(30):
        sampler.sample()
    per_sample_s = (time.thread_time() - t0) / 30
    sampler.stop()
    assert per_sample_s < 0.010, f"{per_sample_s * 1e3:.2f} ms of CPU per sample"


def test_the_cost_benchmark_prints_its_figures_as_json():
    result = subprocess.run([sys.executable, "bench/telemetry_cost.py", "--seconds", "1.5", "--repeat", "20"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["samples"] >= 1
    assert 0 <= figures["cpu_pct_of_one_core"] < 1.0
    assert figures["per_sample_cpu_ms"]["mean"] < 10.0
