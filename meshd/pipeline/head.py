"""The head: whole generations (op ``generate``). It holds block 0 and the input layers, queues
generations fairly (:class:`~meshd.node.admission.GenerationSlots`), runs every step's own blocks, sends
the stream down the line (:class:`SplitRunner`, through :class:`.relay.Relay`) and samples with the
prediction that comes back; a one-stage plan runs all-local."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import Awaitable, Callable

import torch

import codec
from codec import CodecSpec

from .. import limits
from ..errors import MeshError, file_refusal
from ..fields import wire_number
from ..model.lora import MAX_LORAS, LoraError, loras_to_wire
from ..model.span import Conditioning
from ..model.tensorfiles import ModelError
from ..node.admission import GenerationSlots, source_of
from ..wire.channel import Request
from .generation import GenerationParams, LocalRunner, Sampler, run_generation, uses_cfg
from .plan import PlanError, SplitPlan, Stage
from .relay import Geometry, downstream_needs, quality_floor, request_flag
from .streaming import LinkPlan, give_up, pack_raw, reserve_shared, unpack_raw


class HeadService:
    """This node as the head of generations."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.slots = GenerationSlots(limits.MAX_ACTIVE_GENERATIONS, limits.MAX_ACTIVE_GENERATIONS_PER_SOURCE)
        self.waiting = 0

    def ops(self) -> dict:
        return {"generate": self.generate}

    def resolve_loras(self, data: object) -> list:
        """LoRAs named by the client without a hash get the hash of the head's own copy."""
        if data is None:
            return []
        if not isinstance(data, list) or len(data) > MAX_LORAS:
            raise MeshError("bad-request", f"loras must be a list of at most {MAX_LORAS} entries")
        out = []
        for item in data:
            if isinstance(item, dict) and not item.get("sha256"):
                name, strength = item.get("name"), item.get("strength", 1.0)
                if not isinstance(name, str) or wire_number(strength) is None:
                    raise MeshError("bad-request", "a LoRA needs a name and a numeric strength")
                try:
                    item = self.daemon.lora_store.spec(name, float(strength)).to_wire()
                except LoraError as exc:
                    raise file_refusal(self.daemon.name, exc) from None
            out.append(item)
        return out

    async def generate(self, request: Request):
        d = self.daemon
        h = request.header
        preset = d.model.preset
        raw_params = h.get("params")
        if isinstance(raw_params, dict) and "loras" in raw_params:
            raw_params = {**raw_params, "loras": self.resolve_loras(raw_params["loras"])}
        params = GenerationParams.from_wire(raw_params, multiple=preset.size_multiple)
        await d.check_loras(params.loras)
        try:
            plan = SplitPlan.from_wire(h.get("plan")).validate(preset.num_blocks)
        except (PlanError, codec.CodecError) as exc:
            raise MeshError("bad-request", f"plan: {exc}") from None
        head = plan.stages[0]
        d.check_holds(head)
        if not d.model.has_head:
            raise MeshError("mismatch", f"{d.name} lacks the input layers the head runs (it must hold block 0)")
        if len(plan.stages) == 1 and not d.model.has_tail:
            raise MeshError("mismatch", f"{d.name} lacks the final layer")
        floor = quality_floor(h, d.config.quality_floor)
        measure_error = request_flag(h, "measure_error", True)
        return_latents = request_flag(h, "return_latents", False)
        codec_default = h.get("codec", "auto")
        if not isinstance(codec_default, str):
            raise MeshError("bad-request", "codec must be text")
        if codec_default != "auto":
            try:
                codec_default = CodecSpec.parse(codec_default).label
            except codec.CodecError as exc:
                raise MeshError("bad-request", str(exc)) from None
            plan = SplitPlan(tuple(s if s.codec != "auto" else Stage(s.peer, s.start, s.end, codec_default, s.label)
                                   for s in plan.stages))
        if self.waiting >= limits.MAX_QUEUED_GENERATIONS:
            raise MeshError("busy", f"{d.name} has {self.waiting} generations waiting")
        self.waiting += 1
        source = source_of(request.session.conn.address or request.peer)
        try:
            await request.event({"kind": "queued", "position": self.waiting})
            await self.slots.acquire(source)
        finally:
            self.waiting -= 1
        try:
            embeds = None
            if h.get("text_encoder") is not None:
                await request.event({"kind": "encoding", "text_encoder": str(h.get("text_encoder"))[:200]})
                embeds = await d.text.remote_embeds(h.get("text_encoder"), params)
            return await self._run(request, params, plan, floor, measure_error, return_latents, embeds)
        finally:
            self.slots.release(source)

    async def _run(self, request: Request, params: GenerationParams, plan: SplitPlan, floor: float,
                   measure_error: bool, return_latents: bool, embeds: dict[str, torch.Tensor] | None = None):
        d = self.daemon
        metadata = {"plan": plan.describe(), "stages": [], "head": d.name}
        if len(plan.stages) == 1:
            runner, staging = LocalRunner(d.worker), None
            metadata["stages"] = [{"node": d.name, "blocks": [0, d.model.preset.num_blocks]}]
        else:
            runner = SplitRunner(d, plan, params, floor, measure_error, events=request.event)
            # The stages prepare the job (and compile their blocks) while this head prepares its sampler
            # (the prompt, the latents) and compiles its own blocks: both are done before the first step.
            staging = asyncio.ensure_future(runner.prepare())

        async def before_steps() -> None:
            if staging is not None:
                metadata["stages"] = await staging
            await request.event({"kind": "prepared", "plan": plan.describe(), "stages": metadata["stages"],
                                 "distilled": d.model.source.distilled(), "cfg": uses_cfg(d.model, params)})

        generation = asyncio.ensure_future(run_generation(d.model, d.worker, params, runner, metadata=metadata,
                                                          progress=lambda event: request.event(event), embeds=embeds,
                                                          before_steps=before_steps))
        generation.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            if staging is not None:
                # A stage that refuses the job ends the generation now, not after this head's sampler
                # prepare and compile (GPU work already running finishes; what is queued is dropped).
                await asyncio.wait({generation, staging}, return_when=asyncio.FIRST_EXCEPTION)
                if not generation.done():
                    raise staging.exception()
            result = await generation
        except ModelError as exc:  # no text encoder here and none placed on a peer, a damaged VAE, say
            raise file_refusal(d.name, exc) from None
        finally:
            if not generation.done():
                generation.cancel()
            if staging is not None:
                if not staging.done():
                    staging.cancel()  # the generation failed first: nobody waits for the stages now
                # Released once the prepare is over (nothing awaited here: this task may be cancelled again).
                d.spawn(self._release(runner, staging))
        if return_latents:
            headers, buffers = pack_raw([result.latents])
            return {"summary": result.summary, "latents": headers[0]}, [result.png, *buffers]
        return {"summary": result.summary}, [result.png]

    @staticmethod
    async def _release(runner: SplitRunner, staging: asyncio.Future) -> None:
        await asyncio.gather(staging, return_exceptions=True)  # its failure, if any, was the generation's
        await runner.release()


