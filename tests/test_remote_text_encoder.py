"""A plan may place the text encoder on another peer: the head fetches the prompt embeddings from it
(``encode-prompt``), checks they come from the same text encoder as its own, and the image is the one
the head would have made by itself."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from meshd.wire.channel import Channel
from meshd.errors import MeshError
from meshd.model.files import ModelStore
from meshd.model.runtime import open_source
from meshd.pipeline.plan import PeerAddress
from meshtui.events import Encoding
from tests.daemons import running_daemon, split_generation

KEY = bytes(range(32))
PARAMS = {"prompt": "a lighthouse at dawn", "seed": 5, "width": 64, "height": 64, "steps": 2, "guidance": 1.0}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``tiny``; ``bare``: the same model without text_encoder/ (a slim head's folder); ``other``: tiny
    with a text encoder whose weights differ (another model's encoder of the same shape)."""
    root = tmp_path_factory.mktemp("models")
    open_source("tiny", ModelStore([root]))  # written on first use
    shutil.copytree(root / "tiny", root / "bare")
    shutil.rmtree(root / "bare" / "text_encoder")
    shutil.copytree(root / "tiny", root / "other")
    weights = root / "other" / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    name = next(iter(state))
    state[name] = state[name] + 0.5
    save_file(state, weights)
    return root


def address(daemon) -> PeerAddress:
    return PeerAddress(*daemon.bound)


async def generate(head, plan_spec, peers, text_encoder=None):
    return await split_generation(KEY, [p.bound for p in peers], plan_spec, PARAMS, codec="raw", return_latents=True,
                                  text_encoder=None if text_encoder is None else address(text_encoder))


async def test_a_head_without_a_text_encoder_uses_the_peer_placed_for_it(models, tmp_path):
    async with running_daemon(tmp_path / "a", KEY, range(0, 3), models, model="bare") as a, \
               running_daemon(tmp_path / "b", KEY, range(3, 6), models, model="bare") as b, \
               running_daemon(tmp_path / "t", KEY, range(0, 6), models, model="tiny") as t:
        reference = await generate(t, "A:0-5", [t])  # all-local, on the peer that has everything
        with pytest.raises(MeshError, match="has no text_encoder/; encode prompts on a peer") as error:
            await generate(a, "A:0-2,B:3-5", [a, b])
        assert error.value.code == "not-found"

        split = await generate(a, "A:0-2,B:3-5", [a, b], text_encoder=t)
        assert torch.equal(split.latents, reference.latents)  # raw: bit for bit
        assert Encoding("%s:%d" % t.bound) in split.events
        # The head keeps what it fetched: the same prompt again needs no text encoder at all.
        again = await generate(a, "A:0-2,B:3-5", [a, b])
        assert torch.equal(again.latents, reference.latents)


async def test_a_different_text_encoder_or_none_on_the_peer_is_refused(models, tmp_path):
    async with running_daemon(tmp_path / "a", KEY, range(0, 6), models, model="tiny") as head, \
               running_daemon(tmp_path / "o", KEY, (), models, model="other") as other, \
               running_daemon(tmp_path / "n", KEY, (), models, model="bare") as bare:
        with pytest.raises(MeshError, match="would embed prompts differently") as error:
            await generate(head, "A:0-5", [head], text_encoder=other)
        assert error.value.code == "mismatch"
        with pytest.raises(MeshError, match="has no text encoder") as error:
            await generate(head, "A:0-5", [head], text_encoder=bare)
        assert error.value.code == "not-found"
        assert (await generate(head, "A:0-5", [head])).latents is not None  # the head itself still serves


@pytest.mark.parametrize("fields", [{}, {"prompts": "x"}, {"prompts": []}, {"prompts": ["a"] * 5}, {"prompts": [7]},
                                    {"prompts": ["x" * 20000]}])
async def test_encode_prompt_checks_its_request(models, tmp_path, fields):
    async with running_daemon(tmp_path, KEY, (), models) as daemon:
        channel = await Channel.connect(*daemon.bound, KEY)
        with pytest.raises(MeshError, match="encode-prompt needs prompts") as error:
            await channel.request("encode-prompt", fields)
        assert error.value.code == "bad-request"
        reply = await channel.request("encode-prompt", {"prompts": ["a dog", ""]})
        assert len(reply.segments) == 2 and reply.header["model"]["preset"] == "tiny"
        await channel.close()
