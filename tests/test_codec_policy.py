"""The codec policy picks the fastest codec both ends can run above the quality floor."""

import pytest

from codec import Capabilities, CodecError, CodecUnavailable, choose_codec
from codec.policy import Calibration

STREAM = 36 * 2**20  # klein-9B joint stream at 1024^2, bf16
GPU_NVENC = Capabilities("cuda:0", "RTX 4090", nvenc=True, nvenc_engines=2, nvdec=True, nvdec_engines=1, cpu_hevc=True)
H200 = Capabilities("cuda:0", "H200", nvenc=False, nvenc_reason="no NVENC", nvdec=True, nvdec_engines=7, cpu_hevc=True)
CPU_ONLY = Capabilities("cpu", cpu_hevc=False, cpu_hevc_reason="no PyAV")
GBIT = 1e9 / 8


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
