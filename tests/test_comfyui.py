"""A ComfyUI user's files, as they are on disk (issue 16): meshd pointed at a ComfyUI install finds every
file in its models tree, says what each is by its header, and the head runs from ComfyUI's single files
(transformer, VAE, Qwen3 text encoder, ComfyUI's own tokenizer) with no diffusers folder anywhere; what
it computes equals what it computes from the diffusers folder of the same weights."""

import copy
import io
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoTokenizer, Qwen3ForCausalLM

from meshd.check import check_models
from meshd.config import ConfigError, DaemonConfig, load_config
from meshd.model.files import ModelError, ModelStore
from meshd.model.lora import LoraError, LoraFile, LoraStore
from meshd.model.presets import PRESETS
from meshd.model.runtime import HostedModel, open_source
from meshd.model.text_encoder_file import QWEN3_CHAT_TEMPLATE, EncoderFile
from meshd.model.vae_file import VaeFile
from tests.comfyui_files import TRANSFORMER, comfy_text_encoder, small_qwen3, write_comfyui
from tests.daemons import running_daemon, split_generation
from tests.test_lora import world  # noqa: F401 - the tiny model and a LoRA folder, as the LoRA tests use them

PRESET = PRESETS["tiny"]
CPU = torch.device("cpu")
KEY = bytes(range(32))
PARAMS = {"prompt": "a dog by the sea", "seed": 3, "width": 64, "height": 64, "steps": 2, "guidance": 1.0}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """The ComfyUI install, and a separate model folder holding the diffusers folder of the same weights."""
    scratch = tmp_path_factory.mktemp("scratch")
    root = tmp_path_factory.mktemp("ComfyUI")
    ref = write_comfyui(root, scratch)
    diffusers = tmp_path_factory.mktemp("diffusers-models") / "tiny-qwen3"
    shutil.copytree(ref["diffusers"], diffusers)
    shutil.rmtree(diffusers / "text_encoder")
    copy.deepcopy(ref["qwen3"]).to(torch.bfloat16).save_pretrained(diffusers / "text_encoder")
    tok = AutoTokenizer.from_pretrained(root / "comfy" / "text_encoders" / "qwen25_tokenizer")
    tok.chat_template = QWEN3_CHAT_TEMPLATE  # what the diffusers release's Qwen3 tokenizer renders
    tok.save_pretrained(diffusers / "tokenizer")
    return root, diffusers, ref


def no_diffusers_folder_in(root) -> bool:
    return not any(p.name in ("config.json", "model_index.json") for p in root.rglob("*"))


# --- found, named for what it is, listed ---------------------------------------------------------

def test_meshd_check_lists_every_file_of_the_tree_with_kind_precision_and_hash(comfy, tmp_path):
    root, _, _ = comfy
    odd = root / "models" / "diffusion_models" / "odd.safetensors"  # a VAE where transformers go
    others = [root / "models" / "clip_vision" / "vit.safetensors", root / "models" / "unet" / "flux2-q8.gguf"]
    shutil.copy(root / "models" / "vae" / "flux2-vae.safetensors", odd)
    others[0].parent.mkdir()
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2)}, str(others[0]))
    others[1].parent.mkdir()
    others[1].write_bytes(b"GGUF")
    try:
        config = DaemonConfig(models_dir=(), comfyui_dir=root, state_dir=tmp_path / "state")
        found = [f for f in check_models(config) if f.topic in ("models", "loras")]
        lines = {" ".join(f.text.split(":", 1)[0].split()): f.text for f in found}  # "ok VAE vae/flux2-vae"
    finally:
        for path in (odd, *others):
            path.unlink()
            if path.parent.name != "diffusion_models":
                path.parent.rmdir()
    model = lines[f"ok model {TRANSFORMER}"]
    assert "ComfyUI single file, tiny, bf16, distilled" in model
    assert "VAE flux2-vae.safetensors" in model and "text encoder qwen_3_tiny.safetensors" in model  # bf16 first
    assert "qwen25_tokenizer" in model and "sha256 " in model
    assert "fp8 e4m3 scaled" in lines["ok model diffusion_models/fp8/flux2-tiny-fp8mixed"]
    assert "FLUX.2 VAE, bf16; fits tiny" in lines["ok VAE vae/flux2-vae"]
    assert "FLUX.2 VAE" in lines["ok VAE diffusion_models/odd"]  # by its header, not its folder
    assert "Qwen3 text encoder, width 16, 5 layers, bf16; fits tiny" in lines["ok text encoder text_encoders/qwen_3_tiny"]
    fp8 = lines["ok text encoder text_encoders/qwen_3_tiny_fp8mixed"]
    assert "fp8 e4m3 scaled" in fp8 and "bf16" in fp8
    assert "kohya" in lines["ok lora style"]
    notes = [f.text for f in found if f.level != "ok"]
    # 2 transformers, 2 VAEs, 2 encoders, 1 LoRA; the GGUF file is a transformer candidate, so its own
    # note says why it cannot be used; one line for the rest
    assert len(found) == 9 and len(notes) == 2, notes
    assert notes[0].startswith("BAD model unet/flux2-q8: ") and "not a readable GGUF" in notes[0]
    assert notes[1] == (f"1 other file in the model folders not used, e.g. {others[0]} (not a FLUX.2 transformer, "
                        "VAE or text encoder)")
    assert no_diffusers_folder_in(root)


