"""Mistral's tokenizer as ComfyUI ships it: the ``tekken.json`` of Mistral Small 3, as the bytes of a
``tekken_model`` uint8 tensor inside the text-encoder file (``mistral_3_small_flux2_bf16`` / ``_fp8``).

ComfyUI reads it in ``comfy/text_encoders/flux.py`` (``Mistral3Tokenizer`` -> ``load_mistral_tokenizer`` ->
``bpe_tokenizer.from_tekken_json``) and renders FLUX.2's prompt as ``<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]
[INST]prompt[/INST]``, padded on the left with ``<pad>`` (id 11), as InvokeAI does for the same file.

The format (mistral_common's ``Tekkenizer``): ``config`` (the pre-tokeniser ``pattern``,
``default_vocab_size``, ``default_num_special_tokens``), ``vocab`` (byte sequences by rank, base64; the
merge order is the ranks themselves, tiktoken-style) and ``special_tokens`` (control tokens by rank). Ids
are the special tokens' ranks first, then ``num_special + rank`` for the byte vocabulary, which is cut to
``default_vocab_size - num_special`` entries.

Here the blob is read with a bounded read, checked field by field (a malformed one is refused naming the
file and the field), and handed to transformers' own tekken converter
(``transformers.integrations.mistral.tokenizer.convert_tekken_tokenizer``, what ``AutoTokenizer`` uses for a
``tekken.json`` when mistral_common is absent), so the ids are the library's. It is a JSON document: no
code runs when it is read.

Its pre-tokeniser pattern, and those of a tokenizer folder's ``tokenizer.json`` or ``tekken.json``
(:func:`check_tokenizer_folder`), are compiled first by the engine that will run them (the tokenizers
library, which reports a bad one as a bare Exception from deep inside loading), so a pattern it rejects
is one line naming the file and the field.
"""

from __future__ import annotations

import base64
import binascii
import json
import tempfile
from pathlib import Path

from .tensorfiles import ModelError, TensorInfo, open_safetensors

#: The tensor ComfyUI keeps the tokenizer in.
TEKKEN_KEY = "tekken_model"
#: The released tekken.json is about 15 MB (ComfyUI's blob ~19 MB); anything this large is not a tokenizer.
MAX_TEKKEN_BYTES = 64 << 20
#: A tokenizer.json is at most a few tens of MB (Mistral's ~17); a larger file is left to transformers unchecked.
MAX_TOKENIZER_BYTES = 64 << 20
#: The parts of a tokenizer.json that hold patterns (never the vocabulary or the merges).
PATTERN_SECTIONS = ("normalizer", "pre_tokenizer", "post_processor", "decoder")
#: The control tokens FLUX.2's prompt is made of (the rest of Mistral's special tokens are never emitted).
FLUX2_SPECIALS = ("<s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
#: FLUX.2's prompt as Mistral Small 3.1's chat template renders it for one system and one user turn (content
#: as a string or as diffusers' list of text parts); ComfyUI's ``Flux2Tokenizer.llama_template`` is the same
#: text with the BOS it adds as start token.
MISTRAL_FLUX2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ raise_exception('FLUX.2 prompts have a system and a user turn only') }}{% endif %}"
    "{% endfor %}"
)


def check_tekken_header(path: Path, info: TensorInfo) -> None:
    """Refuse, from the header alone, a ``tekken_model`` that is not a byte string of a tokenizer's size."""
    if info.dtype != "U8" or len(info.shape) != 1 or not 0 < info.shape[0] <= MAX_TEKKEN_BYTES:
        raise ModelError(f"{path}: {TEKKEN_KEY} is not Mistral's tokenizer (a uint8 string of at most "
                         f"{MAX_TEKKEN_BYTES >> 20} MiB); it is {info.dtype} {list(info.shape)}")


def read_tekken(path: Path, info: TensorInfo) -> bytes:
    """The ``tekken_model`` tensor's bytes, checked from the header first (a wrong tensor is never read whole)."""
    check_tekken_header(path, info)
    with open_safetensors(path) as f:
        return f.get_tensor(info.key).numpy().tobytes()


