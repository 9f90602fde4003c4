"""Loading a span from the checkpoints users have: a diffusers folder, the BFL single file, and ComfyUI
single files in bf16, fp8, scaled fp8 and mixed precision. Every layout is written here from the same
known weights (the tiny model's) and must load back to them; a span reads only its own tensors; a
wrong, partial or truncated file is refused with the cause; nothing outside the model folders is read.
"""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from meshd.model.checkpoints import bfl_linear_names
from meshd.model.files import ModelError, ModelStore
from meshd.model.precision import Fp8Linear, GgufLinear
from meshd.model.presets import PRESETS
from meshd.model.runtime import FolderSource, HostedModel, open_source
from meshd.model.span import block_prefix
from meshd.model.tiny import write_tiny

PRESET = PRESETS["tiny"]
FP8_MAX = 448.0  # largest float8_e4m3fn value

# --- writing checkpoints in each layout (an independent inverse of diffusers' converter) -------------

_DOUBLE = {"attn.to_out.0": "img_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
           "attn.to_add_out": "txt_attn.proj", "ff_context.linear_in": "txt_mlp.0",
           "ff_context.linear_out": "txt_mlp.2", "attn.norm_q": "img_attn.norm.query_norm",
           "attn.norm_k": "img_attn.norm.key_norm", "attn.norm_added_q": "txt_attn.norm.query_norm",
           "attn.norm_added_k": "txt_attn.norm.key_norm"}
_QKV = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
        "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
        "attn.add_v_proj": ("txt_attn.qkv", 2)}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
           "attn.norm_k": "norm.key_norm"}
_SHARED = {"x_embedder": "img_in", "context_embedder": "txt_in",
           "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
           "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
           "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
           "single_stream_modulation.linear": "single_stream_modulation.lin", "proj_out": "final_layer.linear",
           "norm_out.linear": "final_layer.adaLN_modulation.1"}


def bfl_name(module: str) -> tuple[str, int | None]:
    """A diffusers module's BFL name, and which third of the fused ``qkv`` it is (None if not fused)."""
    parts = module.split(".")
    if parts[0] not in ("transformer_blocks", "single_transformer_blocks"):
        return _SHARED[module], None
    double = parts[0] == "transformer_blocks"
    head, inner = f"{'double_blocks' if double else 'single_blocks'}.{parts[1]}", ".".join(parts[2:])
    if double and inner in _QKV:
        return f"{head}.{_QKV[inner][0]}", _QKV[inner][1]
    return f"{head}.{(_DOUBLE if double else _SINGLE)[inner]}", None


def to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers-named tensors as the BFL reference code stores them: q/k/v fused into ``qkv`` (rows
    concatenated), the final modulation's halves in (shift, scale) order, norm weights called ``scale``."""
    out, fused = {}, {}
    for name, value in state.items():
        module, leaf = name.rsplit(".", 1)
        target, third = bfl_name(module)
        if third is not None:
            fused.setdefault(f"{target}.{leaf}", [None] * 3)[third] = value
            continue
        if module == "norm_out.linear":
            scale, shift = value.chunk(2, dim=0)
            value = torch.cat([shift, scale], dim=0)
        out[f"{target}.{'scale' if target.endswith('_norm') else leaf}"] = value  # RMSNorm weights
    out.update({k: torch.cat(v, dim=0) for k, v in fused.items()})
    return out


def scaled_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's scaled fp8: e4m3 values and one float32 scale per tensor."""
    scale = (w.float().abs().max() / FP8_MAX).reshape(())
    return (w.float() / scale).to(torch.float8_e4m3fn), scale


