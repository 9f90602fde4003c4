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
