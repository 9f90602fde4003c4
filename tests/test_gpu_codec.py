"""Codec checks that need a CUDA GPU (run on the GPU machine: pytest -m gpu tests/test_gpu_codec.py)."""

import pytest
import torch

import codec
from codec import CodecSpec, TokenLayout
from codec.hevc_cpu import FFmpegDecoder, X265Encoder
from codec.frames import plan_geometry, tile
from tests.fixtures import noise_stream, structured_stream
from tests.nvenc_fake import fake_nvenc, skip_unless_nvenc

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
LAYOUT = TokenLayout(prefix=32, height=16, width=16)


@pytest.fixture(scope="module")
def cuda():
    return torch.device("cuda", torch.cuda.current_device())


def test_probe_reports_nvenc_and_nvdec_by_trying(cuda):
    caps = codec.probe(cuda)
    assert caps.gpu_name
    assert caps.nvdec, caps.nvdec_reason
    if not caps.nvenc:  # H100/H200/A100: absent, for the right reason (error 2 on the session open)
        assert caps.nvenc_state == "absent", caps.nvenc_reason
        assert "nvEncOpenEncodeSessionEx" in caps.nvenc_reason and "returned error 2" in caps.nvenc_reason
    else:
        assert caps.nvenc_state == "ok"
    print(caps.summary())


@pytest.mark.parametrize("qp", [None, 18, 30])
@pytest.mark.parametrize("shape", [(144, 144), (512, 1024), (1024, 704)])
def test_nvdec_decodes_x265_streams_to_exactly_what_ffmpeg_gives(cuda, qp, shape):
    h, w = shape
    g = torch.Generator().manual_seed(h + w + (qp or 0))
    frames = torch.randint(0, 256, (3, 3 * h, w), generator=g, dtype=torch.uint8)
    frames[1] = (torch.arange(w).view(1, w) + torch.arange(3 * h).view(3 * h, 1)).to(torch.uint8)  # smooth frame
    bitstreams = X265Encoder().encode(frames, qp)
    on_cpu = FFmpegDecoder().decode(bitstreams, w, h, torch.device("cpu"))
    on_gpu = codec.core.hevc_decoder(cuda).decode(bitstreams, w, h, cuda)
    assert torch.equal(on_gpu.cpu(), on_cpu)
    if qp is None:
        assert torch.equal(on_cpu, frames)


@pytest.mark.parametrize("name", ["fp8", "u8", "raw"])
def test_gpu_encode_is_byte_identical_to_the_cpu_reference(cuda, name):
    x = structured_stream(tokens_h=32, tokens_w=32, prefix=64, channels=256)
    on_cpu = codec.encode(x, CodecSpec(name, chunk_tokens=256))
    on_gpu = codec.encode(x.to(cuda), CodecSpec(name, chunk_tokens=256))
    assert on_cpu.header == on_gpu.header
    assert [bytes(b) for b in on_cpu.buffers] == [bytes(b) for b in on_gpu.buffers]
    assert torch.equal(codec.decode(on_gpu, cuda).cpu(), codec.decode(on_cpu, "cpu"))


def test_gpu_tiling_matches_cpu(cuda):
    q = torch.randint(0, 256, (1024, 4096), dtype=torch.uint8)
    g = plan_geometry(1024, 4096, (16, 64))
    assert torch.equal(tile(q.to(cuda), g).cpu(), tile(q, g))


@pytest.mark.parametrize("qp", [None, 18])
def test_hevc_round_trip_on_gpu_equals_cpu(cuda, qp):
    x = structured_stream()
    spec = CodecSpec("hevc", qp=qp, chunk_tokens=64, layout=LAYOUT)
    enc = codec.encode(x.to(cuda), spec)  # x265 on the CPU where this GPU has no NVENC
    on_gpu = codec.decode(enc, cuda)
    on_cpu = codec.decode(codec.Encoded.from_wire(enc.header.to_dict(), [bytes(b) for b in enc.buffers]), "cpu")
    assert torch.equal(on_gpu.cpu(), on_cpu)
    if qp is None:
        assert torch.equal(on_cpu, codec.decode(codec.encode(x, CodecSpec("u8", chunk_tokens=64, layout=LAYOUT))))


