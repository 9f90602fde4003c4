"""Compiled blocks: one graph per block class and size, compiled before a generation's first step and
announced, cached in the state dir, off where asked, and a compiled split equal to the compiled all-local run.

On the CPU these tests compile with torch.compile's "aot_eager" backend: Dynamo traces the same graphs
with the same guards (one per block class and shape) as inductor, without the minutes of C++ builds
inductor needs here. The inductor test runs on the GPU machine (``pytest -m gpu tests/test_compile.py``).
"""

import asyncio
import json
import os

import pytest
import torch
from torch._dynamo.utils import counters

from meshd.check import check_compile
from meshd.config import ConfigError, DaemonConfig, load_config
from meshd.pipeline.generation import GenerationParams, LocalRunner, run_generation
from meshd.node.gpu import GpuWorker
from meshd.model.compile_events import describe_event
from meshd.model.compiled import BlockCompiler, CompileCache, compiler_for, wanted
from meshd.model.files import ModelStore
from meshd.model.lora import LoraPatch
from meshd.model.runtime import HostedModel, open_source
from meshd.model.span import Conditioning, Stream
from meshtui.events import Compiling, Prepared, from_wire
from meshtui.runs import RunRecord, apply_event
from tests.daemons import running_daemon, split_generation

TINY_TXT = 32  # the tiny preset's max_sequence_length
PARAMS = {"prompt": "a lighthouse at dawn", "seed": 5, "width": 32, "height": 32, "steps": 2, "guidance": 1.0}


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def hosted(models, state, device="cpu", backend="aot_eager") -> HostedModel:
    source = open_source("tiny", ModelStore([models]))
    compiler = BlockCompiler(CompileCache(state / "compile"), source.model_id, backend=backend)
    return HostedModel(source, torch.device(device), torch.bfloat16, compiler=compiler)


async def local_latents(model: HostedModel, device: torch.device) -> torch.Tensor:
    """The all-local generation's final latents, every block on ``device``."""
    worker = GpuWorker(device)
    try:
        await worker.run(model.load, range(6), True, True)
        return (await run_generation(model, worker, GenerationParams(**PARAMS), LocalRunner(worker))).latents
    finally:
        worker.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def test_compile_setting_reads_toml_booleans_and_cli_words(tmp_path):
    toml = tmp_path / "meshd.toml"
    toml.write_text("[meshd]\ncompile = false\n")
    assert load_config(toml).compile == "off"
    assert load_config(toml, {"compile": "on"}).compile == "on"
    assert DaemonConfig().compile == "auto"
    toml.write_text('[meshd]\ncompile = "sometimes"\n')
    with pytest.raises(ConfigError, match="compile = 'sometimes' must be true, false or \"auto\""):
        load_config(toml)


def test_auto_compiles_on_cuda_only_and_says_why(tmp_path):
    assert wanted("auto", torch.device("cuda", 0))[0] is True
    on, why = wanted("auto", torch.device("cpu"))
    assert not on and "not a CUDA device" in why and "compile = true forces it" in why
    assert wanted("on", torch.device("cpu"))[0] is True
    assert wanted("off", torch.device("cuda", 0)) == (False, "off (compile = false)")
    assert compiler_for("auto", torch.device("cpu"), tmp_path, "tiny") == (None, wanted("auto", torch.device("cpu"))[1])


def test_every_block_of_a_class_shares_one_graph_per_size(models, tmp_path):
    model = hosted(models, tmp_path)
    with torch.inference_mode():
        model.load(range(6), True, True)
        assert model.span.block_call == model.compiler.call
        pending = model.compile_pending(TINY_TXT, 64)
        assert [s.kind for s in pending] == ["double", "single"]
        before = graphs()
        model.warm_compiled(TINY_TXT, 64)
        assert graphs() - before == 2  # 2 double + 4 single blocks: two graphs, not six
        assert model.compile_pending(TINY_TXT, 64) == []
        assert [s.img_tokens for s in model.compile_pending(TINY_TXT, 16)] == [16, 16]  # a new size compiles anew
        with_lora = model.compile_pending(TINY_TXT, 16, loras=("any",))
    assert with_lora == []  # LoRA jobs run eagerly: nothing to compile


