"""The dashboard driven like a user drives it (Textual pilot), against real daemons on loopback.

The user's path: see the peers, propose / edit / apply a split, generate, watch the steps and the
image, see telemetry move. The failure paths: a peer killed mid-generation is an error on screen
within 5 s and the app keeps answering; a wrong key and a dead address are named as such.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from PIL import Image

from meshd.auth import generate_key, read_key
from meshd.pipeline.plan import PeerAddress
from meshtui.app import MeshApp
from meshtui.commands import palette_commands
from meshtui.config import TuiConfig, load_config
from meshtui.events import Encoding
from meshtui.local import LocalCluster
from meshtui.messages import GenerationEvent, PeerDiscovered, SpanLoading
from meshtui.runs import RunState
from meshtui.screens.generate import GenerateScreen
from meshtui.screens.help import HelpScreen
from meshtui.screens.peers import PeersScreen
from meshtui.screens.split import SplitScreen
from meshtui.screens.telemetry import TelemetryScreen
from meshtui.views import PeerStatus
from meshtui.widgets.image_view import HalfBlockImage
from meshtui.widgets.peer_table import PeerDetails, PeerTable
from meshtui.widgets.run_view import RunHistory, RunSummary, StepTable
from meshtui.widgets.status import MeshStatus
from meshtui.widgets.telemetry_card import MetricRow, NodeCard

from tests.daemons import running_daemon

SIZE = (160, 48)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def cluster(models_dir, tmp_path_factory):
    """Three tiny daemons: a and b for the user's path, c to be killed mid-generation."""
    with LocalCluster(workdir=tmp_path_factory.mktemp("cluster"), models_dir=models_dir,
                      common_args=["--model", "tiny", "--device", "cpu", "--telemetry-interval", "0.5"]) as c:
        for name in ("a", "b", "c"):
            c.add(name)
        c.start()
        yield c


def daemon(cluster, name):
    return next(d for d in cluster.daemons if d.name == name)


def make_app(tmp_path: Path, key: bytes | None, peers, **kw) -> MeshApp:
    config = TuiConfig(images_dir=tmp_path / "images", poll_interval=0.5, telemetry_interval=0.5, discovery=False)
    return MeshApp(config, tmp_path / "meshtui.toml", key=key, peers=peers, **kw)


