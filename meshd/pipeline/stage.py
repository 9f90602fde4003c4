"""A stage: a span of blocks that receives the stream, runs it and sends it on (or, last, returns the
prediction to the head). Ops ``prepare``, ``forward``, ``release``, ``ipc-probe`` and ``shm-offer``.

``prepare`` makes a job: it checks the plan against what this node holds, unpacks the token ids into
the rotary embedding, passes the prepare on down the line (:class:`.relay.Relay`) while this node
compiles its blocks for the size, and chooses the link to the next stage. Each ``forward`` then
runs one step of that job; ``release`` (or the owning connection's end) drops it on every stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from dataclasses import dataclass, field

import torch

import codec

from .. import limits
from ..errors import MeshError, file_refusal
from ..fields import wire_int
from ..model.lora import LoraSpec, loras_from_wire
from ..model.span import Conditioning, Stream
from ..model.tensorfiles import ModelError
from ..wire import ipc, shm
from ..wire.channel import Request, ServerSession
from .plan import PlanError, SplitPlan, Stage
from .relay import Geometry, cond_needs, downstream_needs, quality_floor, request_flag
from .streaming import LinkPlan, give_up, pack_raw, raw_header, receive_input, reserve_shared, unpack_raw


@dataclass
class StageJob:
    """A generation as one non-head stage sees it."""

    id: str
    owner: ServerSession | None
    start: int
    end: int
    tail: bool
    geometry: Geometry
    rotary: tuple
    needs: set[str]
    downstream_needs: set[str]
    next_peer: Stage | None = None
    next_link: LinkPlan | None = None
    loras: tuple[LoraSpec, ...] = ()
    measure_error: bool = False
    created: float = field(default_factory=time.monotonic)


class StageService:
    """The jobs this node runs as a non-head stage of other heads' generations."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.jobs: dict[str, StageJob] = {}
        self._preparing: set[str] = set()  # job ids whose prepare is in progress

    def ops(self) -> dict:
        return {"prepare": self.prepare, "forward": self.forward, "release": self.release,
                "ipc-probe": self.ipc_probe, "shm-offer": self.shm_offer}

    async def prepare(self, request: Request):
        h = request.header
        job_id = h.get("job")
        if not isinstance(job_id, str) or not 1 <= len(job_id) <= limits.MAX_JOB_ID_LENGTH:
            raise MeshError("bad-request", "prepare needs a job id")
        if job_id in self.jobs or job_id in self._preparing:
            raise MeshError("bad-request", f"job {job_id} is already prepared here")
        if len(self.jobs) + len(self._preparing) >= limits.MAX_JOBS_PER_STAGE:
            raise MeshError("busy", f"{self.daemon.name} already holds {len(self.jobs)} jobs")
        # Reserved before the first await: two prepares of one id, or a burst past the cap, are refused.
        self._preparing.add(job_id)
        try:
            return await self._prepare_job(request, job_id)
        except ModelError as exc:
            raise file_refusal(self.daemon.name, exc) from None
        finally:
            self._preparing.discard(job_id)

    async def _prepare_job(self, request: Request, job_id: str):
        d = self.daemon
        h = request.header
        d.check_model(h.get("model"))
        try:
            stages = SplitPlan.from_wire(h.get("stages")).stages
        except (PlanError, codec.CodecError) as exc:
            raise MeshError("bad-request", f"plan: {exc}") from None
        preset = d.model.preset
        me = stages[0]
        if me.start <= 0 or me.end > preset.num_blocks or me.end <= me.start:
            raise MeshError("bad-request", f"stage blocks {me.start}-{me.end - 1} are not a non-head range of "
                                           f"0-{preset.num_blocks - 1}")
        for a, b in zip(stages, stages[1:]):
            if b.start != a.end:
                raise MeshError("bad-request", "plan stages are not contiguous")
        if stages[-1].end != preset.num_blocks:
            raise MeshError("bad-request", "plan does not reach the last block")
        d.check_holds(me)
        tail = me.end == preset.num_blocks
        if tail and not d.model.has_tail:
            raise MeshError("mismatch", f"{d.name} lacks the final layer the last stage runs")
        geometry = Geometry.from_wire(h.get("geometry"))
        floor = quality_floor(h, d.config.quality_floor)
        measure_error = request_flag(h, "measure_error", False)
        txt_ids, img_ids = unpack_raw(h.get("ids"), request.frame.segments, torch.device("cpu"),
                                      [(1, geometry.txt_len, 4), (1, geometry.img_h * geometry.img_w, 4)])
        loras = loras_from_wire(h.get("loras"))
        # The ids go to the device on the GPU worker, which waits for the copy anyway, not on the event loop.
        rotary, _ = await d.worker.run(lambda: d.model.span.rotary(txt_ids.to(d.device), img_ids.to(d.device)))
        await d.check_loras(loras)
        # This stage compiles for a new size while the prepare travels on, so the stages compile at once.
        compiling = asyncio.ensure_future(d.compile_for(geometry, loras, request.event))
        compiling.add_done_callback(lambda f: f.cancelled() or f.exception())
        downstream = downstream_needs(preset, stages[1:])
        job = StageJob(job_id, request.session, me.start, me.end, tail, geometry, rotary,
                       cond_needs(preset, me.start, me.end), downstream, measure_error=measure_error,
                       loras=loras)
        infos = []
        try:
            if len(stages) > 1:
                job.next_peer = stages[1]
                onward = {k: v for k, v in h.items() if k not in ("op", "id", "stages")}
                _, infos = await d.relay.prepare_next(onward, request.frame.segments, list(stages[1:]), request.event)
                job.next_link = await d.relay.choose_link(stages[1], infos[0], geometry, me.codec, floor)
            await compiling
        except BaseException:
            # A failed prepare downstream or a failed compile here: a compile not yet started on the GPU
            # worker is dropped, and what the stages after this one prepared is released too.
            compiling.cancel()
            if job.next_peer is not None:
                d.spawn(self._relay_release(job))
            raise
        self.jobs[job_id] = job
        return {"stages": [d.relay.stage_info(me, job.next_link), *infos]}, []

    def _job(self, job_id: object) -> StageJob:
        job = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise MeshError("not-found", f"{self.daemon.name} has no job {job_id!r:.40} (never prepared, or released)")
        return job

    async def forward(self, request: Request):
        d = self.daemon
        h = request.header
        job = self._job(h.get("job"))
        preset, g = d.model.preset, job.geometry
        cond = self._unpack_cond(h, request.frame.segments, job.needs | job.downstream_needs, g.batch)
        if "ipc" in h and not request.session.ipc_ok:
            raise MeshError("bad-request", f"{d.name} takes no CUDA IPC input on this connection (a GPU daemon "
                                           "takes it from daemons of its own host, unless same_host_ipc = false)")
        inp, rx = await receive_input(request, d.device, (g.batch, g.tokens, preset.hidden), d.model.dtype,
                                      shm=d.shm.region(request.session))
        if not d.model.holds(job.start, job.end):
            raise MeshError("mismatch", f"{d.name} no longer holds blocks {job.start}-{job.end - 1}")
        span = d.model.span
        channel = placed = send = None
        names = sorted(job.downstream_needs)
        if not job.tail:
            channel = await d.pool.get(job.next_peer.peer)
            # Same host without CUDA IPC: the stream goes into the next stage's region from the compute,
            # and the forward goes ahead of it, as the head's does (the next stage starts on the doorbell).
            placed = await reserve_shared(channel, job.next_link, g.stream_bytes(preset.hidden, d.model.dtype))
            if placed is not None:
                placed.announce((g.batch, g.tokens, preset.hidden), d.model.dtype)
            send = functools.partial(d.relay.send_step, channel, job.next_link, job.id, h.get("step"), names,
                                     d.relay.vectors(cond, names), measure_error=job.measure_error,
                                     placed=placed)  # (stream)

        def compute() -> tuple[torch.Tensor | None, dict | None]:
            # This closure holds ``inp`` and ``placed`` (their region memory) until the GPU worker has
            # synchronised its stream after it, even if this request is cancelled meanwhile.
            d.model.use_loras(job.loras)  # jobs with other LoRAs may have run in between
            c = Conditioning(**{n: cond[n].to(d.device) if n in cond else None for n in Conditioning.NAMES})
            s = span.run(job.start, job.end, Stream(g.txt_len, joint=inp.take(d.device)), c, job.rotary)
            if not job.tail:
                out = s.as_joint()
                if placed is not None:
                    placed.place(out)  # queued behind the blocks
                    placed.ring()  # once the copy is done: the next stage's compute starts
                return out, None
            prediction = span.final(s, c.temb)
            # The prediction goes back to the head: into the run its stream came in (host-shm), or copied
            # to the host here, where the worker waits for the GPU anyway, not on the event loop.
            if inp.give_back(prediction):
                return None, raw_header(prediction)
            return prediction.cpu(), None

        await inp.ready()  # a stream sent ahead: everything above was done while the sender still computed
        sending = None
        if placed is not None:  # the vectors are this request's: the forward goes before the compute
            sending = asyncio.ensure_future(send(None))
            sending.add_done_callback(lambda f: f.cancelled() or f.exception())  # (awaited below, or given up)
        try:
            (out, given_back), seconds = await d.worker.run(compute)
        except BaseException as exc:
            if sending is not None:
                await give_up(sending)  # the next stage stops waiting for a stream that never comes
            if isinstance(exc, ModelError):  # a LoraError too: a job's LoRA file gone or changed since its prepare
                raise file_refusal(d.name, exc) from None
            raise
        seconds -= inp.count_copy(rx) / 1e3  # a copy out of the region ran in the compute's call
        if placed is not None:
            seconds -= placed.copy_ms / 1e3  # the next hop's (its encode_ms)
        record = {"node": d.name, "blocks": [job.start, job.end - 1], "codec": rx.codec, "bytes": rx.bytes,
                  "wire_ms": round(rx.wire_ms, 3), "decode_ms": round(rx.decode_ms, 3),
                  "compute_ms": round(seconds * 1e3, 3), **rx.breakdown()}
        if request.session.conn.stats is not None:  # this peer's link, keyed once at the handshake
            request.session.conn.stats.hop(rx.bytes, rx.wire_ms + rx.decode_ms)
        if job.tail:
            if given_back is not None:
                return inp.reply({"prediction": given_back, "hops": [record]}, [])
            headers, buffers = pack_raw([out])
            return {"prediction": headers[0], "hops": [record]}, buffers
        if sending is None:
            sending = asyncio.ensure_future(send(out))
        del out
        try:
            if placed is not None:
                # Rung back from further down: passed back up at once, before that stage's reply (and so
                # before this one's), for a sender that asked.
                early = await placed.answered(sending, (g.batch, g.img_h * g.img_w, preset.out_channels),
                                              d.model.dtype, channel.name)
                if early is not None:
                    inp.pass_back([early.view(torch.uint8).reshape(-1).numpy()])
                    del early
            reply, hops, job.next_link = await sending
        except BaseException:
            await give_up(sending)
            raise
        # The prediction from further down goes on up: into the run this stage's input came in, if it can.
        return inp.reply({"prediction": reply.header.get("prediction"), "hops": [record, *hops]}, reply.segments)

    def _unpack_cond(self, h: dict, segments: list, needs: set[str], batch: int) -> dict[str, torch.Tensor]:
        model = self.daemon.model
        names = h.get("cond_names")
        if (not isinstance(names, list) or not all(isinstance(n, str) for n in names) or set(names) != needs
                or len(names) != len(needs)):
            raise MeshError("bad-request", f"forward must carry exactly the vectors {sorted(needs)}, got {names!r:.80}")
        dim = model.preset.hidden
        widths = {"temb": dim, "mod_img": 6 * dim, "mod_txt": 6 * dim, "mod_single": 3 * dim}
        # On the host: the event loop does no device copies (they wait for the GPU); the compute moves
        # them, and the vectors sent on downstream need no copy back.
        tensors = unpack_raw(h.get("cond"), segments, torch.device("cpu"), [(batch, widths[n]) for n in names])
        out = {}
        for name, t in zip(names, tensors):
            if t.dtype != model.dtype:
                raise MeshError("bad-request", f"vector {name} is {t.dtype}; this stage computes in {model.dtype}")
            out[name] = t
        return out

    def drop_job(self, job_id: str, relay: bool) -> None:
        job = self.jobs.pop(job_id, None)
        if job is None:
            return
        if relay and job.next_peer is not None:
            self.daemon.spawn(self._relay_release(job))
        self.daemon.worker.free_memory()

    def release_owned(self, session: ServerSession) -> None:
        """The connection that prepared these jobs is gone: drop them here and down the line."""
        for job in [j for j in self.jobs.values() if j.owner is session]:
            self.drop_job(job.id, relay=True)

    def owns_jobs(self, session: ServerSession) -> bool:
        return any(job.owner is session for job in self.jobs.values())

    async def _relay_release(self, job: StageJob) -> None:
        with contextlib.suppress(Exception):
            channel = await self.daemon.pool.get(job.next_peer.peer)
            await channel.request("release", {"job": job.id}, timeout=10)

    async def release(self, request: Request):
        job_id = request.header.get("job")
        known = isinstance(job_id, str) and job_id in self.jobs
        if known:
            job = self.jobs[job_id]
            self.drop_job(job_id, relay=False)
            if job.next_peer is not None:
                await self._relay_release(job)
        return {"released": known}, []

    async def ipc_probe(self, request: Request):
        if not request.session.ipc_ok:
            return {"ok": False}, []
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, ipc.check_probe, request.header.get("ipc"), self.daemon.device)
        return {"ok": ok}, []

    async def shm_offer(self, request: Request):
        """A shared region for this connection's streams (meshd.wire.shm): made, offered under a one-use
        token, claimed by the sender over this host's abstract Unix socket."""
        d = self.daemon
        if not d.config.same_host_shm:
            raise MeshError("bad-request", f"{d.name} takes no shared memory (same_host_shm = false)")
        if not ipc.is_local_peer(request.session.conn.address):
            raise MeshError("bad-request", f"{d.name} shares memory only with daemons of its own host")
        nbytes = request.header.get("nbytes")
        if wire_int(nbytes) is None or not 0 < nbytes <= limits.MAX_SHM_REGION_BYTES:
            raise MeshError("bad-request", f"shm-offer nbytes={nbytes!r:.20} must be in 1..{limits.MAX_SHM_REGION_BYTES}")
        loop = asyncio.get_running_loop()
        try:
            offer = await loop.run_in_executor(None, d.shm.offer, request.session, nbytes)
        except shm.ShmUnavailable as exc:
            raise MeshError("busy", f"{d.name} cannot share memory: {exc}") from None
        return offer, []
