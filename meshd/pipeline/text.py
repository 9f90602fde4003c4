"""Prompt embeddings across the mesh: op ``encode-prompt`` for a head that does not run its own text
encoder, and the head's side of it. The head checks the peer's model and text-encoder identity against
its own before it uses what comes back, and remembers the embeddings for the next generation."""

from __future__ import annotations

import asyncio

import torch

from .. import limits
from ..errors import MeshError
from ..model.tensorfiles import ModelError
from ..wire.channel import Request
from .generation import GenerationParams, prompts_needed
from .plan import PeerAddress, PlanError
from .streaming import pack_raw, unpack_raw


class TextService:
    def __init__(self, daemon) -> None:
        self.daemon = daemon

    def ops(self) -> dict:
        return {"encode-prompt": self.encode_prompt}

    async def encode_prompt(self, request: Request):
        """Prompt embeddings from this peer's text encoder, for a head whose plan places it here.

        Request ``{prompts: [text, ...]}`` (1..MAX_PROMPTS_PER_ENCODE, each at most MAX_PROMPT_BYTES);
        reply ``{embeds: [raw tensor header, ...], text_encoder: identity, model: identity}`` + one
        buffer per prompt. The head checks the identity against its own before it uses them."""
        d = self.daemon
        prompts = request.header.get("prompts")
        if (not isinstance(prompts, list) or not 1 <= len(prompts) <= limits.MAX_PROMPTS_PER_ENCODE
                or not all(isinstance(p, str) and len(p.encode()) <= limits.MAX_PROMPT_BYTES for p in prompts)):
            raise MeshError("bad-request", f"encode-prompt needs prompts: 1 to {limits.MAX_PROMPTS_PER_ENCODE} texts "
                                           f"of at most {limits.MAX_PROMPT_BYTES} bytes")
        source = d.model.source
        if not source.has_text_encoder():
            raise MeshError("not-found", f"{d.name} has no text encoder for {d.model.identity.model_id}")
        try:
            embeds, seconds = await d.worker.run(d.model.prompts.embeds, prompts)
            identity = await asyncio.get_running_loop().run_in_executor(None, source.text_encoder_identity)
        except (ModelError, OSError) as exc:
            raise MeshError("not-found", f"{d.name} could not encode the prompt: {exc}") from None
        headers, buffers = pack_raw(embeds)
        return {"embeds": headers, "text_encoder": identity, "model": d.model.identity.to_dict(),
                "seconds": seconds}, buffers

    async def remote_embeds(self, where: object, params: GenerationParams) -> dict[str, torch.Tensor]:
        """The embeddings a generation needs, from the peer its plan places the text encoder on."""
        d = self.daemon
        if not isinstance(where, str):
            raise MeshError("bad-request", "text_encoder must be a peer's HOST:PORT")
        try:
            address = PeerAddress.parse(where)
        except (PlanError, ValueError) as exc:
            raise MeshError("bad-request", f"text_encoder: {exc}") from None
        prompts = prompts_needed(d.model, params)
        channel = await d.pool.get(address)
        reply = await channel.request("encode-prompt", {"prompts": prompts}, timeout=limits.ENCODE_PROMPT_TIMEOUT_S)
        h = reply.header
        theirs, mine = h.get("model"), d.model.identity
        their_preset = theirs.get("preset") if isinstance(theirs, dict) else None
        if their_preset != mine.preset:
            raise MeshError("mismatch", f"text encoder on {address} belongs to model preset {their_preset!r:.40}; "
                                        f"this head runs {mine.preset!r}", peer=str(address))
        if d.model.source.has_text_encoder():
            try:
                own = await asyncio.get_running_loop().run_in_executor(None, d.model.source.text_encoder_identity)
            except (ModelError, OSError) as exc:
                raise MeshError("not-found", f"{d.name} cannot read its own text encoder to compare: {exc}") from None
            if h.get("text_encoder") != own:
                raise MeshError("mismatch", f"text encoder on {address} is {str(h.get('text_encoder'))[:16]}…; this "
                                            f"head's own is {own[:16]}…: they would embed prompts differently",
                                peer=str(address))
        headers = h.get("embeds")
        if not isinstance(headers, list) or len(headers) != len(prompts):
            raise MeshError("protocol", f"encode-prompt reply must carry {len(prompts)} embeddings", peer=str(address))
        shape = (1, *d.model.prompts.shape)
        embeds = unpack_raw(headers, reply.segments, torch.device("cpu"), [shape] * len(prompts))
        for prompt, value in zip(prompts, embeds):
            try:
                d.model.remember_prompt(prompt, value)  # the next generation with this prompt needs no trip
            except ModelError as exc:
                raise MeshError("mismatch", f"embeddings from {address}: {exc}", peer=str(address)) from None
        return dict(zip(prompts, embeds))
