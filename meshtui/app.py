"""The flux-mesh dashboard: find peers, split the model, generate, watch the GPUs.

What the dashboard knows lives in a :class:`~meshtui.state.Dashboard` (no Textual there). The app
binds it to the screen: workers (``meshtui.workers``) do all network I/O and post typed messages
(``meshtui.messages``), the handlers here fold each into the dashboard, which derives what follows,
and the app publishes the result in reactive attributes that the screens watch (attributes down,
messages up). Worker failures meet one handler, :meth:`MeshApp.on_worker_state_changed`.

The commands that open it (``meshtui``, ``meshtui demo``) are in :mod:`meshtui.launch`: they import
this module, never the reverse.
"""

from __future__ import annotations

import asyncio
import logging
import signal
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
from meshd.pipeline.plan import PeerAddress, PlanError, SplitPlan

from . import runs as run_log
from . import splitting, workers
from .commands import MeshCommands
from .config import ConfigError, GenerateSettings, TuiConfig, save_config, with_peer, without_peer
from .history import TelemetryStore
from .mesh import Mesh
from .messages import (DiscoveryState, GenerationDone, GenerationEvent, LocalDaemonsStarted, PeerDiscovered,
                       PeerUpdated, PeerVanished, SpanCompiling, SpanLoading, SplitApplied, TelemetryNote,
                       TelemetrySampled)
from .runs import RunRecord, RunState
from .screens.add_peer import AddPeerScreen
from .screens.generate import GenerateScreen
from .screens.help import HelpScreen, keys_markdown
from .screens.peers import PeersScreen
from .screens.split import SplitScreen
from .screens.telemetry import TelemetryScreen
from .state import Dashboard, Notice
from .views import PeerView
from .widgets.generate_form import GenerateForm
from .widgets.split_view import SplitEditor

