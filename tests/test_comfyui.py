"""A ComfyUI user's files, as they are on disk (issue 16): meshd pointed at a ComfyUI install finds every
file in its models tree, says what each is by its header, and the head runs from ComfyUI's single files
(transformer, VAE, Qwen3 text encoder, ComfyUI's own tokenizer) with no diffusers folder anywhere; what
it computes equals what it computes from the diffusers folder of the same weights."""

import copy
import io
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoTokenizer, Qwen3ForCausalLM

from meshd.check import check_models
from meshd.config import ConfigError, DaemonConfig, load_config
from meshd.model import comfyui
from meshd.model.files import ModelError, ModelStore
from meshd.model.lora import LoraError, LoraFile, LoraStore
from meshd.model.precision import Fp8Linear
from meshd.model.presets import PRESETS
from meshd.model.runtime import HostedModel, open_source
from meshd.model.text_encoder_file import QWEN3_CHAT_TEMPLATE, EncoderFile
from meshd.model.vae_file import VaeFile
from meshtui.events import Prepared
from tests.comfyui_files import (
    MISTRAL_SPECIALS,
    TRANSFORMER,
    comfy_mistral,
    comfy_text_encoder,
    flux2_prompt_ids,
    small_mistral,
    small_qwen3,
    tekken_json,
    write_comfyui,
)
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


@pytest.mark.parametrize("keys, kind, parts", [
    (["diffusion_model.single_blocks.0.linear1.lora_A.weight"], comfyui.LORA, ()),
    (["model.diffusion_model.single_stream_modulation.lin.weight", "vae.encoder.conv_in.weight",
      "vae.decoder.conv_in.weight", "text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj.weight"],
     comfyui.TRANSFORMER, (comfyui.TRANSFORMER, comfyui.VAE, comfyui.TEXT_ENCODER)),
    (["encoder.conv_in.weight", "decoder.conv_in.weight"], comfyui.VAE, (comfyui.VAE,)),
    (["decoder.conv_in.weight"], comfyui.OTHER, ()),  # a decoder alone is no VAE FLUX.2 can load
    (["model.layers.0.self_attn.q_proj.weight"], comfyui.TEXT_ENCODER, (comfyui.TEXT_ENCODER,)),
    (["text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj.weight"], comfyui.TEXT_ENCODER,
     (comfyui.TEXT_ENCODER,)),  # an all-in-one's encoder saved alone, prefix kept: EncoderFile reads it
    (["vision_model.embeddings.patch_embedding.weight"], comfyui.OTHER, ()),
], ids=["lora", "all-in-one", "vae", "vae-decoder", "text-encoder", "prefixed-text-encoder", "other"])
def test_a_file_is_one_kind_and_holds_its_parts_by_one_reading_of_its_tensor_names(keys, kind, parts):
    assert comfyui.kind_of_keys(keys) == kind and comfyui.parts_of_keys(keys) == parts


# --- ComfyUI's all-in-one checkpoints -------------------------------------------------------------------

def all_in_one(root, path, vae_transform=lambda state: state, encoder=None) -> None:
    """A ComfyUI ``checkpoints/`` file of the tree's parts, with ComfyUI's Flux2 prefixes: the transformer as
    in its single file, the VAE under ``vae.``, the Qwen3 encoder under ``text_encoders.qwen3_4b.transformer.``."""
    from safetensors.torch import load_file

    models = root / "models"
    state = load_file(str(models / "diffusion_models" / "flux2-tiny.safetensors"))
    vae = vae_transform(load_file(str(models / "vae" / "flux2-vae.safetensors")))
    state.update({f"vae.{k}": v for k, v in vae.items()})
    encoder = encoder or load_file(str(models / "text_encoders" / "qwen_3_tiny.safetensors"))
    state.update({f"text_encoders.qwen3_4b.transformer.{k}": v for k, v in encoder.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def test_an_all_in_one_checkpoint_is_named_in_meshd_check_and_its_own_parts_serve_the_head(comfy, tmp_path):
    root, _, _ = comfy
    install = tmp_path / "ComfyUI"
    shutil.copytree(root / "comfy", install / "comfy")  # the tokenizer; the models tree holds only the checkpoint
    all_in_one(root, install / "models" / "checkpoints" / "flux2-tiny-aio.safetensors")
    config = DaemonConfig(models_dir=(), comfyui_dir=install, state_dir=tmp_path / "state")
    lines = [f.text for f in check_models(config) if f.topic == "models"]
    line = next(t for t in lines if t.startswith("ok  model checkpoints/flux2-tiny-aio:"))
    assert ("head parts: VAE flux2-tiny-aio.safetensors, text encoder flux2-tiny-aio.safetensors, tokenizer "
            in line and "; all-in-one checkpoint (transformer, VAE, text encoder): VAE and text encoder from this file"
            in line), line
    assert len(lines) == 1, lines  # its parts are not listed again as models or parts of others

    store = ModelStore([], comfyui_dir=install)
    mine = HostedModel(open_source("checkpoints/flux2-tiny-aio", store), CPU, torch.bfloat16)
    separate = HostedModel(open_source(TRANSFORMER, ModelStore([root / "models"])), CPU, torch.bfloat16)
    assert torch.equal(mine.encode_prompt("a dog by the sea"), separate.encode_prompt("a dog by the sea"))
    a, b = (m.source.vae(CPU, torch.bfloat16).state_dict() for m in (mine, separate))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_all_in_one_checkpoint_whose_vae_does_not_fit_says_so_and_the_vae_file_is_used(comfy, tmp_path):
    root, _, _ = comfy
    models = tmp_path / "models"
    shutil.copytree(root / "models", models)

    def other_vae(state):  # a VAE of other shapes (an SD-era one, say)
        return {k: (v[:, :2].contiguous() if k == "decoder.conv_in.weight" else v) for k, v in state.items()}

    all_in_one(root, models / "checkpoints" / "odd-aio.safetensors", other_vae)
    files = ModelStore([models]).open("checkpoints/odd-aio")
    assert files.parts.vae == models / "vae" / "flux2-vae.safetensors"
    assert files.parts.text_encoder == models / "checkpoints" / "odd-aio.safetensors"
    assert files.parts.notes.startswith("all-in-one checkpoint (transformer, VAE, text encoder): text encoder from "
                                        "this file; its VAE part is not used (decoder.conv_in.weight has shape")


def test_an_all_in_one_checkpoints_fp8_text_encoder_loads_as_its_own_file_would(comfy, tmp_path):
    """Found by review: the fp8 layers' scales of a prefixed encoder were looked up by the file's names."""
    from tests.comfyui_files import fp8mixed

    root, _, ref = comfy
    stored, _ = fp8mixed(comfy_text_encoder(ref["qwen3"]), per_row=True)
    save_file(stored, str(tmp_path / "te.safetensors"))
    all_in_one(root, tmp_path / "aio.safetensors", encoder=stored)
    alone, inside = (EncoderFile.open(tmp_path / f).load(PRESET, CPU, torch.bfloat16)
                     for f in ("te.safetensors", "aio.safetensors"))
    a, b = alone.state_dict(), inside.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k].float(), b[k].float()) for k in a)
    assert any(isinstance(m, Fp8Linear) and m.format.per_row for m in inside.modules())


