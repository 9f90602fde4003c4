"""LoRAs: every peer applies a LoRA to the layers it holds, from its own copy found by hash; a split
generation with LoRAs equals the all-local one bit for bit; the three common file formats mean the
same thing; taking LoRAs off restores the model exactly; a peer without the file refuses by name.
"""

import hashlib
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from meshd.errors import MeshError
from meshd.pipeline.generation import GenerationParams, LocalRunner, run_generation
from meshd.node.gpu import GpuWorker
from meshd.model.files import ModelStore
from meshd.model.lora import (
    MAX_LORAS,
    LoraError,
    LoraFile,
    LoraSpec,
    LoraStore,
    loras_from_wire,
    loras_to_wire,
)
from meshd.model.presets import PRESETS
from meshd.model.runtime import HostedModel, open_source
from meshd.model.span import Stream
from tests.test_checkpoints import bfl_name, to_bfl

PRESET = PRESETS["tiny"]
RANK = 4
ALPHA = 2.0  # alpha / rank = 0.5: exact in binary, so every format scales to the same bits
CPU = torch.device("cpu")

#: Layers the test LoRA adapts (diffusers names): attention, MLPs, fused single-block layers, and the
#: head and tail modules (x/context embedders, a modulation, the final adaLN and projection).
ADAPTED = [
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.ff.linear_in",
    "transformer_blocks.1.ff_context.linear_out", "transformer_blocks.1.attn.to_add_out",
    "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.1.attn.to_out",
    "single_transformer_blocks.3.attn.to_qkv_mlp_proj", "x_embedder", "context_embedder",
    "double_stream_modulation_img.linear", "norm_out.linear", "proj_out",
]


