"""The NVENC path, end to end, through the FAKE PyNvVideoCodec 2.2.4 (tests/fakes): how frames are
fed, the session budget, the fall-back to libx265 when NVENC fails mid-run, and ``meshd check``.

The fake stands in for the GeForce's encoder silicon only: it parses options, dispatches frames and
limits sessions the way the real binding does, and encodes through libx265, so its bitstreams are
real HEVC that FFmpeg (here) and NVDEC (on the GPU machine) decode.
"""

import contextlib

import numpy as np
import pytest
import torch

import codec
from codec import CodecSpec, TokenLayout
from codec.hevc_cpu import FFmpegDecoder
from codec.hevc_nv import DeviceFrame, NvEncoder, SessionBudget
from meshd.check import PROBLEM, exit_status, run_checks
from meshd.config import DaemonConfig
from tests.daemons import running_daemon, split_generation
from tests.fixtures import structured_stream
from tests.nvenc_fake import fake_nvenc

KEY = bytes(range(32))
LAYOUT = TokenLayout(prefix=32, height=16, width=16)
PARAMS = {"prompt": "a lighthouse at dawn", "seed": 5, "width": 64, "height": 64, "steps": 1, "guidance": 1.0}


def frames_of(h: int, w: int, count: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3 * h, w), generator=g, dtype=torch.uint8)


# --- how frames reach the binding -------------------------------------------------------------------


def test_a_torch_tensor_fails_in_the_binding_and_a_device_frame_encodes():
    with fake_nvenc() as fake:
        import PyNvVideoCodec as nvc

        enc = nvc.CreateEncoder(64, 48, "YUV444", False, gpu_id=0, codec="hevc", preset="P1", gop=1, idrperiod=1,
                                bf=0, repeatspspps=1, tuning_info="lossless")
        frame = frames_of(48, 64, 1)[0]
        # A plain tensor has ``cuda``: the binding calls it (here CPU torch refuses; on a GPU the
        # positional ``__dlpack__`` call raises TypeError, see tests/test_gpu_codec.py).
        with pytest.raises((AssertionError, RuntimeError, TypeError)):
            enc.Encode(frame)
        with pytest.raises(Exception, match="Only CUDA-accessible"):  # what ``cuda()`` returned is host memory
            enc.Encode(type("HostTensor", (), {"cuda": lambda self: frame})())
        with pytest.raises(Exception, match="CPU inut buffer"):  # host memory to a device-input session
            enc.Encode(frame.numpy())
        assert enc.Encode(DeviceFrame(frame)) == []  # NVENC's output delay: nothing yet
        packets = enc.EndEncode()
        assert [sorted(p) for p in packets] == [["data", "picture_type", "timestamp"]]
        decoded = FFmpegDecoder().decode([packets[0]["data"]], 64, 48, torch.device("cpu"))
        assert torch.equal(decoded[0], frame)
        del enc
        assert fake.open_sessions == 0


def test_the_fake_refuses_what_the_binding_would_misread():
    with fake_nvenc():
        import PyNvVideoCodec as nvc

        with pytest.raises(Exception, match="unknown encoder option"):
            nvc.CreateEncoder(64, 48, "YUV444", False, codec="hevc", gop=1, idrperiod=1, bf=0, repeatspspps=1,
                              tuning_info="lossless", qp=18)
        enc = nvc.CreateEncoder(64, 48, "YUV444", False, codec="hevc", gop=1, idrperiod=1, bf=0, repeatspspps=1,
                                tuning_info="lossless")
        frame = frames_of(48, 64, 1)[0]
        planes = DeviceFrame(frame).cuda()
        with pytest.raises(Exception, match="u and v plane must follow yplane"):
            enc.Encode(type("Swapped", (), {"cuda": lambda self: [planes[0], planes[2], planes[1]]})())
        with pytest.raises(Exception, match="Invalid shape"):
            enc.Encode(DeviceFrame(frames_of(24, 64, 1)[0]))