log = logging.getLogger(__name__)


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

    # The dashboard's state as the screens see it, published by refresh_derived() (they watch these).
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
        self.demo = demo
        self.image_mode = image_mode
        self.discovery_enabled = config.discovery if discovery is None else discovery
        #: The client: connections to the peers. The dashboard's state is ``dashboard``.
        self.mesh = Mesh(key)
        self.dashboard = Dashboard(config.generate, demo=demo is not None, key_note=key_note, clock=clock)
        self.monitors: dict[str, workers.PeerMonitor] = {}
        self._monitor_workers: dict[str, Worker] = {}
        self._initial = list(peers)
        self.set_reactive(MeshApp.telemetry, self.dashboard.telemetry)
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
            self.dashboard.load_history(run_log.load_history(self.config.images_dir))
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
            self.dashboard.discovery_note = "mDNS discovery is off: add peers by hand (a)"
        self.refresh_derived()

    async def on_unmount(self) -> None:
        if self.demo is not None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGHUP, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        await self.mesh.close()

    # --- peers ---------------------------------------------------------------------------------

    def add_peer(self, address: PeerAddress, source: str, hints: dict[str, str] | None = None) -> PeerView:
        """Know ``address`` (again): a monitor worker connects to it and reports."""
        known = self.dashboard.peer_by_address(address)
        if known is not None:
            view = self.dashboard.mention_peer(known.label, source, hints)
            self.refresh_derived()
            return view
        label = self.mesh.add(address).label
        view = self.dashboard.add_peer(label, address, source, hints)
        monitor = workers.PeerMonitor(self.mesh, view, self.post_message, poll_interval=self.config.poll_interval,
                                      telemetry_interval=self.config.telemetry_interval)
        self.monitors[label] = monitor
        self._monitor_workers[label] = self.run_worker(monitor.run(), name=f"peer {label} {address}",
                                                       group="peers", exit_on_error=False)
        self.refresh_derived()
        return view

    def remove_peer(self, label: str) -> None:
        """Forget a peer: stop its monitor, close its connection, drop it from the remembered ones."""
        removed = self.dashboard.remove_peer(label)
        if removed is None:
            return
        view, sources = removed
        worker = self._monitor_workers.pop(label, None)
        if worker is not None:
            worker.cancel()
        self.monitors.pop(label, None)
        self.run_worker(self.mesh.remove(label), group="peers", exit_on_error=False)
        self.mutate_reactive(MeshApp.telemetry)
        if "manual" in sources:
            self._save(lambda c: without_peer(c, str(view.address)))
        self.notify(f"removed {label} ({view.address})")
        self.refresh_derived()

    @on(PeerUpdated)
    def _peer_updated(self, message: PeerUpdated) -> None:
        if self.dashboard.knows(message.view.label):
            self.dashboard.update_peer(message.view)
            self.refresh_derived()

    @on(TelemetrySampled)
    def _telemetry_sampled(self, message: TelemetrySampled) -> None:
        if self.dashboard.knows(message.label):
            self.dashboard.telemetry.add(message.label, message.snapshot, message.source)
            self.mutate_reactive(MeshApp.telemetry)

    @on(TelemetryNote)
    def _telemetry_note(self, message: TelemetryNote) -> None:
        self.dashboard.telemetry.set_note(message.label, message.note)
        self.mutate_reactive(MeshApp.telemetry)

    @on(PeerDiscovered)
    def _peer_discovered(self, message: PeerDiscovered) -> None:
        self.add_peer(message.address, "mdns", {"name": message.name, **message.hints})

    @on(PeerVanished)
    def _peer_vanished(self, message: PeerVanished) -> None:
        label = self.dashboard.vanished(message.address)
        if label is not None:
            self.remove_peer(label)

    @on(DiscoveryState)
    def _discovery_state(self, message: DiscoveryState) -> None:
        self.dashboard.discovery_note = message.note
        self.refresh_derived()

    @on(LocalDaemonsStarted)
    def _daemons_started(self, message: LocalDaemonsStarted) -> None:
        self.dashboard.starting = None
        for address in message.addresses:
            self.add_peer(address, "demo")

    def on_peers_screen_remove_requested(self, message: PeersScreen.RemoveRequested) -> None:
        self.remove_peer(message.label)

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

    def action_propose_split(self) -> None:
        notice = self.dashboard.propose_split()
        self.refresh_derived()
        self.tell(notice)

    def action_cycle_text_encoder(self) -> None:
        if not self.dashboard.cycle_text_encoder():
            self.notify("no other online peer has a text encoder: prompts are encoded on the head",
                        severity="warning")
            return
        self.refresh_derived()
        self.notify(self.dashboard.text_encoder_line())

    def action_validate_split(self) -> None:
        self.tell(self.dashboard.check_split())

    def action_apply_split(self) -> None:
        if not self._split_ready("load"):
            return
        plan = self.dashboard.plan
        self.dashboard.start_loading(plan, lambda address: self.mesh.peer_at(address).label)
        self.refresh_derived()
        self.run_worker(workers.apply_split(self.mesh, plan, self.post_message), group="apply", exclusive=True,
                        exit_on_error=False, description=f"loading {plan.describe()}")

    def _split_ready(self, doing: str) -> bool:
        before = self.dashboard.plan
        ready, notices = self.dashboard.ready_split(doing)
        if self.dashboard.plan is not before:  # it proposed one: the screens show it
            self.refresh_derived()
        for notice in notices:
            self.tell(notice)
        return ready

    def on_split_editor_edited(self, message: SplitEditor.Edited) -> None:
        self.dashboard.plan = message.plan
        self.refresh_derived()

    @on(SpanLoading)
    def _span_loading(self, message: SpanLoading) -> None:
        self.dashboard.span_loading(message.label, message.done, message.total)
        self.refresh_derived()

    @on(SpanCompiling)
    def _span_compiling(self, message: SpanCompiling) -> None:
        # Loading shows done/total; the compile after it would otherwise look like a stalled load.
        self.notify(f"{message.label}: {message.text}", title="Split")

    @on(SplitApplied)
    def _split_applied(self, message: SplitApplied) -> None:
        self.dashboard.split_applied(message.plan)
        self.notify(f"loaded {message.plan.describe()} in {message.seconds:.1f} s", title="Split ready")
        self.refresh_derived()

    # --- generating ----------------------------------------------------------------------------

    def on_generate_form_changed(self, message: GenerateForm.Changed) -> None:
        self.dashboard.form_error = message.error
        if message.settings is not None:
            self.dashboard.settings = message.settings
            self.refresh_derived()

    def on_generate_form_submitted(self, message: GenerateForm.Submitted) -> None:
        self.action_generate()

    def action_generate(self) -> None:
        dash = self.dashboard
        blocker = dash.generation_blocker()
        if blocker is not None:
            self.tell(blocker)
            return
        if not self._split_ready("generate with"):
            return
        record, plan = dash.start_run()
        settings = dash.settings
        self._save(lambda c: replace(c, generate=settings))
        self.refresh_derived()
        self.switch_mode("generate")
        self.refresh_bindings()

        def save(png: bytes) -> Path:
            return run_log.save_png(self.config.images_dir, png, record)

        self.run_worker(workers.generate(self.mesh, plan, record, self.post_message, save=save,
                                         text_encoder=dash.text_encoder_address(plan)),
                        group="generate", exclusive=True, exit_on_error=False, description=f"run {record.id}")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel_generation":
            return self.dashboard.active_run is not None
        return True

    def action_cancel_generation(self) -> None:
        for worker in self.workers:
            if worker.group == "generate" and worker.is_running:
                worker.cancel()

    @on(GenerationEvent)
    def _generation_event(self, message: GenerationEvent) -> None:
        self.dashboard.run_event(message.run_id, message.event)
        self.refresh_derived()

    @on(GenerationDone)
    def _generation_done(self, message: GenerationDone) -> None:
        run = self.dashboard.run_done(message.run_id, message.png, message.summary, message.path)
        self._after_run(run)
        if run is not None:
            self.notify(f"{run.total_s:.2f} s, saved {message.path}", title=f"Run {run.id} done")

    def _finish_run(self, state: RunState, message: str) -> None:
        self._after_run(self.dashboard.run_ended(state, message))

    def _after_run(self, run: RunRecord | None) -> None:
        """The screen follows the dashboard after a run ended (or nothing ended), and the run is kept."""
        self.refresh_derived()
        self.refresh_bindings()
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
        if not isinstance(worker.error, (MeshError, PlanError, ConfigError, OSError)):
            log.error("worker %s failed", worker.name, exc_info=worker.error)
        notice, run = self.dashboard.worker_failed(worker.group, worker.error)
        self._after_run(run)
        self.tell(notice, timeout=15)

    # --- binding the dashboard to the screen -------------------------------------------------------

    def tell(self, notice: Notice, timeout: float | None = None) -> None:
        """Show ``notice``, in the section where the user can act on it if it names one."""
        if notice.section is not None:
            self.switch_mode(notice.section)
        self.notify(notice.text, title=notice.title, severity=notice.severity, timeout=timeout)

    def refresh_derived(self) -> None:
        """After a change to the dashboard: derive what follows from it once, then publish it to the screens."""
        dash = self.dashboard
        for notice in dash.derive():
            self.tell(notice)
        self.peers, self.plan, self.applied, self.loading = dash.peers, dash.plan, dash.applied, dash.loading
        self.runs, self.settings, self.text_encoder = dash.runs, dash.settings, dash.text_encoder
        self.forecast, self.status, self.banner = dash.forecast, dash.status, dash.banner
        if dash.take_auto_apply():
            self.action_apply_split()

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
