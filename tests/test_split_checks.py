"""What a head and a stage make of the fields a peer sends them in a split generation: figures, tensors and
errors from the stage's side, request fields from the client's. In-process daemons on loopback (a stage's
reply is altered on its way out where the test needs a peer that lies)."""

from __future__ import annotations

import contextlib
import logging
import math
import threading

import pytest
import torch

from meshd import auth
from meshd.errors import MeshError
from meshd.model.lora import LoraError
from meshd.model.tensorfiles import ModelError
from meshd.wire.channel import Channel
from tests.daemons import running_daemon, split_generation

KEY = auth.generate_key()
PARAMS = {"prompt": "a lighthouse at dawn", "seed": 7, "width": 64, "height": 64, "steps": 2, "guidance": 1.0}


@contextlib.asynccontextmanager
async def head_and_stage(tmp_path, **stage_config):
    """A head holding blocks 0-2 and the stage holding 3-5 (the tail), one model folder."""
    models = tmp_path / "models"
    async with running_daemon(tmp_path / "a", KEY, range(0, 3), models, node_name="head-a") as a, \
            running_daemon(tmp_path / "b", KEY, range(3, 6), models, node_name="stage-b", **stage_config) as b:
        yield a, b


def alter_forward_replies(stage, alter) -> None:
    """Make ``stage`` pass each forward reply through ``alter(fields, segments)`` before it is sent. A
    prediction given back in the shared run its stream came in (host-shm, these daemons' link) is read
    out of the run first and sent over TCP, so that ``alter`` sees its bytes wherever they travel;
    except where the forward went ahead of its stream (``ring``): the stage has rung that prediction
    back already, and its reply must say the same place (a stage that did not is tested in test_shm)."""
    original = stage.ops["forward"]

    async def forward(request):
        fields, segments = await original(request)
        back = fields.get("prediction_shm")
        if back is not None and "ring" not in request.header["shm"]:
            del fields["prediction_shm"]
            arena = stage.shm.region(request.session).arena
            segments = [arena.span(request.header["shm"]["offset"], back["nbytes"]).copy()]
        return alter(fields, segments)

    stage.extra_ops["forward"] = forward


async def split(a, b, **generate):
    return await split_generation(KEY, [a.bound, b.bound], "A:0-2,B:3-5", PARAMS, codec="raw", **generate)


def first_hops(summary: dict) -> list[dict]:
    return [p["hops"][0] for step in summary["steps"] for p in step["passes"]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -2.5, "12" * 2000, True],
                         ids=["nan", "inf", "negative", "long-text", "bool"])
async def test_a_stage_wire_ms_that_is_no_time_reaches_neither_the_link_record_nor_the_client(tmp_path, bad):
    async with head_and_stage(tmp_path) as (a, b):
        def lie(fields, segments):
            fields["hops"][0]["wire_ms"] = bad
            return fields, segments

        alter_forward_replies(b, lie)
        outcome = await split(a, b)
        assert all("wire_ms" not in hop for hop in first_hops(outcome.summary))
        channel = await Channel.connect(*a.bound, KEY)
        try:
            links = (await channel.request("info")).header["links"]  # the head's link records (the dashboard's)
        finally:
            await channel.close()
        recent = [ms for link in links for ms in link["recent_hop_ms"]]
        assert all(isinstance(ms, float) and math.isfinite(ms) and ms >= 0 for ms in recent), recent


async def test_a_stage_wire_ms_that_is_a_time_is_kept(tmp_path):
    async with head_and_stage(tmp_path) as (a, b):
        outcome = await split(a, b)
        hops = first_hops(outcome.summary)
        assert hops and all(isinstance(hop["wire_ms"], float) and hop["wire_ms"] >= 0 for hop in hops)
        recent = [ms for link in a.links.snapshot() for ms in link["recent_hop_ms"]]
        assert len(recent) == len(hops)


async def test_a_wire_ms_from_a_stage_further_down_is_checked_too(tmp_path):
    """The last of three stages lies; its record reaches the head through the middle stage."""
    models = tmp_path / "models"
    async with running_daemon(tmp_path / "a", KEY, range(0, 2), models) as a, \
            running_daemon(tmp_path / "b", KEY, range(2, 4), models) as b, \
            running_daemon(tmp_path / "c", KEY, range(4, 6), models) as c:
        def lie(fields, segments):
            fields["hops"][0]["wire_ms"] = float("nan")
            return fields, segments

        alter_forward_replies(c, lie)
        outcome = await split_generation(KEY, [a.bound, b.bound, c.bound], "A:0-1,B:2-3,C:4-5", PARAMS, codec="raw")
        hops = [p["hops"] for step in outcome.summary["steps"] for p in step["passes"]]
        assert all("wire_ms" in first and "wire_ms" not in last for first, last in hops)


@pytest.mark.parametrize("error", [LoraError("LoRA kite (sha256 0123456789ab) is not in the LoRA folders here"),
                                   ModelError("/models/loras/kite.safetensors is missing")], ids=["lora", "model"])