def test_nvenc_streams_decode_like_libx265_ones():
    x = structured_stream()
    with fake_nvenc() as fake:
        for qp in (None, 18):
            spec = CodecSpec("hevc", qp=qp, chunk_tokens=64, layout=LAYOUT)
            nv = codec.encode(x, spec)
            ref = codec.encode(x, CodecSpec("hevc", qp=qp, chunk_tokens=64, layout=LAYOUT, encoder="x265"))
            assert (nv.header.encoder, ref.header.encoder) == ("nvenc", "x265")
            wire = codec.Encoded.from_wire(nv.header.to_dict(), [bytes(b) for b in nv.buffers])
            assert torch.equal(codec.decode(wire), codec.decode(ref))
        assert fake.encodes > 0
        lossless = codec.encode(x, CodecSpec("hevc", chunk_tokens=64, layout=LAYOUT))
        u8 = codec.encode(x, CodecSpec("u8", chunk_tokens=64, layout=LAYOUT))
        assert torch.equal(codec.decode(lossless), codec.decode(u8))


# --- the session budget -----------------------------------------------------------------------------


def test_any_geometry_and_qp_stay_within_the_budget_and_sessions_close():
    with fake_nvenc(budget=2) as fake:
        encoder = NvEncoder(torch.device("cpu"), sessions=2)
        for i, (h, w, qp) in enumerate([(16, 32, None), (32, 16, 18), (48, 48, None), (16, 32, 30), (16, 32, None)] * 2):
            out = encoder.encode(frames_of(h, w, 3, seed=i), qp)
            assert len(out) == 3
            assert fake.open_sessions <= 2 and fake.peak_sessions <= 2
        encoder.close()
        assert fake.open_sessions == 0


def test_a_failed_session_is_closed_not_kept():
    with fake_nvenc() as fake:
        encoder = NvEncoder(torch.device("cpu"), sessions=1)
        fake.fail_encodes_after = 0
        with pytest.raises(codec.CodecError, match="nvEncEncodePicture"):
            encoder.encode(frames_of(16, 32, 2), None)
        assert fake.open_sessions == 0  # the failed session is gone although the error is still referenced
        fake.fail_encodes_after = None
        assert len(encoder.encode(frames_of(16, 32, 2), None)) == 2
        encoder.close()


def test_other_programs_sessions_make_room_by_closing_ours():
    with fake_nvenc() as fake:
        budget = SessionBudget(2)
        encoder = NvEncoder(torch.device("cpu"), sessions=1, budget=budget)
        encoder.encode(frames_of(16, 32, 1), None)
        assert fake.open_sessions == 1
        fake.other_sessions = 7  # OBS starts recording: 7 + our idle 1 = the 8 of a GeForce
        encoder.encode(frames_of(32, 32, 1), 18)  # another key: our idle session gives way, then it opens
        assert fake.open_sessions == 1
        encoder.close()


def test_a_session_that_cannot_open_is_a_codec_error_and_auto_hevc_falls_back_to_x265():
    # Found by review: an open failure in acquire() escaped as the binding's raw exception, past the
    # fall-back. Other programs holding all 8 sessions, with none of ours to close, is the GeForce case.
    with fake_nvenc() as fake:
        fake.other_sessions = 8
        with pytest.raises(codec.CodecError, match="returned error 10"):
            NvEncoder(torch.device("cpu"), sessions=1, budget=SessionBudget(2)).encode(frames_of(16, 32, 1), None)
        fake.other_sessions = 0
        with pytest.raises(codec.CodecError, match="could not open a session.*Invalid encoder width"):
            NvEncoder(torch.device("cpu"), sessions=1, budget=SessionBudget(2)).encode(frames_of(16, 8200, 1), None)
        fake.other_sessions = 8
        x = structured_stream()
        enc = codec.encode(x, CodecSpec("hevc", chunk_tokens=64, layout=LAYOUT))  # auto: NVENC, then x265
        assert torch.equal(codec.decode(enc, "cpu"), codec.decode(codec.encode(x, CodecSpec(
            "hevc", encoder="x265", chunk_tokens=64, layout=LAYOUT)), "cpu"))
        with pytest.raises(codec.CodecError):  # forced NVENC does not fall back: it fails
            codec.encode(x, CodecSpec("hevc", encoder="nvenc", chunk_tokens=64, layout=LAYOUT))


