"""The dashboard's parts without a screen: settings file, split editing and forecasts, telemetry
history, run records, the half-block image renderer, the command palette's list."""

import io

import pytest
from PIL import Image

from codec import Capabilities
from meshd.errors import ProtocolViolation
from meshd.pipeline.progress import StageInfo
from meshd.pipeline.request import GenerationParams
from meshd.model.presets import PRESETS
from meshd.pipeline.plan import PeerAddress, PlanError, SplitPlan, Stage
from meshd.telemetry.snapshot import GpuSnapshot, HostSnapshot, NodeSnapshot
from meshtui import runs, splitting
from meshtui.events import OtherEvent, from_wire
from meshtui.config import ConfigError, GenerateSettings, TuiConfig, dumps, load_config, save_config
from meshtui.history import TelemetryStore
from meshtui.views import PeerStatus, PeerView
from meshtui.widgets.generate_form import FormError, parse_settings
from meshtui.widgets.image_view import half_blocks

TINY = PRESETS["tiny"]
A, B, C = PeerAddress("10.0.0.1", 7777), PeerAddress("10.0.0.2", 7777), PeerAddress("10.0.0.3", 7777)
CPU_CAPS = Capabilities(device="cpu", cpu_hevc=True, cpu_hevc_reason="libx265 through PyAV")
H200_CAPS = Capabilities(device="cuda:0", gpu_name="NVIDIA H200", nvenc=False, nvenc_reason="no NVENC engine",
                         nvdec=True, nvdec_engines=7, cpu_hevc=False, cpu_hevc_reason="no libx265")


def peer(label, address, free=8 << 30, caps=CPU_CAPS, bandwidth=125e6, **kw) -> PeerView:
    return PeerView(label, address, status=PeerStatus.ONLINE, name=f"box-{label}", preset="tiny", model_id="tiny",
                    model_hash="ab" * 32, dtype="bfloat16", num_blocks=6, free_bytes=free, total_bytes=16 << 30,
                    memory_kind="gpu", caps=caps, bandwidth_bytes_per_s=bandwidth, **kw)


# --- settings file ------------------------------------------------------------------------------


def test_settings_survive_a_round_trip_through_the_toml_file(tmp_path):
    path = tmp_path / "sub" / "meshtui.toml"
    config = TuiConfig(peers=("10.0.0.7:7777", "[fe80::1]:7000"), key_file=tmp_path / "k",
                       images_dir=tmp_path / "img", image_mode="halfblock",
                       generate=GenerateSettings('a "quoted" prompt\nwith ünïcode', 42, 512, 256, 8, 3.5,
                                                 "hevc-qp18"))
    save_config(config, path)
    assert load_config(path) == config


def test_blank_generation_settings_mean_the_model_default_and_are_not_written(tmp_path):
    text = dumps(TuiConfig())
    assert "steps" not in text and "width" not in text
    path = tmp_path / "m.toml"
    path.write_text(text)
    assert load_config(path).generate.steps is None


def test_a_missing_file_gives_defaults_and_a_bad_one_names_the_problem(tmp_path):
    assert load_config(tmp_path / "absent.toml") == TuiConfig()
    bad = tmp_path / "bad.toml"
    bad.write_text("peers = 'not a list'\n")
    with pytest.raises(ConfigError, match="peers must be a list"):
        load_config(bad)
    bad.write_text("[generate]\nsteps = 'four'\n")
    with pytest.raises(ConfigError, match="steps"):
        load_config(bad)
    bad.write_text("colour = 'red'\n")
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        load_config(bad)


# --- the split ----------------------------------------------------------------------------------


def plan_of(*stages) -> SplitPlan:
    return SplitPlan(tuple(Stage(address, s, e, codec, label) for address, label, s, e, codec in stages))


def test_moving_a_boundary_grows_one_stage_and_shrinks_the_next_but_never_empties_one():
    plan = plan_of((A, "A", 0, 2, "auto"), (B, "B", 2, 6, "auto"))
    moved = splitting.move_boundary(plan, 0, 1)
    assert [(s.start, s.end) for s in moved.stages] == [(0, 3), (3, 6)]
    squeezed = splitting.move_boundary(plan, 0, 10)
    assert [(s.start, s.end) for s in squeezed.stages] == [(0, 5), (5, 6)]
    assert squeezed.validate(6)
    with pytest.raises(PlanError, match="last stage"):
        splitting.move_boundary(plan, 1, 1)


