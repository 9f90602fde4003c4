"""The dashboard's state as data, without a screen: what it derives, when, and from which observations."""

from dataclasses import replace

import pytest

from codec import Capabilities
from meshd.errors import PeerLost
from meshd.model.presets import PRESETS
from meshd.pipeline.plan import PeerAddress, PlanError
from meshtui import splitting, state
from meshtui.config import GenerateSettings
from meshtui.events import Prepared, Step, from_wire
from meshtui.runs import RunState
from meshtui.state import Dashboard
from meshtui.views import PeerStatus, PeerView

TINY = PRESETS["tiny"]
A, B = PeerAddress("10.0.0.1", 7777), PeerAddress("10.0.0.2", 7777)
CPU_CAPS = Capabilities(device="cpu", cpu_hevc=True, cpu_hevc_reason="libx265 through PyAV")


def online(label, address, free=8 << 30, **kw) -> PeerView:
    return PeerView(label, address, status=PeerStatus.ONLINE, name=f"box-{label}", preset="tiny", model_id="tiny",
                    model_hash="ab" * 32, dtype="bfloat16", num_blocks=6, free_bytes=free, total_bytes=16 << 30,
                    memory_kind="gpu", caps=CPU_CAPS, bandwidth_bytes_per_s=125e6, rtt_ms=0.5, seen=100.0, **kw)


@pytest.fixture
def forecasts(monkeypatch):
    """The real forecast, counted: each call appends the plan it was made for."""
    made = []
    real = splitting.forecast

    def counted(plan, *args, **kwargs):
        made.append(plan)
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(state.splitting, "forecast", counted)
    return made


def two_peers(**kw) -> Dashboard:
    dash = Dashboard(GenerateSettings(width=64, height=64), clock=lambda: 1000.0, **kw)
    for label, address in (("A", A), ("B", B)):
        dash.add_peer(label, address, "manual")
        dash.update_peer(online(label, address))
    dash.derive()
    return dash


def prepared(bandwidth_bps: float) -> Prepared:
    return from_wire({"kind": "prepared", "plan": "A:0-2 -> B:3-5", "stages": [
        {"peer": str(A), "blocks": [0, 3], "link": {"to": str(B), "bandwidth_bps": bandwidth_bps, "rtt_ms": 0.3,
                                                    "codec": "raw", "why": "raw: fastest"}},
        {"peer": str(B), "blocks": [3, 6]}]})


def step(n: int, head_ms: float, stage_ms: float) -> Step:
    return from_wire({"kind": "step", "step": n, "steps": 4, "ms": head_ms + stage_ms,
                      "passes": [{"compute_ms": head_ms, "hops": [{"codec": "raw", "bytes": 100, "raw_bytes": 100,
                                                                   "compute_ms": stage_ms}]}]})


def test_the_peers_answering_get_a_proposed_split_and_its_forecast():
    dash = two_peers()
    assert [s.label for s in dash.plan.stages] == ["A", "B"]
    assert dash.forecast is not None and dash.forecast.ok
    assert dash.status == ("2/2 peers online | split A:0-2 -> B:3-5 (not loaded)",
                           "ctrl+g generates (the split is loaded first), or a on Split (2) loads it now")


def test_a_health_poll_that_changes_nothing_the_forecast_reads_does_not_recompute_it(forecasts):
    dash = two_peers()
    forecasts.clear()
    for i in range(5):  # five polls: a new age and round-trip time each time, nothing else
        dash.update_peer(replace(dash.peer("B"), seen=200.0 + i, rtt_ms=0.4 + i / 10))
        dash.derive()
    assert forecasts == []
    dash.update_peer(replace(dash.peer("B"), free_bytes=4 << 30))  # free memory moved: it matters
    dash.derive()
    assert len(forecasts) == 1
    assert dash.forecast.stages[1].available_bytes < 8 << 30


def test_the_forecast_already_counts_the_event_that_just_arrived(forecasts):
    dash = two_peers()
    record, _ = dash.start_run()
    dash.derive()
    assert dash.forecast.stages[0].link.measured is False  # this client's own bandwidth stands in
    dash.run_event(record.id, prepared(1.25e9))
    dash.derive()
    link = dash.forecast.stages[0].link
    assert link.measured is True and link.bandwidth_bytes_per_s == 1.25e9  # the head's measurement, at once
    assert dash.forecast.stages[1].compute_ms is None
    dash.run_event(record.id, step(1, 6.0, 9.0))
    dash.derive()
    head, stage = dash.forecast.stages
    assert head.compute_ms == pytest.approx(6.0) and stage.compute_ms == pytest.approx(9.0)


