"""The codec policy picks the fastest codec both ends can run above the quality floor."""

import pytest

from codec import Capabilities, CodecError, CodecUnavailable, choose_codec
from codec.policy import TIE_MARGIN, Calibration
from tests.daemons import running_daemon, split_generation

STREAM = 36 * 2**20  # klein-9B joint stream at 1024^2, bf16
GPU_NVENC = Capabilities("cuda:0", "RTX 4090", nvenc=True, nvenc_engines=2, nvdec=True, nvdec_engines=1, cpu_hevc=True)
H200 = Capabilities("cuda:0", "H200", nvenc=False, nvenc_reason="no NVENC", nvdec=True, nvdec_engines=7, cpu_hevc=True)
CPU_ONLY = Capabilities("cpu", cpu_hevc=False, cpu_hevc_reason="no PyAV")
GBIT = 1e9 / 8
PARAMS = {"prompt": "a lighthouse at dawn", "seed": 11, "width": 64, "height": 64, "steps": 2, "guidance": 1.0}


def test_fast_link_sends_raw():
    assert choose_codec(STREAM, 50e9, GPU_NVENC, H200).spec.label == "raw"


def test_gigabit_between_gpus_compresses():
    choice = choose_codec(STREAM, GBIT, GPU_NVENC, H200)
    assert choice.spec.label in ("fp8", "u8", "hevc-lossless")
    raw = next(e for e in choice.considered if e.label == "raw")
    assert choice.estimate.total_ms < raw.total_ms


def test_slow_link_with_nvenc_sender_uses_video():
    choice = choose_codec(STREAM, 100e6 / 8, GPU_NVENC, H200)
    assert choice.spec.name == "hevc"


def test_sender_without_hevc_never_gets_hevc():
    choice = choose_codec(STREAM, 10e6 / 8, CPU_ONLY, H200)
    assert choice.spec.name != "hevc"
    assert any(label.startswith("hevc") and "cannot encode" in why for label, why in choice.excluded)


def test_quality_floor_of_one_allows_only_raw():
    assert choose_codec(STREAM, 10e6, GPU_NVENC, H200, quality_floor=1.0).spec.label == "raw"


def test_lower_floor_admits_lossy_video_on_a_slow_link():
    choice = choose_codec(STREAM, 50e6 / 8, GPU_NVENC, H200, quality_floor=0.99)
    assert choice.spec.label == "hevc-qp18"


def test_forced_codec_is_checked_against_both_ends():
    assert choose_codec(STREAM, GBIT, GPU_NVENC, H200, force="u8").spec.label == "u8"
    with pytest.raises(CodecUnavailable, match="cannot encode hevc"):
        choose_codec(STREAM, GBIT, CPU_ONLY, H200, force="hevc-qp18")
    with pytest.raises(CodecUnavailable, match="cannot decode hevc"):
        choose_codec(STREAM, GBIT, H200, CPU_ONLY, force="hevc-lossless")


def test_chunks_overlap_the_stages():
    one = choose_codec(STREAM, GBIT, GPU_NVENC, H200, force="u8", chunks=1).estimate
    many = choose_codec(STREAM, GBIT, GPU_NVENC, H200, force="u8", chunks=8).estimate
    assert one.total_ms == pytest.approx(one.encode_ms + one.wire_ms + one.decode_ms)
    assert max(many.encode_ms, many.wire_ms, many.decode_ms) <= many.total_ms < one.total_ms


def test_calibration_learns_from_measurements():
    cal = Calibration()
    before = choose_codec(STREAM, GBIT, H200, H200, force="fp8", calibration=cal).estimate.encode_ms
    for _ in range(20):
        cal.observe("fp8", "cuda", "encode", STREAM, 0.5)  # a much slower GPU than assumed
    after = choose_codec(STREAM, GBIT, H200, H200, force="fp8", calibration=cal).estimate.encode_ms
    assert after > 10 * before


def test_no_codec_left_is_an_error():
    with pytest.raises(CodecError, match="quality floor"):
        choose_codec(STREAM, GBIT, H200, H200, quality_floor=1.5)


def test_capabilities_travel_as_plain_data():
    assert Capabilities.from_dict(H200.to_dict()) == H200
    with pytest.raises(ValueError):
        Capabilities.from_dict({"device": "cuda:0", "nvenc": "yes"})


def test_at_equal_cost_the_more_accurate_codec_wins():
    """fp8 and u8 cost the same on a 10 Gbit/s link between GPUs; u8's error is less than half of fp8's."""
    choice = choose_codec(STREAM, 10e9 / 8, H200, H200)
    fp8 = next(e for e in choice.considered if e.label == "fp8")
    assert choice.spec.label == "u8" and choice.estimate.total_ms == pytest.approx(fp8.total_ms, rel=TIE_MARGIN)
    assert "more accurate" in choice.reason


