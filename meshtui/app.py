"""The flux-mesh dashboard: find peers, split the model, generate, watch the GPUs.

The app owns the state (peer views, the plan, runs, telemetry) and pushes it down: screens watch its
reactive attributes. Workers (``meshtui.workers``) do all network I/O and post typed messages
(``meshtui.messages``) that the handlers here fold into that state. Worker failures meet one handler,
:meth:`MeshApp.on_worker_state_changed`.

``run_app`` opens it on configured or given peers; ``run_demo_app`` (``meshtui demo``) first starts
two ``tiny`` daemons on loopback and applies a split, so the user lands one key away from a run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from textual import on
from textual.app import App
from textual.binding import Binding
from textual.reactive import var
from textual.worker import Worker, WorkerState

from meshd.errors import MeshError
from meshd.model.presets import ModelPreset
from meshd.plan import PeerAddress, PlanError, SplitPlan

from . import runs as run_log
from . import splitting, workers
from .commands import MeshCommands
from .config import (ConfigError, GenerateSettings, TuiConfig, default_config_path, load_config, save_config,
                     with_peer, without_peer)
from .history import TelemetryStore
from .mesh import Mesh
from .messages import (DiscoveryState, GenerationDone, GenerationEvent, LocalDaemonsStarted, PeerDiscovered,
                       PeerUpdated, PeerVanished, SpanCompiling, SpanLoading, SplitApplied, TelemetryNote,
                       TelemetrySampled)
from .runs import RunParams, RunRecord, RunState
from .screens.add_peer import AddPeerScreen
from .screens.generate import GenerateScreen
from .screens.help import HelpScreen, keys_markdown
from .screens.peers import PeersScreen
from .screens.split import SplitScreen
from .screens.telemetry import TelemetryScreen
from .views import PeerStatus, PeerView
from .widgets.generate_form import GenerateForm
from .widgets.split_view import SplitEditor
from .widgets.status import next_step, summary

log = logging.getLogger(__name__)

#: Worker groups, and what a failure in each means to the user.
FAILURE_TITLES = {
    "generate": "Generation failed",
    "apply": "Could not load the split",
    "demo": "Could not start the demo daemons",
    "peers": "A peer monitor stopped",
    "discovery": "mDNS discovery stopped",
}
#: Runs whose PNG bytes stay in memory (older ones are read back from their file).
IMAGES_KEPT = 8


def describe_error(error: BaseException | None, peers: Sequence[PeerView] = ()) -> str:
    """One line a user can act on; a peer named by address is also named as the user knows it."""
    if isinstance(error, MeshError) and error.peer:
        known = next((p for p in peers if str(p.address) == error.peer), None)
        if known is not None:
            return f"{known.label} ({known.title}, {error.peer}): {error.message}"
    if isinstance(error, (MeshError, PlanError, ConfigError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


class MeshApp(App[int]):
    """The dashboard over one :class:`~meshtui.mesh.Mesh` (usable on its own with manual peers)."""

    CSS_PATH = "app.tcss"
    TITLE = "flux-mesh"
    MODES = {"peers": PeersScreen, "split": SplitScreen, "generate": GenerateScreen, "telemetry": TelemetryScreen}
    DEFAULT_MODE = "peers"
    COMMANDS = App.COMMANDS | {MeshCommands}
    BINDINGS = [
        # The section bar at the top shows 1-4, so the footer leaves them out.
        Binding("1", "switch_section('peers')", "Peers", show=False,
                tooltip="Go to the daemons: health, GPUs, links", id="go.peers"),
        Binding("2", "switch_section('split')", "Split", show=False,
                tooltip="Go to the split: which peer runs which blocks", id="go.split"),
        Binding("3", "switch_section('generate')", "Generate", show=False,
                tooltip="Go to the prompt, the live run, the image and the history", id="go.generate"),
        Binding("4", "switch_section('telemetry')", "Telemetry", show=False,
                tooltip="Go to GPU, NVENC/NVDEC, VRAM, PCIe and link readings", id="go.telemetry"),
        Binding("ctrl+g", "generate", "Generate now", priority=True,
                tooltip="Run a generation with the settings on Generate (loads the split first if needed)",
                id="run.generate"),
        Binding("escape", "cancel_generation", "Cancel run", tooltip="Stop the running generation",
                id="run.cancel"),
        Binding("f1", "help", "Help", tooltip="What this section is for and every key", id="help"),
    ]

    # State pushed down to the screens (they watch these).
    peers: var[tuple[PeerView, ...]] = var(())
    plan: var[SplitPlan | None] = var(None)
    applied: var[SplitPlan | None] = var(None)  # the plan last loaded onto the peers
    forecast: var[splitting.Forecast | None] = var(None)
    loading: var[tuple[tuple[str, int, int], ...]] = var(())
    runs: var[tuple[RunRecord, ...]] = var(())
    telemetry: var[TelemetryStore | None] = var(None)
    settings: var[GenerateSettings] = var(GenerateSettings())
    text_encoder: var[str | None] = var(None)  # label of the peer that encodes prompts; None: the head
    banner: var[str] = var("")
    status: var[tuple[str, str]] = var(("", ""))

    def __init__(self, config: TuiConfig, config_path: Path | None, *, key: bytes | None, key_note: str | None = None,
                 peers: Sequence[PeerAddress] = (), demo=None, stored: TuiConfig | None = None,
                 image_mode: str = "halfblock", clock: Callable[[], float] = time.time,
                 discovery: bool | None = None) -> None:
        """``config`` is what this session uses; ``stored`` what the file at ``config_path`` holds, if it
        differs (the demo uses its own peers but remembers settings in the user's file). A
        ``config_path`` of None keeps everything in memory."""
        super().__init__()
        self.config = config
        self.stored = stored or config
        self.config_path = config_path
        self.key_note = key_note
        self.demo = demo
        self.image_mode = image_mode
        self.clock = clock
        self.discovery_enabled = config.discovery if discovery is None else discovery
        self.mesh = Mesh(key)
        self.monitors: dict[str, workers.PeerMonitor] = {}
        self._monitor_workers: dict[str, Worker] = {}
        self._sources: dict[str, frozenset[str]] = {}
        self._hints: dict[str, dict[str, str]] = {}
        self._initial = list(peers)
        self._discovery_note = ""
        self._starting: str | None = "starting the demo daemons on loopback..." if demo is not None else None
        self._auto_apply = demo is not None
        self.speeds = splitting.BlockSpeeds()
        self.links = splitting.LinkBook()
        self.images: dict[int, bytes] = {}
        self._active_run: int | None = None
        self._active_plan: SplitPlan | None = None
        self._form_error: str | None = None
        # The app's last proposal and the online peers it was made over: a plan equal to it follows the
        # peers (proposed again when they change); an edited one stays as the user left it.
        self._proposed: SplitPlan | None = None
        self._proposed_over: frozenset[PeerAddress] = frozenset()
        self._next_run = 1
        self.set_reactive(MeshApp.telemetry, TelemetryStore(clock))
        self.set_reactive(MeshApp.settings, config.generate)

    # --- start and stop ------------------------------------------------------------------------

    def on_mount(self) -> None:
        self.theme = "textual-dark"
        if self.demo is not None:
            # A closed terminal (SIGHUP) or a kill must still stop the demo's daemons: exit normally,
            # so that run_demo_app's cleanup runs.
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGHUP, signal.SIGTERM):
                loop.add_signal_handler(sig, self.exit)
        if self.config_path is not None:
            past = run_log.load_history(self.config.images_dir)
            if past:
                self.runs = tuple(past)
                self._next_run = max(r.id for r in past) + 1
        for text in self.config.peers:
            try:
                self.add_peer(PeerAddress.parse(text), "manual")
            except PlanError as exc:
                self.notify(f"{self.config_path}: {exc}", title="Skipped a remembered peer", severity="warning")
        for address in self._initial:
            self.add_peer(address, "manual")
        if self.demo is not None:
            self.run_worker(workers.start_local_daemons(self.demo), group="demo", exit_on_error=False,
                            description="starting the demo daemons")
        elif self.discovery_enabled:
            self.run_worker(workers.browse(self.post_message), group="discovery", exit_on_error=False)
        else:
            self._discovery_note = "mDNS discovery is off: add peers by hand (a)"
        self.refresh_derived()

    async def on_unmount(self) -> None:
        if self.demo is not None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGHUP, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        await self.mesh.close()

    # --- peers ---------------------------------------------------------------------------------

    def peer_by_address(self, address: PeerAddress) -> PeerView | None:
        return next((p for p in self.peers if p.address == address), None)

    def add_peer(self, address: PeerAddress, source: str, hints: dict[str, str] | None = None) -> PeerView:
        """Know ``address`` (again): a monitor worker connects to it and reports."""
        known = self.peer_by_address(address)
        if known is not None:
            self._sources[known.label] = self._sources[known.label] | {source}
            self._hints[known.label] = {**self._hints.get(known.label, {}), **(hints or {})}
            self._set_view(known)
            return known
        label = self.mesh.add(address).label
        self._sources[label] = frozenset({source})
        self._hints[label] = dict(hints or {})
        view = PeerView(label, address)
        self._set_view(view)
        monitor = workers.PeerMonitor(self.mesh, view, self.post_message, poll_interval=self.config.poll_interval,
                                      telemetry_interval=self.config.telemetry_interval)
        self.monitors[label] = monitor
        self._monitor_workers[label] = self.run_worker(monitor.run(), name=f"peer {label} {address}",
                                                       group="peers", exit_on_error=False)
        return view

    def remove_peer(self, label: str) -> None:
        view = next((p for p in self.peers if p.label == label), None)
        if view is None:
            return
        worker = self._monitor_workers.pop(label, None)
        if worker is not None:
            worker.cancel()
        self.monitors.pop(label, None)
        self.run_worker(self.mesh.remove(label), group="peers", exit_on_error=False)
        self.peers = tuple(p for p in self.peers if p.label != label)
        self.telemetry.forget(label)
        self.mutate_reactive(MeshApp.telemetry)
        if "manual" in self._sources.pop(label, ()):
            self._save(lambda c: without_peer(c, str(view.address)))
        self.notify(f"removed {label} ({view.address})")
        self.refresh_derived()

    def _set_view(self, view: PeerView) -> None:
        view = replace(view, sources=self._sources.get(view.label, view.sources),
                       hints=self._hints.get(view.label, view.hints))
        peers = list(self.peers)
        for i, known in enumerate(peers):
            if known.label == view.label:
                peers[i] = view
                break
        else:
            peers.append(view)
        self.peers = tuple(peers)
        self.refresh_derived()

    @on(PeerUpdated)
    def _peer_updated(self, message: PeerUpdated) -> None:
        if message.view.label in self.monitors:
            self._set_view(message.view)

    @on(TelemetrySampled)
    def _telemetry_sampled(self, message: TelemetrySampled) -> None:
        if message.label in self.monitors:
            self.telemetry.add(message.label, message.snapshot, message.source)
            self.mutate_reactive(MeshApp.telemetry)

    @on(TelemetryNote)
    def _telemetry_note(self, message: TelemetryNote) -> None:
        self.telemetry.set_note(message.label, message.note)
        self.mutate_reactive(MeshApp.telemetry)

    @on(PeerDiscovered)
    def _peer_discovered(self, message: PeerDiscovered) -> None:
        self.add_peer(message.address, "mdns", {"name": message.name, **message.hints})

    @on(PeerVanished)
    def _peer_vanished(self, message: PeerVanished) -> None:
        view = self.peer_by_address(message.address) if message.address else None
        if view is not None and self._sources.get(view.label) == frozenset({"mdns"}) and not view.online:
            self.remove_peer(view.label)

    @on(DiscoveryState)
    def _discovery_state(self, message: DiscoveryState) -> None:
        self._discovery_note = message.note
        self.refresh_derived()

    @on(LocalDaemonsStarted)
    def _daemons_started(self, message: LocalDaemonsStarted) -> None:
        self._starting = None
        for address in message.addresses:
            self.add_peer(address, "demo")

    def action_add_peer(self) -> None:
        def added(address: PeerAddress | None) -> None:
            if address is None:
                return
            view = self.add_peer(address, "manual")
            self._save(lambda c: with_peer(c, str(address)))
            self.notify(f"added {view.label} ({address}); connecting...")

        self.push_screen(AddPeerScreen(), added)

    def action_reconnect(self) -> None:
        for monitor in self.monitors.values():
            monitor.wake()

    def action_measure_links(self) -> None:
        for monitor in self.monitors.values():
            monitor.wake(measure_link=True)
        self.notify("measuring the link to every online peer")

    # --- the split -----------------------------------------------------------------------------

    def preset(self) -> ModelPreset | None:
        try:
            return splitting.plan_preset(self.peers)
        except PlanError:
            return None

    def resolved_size(self) -> tuple[int, int] | None:
        preset = self.preset()
        if preset is None:
            return None
        s = self.settings
        return (s.width or preset.default_size, s.height or preset.default_size)

    def _propose(self) -> SplitPlan:
        """A proposal over the online peers (PlanError says why there is none)."""
        self._proposed_over = frozenset(p.address for p in self.peers if p.online)
        preset, size = splitting.plan_preset(self.peers), self.resolved_size()
        self._proposed = splitting.propose_plan(self.peers, splitting.tokens_for(preset, *size), self.speeds)
        return self._proposed

    def action_propose_split(self) -> None:
        try:
            self.plan = self._propose()
        except PlanError as exc:
            self.notify(str(exc), title="No split proposed", severity="error")
            return
        self.notify(f"proposed {self.plan.describe()}")

    def text_encoder_choices(self) -> list[str | None]:
        """Where prompts can be encoded: the head (None), then every other online peer with a text encoder."""
        head = self.plan.stages[0].peer if self.plan is not None else None
        return [None, *(p.label for p in self.peers
                        if p.status is PeerStatus.ONLINE and p.text_encoder and p.address != head)]

    def action_cycle_text_encoder(self) -> None:
        choices = self.text_encoder_choices()
        if len(choices) == 1 and self.text_encoder is None:
            self.notify("no other online peer has a text encoder: prompts are encoded on the head",
                        severity="warning")
            return
        at = choices.index(self.text_encoder) if self.text_encoder in choices else 0
        self.text_encoder = choices[(at + 1) % len(choices)]
        self.notify(self.text_encoder_line())

    def text_encoder_line(self) -> str:
        """Where the next generation encodes its prompt, in words."""
        head = self.peer_by_address(self.plan.stages[0].peer) if self.plan is not None else None
        placed = next((p for p in self.peers if p.label == self.text_encoder), None)
        if placed is not None and (head is None or placed.address != head.address):
            return (f"Text encoder: on {placed.label} ({placed.address}); the head fetches the prompt's "
                    "embeddings from it (t: change)")
        if head is not None and head.text_encoder is False:
            return (f"Text encoder: the head ({head.label}) has none; press t to place it on a peer that "
                    "has one")
        return "Text encoder: on the head (t: place it on another peer)"

    def action_validate_split(self) -> None:
        if self.plan is None:
            self.notify("no split to check: press p to propose one", severity="warning")
        elif self.forecast is not None and self.forecast.problems:
            self.notify("\n".join(self.forecast.problems), title="The split cannot run", severity="error")
        else:
            self.notify(f"{self.plan.describe()} is valid and fits", title="Split OK")

    def action_apply_split(self) -> None:
        if not self._split_ready("load"):
            return
        plan = self.plan
        self.loading = tuple((self.mesh.peer_at(s.peer).label, 0, s.blocks) for s in plan.stages)
        self.run_worker(workers.apply_split(self.mesh, plan, self.post_message), group="apply", exclusive=True,
                        exit_on_error=False, description=f"loading {plan.describe()}")

    def _split_ready(self, doing: str) -> bool:
        if self.plan is None:
            self.action_propose_split()
            if self.plan is None:
                return False
        if self.forecast is not None and self.forecast.problems:
            self.notify("\n".join(self.forecast.problems), title=f"Cannot {doing} this split", severity="error")
            return False
        return True

    def on_split_editor_edited(self, message: SplitEditor.Edited) -> None:
        self.plan = message.plan

    @on(SpanLoading)
    def _span_loading(self, message: SpanLoading) -> None:
        self.loading = tuple((label, message.done, message.total) if label == message.label else (label, d, t)
                             for label, d, t in self.loading)

    @on(SpanCompiling)
    def _span_compiling(self, message: SpanCompiling) -> None:
        # Loading shows done/total; the compile after it would otherwise look like a stalled load.
        self.notify(f"{message.label}: {message.text}", title="Split")

    @on(SplitApplied)
    def _split_applied(self, message: SplitApplied) -> None:
        self.applied = message.plan
        self.loading = ()
        self.notify(f"loaded {message.plan.describe()} in {message.seconds:.1f} s", title="Split ready")
        self.refresh_derived()

    # --- generating ----------------------------------------------------------------------------

    def on_generate_form_changed(self, message: GenerateForm.Changed) -> None:
        self._form_error = message.error
        if message.settings is not None:
            self.settings = message.settings

    def on_generate_form_submitted(self, message: GenerateForm.Submitted) -> None:
        self.action_generate()

    def action_generate(self) -> None:
        if self._active_run is not None:
            self.notify("a generation is already running (Esc outside a form field cancels it)", severity="warning")
            return
        if self._form_error:
            self.switch_mode("generate")
            self.notify(self._form_error, title="Fix the form first", severity="error")
            return
        preset = self.preset()
        if preset is None or not self._split_ready("generate with"):
            if preset is None:
                self.notify(next_step(self.peers, None, None, ()), title="Cannot generate yet", severity="error")
            return
        s = self.settings
        width, height = self.resolved_size()
        params = RunParams(s.prompt, s.seed, width, height, s.steps or preset.default_steps,
                           preset.default_guidance if s.guidance is None else s.guidance, s.codec)
        plan = self.plan
        record = RunRecord(self._next_run, self.clock(), params, plan.describe())
        self._next_run += 1
        self._active_run, self._active_plan = record.id, plan
        self.runs = (*self.runs, record)
        self._save(lambda c: replace(c, generate=s))
        self.switch_mode("generate")
        self.refresh_bindings()

        def save(png: bytes) -> Path:
            return run_log.save_png(self.config.images_dir, png, record)

        placed = next((p for p in self.peers if p.label == self.text_encoder), None)
        encoder = placed.address if placed is not None and placed.address != plan.stages[0].peer else None
        self.run_worker(workers.generate(self.mesh, plan, params, record.id, self.post_message, save=save,
                                         text_encoder=encoder),
                        group="generate", exclusive=True, exit_on_error=False, description=f"run {record.id}")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel_generation":
            return self._active_run is not None
        return True

    def action_cancel_generation(self) -> None:
        for worker in self.workers:
            if worker.group == "generate" and worker.is_running:
                worker.cancel()

    def _update_run(self, run_id: int, change: Callable[[RunRecord], RunRecord]) -> RunRecord | None:
        runs = list(self.runs)
        for i, run in enumerate(runs):
            if run.id == run_id:
                runs[i] = change(run)
                self.runs = tuple(runs)
                self.refresh_derived()
                return runs[i]
        return None

    @on(GenerationEvent)
    def _generation_event(self, message: GenerationEvent) -> None:
        event = message.event
        run = self._update_run(message.run_id, lambda r: run_log.apply_event(r, event))
        if event.get("kind") == "prepared":
            self.links.observe_prepared(event)
        elif event.get("kind") == "step" and run is not None:
            self.speeds.observe_step(run.stages, event)

    @on(GenerationDone)
    def _generation_done(self, message: GenerationDone) -> None:
        self.images[message.run_id] = message.png
        for old in sorted(self.images)[:-IMAGES_KEPT]:
            del self.images[old]
        run = self._update_run(message.run_id, lambda r: run_log.finish(r, message.summary, message.path))
        self._active_run = None
        self.applied = self._active_plan  # generating loaded it onto the peers
        self.refresh_derived()
        self.refresh_bindings()
        if run is not None:
            self._record(run)
            self.notify(f"{run.total_s:.2f} s, saved {message.path}", title=f"Run {run.id} done")

    def _finish_run(self, state: RunState, message: str) -> None:
        run_id, self._active_run = self._active_run, None
        self.refresh_bindings()
        if run_id is not None:
            run = self._update_run(run_id, lambda r: run_log.fail(r, state, message))
            if run is not None:
                self._record(run)

    def _record(self, run: RunRecord) -> None:
        if self.config_path is None:
            return
        try:
            run_log.append_history(self.config.images_dir, run)
        except OSError as exc:
            self.notify(f"could not write the run history: {exc}", severity="warning")

    # --- the one place worker failures land ------------------------------------------------------

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if worker.group == "generate" and event.state is WorkerState.CANCELLED:
            self._finish_run(RunState.CANCELLED, "cancelled by the user")
            self.notify("generation cancelled")
        if worker.group == "demo" and event.state is WorkerState.SUCCESS:
            self.post_message(LocalDaemonsStarted(worker.result))
        if event.state is not WorkerState.ERROR:
            return
        text = describe_error(worker.error, self.peers)
        title = FAILURE_TITLES.get(worker.group, "Error")
        if not isinstance(worker.error, (MeshError, PlanError, ConfigError, OSError)):
            log.error("worker %s failed", worker.name, exc_info=worker.error)
        if worker.group == "generate":
            self._finish_run(RunState.FAILED, text)
        elif worker.group == "apply":
            self.loading = ()
        elif worker.group == "demo":
            self._starting = f"the demo daemons did not start: {text}"
            self.refresh_derived()
        self.notify(text, title=title, severity="error", timeout=15)

    # --- derived state ---------------------------------------------------------------------------

    def refresh_derived(self) -> None:
        """Recompute what follows from peers, plan and runs: proposal, forecast, status line, banner."""
        self._auto_propose()
        size = self.resolved_size()
        self.forecast = (splitting.forecast(self.plan, {p.address: p for p in self.peers}, *size, self.speeds,
                                            self.links, self.settings.codec)
                         if self.plan is not None and size is not None else None)
        if (self._auto_apply and self.plan is not None and self.forecast is not None and self.forecast.ok
                and all(p.online for p in self.peers)):
            self._auto_apply = False
            self.action_apply_split()
        self.status = (summary(self.peers, self.plan, self.applied),
                       next_step(self.peers, self.plan, self.applied, self.runs, self._starting))
        self.banner = self._banner_text()

    def _auto_propose(self) -> None:
        """Propose a split by itself once the peers have answered, so the Split screen is never empty,
        and again when the online peers change, until the user proposes or edits one."""
        if any(p.status is PeerStatus.CONNECTING for p in self.peers):
            return
        stale = self.plan is not None and any(self.peer_by_address(s.peer) is None for s in self.plan.stages)
        online = frozenset(p.address for p in self.peers if p.online)
        following = self.plan is not None and self.plan == self._proposed and online != self._proposed_over
        if not (self.plan is None or stale or following):
            return
        try:
            plan = self._propose()
        except PlanError:
            plan = None
        if self.plan is not None and plan != self.plan:
            self.notify(f"the online peers changed: the split is now {plan.describe() if plan else 'none'}",
                        title="Split proposed again")
        self.plan = plan

    def watch_settings(self) -> None:
        self.refresh_derived()

    def watch_plan(self) -> None:
        if self.is_running:
            self.refresh_derived()

    def _banner_text(self) -> str:
        if self._starting:
            return self._starting
        lines = []
        if self.demo is not None:
            lines.append("Demo: two meshd daemons on this machine (tiny model, CPU) each hold part of the model. "
                         "ctrl+g generates an image across them; 2 shows the split, 3 the run, 4 telemetry, "
                         "F1 help.")
        if self.key_note:
            lines.append(self.key_note)
        if self._discovery_note:
            lines.append(self._discovery_note)
        if not self.peers:
            lines.append("No peers yet. Press a to add one (HOST:PORT of a meshd), or run `meshtui demo` to try "
                         "two local daemons.")
        return "\n".join(lines)

    # --- sections, help, settings ---------------------------------------------------------------

    def action_switch_section(self, mode: str) -> None:
        self.switch_mode(mode)

    def action_help(self) -> None:
        screen = self.screen
        text = getattr(screen, "HELP", "") or "# flux-mesh"
        where = str(self.config_path) if self.config_path else "not saved (this session only)"
        text += ("\n\n## Keys\n\n" + keys_markdown(screen)
                 + "\n\nEvery action is also in the command palette: **ctrl+p**. Quit: **ctrl+q**.\n\n"
                 f"## Settings\n\nPeers and the last generation settings are kept in `{where}`; "
                 f"images are saved to `{self.config.images_dir}`.\n")
        self.push_screen(HelpScreen(text))

    def _save(self, change: Callable[[TuiConfig], TuiConfig]) -> None:
        """Apply ``change`` to this session's settings and to the file's."""
        self.config, self.stored = change(self.config), change(self.stored)
        if self.config_path is None:
            return
        try:
            save_config(self.stored, self.config_path)
        except OSError as exc:
            self.notify(f"could not save settings to {self.config_path}: {exc}", severity="warning")


# --- entry points ------------------------------------------------------------------------------------


def _key(key_file: Path | None) -> tuple[bytes | None, str | None]:
    from meshd.auth import AuthError, read_key  # noqa: PLC0415
    from meshd.config import default_key_file  # noqa: PLC0415

    path = key_file or default_key_file()
    try:
        return read_key(path), None
    except (AuthError, OSError) as exc:
        return None, (f"No usable cluster key ({exc}). Daemons will refuse us: copy their key to {path} "
                      "or start meshtui with --key-file.")


def run_app(args: argparse.Namespace) -> int:
    """``meshtui`` with no subcommand: the dashboard on configured peers, plus any ``--peer``."""
    from meshd.discovery import PeersFileError, load_peers_file  # noqa: PLC0415

    from .widgets.image_view import detect_image_mode  # noqa: PLC0415

    path = getattr(args, "config", None) or default_config_path()
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"meshtui: {exc}", file=sys.stderr)
        return 2
    key_file = getattr(args, "key_file", None) or config.key_file
    key, note = _key(key_file)
    try:
        peers = [PeerAddress.parse(p) for p in getattr(args, "peer", None) or ()]
        # The peers file that ``meshtui peers`` and the daemons read counts as manual peers too.
        peers += load_peers_file(getattr(args, "peers_file", None))
    except (PlanError, PeersFileError) as exc:
        print(f"meshtui: {exc}", file=sys.stderr)
        return 2
    app = MeshApp(config, path, key=key, key_note=note, peers=peers, image_mode=detect_image_mode(config.image_mode))
    app.run()
    return app.return_code or 0


def _explicit_generation_args(args: argparse.Namespace) -> dict:
    """The generation flags the user actually gave to ``meshtui demo`` (not their defaults)."""
    from .cli import _add_generation_args  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    _add_generation_args(parser)
    defaults = vars(parser.parse_args([]))
    return {k: getattr(args, k) for k in defaults if hasattr(args, k) and getattr(args, k) != defaults[k]}


def run_demo_app(args: argparse.Namespace) -> int:
    """``meshtui demo``: two ``tiny`` daemons on loopback (started and stopped here) and the dashboard."""
    from meshd.auth import read_key  # noqa: PLC0415
    from meshd.config import default_models_dir  # noqa: PLC0415

    from .local import LocalCluster  # noqa: PLC0415
    from .widgets.image_view import detect_image_mode  # noqa: PLC0415

    path = default_config_path()
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"meshtui: {exc} (the demo runs with default settings)", file=sys.stderr)
        config, path = TuiConfig(), None
    given = _explicit_generation_args(args)
    settings = config.generate
    for name in ("prompt", "seed", "steps", "guidance", "codec"):
        if name in given:
            settings = replace(settings, **{name: given[name]})
    if "size" in given:
        settings = replace(settings, width=given["size"][0], height=given["size"][1])
    # The demo's peers are its own loopback daemons: the user's remembered peers stay out of it.
    session = replace(config, peers=(), generate=settings, discovery=False)
    cluster = LocalCluster(models_dir=default_models_dir(), common_args=["--model", "tiny", "--device", "cpu"])
    cluster.add("demo-a")
    cluster.add("demo-b")
    try:
        app = MeshApp(session, path, key=read_key(cluster.key_file), demo=cluster, stored=config,
                      image_mode=detect_image_mode(config.image_mode))
        app.run()
        return app.return_code or 0
    finally:
        cluster.stop()