def test_what_an_all_in_one_file_declares_for_its_other_parts_does_not_change_its_transformer(comfy, tmp_path):
    """Found by review: the header's ``_quantization_metadata`` was read for every layer of the file, so a text
    encoder (or VAE) layer declared in a format meshd cannot compute refused the whole transformer. Only what is
    declared under the transformer's prefix is its; the encoder's own declarations decide only about it."""
    from safetensors.torch import load_file

    from meshd.model.checkpoints import Checkpoint

    root, _, _ = comfy
    all_in_one(root, tmp_path / "plain.safetensors")
    state = load_file(str(tmp_path / "plain.safetensors"))
    layer = "text_encoders.qwen3_4b.transformer.model.layers.0.mlp.gate_proj"
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {
        layer: {"format": "int8_tensorwise"}, "vae.decoder.conv_in": {"format": "nvfp4"}}})}
    models = tmp_path / "models" / "checkpoints"
    models.mkdir(parents=True)
    save_file(state, str(models / "aio.safetensors"), metadata=metadata)
    checkpoint = Checkpoint.open_file(models / "aio.safetensors")
    assert checkpoint.quantisation == "bf16" and checkpoint.layout == "ComfyUI single file"
    with pytest.raises(ModelError, match=r"aio.safetensors is quantised as int8_tensorwise; meshd reads text encoders"):
        EncoderFile.open(models / "aio.safetensors")
    files = ModelStore([tmp_path / "models"]).open("checkpoints/aio")
    assert "its text encoder part is not used (" in files.parts.notes and files.parts.vae == files.root


def test_a_diffusers_folders_own_parts_come_first_and_a_single_file_beside_them_is_noted(comfy, tmp_path, caplog):
    """Found by review: an all-in-one checkpoint inside a diffusers folder was passed over without a word (the
    folder asked for) or its VAE and text encoder were (the file asked for). The folder's own parts come first;
    what is passed over is said in ``meshd check`` and in an info line; a part the folder lacks comes from the
    file asked for."""
    root, diffusers, _ = comfy
    models = tmp_path / "models"
    folder = models / "tiny-qwen3"
    shutil.copytree(diffusers, folder)
    all_in_one(root, folder / "flux2-tiny-aio.safetensors")
    store = ModelStore([models])
    with caplog.at_level("INFO", logger="meshd"):
        files = store.open("tiny-qwen3")
    beside = ("flux2-tiny-aio.safetensors (transformer, VAE, text encoder) is passed over: the folder's own "
              "transformer/, vae/ and text_encoder/ come first")
    assert files.checkpoint.folder and files.components == folder and files.parts.notes == beside
    assert files.parts.vae is None and files.parts.text_encoder is None
    assert f"{folder}: {beside}" in caplog.text

    caplog.clear()
    with caplog.at_level("INFO", logger="meshd"):
        files = store.open("tiny-qwen3/flux2-tiny-aio")
    passed = (f"all-in-one checkpoint (transformer, VAE, text encoder); its VAE and text encoder are passed over: "
              f"{folder}'s own vae/ and text_encoder/ come first")
    assert files.root == folder / "flux2-tiny-aio.safetensors" and files.components == folder
    assert files.parts.vae is None and files.parts.text_encoder is None and files.parts.notes == passed
    assert f"{files.root}: {passed}" in caplog.text

    lines = [f.text for f in check_models(DaemonConfig(models_dir=(models,), state_dir=tmp_path / "state"))
             if f.topic == "models"]
    line = next(t for t in lines if t.startswith("ok  model tiny-qwen3:"))
    assert f"VAE from {folder}, text encoder from {folder}; {beside}" in line, line

    shutil.rmtree(folder / "text_encoder")  # a part the folder lacks: the file's own
    gap = (f"all-in-one checkpoint (transformer, VAE, text encoder): text encoder from this file; its VAE is passed "
           f"over: {folder}'s own vae/ comes first")
    files = ModelStore([models]).open("tiny-qwen3/flux2-tiny-aio")
    assert files.parts.vae is None and files.parts.text_encoder == files.root and files.parts.notes == gap
    shutil.rmtree(folder / "transformer")  # the folder as the one file's own: the same
    files = ModelStore([models]).open("tiny-qwen3")
    assert files.root == folder / "flux2-tiny-aio.safetensors" and files.parts.notes == gap


def test_a_folder_of_one_all_in_one_checkpoint_uses_its_own_parts_as_naming_the_file_does(comfy, tmp_path):
    """Found by review: a folder holding one all-in-one checkpoint (and no vae/) did not pass the file on as the
    head's own parts, so its VAE and text encoder went unused (and unnoted), while naming the file used them.
    Both ways of asking for the file give the head the same parts, with the same notes."""
    root, _, _ = comfy
    install = tmp_path / "ComfyUI"
    shutil.copytree(root / "comfy", install / "comfy")  # the tokenizer; the models tree holds only the checkpoint
    file = install / "models" / "checkpoints" / "aio" / "flux2-tiny-aio.safetensors"
    all_in_one(root, file)
    store = ModelStore([], comfyui_dir=install)
    by_file, by_folder = store.open("checkpoints/aio/flux2-tiny-aio"), store.open("checkpoints/aio")
    assert by_file.parts.vae == by_file.parts.text_encoder == file and by_file.root == file
    assert by_folder.root == file and by_folder.parts == by_file.parts
    assert by_folder.parts.notes == ("all-in-one checkpoint (transformer, VAE, text encoder): VAE and text encoder "
                                     "from this file")


