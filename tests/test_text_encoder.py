"""The head's text encoder: a real Qwen3 (klein) or Mistral 3 (dev) read from the model folder gives the
embeddings diffusers' pipelines give; it is loaded only for prompts not in the cache and put away as
configured; a wrong encoder is refused with the sizes. Everything is built here, offline: a
test-sized Qwen3 / Mistral 3 from config and a word-level tokenizer with a chat template.

What cannot be checked offline: dev's real tokenizer is a PixtralProcessor with Mistral's own chat
template; here a plain tokenizer with a Pixtral-shaped template (system + user content lists) stands
in for it, which exercises meshd's loading and diffusers' embedding code but not Pixtral itself.
"""

import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from meshd.pipeline.generation import GenerationParams, LocalRunner, run_generation
from meshd.node.gpu import GpuWorker
from meshd.model.files import ModelError, ModelStore
from meshd.model.presets import PRESETS
from meshd.model.runtime import HostedModel, open_source
from meshd.model.text_encoder import LanguageModelEncoder, PromptCache, TextEncoderOptions
from meshd.model.tiny import write_tiny

PRESET = PRESETS["tiny"]  # joint_attention_dim 48 = 3 stacked layers (1, 2, 3) x hidden 16
WORDS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "user", "assistant", "system",
         "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "a", "dog", "is", "dancing", "lighthouse",
         "at", "dawn", "the", "sea"]
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% if enable_thinking is defined and "
                 "not enable_thinking %}<think> </think> {% endif %}{% endif %}")
PIXTRAL_LIKE_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT] "
                         "{{ m['content'][0]['text'] }} [/SYSTEM_PROMPT] {% else %}[INST] {{ m['content'][0]['text'] }}"
                         " [/INST] {% endif %}{% endfor %}")
CPU = torch.device("cpu")


def tokenizer(template: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = template
    return fast


def qwen3(hidden=16, layers=3) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=hidden, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=8, vocab_size=len(WORDS))
    return Qwen3ForCausalLM(config).eval()


def mistral3(layers=3) -> Mistral3ForConditionalGeneration:
    torch.manual_seed(0)
    config = Mistral3Config(
        text_config={"model_type": "mistral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": layers,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": len(WORDS)},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "image_size": 32, "patch_size": 8},
    )
    return Mistral3ForConditionalGeneration(config).eval()


def model_with_encoder(root, name, encoder, template) -> None:
    """A copy of the tiny model whose text_encoder/ and tokenizer/ are a real (test-sized) LLM."""
    shutil.copytree(root / "tiny", root / name)
    shutil.rmtree(root / name / "text_encoder")
    encoder.save_pretrained(root / name / "text_encoder")
    tokenizer(template).save_pretrained(root / name / "tokenizer")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("te-models")
    write_tiny(root / "tiny")
    model_with_encoder(root, "tiny-qwen3", qwen3(), QWEN_TEMPLATE)
    model_with_encoder(root, "tiny-mistral3", mistral3(), PIXTRAL_LIKE_TEMPLATE)
    # deeper than FLUX.2 reads (layers 1-3 of 5), as Qwen3-8B (27 of 36) and Mistral Small 3 (30 of 40) are
    model_with_encoder(root, "tiny-qwen3-deep", qwen3(layers=5), QWEN_TEMPLATE)
    model_with_encoder(root, "tiny-mistral3-deep", mistral3(layers=5), PIXTRAL_LIKE_TEMPLATE)
    return root


def hosted(root, name, **options) -> HostedModel:
    return HostedModel(open_source(name, ModelStore([root])), CPU, torch.bfloat16, TextEncoderOptions(**options))


PROMPTS = ["a dog is dancing", "a lighthouse at dawn", ""]


# --- the embeddings are diffusers' --------------------------------------------------------------------

def test_qwen3_embeddings_equal_the_klein_pipelines(root):
    folder = root / "tiny-qwen3"
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, transformer=None,
        text_encoder=Qwen3ForCausalLM.from_pretrained(folder / "text_encoder", dtype=torch.bfloat16),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
    )
    model = hosted(root, "tiny-qwen3")
    for prompt in PROMPTS:
        expected, _ = pipe.encode_prompt(prompt, device=CPU, max_sequence_length=PRESET.max_sequence_length,
                                         text_encoder_out_layers=PRESET.text_encoder_layers)
        got = model.encode_prompt(prompt)
        assert got.shape == (1, PRESET.max_sequence_length, 48)
        assert torch.equal(got, expected.to(torch.bfloat16)), prompt
    assert not torch.equal(model.encode_prompt(PROMPTS[0]), model.encode_prompt(PROMPTS[1]))


def test_mistral3_embeddings_equal_the_dev_pipelines(root):
    folder = root / "tiny-mistral3"
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, transformer=None,
        text_encoder=Mistral3ForConditionalGeneration.from_pretrained(folder / "text_encoder", dtype=torch.bfloat16),
        tokenizer=AutoProcessor.from_pretrained(folder / "tokenizer"),
    )
    model = hosted(root, "tiny-mistral3")
    for prompt in PROMPTS:
        expected, _ = pipe.encode_prompt(prompt, device=CPU, max_sequence_length=PRESET.max_sequence_length,
                                         text_encoder_out_layers=PRESET.text_encoder_layers)
        assert torch.equal(model.encode_prompt(prompt), expected.to(torch.bfloat16)), prompt