async def until(pilot, predicate, what: str, timeout: float = 15.0) -> float:
    """Let the app run until ``predicate()``; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.05)
    return time.monotonic() - start


def text(widget) -> str:
    return str(widget.content)


def status(app, label) -> PeerStatus | None:
    return next((p.status for p in app.peers if p.label == label), None)


def all_online(app, n):
    return lambda: len(app.peers) == n and all(p.online for p in app.peers)


async def test_the_users_path_peers_split_generate_image_telemetry(cluster, tmp_path):
    a, b = daemon(cluster, "a"), daemon(cluster, "b")
    messages = []
    app = make_app(tmp_path, read_key(cluster.key_file), [a.address, b.address])
    async with app.run_test(size=SIZE, message_hook=messages.append) as pilot:
        # Peers: both appear online with what they hold and the link measured from here.
        assert isinstance(app.screen, PeersScreen)
        await until(pilot, all_online(app, 2), "both peers online")
        await until(pilot, lambda: all(p.bandwidth_bytes_per_s for p in app.peers), "link measurements")
        table = app.screen.query_one(PeerTable)
        rows = {key.value: [str(c) for c in table.get_row(key)] for key in table.rows}
        assert rows["A"][1] == "● online" and rows["A"][2] == "a" and rows["B"][2] == "b"
        assert "x265/ffmpeg" in rows["A"] and "tiny" in rows["A"][6]

        # Split: propose, move the boundary, force a codec, validate, apply with per-peer progress.
        await pilot.press("2")
        assert isinstance(app.screen, SplitScreen)
        await pilot.press("p")
        proposed = app.plan
        assert [s.label for s in proposed.stages] == ["A", "B"] and proposed.stages[-1].end == 6
        await pilot.press("right", "c")
        assert app.plan.stages[0].end == proposed.stages[0].end + 1
        assert app.plan.stages[0].codec == "raw"
        assert app.forecast.ok
        await pilot.press("v", "a")
        await until(pilot, lambda: app.applied == app.plan, "the split loaded")
        cut = app.plan.stages[0].end
        held = {p.label: p.blocks for p in app.peers}
        await until(pilot, lambda: {p.label: p.blocks for p in app.peers} == {"A": ((0, cut),), "B": ((cut, 6),)},
                    f"peers to report blocks 0-{cut - 1} and {cut}-5 (had {held})")
        loads = [m for m in messages if isinstance(m, SpanLoading)]
        assert {m.label for m in loads} == {"A", "B"} and all(m.done <= m.total for m in loads)
        assert "loaded on the peers" in text(app.screen.query_one("#forecast"))

        # Generate: a prompt and Enter; steps arrive as rows, then the image, saved with its parameters.
        await pilot.press("3")
        assert isinstance(app.screen, GenerateScreen)
        await pilot.press(*"a red fox in snow", "enter")
        await until(pilot, lambda: app.runs and app.runs[-1].state is not RunState.RUNNING, "the run to end")
        run = app.runs[-1]
        assert run.state is RunState.DONE, run.error
        assert app.screen.query_one(StepTable).row_count == 4  # 4 steps x 1 hop
        assert [row.hops[0].codec for row in run.steps] == ["raw"] * 4
        assert "done in" in text(app.screen.query_one(RunSummary))
        await until(pilot, lambda: app.screen.query(HalfBlockImage), "the image on screen")
        meta = json.loads(Image.open(io.BytesIO(run.path.read_bytes())).text["flux-mesh"])
        assert meta["params"]["prompt"] == "a red fox in snow" and meta["plan"] == run.plan
        assert app.screen.query_one(RunHistory).row_count == 1
        assert load_config(tmp_path / "meshtui.toml").generate.prompt == "a red fox in snow"
        assert app.forecast.step_ms is not None  # block speeds were measured by the run

        # Telemetry: a card per peer whose sparklines grow as samples arrive.
        await pilot.press("escape", "4")
        assert isinstance(app.screen, TelemetryScreen)
        await until(pilot, lambda: len(app.screen.query(NodeCard)) == 2, "two telemetry cards")
        cpu = app.telemetry.nodes["A"].host["cpu_pct"]
        before = len(cpu.values())
        await until(pilot, lambda: len(cpu.values()) >= before + 2, "two more telemetry samples", timeout=5)
        assert app.telemetry.nodes["A"].source == "daemon"
        rows = [row for row in app.screen.query(MetricRow) if row.metric.key == "cpu_pct"]
        assert rows and all(str(r.value.content).endswith("%") for r in rows)


async def test_a_peer_killed_mid_generation_is_an_error_on_screen_within_5_s(cluster, tmp_path):
    a, c = daemon(cluster, "a"), daemon(cluster, "c")
    app = make_app(tmp_path, read_key(cluster.key_file), [a.address, c.address])
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, all_online(app, 2), "both peers online")
        await pilot.press("3")
        await pilot.press("tab", "tab", "tab", *"200", "enter")  # steps: 200, long enough to be interrupted
        await until(pilot, lambda: app.runs and app.runs[-1].done_steps >= 3, "a few steps")
        c.signal(signal.SIGKILL)
        took = await until(pilot, lambda: app.runs[-1].state is RunState.FAILED, "the failure on screen", timeout=5)
        assert took < 5.0
        summary = text(app.screen.query_one(RunSummary))
        assert "failed" in summary and app.runs[-1].done_steps < 200
        assert f"B (c, {c.address})" in summary  # the dead peer, named as the user knows it
        # Still answering: sections switch at once and the dead peer is named.
        started = time.monotonic()
        await pilot.press("escape", "1")
        assert isinstance(app.screen, PeersScreen) and time.monotonic() - started < 1.0
        await until(pilot, lambda: status(app, "B") is PeerStatus.UNREACHABLE, "B marked unreachable", timeout=10)
        assert status(app, "A") is PeerStatus.ONLINE
        # The split was the app's own proposal, so it is proposed again over the peers left, and runs.
        assert app.plan.describe() == "A:0-5"
        await pilot.press("3", "ctrl+l", "tab", "tab", "tab", "ctrl+u", "enter")  # back to the default 4 steps
        await until(pilot, lambda: len(app.runs) == 2 and app.runs[-1].state is not RunState.RUNNING,
                    "a run on the peer left")
        assert app.runs[-1].state is RunState.DONE, app.runs[-1].error


class RunningCluster:
    """Stands in for the demo's LocalCluster with daemons this module already started."""

    def __init__(self, addresses):
        self.addresses = addresses

    def start(self):
        return self.addresses