def test_an_all_in_one_checkpoints_own_parts_come_before_those_a_diffusers_folder_elsewhere_lends(comfy, tmp_path,
                                                                                                 caplog):
    """Found by review: a diffusers folder of the same model elsewhere in the model folders lent its VAE and text
    encoder over the all-in-one file's own (docs/models.md: the file's own come first). The file's own parts come
    first, then the lending folder's (where one of them does not fit), then the single files; what is passed over
    is named in ``meshd check`` and the info line, and a Qwen3 encoder with no tokenizer of its own may take the
    lending folder's."""
    root, diffusers, _ = comfy
    models = tmp_path / "models"
    folder = models / "tiny-qwen3"
    shutil.copytree(diffusers, folder)
    file = models / "checkpoints" / "flux2-tiny-aio.safetensors"
    all_in_one(root, file)
    for sub in ("vae", "text_encoder"):  # the lent parts are not read: damaged, they would fail the head
        for weights in (folder / sub).glob("*.safetensors"):
            weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level("INFO", logger="meshd"):
        files = ModelStore([models]).open("checkpoints/flux2-tiny-aio")
    notes = (f"all-in-one checkpoint (transformer, VAE, text encoder): VAE and text encoder from this file; {folder}'s "
             f"vae/ and text_encoder/ are passed over: this file's own VAE and text encoder come first")
    assert files.components == folder and files.parts.vae == files.parts.text_encoder == file
    assert files.parts.tokenizer == folder / "tokenizer" and files.parts.notes == notes
    assert f"{file}: {notes}" in caplog.text
    model = HostedModel(open_source("checkpoints/flux2-tiny-aio", ModelStore([models])), CPU, torch.bfloat16)
    model.source.check_head_files()
    assert model.vae() is not None
    assert model.encode_prompt("a dog by the sea").shape == (1, PRESET.max_sequence_length, 48)
    lines = [f.text for f in check_models(DaemonConfig(models_dir=(models,), state_dir=tmp_path / "state"))
             if f.topic == "models"]
    line = next(t for t in lines if t.startswith("ok  model checkpoints/flux2-tiny-aio:"))
    assert (f"head parts: VAE {file.name}, text encoder {file.name}, tokenizer {folder / 'tokenizer'}; {notes}"
            in line), line

    def other_vae(state):  # a part of the file that does not fit: the lending folder's, before the single files
        return {k: (v[:, :2].contiguous() if k == "decoder.conv_in.weight" else v) for k, v in state.items()}

    file.unlink()
    all_in_one(root, file, other_vae)
    shutil.copytree(root / "models" / "vae", models / "vae")
    files = ModelStore([models]).open("checkpoints/flux2-tiny-aio")
    assert files.components == folder and files.parts.vae is None and files.parts.text_encoder == file
    assert "; its VAE part is not used (decoder.conv_in.weight has shape" in files.parts.notes
    assert files.parts.notes.endswith(f"; {folder}'s text_encoder/ is passed over: this file's own text encoder "
                                      "comes first"), files.parts.notes


# --- links out of the model folders ---------------------------------------------------------------------

def test_a_link_out_of_the_model_folders_is_refused_naming_the_link_and_its_target(comfy, tmp_path):
    """ComfyUI users link files in from other drives. meshd never reads what a link brings from outside its
    folders (not even the header): asked for it, or listing it, it names the link, the target and the fix."""
    root, _, _ = comfy
    models, elsewhere = tmp_path / "ComfyUI" / "models", tmp_path / "other-drive"
    shutil.copytree(root / "models", models)
    (elsewhere / "vae").mkdir(parents=True)
    shutil.copy(models / "diffusion_models" / "flux2-tiny.safetensors", elsewhere / "flux2-big.safetensors")
    shutil.copy(models / "vae" / "flux2-vae.safetensors", elsewhere / "vae" / "flux2-vae-other.safetensors")
    shutil.copy(models / "loras" / "style.safetensors", elsewhere / "lora.safetensors")
    (models / "diffusion_models" / "linked.safetensors").symlink_to(elsewhere / "flux2-big.safetensors")
    (models / "vae" / "drive").symlink_to(elsewhere / "vae", target_is_directory=True)
    (models / "loras" / "linked.safetensors").symlink_to(elsewhere / "lora.safetensors")
    (models / "diffusion_models" / "alias.safetensors").symlink_to(models / "diffusion_models"
                                                                   / "flux2-tiny.safetensors")
    store = ModelStore([models])
    link = models / "diffusion_models" / "linked.safetensors"
    refusal = (f"{link} is a link to {elsewhere / 'flux2-big.safetensors'}, outside the configured folders ({models}); "
               f"meshd reads files only from there: add {elsewhere} to models_dir to use it")
    for name in ("diffusion_models/linked", "diffusion_models/linked.safetensors", str(link)):
        with pytest.raises(ModelError) as caught:
            store.resolve(name)
        assert str(caught.value) == refusal, name
    assert store.resolve("diffusion_models/alias") == models / "diffusion_models" / "flux2-tiny.safetensors"  # inside
    assert store.head_parts(PRESET).vae == models / "vae" / "flux2-vae.safetensors"  # the linked-in VAE is not a part
    with pytest.raises(LoraError, match=rf"{models / 'loras' / 'linked.safetensors'} is a link to "
                                        rf"{elsewhere / 'lora.safetensors'}, outside .* add {elsewhere} to lora_dir"):
        LoraStore([models / "loras"]).spec("linked")

    config = DaemonConfig(models_dir=(), comfyui_dir=models.parent, state_dir=tmp_path / "state")
    lines = [f.text for f in check_models(config)]
    assert any(t.startswith(f"BAD model diffusion_models/linked: {refusal}") for t in lines), lines
    assert any(t.startswith(f"BAD model vae/drive/flux2-vae-other: {models / 'vae' / 'drive'}") and "is a link to" in t
               for t in lines), lines
    assert any(t.startswith("BAD lora  linked: ") and "is a link to" in t for t in lines), lines
    assert any(t.startswith("ok  model diffusion_models/alias:") for t in lines), lines