def test_the_probe_takes_its_session_from_the_process_budget():
    """Found by review: the probe opened its session under a budget of its own, so a re-probe while an
    encoder kept its session open held one more than the GPU's budget allows."""
    from codec.hevc_nv import SESSIONS, probe_nvenc

    with fake_nvenc(budget=1) as fake:
        encoder = NvEncoder(torch.device("cpu"), sessions=1)  # the process budget, as codec.core's are
        encoder.encode(frames_of(16, 32, 1), None)
        assert fake.open_sessions == 1 and SESSIONS.open_count(0) == 1  # kept open, idle, for reuse
        fake.peak_sessions = fake.open_sessions
        state, reason, _ = probe_nvenc(torch.device("cpu"))
        assert state == "ok", reason
        assert fake.peak_sessions == 1  # the probe's session took the idle one's place, not one more
        assert fake.open_sessions == 0 and SESSIONS.open_count(0) == 0
        encoder.close()


def test_sessions_leave_the_pool_outside_its_lock():
    """Destroying a session is a driver call of milliseconds: whichever way a session leaves the pool
    (evicted for another key, above a lowered limit, closed as idle, given up for another program),
    it is destroyed with the budget's lock free, so other encoders never wait on it."""
    with fake_nvenc() as fake:
        budget = SessionBudget(2)
        under_lock = []
        fake.on_destroy = lambda: under_lock.append(budget._cond._is_owned())
        encoder = NvEncoder(torch.device("cpu"), sessions=1, budget=budget)
        for h in (16, 32, 48):  # a third key evicts the least recently used idle session
            encoder.encode(frames_of(h, 32, 1), None)
        budget.set_limit(1)  # one idle session above the new limit
        fake.other_sessions = 7  # another program: the open of a new key gives our idle one back
        encoder.encode(frames_of(64, 32, 1), None)
        fake.other_sessions = 0
        budget.close_idle()
        assert under_lock == [False] * 4 and fake.open_sessions == 0
        encoder.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the fake reads device memory there)")
def test_retiring_a_gpus_nvenc_retires_the_host_input_encoder_on_it_too():
    """Frames of a CPU device go to GPU 0's NVENC through a host-input encoder of their own: when NVENC
    on cuda:0 is retired after a failure, that encoder's sessions close and it is not used again."""
    from codec.core import _encoders, hevc_encoder, retire_nvenc

    with fake_nvenc(host_pointers=False) as fake:
        cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
        hevc_encoder(cuda, "nvenc").encode(frames_of(16, 32, 1).to(cuda), None)
        hevc_encoder(cpu, "nvenc").encode(frames_of(16, 32, 1), None)
        assert {("nvenc", "cuda:0"), ("nvenc", "cpu")} <= set(_encoders) and fake.open_sessions >= 1
        retire_nvenc(cuda, "NVENC failed in a test")
        assert not {k for k in _encoders if k[0] == "nvenc"}
        assert fake.open_sessions == 0
        assert not codec.probe(cpu).nvenc and not codec.probe(cuda).nvenc


# --- over real daemons ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def two_daemons(tmp_path):
    models = tmp_path / "models"
    async with running_daemon(tmp_path / "a", KEY, blocks=range(0, 3), models_dir=models) as a, \
            running_daemon(tmp_path / "b", KEY, blocks=range(3, 6), models_dir=models) as b:
        yield [a.bound, b.bound]


async def generate(addresses, codec_name, **params):
    return await split_generation(KEY, addresses, "A:0-2,B:3-5", {**PARAMS, **params}, codec=codec_name,
                                  measure_error=False, return_latents=True)


def hops(outcome) -> list[dict]:
    return [hop for step in outcome.summary["steps"] for p in step["passes"] for hop in p.get("hops", [])]