async def test_a_model_error_on_a_stage_reaches_the_client_as_one_line_naming_the_stage(tmp_path, caplog, error):
    """The stage's files changed under a job (a LoRA removed between its prepare and a step, say): the
    client is told by the stage, in a line, not with an internal error and a traceback in the log."""
    async with head_and_stage(tmp_path) as (a, b):
        def use_loras(specs):
            raise error

        b.model.use_loras = use_loras  # what each forward calls first, on the GPU worker
        with caplog.at_level(logging.ERROR), pytest.raises(MeshError) as raised:
            await split(a, b)
    assert raised.value.code == "not-found", raised.value
    assert str(error) in raised.value.message and b.name in raised.value.message
    assert "\n" not in raised.value.message and "Traceback" not in raised.value.message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_a_model_error_while_a_stage_prepares_reaches_the_client_as_one_line(tmp_path, caplog):
    """The same while the stage prepares the job: a LoRA file whose tensors no longer read raises a plain
    ModelError out of the LoRA check, which maps LoraError only."""
    async with head_and_stage(tmp_path) as (a, b):
        async def check_loras(loras):
            raise ModelError("/models/loras/kite.safetensors is missing")

        b.check_loras = check_loras
        with caplog.at_level(logging.ERROR), pytest.raises(MeshError) as raised:
            await split(a, b)
    assert raised.value.code == "not-found" and raised.value.message == "stage-b: /models/loras/kite.safetensors is missing"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_a_stage_moves_the_token_ids_to_its_device_on_its_gpu_worker(tmp_path, monkeypatch):
    """A copy to the device waits for the GPU: the prepare's ids go there on the worker thread, as the
    rest of a stage's tensor work does, never on the event loop."""
    from meshd.pipeline import stage

    ids, moved_on = [], []
    unpack = stage.unpack_raw

    def unpack_raw(headers, buffers, device, shapes=None):
        out = unpack(headers, buffers, device, shapes)
        if shapes and len(shapes) == 2 and all(len(s) == 3 and s[2] == 4 for s in shapes):  # (txt_ids, img_ids)
            ids.extend(out)
        return out

    to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        if any(self is t for t in ids):
            moved_on.append(threading.current_thread().name)
        return to(self, *args, **kwargs)

    monkeypatch.setattr(stage, "unpack_raw", unpack_raw)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    async with head_and_stage(tmp_path) as (a, b):
        await split(a, b)
    assert len(ids) == 2 and len(moved_on) == 2
    assert all(name.startswith("gpu-") for name in moved_on), moved_on


@pytest.mark.parametrize("floor", ["0.99", float("nan"), True, 1.5, -0.1], ids=repr)
async def test_a_quality_floor_that_is_no_cosine_is_refused_by_the_head_naming_it(tmp_path, floor):
    async with head_and_stage(tmp_path) as (a, b):
        prepares = []
        original = b.ops["prepare"]

        async def prepare(request):
            prepares.append(request.header)
            return await original(request)

        b.extra_ops["prepare"] = prepare
        with pytest.raises(MeshError) as raised:
            await split_generation(KEY, [a.bound, b.bound], "A:0-2,B:3-5", PARAMS, codec="raw", quality_floor=floor)
        assert raised.value.code == "bad-request" and "quality_floor" in raised.value.message
        assert raised.value.peer == "%s:%d" % a.bound  # the head refused it, before any stage saw it
        assert not prepares


@pytest.mark.parametrize("name", ["measure_error", "return_latents"])
@pytest.mark.parametrize("flag", ["false", 0, 1, None], ids=repr)
async def test_request_flags_must_be_true_or_false(tmp_path, flag, name):
    """A string "false" is truthy: it must not turn the error measurement (or the latents' return) on.
    One line naming the field."""
    async with head_and_stage(tmp_path) as (a, b):
        with pytest.raises(MeshError, match=name) as raised:
            await split(a, b, **{name: flag})
        assert raised.value.code == "bad-request" and raised.value.peer == "%s:%d" % a.bound


async def test_measure_error_and_the_floor_are_checked_by_a_stage_too(tmp_path):
    """A stage's prepare may come from any key holder, not only a head that checked the fields."""
    async with head_and_stage(tmp_path) as (a, b):
        channel = await Channel.connect(*b.bound, KEY)
        try:
            fields, segments = stage_prepare(b)
            assert (await channel.request("prepare", fields, segments)).header["stages"]
            await channel.request("release", {"job": fields["job"]})
            for bad in ({"measure_error": "false"}, {"quality_floor": True}, {"quality_floor": float("nan")}):
                with pytest.raises(MeshError) as raised:
                    await channel.request("prepare", {**fields, **bad}, segments)
                (name,) = bad
                assert raised.value.code == "bad-request" and name in raised.value.message, raised.value
        finally:
            await channel.close()