def dequantized(q: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    return (q.float() * scale if scale is not None else q.float()).to(torch.bfloat16)


def write_single(path, bfl: dict[str, torch.Tensor], prefix: str = "", mode: str = "bf16",
                 scale_name: str = "weight_scale") -> dict[str, torch.Tensor]:
    """Write a single-file checkpoint; return what each BFL tensor should load back as (bf16)."""
    stored, expected = {}, {}
    for name, value in bfl.items():
        quantise = name.endswith(".weight") and value.ndim == 2 and (
            mode in ("fp8", "scaled") or (mode == "mixed" and name.startswith(("double_blocks", "single_blocks"))))
        if not quantise:
            stored[prefix + name], expected[name] = value, value
        elif mode == "fp8":
            q = value.to(torch.float8_e4m3fn)
            stored[prefix + name], expected[name] = q, dequantized(q)
        else:
            q, scale = scaled_fp8(value)
            module = prefix + name[: -len(".weight")]
            stored[prefix + name] = q
            stored[f"{module}.{scale_name}"] = scale
            stored[f"{module}.input_scale"] = torch.tensor(1.0)
            stored[f"{module}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                           dtype=torch.uint8)
            expected[name] = dequantized(q, scale)
    if mode == "scaled":
        stored[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(stored, str(path))
    return expected


def write_sharded_folder(root, state: dict[str, torch.Tensor]) -> None:
    """A diffusers transformer folder in two shards with its index, as diffusers saves big models."""
    folder = root / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "Flux2Transformer2DModel", **PRESET.transformer}))
    names = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


# --- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A model folder holding the tiny model in every layout, and what each should load back as."""
    root = tmp_path_factory.mktemp("models")
    write_tiny(root / "tiny")
    state = load_file(str(root / "tiny" / "transformer" / "diffusion_pytorch_model.safetensors"))
    write_sharded_folder(root / "tiny-sharded", state)
    bfl = to_bfl(state)
    expected_bfl = {
        "tiny-bfl": write_single(root / "tiny-bfl.safetensors", bfl),
        "tiny-comfy": write_single(root / "tiny-comfy.safetensors", bfl, "model.diffusion_model."),
        "tiny-comfy-fp8": write_single(root / "tiny-comfy-fp8.safetensors", bfl, "model.diffusion_model.", "fp8"),
        "tiny-comfy-scaled": write_single(root / "tiny-comfy-scaled.safetensors", bfl, "model.diffusion_model.",
                                          "scaled"),
        "tiny-comfy-mixed": write_single(root / "tiny-comfy-mixed.safetensors", bfl, "model.diffusion_model.",
                                         "mixed", scale_name="scale_weight"),
    }
    return root, state, expected_bfl


def hosted(root, name, blocks, head=True, tail=True) -> HostedModel:
    model = HostedModel(open_source(name, ModelStore([root])), torch.device("cpu"), torch.bfloat16)
    model.load(blocks, head, tail)
    return model


def loaded_state(model: HostedModel) -> dict[str, torch.Tensor]:
    """Every weight of the span as numbers: quantised layers as they dequantise for their matmul."""
    state = {k: v for k, v in model.span.state_dict().items()
             if not k.startswith("pos_embed") and not k.endswith(".weight_scale")}
    for name, module in model.span.named_modules():
        if isinstance(module, (Fp8Linear, GgufLinear)):
            state[f"{name}.weight"] = module.dequantized(torch.bfloat16)
    return state


EXACT = ["tiny", "tiny-sharded", "tiny-bfl", "tiny-comfy"]
QUANTISED = ["tiny-comfy-fp8", "tiny-comfy-scaled", "tiny-comfy-mixed"]


# --- every layout loads to the same weights ----------------------------------------------------------

@pytest.mark.parametrize("name", EXACT)
def test_bf16_layouts_load_exactly_the_known_weights(models, name):
    root, state, _ = models
    model = hosted(root, name, range(PRESET.num_blocks))
    got = loaded_state(model)
    assert set(got) == set(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("name", QUANTISED)
def test_fp8_layouts_load_their_dequantized_values_within_quantisation_error(models, name):
    root, state, expected_bfl = models
    model = hosted(root, name, range(PRESET.num_blocks))
    # fp8 stays fp8 on the device: every quantised layer holds its stored fp8 values, none a bf16 copy.
    fp8 = [m for m in model.span.modules() if isinstance(m, Fp8Linear)]
    assert fp8 and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8)
    got = loaded_state(model)
    # What the file holds, dequantized by the test itself and mapped with the same inverse as the writer.
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers as convert
    expected = convert(dict(expected_bfl[name]))
    assert set(got) == set(state) == set(expected)
    quantised = 0
    for key, original in state.items():
        assert torch.equal(got[key], expected[key]), key
        if not torch.equal(got[key], original):
            quantised += 1
            err = (got[key].float() - original.float()).norm() / original.float().norm()
            assert err < 0.05, f"{key}: relative error {err:.3f} is beyond fp8 e4m3 rounding"
    assert quantised > 0  # the file really was quantised