def test_a_tokenizer_beside_a_text_encoder_file_that_links_out_refuses_the_model_naming_it(comfy, tmp_path):
    """Found by review: the tokenizer/ found beside a text-encoder file was read wherever a link took it; it
    is checked with every other file the model reads when the model is opened, the folder and each file."""
    root, _, _ = comfy
    models, elsewhere = tmp_path / "models", tmp_path / "other-drive"
    shutil.copytree(root / "models", models)
    shutil.copytree(root / "comfy" / "text_encoders" / "qwen25_tokenizer", elsewhere / "tokenizer")
    beside = models / "text_encoders" / "tokenizer"
    beside.symlink_to(elsewhere / "tokenizer", target_is_directory=True)
    with pytest.raises(ModelError) as caught:
        ModelStore([models]).open(TRANSFORMER)
    assert str(caught.value) == (
        f"{beside} is a link to {elsewhere / 'tokenizer'}, outside the configured folders ({models}); meshd reads "
        f"files only from there: add {elsewhere} to models_dir to use it")
    beside.unlink()
    shutil.copytree(elsewhere / "tokenizer", beside)
    (beside / "vocab.json").unlink()
    (beside / "vocab.json").symlink_to(elsewhere / "tokenizer" / "vocab.json")
    with pytest.raises(ModelError, match=rf"^{beside / 'vocab.json'} is a link to {elsewhere / 'tokenizer'}/vocab"):
        ModelStore([models]).open(TRANSFORMER)
    (beside / "vocab.json").unlink()
    shutil.copy(elsewhere / "tokenizer" / "vocab.json", beside / "vocab.json")
    assert ModelStore([models]).open(TRANSFORMER).parts.tokenizer == beside


def test_folders_configured_through_a_link_hold_what_their_target_holds_and_nothing_it_links_out(comfy, tmp_path):
    """One containment rule for model and LoRA files: the configured folders and the files are compared where
    they really are, so a models_dir or lora_dir given as a link (a ComfyUI tree on another drive, linked in)
    serves its files, and a link inside it that leads out is refused as it would be in the target itself."""
    root, _, _ = comfy
    models, elsewhere = tmp_path / "drive" / "models", tmp_path / "other-drive"
    shutil.copytree(root / "models", models)
    elsewhere.mkdir()
    shutil.copy(models / "loras" / "style.safetensors", elsewhere / "lora.safetensors")
    shutil.copy(models / "diffusion_models" / "flux2-tiny.safetensors", elsewhere / "flux2-big.safetensors")
    (models / "loras" / "out.safetensors").symlink_to(elsewhere / "lora.safetensors")
    (models / "diffusion_models" / "out.safetensors").symlink_to(elsewhere / "flux2-big.safetensors")
    (tmp_path / "models").symlink_to(models, target_is_directory=True)
    (tmp_path / "loras").symlink_to(models / "loras", target_is_directory=True)

    store, loras = ModelStore([tmp_path / "models"]), LoraStore([tmp_path / "loras"])
    assert store.resolve("diffusion_models/flux2-tiny") == models / "diffusion_models" / "flux2-tiny.safetensors"
    assert store.resolve(str(tmp_path / "models" / "vae" / "flux2-vae.safetensors")) == models / "vae" / "flux2-vae.safetensors"
    assert loras.spec("style").name == "style"
    with pytest.raises(ModelError, match=rf"is a link to {elsewhere / 'flux2-big.safetensors'}, outside"):
        store.resolve("diffusion_models/out")
    with pytest.raises(LoraError, match=rf"is a link to {elsewhere / 'lora.safetensors'}, outside .* to lora_dir"):
        loras.spec("out")


def test_a_models_tree_linked_to_another_drive_serves_its_files_and_a_linked_kind_folder_too(comfy, tmp_path):
    """Found by review: an install whose ``models/`` is a link (models on another disk) had every file refused
    as a link out of its own models folder. The link is the configured root, so its target holds the files; a
    kind folder linked to a configured folder is read there too; one linked anywhere else is still refused."""
    root, _, _ = comfy
    install, drive = tmp_path / "ComfyUI", tmp_path / "big-disk"
    shutil.copytree(root / "comfy", install / "comfy")
    shutil.copytree(root / "models", drive / "models")
    (install / "models").symlink_to(drive / "models", target_is_directory=True)
    config = DaemonConfig(models_dir=(), comfyui_dir=install, state_dir=tmp_path / "state")
    lines = [f.text for f in check_models(config) if f.topic in ("models", "loras")]
    assert not [t for t in lines if not t.startswith("ok ")], lines
    assert any(t.startswith(f"ok  model {TRANSFORMER}:") and "VAE flux2-vae.safetensors" in t for t in lines), lines
    assert any(t.startswith("ok  lora  style:") for t in lines), lines
    files = ModelStore([], comfyui_dir=install).open(TRANSFORMER)
    assert files.root == drive / "models" / "diffusion_models" / "flux2-tiny.safetensors"
    assert files.parts.vae == drive / "models" / "vae" / "flux2-vae.safetensors"

    kinds, elsewhere = tmp_path / "ssd" / "diffusion_models", tmp_path / "unlisted"
    shutil.move(str(drive / "models" / "diffusion_models"), str(kinds))
    (drive / "models" / "diffusion_models").symlink_to(kinds, target_is_directory=True)
    assert ModelStore([kinds.parent], comfyui_dir=install).open(TRANSFORMER).root == kinds / "flux2-tiny.safetensors"
    shutil.move(str(kinds), str(elsewhere))
    (drive / "models" / "diffusion_models").unlink()
    (drive / "models" / "diffusion_models").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ModelError) as caught:
        ModelStore([], comfyui_dir=install).open(TRANSFORMER)
    assert str(caught.value) == (
        f"{drive / 'models' / 'diffusion_models' / 'flux2-tiny.safetensors'} is a link to "
        f"{elsewhere / 'flux2-tiny.safetensors'}, outside the configured folders ({drive / 'models'}); meshd reads "
        f"files only from there: add {elsewhere} to models_dir to use it")