def test_a_lora_job_compiles_the_vae_decoder_and_never_traces_the_blocks_with_its_hooks(models, tmp_path):
    """The decoder carries no LoRA, so a LoRA job's head compiles it for a new size like any other job; its
    blocks, hooked, are not traced (Dynamo does not guard on hooks: later jobs would inherit them)."""
    model = hosted(models, tmp_path)
    with torch.inference_mode():
        model.load(range(6), True, True)
        pending = model.compile_pending(TINY_TXT, 16, loras=("any",), decode_hw=(4, 4))
        assert [s.kind for s in pending] == ["vae"] and (pending[0].height, pending[0].width) == (8, 8)
        before = graphs()
        model.warm_compiled(TINY_TXT, 16, ("any",), (4, 4))
        assert graphs() - before == 1
        assert model.compile_pending(TINY_TXT, 16, decode_hw=(4, 4)) == model.compile_pending(TINY_TXT, 16)
        assert [s.kind for s in model.compile_pending(TINY_TXT, 16)] == ["double", "single"]
        latents = torch.randn(1, pending[0].channels, 8, 8).to(torch.bfloat16)
        model.vae().decode(latents, return_dict=False)  # the generation's decode meets the graph warmed for it
        assert graphs() - before == 1


def test_a_generation_at_a_new_size_announces_its_compile_and_then_never_recompiles(models, tmp_path):
    model = hosted(models, tmp_path)
    worker = GpuWorker(torch.device("cpu"))
    events = []

    async def generate(seed):
        return await run_generation(model, worker, GenerationParams(**{**PARAMS, "seed": seed}), LocalRunner(worker),
                                    metadata={"head": "here"}, progress=events.append)

    async def main():
        await worker.run(model.load, range(6), True, True)
        first = await generate(1)
        compiled_graphs = graphs()
        second = await generate(2)
        return first, second, compiled_graphs

    try:
        first, second, compiled_graphs = asyncio.run(main())
    finally:
        worker.shutdown()
    kinds = [e["kind"] for e in events]
    assert kinds[:2] == ["compiling", "compiled"] and kinds.count("compiling") == 1  # the second run waits on nothing
    compiling = events[0]
    assert compiling["size"] == "32x32" and compiling["tokens"] == TINY_TXT + 64 and compiling["cached"] is False
    assert describe_event(compiling) == "compiling blocks 0-5 and the VAE decoder on here for 32x32 (first time)"
    assert kinds.index("compiled") < kinds.index("step")  # before the first step, never inside one
    assert graphs() == compiled_graphs
    assert first.summary["compile_s"] > 0 and second.summary["compile_s"] == 0 and second.summary["compiled"]


def test_the_cache_index_survives_a_restart_and_feeds_the_estimate(models, tmp_path):
    first = hosted(models, tmp_path)
    with torch.inference_mode():
        first.load(range(6), True, True)
        first.warm_compiled(TINY_TXT, 64)
    restarted = hosted(models, tmp_path)  # a new daemon on the same state dir
    restarted.load(range(6), True, True)
    pending = restarted.compile_pending(TINY_TXT, 64)
    assert len(pending) == 2  # this process has not traced them yet ...
    estimate, cached = restarted.compiler.estimate(pending)
    assert cached is True and estimate is not None  # ... but the cache has them, with their times
    new_size, cached = restarted.compiler.estimate(restarted.compile_pending(TINY_TXT, 16))
    assert cached is False and new_size is not None  # a new size: estimated from the classes' first compiles
    index = json.loads((tmp_path / "compile" / "index.json").read_text())
    assert len(index["entries"]) == 2 and all("cold_s" in e for e in index["entries"].values())