def _settle(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _time_ms(value: object) -> float | None:
    """A duration in ms a peer reported: a finite number >= 0, or None."""
    ms = wire_number(value)
    return ms if ms is not None and ms >= 0 else None


class SplitRunner:
    """The head's side of a split generation: its own blocks here, the rest across the mesh."""

    def __init__(self, daemon, plan: SplitPlan, params: GenerationParams, floor: float,
                 measure_error: bool, events: Callable[[dict], Awaitable[None]] | None = None) -> None:
        self.daemon = daemon
        self.events = events  # where the stages' compiling events go (the generate request's stream)
        self.plan = plan
        self.params = params
        self.floor = floor
        self.measure_error = measure_error
        self.job_id = uuid.uuid4().hex
        preset = daemon.model.preset
        self.geometry = Geometry(1, preset.max_sequence_length, *preset.latent_grid(params.height, params.width))
        self.head = plan.stages[0]
        self.downstream = downstream_needs(preset, plan.stages[1:])
        self.out_channels = preset.out_channels  # the prediction's width, read each step
        self.channel = None
        self.link: LinkPlan | None = None
        self._pending: asyncio.Future | None = None  # the last forward's record, its prediction already taken

    async def prepare(self) -> list[dict]:
        d = self.daemon
        g = self.geometry
        from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline as P  # noqa: PLC0415

        txt_ids = P._prepare_text_ids(torch.zeros(1, g.txt_len, 1))
        img_ids = P._prepare_latent_ids(torch.zeros(1, 1, g.img_h, g.img_w))
        headers, buffers = pack_raw([txt_ids.contiguous(), img_ids.contiguous()])
        fields = {
            "job": self.job_id,
            "model": d.model.identity.to_dict(),
            "geometry": g.to_wire(),
            "quality_floor": self.floor,
            "measure_error": self.measure_error,
            "ids": headers,
            "loras": loras_to_wire(self.params.loras),
        }
        # Known before the prepare goes out: a prepare cancelled half-way (the stage may have made the
        # job) is released on this channel too.
        self.channel = await d.pool.get(self.plan.stages[1].peer)
        self.channel, infos = await d.relay.prepare_next(fields, buffers, list(self.plan.stages[1:]), self.events)
        self.link = await d.relay.choose_link(self.plan.stages[1], infos[0], g, self.head.codec, self.floor)
        return [d.relay.stage_info(self.head, self.link), *infos]

    async def forward(self, sampler: Sampler, step: int, pass_index: int, cond: Conditioning):
        d = self.daemon
        span = d.model.span
        # The last forward's reply, where its prediction came first (on the answer bell): its hop records
        # and the link it leaves, or its error, before this forward takes a run and goes on that link.
        await self._previous_reply()

        names = sorted(self.downstream)
        # Same host without CUDA IPC: the stream goes into the next stage's region from the compute itself,
        # and the forward goes ahead of it: the stage starts when the compute rings the region's doorbell.
        shape = (self.geometry.batch, self.geometry.tokens, d.model.preset.hidden)
        nbytes = self.geometry.stream_bytes(d.model.preset.hidden, d.model.dtype)
        placed = await reserve_shared(self.channel, self.link, nbytes)
        if placed is not None:
            placed.announce(shape, d.model.dtype)
        send = functools.partial(d.relay.send_step, self.channel, self.link, self.job_id, step, names,
                                 measure_error=self.measure_error, placed=placed)  # (vectors, stream)
        loop = asyncio.get_running_loop()
        vectors_known = loop.create_future()

        def head_compute() -> tuple[torch.Tensor, list[torch.Tensor]]:
            d.model.use_loras(self.params.loras)  # jobs with other LoRAs may have run in between
            # The vectors the stages need, on the host: copied here, where the worker waits for the GPU
            # anyway, not on the event loop. First: a forward sent ahead carries them while the blocks run
            # (the GPU is idle during these small copies before the blocks as it would be after them).
            vectors = [v.cpu() for v in d.relay.vectors(cond, names)]
            if placed is not None:
                loop.call_soon_threadsafe(_settle, vectors_known, vectors)
            joint = span.run(0, self.head.end, sampler.embed(pass_index), cond, sampler.rotary).as_joint()
            if placed is not None:
                placed.place(joint)  # queued behind the blocks
                placed.ring()  # once the copy is done: the stage's compute starts
            return joint, vectors

        shared = self.link.transport == "host-shm"  # (send_shared checks a prediction given back in the run)
        if placed is not None:
            (joint, _), seconds, sending = await self._ahead(head_compute, vectors_known, send)
            seconds -= placed.copy_ms / 1e3  # the copy into the region is the hop's (its encode_ms), not the blocks'
        else:
            (joint, vectors), seconds = await d.worker.run(head_compute)
            sending = asyncio.ensure_future(send(vectors, joint))
        del joint
        expected = (1, sampler.image_tokens, self.out_channels)
        try:
            early = None if placed is None else await placed.answered(sending, expected, d.model.dtype,
                                                                      self.channel.name)
            if early is None:
                return await self._reply(sending, seconds, shared, expected, answered=False)
        except BaseException:
            await give_up(sending)
            raise
        # The stage rang the prediction back in the run: the sampler goes on with it (its scheduler step,
        # the next step's head blocks) while the reply, with the hop records, is still on its way.
        self._pending = asyncio.ensure_future(self._record(sending, seconds, shared, expected))
        self._pending.add_done_callback(lambda f: f.cancelled() or f.exception())  # (raised at the next forward)
        return early, self._pending

    async def _reply(self, sending: asyncio.Future, seconds: float, shared: bool, expected: tuple,
                     *, answered: bool) -> tuple[torch.Tensor, dict]:
        """The forward's reply (``sending``: the send_step task): (the prediction it brought, the pass's record)."""
        d = self.daemon
        reply, hops, self.link = await sending
        # On the host; the scheduler step moves it to the device on the GPU worker.
        (prediction,) = unpack_raw([reply.header.get("prediction")], reply.segments, torch.device("cpu"), [expected])
        if prediction.dtype != d.model.dtype:  # the sampler would fail on it, or change the latents' dtype
            raise MeshError("mismatch", f"the prediction from {self.channel.name} is {prediction.dtype}; "
                                        f"{d.name} computes in {d.model.dtype}")
        # Each hop's wire_ms is its receiving stage's figure: kept only if it is a time, else neither this
        # link's record nor the client (the dashboard, the summary) takes it.
        for hop in hops:
            if isinstance(hop, dict) and "wire_ms" in hop and _time_ms(hop["wire_ms"]) is None:
                del hop["wire_ms"]
        # hops[0]["bytes"]: what this head put on the wire (the send figures folded in by the relay)
        if "wire_ms" in hops[0]:  # (a time, now)
            d.links.get(self.channel.name).hop(hops[0]["bytes"], hops[0]["wire_ms"])
        # return_via: how the prediction came back (host-shm: in the run the stream went out in);
        # answered: taken from there when the stage rang it back, before this reply arrived.
        return prediction, {"compute_ms": seconds * 1e3, "hops": hops,
                            "return_bytes": sum(memoryview(b).nbytes for b in reply.segments),
                            "return_via": "host-shm" if shared and "prediction_shm" in reply.header else "tcp",
                            "answered": answered}

    async def _record(self, sending: asyncio.Future, seconds: float, shared: bool, expected: tuple) -> dict:
        """The record of a forward whose prediction was rung back: its reply must say the same place
        (SharedRun.returned) and the prediction's header what was taken from the run."""
        _, record = await self._reply(sending, seconds, shared, expected, answered=True)
        return record

    async def _previous_reply(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    async def _ahead(self, compute, vectors_known: asyncio.Future, send):
        """Run ``compute`` and ``send`` its step's forward while it runs (as soon as it has the vectors);
        the stream follows in the run the forward names. Returns (compute's result, its seconds, the
        forward: its send_step task, answered or not). A compute that fails takes the forward with it (cancelled: the
        stage stops waiting); a forward that fails is raised once the compute is done with the run."""
        d = self.daemon
        computing = asyncio.ensure_future(d.worker.run(compute))
        sending = None
        try:
            await asyncio.wait({computing, vectors_known}, return_when=asyncio.FIRST_COMPLETED)
            if not vectors_known.done():
                await computing  # it failed before it had the vectors: raised here
                raise MeshError("internal", "the head's compute gave no vectors for its forward")
            sending = asyncio.ensure_future(send(vectors_known.result(), None))
            sending.add_done_callback(lambda f: f.cancelled() or f.exception())  # raised by _reply, or the compute's is
            result, seconds = await computing
            return result, seconds, sending
        except BaseException:
            computing.cancel()  # (a GPU call already running finishes; its closure holds the run)
            if sending is not None:
                await give_up(sending)  # (a cancelled forward retires its region)
            raise
        finally:
            vectors_known.cancel()

    async def release(self) -> None:
        """Release the job on every stage; also after a failed or cancelled prepare (the stages may have
        prepared it anyway; releasing an unknown job is harmless). A reply still awaited (the generation
        ended before it came) is given up first."""
        if self._pending is not None:
            await give_up(self._pending)
        if self.channel is not None and self.channel.alive:
            with contextlib.suppress(Exception):
                await self.channel.request("release", {"job": self.job_id}, timeout=10)