async def test_the_demo_lands_ready_to_generate_and_a_closed_terminal_ends_it_cleanly(cluster, tmp_path):
    a, b = daemon(cluster, "a"), daemon(cluster, "b")
    app = make_app(tmp_path, read_key(cluster.key_file), [], demo=RunningCluster([a.address, b.address]))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.applied is not None and app.applied == app.plan, "the split loaded by itself")
        assert "ready: ctrl+g generates" in text(app.screen.query_one(MeshStatus))
        assert "Demo:" in text(app.screen.query_one("#peers-banner"))
        os.kill(os.getpid(), signal.SIGHUP)  # the terminal closed: exit normally so the daemons get stopped
        await until(pilot, lambda: app.return_code == 0, "the app to exit", timeout=5)


async def test_a_wrong_key_and_a_dead_address_are_named_as_such(cluster, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = PeerAddress("127.0.0.1", s.getsockname()[1])
    app = make_app(tmp_path, generate_key(), [daemon(cluster, "a").address, dead])
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: status(app, "A") is PeerStatus.UNAUTHENTICATED
                    and status(app, "B") is PeerStatus.UNREACHABLE, "both failures classified", timeout=10)
        table = app.screen.query_one(PeerTable)
        assert str(table.get_row("A")[1]) == "✕ wrong key" and str(table.get_row("B")[1]) == "✕ unreachable"
        details = text(app.screen.query_one(PeerDetails))
        assert "cluster key" in details and "--key-file" in details
        assert "--key-file" in text(app.screen.query_one(MeshStatus))


async def test_adding_and_removing_a_peer_by_hand_is_remembered(cluster, tmp_path):
    b = daemon(cluster, "b")
    config_file = tmp_path / "meshtui.toml"
    app = make_app(tmp_path, read_key(cluster.key_file), [])
    async with app.run_test(size=SIZE) as pilot:
        assert "No peers yet" in text(app.screen.query_one("#peers-banner"))
        await pilot.press("a", *"host:port", "enter")
        assert "port" in text(app.screen.query_one("#address-error"))  # still asking, with the reason
        await pilot.press("ctrl+u", *str(b.address), "enter")
        await until(pilot, all_online(app, 1), "the added peer online")
        assert load_config(config_file).peers == (str(b.address),)
        await pilot.press("x")
        await until(pilot, lambda: not app.peers, "the peer gone")
        assert load_config(config_file).peers == ()  # what the next start reads


async def test_a_peer_found_by_mdns_joins_like_a_manual_one(cluster, tmp_path):
    b = daemon(cluster, "b")
    app = make_app(tmp_path, read_key(cluster.key_file), [])
    async with app.run_test(size=SIZE) as pilot:
        # What meshd.node.discovery.PeerBrowser reports, as the discovery worker posts it.
        app.post_message(PeerDiscovered("b-3f2a", "nodeid", b.address, {"gpu": "none", "model": "tiny"}))
        await until(pilot, all_online(app, 1), "the discovered peer online")
        assert app.peers[0].sources == frozenset({"mdns"})
        assert "mdns" in [str(c) for c in app.screen.query_one(PeerTable).get_row("A")]
        assert load_config(tmp_path / "meshtui.toml").peers == ()  # found peers are not written down