def test_scaled_fp8_without_its_scales_would_be_wrong(models):
    """The scales matter: ignoring them (diffusers' single-file path drops them) gives other weights."""
    root, state, _ = models
    got = loaded_state(hosted(root, "tiny-comfy-scaled", [0], head=False, tail=False))
    stored = load_file(str(root / "tiny-comfy-scaled.safetensors"))
    raw = stored["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]
    q_only = raw.float().to(torch.bfloat16).chunk(3)[0]
    assert not torch.allclose(got["transformer_blocks.0.attn.to_q.weight"].float(), q_only.float(), atol=1e-2)


def test_a_single_file_model_computes_what_the_folder_computes(models):
    root, _, _ = models
    a, b = hosted(root, "tiny", range(6)), hosted(root, "tiny-comfy", range(6))
    from meshd.model.span import Stream

    torch.manual_seed(0)
    latents, text = torch.randn(1, 16, 16, dtype=torch.bfloat16), torch.randn(1, 8, 48, dtype=torch.bfloat16)
    ids_img = torch.cartesian_prod(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), torch.zeros(1))
    ids_txt = torch.cartesian_prod(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.arange(8.0))
    outs = []
    for m in (a, b):
        cond = m.span.conditioning(torch.tensor([0.5]), None, torch.bfloat16)
        rotary = m.span.rotary(ids_txt, ids_img)
        stream = m.span.run(0, 6, Stream(8, pair=(m.span.embed_text(text), m.span.embed_image(latents))), cond, rotary)
        outs.append(m.span.final(stream, cond.temb))
    assert torch.equal(outs[0], outs[1])


def test_identity_hash_of_a_single_file_is_its_sha256(models):
    root, _, _ = models
    source = open_source("tiny-comfy-scaled", ModelStore([root]))
    digest = hashlib.sha256((root / "tiny-comfy-scaled.safetensors").read_bytes()).hexdigest()
    assert source.content_hash() == digest
    assert HostedModel(source, torch.device("cpu"), torch.bfloat16).identity.content_hash == digest
    assert open_source("tiny-comfy", ModelStore([root])).content_hash() != digest


def test_layout_and_precision_are_reported(models):
    root, _, _ = models
    store = ModelStore([root])
    described = {name: store.open(name).checkpoint for name, _ in store.available()}
    assert set(described) == {"tiny", "tiny-sharded", "tiny-bfl", "tiny-comfy", "tiny-comfy-fp8",
                              "tiny-comfy-scaled", "tiny-comfy-mixed"}
    assert described["tiny-sharded"].layout == "diffusers folder"
    assert described["tiny-bfl"].layout == "BFL single file"
    assert described["tiny-comfy"].layout == "ComfyUI single file"
    assert described["tiny-comfy-scaled"].quantisation.startswith("fp8 e4m3 scaled")
    assert "fp8 e4m3 scaled" in described["tiny-comfy-mixed"].quantisation
    assert "bf16" in described["tiny-comfy-mixed"].quantisation
    assert all(c.preset.name == "tiny" for c in described.values())


# --- a span reads only its own tensors -------------------------------------------------------------

@pytest.mark.parametrize("name,prefix", [("tiny-comfy-scaled", "model.diffusion_model."), ("tiny-bfl", ""),
                                         ("tiny-sharded", None)])