def test_a_clearly_faster_codec_still_beats_a_more_accurate_one():
    cal = Calibration()
    for _ in range(20):  # these activations compress far better with fp8 than assumed
        cal.observe_hop("fp8", H200, H200, STREAM, STREAM // 3, 0.004, 0.004)
    choice = choose_codec(STREAM, 1e9 / 8, H200, H200, calibration=cal)
    assert choice.spec.label == "fp8" and "more accurate" not in choice.reason


def test_measured_hops_teach_the_policy_ratio_and_speeds_on_the_engines_that_ran():
    default = choose_codec(STREAM, GBIT, GPU_NVENC, H200)
    assert default.spec.label == "hevc-lossless"  # the benchmark figures: 2.3x on NVENC/NVDEC
    cal = Calibration()
    for _ in range(20):  # this model's activations: 1.6x, and NVDEC slower than benchmarked
        cal.observe_hop("hevc-lossless", GPU_NVENC, H200, STREAM, int(STREAM / 1.6), 0.04, 0.06)
    fig = cal.get("hevc-lossless")
    assert fig.ratio == pytest.approx(1.6, rel=1e-2)
    assert fig.encode_bps["nvenc"] == pytest.approx(STREAM / 0.04, rel=1e-2)
    assert fig.decode_bps["nvdec"] == pytest.approx(STREAM / 0.06, rel=1e-2)
    assert fig.encode_bps["x265"] == Calibration().get("hevc-lossless").encode_bps["x265"]  # not what ran
    learned = choose_codec(STREAM, GBIT, GPU_NVENC, H200, calibration=cal)
    assert learned.spec.label in ("fp8", "u8")


def test_a_hop_without_a_codec_or_a_known_side_teaches_only_what_it_measured():
    cal = Calibration()
    cal.observe_hop("cuda-ipc", H200, H200, STREAM, 0, 0.001, 0.0)  # GPU to GPU: no codec ran
    cal.observe_hop("u8", H200, None, STREAM, STREAM // 2, 0.5, 0.5)  # the receiver's engine is not known
    fresh = Calibration()
    assert cal.figures.keys() == fresh.figures.keys()
    assert cal.get("u8").decode_bps == fresh.get("u8").decode_bps
    assert cal.get("u8").encode_bps["cuda"] < fresh.get("u8").encode_bps["cuda"]


async def test_a_daemon_learns_from_the_hops_it_sends(tmp_path):
    """Every step's hop feeds the sending daemon's calibration for that link; its next choice uses it."""
    key = bytes(range(32))
    models = tmp_path / "models"
    async with running_daemon(tmp_path / "a", key, range(0, 3), models) as a, \
            running_daemon(tmp_path / "b", key, range(3, 6), models) as b:
        await split_generation(key, [a.bound, b.bound], "A:0-2,B:3-5", PARAMS, codec="u8", measure_error=False)
        learned = a.relay.calibrations[f"127.0.0.1:{b.bound[1]}"].get("u8")
    fresh = Calibration().get("u8")
    assert learned.ratio != fresh.ratio and learned.encode_bps["cpu"] != fresh.encode_bps["cpu"]
    assert learned.decode_bps["cpu"] != fresh.decode_bps["cpu"]
    assert set(b.relay.calibrations) == set()  # the last stage sends nothing on


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5, 0.0], ids=["nan", "inf", "negative", "zero"])
def test_a_measurement_that_is_no_finite_positive_figure_teaches_nothing(bad):
    """Speeds and ratios come from finite figures > 0 only: a NaN or an infinity folded into the moving
    averages would stay there, and a NaN speed makes every later choice on the link fail."""
    cal = Calibration()
    for label in cal.figures:
        for direction in ("encode", "decode"):
            cal.observe(label, "cuda", direction, STREAM, bad)  # the time
            cal.observe(label, "cuda", direction, bad, 0.01)  # the bytes
        cal.observe_hop(label, H200, H200, bad, STREAM // 2, 0.01, 0.01)
    cal.observe("raw", "cuda", "decode", STREAM, 1e-320)  # a speed past the largest float
    assert cal.figures == Calibration().figures
    assert choose_codec(STREAM, GBIT, H200, H200, calibration=cal) == choose_codec(STREAM, GBIT, H200, H200)


@pytest.mark.parametrize("decode_ms", [float("nan"), float("inf"), -3.0, "12", True, None])
def test_a_daemon_learns_nothing_from_a_decode_time_that_is_no_time(decode_ms):
    """Relay.learn_hop reads the receiver's decode_ms; what is not a finite time > 0 is ignored, and the
    link's next choice still works."""
    from types import SimpleNamespace

    from codec import CodecSpec
    from meshd.pipeline.relay import Relay
    from meshd.pipeline.streaming import LinkPlan, SendStats

    relay = Relay(SimpleNamespace(caps=H200))
    link = LinkPlan("tcp", CodecSpec("raw"), {"to": "10.0.0.2:7777"}, receiver=H200)
    relay.learn_hop(link, SendStats("raw", STREAM, STREAM, 5.0), {"decode_ms": decode_ms})
    cal = relay.calibrations.get("10.0.0.2:7777", Calibration())
    assert all(cal.get(label).decode_bps == fig.decode_bps for label, fig in Calibration().figures.items())
    choose_codec(STREAM, GBIT, H200, H200, calibration=cal)