def stage_prepare(stage) -> tuple[dict, list]:
    """A valid prepare of a job on ``stage`` for the tail blocks 3-5 (a 64x64 image: a 4x4 latent grid)."""
    from meshd.pipeline.streaming import pack_raw

    preset = stage.model.preset
    headers, buffers = pack_raw([torch.zeros(1, preset.max_sequence_length, 4, dtype=torch.int64),
                                 torch.zeros(1, 16, 4, dtype=torch.int64)])
    return {"job": "checks", "model": stage.model.identity.to_dict(),
            "stages": [{"peer": "%s:%d" % stage.bound, "start": 3, "end": 6}],
            "geometry": {"batch": 1, "txt_len": preset.max_sequence_length, "img_h": 4, "img_w": 4},
            "ids": headers, "loras": [], "measure_error": False, "quality_floor": 0.99}, buffers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64], ids=str)
async def test_a_prediction_of_another_dtype_is_a_mismatch_naming_both(tmp_path, dtype):
    """The head samples with the prediction as it computes (bf16 here): another dtype would change the
    latents' dtype and the image silently, or fail later in the scheduler."""
    from meshd.pipeline.streaming import pack_raw, unpack_raw

    async with head_and_stage(tmp_path, same_host_shm=False) as (a, b):  # the prediction over TCP, to recast
        def recast(fields, segments):
            (prediction,) = unpack_raw([fields["prediction"]], segments, torch.device("cpu"))
            headers, buffers = pack_raw([prediction.to(dtype)])
            return {**fields, "prediction": headers[0]}, buffers

        alter_forward_replies(b, recast)
        with pytest.raises(MeshError) as raised:
            await split(a, b)
    assert raised.value.code == "mismatch", raised.value
    assert str(dtype) in raised.value.message and "bfloat16" in raised.value.message


async def test_a_prediction_rung_back_whose_reply_says_another_dtype_is_a_mismatch_naming_both(tmp_path):
    """Over host-shm the head takes the prediction from the run, as it computes, when the stage rings it
    back; the reply's header says what it was: another dtype of the same size ends the generation."""
    async with head_and_stage(tmp_path) as (a, b):
        def recast(fields, segments):
            assert "prediction_shm" in fields  # (the forward went ahead: its prediction was rung back)
            return {**fields, "prediction": {**fields["prediction"], "dtype": "float16"}}, segments

        alter_forward_replies(b, recast)
        with pytest.raises(MeshError) as raised:
            await split(a, b)
    assert raised.value.code == "mismatch", raised.value
    assert "torch.float16" in raised.value.message and "bfloat16" in raised.value.message


def test_the_latent_grid_is_rows_by_columns_of_packed_tokens():
    from meshd.model.presets import PRESETS

    tiny, klein = PRESETS["tiny"], PRESETS["klein-4b"]
    assert tiny.latent_grid(32, 64) == (32 // tiny.size_multiple, 64 // tiny.size_multiple) == (8, 16)
    assert klein.latent_grid(1024, 768) == (1024 // klein.size_multiple, 768 // klein.size_multiple) == (64, 48)


async def test_a_split_of_a_wide_image_equals_the_all_local_one(tmp_path):
    """The head's geometry (what the stages prepare) and the sampler's latents come from one grid: a
    non-square image, whose rows and columns a swap would exchange, is the same split and local."""
    import argparse
    import io

    import numpy as np
    from PIL import Image

    from meshtui.cli import run_local

    wide = {**PARAMS, "width": 64, "height": 32}
    async with head_and_stage(tmp_path) as (a, b):
        outcome = await split_generation(KEY, [a.bound, b.bound], "A:0-2,B:3-5", wide, codec="raw")
    args = argparse.Namespace(device="cpu", models_dir=[tmp_path / "models"], model="tiny", random_weights=False,
                              size=(64, 32), steps=wide["steps"], guidance=wide["guidance"], prompt=wide["prompt"],
                              seed=wide["seed"])
    local, _ = await run_local(args)
    split_pixels, local_pixels = (np.asarray(Image.open(io.BytesIO(png))) for png in (outcome.png, local))
    assert split_pixels.shape == (32, 64, 3) and np.array_equal(split_pixels, local_pixels)


async def test_a_stage_that_refuses_the_job_ends_the_generation_before_the_heads_sampler_is_ready(tmp_path, monkeypatch):
    """The stages prepare while the head prepares its sampler: a refusal is the generation's answer as
    soon as it comes, not once the head's prompt and latents (seconds with a real text encoder) are done."""
    import time

    from meshd.pipeline import generation

    prepare = generation.Sampler.prepare

    def slow_prepare(self):
        time.sleep(3)  # on the head's GPU worker, as a text encoder's first load would
        return prepare(self)

    monkeypatch.setattr(generation.Sampler, "prepare", slow_prepare)
    async with head_and_stage(tmp_path) as (a, b):
        async def refuse(request):
            raise MeshError("busy", "stage-b holds too many jobs")

        b.extra_ops["prepare"] = refuse
        started = time.monotonic()
        with pytest.raises(MeshError, match="stage-b holds too many jobs") as raised:
            await split(a, b)
        assert raised.value.code == "busy" and time.monotonic() - started < 2.5