async def test_split_generations_through_nvenc_equal_libx265_and_keep_within_the_budget(tmp_path):
    async with two_daemons(tmp_path) as addresses:
        reference = {name: await generate(addresses, name) for name in ("hevc-lossless", "hevc-qp18")}
        with fake_nvenc(budget=2) as fake:
            assert codec.probe("cpu").nvenc  # both in-process daemons share this process's GPU 0 budget
            for i, size in enumerate([64, 48, 32, 64, 48, 32, 64, 48, 32, 64]):
                name = "hevc-lossless" if i % 2 == 0 else "hevc-qp18"
                outcome = await generate(addresses, name, width=size, height=size)
                assert fake.open_sessions <= 2 and fake.peak_sessions <= 2
                if size == 64:
                    assert torch.equal(outcome.latents, reference[name].latents), name
            # NVENC did the work, on sessions reused across frames, chunks and generations
            assert 0 < fake.sessions_opened < fake.encodes
            assert not any("encoder_note" in hop for hop in hops(outcome))


async def test_nvenc_failing_mid_run_falls_back_and_the_image_arrives(tmp_path):
    async with two_daemons(tmp_path) as addresses:
        reference = await generate(addresses, "hevc-lossless", steps=3)
        with fake_nvenc() as fake:
            assert codec.probe("cpu").nvenc
            fake.fail_encodes_after = 3  # a few frames go through NVENC, then the encoder faults
            outcome = await generate(addresses, "hevc-lossless", steps=3)
            assert outcome.png.startswith(b"\x89PNG")
            assert torch.equal(outcome.latents, reference.latents)  # libx265 took over: same lossless codes
            notes = [hop["encoder_note"] for hop in hops(outcome) if "encoder_note" in hop]
            assert len(notes) == 1 and "NVENC failed" in notes[0] and "nvEncEncodePicture" in notes[0]
            caps = codec.probe("cpu")
            assert caps.nvenc_state == "failing" and not caps.nvenc  # what the peers see now
            assert fake.open_sessions == 0
            encodes = fake.encodes
            again = await generate(addresses, "hevc-lossless", steps=3)  # the next generation: no NVENC
            assert torch.equal(again.latents, reference.latents) and fake.encodes == encodes


# --- meshd check -------------------------------------------------------------------------------------


def test_check_fails_on_failing_nvenc_and_notes_absent_nvenc(tmp_path):
    config = DaemonConfig(models_dir=(tmp_path,), state_dir=tmp_path, mdns=False, insecure=True)
    for mode, failing in (("old-driver", True), ("h200", False)):
        with fake_nvenc(mode):
            findings = [f for f in run_checks(config) if f.topic == "NVENC"]
        assert (findings[0].level == PROBLEM) is failing, findings
        assert exit_status(findings) == (1 if failing else 0)


def test_selftest_round_trips_through_the_best_hevc_path(tmp_path):
    config = DaemonConfig(models_dir=(tmp_path,), state_dir=tmp_path, mdns=False, insecure=True)
    with fake_nvenc():
        findings = [f for f in run_checks(config, codecs=False, selftest_shape=(1, 160, 64)) if f.topic == "selftest"]
    assert [f.level for f in findings] == ["ok", "ok"], findings
    assert "hevc-lossless [1, 160, 64] via nvenc -> ffmpeg" in findings[0].text
    for finding in findings:
        assert " ms" in finding.text and "bytes" in finding.text and "cosine" in finding.text
    cosine = float(findings[0].text.split("cosine ")[1].split(",")[0])
    assert np.isclose(cosine, 1.0, atol=1e-3)


def test_an_encoder_retired_meanwhile_fails_as_a_codec_error():
    with fake_nvenc():
        encoder = NvEncoder(torch.device("cpu"), sessions=1)
        encoder.close()  # what retire_nvenc does when another stream's NVENC encode failed
        with pytest.raises(codec.CodecError, match="retired"):
            encoder.encode(frames_of(16, 32, 1), None)


async def test_a_link_is_chosen_again_after_its_encoder_failed_over():
    from meshd.pipeline.streaming import LinkPlan, SendStats, link_after

    chosen = []

    async def replan():
        chosen.append(1)
        return LinkPlan("tcp", CodecSpec("u8"), {"why": "without NVENC, u8 is faster here"})

    link = LinkPlan("tcp", CodecSpec("hevc"), {}, replan=replan)
    assert await link_after(link, SendStats(codec="hevc-lossless")) is link  # nothing happened: kept
    again = await link_after(link, SendStats(codec="hevc-lossless", encoder_note="NVENC failed (...)"))
    assert again.label == "u8" and chosen == [1]