def test_reordering_swaps_peers_and_keeps_ranges_and_link_codecs_in_place():
    plan = plan_of((A, "A", 0, 2, "fp8"), (B, "B", 2, 6, "auto"))
    swapped = splitting.move_stage(plan, 0, 1)
    assert [(s.label, s.start, s.end, s.codec) for s in swapped.stages] == [("B", 0, 2, "fp8"), ("A", 2, 6, "auto")]
    assert splitting.move_stage(plan, 1, 1) == plan


def test_link_codec_cycles_through_the_choices_and_the_last_stage_has_no_link():
    plan = plan_of((A, "A", 0, 2, "auto"), (B, "B", 2, 6, "auto"))
    seen = []
    for _ in splitting.CODEC_CHOICES:
        plan = splitting.cycle_codec(plan, 0)
        seen.append(plan.stages[0].codec)
    assert seen == [*splitting.CODEC_CHOICES[1:], "auto"]
    with pytest.raises(PlanError, match="returns to the head"):
        splitting.cycle_codec(plan, 1)


def test_a_proposal_uses_every_online_peer_and_gives_the_measured_faster_one_more_blocks():
    peers = [peer("A", A), peer("B", B), PeerView("C", C, status=PeerStatus.UNREACHABLE)]
    tokens = splitting.tokens_for(TINY, 64, 64)
    even = splitting.propose_plan(peers, tokens, splitting.BlockSpeeds())
    assert [s.label for s in even.stages] == ["A", "B"]
    speeds = splitting.BlockSpeeds()
    speeds.observe(str(A), 2, 100.0)  # A is ten times slower per block than B
    speeds.observe(str(B), 2, 10.0)
    skewed = splitting.propose_plan(peers, tokens, speeds)
    assert skewed.stages[1].blocks > even.stages[1].blocks


def test_a_proposal_never_exceeds_free_memory_and_says_what_is_missing():
    peers = [peer("A", A, free=1 << 20), peer("B", B, free=1 << 20)]
    with pytest.raises(PlanError, match="does not fit"):
        splitting.propose_plan(peers, splitting.tokens_for(TINY, 64, 64), splitting.BlockSpeeds())


def test_peers_serving_different_models_cannot_be_planned_together():
    other = PeerView("B", B, status=PeerStatus.ONLINE, preset="tiny", model_id="tiny-other", model_hash="cd" * 32)
    with pytest.raises(PlanError, match="different models"):
        splitting.plan_preset([peer("A", A), other])


def test_the_same_file_at_another_precision_is_another_model_for_the_plan_as_for_the_head():
    # The head refuses a stage holding the same file at another precision; the dashboard must not
    # propose such a plan (found by review: it compared preset and hash only).
    fp8 = peer("B", B, weights="fp8 e4m3fn per-row 8, bf16 3")
    with pytest.raises(PlanError, match="different models.*weights fp8"):
        splitting.plan_preset([peer("A", A, weights="bf16 11"), fp8])
    assert splitting.plan_preset([peer("A", A, weights="bf16 11"), peer("B", B, weights="bf16 11")]) is TINY


def test_the_forecast_predicts_memory_compute_and_link_time_from_measurements():
    peers = {A: peer("A", A), B: peer("B", B)}
    plan = plan_of((A, "A", 0, 2, "auto"), (B, "B", 2, 6, "auto"))
    speeds = splitting.BlockSpeeds()
    links = splitting.LinkBook()
    before = splitting.forecast(plan, peers, 64, 64, speeds, links)
    assert before.ok and before.step_ms is None  # nothing measured yet
    assert before.stages[0].need_bytes > before.stages[1].need_bytes  # the head also holds embedders + VAE
    assert before.stages[0].link.measured is False  # this client's bandwidth stands in
    links.observe_prepared(StageInfo.many_from_wire([{"peer": str(A), "link": {"to": str(B), "bandwidth_bps": 1.25e9,
                                                                                "rtt_ms": 0.2}}]))
    speeds.observe_step([(str(A), 0, 2), (str(B), 2, 6)],
                        from_wire({"kind": "step", "step": 1, "steps": 1,
                                   "passes": [{"compute_ms": 4.0, "hops": [{"compute_ms": 6.0}]}]}))
    after = splitting.forecast(plan, peers, 64, 64, speeds, links)
    assert after.stages[0].compute_ms == pytest.approx(4.0)
    assert after.stages[1].compute_ms == pytest.approx(6.0)
    assert after.stages[0].link.measured and after.stages[0].link.bandwidth_bytes_per_s == 1.25e9
    assert after.step_ms == pytest.approx(10.0 + after.stages[0].link.ms)
    moved = splitting.forecast(splitting.move_boundary(plan, 0, 1), peers, 64, 64, speeds, links)
    assert moved.stages[0].compute_ms == pytest.approx(6.0)  # 3 blocks at A's 2 ms per block