def test_a_name_relative_to_the_model_folders_is_found_there_not_in_the_working_directory(comfy, tmp_path,
                                                                                          monkeypatch):
    root, _, _ = comfy
    monkeypatch.chdir(tmp_path)
    store = ModelStore([root / "models"])
    for name in (TRANSFORMER, TRANSFORMER + ".safetensors"):
        assert store.resolve(name) == root / "models" / (TRANSFORMER + ".safetensors")
    with pytest.raises(ModelError, match="outside the configured model folders|not found|invalid"):
        store.resolve("../ComfyUI/models/" + TRANSFORMER)


def test_comfyui_dir_must_be_an_install(tmp_path):
    (tmp_path / "meshd.toml").write_text(f'comfyui_dir = "{tmp_path / "nowhere"}"\n')
    with pytest.raises(ConfigError, match="has no models/ folder"):
        load_config(tmp_path / "meshd.toml")
    (tmp_path / "meshd.toml").write_text('distilled = "maybe"\n')
    with pytest.raises(ConfigError, match="'distilled' must be true, false or \"auto\", got 'maybe'"):
        load_config(tmp_path / "meshd.toml")


def test_the_tree_walk_skips_hidden_folders_and_components_and_survives_a_symlink_loop(tmp_path):
    from meshd.model import comfyui

    for rel in ("a/b/x.safetensors", ".cache/y.safetensors", "own/z.safetensors", "own/vae/w.safetensors",
                "deep/1/2/3/4/5/6/7/8/9/v.safetensors", "m/q.gguf", "m/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "own" / "vae" / "config.json").write_text("{}")
    (tmp_path / "a" / "b" / "loop").symlink_to(tmp_path / "a")
    (tmp_path / "pipe" / "transformer").mkdir(parents=True)
    (tmp_path / "pipe" / "transformer" / "config.json").write_text("{}")
    found = [(p.relative_to(tmp_path).as_posix(), folder) for p, folder in comfyui.walk(tmp_path)]
    assert found == [("a/b/x.safetensors", False), ("m/q.gguf", False), ("own/z.safetensors", False),
                     ("pipe", True)]


# --- each part equals the diffusers folder's --------------------------------------------------------

def test_the_vae_single_file_loads_the_diffusers_vae_exactly(comfy):
    root, diffusers, _ = comfy
    mine = VaeFile.open(root / "models" / "vae" / "flux2-vae.safetensors").load(PRESET, CPU, torch.bfloat16)
    theirs = AutoencoderKLFlux2.from_pretrained(diffusers / "vae", torch_dtype=torch.bfloat16)
    a, b = mine.state_dict(), theirs.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("num_batches_tracked"))


def test_a_vae_of_another_model_is_refused_with_the_difference(comfy, tmp_path):
    root, _, _ = comfy
    vae = VaeFile.open(root / "models" / "vae" / "flux2-vae.safetensors")
    assert not vae.fits(PRESETS["klein-9b"]) and "shape" in vae.mismatch(PRESETS["klein-9b"])
    with pytest.raises(ModelError, match="is not the VAE of klein-9b"):
        vae.load(PRESETS["klein-9b"], CPU, torch.bfloat16)