def test_a_damaged_or_oversized_index_counts_as_an_empty_cache(tmp_path):
    cache = CompileCache(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    assert cache.index() == {}
    (tmp_path / "index.json").write_text(json.dumps({"entries": {"k": {"cold_s": 1}}, "pad": "x" * (2 << 20)}))
    assert cache.index() == {}
    cache.record("k", 2.5, cached=False)
    assert cache.index()["k"]["cold_s"] == 2.5


def test_a_lora_job_runs_its_hooks_although_the_blocks_were_compiled_without_them(models, tmp_path):
    """Compiled graphs do not see forward hooks added later: with LoRAs the blocks must run eagerly."""
    compiled, eager = hosted(models, tmp_path), HostedModel(open_source("tiny", ModelStore([models])),
                                                            torch.device("cpu"), torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    d = compiled.preset.hidden
    rand = lambda *size: torch.randn(*size, generator=gen).to(torch.bfloat16)  # noqa: E731
    txt, img, cond = rand(1, TINY_TXT, d), rand(1, 64, d), Conditioning(rand(1, d), rand(1, 6 * d), rand(1, 6 * d),
                                                                         rand(1, 3 * d))
    factors = None
    outputs = []
    with torch.inference_mode():
        for model in (compiled, eager):
            model.load(range(6), True, True)
            model.warm_compiled(TINY_TXT, 64)  # graphs exist, traced without hooks (a no-op when eager)
            if factors is None:
                layers = {n: m for n, m in model.span.named_modules() if n.endswith(("attn.to_q", "to_qkv_mlp_proj"))}
                factors = {n: (rand(2, m.in_features), rand(m.out_features, 2)) for n, m in layers.items()}
            model._lora_patch = LoraPatch(model.span, factors)  # what use_loras does, minus the files
            model._choose_block_call()
            rotary = model.span.rotary(torch.zeros(TINY_TXT, 4, dtype=torch.long), torch.zeros(64, 4, dtype=torch.long))
            outputs.append(model.span.run(0, 6, Stream(TINY_TXT, pair=(txt, img)), cond, rotary).as_joint())
        assert compiled.span.block_call is None
        assert torch.equal(outputs[0], outputs[1])
        compiled._drop_lora_patch()
        compiled._choose_block_call()
        assert compiled.span.block_call == compiled.compiler.call  # the next job without LoRAs compiles again


def test_a_compiled_split_equals_the_compiled_all_local_run(models, tmp_path):
    """Cut inside the double blocks: the stage gets the joint stream and splits it before block 1."""
    spec, head_blocks, stage_blocks = "A:0-0,B:1-5", "0", "1-5"
    async def local():
        return await local_latents(hosted(models, tmp_path / "local"), torch.device("cpu"))

    async def split():
        async with running_daemon(tmp_path / "a", None, models_dir=models, compile_backend="aot_eager") as a, \
                running_daemon(tmp_path / "b", None, models_dir=models, compile_backend="aot_eager") as b:
            # Both daemons share this one process (one Dynamo cache, one global torch state): the head
            # loading its text encoder or its VAE (its sampler's prepare) while the stage compiles would
            # make the stage's graphs miss, which daemons in processes of their own never see. So the
            # head's prompt is embedded and its VAE read up front.
            await a.worker.run(a.model.encode_prompts, [PARAMS["prompt"]])
            await a.worker.run(a.model.vae)

            def on_event(event):
                if isinstance(event, Prepared):
                    graphs_at_prepared.append(graphs())
            outcome = await split_generation(None, [a.bound, b.bound], spec, PARAMS, codec="raw", return_latents=True,
                                             on_event=on_event)
            return outcome, a.node_info()["compile"], b.node_info()["compile"]

    graphs_at_prepared = []
    expected = asyncio.run(local())
    outcome, head, stage = asyncio.run(split())
    assert torch.equal(outcome.latents, expected)
    # No peer compiled anything once the steps began (a stage's received tensors included).
    assert graphs_at_prepared == [graphs()]
    assert head["on"] and stage["on"] and head["compiled_shapes"] >= 1 and stage["compiled_shapes"] >= 1
    # Each peer compiled its own blocks for 32x32 before the first step, and said so up the line: the
    # stage during its prepare, the head (blocks and VAE decoder at once) after preparing its sampler.
    announced = [e for e in outcome.events if isinstance(e, Compiling)]
    assert {e.size for e in announced} == {"32x32"}
    assert sorted(e.blocks for e in announced) == sorted([head_blocks, stage_blocks])
    vae = [e for e in announced if e.vae]
    assert len(vae) == 1 and vae[0].blocks == head_blocks
    assert vae[0].describe().startswith(f"compiling blocks {head_blocks} and the VAE decoder on ")


def test_the_gpu_thread_compiles_more_graphs_than_dynamos_default_limit(models, tmp_path):
    """Dynamo's config is per thread: the recompile limit the compiler raised where it was made (the main
    thread) did not hold on the GPU thread, whose 9th graph (5 sizes of a double and a single block here,
    or fewer after other models' graphs in one process) failed with FailOnRecompileLimitHit."""
    model = hosted(models, tmp_path)

    async def compile_sizes():
        worker = GpuWorker(torch.device("cpu"))
        try:
            await worker.run(model.load, range(6), True, True)
            for side in range(1, 6):
                await worker.run(model.warm_compiled, TINY_TXT, side * side)
        finally:
            worker.shutdown()

    asyncio.run(compile_sizes())
    assert len(model.compile_pending(TINY_TXT, 25)) == 0 and model.compiler.status()["compiled_shapes"] == 10


def test_the_dashboard_and_check_show_compiling(tmp_path):
    record = RunRecord(1, 0.0, GenerationParams("p", 1, 1024, 1024, 4, 1.0), "A:0-15,B:16-31")
    event = {"kind": "compiling", "node": "b", "blocks": "16-31", "size": "1024x1024", "cached": False,
             "estimate_s": 18.2}
    assert apply_event(record, from_wire(event)).phase == "compiling blocks 16-31 on b for 1024x1024 (first time, ~18 s)"
    assert (apply_event(record, from_wire({"kind": "compiled", "node": "b", "seconds": 17.5})).phase
            == "compiled on b in 17.5 s")
    findings = list(check_compile(DaemonConfig(device="cpu", state_dir=tmp_path)))
    assert findings[0].text.startswith("compiled blocks off: cpu is not a CUDA device")
    assert "is empty" in findings[-1].text
    CompileCache(tmp_path / "compile").record("tiny|single|96|bfloat16|cpu|torch x", 3.0, cached=False)
    findings = list(check_compile(DaemonConfig(device="cpu", compile="on", state_dir=tmp_path)))
    assert findings[0].text.startswith("compiled blocks on (compile = true)")
    assert "1 block graphs" in findings[-1].text and "tiny single @96 tokens 3 s" in findings[-1].text


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["A:0-0,B:1-5", "A:0-3,B:4-5"])
def test_inductor_compiled_split_equals_compiled_local_on_cuda(models, tmp_path, spec):
    """The real backend on the GPU: bit-for-bit (raw codec), and compiled differs from eager only by rounding."""
    async def local(compiled: bool):
        model = hosted(models, tmp_path / "local", device="cuda", backend="inductor")
        if not compiled:
            model.compiler = None
        return await local_latents(model, torch.device("cuda", 0))

    async def split():
        # Both daemons live in this process: CUDA IPC cannot map a process's own memory, so shared host
        # memory carries raw.
        kw = dict(models_dir=models, compile_backend="inductor", device="cuda", same_host_ipc=False)
        async with running_daemon(tmp_path / "a", None, **kw) as a, running_daemon(tmp_path / "b", None, **kw) as b:
            return await split_generation(None, [a.bound, b.bound], spec, PARAMS, codec="raw", return_latents=True)

    expected = asyncio.run(local(True))
    eager = asyncio.run(local(False))
    outcome = asyncio.run(split())
    assert torch.equal(outcome.latents, expected)
    assert ((eager - expected).norm() / eager.norm()) < 0.05


def test_serve_compiles_the_default_size_before_it_is_ready(models, tmp_path, caplog):
    from meshd.node.lifecycle import _warm_default
    from meshd.node.sdnotify import Notifier

    model = hosted(models, tmp_path)
    with torch.inference_mode():
        model.load(range(6), True, True)
    with caplog.at_level("INFO", logger="meshd"):
        _warm_default(model, Notifier())
    side = model.preset.default_size
    assert f"compiling blocks 0-5 and the VAE decoder for {side}x{side} (first time)" in caplog.text
    txt_len, img_tokens, decode_hw = model.default_geometry()
    assert (txt_len, img_tokens) == (TINY_TXT, (side // model.preset.size_multiple) ** 2) and decode_hw is not None
    assert model.compile_pending(txt_len, img_tokens, decode_hw=decode_hw) == []


def test_inductor_caches_go_to_the_state_dir_unless_the_user_chose_a_place(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing diffusers leaves there
    assert CompileCache(tmp_path / "state").activate() == tmp_path / "state" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "state" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert CompileCache(tmp_path / "other").activate() == tmp_path / "mine"


def test_an_inherited_cache_folder_this_user_cannot_write_is_not_taken_for_a_choice(tmp_path, monkeypatch):
    # On the H200 a daemon started by root as another user inherited /tmp/torchinductor_root and the
    # first compile failed there with "Permission denied". A folder that cannot be created (its
    # nearest existing parent is a plain file: refused to root too) stands in for it.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(blocker / "inductor"))
    assert CompileCache(tmp_path / "state").activate() == tmp_path / "state" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "state" / "inductor")