def test_a_same_host_link_over_cuda_ipc_has_no_wire_and_a_forced_codec_leaves_it():
    peers = {A: peer("A", A), B: peer("B", B)}
    links = splitting.LinkBook()
    links.observe_prepared(StageInfo.many_from_wire([{"peer": str(A), "link": {"to": str(B), "transport": "cuda-ipc",
                                                                                "codec": "cuda-ipc", "why": "same host"}}]))
    plan = plan_of((A, "A", 0, 2, "auto"), (B, "B", 2, 6, "auto"))
    link = splitting.forecast(plan, peers, 64, 64, splitting.BlockSpeeds(), links).stages[0].link
    assert (link.codec, link.ms, link.wire_bytes) == ("cuda-ipc", 0.0, 0)
    forced = splitting.forecast(splitting.cycle_codec(splitting.cycle_codec(plan, 0), 0), peers, 64, 64,
                                splitting.BlockSpeeds(), links).stages[0].link
    assert forced.codec == "fp8" and forced.wire_bytes < link_bytes(peers)
    by_run = splitting.forecast(plan, peers, 64, 64, splitting.BlockSpeeds(), splitting.LinkBook(), "u8")
    assert by_run.stages[0].link.codec == "u8"  # the run's codec fills the links the plan leaves on auto


def link_bytes(peers) -> int:
    return splitting.tokens_for(TINY, 64, 64) * TINY.hidden * 2


def test_the_forecast_names_every_reason_a_plan_cannot_run():
    peers = {A: peer("A", A, free=1 << 20), B: peer("B", B, caps=H200_CAPS), C: PeerView("C", C)}
    plan = plan_of((A, "A", 0, 2, "hevc-lossless"), (B, "B", 2, 4, "auto"), (C, "C", 4, 6, "auto"))
    problems = " | ".join(splitting.forecast(plan, peers, 64, 64, splitting.BlockSpeeds(),
                                             splitting.LinkBook()).problems)
    assert "A needs" in problems and "GiB of VRAM" in problems
    assert "C is connecting" in problems
    forced = plan_of((B, "B", 0, 3, "hevc-qp18"), (A, "A", 3, 6, "auto"))
    problems = splitting.forecast(forced, {A: peer("A", A), B: peer("B", B, caps=H200_CAPS)}, 64, 64,
                                  splitting.BlockSpeeds(), splitting.LinkBook()).problems
    assert problems == ("B cannot encode hevc-qp18 (no NVENC engine)",)


def test_the_forecast_notes_peers_that_compute_fp8_layers_by_different_paths():
    native = "fp8: native fp8 matmul (torch._scaled_mm, activations scaled per token): compute capability 8.9"
    upcast = "fp8: per-layer dequantise then matmul in the compute dtype: compute capability 8.6 < 8.9"
    plan = plan_of((A, "A", 0, 3, "auto"), (B, "B", 3, 6, "auto"))
    alike = splitting.forecast(plan, {A: peer("A", A, compute=native), B: peer("B", B, compute=native)}, 64, 64,
                               splitting.BlockSpeeds(), splitting.LinkBook())
    assert alike.notes == () and alike.ok
    mixed = splitting.forecast(plan, {A: peer("A", A, compute=native), B: peer("B", B, compute=upcast)}, 64, 64,
                               splitting.BlockSpeeds(), splitting.LinkBook())
    assert mixed.ok and len(mixed.notes) == 1 and mixed.notes[0].startswith("peers compute fp8 layers differently (A:")


# --- telemetry history --------------------------------------------------------------------------