@pytest.mark.parametrize("blocks", [[0], [1, 2, 3], [4, 5]], ids=["double", "double+single", "single"])
def test_a_span_reads_only_the_tensors_of_its_blocks(models, name, prefix, blocks):
    root, _, _ = models
    model = hosted(root, name, blocks, head=False, tail=False)
    source = model.source
    assert isinstance(source, FolderSource)
    if prefix is None:  # diffusers names: exactly the span's own tensors
        keys = source.checkpoint.shapes()
        own = [k for k in keys if k.startswith(tuple(block_prefix(PRESET, i) for i in blocks))]
    else:  # BFL names: the span's blocks' tensors with their scales (quantisation records, a few bytes
        # each, are read when the file is opened, so that a format meshd cannot compute is refused there)
        stored = load_file(str(root / f"{name}.safetensors"))
        heads = tuple(f"{prefix}{'double_blocks' if i < 2 else 'single_blocks'}.{i if i < 2 else i - 2}."
                      for i in blocks)
        own = [k for k in stored if k.startswith(heads) and not k.endswith(("input_scale", "comfy_quant"))]
    assert source.checkpoint.tensors_read == len(own) > 0
    assert model.blocks == tuple(blocks)


def test_growing_a_span_reads_only_the_new_blocks(models):
    root, _, _ = models
    model = hosted(root, "tiny-bfl", [4], head=False, tail=False)
    first = model.source.checkpoint.tensors_read
    model.load([4, 5], False, False)
    assert model.source.checkpoint.tensors_read == 2 * first  # block 5 has as many tensors as block 4


# --- wrong files are refused with the cause ----------------------------------------------------------

def _refused(root, name) -> str:
    with pytest.raises(ModelError) as info:
        open_source(name, ModelStore([root]))
    return str(info.value)


