"""A split whose peers hold fp8 or GGUF weights (as stored, or quantised at load) computes the same latents
as the all-local run with the same weights, bit for bit over the raw codec, with the blocks eager or compiled
(torch.compile's aot_eager backend on the CPU: Dynamo traces the quantised layers' dequantisation into the
block graphs as inductor does on the GPU); peers holding the same file at different precisions refuse to
form one plan, naming the difference."""

import pytest
import torch

import meshd.pipeline.generation as gen
from meshd import auth
from meshd.errors import MeshError
from meshd.node.gpu import GpuWorker
from meshd.node.info import ModelInfo
from meshd.model.compiled import BlockCompiler, CompileCache
from meshd.model.files import ModelStore
from meshd.model.runtime import HostedModel, open_source
from meshd.model.tiny import write_tiny
from safetensors.torch import load_file
from meshd.wire.channel import Channel
from tests.daemons import running_daemon, split_generation
from tests.test_checkpoints import to_bfl
from tests.test_meshd_auth import plan_fields
from tests.test_precision import write_fp8, write_gguf

KEY = auth.generate_key()
PARAMS = {"prompt": "a lighthouse at dawn", "seed": 3, "width": 64, "height": 64, "steps": 2, "guidance": 1.0}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny diffusers folder (whose VAE and text encoder the single files borrow), an fp8 file with
    per-row scales and a GGUF file (Q8_0 blocks, Q4_K linear2)."""
    root = tmp_path_factory.mktemp("split-precision")
    write_tiny(root / "tiny")
    bfl = to_bfl(load_file(str(root / "tiny" / "transformer" / "diffusion_pytorch_model.safetensors")))
    write_fp8(root / "tiny-fp8.safetensors", bfl, per_row=True)
    write_gguf(root / "tiny-q.gguf", bfl, "Q4_K")
    return root


async def local_latents(models, name: str, weights: str, compile_dir=None) -> torch.Tensor:
    """The all-local run's final latents; its blocks compiled (aot_eager) when ``compile_dir`` is given."""
    source = open_source(name, ModelStore([models]))
    compiler = BlockCompiler(CompileCache(compile_dir), source.model_id, backend="aot_eager") if compile_dir else None
    model = HostedModel(source, torch.device("cpu"), torch.bfloat16, weights=weights, compiler=compiler)
    worker = GpuWorker(torch.device("cpu"))
    try:
        await worker.run(model.load, range(6), True, True)
        result = await gen.run_generation(model, worker, gen.GenerationParams(**PARAMS), gen.LocalRunner(worker))
    finally:
        worker.shutdown()
    return result.latents


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name,weights", [("tiny-fp8", "auto"), ("tiny-q", "auto"), ("tiny", "fp8"),
                                          ("tiny", "gguf-q8_0"), ("tiny", "gguf-q4_k")],
                         ids=["fp8-file", "gguf-file", "fp8-at-load", "q8_0-at-load", "q4_k-at-load"])
async def test_a_split_with_quantised_weights_equals_all_local_bit_for_bit(models, tmp_path, name, weights, compiled):
    backend = "aot_eager" if compiled else None
    expected = await local_latents(models, name, weights, tmp_path / "local" if compiled else None)
    async with running_daemon(tmp_path / "a", KEY, models_dir=models, model=name, weights=weights,
                              compile_backend=backend) as a, \
            running_daemon(tmp_path / "b", KEY, models_dir=models, model=name, weights=weights,
                           compile_backend=backend) as b:
        outcome = await split_generation(KEY, [a.bound, b.bound], "A:0-2,B:3-5", PARAMS, codec="raw",
                                         return_latents=True)
        assert a.model.identity.weights != "bf16"
        assert (a.model.span.block_call is not None) == compiled  # the blocks really ran compiled (or not)
    assert torch.equal(outcome.latents, expected)
    dense = await local_latents(models, "tiny", "bf16")
    assert not torch.equal(expected, dense)  # the quantised weights really were used


async def test_peers_holding_one_file_at_different_precisions_refuse_one_plan(models, tmp_path):
    async with running_daemon(tmp_path / "a", KEY, models_dir=models, model="tiny") as a, \
            running_daemon(tmp_path / "b", KEY, models_dir=models, model="tiny", weights="fp8") as b:
        # The client refuses before the head is asked (the head's own refusal names both the same way:
        # tests/test_meshd_auth.py); either way, one line naming both precisions.
        with pytest.raises(MeshError, match=r"different models: A serves .*weights bf16\); B serves .*weights fp8 "
                                            r"e4m3fn per-row 32, bf16 9"):
            await split_generation(KEY, [a.bound, b.bound], "A:0-2,B:3-5", PARAMS, codec="raw")
        # and the stage itself refuses a prepare that expects the other precision (the head's rule)
        channel = await Channel.connect(*b.bound, KEY)
        try:
            with pytest.raises(MeshError, match=r"weights fp8 e4m3fn per-row 32, bf16 9.*the plan expects .*weights bf16") \
                    as caught:
                await channel.request("prepare", plan_fields(b, [{"peer": "%s:%d" % b.bound, "start": 0, "end": 6}],
                                                             a.model.identity.to_dict()))
            # both sides in the one record's words (ModelInfo.describe), as the client's refusal names them
            assert caught.value.message == (f"{b.name} holds {ModelInfo.of(b.model.identity).describe()}; the plan "
                                            f"expects {ModelInfo.of(a.model.identity).describe()}")
        finally:
            await channel.close()