def gpu_snapshot(util, enc=None) -> NodeSnapshot:
    gpu = GpuSnapshot(uuid="GPU-1", index=0, name="RTX 4090", gpu_util_pct=util, encoder_util_pct=enc,
                      vram_used_bytes=4 << 30, vram_total_bytes=24 << 30)
    return NodeSnapshot(node_id="n1", time=0.0, monotonic=0.0, gpus=(gpu,), host=HostSnapshot(cpu_pct=10.0))


def test_unsupported_readings_stay_na_and_a_gap_keeps_the_last_good_value_with_its_time():
    now = [100.0]
    store = TelemetryStore(lambda: now[0])
    store.add("A", gpu_snapshot(50.0), "daemon")
    now[0] = 101.0
    store.add("A", gpu_snapshot(None), "daemon")
    series = store.nodes["A"].gpus["GPU-1"].series
    assert series["encoder_util_pct"].supported is False and series["encoder_util_pct"].values() == []
    util = series["gpu_util_pct"]
    assert util.current is None and util.last_good == (100.0, 50.0) and util.values() == [50.0]
    now[0] = 130.0
    assert store.nodes["A"].age(now[0]) == pytest.approx(29.0)


# --- runs ---------------------------------------------------------------------------------------


def test_a_run_record_follows_the_head_events_and_names_every_hop():
    record = runs.RunRecord(1, 1000.0, GenerationParams("p", 3, 64, 64, 2, 1.0), "A:0-1 -> B:2-3 -> C:4-5")
    record = runs.apply_event(record, from_wire({"kind": "queued", "position": 1}))
    record = runs.apply_event(record, from_wire({"kind": "prepared", "plan": "A:0-1 -> B:2-3 -> C:4-5", "stages": [
        {"peer": str(A), "blocks": [0, 2]}, {"peer": str(B), "blocks": [2, 4]}, {"peer": str(C), "blocks": [4, 6]}]}))
    assert record.stages == ((str(A), 0, 2), (str(B), 2, 4), (str(C), 4, 6))
    step = {"kind": "step", "step": 1, "steps": 2, "ms": 12.5, "passes": [{"compute_ms": 3.0, "hops": [
        {"from": "a", "node": "b", "codec": "fp8", "bytes": 100, "encode_ms": 0.1, "wire_ms": 0.2, "decode_ms": 0.3,
         "compute_ms": 4.0, "error": {"cosine": 0.9995, "rel_l2": 0.01, "max_abs": 0.1}},
        {"node": "c", "codec": "raw", "bytes": 200, "compute_ms": 5.0}]}]}
    record = runs.apply_event(record, from_wire(step))
    assert record.phase == "step 1/2" and record.done_steps == 1
    first, second = record.steps[0].hops
    assert (first.link, first.cosine, first.bytes) == ("a→b", 0.9995, 100)
    assert second.link == "b→c" and second.cosine is None
    # A step event the head garbled never reaches the record; a newer daemon's new kind leaves it as it is.
    with pytest.raises(ProtocolViolation, match="step event: field 'step' must be an integer"):
        from_wire({"kind": "step", "step": "bogus"})
    newer = from_wire({"kind": "warming", "op": "event", "id": 3, "cache": "hot"})
    assert newer == OtherEvent("warming", {"cache": "hot"}) and runs.apply_event(record, newer) == record


def test_finished_runs_are_kept_in_a_history_file_that_survives_bad_lines(tmp_path):
    record = runs.RunRecord(7, 1000.0, GenerationParams("a fox", 3, 64, 64, 4, 1.0), "A:0-5", codec="fp8")
    done = runs.finish(record, {"total_s": 1.5, "steps": []}, tmp_path / "x.png")
    runs.append_history(tmp_path, done)
    with open(tmp_path / runs.HISTORY_FILE, "a") as f:
        f.write("{not json\n")
    (loaded,) = runs.load_history(tmp_path)
    assert loaded.id == 7 and loaded.params == record.params and loaded.state is runs.RunState.DONE
    assert loaded.total_s == 1.5 and loaded.path == tmp_path / "x.png" and loaded.codec == "fp8"