def test_a_linked_lora_folder_is_the_lora_stores_and_its_files_are_never_listed_as_models(comfy, tmp_path):
    """Found by review: with ComfyUI's ``models/loras`` a link to another folder, ``meshd check`` listed each
    LoRA as a BAD model ("... add .../loras to models_dir"), though the LoRA store serves it: the model walk
    went into the LoRA folder. The LoRA folders are the LoRA store's: the model walk does not enter them,
    and the LoRA store names, with lora_dir advice, a file or a sub-folder in them linked out of them."""
    root, _, _ = comfy
    install, drive, elsewhere = tmp_path / "ComfyUI", tmp_path / "lora-drive", tmp_path / "other-drive"
    shutil.copytree(root / "comfy", install / "comfy")
    shutil.copytree(root / "models", install / "models")
    shutil.move(str(install / "models" / "loras"), str(drive))
    (install / "models" / "loras").symlink_to(drive, target_is_directory=True)
    (elsewhere / "flux").mkdir(parents=True)
    shutil.copy(drive / "style.safetensors", elsewhere / "flux" / "detail.safetensors")
    (drive / "flux").symlink_to(elsewhere / "flux", target_is_directory=True)  # a sub-folder linked out
    (drive / "linked.safetensors").symlink_to(elsewhere / "flux" / "detail.safetensors")  # a file linked out
    folder_refusal = (f"{drive / 'flux'} is a link to {elsewhere / 'flux'}, outside the configured folders ({drive}); "
                      f"meshd reads files only from there: add {elsewhere} to lora_dir to use it")
    file_refusal = (f"{drive / 'linked.safetensors'} is a link to {elsewhere / 'flux' / 'detail.safetensors'}, "
                    f"outside the configured folders ({drive}); meshd reads files only from there: add "
                    f"{elsewhere / 'flux'} to lora_dir to use it")
    for config in (DaemonConfig(models_dir=(), comfyui_dir=install, state_dir=tmp_path / "state"),
                   DaemonConfig(models_dir=(install / "models",), lora_dir=(install / "models" / "loras",),
                                state_dir=tmp_path / "state")):
        found = list(check_models(config))
        models = [f.text for f in found if f.topic == "models"]
        assert not [t for t in models if any(s in t for s in ("loras/", str(drive), str(elsewhere)))], models
        assert not [t for t in models if not t.startswith("ok ")], models
        loras = [f.text.split("\n")[0] for f in found if f.topic == "loras"]
        assert sorted(loras) == sorted([f"BAD lora  flux: {folder_refusal}", f"BAD lora  linked: {file_refusal}",
                                        next(t for t in loras if t.startswith("ok  lora  style: kohya"))]), loras
        store = LoraStore(config.lora_dirs)
        assert store.find(store.spec("style")) == drive / "style.safetensors"
        for name, refusal in (("flux/detail", folder_refusal), ("linked", file_refusal)):
            with pytest.raises(LoraError) as caught:
                store.spec(name)
            assert str(caught.value) == refusal, name
    # no LoRA folder configured: the links where ComfyUI keeps LoRAs are not models either (style, and detail
    # by either link)
    lines = [f.text for f in check_models(DaemonConfig(models_dir=(install / "models",), state_dir=tmp_path / "state"))
             if f.topic == "models"]
    assert not [t for t in lines if not t.startswith(("ok ", "2 other files in the model folders not used, e.g. "))]
    assert any(t.endswith("LoRAs are read from the LoRA folders (lora_dir, or comfyui_dir's models/loras))")
               for t in lines), lines


def test_a_models_dir_that_is_an_installs_linked_models_folder_finds_comfyuis_tokenizer(comfy, tmp_path):
    """Found by review: models_dir set to a ComfyUI install's models/ finds ComfyUI's Qwen tokenizer in the
    install, unless that models/ is a link (models on another drive): the tokenizer was looked for beside the
    link's target only, so the text encoder had none. It is looked for beside the folder as configured (also
    on ``meshd serve --models-dir``), each link on the way and the target, as comfyui_dir would find it."""
    from argparse import Namespace

    from meshd.node.lifecycle import OVERRIDES, settings

    root, _, _ = comfy
    install, drive = tmp_path / "ComfyUI", tmp_path / "big-disk"
    shutil.copytree(root / "comfy", install / "comfy")
    shutil.copytree(root / "models", drive / "models")
    (install / "models").symlink_to(drive / "models", target_is_directory=True)
    (tmp_path / "models").symlink_to(install / "models", target_is_directory=True)  # a link to the link
    tokenizer = (install / "comfy" / "text_encoders" / "qwen25_tokenizer").resolve()
    for models_dir in (install / "models", tmp_path / "models"):
        parts = ModelStore([models_dir]).open(TRANSFORMER).parts
        assert (parts.tokenizer, parts.tokenizer_hint) == (tokenizer, ""), models_dir
    (tmp_path / "meshd.toml").write_text("")
    args = Namespace(**{**dict.fromkeys(OVERRIDES), "state_dir": tmp_path / "state"}, models_dir=[tmp_path / "models"],
                     lora_dir=None, interfaces=None, config=tmp_path / "meshd.toml", instance=None)
    config = settings(args)
    line = next(f.text for f in check_models(config) if f.text.startswith(f"ok  model {TRANSFORMER}:"))
    assert f"tokenizer {tokenizer}" in line, line
    parts = ModelStore([drive / "models"]).open(TRANSFORMER).parts  # the drive alone: no install to take it from
    assert parts.tokenizer is None and "set comfyui_dir to your ComfyUI folder" in parts.tokenizer_hint


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
    fp8 = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert len(fp8) == 3 * 7 - 3  # every projection but layer 0's bf16 MLP, as the file stores them
    for name, value in model.state_dict().items():
        module = name.rpartition(".")[0]
        if module in fp8:  # held as stored: fp8 values and their scale
            assert fp8[module].weight.dtype == torch.float8_e4m3fn and not fp8[module].native  # the CPU's path
            if name.endswith(".weight"):
                assert torch.equal(fp8[module].dequantized(torch.bfloat16), ref["fp8_values"][f"model.{name}"]), name
            continue
        assert torch.equal(value, ref["fp8_values"][f"model.{name}"]), name  # bf16 layers as stored
    assert "input_scale" not in json.dumps(list(model.state_dict()))