async def test_every_action_is_in_the_palette_and_runs_from_there(cluster, tmp_path):
    a, b = daemon(cluster, "a"), daemon(cluster, "b")
    app = make_app(tmp_path, read_key(cluster.key_file), [a.address, b.address])
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, all_online(app, 2), "both peers online")
        await pilot.press("2")
        titles = {c.title for c in palette_commands(app, app.screen)}
        for expected in ("Peers", "Split", "Generate", "Telemetry", "Generate now", "Help", "Add peer",
                         "Retry now", "Measure links", "Propose", "Validate", "Apply", "Boundary", "Reorder",
                         "Link codec", "Cancel run"):
            assert expected in titles, f"{expected!r} missing from the palette"
        await pilot.press("ctrl+p")
        await pilot.press(*"apply")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await until(pilot, lambda: app.applied == app.plan, "the split applied from the palette")
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        help_text = app.screen.text
        assert "Boundary" in help_text and "meshtui.toml" in help_text and "ctrl+p" in help_text
        await pilot.press("escape")
        assert isinstance(app.screen, SplitScreen)


async def test_an_older_daemon_without_telemetry_degrades_to_health_polls(models_dir, tmp_path):
    key = generate_key()
    async with running_daemon(tmp_path, key, models_dir=models_dir) as old:
        address = PeerAddress("127.0.0.1", old.bound[1])
        app = make_app(tmp_path, key, [address])
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, all_online(app, 1), "the peer online")
            await until(pilot, lambda: "waiting for daemon support" in (app.telemetry.node("A").note or ""),
                        "the telemetry note")
            await until(pilot, lambda: len(app.telemetry.node("A").host["ram_used_bytes"].values()) >= 2,
                        "memory samples from health polls")
            assert app.telemetry.node("A").source == "info"
            await pilot.press("4")
            card = app.screen.query_one(NodeCard)
            await until(pilot, lambda: "health polls" in str(card.border_subtitle), "the card's source")
            assert "waiting for daemon support" in text(card.query_one(".card-note"))


async def test_the_text_encoder_can_be_placed_on_another_peer(cluster, tmp_path):
    """t on the split screen cycles where prompts are encoded; a run then fetches the embeddings
    from that peer (the head's event says so), and the image is the one the head makes alone."""
    a, b = daemon(cluster, "a"), daemon(cluster, "b")
    app = make_app(tmp_path, read_key(cluster.key_file), [a.address, b.address])
    messages = []
    async with app.run_test(size=SIZE, message_hook=messages.append) as pilot:
        await until(pilot, all_online(app, 2), "both peers online")
        assert all(p.text_encoder for p in app.peers)  # tiny's stand-in counts
        await pilot.press("2", "p")
        assert app.text_encoder is None and "on the head" in text(app.screen.query_one("#forecast"))
        await pilot.press("t")
        assert app.text_encoder == "B"
        assert "Text encoder: on B" in text(app.screen.query_one("#forecast"))
        pixels = []
        for placement in ("B", None):
            for _ in range(3):
                if app.text_encoder == placement:
                    break
                await pilot.press("t")
            assert app.text_encoder == placement
            await pilot.press("3", "ctrl+g")
            await until(pilot, lambda: len(app.runs) == len(pixels) + 1 and app.runs[-1].state is not RunState.RUNNING,
                        "the run to end", timeout=30)
            run = app.runs[-1]
            assert run.state is RunState.DONE, run.error
            pixels.append(Image.open(run.path).tobytes())
            await pilot.press("escape", "2")  # out of the prompt field, back to the split
            assert isinstance(app.screen, SplitScreen)
        assert pixels[0] == pixels[1]
        encoding = [m.event for m in messages if isinstance(m, GenerationEvent) and isinstance(m.event, Encoding)]
        assert [e.text_encoder for e in encoding] == [str(b.address)]  # the first run only