@pytest.mark.parametrize("name,model_class,tokenizer_class,pipeline", [
    ("tiny-qwen3-deep", Qwen3ForCausalLM, AutoTokenizer, Flux2KleinPipeline),
    ("tiny-mistral3-deep", Mistral3ForConditionalGeneration, AutoProcessor, Flux2Pipeline),
])
def test_only_the_layers_flux2_reads_are_built_and_the_embeddings_are_the_full_models(root, name, model_class,
                                                                                      tokenizer_class, pipeline):
    """Layers after the last one read are never built, and the embeddings are exactly the full model's (whose
    hidden state 3 of 5 is layer 3's raw output, not the final norm's)."""
    folder = root / name
    full = model_class.from_pretrained(folder / "text_encoder", dtype=torch.bfloat16)
    pipe = pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, transformer=None, text_encoder=full,
                    tokenizer=tokenizer_class.from_pretrained(folder / "tokenizer"))
    encoder = LanguageModelEncoder.load(folder / "text_encoder", folder / "tokenizer", PRESET, CPU, torch.bfloat16)
    assert encoder.num_layers == max(PRESET.text_encoder_layers) == 3
    for prompt in PROMPTS:
        expected, _ = pipe.encode_prompt(prompt, device=CPU, max_sequence_length=PRESET.max_sequence_length,
                                         text_encoder_out_layers=PRESET.text_encoder_layers)
        assert torch.equal(encoder(prompt), expected.to(torch.bfloat16)), prompt