def make_factors(shapes: dict[str, tuple[int, int]], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Known LoRA factors (A: rank x in, B: out x rank) per adapted layer. The q/k/v of one attention share
    their A, as a LoRA trained on BFL's fused ``qkv`` does."""
    g = torch.Generator().manual_seed(seed)
    factors, shared = {}, {}
    for module in ADAPTED:
        out_f, in_f = shapes[module]
        fused, third = bfl_name(module)
        if third is not None and fused in shared:
            down = shared[fused]
        else:
            down = torch.randn(RANK, in_f, generator=g) / math.sqrt(in_f)
            shared[fused] = down
        factors[module] = (down, torch.randn(out_f, RANK, generator=g) * 0.3)
    return factors


def write_peft(path, factors) -> None:
    """diffusers / PEFT: ``transformer.`` + diffusers names, alpha in diffusers' adapter metadata."""
    tensors = {}
    for module, (down, up) in factors.items():
        tensors[f"transformer.{module}.lora_A.weight"] = down.clone()  # PEFT stores q, k and v's A apart
        tensors[f"transformer.{module}.lora_B.weight"] = up
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": ALPHA})}
    save_file(tensors, str(path), metadata=meta)


def _bfl_factors(factors):
    ups = {k[: -len(".weight")]: v for k, v in to_bfl({f"{m}.weight": up for m, (_, up) in factors.items()}).items()}
    return {bfl_name(m)[0]: (down, ups[bfl_name(m)[0]]) for m, (down, _) in factors.items()}


def write_bfl(path, factors, alpha: float | None = ALPHA, prefix: str = "diffusion_model.") -> None:
    """ai-toolkit / BFL: ``diffusion_model.`` + BFL names (q/k/v fused, final adaLN in BFL order)."""
    tensors = {}
    for module, (down, up) in _bfl_factors(factors).items():
        tensors[f"{prefix}{module}.lora_A.weight"] = down
        tensors[f"{prefix}{module}.lora_B.weight"] = up
        if alpha is not None:
            tensors[f"{prefix}{module}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))


def write_kohya(path, factors) -> None:
    """kohya / ComfyUI: ``lora_unet_`` + BFL names with underscores, lora_down / lora_up + alpha."""
    tensors = {}
    for module, (down, up) in _bfl_factors(factors).items():
        key = "lora_unet_" + module.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    save_file(tensors, str(path))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny model, and two LoRAs in every format in a LoRA folder."""
    root = tmp_path_factory.mktemp("lora-world")
    models, loras = root / "models", root / "loras"
    loras.mkdir()
    store = ModelStore([models])
    probe = HostedModel(open_source("tiny", store), CPU, torch.bfloat16)
    from meshd.model.checkpoints import expected_shapes

    shapes = {n[: -len(".weight")]: s for n, s in expected_shapes(probe.preset).items() if len(s) == 2}
    style, detail = make_factors(shapes, 1), make_factors(shapes, 2)
    write_peft(loras / "style-peft.safetensors", style)
    write_bfl(loras / "style-bfl.safetensors", style)
    write_bfl(loras / "style-comfy.safetensors", style, prefix="model.diffusion_model.")
    write_kohya(loras / "style-kohya.safetensors", style)
    (loras / "more").mkdir()
    write_kohya(loras / "more" / "detail.safetensors", detail)
    return {"models": models, "loras": loras, "style": style, "shapes": shapes}


def spec(world, name, strength=1.0) -> LoraSpec:
    return LoraStore([world["loras"]]).spec(name, strength)


def model(world, blocks=range(6), head=True, tail=True, dtype=torch.bfloat16) -> HostedModel:
    m = HostedModel(open_source("tiny", ModelStore([world["models"]])), CPU, dtype)
    m.load(blocks, head, tail)
    return m


def carry(m: HostedModel, specs, store: LoraStore) -> None:
    """What a daemon does: give the model its peer's LoRA folders, then ask for a request's LoRAs."""
    m.lora_store = store
    m.use_loras(specs)


def inputs(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(5)
    latents, text = torch.randn(1, 16, 16, generator=g).to(dtype), torch.randn(1, 8, 48, generator=g).to(dtype)
    ids_img = torch.cartesian_prod(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), torch.zeros(1))
    ids_txt = torch.cartesian_prod(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.arange(8.0))
    return latents, text, ids_txt, ids_img


def forward(*stages: tuple[HostedModel, int, int]) -> torch.Tensor:
    """One transformer forward through ``(model, start, end)`` stages, each computing its own RoPE; the
    stream crosses between stages as the raw codec sends it (the joint tensor, copied)."""
    latents, text, ids_txt, ids_img = inputs(stages[0][0].dtype)
    head = stages[0][0].span
    cond = head.conditioning(torch.tensor([0.7]), None, stages[0][0].dtype)
    stream = Stream(8, pair=(head.embed_text(text), head.embed_image(latents)))
    with torch.inference_mode():
        for m, start, end in stages:
            stream = m.span.run(start, end, Stream(8, joint=stream.as_joint().clone()), cond,
                                m.span.rotary(ids_txt, ids_img))
        return stages[-1][0].span.final(stream, cond.temb)


def hooks(m: HostedModel) -> int:
    return sum(len(module._forward_hooks) for module in m.span.modules())


# --- the formats mean the same thing --------------------------------------------------------------

def test_peft_bfl_and_kohya_files_of_one_lora_give_the_same_model(world):
    outputs = []
    for name in ("style-peft", "style-bfl", "style-kohya", "style-comfy"):
        m = model(world)
        carry(m, [spec(world, name, 0.8)], LoraStore([world["loras"]]))
        outputs.append(forward((m, 0, 6)))
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])
    assert LoraFile.open(world["loras"] / "style-kohya.safetensors", PRESET).format == "kohya"
    assert LoraFile.open(world["loras"] / "style-bfl.safetensors", PRESET).format == "BFL/ai-toolkit"
    assert LoraFile.open(world["loras"] / "style-peft.safetensors", PRESET).format == "diffusers/PEFT"


@pytest.mark.parametrize("name", ["style-peft", "style-bfl", "style-kohya"])
def test_a_lora_adds_strength_times_alpha_over_rank_times_BA_to_each_layer(world, name):
    """Checked against the merged weight W + s (alpha/r) B A, in float32, layer by layer."""
    m = model(world, dtype=torch.float32)
    before = {k: v.clone() for k, v in m.span.state_dict().items()}
    strength = 0.75
    carry(m, [spec(world, name, strength)], LoraStore([world["loras"]]))
    g = torch.Generator().manual_seed(9)
    for layer, (down, up) in world["style"].items():
        module = m.span.get_submodule(layer)
        x = torch.randn(3, module.in_features, generator=g)
        merged = module.weight.double() + strength * (ALPHA / RANK) * (up.double() @ down.double())
        expected = torch.nn.functional.linear(x.double(), merged)
        with torch.inference_mode():
            got = module(x)
        assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-5), layer
    assert all(torch.equal(v, before[k]) for k, v in m.span.state_dict().items())  # weights never written


def test_kohya_scaling_agrees_with_diffusers_own_converter(world):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux2_lora_to_diffusers

    path = world["loras"] / "style-kohya.safetensors"
    theirs = _convert_kohya_flux2_lora_to_diffusers(load_file(str(path)))
    ours = LoraFile.open(path, PRESET).factors(set(world["shapes"]))
    compared = 0
    for layer, (down, up) in ours.items():
        a, b = theirs.get(f"transformer.{layer}.lora_A.weight"), theirs.get(f"transformer.{layer}.lora_B.weight")
        if a is None:
            continue  # diffusers' kohya converter skips the modulations and the final adaLN
        assert torch.allclose(up @ down, b.float() @ a.float(), atol=1e-6), layer
        compared += 1
    assert compared >= 12


# --- split equals all-local ------------------------------------------------------------------------

class InProcessSplit:
    """The head's blocks here, the rest on other HostedModels: what the daemons do, minus the sockets
    (the raw codec sends the stream's exact bits, so a copy stands in for the wire)."""

    def __init__(self, worker, stages):
        self.worker, self.stages = worker, stages

    async def forward(self, sampler, step, pass_index, cond):
        def compute():
            stream = sampler.embed(pass_index)
            for m, start, end in self.stages:
                rotary = m.span.rotary(sampler.text_ids, sampler.latent_ids)
                stream = m.span.run(start, end, Stream(stream.txt_len, joint=stream.as_joint().clone()), cond, rotary)
            return self.stages[-1][0].span.final(stream, cond.temb)

        prediction, seconds = await self.worker.run(compute)
        return prediction, {"compute_ms": seconds * 1e3, "hops": []}


def peer_folder(world, tmp_path, name, files):
    """A peer's own LoRA folder with its own copies (renamed: the hash finds them, not the name)."""
    folder = tmp_path / name
    folder.mkdir()
    for i, file in enumerate(files):
        shutil.copy(world["loras"] / file, folder / f"copy-{i}-{file.replace('/', '-')}")
    return folder


async def test_a_split_generation_with_loras_equals_the_all_local_one(world, tmp_path):
    specs = [spec(world, "style-bfl", 0.9), spec(world, "more/detail", -0.6)]  # two LoRAs stacked
    plain_params = GenerationParams(prompt="a lighthouse at dawn", seed=3, width=64, height=64, steps=3)
    params = GenerationParams(**{**plain_params.__dict__, "loras": tuple(specs)})
    worker = GpuWorker(CPU)
    try:
        local = model(world)
        local.lora_store = LoraStore([world["loras"]])  # the job's params say which LoRAs to carry
        reference = await run_generation(local, worker, params, LocalRunner(worker))
        plain = await run_generation(local, worker, plain_params, LocalRunner(worker))

        files = ["style-bfl.safetensors", "more/detail.safetensors"]
        head, mid, tail = model(world, [0], True, False), model(world, [1, 2, 3], False, False), \
            model(world, [4, 5], False, True)
        stores = {}
        for name, m in (("head", head), ("mid", mid), ("tail", tail)):
            stores[name] = LoraStore([peer_folder(world, tmp_path, name, files)])
            m.lora_store = stores[name]
            await worker.run(m.use_loras, specs)
        split = await run_generation(head, worker, params, InProcessSplit(worker, [(head, 0, 1), (mid, 1, 4),
                                                                                   (tail, 4, 6)]))
    finally:
        worker.shutdown()
    assert torch.equal(split.latents, reference.latents)
    assert split.png == reference.png
    assert not torch.equal(plain.latents, reference.latents)  # the LoRAs did change the image
    # Each peer read only the factors of the layers it holds.
    for name, m in (("head", head), ("mid", mid), ("tail", tail)):
        for s in specs:
            lora = stores[name].open(s, PRESET)
            held = {n for n, mod in m.span.named_modules() if isinstance(mod, torch.nn.Linear)}
            own = [mod for mod in lora.modules.values() if held.intersection(mod.targets)]
            assert lora.tensors_read == sum(2 + (mod.alpha is not None) for mod in own) > 0
            assert len(own) < len(lora.modules)


def test_cut_inside_the_double_blocks_with_a_lora_equals_local(world):
    store = LoraStore([world["loras"]])
    s = [spec(world, "style-kohya", 1.3)]
    local, a, b = model(world), model(world, [0], True, False), model(world, [1, 2, 3, 4, 5], False, True)
    for m in (local, a, b):
        carry(m, s, store)
    assert torch.equal(forward((local, 0, 6)), forward((a, 0, 1), (b, 1, 6)))


# --- applying, stacking, reverting ------------------------------------------------------------------

def test_removing_loras_restores_the_model_exactly_and_setting_is_idempotent(world):
    m = model(world)
    store = LoraStore([world["loras"]])
    weights = {k: v.clone() for k, v in m.span.state_dict().items()}
    plain = forward((m, 0, 6))
    one = [spec(world, "style-peft")]
    carry(m, one, store)
    patched = forward((m, 0, 6))
    assert not torch.equal(patched, plain)
    carry(m, one, store)  # again: nothing stacks twice
    assert hooks(m) == len(ADAPTED) and torch.equal(forward((m, 0, 6)), patched)
    carry(m, one + [spec(world, "more/detail", 0.5)], store)
    stacked = forward((m, 0, 6))
    assert hooks(m) == len(ADAPTED) and not torch.equal(stacked, patched)  # one hook per layer, stacked inside
    carry(m, one, store)
    assert torch.equal(forward((m, 0, 6)), patched)
    carry(m, [], store)
    assert hooks(m) == 0 and m.loras == ()
    assert torch.equal(forward((m, 0, 6)), plain)
    assert all(torch.equal(v, weights[k]) for k, v in m.span.state_dict().items())


def test_loras_follow_the_span_when_it_is_reloaded(world):
    store = LoraStore([world["loras"]])
    s = [spec(world, "style-bfl", 0.7)]
    m = HostedModel(open_source("tiny", ModelStore([world["models"]])), CPU, torch.bfloat16)
    carry(m, s, store)  # before anything is loaded
    m.load([4, 5], False, True)
    m.load(range(6), True, True)  # grow: the new layers get the LoRA too
    reference = model(world)
    carry(reference, s, store)
    assert torch.equal(forward((m, 0, 6)), forward((reference, 0, 6)))


# --- refusals ---------------------------------------------------------------------------------------

def test_a_peer_without_the_lora_refuses_naming_it_and_its_folders(world, tmp_path):
    m = model(world, [3, 4, 5], False, True)
    empty = tmp_path / "my-loras"
    empty.mkdir()
    s = spec(world, "style-kohya")
    with pytest.raises(LoraError) as info:
        carry(m, [s], LoraStore([empty]))
    assert "style-kohya" in str(info.value) and str(empty) in str(info.value) and s.sha256[:12] in str(info.value)
    assert m.loras == () and hooks(m) == 0


def test_a_peer_with_another_version_of_the_file_says_so(world, tmp_path):
    folder = tmp_path / "v2"
    folder.mkdir()
    write_kohya(folder / "style-kohya.safetensors", make_factors(world["shapes"], 7))
    m = model(world, [3], False, False)
    good = spec(world, "style-peft")
    carry(m, [good], LoraStore([world["loras"]]))
    with pytest.raises(LoraError, match="another version of the file"):
        carry(m, [spec(world, "style-kohya")], LoraStore([folder]))
    assert m.loras == (good,)  # a refusal changes nothing


def test_no_lora_folder_configured_is_said_plainly(world):
    with pytest.raises(LoraError, match="no LoRA folders are configured"):
        carry(model(world, [0], True, False), [spec(world, "style-peft")], LoraStore([]))


def test_a_peer_without_lora_folders_refuses_loras_and_still_runs_without(world):
    m = model(world, [0], True, False)
    assert m.lora_store is None
    with pytest.raises(LoraError, match=r"this peer has no LoRA folder configured \(lora_dir\)"):
        m.use_loras([spec(world, "style-peft")])
    assert m.loras == () and hooks(m) == 0
    m.use_loras([])  # a request without LoRAs needs no folder


def lora_file(tmp_path, tensors) -> LoraFile:
    save_file(tensors, str(tmp_path / "x.safetensors"))
    return LoraFile.open(tmp_path / "x.safetensors", PRESET)


@pytest.mark.parametrize("tensors,cause", [
    ({"lora_unet_single_blocks_0_linear1.lokr_w1": torch.zeros(2, 2)}, "LoKr"),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
      "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2)}, "text encoder"),
    ({"diffusion_model.double_blocks.0.img_mod.lin.lora_A.weight": torch.zeros(2, 64),
      "diffusion_model.double_blocks.0.img_mod.lin.lora_B.weight": torch.zeros(384, 2)}, "does not have"),
    ({"diffusion_model.single_blocks.0.linear1.lora_A.weight": torch.zeros(2, 3072),
      "diffusion_model.single_blocks.0.linear1.lora_B.weight": torch.zeros(27648, 2)}, "made for another model"),
    ({"transformer.proj_out.lora_A.weight": torch.zeros(2, 64)}, "lacks its up matrix"),
], ids=["lokr", "text-encoder", "flux1-layer", "other-size", "half-a-pair"])
def test_a_lora_meshd_cannot_apply_faithfully_is_refused_with_the_cause(tmp_path, tensors, cause):
    with pytest.raises(LoraError, match=cause):
        lora_file(tmp_path, tensors)


def test_store_names_files_by_name_and_hash(world):
    store = LoraStore([world["loras"]])
    s = store.spec("more/detail", 0.5)
    assert s.sha256 == sha256(world["loras"] / "more" / "detail.safetensors")
    assert store.find(s) == world["loras"] / "more" / "detail.safetensors"
    assert store.find(LoraSpec("renamed-elsewhere", s.sha256)) == world["loras"] / "more" / "detail.safetensors"
    with pytest.raises(LoraError, match="no LoRA named"):
        store.spec("nope")


def test_a_lookup_that_finds_nothing_walks_the_lora_folders_once(world, monkeypatch):
    """A failed name lookup also names a link out of the folders with that name: both from one walk (a
    ComfyUI loras/ tree on a network drive is slow to list)."""
    import pathlib

    walks = []
    rglob = pathlib.Path.rglob
    monkeypatch.setattr(pathlib.Path, "rglob", lambda self, *a, **kw: walks.append(self) or rglob(self, *a, **kw))
    store = LoraStore([world["loras"]])
    with pytest.raises(LoraError, match="no LoRA named nope"):
        store.spec("nope")
    assert walks == [world["loras"].resolve()]


def test_a_lora_folder_given_twice_or_inside_another_lists_each_lora_once(world, tmp_path):
    """Found by review: lora_dir set to the folder ComfyUI's models/loras links to listed every LoRA twice, and
    asking for one by name said it was ambiguous between a file and itself: the folders were compared as
    spelled. They are compared where they really are (the first spelling kept), and a LoRA folder inside
    another (lora_dir a sub-folder of ComfyUI's loras/) has each file once, named as in the first."""
    from meshd.check import check_models
    from meshd.config import DaemonConfig
    from meshd.model.comfyui import lora_dirs

    install, loras = tmp_path / "ComfyUI", world["loras"]
    (install / "models").mkdir(parents=True)
    (install / "models" / "loras").symlink_to(loras, target_is_directory=True)
    config = DaemonConfig(models_dir=(), lora_dir=(loras,), comfyui_dir=install, state_dir=tmp_path / "state")
    assert config.lora_dirs == (loras,)
    assert lora_dirs([install / "models" / "loras", loras, tmp_path / "." / "ComfyUI" / "models" / "loras"],
                     None) == (install / "models" / "loras",)
    detail = loras / "more" / "detail.safetensors"
    for store in (LoraStore(config.lora_dirs), LoraStore([install / "models" / "loras", loras]),
                  LoraStore([loras, loras / "more"])):
        files, _ = store.scan()
        assert len(files) == len(set(files)) == 5, files
        assert store.spec("detail").sha256 == sha256(detail)  # one file, not "ambiguous" between it and itself
        assert store.name_of(detail) == "more/detail"
    found = [f for f in check_models(config) if f.topic == "loras"]
    assert len(found) == 5 and all(f.level == "ok" for f in found), [f.text for f in found]


# --- the request's LoRA list from the wire ----------------------------------------------------------

def test_lora_specs_round_trip_and_untrusted_input_is_refused():
    good = LoraSpec("style.safetensors", "AB" * 32, 0.5)
    assert good.sha256 == "ab" * 32
    assert loras_from_wire(loras_to_wire([good])) == (good,)
    assert loras_from_wire(None) == ()
    bad = [
        "not a list",
        [{"name": "x", "sha256": "ab" * 32, "strength": 1.0}] * (MAX_LORAS + 1),
        [{"name": "x", "sha256": "ab" * 32}, {"name": "y", "sha256": "ab" * 32}],
        ["not a map"],
        [{"name": "../../etc/passwd", "sha256": "ab" * 32}],
        [{"name": "", "sha256": "ab" * 32}],
        [{"name": 7, "sha256": "ab" * 32}],
        [{"name": "x\n", "sha256": "ab" * 32}],
        [{"name": "x", "sha256": "zz" * 32}],
        [{"name": "x", "sha256": "ab" * 31}],
        [{"name": "x", "sha256": "ab" * 32, "strength": True}],
        [{"name": "x", "sha256": "ab" * 32, "strength": float("nan")}],
        [{"name": "x", "sha256": "ab" * 32, "strength": 11}],
        [{"name": "x", "sha256": "ab" * 32, "strength": "1"}],
    ]
    for data in bad:
        with pytest.raises(MeshError) as info:
            loras_from_wire(data)
        assert info.value.code == "bad-request"


def test_lora_spec_is_frozen():
    s = LoraSpec("x", "ab" * 32)
    with pytest.raises(AttributeError):
        s.strength = 2.0  # type: ignore[misc]


def test_check_lists_each_lora_with_its_format_and_the_models_it_fits(world, tmp_path):
    from meshd.model.inventory import inventory_loras

    reports = {r.name: r for r in inventory_loras(LoraStore([world["loras"]]))}
    assert set(reports) == {"style-peft", "style-bfl", "style-kohya", "style-comfy", "more/detail"}
    assert all(r.ok and r.summary.endswith("fits tiny") for r in reports.values())
    assert reports["more/detail"].summary.startswith(f"kohya, rank {RANK}, {len(ADAPTED)} layers")
    assert reports["more/detail"].sha256 == sha256(world["loras"] / "more" / "detail.safetensors")
    save_file({"lora_unet_single_blocks_0_linear1.lokr_w1": torch.zeros(2, 2)}, str(tmp_path / "lokr.safetensors"))
    (bad,) = inventory_loras(LoraStore([tmp_path]))
    assert not bad.ok and "LoKr" in bad.problem
    # `meshd check` lists them the same way.
    from meshd.check import check_models
    from meshd.config import DaemonConfig

    findings = [f for f in check_models(DaemonConfig(models_dir=(), lora_dir=(world["loras"], tmp_path),
                                                     state_dir=tmp_path / "state")) if f.topic == "loras"]
    assert len(findings) == 6 and sum(f.level == "note" for f in findings) == 1
    assert any("more/detail: kohya, rank" in f.text for f in findings)