def test_a_finished_run_derives_the_forecast_at_most_once_and_loads_its_split(forecasts):
    dash = two_peers()
    record, plan = dash.start_run()
    dash.run_event(record.id, prepared(1.25e9))
    dash.run_event(record.id, step(1, 6.0, 9.0))
    dash.derive()
    forecasts.clear()
    done = dash.run_done(record.id, b"png", {"total_s": 1.5}, None)
    dash.derive()
    assert len(forecasts) <= 1
    assert done.state is RunState.DONE and dash.active_run is None
    assert dash.applied == plan and dash.images == {record.id: b"png"}
    assert dash.status[1] == "ready: ctrl+g generates with the settings on Generate (3)"


def test_a_run_takes_the_models_defaults_where_the_settings_leave_them_blank():
    dash = two_peers()
    record, plan = dash.start_run()
    assert (record.params.width, record.params.height) == (64, 64)
    assert record.params.steps == TINY.default_steps and record.params.guidance == TINY.default_guidance
    assert record.plan == plan.describe() and dash.runs[-1] is record
    assert dash.run_ended(RunState.CANCELLED, "cancelled by the user").state is RunState.CANCELLED
    assert dash.run_ended(RunState.FAILED, "again") is None  # nothing was running any more


def test_a_proposal_follows_the_online_peers_until_the_user_edits_it():
    dash = two_peers()
    dash.update_peer(replace(dash.peer("B"), status=PeerStatus.UNREACHABLE, error="no answer"))
    notices = dash.derive()
    assert dash.plan.describe() == "A:0-5"
    assert notices == [state.Notice("the online peers changed: the split is now A:0-5", "Split proposed again")]
    dash.update_peer(online("B", B))
    assert dash.derive() and dash.plan.describe() == "A:0-2 -> B:3-5"
    dash.plan = splitting.move_boundary(dash.plan, 0, 1)  # the user's own split stays as it is
    dash.update_peer(replace(dash.peer("B"), status=PeerStatus.UNREACHABLE, error="no answer"))
    assert dash.derive() == [] and dash.plan.describe() == "A:0-3 -> B:4-5"
    assert dash.split_problems() == ("B is unreachable: no answer",)


def test_the_demo_loads_its_split_by_itself_once_every_peer_is_online():
    dash = Dashboard(GenerateSettings(width=64, height=64), demo=True)
    assert dash.derive() == [] and dash.banner == "starting the demo daemons on loopback..."
    dash.starting = None
    dash.add_peer("A", A, "demo")
    dash.update_peer(online("A", A))
    dash.add_peer("B", B, "demo")  # still connecting
    dash.derive()
    assert not dash.take_auto_apply()
    dash.update_peer(online("B", B))
    dash.derive()
    assert dash.take_auto_apply() and not dash.take_auto_apply()
    assert dash.banner.startswith("Demo: two meshd daemons")


def test_a_peer_only_mdns_knew_is_dropped_when_it_vanishes_offline_and_one_added_by_hand_is_kept():
    dash = Dashboard()
    dash.add_peer("A", A, "mdns", {"gpu": "4090"})
    dash.add_peer("B", B, "mdns")
    dash.mention_peer("B", "manual", {"name": "lab"})
    assert dash.peer("A").hints == {"gpu": "4090"} and dash.peer("B").sources == {"mdns", "manual"}
    assert dash.vanished(A) == "A" and dash.vanished(B) is None
    dash.update_peer(online("A", A))
    assert dash.vanished(A) is None  # still answering us directly
    view, sources = dash.remove_peer("B")
    assert view.address == B and "manual" in sources and not dash.knows("B") and dash.remove_peer("B") is None