def test_nvenc_encodes_when_present_and_is_skipped_cleanly_when_absent(cuda):
    caps = codec.probe(cuda)
    if not caps.nvenc:
        with pytest.raises(codec.CodecUnavailable, match="NVENC"):
            codec.encode(noise_stream().to(cuda), CodecSpec("hevc", encoder="nvenc"))
    skip_unless_nvenc(caps)
    x = structured_stream().to(cuda)
    enc = codec.encode(x, CodecSpec("hevc", qp=None, encoder="nvenc", layout=LAYOUT))
    assert enc.header.encoder == "nvenc"
    via_ffmpeg = codec.decode(codec.Encoded.from_wire(enc.header.to_dict(), [bytes(b) for b in enc.buffers]), "cpu")
    assert torch.equal(codec.decode(enc, cuda).cpu(), via_ffmpeg)


def test_damaged_frame_never_reaches_nvdec(cuda):
    enc = codec.encode(structured_stream(), CodecSpec("hevc", qp=18, chunk_tokens=64, layout=LAYOUT))
    buffers = [bytes(b) for b in enc.buffers]
    frame = bytearray(buffers[1])
    frame[len(frame) // 2] ^= 1
    buffers[1] = bytes(frame)
    with pytest.raises(codec.CodecError, match="CRC"):
        codec.decode(codec.Encoded.from_wire(enc.header.to_dict(), buffers), cuda)


# --- the FAKE NVENC (tests/fakes) with real CUDA tensors: pointers, devices and stream order are real;
# only the encoder silicon is faked, and NVDEC (the real binding's) decodes what it writes. ------------


@pytest.fixture
def fake_on_gpu():
    with fake_nvenc(host_pointers=False) as fake:
        yield fake


def test_a_torch_cuda_tensor_hits_the_positional_dlpack_call(cuda, fake_on_gpu):
    import PyNvVideoCodec as nvc

    enc = nvc.CreateEncoder(64, 48, "YUV444", False, gpu_id=cuda.index, codec="hevc", preset="P1", gop=1,
                            idrperiod=1, bf=0, repeatspspps=1, tuning_info="lossless")
    with pytest.raises(TypeError, match="positional argument"):  # what every GeForce hit before issue 13
        enc.Encode(torch.zeros((3 * 48, 64), dtype=torch.uint8, device=cuda))


def test_fake_nvenc_reads_real_cuda_planes_and_nvdec_decodes_them(cuda, fake_on_gpu):
    caps = codec.probe(cuda)
    assert caps.nvenc and caps.nvdec, (caps.nvenc_reason, caps.nvdec_reason)
    g = torch.Generator().manual_seed(3)
    frames = torch.randint(0, 256, (4, 3 * 144, 256), generator=g, dtype=torch.uint8).to(cuda)
    frames = frames * 1  # written by a kernel on torch's stream just before the encode
    bitstreams = codec.core.hevc_encoder(cuda).encode(frames, None)
    on_gpu = codec.core.hevc_decoder(cuda).decode(bitstreams, 256, 144, cuda)
    assert on_gpu.device == cuda and torch.equal(on_gpu, frames)
    assert torch.equal(FFmpegDecoder().decode(bitstreams, 256, 144, torch.device("cpu")), frames.cpu())


@pytest.mark.parametrize("qp", [None, 18])
def test_hevc_through_fake_nvenc_on_gpu_equals_the_cpu_decode(cuda, fake_on_gpu, qp):
    x = structured_stream().to(cuda)
    enc = codec.encode(x, CodecSpec("hevc", qp=qp, chunk_tokens=64, layout=LAYOUT))
    assert enc.header.encoder == "nvenc" and fake_on_gpu.encodes > 0
    via_ffmpeg = codec.decode(codec.Encoded.from_wire(enc.header.to_dict(), [bytes(b) for b in enc.buffers]), "cpu")
    assert torch.equal(codec.decode(enc, cuda).cpu(), via_ffmpeg)
    assert fake_on_gpu.open_sessions <= codec.hevc_nv.SESSIONS.limit


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_frames_of_the_second_gpu_go_to_its_own_encoder(fake_on_gpu):
    second = torch.device("cuda", 1)
    x = structured_stream().to(second)
    enc = codec.encode(x, CodecSpec("hevc", chunk_tokens=64, layout=LAYOUT))
    assert enc.header.encoder == "nvenc"
    assert torch.equal(codec.decode(enc, second).cpu(), codec.decode(enc, "cpu"))