def test_qwen3_file_with_comfyuis_tokenizer_gives_the_klein_pipelines_embeddings(comfy):
    root, diffusers, _ = comfy
    # the reference: the same weights the way the pipeline loads them (rotary frequencies stay float32)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, transformer=None,
                              text_encoder=Qwen3ForCausalLM.from_pretrained(diffusers / "text_encoder",
                                                                            dtype=torch.bfloat16),
                              tokenizer=AutoTokenizer.from_pretrained(diffusers / "tokenizer"))
    model = HostedModel(open_source(TRANSFORMER, ModelStore([root / "models"])), CPU, torch.bfloat16)
    for prompt in ("a dog by the sea", ""):
        expected, _ = pipe.encode_prompt(prompt, device=CPU, max_sequence_length=PRESET.max_sequence_length,
                                         text_encoder_out_layers=PRESET.text_encoder_layers)
        assert torch.equal(model.encode_prompt(prompt), expected.to(torch.bfloat16)), prompt


@pytest.mark.parametrize("layers", [3, 5])
def test_a_file_gives_the_hidden_states_the_full_model_gives_at_the_layers_read(tmp_path, layers):
    # The tiny preset reads layers 1-3. Of a 5-layer file, layer 3's state has no final norm; of a
    # 3-layer file it is the last state, which transformers norms (found by review: always dropped).
    ref = small_qwen3(layers)
    inv_freq = ref.model.rotary_emb.inv_freq.clone()  # stays float32, as from_pretrained(dtype=bf16) keeps it
    ref = ref.to(torch.bfloat16)
    ref.model.rotary_emb.inv_freq = inv_freq
    save_file(comfy_text_encoder(ref), str(tmp_path / "te.safetensors"))
    built = EncoderFile.open(tmp_path / "te.safetensors").load(PRESET, CPU, torch.bfloat16)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = ref.model(ids, output_hidden_states=True).hidden_states
        got = built(ids, output_hidden_states=True).hidden_states
    for i in PRESET.text_encoder_layers:
        assert torch.equal(got[i], want[i]), i


def test_comfyuis_tokenizer_renders_flux2s_qwen3_prompt(comfy):
    """ComfyUI's KleinTokenizer template, and what Qwen3's own chat template renders with thinking off."""
    root, _, _ = comfy
    file = EncoderFile.open(root / "models" / "text_encoders" / "qwen_3_tiny.safetensors")
    tok = file.tokenizer(root / "comfy" / "text_encoders" / "qwen25_tokenizer", "")
    text = tok.apply_chat_template([{"role": "user", "content": "a dog"}], tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False)
    assert text == "<|im_start|>user\na dog<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_fp8mixed_text_encoder_reads_its_scales_and_builds_only_the_layers_read(comfy):
    root, _, ref = comfy
    file = EncoderFile.open(root / "models" / "text_encoders" / "qwen_3_tiny_fp8mixed.safetensors")
    assert file.num_layers == 5 and file.fits(PRESET)
    model = file.load(PRESET, CPU, torch.bfloat16)
    assert len(model.layers) == max(PRESET.text_encoder_layers) == 3  # layers 3 and 4 are never read
    for name, value in model.state_dict().items():
        assert torch.equal(value, ref["fp8_values"][f"model.{name}"]), name  # fp8 x scale, bf16 layers as stored
    assert "input_scale" not in json.dumps(list(model.state_dict()))


def test_a_text_encoder_quantised_other_than_fp8_is_refused_by_name(comfy, tmp_path):
    from safetensors.torch import load_file

    root, _, _ = comfy
    state = load_file(str(root / "models" / "text_encoders" / "qwen_3_tiny_fp8mixed.safetensors"))
    key = next(k for k in state if k.endswith("comfy_quant"))
    state[key] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    save_file(state, str(tmp_path / "te.safetensors"))
    with pytest.raises(ModelError, match="quantised as nvfp4"):
        EncoderFile.open(tmp_path / "te.safetensors")


@pytest.mark.parametrize("record", [torch.zeros(1 << 20, dtype=torch.uint8),  # a "record" of 1 MiB: not read
                                    torch.tensor(list(b"[1]"), dtype=torch.uint8),  # JSON, but not a record
                                    torch.zeros(4, dtype=torch.float32)])
def test_a_malformed_quantisation_record_in_a_text_encoder_is_one_line_not_a_big_read(comfy, tmp_path, record):
    # Found by review: text-encoder files read every comfy_quant tensor whole, unchecked.
    from safetensors.torch import load_file

    root, _, _ = comfy
    state = load_file(str(root / "models" / "text_encoders" / "qwen_3_tiny_fp8mixed.safetensors"))
    state[next(k for k in state if k.endswith("comfy_quant"))] = record
    save_file(state, str(tmp_path / "te.safetensors"))
    with pytest.raises(ModelError, match="comfy_quant is not a"):
        EncoderFile.open(tmp_path / "te.safetensors")