def check_tekken(data: bytes, where: str) -> dict:
    """The parsed tekken.json, or a ModelError naming ``where`` and the first field that is wrong."""

    def bad(what: str) -> ModelError:
        return ModelError(f"{where} is not a readable tekken tokenizer: {what}")

    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("not a UTF-8 JSON document") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    config, vocab, specials = doc.get("config"), doc.get("vocab"), doc.get("special_tokens")
    if not isinstance(config, dict) or not isinstance(config.get("pattern"), str):
        raise bad("config.pattern is missing")
    if why := pattern_error(config["pattern"]):
        raise bad(f"config.pattern {config['pattern']!r} is not a regular expression the tokenizer can compile ({why})")
    if not isinstance(specials, list) or not all(isinstance(s, dict) and isinstance(s.get("token_str"), str)
                                                 and isinstance(s.get("rank"), int) for s in specials):
        raise bad("special_tokens is not a list of {rank, token_str} (an old-format file without them needs "
                  "mistral_common, which meshd does not use)")
    if sorted(s["rank"] for s in specials) != list(range(len(specials))):
        raise bad("special_tokens ranks are not 0..n-1")
    num_special = config.get("default_num_special_tokens", len(specials))
    size = config.get("default_vocab_size")
    if not isinstance(num_special, int) or num_special < len(specials):
        raise bad(f"config.default_num_special_tokens is {num_special!r}, fewer than the {len(specials)} listed")
    if not isinstance(size, int) or size <= num_special:
        raise bad(f"config.default_vocab_size is {size!r}, not more than the {num_special} special tokens")
    if not isinstance(vocab, list) or len(vocab) < size - num_special:
        raise bad(f"vocab holds {len(vocab) if isinstance(vocab, list) else 'no'} entries; the config says "
                  f"{size - num_special}")
    seen: set[bytes] = set()
    for rank, entry in enumerate(vocab[: size - num_special]):
        if not isinstance(entry, dict) or entry.get("rank", rank) != rank \
                or not isinstance(entry.get("token_bytes"), str):
            raise bad(f"vocab entry {rank} is not {{rank: {rank}, token_bytes}}")
        try:
            token = base64.b64decode(entry["token_bytes"], validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"vocab entry {rank}'s token_bytes is not base64") from None
        if not token or token in seen:
            raise bad(f"vocab entry {rank} is empty or repeats an earlier token")
        seen.add(token)
    if rank_missing := [b for b in range(256) if bytes([b]) not in seen]:
        raise bad(f"byte {rank_missing[0]} has no token, so some text could not be encoded")
    names = {s["token_str"] for s in specials}
    if missing := [t for t in FLUX2_SPECIALS if t not in names]:
        raise bad(f"it lacks the control token {missing[0]} that FLUX.2's prompt uses")
    return doc


def pattern_error(pattern: str) -> str:
    """Why the tokenizers library, the engine that runs a tokenizer's patterns, cannot compile ``pattern`` (its
    first line); "" when it can."""
    from tokenizers import Regex  # noqa: PLC0415

    try:
        Regex(pattern)
    except Exception as exc:  # noqa: BLE001 - the library raises every error as a bare Exception
        return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    return ""


def check_tokenizer_folder(folder: Path) -> None:
    """Refuse, in one line naming the file and the field, a tokenizer folder whose ``tokenizer.json`` (its
    normalizer, pre-tokenizer, post-processor or decoder) or ``tekken.json`` holds a pattern the tokenizers
    library cannot compile; a file it cannot parse, or larger than MAX_TOKENIZER_BYTES, is left to the loader."""
    for name in ("tokenizer.json", "tekken.json"):
        path = folder / name
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_TOKENIZER_BYTES + 1)
            doc = json.loads(raw) if len(raw) <= MAX_TOKENIZER_BYTES else None
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict):
            continue
        if name == "tekken.json":
            config = doc.get("config")
            found = [("config.pattern", config["pattern"])] if isinstance(config, dict) and \
                isinstance(config.get("pattern"), str) else []
        else:
            found = [p for section in PATTERN_SECTIONS for p in _patterns(doc.get(section), section)]
        for field, pattern in found:
            if why := pattern_error(pattern):
                raise ModelError(f"{path}: {field} {pattern!r} is not a regular expression the tokenizer can "
                                 f"compile ({why})")


def _patterns(node, where: str):
    """(field, pattern) of every ``{"Regex": pattern}`` in a tokenizer.json section."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "Regex" and isinstance(value, str):
                yield f"{where}.Regex", value
            else:
                yield from _patterns(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _patterns(value, f"{where}[{i}]")


def tekken_tokenizer(data: bytes, where: str):
    """A transformers tokenizer of the tekken.json ``data`` that renders FLUX.2's prompt as the released
    pipeline and ComfyUI do (left padding with ``<pad>``)."""
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer  # noqa: PLC0415

    check_tekken(data, where)
    # The converter reads a file; the blob is staged in a private temporary folder only for that call.
    with tempfile.TemporaryDirectory(prefix="meshd-tekken-") as tmp:
        file = Path(tmp) / "tekken.json"
        file.write_bytes(data)
        try:
            tok = convert_tekken_tokenizer(str(file), chat_template=MISTRAL_FLUX2_TEMPLATE)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # the tokenizers library refused it
            raise ModelError(f"{where} is not a readable tekken tokenizer: {str(exc).splitlines()[0][:200]}") from None
    tok.padding_side = "left"
    return tok
