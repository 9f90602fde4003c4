"""Snapshots of the main screens, drawn from fixed state (no network, a fixed clock, UTC).

The app's state is what its workers would have reported; the screens only draw it. Update after an
intended change with ``pytest tests/test_tui_snapshots.py --snapshot-update`` and look at the SVGs.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from codec import Capabilities
from meshd.pipeline.request import GenerationParams
from meshd.pipeline.plan import PeerAddress, SplitPlan, Stage
from meshd.pipeline.progress import StageInfo
from meshd.telemetry.snapshot import GpuSnapshot, HostSnapshot, LinkSnapshot, NodeSnapshot
from meshtui.app import MeshApp
from meshtui.config import GenerateSettings, TuiConfig
from meshtui.events import from_wire
from meshtui.runs import RunRecord, apply_event, finish
from meshtui.views import PeerStatus, PeerView

NOW = 1_795_000_000.0
SIZE = (160, 48)
A, B, C, D = (PeerAddress("10.0.0.7", 7777), PeerAddress("10.0.0.9", 7777), PeerAddress("10.0.0.12", 7777),
              PeerAddress("192.168.5.20", 7777))
GPU = dict(preset="tiny", model_id="tiny", model_hash="8dfdc128" * 8, dtype="bfloat16", num_blocks=6,
           memory_kind="gpu", version="0.1.0")


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def peers() -> tuple[PeerView, ...]:
    nv = Capabilities(device="cuda:0", gpu_name="NVIDIA GeForce RTX 4090", nvenc=True, nvenc_engines=2,
                      nvenc_reason="2 engines", nvdec=True, nvdec_engines=1, nvdec_reason="1 engine", cpu_hevc=True)
    h200 = Capabilities(device="cuda:0", gpu_name="NVIDIA H200", nvenc=False, nvenc_reason="this GPU has no NVENC",
                        nvdec=True, nvdec_engines=7, nvdec_reason="7 engines", cpu_hevc=True)
    return (
        PeerView("A", A, frozenset({"mdns"}), PeerStatus.ONLINE, name="desk-4090", node_id="3f2a9c0d11aa4b2e",
                 device="cuda:0", gpu_name="NVIDIA GeForce RTX 4090", free_bytes=21 << 30, total_bytes=24 << 30,
                 blocks=((0, 2),), caps=nv, rtt_ms=0.42, bandwidth_bytes_per_s=117e6, seen=NOW - 1,
                 key_fingerprint="e108b19ab6e1bce3", host="5d1e2b7c0a9f3e41", **GPU),
        PeerView("B", B, frozenset({"manual"}), PeerStatus.ONLINE, name="lab-h200", node_id="833255f9dc4f4463",
                 device="cuda:0", gpu_name="NVIDIA H200", free_bytes=130 << 30, total_bytes=141 << 30,
                 blocks=((2, 6),), caps=h200, rtt_ms=1.9, bandwidth_bytes_per_s=1.17e9, seen=NOW - 1, **GPU),
        PeerView("C", C, frozenset({"manual"}), PeerStatus.UNREACHABLE, "no data for 4 s", name="old-3080",
                 device="cuda:0", gpu_name="NVIDIA GeForce RTX 3080", free_bytes=9 << 30, total_bytes=10 << 30,
                 caps=nv, rtt_ms=3.1, seen=NOW - 42, host="5d1e2b7c0a9f3e41", **GPU),  # A's box, second GPU
        PeerView("D", D, frozenset({"mdns"}), PeerStatus.UNAUTHENTICATED,
                 "the server does not hold our cluster key (wrong key file?)",
                 hints={"name": "kitchen-laptop", "gpu": "RTX 4060 Laptop", "vram": "8"}),
    )


def plan() -> SplitPlan:
    return SplitPlan((Stage(A, 0, 3, "fp8", "A"), Stage(B, 3, 6, "auto", "B")))


def image_png() -> bytes:
    image = Image.new("RGB", (64, 64))
    draw = ImageDraw.Draw(image)
    for y in range(64):
        draw.line([(0, y), (63, y)], fill=(40 + 3 * y, 60 + 2 * y, 160 - y))
    draw.ellipse([20, 8, 44, 32], fill=(250, 220, 120))
    draw.polygon([(0, 63), (30, 36), (63, 63)], fill=(30, 40, 35))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def finished_run() -> RunRecord:
    record = RunRecord(1, NOW - 20, GenerationParams("a lighthouse on a cliff at dawn, oil painting", 7, 64, 64, 4, 1.0),
                       "A:0-2 -> B:3-5", codec="auto")
    record = apply_event(record, from_wire({"kind": "prepared", "plan": record.plan, "stages": [
        {"peer": str(A), "blocks": [0, 3]}, {"peer": str(B), "blocks": [3, 6]}]}))
    summary_steps = []
    for step in range(1, 5):
        event = {"kind": "step", "step": step, "steps": 4, "ms": 30.0 + step, "passes": [
            {"compute_ms": 11.5, "hops": [{"from": "desk-4090", "node": "lab-h200", "codec": "fp8", "bytes": 18500,
                                          "raw_bytes": 36864, "encode_ms": 0.41, "wire_ms": 0.33, "decode_ms": 0.12,
                                          "compute_ms": 9.8,
                                          "error": {"cosine": 0.99962, "rel_l2": 0.027, "max_abs": 0.2}}]}]}
        record = apply_event(record, from_wire(event))
        summary_steps.append(event)
    return finish(record, {"total_s": 0.41, "steps": summary_steps},
                  Path("/home/user/.local/share/flux-mesh/images/flux-mesh-20261118-200000-seed7.png"))


def telemetry(app: MeshApp) -> None:
    for i in range(90):
        wave = (i * 7) % 100
        gpu = GpuSnapshot(uuid="GPU-4090", index=0, name="NVIDIA GeForce RTX 4090", gpu_util_pct=float(wave),
                          mem_util_pct=30.0, encoder_util_pct=float((i * 11) % 60), decoder_util_pct=None,
                          vram_used_bytes=(3 << 30) + i * (16 << 20), vram_total_bytes=24 << 30,
                          pcie_tx_bytes_per_s=wave * 1e8, pcie_rx_bytes_per_s=None, power_w=310.0,
                          temperature_c=61.0)
        link = LinkSnapshot(peer=str(B), sent_bytes_per_s=wave * 4e5, received_bytes_per_s=wave * 1e4,
                            bytes_sent=i * 10**6, bytes_received=i * 10**4)
        snapshot = NodeSnapshot(node_id="3f2a9c0d11aa4b2e", time=NOW, monotonic=0.0, gpus=(gpu,),
                                host=HostSnapshot(cpu_pct=12.0 + wave / 10, ram_used_bytes=9 << 30,
                                                  ram_total_bytes=64 << 30), links=(link,))
        app.telemetry.node("A").add(snapshot, "daemon", NOW - 1)
        h200 = GpuSnapshot(uuid="GPU-H200", index=0, name="NVIDIA H200", gpu_util_pct=float(100 - wave),
                           encoder_util_pct=None, decoder_util_pct=float(wave // 2), vram_used_bytes=11 << 30,
                           vram_total_bytes=141 << 30, pcie_tx_bytes_per_s=2e9, pcie_rx_bytes_per_s=3e9)
        app.telemetry.node("B").add(NodeSnapshot(node_id="833255f9dc4f4463", time=NOW, monotonic=0.0, gpus=(h200,),
                                                 host=HostSnapshot(cpu_pct=5.0)), "daemon", NOW - 35)


def make_app() -> MeshApp:
    config = TuiConfig(images_dir=Path("/home/user/.local/share/flux-mesh/images"), discovery=False,
                       generate=GenerateSettings(prompt="a lighthouse on a cliff at dawn, oil painting", seed=7))
    return MeshApp(config, None, key=None, clock=lambda: NOW, discovery=False)


def state(mode: str):
    """Fill the app as its workers would have, then show ``mode``."""

    async def run_before(pilot) -> None:
        app: MeshApp = pilot.app
        dash = app.dashboard
        dash.peers = peers()
        dash.speeds.observe(str(A), 3, 11.5)
        dash.speeds.observe(str(B), 3, 4.0)
        dash.links.observe_prepared(StageInfo.many_from_wire([{"peer": str(A), "link": {"to": str(B),
                                                                                         "bandwidth_bps": 117e6}}]))
        dash.plan = plan()
        dash.applied = plan()
        dash.runs = (finished_run(),)
        dash.images[1] = image_png()
        telemetry(app)
        app.mutate_reactive(MeshApp.telemetry)
        app.refresh_derived()
        app.switch_mode(mode)
        await pilot.pause()
        for field in app.screen.query("Input"):
            field.cursor_blink = False
        await pilot.pause()

    return run_before


def test_peers_screen(snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=state("peers"))


def test_split_screen(snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=state("split"))


def test_generate_screen(snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=state("generate"))


def test_telemetry_screen(snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=state("telemetry"))


def test_help_on_the_split_screen(snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=state("split"), press=["f1"])