def test_a_pruned_mistral_file_builds_the_layers_read_and_equals_the_full_model(tmp_path):
    """dev's encoder as ComfyUI ships it (mistral_3_small_flux2_*: layers 0-29 of 40, no final norm, the
    tekken tokenizer inside): built to the last layer read, its hidden states are the full model's."""
    from safetensors.torch import save_file
    from transformers import MistralConfig, MistralModel

    from meshd.model.text_encoder_file import EncoderFile

    torch.manual_seed(0)
    config = MistralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=5, num_attention_heads=1,
                           num_key_value_heads=1, head_dim=128, vocab_size=len(WORDS), rope_theta=1e9,
                           rms_norm_eps=1e-5)
    full = MistralModel(config).eval().to(torch.bfloat16)
    state = {f"model.{k}": v.contiguous() for k, v in full.state_dict().items()
             if not k.startswith(("layers.4.", "norm."))}  # pruned: 4 of 5 layers, no final norm
    state["tekken_model"] = torch.tensor(list(b'{"config": {}}'), dtype=torch.uint8)
    save_file(state, str(tmp_path / "mistral_3_small_flux2_bf16.safetensors"))
    file = EncoderFile.open(tmp_path / "mistral_3_small_flux2_bf16.safetensors")
    assert (file.family, file.num_layers, file.has_norm, file.embedded_tokenizer) == ("mistral3", 4, False, True)
    assert "pruned" in file.describe()
    model = file.load(PRESET, CPU, torch.bfloat16)
    assert len(model.layers) == 3
    ids = torch.tensor([[1, 13, 14, 15, 16, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
        want = full(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    for k in PRESET.text_encoder_layers:
        assert torch.equal(got[k], want[k]), k
    with pytest.raises(ModelError, match="tekken_model is not a readable tekken tokenizer: config.pattern is missing"):
        file.tokenizer(None, "")  # the tokenizer inside is read (tests/test_comfyui.py); this one is no tokenizer


async def test_a_generation_runs_on_the_real_text_encoders_embeddings(root):
    model = hosted(root, "tiny-qwen3")
    worker = GpuWorker(CPU)
    try:
        await worker.run(model.load, range(PRESET.num_blocks), True, True)
        params = GenerationParams(prompt="a dog is dancing", seed=1, width=64, height=64, steps=2)
        a = await run_generation(model, worker, params, LocalRunner(worker))
        b = await run_generation(model, worker, GenerationParams(**{**params.to_wire(), "prompt": "the sea"}),
                                 LocalRunner(worker))
    finally:
        worker.shutdown()
    assert a.png.startswith(b"\x89PNG") and not torch.equal(a.latents, b.latents)


# --- loaded on demand, put away as configured, cached by prompt ----------------------------------------

def counting_loads(model: HostedModel) -> list:
    loads = []
    original = model.source.text_encoder

    def load(device, dtype):
        loads.append(device)
        return original(device, dtype)

    model.source.text_encoder = load
    return loads


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen3"])
def test_release_after_encoding_and_cached_prompts_need_no_encoder(root, name):
    model = hosted(root, name, idle="release")
    loads = counting_loads(model)
    first = model.encode_prompts(["a dog is dancing", ""])  # a prompt and CFG's negative: one load
    assert len(loads) == 1 and not model.prompts.loaded
    again = model.encode_prompt("a dog is dancing")
    assert len(loads) == 1 and torch.equal(again, first[0])
    model.encode_prompt("the sea")
    assert len(loads) == 2 and not model.prompts.loaded


def test_keep_leaves_the_encoder_loaded_until_released(root):
    model = hosted(root, "tiny-qwen3", idle="keep", device="cpu")
    loads = counting_loads(model)
    model.encode_prompt("a dog is dancing")
    model.encode_prompt("the sea")
    assert len(loads) == 1 and model.prompts.loaded
    model.release_text_encoder()
    assert not model.prompts.loaded
    model.encode_prompt("the sea")  # cached: no reload
    assert len(loads) == 1 and not model.prompts.loaded


def test_embeddings_from_another_peer_are_used_and_checked(root):
    model = hosted(root, "tiny-qwen3")
    loads = counting_loads(model)
    remote = hosted(root, "tiny-qwen3").encode_prompt("a lighthouse at dawn")  # the peer placed to encode
    model.remember_prompt("a lighthouse at dawn", remote)
    assert torch.equal(model.encode_prompt("a lighthouse at dawn"), remote) and loads == []
    with pytest.raises(ModelError, match=r"needs \(1, 32, 48\)"):
        model.remember_prompt("x", torch.zeros(1, 16, 48))


def test_prompt_cache_keeps_the_most_recent_within_its_bytes():
    one = torch.zeros(1, 32, 48, dtype=torch.bfloat16)
    cache = PromptCache(max_bytes=2 * one.numel() * one.element_size())
    cache.put("a", one)
    cache.put("b", one + 1)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", one + 2)
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2
    PromptCache(0).put("x", one)  # too big for any budget: simply not cached


def test_options_are_validated():
    with pytest.raises(ValueError, match="keep, cpu, release"):
        TextEncoderOptions(idle="later")


# --- the wrong encoder is refused with the sizes -------------------------------------------------------

def test_a_text_encoder_of_the_wrong_size_or_family_is_refused(root, tmp_path):
    folder = tmp_path / "te"
    qwen3(hidden=8).save_pretrained(folder)
    tok = root / "tiny-qwen3" / "tokenizer"
    with pytest.raises(ModelError, match=r"hidden size 8; tiny needs 3 x 16 = 48"):
        LanguageModelEncoder.load(folder, tok, PRESET, CPU, torch.bfloat16)
    with pytest.raises(ModelError, match=r"hidden size 16; klein-4b needs 3 x 2560 = 7680"):
        LanguageModelEncoder.load(root / "tiny-qwen3" / "text_encoder", tok, PRESETS["klein-4b"], CPU, torch.bfloat16)
    with pytest.raises(ModelError, match="klein-9b needs qwen3"):
        LanguageModelEncoder.load(root / "tiny-mistral3" / "text_encoder", tok, PRESETS["klein-9b"], CPU,
                                  torch.bfloat16)


def test_a_pickle_only_text_encoder_is_never_loaded(root, tmp_path):
    shutil.copytree(root / "tiny-qwen3", tmp_path / "pickled")
    te = tmp_path / "pickled" / "text_encoder"
    for f in te.glob("*.safetensors"):
        f.unlink()
    (te / "pytorch_model.bin").write_bytes(b"\x80\x04 pretend pickle")
    with pytest.raises(ModelError, match="no .safetensors weights"):
        hosted(tmp_path, "pickled").encode_prompt("a dog")


def test_a_model_without_a_text_encoder_says_where_to_encode(root, tmp_path):
    shutil.copytree(root / "tiny", tmp_path / "bare")
    shutil.rmtree(tmp_path / "bare" / "text_encoder")
    model = hosted(tmp_path, "bare")
    assert not model.source.has_text_encoder()
    with pytest.raises(ModelError, match="has no text_encoder/; encode prompts on a peer that has it"):
        model.encode_prompt("a dog")


def test_cpu_policy_loads_once_and_keeps_the_encoder_between_prompts(root):
    model = hosted(root, "tiny-qwen3", idle="cpu", device="cpu")
    loads = counting_loads(model)
    model.encode_prompt("a dog is dancing")
    model.encode_prompt("the sea")
    assert len(loads) == 1 and model.prompts.loaded  # parked (in RAM already on a CPU box), not freed


def test_meshd_serve_takes_the_text_encoder_settings_from_its_config(root, tmp_path):
    """The placement options are the operator's: meshd.toml (or flags), checked at start-up."""
    config = tmp_path / "meshd.toml"
    config.write_text(f'model = "tiny"\ndevice = "cpu"\nmodels_dir = "{root}"\nstate_dir = "{tmp_path / "state"}"\n'
                      'insecure = true\nmdns = false\ntext_encoder_idle = "nap"\n')
    done = subprocess.run([sys.executable, "-m", "meshd", "serve", "--config", str(config), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "text encoder idle policy 'nap'" in done.stderr