def test_without_a_tokenizer_one_message_says_which_files_to_put_where(comfy, tmp_path):
    root, _, _ = comfy
    models = tmp_path / "models"
    shutil.copytree(root / "models", models)  # the models tree alone, without the install's comfy/ folder
    model = HostedModel(open_source(TRANSFORMER, ModelStore([models])), CPU, torch.bfloat16)
    assert model.source.has_text_encoder()
    with pytest.raises(ModelError, match=r"needs its tokenizer: set comfyui_dir to your ComfyUI folder .*"
                                         r"qwen25_tokenizer/ is used\), or copy the diffusers release's tokenizer/"):
        model.encode_prompt("a dog")


# --- klein base or distilled ----------------------------------------------------------------------

def test_klein_base_or_distilled_defaults_like_diffusers_and_the_operator_decides(comfy, tmp_path):
    from meshd.pipeline.generation import GenerationParams, uses_cfg

    root, diffusers, _ = comfy
    base = tmp_path / "models" / "klein-base"
    shutil.copytree(diffusers, base)
    index = json.loads((base / "model_index.json").read_text())
    del index["is_distilled"]  # Flux2KleinPipeline's default then: not distilled
    (base / "model_index.json").write_text(json.dumps(index))
    store = ModelStore([tmp_path / "models"])
    assert open_source("klein-base", store).distilled() is False
    assert open_source("klein-base", store, distilled=True).distilled() is True
    # a single file has the same shapes either way: the released (distilled) default, unless told
    comfy_store = ModelStore([root / "models"])
    assert open_source(TRANSFORMER, comfy_store).distilled() is True
    told = HostedModel(open_source(TRANSFORMER, comfy_store, distilled=False), CPU, torch.bfloat16)
    assert uses_cfg(told, GenerationParams(**{**PARAMS, "guidance": 4.0}))
    (tmp_path / "meshd.toml").write_text(f'comfyui_dir = "{root}"\ndistilled = false\n')
    config = load_config(tmp_path / "meshd.toml", {"state_dir": tmp_path / "state", "models_dir": ()})
    assert config.distilled is False
    line = next(f.text for f in check_models(config) if f.text.startswith(f"ok  model {TRANSFORMER}:"))
    assert "ComfyUI single file, tiny, bf16, base (CFG)" in line


# --- the whole run, from ComfyUI's files only ---------------------------------------------------------

def test_meshtui_generate_runs_from_a_comfyui_tree_with_no_diffusers_folder(comfy, tmp_path, monkeypatch, capsys):
    """``meshtui generate`` as a user types it (its real command line, in this process), pointed at the
    install; a relative --model is found in the models tree, not the working directory."""
    from meshtui.cli import main

    root, _, _ = comfy
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "dog.png"
    code = main(["generate", "--local", "--device", "cpu", "--comfyui-dir", str(root),
                 "--model", TRANSFORMER + ".safetensors", "--prompt", "a dog by the sea", "--seed", "3",
                 "--size", "64x64", "--steps", "2", "--out", str(out), "--json"])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size == (64, 64)
    assert no_diffusers_folder_in(root)


async def test_a_split_from_the_comfyui_tree_equals_the_same_split_from_the_diffusers_folder(comfy, tmp_path):
    root, diffusers, _ = comfy
    models = root / "models"
    async with running_daemon(tmp_path / "a", KEY, range(0, 3), models, model=TRANSFORMER) as a, \
               running_daemon(tmp_path / "b", KEY, range(3, 6), models, model=TRANSFORMER) as b:
        from_comfy = await split_generation(KEY, [a.bound, b.bound], "A:0-2,B:3-5", PARAMS, codec="raw",
                                            return_latents=True)
    async with running_daemon(tmp_path / "c", KEY, range(0, 3), diffusers.parent, model="tiny-qwen3") as c, \
               running_daemon(tmp_path / "d", KEY, range(3, 6), diffusers.parent, model="tiny-qwen3") as d:
        from_diffusers = await split_generation(KEY, [c.bound, d.bound], "A:0-2,B:3-5", PARAMS, codec="raw",
                                                return_latents=True)
    assert torch.equal(from_comfy.latents, from_diffusers.latents)
    prepared = next(e for e in from_comfy.events if e["kind"] == "prepared")  # the plan says how it samples
    assert (prepared["distilled"], prepared["cfg"]) == (True, False)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(from_comfy.png))),
                          np.asarray(Image.open(io.BytesIO(from_diffusers.png))))