def test_history_written_before_the_codec_left_the_params_still_loads(tmp_path):
    old = ('{"hops": [], "id": 3, "params": {"codec": "u8", "guidance": 1.0, "height": 64, "prompt": "a fox", '
           '"seed": 2, "steps": 4, "width": 64}, "path": null, "phase": "done", "plan": "A:0-5", "stages": [], '
           '"started": 1000.0, "state": "done", "total_s": 1.0, "error": null}\n')
    (tmp_path / runs.HISTORY_FILE).write_text(old)
    (loaded,) = runs.load_history(tmp_path)
    assert loaded.params == GenerationParams("a fox", 2, 64, 64, 4, 1.0) and loaded.codec == "u8"


def test_saved_images_never_overwrite_each_other(tmp_path):
    record = runs.RunRecord(1, 1000.0, GenerationParams("p", 5, 64, 64, 4, 1.0), "A:0-5")
    first = runs.save_png(tmp_path, b"one", record)
    second = runs.save_png(tmp_path, b"two", record)
    assert first != second and first.read_bytes() == b"one" and second.read_bytes() == b"two"
    assert "seed5" in first.name


# --- the form -----------------------------------------------------------------------------------


def form(**values):
    base = {"prompt": "p", "seed": "1", "size": "", "steps": "", "guidance": ""}
    return {**base, **values}


def test_the_form_reads_sizes_and_defaults_and_refuses_what_the_model_cannot_do():
    assert parse_settings(form(size="64x32", steps="8", guidance="2.5"), "fp8", TINY) == \
        GenerateSettings("p", 1, 64, 32, 8, 2.5, "fp8")
    assert parse_settings(form(), "auto", TINY).width is None
    for bad, message in ((form(size="63"), "multiples of 4"), (form(steps="0"), "steps"),
                         (form(guidance="x"), "guidance"), (form(size="big"), "WxH")):
        with pytest.raises(FormError, match=message):
            parse_settings(bad, "auto", TINY)


# --- the image ----------------------------------------------------------------------------------


def test_half_blocks_keep_the_aspect_ratio_and_put_two_pixels_in_a_cell():
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    for x in range(64):
        image.putpixel((x, 31), (0, 0, 255))
    text = half_blocks(image, 40, 40)
    lines = text.plain.split("\n")
    assert len(lines) == 10 and all(len(line) == 40 for line in lines)  # 40x20 pixels
    last = text.spans[-1].style
    assert last.color.triplet.red > 200  # the upper pixel of the last cell is red
    assert last.bgcolor.triplet.blue > last.bgcolor.triplet.red  # the lower one comes from the blue bottom row


def test_a_png_from_the_head_decodes_into_the_renderer():
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format="PNG")
    text = half_blocks(Image.open(io.BytesIO(buf.getvalue())), 8, 8)
    assert text.plain.count("▀") == 32  # 8x8 pixels, two per cell


def test_link_rates_from_health_polls_and_a_counter_reset_is_not_zero():
    from meshd.node.info import NodeInfo
    from meshtui.workers import InfoTelemetry

    telemetry = InfoTelemetry()
    info = NodeInfo.from_wire({"node_id": "n", "memory": {"kind": "host", "free": 1, "total": 2}})
    first = telemetry.snapshot(info, [{"peer": "b", "bytes_sent": 1000, "bytes_received": 0}], at=10.0)
    assert first.links[0].sent_bytes_per_s is None  # one reading is no rate
    second = telemetry.snapshot(info, [{"peer": "b", "bytes_sent": 3000, "bytes_received": 500}], at=12.0)
    assert (second.links[0].sent_bytes_per_s, second.links[0].received_bytes_per_s) == (1000.0, 250.0)
    restarted = telemetry.snapshot(info, [{"peer": "b", "bytes_sent": 10, "bytes_received": 0}], at=13.0)
    assert restarted.links[0].sent_bytes_per_s is None  # n/a, never a made-up 0


def test_the_demo_overrides_remembered_settings_only_with_the_flags_the_user_gave():
    import argparse

    from meshtui.cli import _add_generation_args, explicit_generation_args

    parser = argparse.ArgumentParser()
    _add_generation_args(parser)
    assert explicit_generation_args(parser.parse_args([])) == {}
    given = explicit_generation_args(parser.parse_args(["--seed", "3", "--size", "512x256", "--codec", "u8"]))
    assert given == {"seed": 3, "size": (512, 256), "codec": "u8"}
