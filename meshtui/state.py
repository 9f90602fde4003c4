"""What the dashboard knows and what follows from it, without Textual and without I/O.

:class:`Dashboard` holds the peers, the split (proposed, edited, loaded), the runs, the measured block
speeds and links, and the telemetry history. The app feeds it what its workers report and the user
does, then reads it back to show: attributes down, messages up. Everything that follows from that
state (the automatic proposal, the forecast, the status line, the banner) is derived in one place,
:meth:`Dashboard.derive`, after the change has been folded in; the forecast is computed again only
when something it reads has changed, so a health poll that only refreshes a peer's age costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from meshd.errors import MeshError
from meshd.model.presets import ModelPreset
from meshd.pipeline.request import GenerationParams
from meshd.pipeline.plan import PeerAddress, PlanError, SplitPlan

from . import runs as run_log
from . import splitting
from .config import ConfigError, GenerateSettings
from .events import Event, Prepared, Step
from .history import TelemetryStore
from .runs import RunRecord, RunState
from .views import PeerStatus, PeerView

#: Runs whose PNG bytes stay in memory (older ones are read back from their file).
IMAGES_KEPT = 8

#: Worker groups, and what a failure in each means to the user.
FAILURE_TITLES = {
    "generate": "Generation failed",
    "apply": "Could not load the split",
    "demo": "Could not start the demo daemons",
    "peers": "A peer monitor stopped",
    "discovery": "mDNS discovery stopped",
}


@dataclass(frozen=True)
class Notice:
    """Something the user should be told: about a change the dashboard made by itself, or why an
    action did or did not happen."""

    text: str
    title: str = ""
    severity: str = "information"
    section: str | None = None  # the section (mode) where the user can act on it, if the app should go there


def describe_error(error: BaseException | None, peers: Sequence[PeerView] = ()) -> str:
    """One line a user can act on; a peer named by address is also named as the user knows it."""
    if isinstance(error, MeshError) and error.peer:
        known = next((p for p in peers if str(p.address) == error.peer), None)
        if known is not None:
            return f"{known.label} ({known.title}, {error.peer}): {error.message}"
    if isinstance(error, (MeshError, PlanError, ConfigError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


def next_step(peers: Sequence[PeerView], plan: SplitPlan | None, applied: SplitPlan | None,
              runs: Sequence[RunRecord], starting: str | None = None) -> str:
    """One sentence telling a new user what to do now."""
    if starting:
        return starting
    running = next((r for r in reversed(runs) if r.state is RunState.RUNNING), None)
    if running is not None:
        return f"generating: {running.phase} - Esc (outside a form field) cancels"
    if not peers:
        return "no peers yet: press a on Peers (1) to add the HOST:PORT of a meshd"
    online = [p for p in peers if p.online]
    if not online:
        if any(p.status is PeerStatus.UNAUTHENTICATED for p in peers):
            return "peers refuse our cluster key: start meshtui with --key-file pointing at the daemons' key"
        if all(p.status is PeerStatus.CONNECTING for p in peers):
            return "connecting to peers..."
        return "no peer answers: check that meshd runs there (r on Peers retries now)"
    if plan is None:
        return "press p on Split (2) to propose how to split the model over the peers"
    if plan != applied:
        return "ctrl+g generates (the split is loaded first), or a on Split (2) loads it now"
    return "ready: ctrl+g generates with the settings on Generate (3)"


def summary(peers: Sequence[PeerView], plan: SplitPlan | None, applied: SplitPlan | None) -> str:
    """The state of the mesh in one line: peers online, the split and whether it is loaded."""
    online = sum(p.online for p in peers)
    parts = [f"{online}/{len(peers)} peers online"]
    if plan is not None:
        parts.append(f"split {plan.describe()}" + (" (loaded)" if plan == applied else " (not loaded)"))
    return " | ".join(parts)


def _forecast_view(view: PeerView) -> PeerView:
    # A health poll refreshes a peer's age, round-trip time and job count; the forecast reads none of
    # them, so they must not make it look changed.
    return replace(view, seen=None, rtt_ms=None, jobs=None)


class Dashboard:
    """The dashboard's state, one per app. The app changes it (through its methods, or plain attributes such
    as ``plan`` and ``settings``), then calls :meth:`derive` once and shows the result."""

    def __init__(self, settings: GenerateSettings = GenerateSettings(), *, demo: bool = False,
                 key_note: str | None = None, clock: Callable[[], float] = time.time) -> None:
        """``demo``: the peers are the demo's own daemons, still starting; their split loads by itself."""
        self.clock = clock
        self.demo = demo
        self.key_note = key_note
        self.peers: tuple[PeerView, ...] = ()
        self.plan: SplitPlan | None = None
        self.applied: SplitPlan | None = None  # the plan last loaded onto the peers
        self.loading: tuple[tuple[str, int, int], ...] = ()  # (label, blocks done, blocks) while loading
        self.runs: tuple[RunRecord, ...] = ()
        self.settings = settings
        self.form_error: str | None = None  # the Generate form's, while its fields do not parse
        self.text_encoder: str | None = None  # label of the peer that encodes prompts; None: the head
        self.speeds = splitting.BlockSpeeds()
        self.links = splitting.LinkBook()
        self.telemetry = TelemetryStore(clock)
        self.images: dict[int, bytes] = {}
        self.active_run: int | None = None
        self.discovery_note = ""
        self.starting: str | None = "starting the demo daemons on loopback..." if demo else None
        self.next_run = 1
        # Derived by derive():
        self.forecast: splitting.Forecast | None = None
        self.status: tuple[str, str] = ("", "")
        self.banner = ""
        self._sources: dict[str, frozenset[str]] = {}
        self._hints: dict[str, dict[str, str]] = {}
        self._auto_apply = demo
        self._active_plan: SplitPlan | None = None
        self._forecast_inputs: tuple | None = None
        # The last proposal and the online peers it was made over: a plan equal to it follows the peers
        # (proposed again when they change); an edited one stays as the user left it.
        self._proposed: SplitPlan | None = None
        self._proposed_over: frozenset[PeerAddress] = frozenset()

    # --- peers -----------------------------------------------------------------------------------

    def peer(self, label: str | None) -> PeerView | None:
        return next((p for p in self.peers if p.label == label), None)

    def peer_by_address(self, address: PeerAddress) -> PeerView | None:
        return next((p for p in self.peers if p.address == address), None)

    def knows(self, label: str) -> bool:
        """Whether ``label`` is a peer of this dashboard (a late report of a removed one is not)."""
        return label in self._sources

    def add_peer(self, label: str, address: PeerAddress, source: str, hints: Mapping[str, str] | None = None) -> PeerView:
        """A new peer, ``label`` as the client named it; not yet connected."""
        self._sources[label] = frozenset({source})
        self._hints[label] = dict(hints or {})
        return self.update_peer(PeerView(label, address))

    def mention_peer(self, label: str, source: str, hints: Mapping[str, str] | None = None) -> PeerView:
        """A known peer found again (by mDNS, by hand, by the demo): remember how, and its new hints."""
        self._sources[label] = self._sources[label] | {source}
        self._hints[label] = {**self._hints.get(label, {}), **(hints or {})}
        return self.update_peer(self.peer(label))

    def update_peer(self, view: PeerView) -> PeerView:
        """The latest view of a peer (from its monitor), with how it came to be known."""
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
        return view

    def remove_peer(self, label: str) -> tuple[PeerView, frozenset[str]] | None:
        """Forget a peer and its telemetry; its view and how it was known, or None if it was not."""
        view = self.peer(label)
        if view is None:
            return None
        self.peers = tuple(p for p in self.peers if p.label != label)
        self.telemetry.forget(label)
        self._hints.pop(label, None)
        return view, self._sources.pop(label, frozenset())

    def vanished(self, address: PeerAddress | None) -> str | None:
        """mDNS lost ``address``: the label to remove if mDNS was its only source and it is offline."""
        view = self.peer_by_address(address) if address else None
        if view is not None and self._sources.get(view.label) == frozenset({"mdns"}) and not view.online:
            return view.label
        return None

    # --- the split -------------------------------------------------------------------------------

    def preset(self) -> ModelPreset | None:
        """The model the online peers serve (None: none online, or they disagree)."""
        try:
            return splitting.plan_preset(self.peers)
        except PlanError:
            return None

    def resolved_size(self) -> tuple[int, int] | None:
        """The image size the next run uses: the settings', else the model's default."""
        preset = self.preset()
        if preset is None:
            return None
        s = self.settings
        return (s.width or preset.default_size, s.height or preset.default_size)

    def propose(self) -> SplitPlan:
        """A proposal over the online peers, made the plan (PlanError says why there is none)."""
        self._proposed_over = frozenset(p.address for p in self.peers if p.online)
        preset, size = splitting.plan_preset(self.peers), self.resolved_size()
        self._proposed = splitting.propose_plan(self.peers, splitting.tokens_for(preset, *size), self.speeds)
        self.plan = self._proposed
        return self.plan

    def propose_split(self) -> Notice:
        """The user asked for a proposal (p): make it the plan, and say what it is or why there is none."""
        try:
            plan = self.propose()
        except PlanError as exc:
            return Notice(str(exc), "No split proposed", "error")
        return Notice(f"proposed {plan.describe()}")

    def split_problems(self) -> tuple[str, ...]:
        """Why the plan cannot run as it is (empty: it can, as far as the forecast knows)."""
        return self.forecast.problems if self.forecast is not None else ()

    def check_split(self) -> Notice:
        """What checking the split (v) tells the user."""
        if self.plan is None:
            return Notice("no split to check: press p to propose one", severity="warning")
        problems = self.split_problems()
        if problems:
            return Notice("\n".join(problems), "The split cannot run", "error")
        return Notice(f"{self.plan.describe()} is valid and fits", "Split OK")

    def ready_split(self, doing: str) -> tuple[bool, list[Notice]]:
        """Whether the split can be loaded or run now (``doing`` it: "load", "generate with"), proposing
        one first where there is none, and what to tell the user either way."""
        notices = []
        if self.plan is None:
            notices.append(self.propose_split())
            if self.plan is None:
                return False, notices
            notices += self.derive()  # the new plan's forecast says whether it can run
        problems = self.split_problems()
        if problems:
            return False, [*notices, Notice("\n".join(problems), f"Cannot {doing} this split", "error")]
        return True, notices

    def generation_blocker(self) -> Notice | None:
        """Why a generation (ctrl+g) cannot start now, before the split is looked at; None: it can."""
        if self.active_run is not None:
            return Notice("a generation is already running (Esc outside a form field cancels it)", severity="warning")
        if self.form_error:
            return Notice(self.form_error, "Fix the form first", "error", section="generate")
        if self.preset() is None:
            return Notice(next_step(self.peers, None, None, ()), "Cannot generate yet", "error")
        return None

    def text_encoder_choices(self) -> list[str | None]:
        """Where prompts can be encoded: the head (None), then every other online peer with a text encoder."""
        head = self.plan.stages[0].peer if self.plan is not None else None
        return [None, *(p.label for p in self.peers
                        if p.status is PeerStatus.ONLINE and p.text_encoder and p.address != head)]

    def cycle_text_encoder(self) -> bool:
        """Place the text encoder on the next choice; False when the head is the only one."""
        choices = self.text_encoder_choices()
        if len(choices) == 1 and self.text_encoder is None:
            return False
        at = choices.index(self.text_encoder) if self.text_encoder in choices else 0
        self.text_encoder = choices[(at + 1) % len(choices)]
        return True

    def text_encoder_line(self) -> str:
        """Where the next generation encodes its prompt, in words."""
        head = self.peer_by_address(self.plan.stages[0].peer) if self.plan is not None else None
        placed = self.peer(self.text_encoder)
        if placed is not None and (head is None or placed.address != head.address):
            return (f"Text encoder: on {placed.label} ({placed.address}); the head fetches the prompt's "
                    "embeddings from it (t: change)")
        if head is not None and head.text_encoder is False:
            return (f"Text encoder: the head ({head.label}) has none; press t to place it on a peer that "
                    "has one")
        return "Text encoder: on the head (t: place it on another peer)"

    def text_encoder_address(self, plan: SplitPlan) -> PeerAddress | None:
        """Where ``plan``'s run encodes its prompt when not on its head."""
        placed = self.peer(self.text_encoder)
        return placed.address if placed is not None and placed.address != plan.stages[0].peer else None

    def start_loading(self, plan: SplitPlan, label_of: Callable[[PeerAddress], str]) -> None:
        self.loading = tuple((label_of(s.peer), 0, s.blocks) for s in plan.stages)

    def span_loading(self, label: str, done: int, total: int) -> None:
        self.loading = tuple((label, done, total) if known == label else (known, d, t)
                             for known, d, t in self.loading)

    def split_applied(self, plan: SplitPlan) -> None:
        """``plan`` is loaded on the peers."""
        self.applied = plan
        self.loading = ()

    def loading_failed(self) -> None:
        self.loading = ()

    # --- runs ------------------------------------------------------------------------------------

    def load_history(self, past: Sequence[RunRecord]) -> None:
        """Runs of earlier sessions, read back from the history file."""
        if past:
            self.runs = tuple(past)
            self.next_run = max(r.id for r in past) + 1

    def start_run(self) -> tuple[RunRecord, SplitPlan]:
        """A run of the current settings on the current plan (the caller checked that it can run)."""
        preset, plan, s = self.preset(), self.plan, self.settings
        width, height = self.resolved_size()
        params = GenerationParams(s.prompt, s.seed, width, height, s.steps or preset.default_steps,
                                  preset.default_guidance if s.guidance is None else s.guidance)
        record = RunRecord(self.next_run, self.clock(), params, plan.describe(), codec=s.codec)
        self.next_run += 1
        self.active_run, self._active_plan = record.id, plan
        self.runs = (*self.runs, record)
        return record, plan

    def _update_run(self, run_id: int, change: Callable[[RunRecord], RunRecord]) -> RunRecord | None:
        runs = list(self.runs)
        for i, run in enumerate(runs):
            if run.id == run_id:
                runs[i] = change(run)
                self.runs = tuple(runs)
                return runs[i]
        return None

    def run_event(self, run_id: int, event: Event) -> RunRecord | None:
        """One progress event of a run: its measurements are folded in first, so what is derived next
        already counts them."""
        run = self._run(run_id)
        match event:
            case Prepared(stages=stages):
                self.links.observe_prepared(stages)
            case Step() if run is not None:
                self.speeds.observe_step(run.stages, event)
                self.links.observe_hops(run.stages, event, {str(p.address): p.caps for p in self.peers})
        return self._update_run(run_id, lambda r: run_log.apply_event(r, event))

    def run_done(self, run_id: int, png: bytes, summary: dict, path: Path | None) -> RunRecord | None:
        """The run finished with its image (the split it ran on is now loaded on the peers)."""
        self.images[run_id] = png
        for old in sorted(self.images)[:-IMAGES_KEPT]:
            del self.images[old]
        self.active_run = None
        self.applied = self._active_plan
        return self._update_run(run_id, lambda r: run_log.finish(r, summary, path))

    def run_ended(self, state: RunState, message: str) -> RunRecord | None:
        """The active run stopped without an image (cancelled or failed); its record, if there was one."""
        run_id, self.active_run = self.active_run, None
        if run_id is None:
            return None
        return self._update_run(run_id, lambda r: run_log.fail(r, state, message))

    def _run(self, run_id: int) -> RunRecord | None:
        return next((r for r in self.runs if r.id == run_id), None)

    def worker_failed(self, group: str, error: BaseException | None) -> tuple[Notice, RunRecord | None]:
        """A worker of ``group`` failed with ``error``: what follows (the run failed, the load or the demo
        stopped), what to tell the user, and the record of the run that failed, if one did."""
        text = describe_error(error, self.peers)
        run = None
        if group == "generate":
            run = self.run_ended(RunState.FAILED, text)
        elif group == "apply":
            self.loading_failed()
        elif group == "demo":
            self.starting = f"the demo daemons did not start: {text}"
        return Notice(text, FAILURE_TITLES.get(group, "Error"), "error"), run

    # --- what follows from it --------------------------------------------------------------------

    def derive(self) -> list[Notice]:
        """Bring the derived state up to date after a change: proposal, forecast, status line, banner.

        Returns what the user should be told about changes made here (a split proposed again)."""
        notices = self._auto_propose()
        size = self.resolved_size()
        inputs = (self.plan, tuple(_forecast_view(p) for p in self.peers), size, self.settings.codec,
                  self.speeds.revision, self.links.revision)
        if inputs != self._forecast_inputs:
            self._forecast_inputs = inputs
            self.forecast = (splitting.forecast(self.plan, {p.address: p for p in self.peers}, *size, self.speeds,
                                                self.links, self.settings.codec)
                             if self.plan is not None and size is not None else None)
        self.status = (summary(self.peers, self.plan, self.applied),
                       next_step(self.peers, self.plan, self.applied, self.runs, self.starting))
        self.banner = self._banner_text()
        return notices

    def take_auto_apply(self) -> bool:
        """True once, when the demo's split is ready to be loaded by itself (every peer online, it fits)."""
        if (self._auto_apply and self.plan is not None and self.forecast is not None and self.forecast.ok
                and all(p.online for p in self.peers)):
            self._auto_apply = False
            return True
        return False

    def _auto_propose(self) -> list[Notice]:
        """Propose a split by itself once the peers have answered, so the Split screen is never empty,
        and again when the online peers change, until the user proposes or edits one."""
        if any(p.status is PeerStatus.CONNECTING for p in self.peers):
            return []
        stale = self.plan is not None and any(self.peer_by_address(s.peer) is None for s in self.plan.stages)
        online = frozenset(p.address for p in self.peers if p.online)
        following = self.plan is not None and self.plan == self._proposed and online != self._proposed_over
        if not (self.plan is None or stale or following):
            return []
        before = self.plan
        try:
            self.propose()
        except PlanError:
            self.plan = None
        if before is not None and self.plan != before:
            return [Notice(f"the online peers changed: the split is now {self.plan.describe() if self.plan else 'none'}",
                           "Split proposed again")]
        return []

    def _banner_text(self) -> str:
        if self.starting:
            return self.starting
        lines = []
        if self.demo:
            lines.append("Demo: two meshd daemons on this machine (tiny model, CPU) each hold part of the model. "
                         "ctrl+g generates an image across them; 2 shows the split, 3 the run, 4 telemetry, "
                         "F1 help.")
        if self.key_note:
            lines.append(self.key_note)
        if self.discovery_note:
            lines.append(self.discovery_note)
        if not self.peers:
            lines.append("No peers yet. Press a to add one (HOST:PORT of a meshd), or run `meshtui demo` to try "
                         "two local daemons.")
        return "\n".join(lines)