@pytest.mark.parametrize("per_row", [False, True], ids=["per-tensor", "per-row"])
def test_an_fp8_text_encoder_stays_fp8_and_embeds_as_its_dequantised_model_does(comfy, tmp_path, per_row):
    """fp8 weights stay fp8 in memory (about half the bytes of the dequantised bf16 model); on the per-layer
    path (CPU, and GPUs without fp8 tensor cores) each layer is dequantised to exactly the bf16 weights the
    dequantised model holds, so the hidden states FLUX.2 reads are that model's bit for bit."""
    from tests.comfyui_files import fp8mixed

    root, _, ref = comfy
    stored, dequantised = fp8mixed(comfy_text_encoder(ref["qwen3"]), keep_bf16=(), per_row=per_row)
    save_file(stored, str(tmp_path / "fp8.safetensors"))
    save_file(dequantised, str(tmp_path / "dequantised.safetensors"))
    held = EncoderFile.open(tmp_path / "fp8.safetensors").load(PRESET, CPU, torch.bfloat16)
    dense = EncoderFile.open(tmp_path / "dequantised.safetensors").load(PRESET, CPU, torch.bfloat16)

    def linear_weight_bytes(model):
        tensors = [*model.named_buffers(), *model.named_parameters()]
        return sum(t.numel() * t.element_size() for n, t in tensors if n.endswith("_proj.weight"))

    assert linear_weight_bytes(held) * 2 == linear_weight_bytes(dense)  # (plus one float32 per tensor or row)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got = held(ids, output_hidden_states=True).hidden_states
        want = dense(ids, output_hidden_states=True).hidden_states
    for k in PRESET.text_encoder_layers:
        assert torch.equal(got[k], want[k]), k


def test_an_fp8_text_encoders_scale_of_another_layout_is_refused_when_opened_naming_it(comfy, tmp_path):
    """The text encoders' files read their fp8 scales by the transformer checkpoints' rule: one per tensor or
    per output row; a per-column scale (or a block format's) is refused from the header, not after building."""
    from tests.comfyui_files import fp8mixed

    _, _, ref = comfy
    stored, _ = fp8mixed(comfy_text_encoder(ref["qwen3"]), keep_bf16=())
    key = "model.layers.1.self_attn.q_proj"
    stored[f"{key}.weight_scale"] = torch.ones(1, stored[f"{key}.weight"].shape[1])  # one per column
    save_file(stored, str(tmp_path / "te.safetensors"))
    with pytest.raises(ModelError) as caught:
        EncoderFile.open(tmp_path / "te.safetensors")
    assert f"scale {key}.weight_scale has shape" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("record, cause", [
    (torch.zeros(8, dtype=torch.float32), "is not a quantisation record"),
    (torch.zeros(5000, dtype=torch.uint8), "is not a quantisation record"),  # larger than any record: not read
    (torch.tensor(list(b"not json"), dtype=torch.uint8), "is not a readable quantisation record"),
], ids=["float", "oversized", "not-json"])
def test_a_text_encoders_bad_quantisation_record_is_refused_naming_it(comfy, tmp_path, record, cause):
    """The text encoders read ComfyUI's comfy_quant records as the transformer checkpoints do (one bounded reader)."""
    from tests.comfyui_files import fp8mixed

    _, _, ref = comfy
    stored, _ = fp8mixed(comfy_text_encoder(ref["qwen3"]), keep_bf16=())
    stored["model.layers.1.self_attn.q_proj.comfy_quant"] = record
    save_file(stored, str(tmp_path / "te.safetensors"))
    with pytest.raises(ModelError, match=f"model.layers.1.self_attn.q_proj.comfy_quant {cause}"):
        EncoderFile.open(tmp_path / "te.safetensors")


def test_an_fp8_embedding_and_norm_are_read_as_the_numbers_they_stand_for(comfy, tmp_path):
    """fp8 tensors that are not linear weights (an embedding, a 1-d norm) are dequantised when read: the
    stored values times their declared scale, in the weights' shape (a 1-d norm stays 1-d)."""
    from tests.comfyui_files import FP8_MAX, quant_record

    _, _, ref = comfy
    state = comfy_text_encoder(ref["qwen3"])
    expected = dict(state)
    for key in ("model.embed_tokens.weight", "model.layers.1.input_layernorm.weight"):
        module, value = key.removesuffix(".weight"), state[key]
        scale = (value.float().abs().max() / FP8_MAX).reshape(())
        q = (value.float() / scale).to(torch.float8_e4m3fn)
        state.update({key: q, f"{module}.weight_scale": scale, f"{module}.comfy_quant": quant_record()})
        expected[key] = (q.float() * scale).to(torch.bfloat16)
    save_file(state, str(tmp_path / "te.safetensors"))
    model = EncoderFile.open(tmp_path / "te.safetensors").load(PRESET, CPU, torch.bfloat16)
    got = model.state_dict()
    for key in ("model.embed_tokens.weight", "model.layers.1.input_layernorm.weight"):
        name = key.removeprefix("model.")
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], expected[key]), name


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


def bad_pattern(folder: Path) -> Path:
    """``folder``'s tokenizer.json with a pre-tokenizer pattern no regex engine compiles (an unclosed group)."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(?i:'s|'t"
    path.write_text(json.dumps(data))
    return path


def test_a_tokenizer_file_whose_pattern_does_not_compile_is_one_line_naming_the_file(comfy, tmp_path):
    """Found by review: a tokenizer.json whose pre-tokenizer pattern the tokenizers library rejects came out as
    its bare Exception (a traceback), from ComfyUI's layout and from a diffusers folder alike."""
    from meshd.model.text_encoder import LanguageModelEncoder

    root, diffusers, _ = comfy
    folder = tmp_path / "tiny-qwen3"
    shutil.copytree(diffusers, folder)
    path = bad_pattern(folder / "tokenizer")
    why = "^" + re.escape(f"{path}: pre_tokenizer.pretokenizers[0].pattern.Regex \"(?i:'s|'t\" is not a regular "
                          "expression the tokenizer can compile (") + r".+\)$"
    with pytest.raises(ModelError, match=why):
        LanguageModelEncoder.load(folder / "text_encoder", folder / "tokenizer", PRESET, CPU, torch.bfloat16)
    file = EncoderFile.open(root / "models" / "text_encoders" / "qwen_3_tiny.safetensors")
    with pytest.raises(ModelError, match=why):
        file.tokenizer(folder / "tokenizer", "")
    assert file.tokenizer(diffusers / "tokenizer", "") is not None  # the same files, pattern intact


# --- Mistral's tokenizer inside the file (dev) ------------------------------------------------------

MISTRAL_PROMPTS = ["a dog by the sea", "", "The Dogs' 42 boats\nat sea!  ", "[INST] is text here"]


def mistral_file(tmp_path, tekken: bytes | None = None, **replace) -> Path:
    state = comfy_mistral(small_mistral(), keep=4, tekken=tekken_json() if tekken is None else tekken)
    state.update(replace)
    path = tmp_path / "mistral_3_small_flux2_bf16.safetensors"
    save_file(state, str(path))
    return path


