"""Capabilities are probed; a missing PyNvVideoCodec or GPU is a normal, explained state."""

import torch

import codec
from codec import hevc_nv
from codec.errors import CodecUnavailable


def test_cpu_probe_explains_what_is_missing():
    caps = codec.probe("cpu")
    assert not caps.nvenc and not caps.nvdec
    assert caps.nvenc_reason and caps.nvdec_reason
    assert caps.cpu_hevc, caps.cpu_hevc_reason  # PyAV with libx265 is a dependency
    assert caps.can_encode("hevc") and caps.can_decode("hevc") and caps.can_encode("fp8")
    assert caps.hevc_encoder == "x265" and caps.hevc_decoder == "ffmpeg"
    assert any(line.startswith("NVENC no") for line in caps.summary())


def test_pynvvideocodec_absence_is_one_line():
    if torch.cuda.is_available():
        return
    try:
        hevc_nv.import_nvc()
    except CodecUnavailable as exc:
        assert "\n" not in str(exc) and "PyNvVideoCodec" in str(exc)
    # either way the CPU path keeps working
    assert codec.decode(codec.encode(torch.ones(1, 4, 3), "hevc")).shape == (1, 4, 3)


def test_probe_stream_decodes_on_the_cpu_to_its_pattern():
    from codec.hevc_cpu import FFmpegDecoder

    out = FFmpegDecoder().decode([hevc_nv.probe_stream()], 144, 144, torch.device("cpu"))
    assert torch.equal(out[0].view(3, 144, 144), torch.from_numpy(hevc_nv.probe_pattern()))


# --- NVENC through the FAKE PyNvVideoCodec 2.2.4 (tests/fakes): absent vs failing -------------------

import pytest  # noqa: E402

from codec.probe import Capabilities  # noqa: E402
from tests.nvenc_fake import fake_nvenc  # noqa: E402


@pytest.mark.parametrize("mode, state, words", [
    ("geforce", "ok", "lossless and constant-QP"),
    ("h200", "absent", "returned error 2"),  # NV_ENC_ERR_UNSUPPORTED_DEVICE, what the H200 answers
    ("no-encode-device", "absent", "NVENC library file is not found"),
    ("no-444", "absent", "YUV444 is not supported"),
    ("old-driver", "failing", "upgrade driver"),
])
def test_probe_tells_absent_from_failing(mode, state, words):
    with fake_nvenc(mode) as fake:
        caps = codec.probe("cpu")
        assert (caps.nvenc_state, caps.nvenc) == (state, state == "ok"), caps.nvenc_reason
        assert words in caps.nvenc_reason and "\n" not in caps.nvenc_reason
        assert fake.open_sessions == 0  # the probe gives its sessions back
        assert caps.hevc_encoder == ("nvenc" if state == "ok" else "x265")


def test_a_full_session_table_is_failing_not_absent():
    with fake_nvenc() as fake:
        fake.other_sessions = 8  # OBS, a browser and Discord hold every GeForce session
        caps = codec.probe("cpu")
        assert caps.nvenc_state == "failing" and "returned error 10" in caps.nvenc_reason
        assert any(line.startswith("NVENC FAILING: ") for line in caps.summary())


def test_the_probe_tries_the_constant_qp_configuration_too():
    with fake_nvenc() as fake:
        fake.fail_encodes_after = 1  # the lossless frame encodes, the constqp one fails
        caps = codec.probe("cpu")
        assert caps.nvenc_state == "failing" and "nvEncEncodePicture" in caps.nvenc_reason
        assert fake.encodes == 1 and fake.open_sessions == 0


def test_an_old_driver_refused_at_import_is_failing(monkeypatch):
    def refuse():
        raise codec.CodecUnavailable("PyNvVideoCodec cannot load: RuntimeError: Driver version is too old")

    monkeypatch.setattr(hevc_nv, "import_nvc", refuse)
    assert hevc_nv.probe_nvenc(torch.device("cpu"))[0] == "failing"


def test_a_wrong_binding_version_is_failing():
    with fake_nvenc() as fake:
        import PyNvVideoCodec

        PyNvVideoCodec.__version__ = "2.1.0"  # Encode returned a host bitstream there
        try:
            caps = codec.probe("cpu")
        finally:
            PyNvVideoCodec.__version__ = "2.2.4"
        assert caps.nvenc_state == "failing" and "2.2.x" in caps.nvenc_reason
        assert fake.sessions_opened == 0


def test_probe_is_cached_until_refreshed():
    with fake_nvenc("h200") as fake:
        assert codec.probe("cpu").nvenc_state == "absent"
        fake.mode = "geforce"
        assert codec.probe("cpu").nvenc_state == "absent"  # cached
        assert codec.probe("cpu", refresh=True).nvenc_state == "ok"


def test_nvenc_state_travels_to_peers():
    with fake_nvenc("old-driver"):
        caps = codec.probe("cpu")
    again = Capabilities.from_dict(caps.to_dict())
    assert again == caps and again.nvenc_state == "failing"
    assert Capabilities.from_dict({"device": "cuda:0", "nvenc": True}).nvenc_state == ""  # an older peer
    with pytest.raises(ValueError, match="nvenc_state"):
        Capabilities.from_dict({"device": "cpu", "nvenc_state": 3})


def test_expecting_nvenc_turns_the_skip_into_a_failure(monkeypatch):
    from tests.nvenc_fake import EXPECT_NVENC_ENV, skip_unless_nvenc

    absent = Capabilities(device="cuda:0", nvenc_state="absent", nvenc_reason="no NVENC on this GPU: ... error 2")
    monkeypatch.delenv(EXPECT_NVENC_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception):
        skip_unless_nvenc(absent)
    monkeypatch.setenv(EXPECT_NVENC_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="error 2"):
        skip_unless_nvenc(absent)
    skip_unless_nvenc(Capabilities(device="cuda:0", nvenc=True, nvenc_state="ok"))  # no skip, no failure