def test_a_truncated_file_is_refused_naming_it(models, tmp_path):
    root, _, _ = models
    data = (root / "tiny-comfy-scaled.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    message = _refused(tmp_path, "cut")
    assert "cut.safetensors" in message and "truncated" in message


def test_a_truncated_shard_of_a_folder_is_refused(models, tmp_path):
    root, _, _ = models
    shutil.copytree(root / "tiny-sharded", tmp_path / "broken")
    shard = tmp_path / "broken" / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    message = _refused(tmp_path, "broken")
    assert "00002-of-00002" in message and "truncated" in message


@pytest.mark.parametrize("damage,cause", [
    ("drop-tensor", "lacks 1 of the"),
    ("drop-block", "2 + 3 blocks, width 64, text width 48, which no known model has"),
    ("wrong-shape", "has shape"),
    ("flux1-key", "FLUX.2 does not have"),
    ("int8", "cannot dequantize"),
], ids=["missing-tensor", "missing-block", "wrong-shape", "foreign-tensor", "unsupported-quantisation"])
def test_a_wrong_checkpoint_is_refused_with_the_cause(models, tmp_path, damage, cause):
    root, state, _ = models
    bfl = to_bfl(state)
    if damage == "drop-tensor":
        del bfl["single_blocks.1.linear2.weight"]
    elif damage == "drop-block":
        bfl = {k: v for k, v in bfl.items() if not k.startswith("single_blocks.3.")}
    elif damage == "wrong-shape":
        bfl["single_blocks.0.linear2.weight"] = bfl["single_blocks.0.linear2.weight"][:, :-1].contiguous()
    elif damage == "flux1-key":
        bfl["double_blocks.0.img_mod.lin.weight"] = torch.zeros(4, 4)
    elif damage == "int8":
        bfl["single_blocks.0.linear1.weight"] = torch.zeros(bfl["single_blocks.0.linear1.weight"].shape,
                                                            dtype=torch.int8)
    save_file(bfl, str(tmp_path / "bad.safetensors"))
    message = _refused(tmp_path, "bad")
    assert cause in message and "bad.safetensors" in message


def test_a_file_quantised_other_than_fp8_is_refused_when_opened(models, tmp_path):
    """Issue 16: a format meshd cannot compute is refused by name when the file is opened, not at the first
    block load (which used to be the first a user heard of it)."""
    root, state, _ = models
    stored = load_file(str(root / "tiny-comfy-scaled.safetensors"))
    key = "model.diffusion_model.single_blocks.0.linear1.comfy_quant"
    stored[key] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    save_file(stored, str(tmp_path / "fp4.safetensors"))
    message = _refused(tmp_path, "fp4")
    assert "nvfp4" in message and "single_blocks.0.linear1" in message and "fp4.safetensors" in message


@pytest.mark.parametrize("kind,cause", [
    ("vae", "no FLUX.2 transformer blocks"),
    ("lora", "is a LoRA"),
    ("pickle", "pickle"),
])
def test_files_that_are_not_a_transformer_are_named_for_what_they_are(models, tmp_path, kind, cause):
    root, _, _ = models
    if kind == "vae":
        shutil.copy(next((root / "tiny" / "vae").glob("*.safetensors")), tmp_path / "thing.safetensors")
    elif kind == "lora":
        save_file({"diffusion_model.single_blocks.0.linear1.lora_A.weight": torch.zeros(2, 64),
                   "diffusion_model.single_blocks.0.linear1.lora_B.weight": torch.zeros(576, 2)},
                  str(tmp_path / "thing.safetensors"))
    else:
        (tmp_path / "thing.ckpt").write_bytes(b"\x80\x04not really a pickle")
    name = "thing.ckpt" if kind == "pickle" else "thing"
    assert cause in _refused(tmp_path, name)


@pytest.mark.parametrize("prefix,transformer", [
    ("model.diffusion_model.", True), ("diffusion_model.", True), ("", True),
    ("transformer.", False),  # a prefix the reader does not strip
], ids=["comfyui", "diffusion-model", "bare", "foreign-prefix"])
def test_the_inventory_lists_as_a_transformer_exactly_what_the_reader_opens(models, tmp_path, prefix, transformer):
    """One rule answers "is this a FLUX.2 transformer" for both (comfyui.transformer_layout): a file listed
    under the models is one that opens, and one that does not open is listed as skipped, with why."""
    from meshd.model import comfyui

    root, state, _ = models
    save_file({prefix + k: v for k, v in to_bfl(state).items()}, str(tmp_path / "thing.safetensors"))
    store = ModelStore([tmp_path])
    assert (comfyui.identify(tmp_path / "thing.safetensors") == comfyui.TRANSFORMER) is transformer
    assert [name for name, _ in store.available()] == (["thing"] if transformer else [])
    if transformer:
        assert store.open("thing").preset.name == "tiny"
    else:
        assert "no FLUX.2 transformer blocks" in _refused(tmp_path, "thing")
        assert [why for _, why in store.skipped_files()] == ["not a FLUX.2 transformer, VAE or text encoder"]


def test_a_link_out_inside_a_linked_component_folder_of_a_model_is_refused(models, tmp_path):
    """A model folder's vae/ linked to another model folder is followed (once, by the one walk of the model
    folders), so a weight file that links out of the folders from there is refused too, naming the link."""
    root, _, _ = models
    mine, shared, outside = tmp_path / "mine", tmp_path / "shared", tmp_path / "outside"
    shutil.copytree(root / "tiny", mine / "tiny")
    shutil.copytree(root / "tiny" / "vae", shared / "vae")
    outside.mkdir()
    weights = next((shared / "vae").glob("*.safetensors"))
    weights.rename(outside / weights.name)
    weights.symlink_to(outside / weights.name)
    shutil.rmtree(mine / "tiny" / "vae")
    (mine / "tiny" / "vae").symlink_to(shared / "vae", target_is_directory=True)
    with pytest.raises(ModelError) as info:
        ModelStore([mine, shared]).open("tiny")
    linked = mine / "tiny" / "vae" / weights.name
    assert str(info.value).startswith(f"{linked} is a link to {outside / weights.name}, outside the configured")


def test_a_single_files_own_component_folder_or_file_linked_out_refuses_the_model_naming_it(models, tmp_path):
    """Found by review: only the walked folder was checked for links out, so a single file's own vae/ (or a
    file in it, or its text_encoder/ or tokenizer/) linked out of the model folders was read from there by
    the head. Every file the model will read is checked when it is opened, naming the link."""
    root, _, _ = models
    mine, outside = tmp_path / "mine", tmp_path / "outside"
    (mine / "own").mkdir(parents=True)
    shutil.copy(root / "tiny-comfy.safetensors", mine / "own" / "tiny-comfy.safetensors")
    shutil.copytree(root / "tiny" / "vae", outside / "vae")
    (mine / "own" / "vae").symlink_to(outside / "vae", target_is_directory=True)
    refusal = f"is a link to {outside / 'vae'}, outside the configured folders ({mine}); meshd reads files only"
    for name in ("own/tiny-comfy", str(mine / "own" / "tiny-comfy.safetensors")):
        with pytest.raises(ModelError) as info:
            ModelStore([mine]).open(name)
        assert str(info.value).startswith(f"{mine / 'own' / 'vae'} {refusal}"), name
    (mine / "own" / "vae").unlink()
    shutil.copytree(root / "tiny" / "vae", mine / "own" / "vae")
    weights = next((mine / "own" / "vae").glob("*.safetensors"))
    weights.unlink()
    weights.symlink_to(next((outside / "vae").glob("*.safetensors")))
    with pytest.raises(ModelError) as info:
        ModelStore([mine]).open("own/tiny-comfy")
    assert str(info.value).startswith(f"{weights} is a link to {outside / 'vae' / weights.name}, outside"), info.value
    weights.unlink()
    shutil.copy(outside / "vae" / weights.name, weights)
    shutil.copytree(root / "tiny" / "text_encoder", outside / "text_encoder")
    (mine / "own" / "text_encoder").symlink_to(outside / "text_encoder", target_is_directory=True)
    with pytest.raises(ModelError, match=rf"^{mine / 'own' / 'text_encoder'} is a link to {outside / 'text_encoder'}, "):
        ModelStore([mine]).open("own/tiny-comfy")
    (mine / "own" / "text_encoder").unlink()
    assert ModelStore([mine]).open("own/tiny-comfy").components == mine / "own"  # all inside: used


def test_an_index_that_points_outside_its_folder_is_refused(models, tmp_path):
    root, _, _ = models
    shutil.copytree(root / "tiny-sharded", tmp_path / "escape")
    index = tmp_path / "escape" / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["proj_out.weight"] = "../../../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    assert "outside its folder" in _refused(tmp_path, "escape")


def test_an_indexed_shard_linked_elsewhere_inside_the_model_folders_is_read_as_without_the_index(models, tmp_path):
    """Found by review: the index's shards had to lie in transformer/ where they really are, so a shard linked
    in from elsewhere in the model folders was refused as "points outside its folder" while the same folder
    without its index was accepted. An index names files of its folder; where a linked one really is follows
    the model folders' one rule: inside them it is read, out of them it is refused naming the link."""
    root, _, _ = models
    mine, outside = tmp_path / "mine", tmp_path / "outside"
    shutil.copytree(root / "tiny-sharded", mine / "sharded")
    (mine / "shards").mkdir()
    outside.mkdir()
    shard = mine / "sharded" / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors"
    shard.rename(mine / "shards" / shard.name)
    shard.symlink_to(mine / "shards" / shard.name)
    index = shard.parent / "diffusion_pytorch_model.safetensors.index.json"
    indexed = ModelStore([mine]).open("sharded")
    assert indexed.preset.name == "tiny" and shard in indexed.checkpoint.files
    saved = index.read_bytes()
    index.unlink()
    assert ModelStore([mine]).open("sharded").preset.name == "tiny"  # without the index: the same
    index.write_bytes(saved)
    (mine / "shards" / shard.name).rename(outside / shard.name)
    shard.unlink()
    shard.symlink_to(outside / shard.name)
    with pytest.raises(ModelError) as info:
        ModelStore([mine]).open("sharded")
    assert str(info.value) == (f"{shard} is a link to {outside / shard.name}, outside the configured folders "
                               f"({mine}); meshd reads files only from there: add {outside} to models_dir to use it")


# --- only the configured model folders ---------------------------------------------------------------

def test_paths_outside_the_model_folders_are_refused(models, tmp_path):
    root, _, _ = models
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(root / "tiny-bfl.safetensors", outside / "x.safetensors")
    store = ModelStore([root])
    for name in (str(outside / "x.safetensors"), str(root / ".." / outside.name / "x.safetensors"),
                 f"../{outside.name}/x.safetensors"):
        with pytest.raises(ModelError, match="outside the configured model folders|not found|invalid"):
            store.open(name)
    assert store.open(str(root / "tiny-bfl.safetensors")).checkpoint.layout == "BFL single file"


def test_a_single_file_takes_the_head_parts_from_a_diffusers_folder_of_its_model(models, tmp_path):
    root, _, _ = models
    files = ModelStore([root]).open("tiny-comfy")
    assert files.components == root / "tiny"  # tiny-sharded has no vae/ to lend
    model = HostedModel(FolderSource(files), torch.device("cpu"), torch.bfloat16)
    assert model.vae() is not None
    assert model.encode_prompt("a lighthouse").shape == (1, PRESET.max_sequence_length, 48)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(root / "tiny-comfy.safetensors", alone / "tiny-comfy.safetensors")
    lonely = HostedModel(open_source("tiny-comfy", ModelStore([alone])), torch.device("cpu"), torch.bfloat16)
    lonely.load([3, 4], False, False)  # a block-only peer needs nothing else
    with pytest.raises(ModelError, match="no vae/ beside it"):
        lonely.vae()
    assert not lonely.source.has_text_encoder()


def test_bfl_names_cover_every_linear_layer():
    """The BFL naming table (used for kohya LoRA names) lists exactly the converter's linear layers."""
    from meshd.model.checkpoints import expected_shapes, trace_bfl

    traced = set()
    shapes = expected_shapes(PRESET)
    for name in bfl_linear_names(PRESET):
        traced |= set(trace_bfl(name + ".weight", (6 * 64, 64)))  # any row count the splits can divide
    linears = {n for n, s in shapes.items() if n.endswith(".weight") and len(s) == 2}
    assert traced == linears


def test_check_reports_every_model_with_its_layout_hash_and_problems(models, tmp_path):
    from meshd.model.inventory import inventory_models

    root, _, _ = models
    reports = {r.name: r for r in inventory_models(ModelStore([root]))}
    assert len(reports) == 7 and all(r.ok for r in reports.values())
    comfy = reports["tiny-comfy-scaled"]
    assert comfy.sha256 == hashlib.sha256((root / "tiny-comfy-scaled.safetensors").read_bytes()).hexdigest()
    assert "ComfyUI single file, tiny, fp8 e4m3 scaled" in comfy.summary and str(root / "tiny") in comfy.summary
    shutil.copy(root / "tiny-bfl.safetensors", tmp_path / "whole.safetensors")
    data = (root / "tiny-bfl.safetensors").read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copy(next((root / "tiny" / "vae").glob("*.safetensors")), tmp_path / "vae.safetensors")
    reports = {r.name: r for r in inventory_models(ModelStore([tmp_path]), hashes=False)}
    assert set(reports) == {"whole", "half"}  # a readable VAE file is not a model; a broken file is shown
    # the VAE file beside it is the head's VAE now (issue 16); there is no text encoder for it
    assert reports["whole"].ok and "VAE vae.safetensors; no text encoder" in reports["whole"].summary
    assert not reports["half"].ok and "truncated" in reports["half"].problem
    assert "BAD" in reports["half"].describe()
    # ... and that is what `meshd check` prints for the box (a broken file nobody configured: a note).
    from meshd.check import check_models
    from meshd.config import DaemonConfig

    findings = list(check_models(DaemonConfig(models_dir=(tmp_path,), state_dir=tmp_path / "state")))
    lines = {f.text.split(":", 1)[0]: f for f in findings if f.topic == "models"}
    assert lines["ok  model whole"].level == "ok" and "BFL" in lines["ok  model whole"].text
    assert lines["BAD model half"].level == "note" and "truncated" in lines["BAD model half"].text