def test_the_tekken_tokenizer_inside_a_mistral_file_gives_flux2s_prompt_ids(tmp_path):
    """Tokenised as diffusers' dev pipeline asks (its own chat call), the ids are the tekken format's: control
    tokens by rank, text by rank-ordered merges, left padding with <pad> (ComfyUI's Flux2Tokenizer)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    file = EncoderFile.open(mistral_file(tmp_path))
    assert file.describe().endswith("4 layers, pruned, bf16, tokenizer inside (tekken_model)")  # meshd check's line
    tok = file.tokenizer(None, "")
    for prompt in MISTRAL_PROMPTS:
        for length in (512, 40):  # room for all of it; and cut short, as the tiny model's 32 tokens are
            got = tok.apply_chat_template(format_input([prompt], SYSTEM_MESSAGE), add_generation_prompt=False,
                                          tokenize=True, return_dict=True, return_tensors="pt",
                                          padding="max_length", truncation=True, max_length=length)
            want = flux2_prompt_ids(tekken_json(), SYSTEM_MESSAGE, prompt, length)
            assert got["input_ids"][0].tolist() == want, (prompt, length)
            pads = want.index(MISTRAL_SPECIALS.index("<s>"))  # <pad> never comes out of text
            assert got["attention_mask"][0].tolist() == [0] * pads + [1] * (length - pads)


def test_a_mistral_file_with_its_own_tokenizer_gives_the_full_models_prompt_embeddings(tmp_path):
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    from meshd.model.text_encoder import FAMILIES, LanguageModelEncoder

    full = small_mistral()
    file = EncoderFile.open(mistral_file(tmp_path))
    encoder = LanguageModelEncoder(FAMILIES["mistral3"], file.load(PRESET, CPU, torch.bfloat16),
                                   file.tokenizer(None, ""), PRESET.text_encoder_layers, PRESET.max_sequence_length)
    for prompt in MISTRAL_PROMPTS[:2]:
        ids = torch.tensor([flux2_prompt_ids(tekken_json(), SYSTEM_MESSAGE, prompt, PRESET.max_sequence_length)])
        mask = (torch.arange(ids.shape[1]) >= ids[0].tolist().index(MISTRAL_SPECIALS.index("<s>"))).long()[None]
        with torch.no_grad():
            states = full(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
        want = torch.cat([states[k] for k in PRESET.text_encoder_layers], dim=-1)
        assert torch.equal(encoder(prompt), want), prompt


BAD_TEKKEN_PATTERN = r"[^\r\n\p{L}"  # a character class never closed


@pytest.mark.parametrize(("blob", "why"), [
    (b"\x89PNG not json", "not a UTF-8 JSON document"),
    (tekken_json(MISTRAL_SPECIALS[:17]), "it lacks the control token \\[SYSTEM_PROMPT\\]"),
    (tekken_json().replace(b'"pattern"', b'"patern"'), "config.pattern is missing"),
    (tekken_json().replace(b'"token_bytes": "AA=="', b'"token_bytes": "A"'),
     "vocab entry 0's token_bytes is not base64"),
    (tekken_json().replace(b'"rank": 17, "token_str"', b'"rank": 37, "token_str"'),
     "special_tokens ranks are not 0..n-1"),
    # found by review: a pattern the tokenizers library cannot compile was its bare Exception, a traceback
    (json.dumps({**json.loads(tekken_json()), "config": {**json.loads(tekken_json())["config"],
                                                           "pattern": BAD_TEKKEN_PATTERN}}).encode(),
     re.escape(f"config.pattern {BAD_TEKKEN_PATTERN!r} is not a regular expression the tokenizer can compile (")
     + r".+\)$"),
], ids=["not-json", "no-system-prompt-token", "no-pattern", "bad-base64", "rank-gap", "bad-pattern"])
def test_a_malformed_tekken_tokenizer_is_refused_in_one_line_naming_the_file(tmp_path, blob, why):
    file = EncoderFile.open(mistral_file(tmp_path, blob))
    with pytest.raises(ModelError, match=f"mistral_3_small_flux2_bf16.safetensors's tekken_model is not a readable "
                                         f"tekken tokenizer: {why}"):
        file.tokenizer(None, "")


def test_a_tekken_model_that_is_not_a_byte_string_is_refused_from_the_header(tmp_path):
    path = mistral_file(tmp_path, tekken_json(), tekken_model=torch.zeros(8, 4))
    with pytest.raises(ModelError, match=r"tekken_model is not Mistral's tokenizer \(a uint8 string of at most "
                                         r"64 MiB\); it is F32 \[8, 4\]"):
        EncoderFile.open(path)


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
    assert "ComfyUI single file, tiny, bf16, base (CFG), set by distilled = false;" in line


@pytest.mark.parametrize("value", ["false", "true", 0, 1, None, []])
def test_an_is_distilled_that_is_not_a_json_boolean_is_refused_naming_the_file_and_field(comfy, tmp_path, value):
    """Found by review: ``bool(data["is_distilled"])`` took the string "false" for True (a distilled model run
    without CFG when base was meant). Only a JSON boolean says which; anything else is one line naming it."""
    _, diffusers, _ = comfy
    folder = tmp_path / "models" / "klein"
    shutil.copytree(diffusers, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "is_distilled": value}))
    why = (f"{folder / 'model_index.json'}: is_distilled is {json.dumps(value)}, not true or false (a JSON "
           "boolean); set it to one, or remove it for diffusers' default (base)")
    with pytest.raises(ModelError) as caught:
        open_source("klein", ModelStore([tmp_path / "models"])).distilled()
    assert str(caught.value) == why
    config = DaemonConfig(models_dir=(tmp_path / "models",), state_dir=tmp_path / "state")
    assert f"BAD model klein: {why}" in [f.text.split("\n")[0] for f in check_models(config)]
    for boolean in (False, True):
        (folder / "model_index.json").write_text(json.dumps({**index, "is_distilled": boolean}))
        assert open_source("klein", ModelStore([tmp_path / "models"])).distilled() is boolean


def test_a_daemon_whose_model_has_a_bad_is_distilled_stops_at_start_with_the_same_line(comfy, tmp_path):
    """Found by review: a bad is_distilled was read at the first generation (and by meshd check), so the daemon
    started, said it was ready and failed every job as head. The model is refused when it is opened, at start,
    in the line meshd check gives; the operator's ``distilled =`` decides instead of the file, so it starts."""
    from meshd.node.lifecycle import StartupError, open_model
    from meshd.node.sdnotify import Notifier

    _, diffusers, _ = comfy
    folder = tmp_path / "models" / "klein"
    shutil.copytree(diffusers, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "is_distilled": "false"}))
    why = (f'{folder / "model_index.json"}: is_distilled is "false", not true or false (a JSON boolean); set it to '
           "one, or remove it for diffusers' default (base)")
    config = DaemonConfig(model="klein", models_dir=(tmp_path / "models",), state_dir=tmp_path / "state",
                          device="cpu", compile="off")
    with pytest.raises(StartupError) as caught:
        open_model(config, CPU, Notifier())
    assert str(caught.value) == f"model: {why}"
    with pytest.raises(ModelError) as caught:
        open_source("klein", ModelStore([tmp_path / "models"]))
    assert str(caught.value) == why
    told = open_model(replace(config, distilled=False), CPU, Notifier())
    assert told.source.distilled() is False