# --- LoRA spellings ComfyUI accepts ---------------------------------------------------------------

def test_simpletuners_lycoris_named_plain_lora_means_what_the_peft_file_means(world, tmp_path):
    from tests.test_lora import ALPHA, forward, model

    tensors = {}
    for module, (down, up) in world["style"].items():
        key = "lycoris_" + module.replace(".", "_")  # SimpleTuner: diffusers names, underscores, lora_down/up
        tensors.update({f"{key}.lora_down.weight": down.clone(), f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(ALPHA)})
    save_file(tensors, str(world["loras"] / "style-simpletuner.safetensors"))
    assert LoraFile.open(world["loras"] / "style-simpletuner.safetensors", PRESET).format == "SimpleTuner (LyCORIS names)"
    outputs = []
    for name in ("style-peft", "style-simpletuner"):
        m = model(world)
        m.set_loras([LoraStore([world["loras"]]).spec(name, 0.8)], LoraStore([world["loras"]]))
        outputs.append(forward((m, 0, 6)))
    assert torch.equal(*outputs)


def test_a_linear1_qkv_lora_adapts_only_the_attention_rows_of_linear1(world):
    """ComfyUI's partial key: the up matrix covers the first 3 x hidden rows of the fused linear1; the
    same LoRA written for the whole linear1 with zero MLP rows is the same model."""
    from tests.test_lora import forward, model

    g = torch.Generator().manual_seed(4)
    hidden, full_rows = PRESET.hidden, world["shapes"]["single_transformer_blocks.0.attn.to_qkv_mlp_proj"][0]
    down, up = torch.randn(2, hidden, generator=g), torch.randn(3 * hidden, 2, generator=g)
    padded = torch.cat([up, torch.zeros(full_rows - 3 * hidden, 2)])
    for name, module, b in (("qkv-part", "linear1_qkv", up), ("qkv-padded", "linear1", padded)):
        save_file({f"diffusion_model.single_blocks.0.{module}.lora_A.weight": down,
                   f"diffusion_model.single_blocks.0.{module}.lora_B.weight": b},
                  str(world["loras"] / f"{name}.safetensors"))
    part = LoraFile.open(world["loras"] / "qkv-part.safetensors", PRESET)
    assert part.targets() == {"single_transformer_blocks.0.attn.to_qkv_mlp_proj"}
    outputs = []
    for name in ("qkv-part", "qkv-padded"):
        m = model(world)
        m.set_loras([LoraStore([world["loras"]]).spec(name)], LoraStore([world["loras"]]))
        outputs.append(forward((m, 0, 6)))
    assert torch.equal(*outputs) and not torch.equal(outputs[0], forward((model(world), 0, 6)))
    save_file({"diffusion_model.single_blocks.0.linear1_qkv.lora_A.weight": down,
               "diffusion_model.single_blocks.0.linear1_qkv.lora_B.weight": up[:-1]},
              str(world["loras"] / "qkv-short.safetensors"))
    with pytest.raises(LoraError, match="linear1_qkv has 191 rows; tiny's attention part of linear1 has 192"):
        LoraFile.open(world["loras"] / "qkv-short.safetensors", PRESET)


# --- on the GPU machine -----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_single_file_vae_and_text_encoder_load_straight_onto_the_gpu(comfy):
    """The head's ComfyUI parts on CUDA: the VAE's weights are the CPU load's exactly; the fp8mixed
    encoder's embeddings agree with the CPU's to bf16 kernel differences."""
    root, _, _ = comfy
    cuda = torch.device("cuda")
    vae = VaeFile.open(root / "models" / "vae" / "flux2-vae.safetensors")
    on_gpu, on_cpu = vae.load(PRESET, cuda, torch.bfloat16).state_dict(), vae.load(PRESET, CPU, torch.bfloat16).state_dict()
    assert all(v.device.type == "cuda" and torch.equal(v.cpu(), on_cpu[k]) for k, v in on_gpu.items())
    store = ModelStore([root / "models"])
    gpu = HostedModel(open_source(TRANSFORMER, store), cuda, torch.bfloat16).encode_prompt("a dog by the sea")
    cpu = HostedModel(open_source(TRANSFORMER, store), CPU, torch.bfloat16).encode_prompt("a dog by the sea")
    assert gpu.device.type == "cuda"
    assert torch.nn.functional.cosine_similarity(gpu.float().cpu().flatten(), cpu.float().flatten(), dim=0) > 0.999