def test_the_text_encoder_cycles_over_the_online_peers_that_have_one():
    dash = Dashboard(GenerateSettings(width=64, height=64))
    for label, address in (("A", A), ("B", B)):
        dash.add_peer(label, address, "manual")
        dash.update_peer(online(label, address, text_encoder=label == "B"))
    dash.derive()
    assert dash.text_encoder_choices() == [None, "B"]
    assert dash.cycle_text_encoder() and dash.text_encoder == "B"
    assert dash.text_encoder_address(dash.plan) == B
    assert dash.text_encoder_line().startswith("Text encoder: on B (10.0.0.2:7777)")
    assert dash.cycle_text_encoder() and dash.text_encoder is None
    assert dash.text_encoder_address(dash.plan) is None


def test_the_forecast_of_a_link_learns_from_the_hops_measured_on_it():
    dash = two_peers()
    dash.plan = replace(dash.plan, stages=(replace(dash.plan.stages[0], codec="u8"), dash.plan.stages[1]))
    record, _ = dash.start_run()
    dash.run_event(record.id, prepared(125e6))
    dash.derive()
    before = dash.forecast.stages[0].link
    hop = {"codec": "u8", "raw_bytes": 1 << 20, "bytes": 1 << 18, "encode_ms": 400.0, "decode_ms": 300.0,
           "compute_ms": 9.0}  # 4x smaller than assumed, and a far slower CPU
    for n in range(1, 11):
        dash.run_event(record.id, from_wire({"kind": "step", "step": n, "steps": 10, "ms": 10.0,
                                             "passes": [{"compute_ms": 6.0, "hops": [hop]}]}))
    dash.derive()
    after = dash.forecast.stages[0].link
    assert after.codec == "u8" and after.wire_bytes < before.wire_bytes / 1.5
    assert after.ms > 10 * before.ms


def test_checking_and_readying_the_split_say_why_it_cannot_run():
    dash = Dashboard(GenerateSettings(width=64, height=64))
    assert dash.check_split() == state.Notice("no split to check: press p to propose one", severity="warning")
    assert dash.ready_split("load") == (False, [state.Notice("no peer is online", "No split proposed", "error")])
    dash.add_peer("A", A, "manual")
    dash.update_peer(online("A", A))
    dash.plan = None  # not derived yet: readying the split proposes one, and its forecast decides
    ready, notices = dash.ready_split("load")
    assert ready and notices == [state.Notice("proposed A:0-5")] and dash.forecast is not None
    assert dash.check_split() == state.Notice("A:0-5 is valid and fits", "Split OK")
    dash.update_peer(online("A", A, free=1 << 20))  # it no longer fits
    dash.derive()
    ready, (notice,) = dash.ready_split("generate with")
    assert not ready and notice.title == "Cannot generate with this split" and notice.severity == "error"
    assert notice.text.startswith("A needs ") and dash.check_split().title == "The split cannot run"


def test_a_generation_is_refused_while_one_runs_or_the_form_does_not_parse():
    assert Dashboard().generation_blocker().title == "Cannot generate yet"  # no peer serves a model
    dash = two_peers()
    assert dash.generation_blocker() is None
    dash.form_error = "steps: must be a whole number"
    assert dash.generation_blocker() == state.Notice("steps: must be a whole number", "Fix the form first", "error",
                                                     section="generate")  # the form is where to fix it
    dash.form_error = None
    dash.start_run()
    assert dash.generation_blocker().text.startswith("a generation is already running")


def test_a_failed_worker_ends_what_it_was_doing_and_names_the_peer_as_the_user_knows_it():
    dash = two_peers()
    record, _ = dash.start_run()
    notice, run = dash.worker_failed("generate", PeerLost(str(B), "stopped answering"))
    assert notice == state.Notice("B (box-B, 10.0.0.2:7777): stopped answering", "Generation failed", "error")
    assert run.id == record.id and run.state is RunState.FAILED and run.error == notice.text
    assert dash.active_run is None
    dash.start_loading(dash.plan, lambda address: dash.peer_by_address(address).label)
    notice, run = dash.worker_failed("apply", PlanError("A:0-9 needs blocks 0-9, the model has 6"))
    assert (notice.title, notice.text, run, dash.loading) == ("Could not load the split",
                                                             "A:0-9 needs blocks 0-9, the model has 6", None, ())
    notice, _ = dash.worker_failed("demo", OSError("no free port"))
    assert dash.starting == "the demo daemons did not start: OSError: no free port"
    assert dash.worker_failed("mystery", None)[0].title == "Error"