def test_meshd_check_says_what_decided_base_or_distilled(comfy, tmp_path):
    """Nothing in a klein file's tensors or ComfyUI's detection tells base from distilled: the check line says
    it is assumed, and how to say otherwise; a file named as BFL names base files is taken as base."""
    root, _, _ = comfy
    models = tmp_path / "models" / "diffusion_models"
    models.mkdir(parents=True)
    for name in ("flux-2-klein-tiny.safetensors", "flux-2-klein-base-tiny-fp8.safetensors"):
        shutil.copy(root / "models" / "diffusion_models" / "flux2-tiny.safetensors", models / name)
    store = ModelStore([tmp_path / "models", root / "models"])
    assert open_source("diffusion_models/flux-2-klein-base-tiny-fp8", store).distilled() is False
    assert open_source("diffusion_models/flux-2-klein-tiny", store).distilled() is True
    config = DaemonConfig(models_dir=(tmp_path / "models", root / "models"), state_dir=tmp_path / "state")
    lines = {f.text.split(":", 1)[0]: f.text for f in check_models(config) if f.topic == "models"}
    assert ("tiny, bf16, distilled, assumed: a klein base file holds the same tensors (set distilled = false for one);"
            in lines["ok  model diffusion_models/flux-2-klein-tiny"])
    base = lines["ok  model diffusion_models/flux-2-klein-base-tiny-fp8"]
    assert 'tiny, bf16, base (CFG), "base" in its file name;' in base


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


def test_meshtui_generate_local_finds_loras_in_the_comfyui_tree(comfy, tmp_path, capsys):
    """``--comfyui-dir`` brings its ``models/loras`` as the daemon's ``comfyui_dir`` does (found by review:
    the local run searched only --lora-dir)."""
    from meshtui.cli import main

    root, _, _ = comfy
    images = []
    for extra in ([], ["--lora", "style:10"]):
        out = tmp_path / f"dog{len(images)}.png"
        code = main(["generate", "--local", "--device", "cpu", "--comfyui-dir", str(root), "--model", TRANSFORMER,
                     "--prompt", "a dog by the sea", "--seed", "3", "--size", "64x64", "--steps", "2",
                     "--out", str(out), "--json", *extra])
        assert code == 0, capsys.readouterr().err
        images.append(np.asarray(Image.open(out)))
    assert not np.array_equal(*images)  # the LoRA was applied


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
    prepared = next(e for e in from_comfy.events if isinstance(e, Prepared))  # the plan says how it samples
    assert (prepared.distilled, prepared.cfg) == (True, False)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(from_comfy.png))),
                          np.asarray(Image.open(io.BytesIO(from_diffusers.png))))


# --- LoRA spellings ComfyUI accepts ---------------------------------------------------------------

def test_simpletuners_lycoris_named_plain_lora_means_what_the_peft_file_means(world, tmp_path):
    from tests.test_lora import ALPHA, carry, forward, model

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
        carry(m, [LoraStore([world["loras"]]).spec(name, 0.8)], LoraStore([world["loras"]]))
        outputs.append(forward((m, 0, 6)))
    assert torch.equal(*outputs)


def test_a_linear1_qkv_lora_adapts_only_the_attention_rows_of_linear1(world):
    """ComfyUI's partial key: the up matrix covers the first 3 x hidden rows of the fused linear1; the
    same LoRA written for the whole linear1 with zero MLP rows is the same model."""
    from tests.test_lora import carry, forward, model

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
        carry(m, [LoraStore([world["loras"]]).spec(name)], LoraStore([world["loras"]]))
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_fp8_text_encoder_on_the_gpu_runs_its_fp8_path_and_agrees_with_the_dequantised_model(comfy, tmp_path):
    """On a GPU with fp8 tensor cores (H100/H200, RTX 40/50) the encoder's fp8 layers run native fp8 matmuls
    (activations quantised per token); the hidden states FLUX.2 reads stay within that path's error of the
    dequantised bf16 model's. Elsewhere the per-layer path is the CPU's, exact."""
    from meshd.model.precision import fp8_compute
    from tests.comfyui_files import fp8mixed

    root, _, ref = comfy
    cuda = torch.device("cuda")
    stored, dequantised = fp8mixed(comfy_text_encoder(ref["qwen3"]), keep_bf16=(), per_row=True)
    save_file(stored, str(tmp_path / "fp8.safetensors"))
    save_file(dequantised, str(tmp_path / "dequantised.safetensors"))
    held = EncoderFile.open(tmp_path / "fp8.safetensors").load(PRESET, cuda, torch.bfloat16)
    dense = EncoderFile.open(tmp_path / "dequantised.safetensors").load(PRESET, cuda, torch.bfloat16)
    layers = [m for m in held.modules() if isinstance(m, Fp8Linear)]
    assert all(m.weight.device.type == "cuda" and m.weight.dtype == torch.float8_e4m3fn for m in layers)
    native = fp8_compute("cuda").native
    assert any(m.native for m in layers) == native  # q/o/MLP are 16-aligned; k/v (8 rows) dequantise
    ids = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(2)).to(cuda)
    with torch.inference_mode():
        got = held(ids, output_hidden_states=True).hidden_states
        want = dense(ids, output_hidden_states=True).hidden_states
    for k in PRESET.text_encoder_layers:
        rel = float((got[k].float() - want[k].float()).norm() / want[k].float().norm())
        path = "native" if native else "per-layer"
        print(f"fp8 text encoder, hidden state {k}: rel L2 {rel:.4f} vs dequantised ({path})")
        assert rel < (0.05 if native else 1e-6), (k, rel)
