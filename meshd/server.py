"""The daemon: accepts authenticated connections and serves a span of FLUX.2 blocks.

Requests (see docs/protocol.md): ``info``, ``echo``, ``probe``, ``load``, ``prepare``, ``forward``,
``release`` and, on the head, ``generate``. GPU work goes through the one :class:`GpuWorker` queue;
codec work runs on codec threads; the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import psutil
import torch

import codec
from codec import Calibration, Capabilities, CodecSpec, TokenLayout, choose_codec

from . import __version__, auth, ipc, limits
from .config import DaemonConfig, describe_ranges, ranges
from .connection import Connection, Request, ServerSession, address_name, server_handshake
from .errors import MeshError
from .generation import (GenerationParams, LocalRunner, Sampler, compile_blocks, prompts_needed, run_generation,
                         uses_cfg)
from .gpu import GpuWorker
from .link import LinkEmulation, LinkRegistry
from .model.lora import LoraError, LoraSpec, LoraStore, loras_from_wire, loras_to_wire
from .model.runtime import HostedModel
from .model.tensorfiles import ModelError
from .model.span import Conditioning, Stream
from .peers import PeerPool
from .plan import PeerAddress, PlanError, SplitPlan, Stage
from .streaming import LinkPlan, SendStats, link_after, pack_raw, receive_activation, send_activation, unpack_raw

log = logging.getLogger(__name__)

MAX_BATCH = 8
#: Benchmarks on GPUs without NVENC set this (MiB) to measure HEVC "encoded ahead of time" by libx265:
#: see codec.core.ReplayCache. Never set in production.
HEVC_REPLAY_ENV = "MESHD_BENCH_HEVC_REPLAY_MB"
MAX_TEXT_TOKENS = 4096
MAX_GRID = 512
#: Requests that are followed by a chunk stream; any other request announcing one is refused at once,
#: so that no chunk frames queue up behind a long-running request.
STREAM_OPS = ("forward",)


def source_of(addr: object) -> str:
    """Whom a connection counts against before it authenticates: its IPv4 address, or its IPv6 /64
    (one host's share of a LAN; an attacker there holds many addresses of it)."""
    host = str(addr[0]) if isinstance(addr, tuple) and addr else str(addr)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def cond_needs(preset, start: int, end: int) -> set[str]:
    """Which per-step vectors blocks ``[start, end)`` (and, at the end, the final layer) use."""
    needs = set()
    if start < preset.num_double:
        needs |= {"mod_img", "mod_txt"}
    if end > preset.num_double:
        needs.add("mod_single")
    if end == preset.num_blocks:
        needs.add("temb")
    return needs


class GenerationSlots:
    """The head's generation slots: ``total`` at once, at most ``per_source`` for one source, granted
    first come first served among the waiters that may take one."""

    def __init__(self, total: int, per_source: int) -> None:
        self.total, self.per_source = total, per_source
        self.held: dict[str, int] = {}
        self._waiters: list[tuple[str, asyncio.Future]] = []

    def _may_take(self, source: str) -> bool:
        return sum(self.held.values()) < self.total and self.held.get(source, 0) < self.per_source

    def _take(self, source: str) -> None:
        self.held[source] = self.held.get(source, 0) + 1

    async def acquire(self, source: str) -> None:
        """Wait for a slot for ``source``."""
        if self._may_take(source) and not any(s == source or self._may_take(s) for s, _ in self._waiters):
            self._take(source)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((source, waiter))
        try:
            await waiter  # granted (and counted) by release()
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(source)  # granted just as we gave up: pass it on
            raise
        finally:
            self._waiters = [(s, w) for s, w in self._waiters if w is not waiter]

    def release(self, source: str) -> None:
        """Give a slot back (synchronous: safe in a cancelled task's ``finally``) and grant waiting ones."""
        self.held[source] -= 1
        if not self.held[source]:
            del self.held[source]
        for waiting_source, waiter in self._waiters:
            if not waiter.done() and self._may_take(waiting_source):
                self._take(waiting_source)
                waiter.set_result(None)


@dataclass
class Geometry:
    batch: int
    txt_len: int
    img_h: int
    img_w: int

    @property
    def tokens(self) -> int:
        return self.txt_len + self.img_h * self.img_w

    def to_wire(self) -> dict:
        return {"batch": self.batch, "txt_len": self.txt_len, "img_h": self.img_h, "img_w": self.img_w}

    @classmethod
    def from_wire(cls, data: object) -> Geometry:
        if not isinstance(data, dict):
            raise MeshError("bad-request", "geometry must be a map")
        values = {}
        for name, hi in (("batch", MAX_BATCH), ("txt_len", MAX_TEXT_TOKENS), ("img_h", MAX_GRID), ("img_w", MAX_GRID)):
            v = data.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
                raise MeshError("bad-request", f"geometry {name}={v!r:.20} must be in 1..{hi}")
            values[name] = v
        return cls(**values)


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


class Daemon:
    def __init__(self, config: DaemonConfig, model: HostedModel, key: bytes | None, *,
                 node_id: str | None = None) -> None:
        self.config = config
        self.model = model
        self.key = key
        self.device = model.device
        self.worker = GpuWorker(self.device)
        self.links = LinkRegistry()
        self.emulation = LinkEmulation.parse(config.emulate_link) if config.emulate_link else None
        self.node_id = node_id or uuid.uuid4().hex[:16]
        self.name = config.node_name or socket.gethostname()
        # ``daemon``: this connection is a link between daemons (the one --emulate-link shapes).
        self.pool = PeerPool(key, self.links, self.emulation, hello={"node": self.name, "daemon": True},
                             allocator=self.allocator)
        codec.core.set_nvenc_session_budget(config.nvenc_sessions)
        codec.probe(self.device)  # probed once at start; see ``caps``
        replay_mb = os.environ.get(HEVC_REPLAY_ENV)
        if replay_mb:
            codec.core.enable_hevc_replay(int(replay_mb) << 20)
            log.warning("%s is set: libx265 frames are replayed from a cache (benchmarks only)", HEVC_REPLAY_ENV)
        self.jobs: dict[str, StageJob] = {}
        self.lora_store = LoraStore(config.lora_dirs, config.cache_dir)
        model.lora_store = self.lora_store
        self.sessions: set[ServerSession] = set()
        self.draining = False
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._halfopen: dict[Connection, tuple[str, float]] = {}  # in their handshake: source, accepted at
        self._preauth_by_source: dict[str, int] = {}
        self._preparing: set[str] = set()  # job ids whose prepare is in progress
        self._generation_slots = GenerationSlots(limits.MAX_ACTIVE_GENERATIONS, limits.MAX_ACTIVE_GENERATIONS_PER_SOURCE)
        self._waiting_generations = 0
        self._inflight: set[asyncio.Task] = set()
        self._connections: set[Connection] = set()
        self._ipc_ok: dict[str, bool] = {}
        # Per next peer ("host:port"): the codec figures learned from the hops sent to it; choose_link
        # decides with them, so the policy follows what this link and these GPUs really do.
        self.calibrations: dict[str, Calibration] = {}
        self.started = time.time()
        # Extension points for the parts that live in their own modules (telemetry, discovery, ...):
        self.on_change: list[Callable[[], None]] = []  # called when the held blocks change
        self.extra_ops: dict[str, Callable[[Request], Awaitable[tuple[dict, list]]]] = {}  # more request ops
        self.info_providers: list[Callable[[], dict]] = []  # merged into node_info()

    # --- lifecycle ----------------------------------------------------------------------------


    @property
    def caps(self) -> Capabilities:
        """This device's codec abilities as probed, updated when NVENC fails in use (what peers see)."""
        return codec.probe(self.device)

    async def start(self) -> tuple[str, int]:
        """Bind and start accepting connections; returns the bound (host, port)."""
        infos = socket.getaddrinfo(self.config.host, self.config.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(addr)
        except OSError as exc:
            listener.close()
            raise OSError(exc.errno, f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror}") from None
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        name = listener.getsockname()
        self.bound = (name[0], name[1])
        self._accepting = asyncio.ensure_future(self._accept_loop())
        log.info("meshd %s listening on %s:%s (%s, blocks %s, device %s)", __version__, name[0], name[1],
                 self.model.identity.describe(), describe_ranges(self.model.blocks), self.device)
        return self.bound

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let running work finish (up to ``grace`` s), then close everything.

        Running work is every request in progress and, on a stage, every prepared job: between two
        steps of a generation no request runs here, yet the generation is not over."""
        self.draining = True
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._listener.close()
        deadline = time.monotonic() + grace
        while (self.jobs or any(s.tasks for s in self.sessions)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Closing the sockets ends every session's read loop; the tasks then finish by themselves.
        for conn in list(self._connections):
            conn.abort()
        if self._inflight:
            _, late = await asyncio.wait(set(self._inflight), timeout=5)
            for task in late:
                task.cancel()
        await self.pool.close()
        self.worker.shutdown()

    # --- connections --------------------------------------------------------------------------

    def allocator(self, n: int):
        """Where big received segments land (straight from the socket, no intermediate copy)."""
        return bytearray(n)

    @property
    def _preauth(self) -> int:
        """Connections in their handshake now."""
        return len(self._halfopen)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(self._listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and friends: back off, keep serving the rest
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            source = source_of(addr)
            if (self.draining or len(self.sessions) >= limits.MAX_CONNECTIONS
                    or self._preauth_by_source.get(source, 0) >= limits.MAX_PREAUTH_PER_SOURCE
                    or (self._preauth >= limits.MAX_PREAUTH_CONNECTIONS and not self._make_room_for(source))):
                sock.close()  # refuse cheaply: no read, no allocation (the client retries with backoff)
                continue
            conn = Connection(sock, address_name(addr), emulation=self.emulation, allocator=self.allocator)
            self._halfopen[conn] = (source, time.monotonic())
            self._preauth_by_source[source] = self._preauth_by_source.get(source, 0) + 1
            task = asyncio.ensure_future(self._serve_connection(conn, source))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            # Accepts that are ready complete without yielding: let the handshakes in progress read
            # their hellos between two accepts, or a flood would starve them.
            await asyncio.sleep(0)

    def _make_room_for(self, source: str) -> bool:
        """With every handshake slot taken, drop the half-open connection least likely to be a cluster
        member's, if that is fair to the newcomer from ``source``: one that has sent nothing yet before
        one that has, from the busiest source, the one waiting longest (a real client sends its hello
        in its first round trip). A flood from many addresses then churns through its own
        connections, and a client that connects among them gets its hello in."""
        newcomer = self._preauth_by_source.get(source, 0) + 1

        def unlikely_member(item) -> tuple:
            conn, (src, accepted) = item
            return conn.frames_received, -self._preauth_by_source[src], accepted

        victim, (victim_source, _) = min(self._halfopen.items(), key=unlikely_member)
        if self._preauth_by_source[victim_source] < newcomer:
            return False  # the newcomer's source already holds more: refuse it instead
        self._preauth_done(victim)
        victim.abort()
        return True

    def _preauth_done(self, conn: Connection) -> None:
        entry = self._halfopen.pop(conn, None)
        if entry is None:
            return  # already counted out (dropped to make room)
        left = self._preauth_by_source.pop(entry[0]) - 1
        if left:
            self._preauth_by_source[entry[0]] = left

    async def _serve_connection(self, conn: Connection, source: str) -> None:
        name = conn.name
        self._connections.add(conn)
        try:
            try:
                hello = await server_handshake(conn, self.key, self.node_info)
            except MeshError as exc:
                if conn.closed:  # dropped to make room for another: routine under a flood
                    log.debug("dropped half-open connection from %s: %s", name, exc.message)
                else:
                    log.warning("refused %s: %s", name, exc.message)
                return
            except Exception:  # noqa: BLE001 - never let one client take the daemon down
                log.exception("handshake with %s failed", name)
                return
            finally:
                self._preauth_done(conn)
            if self.emulation is not None and hello.get("daemon") is not True:
                # --emulate-link shapes the links between daemons; a client's own connection (the
                # dashboard, a benchmark fetching its PNG) is not part of the emulated link.
                conn.set_emulation(None)
            # Count traffic per peer (its node name and address), not per ephemeral client port.
            node = hello.get("node")
            host = str(conn.address[0]) if conn.address else name
            conn.stats = self.links.get(f"{node[:64]}@{host}" if isinstance(node, str) and node else host)
            session = ServerSession(conn, self.handle, hello,
                                    holds=lambda: any(job.owner is session for job in self.jobs.values()))
            session.ipc_ok = self.device.type == "cuda" and self.config.same_host_ipc and ipc.is_local_peer(conn.address)
            self.sessions.add(session)
            try:
                await session.run()
            finally:
                self.sessions.discard(session)
                self._release_owned(session)
        finally:
            conn.abort()
            self._connections.discard(conn)

    def _release_owned(self, session: ServerSession) -> None:
        for job in [j for j in self.jobs.values() if j.owner is session]:
            self._drop_job(job.id, relay=True)

    # --- dispatch -----------------------------------------------------------------------------

    async def handle(self, request: Request) -> tuple[dict, list]:
        op = request.op
        if self.draining and op in ("prepare", "generate", "load"):
            raise MeshError("draining", f"{self.name} is shutting down")
        handler = self.extra_ops.get(op) or {
            "info": self._info,
            "echo": self._echo,
            "probe": self._probe,
            "ipc-probe": self._ipc_probe,
            "load": self._load,
            "prepare": self._prepare,
            "forward": self._forward,
            "release": self._release,
            "generate": self._generate,
            "encode-prompt": self._encode_prompt,
        }.get(op)
        if handler is None:
            raise MeshError("bad-request", f"unknown request {op[:40]!r}")
        if request.announced_chunks and op not in STREAM_OPS:
            raise MeshError("bad-request", f"{op} takes no chunk stream")
        log.debug("%s %s from %s", op, request.id, request.peer)
        try:
            return await handler(request)
        finally:
            log.debug("%s %s from %s done", op, request.id, request.peer)

    def memory(self) -> dict:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return {"kind": "gpu", "free": free, "total": total,
                    "allocated": torch.cuda.memory_allocated(self.device),
                    "peak_allocated": torch.cuda.max_memory_allocated(self.device)}
        vm = psutil.virtual_memory()
        return {"kind": "host", "free": vm.available, "total": vm.total}

    def node_info(self) -> dict:
        preset = self.model.preset
        return {
            "node_id": self.node_id,
            "name": self.name,
            "version": __version__,
            "proto": limits.PROTOCOL_VERSION,
            "model": {**self.model.identity.to_dict(), "num_blocks": preset.num_blocks, "num_double": preset.num_double,
                      # the real bytes at this peer's precision, which the planner sizes stages by
                      "weight_bytes": self.model.weight_bytes().to_wire(), "compute": self.model.compute_path()},
            "blocks": ranges(self.model.blocks),
            "head": self.model.has_head,
            "tail": self.model.has_tail,
            "text_encoder": self.model.source.has_text_encoder(),  # can encode prompts (for itself or a head)
            "device": str(self.device),
            "gpu_name": self.caps.gpu_name,
            "host_id": ipc.host_id(),
            "caps": self.caps.to_dict(),
            "memory": self.memory(),
            "jobs": len(self.jobs),
            "queue": self.worker.queued,
            "key_fingerprint": auth.fingerprint(self.key) if self.key else None,
            "emulated_link": self.emulation.describe() if self.emulation else None,
            "compile": self.model.compiler.status() if self.model.compiler else {"on": False},
            "uptime_s": round(time.time() - self.started, 1),
            **{k: v for provider in self.info_providers for k, v in provider().items()},
        }

    async def _info(self, request: Request):
        info = {"node": self.node_info(), "links": self.links.snapshot()}
        if request.header.get("reset_peak") is True and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # benchmarks measure one phase at a time
        return info, []

    async def _echo(self, request: Request):
        return {"t": time.time()}, []

    async def _probe(self, request: Request):
        return {"bytes": request.frame.payload_bytes}, []

    # --- loading spans ------------------------------------------------------------------------

    async def _load(self, request: Request):
        preset = self.model.preset
        wanted = request.header.get("blocks")
        if not isinstance(wanted, list) or len(wanted) > preset.num_blocks:
            raise MeshError("bad-request", "load needs blocks: a list of [start, end) ranges")
        blocks: set[int] = set()
        for item in wanted:
            if (not isinstance(item, list) or len(item) != 2 or not all(isinstance(v, int) for v in item)
                    or not 0 <= item[0] < item[1] <= preset.num_blocks):
                raise MeshError("bad-request", f"block range {item!r:.40} is not within 0..{preset.num_blocks}")
            blocks.update(range(item[0], item[1]))
        head, tail = 0 in blocks, preset.num_blocks - 1 in blocks
        loop = asyncio.get_running_loop()

        def progress(done: int, total: int) -> None:
            fut = asyncio.run_coroutine_threadsafe(request.event({"kind": "load", "done": done, "total": total}), loop)
            fut.add_done_callback(lambda f: f.exception())

        try:
            _, seconds = await self.worker.run(self.model.load, blocks, head, tail, progress)
        except MeshError:
            raise
        except Exception as exc:  # noqa: BLE001 - ModelError and I/O errors go back to the client
            raise MeshError("not-found", f"{self.name} could not load blocks {describe_ranges(blocks)}: {exc}") from None
        # Warm the compiled blocks for the model's default size now, not at the first generation.
        side = preset.default_size // preset.size_multiple
        await self.compile_for(Geometry(1, preset.max_sequence_length, side, side), (), request.event)
        for callback in self.on_change:
            callback()
        log.info("now holding blocks %s (loaded in %.1f s)", describe_ranges(self.model.blocks), seconds)
        return {"blocks": ranges(self.model.blocks), "seconds": seconds, "node": self.node_info()}, []

    # --- stages -------------------------------------------------------------------------------

    def _check_model(self, expected: object) -> None:
        mine = self.model.identity
        if not isinstance(expected, dict):
            raise MeshError("bad-request", "prepare needs the plan's model identity")
        keys = ("preset", "hash", "dtype", "weights")
        if tuple(expected.get(k) for k in keys) != (mine.preset, mine.content_hash, mine.dtype, mine.weights):
            theirs = (f"{expected.get('model_id')!s:.40} ({expected.get('preset')!s:.20}, {expected.get('dtype')!s:.10}, "
                      f"sha256 {str(expected.get('hash'))[:12]}, weights {expected.get('weights')!s:.80})")
            raise MeshError("mismatch", f"{self.name} holds {mine.describe()}; the plan expects {theirs}")

    def _check_holds(self, stage: Stage) -> None:
        if not self.model.holds(stage.start, stage.end):
            raise MeshError(
                "mismatch",
                f"{self.name} holds blocks {describe_ranges(self.model.blocks)} of {self.model.identity.model_id}; "
                f"the plan asks it for blocks {stage.start}-{stage.end - 1} (apply the plan to load them)",
            )

    async def _prepare(self, request: Request):
        h = request.header
        job_id = h.get("job")
        if not isinstance(job_id, str) or not 1 <= len(job_id) <= 64:
            raise MeshError("bad-request", "prepare needs a job id")
        if job_id in self.jobs or job_id in self._preparing:
            raise MeshError("bad-request", f"job {job_id} is already prepared here")
        if len(self.jobs) + len(self._preparing) >= limits.MAX_JOBS_PER_STAGE:
            raise MeshError("busy", f"{self.name} already holds {len(self.jobs)} jobs")
        # Reserved before the first await: two prepares of one id, or a burst past the cap, are refused.
        self._preparing.add(job_id)
        try:
            return await self._prepare_job(request, job_id)
        finally:
            self._preparing.discard(job_id)

    async def _prepare_job(self, request: Request, job_id: str):
        h = request.header
        self._check_model(h.get("model"))
        try:
            stages = SplitPlan.from_wire(h.get("stages")).stages
        except (PlanError, codec.CodecError) as exc:
            raise MeshError("bad-request", f"plan: {exc}") from None
        preset = self.model.preset
        me = stages[0]
        if me.start <= 0 or me.end > preset.num_blocks or me.end <= me.start:
            raise MeshError("bad-request", f"stage blocks {me.start}-{me.end - 1} are not a non-head range of "
                                           f"0-{preset.num_blocks - 1}")
        for a, b in zip(stages, stages[1:]):
            if b.start != a.end:
                raise MeshError("bad-request", "plan stages are not contiguous")
        if stages[-1].end != preset.num_blocks:
            raise MeshError("bad-request", "plan does not reach the last block")
        self._check_holds(me)
        tail = me.end == preset.num_blocks
        if tail and not self.model.has_tail:
            raise MeshError("mismatch", f"{self.name} lacks the final layer the last stage runs")
        geometry = Geometry.from_wire(h.get("geometry"))
        floor = h.get("quality_floor", self.config.quality_floor)
        if not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
            raise MeshError("bad-request", "quality_floor must be in [0, 1]")
        txt_ids, img_ids = unpack_raw(h.get("ids"), request.frame.segments, torch.device("cpu"),
                                      [(1, geometry.txt_len, 4), (1, geometry.img_h * geometry.img_w, 4)])
        loras = loras_from_wire(h.get("loras"))
        rotary, _ = await self.worker.run(self.model.span.rotary, txt_ids.to(self.device), img_ids.to(self.device))
        await self._check_loras(loras)
        # This stage compiles for a new size while the prepare travels on, so the stages compile at once.
        compiling = asyncio.ensure_future(self.compile_for(geometry, loras, request.event))
        compiling.add_done_callback(lambda f: f.cancelled() or f.exception())
        downstream = set().union(*(cond_needs(preset, s.start, s.end) for s in stages[1:])) if len(stages) > 1 else set()
        job = StageJob(job_id, request.session, me.start, me.end, tail, geometry, rotary,
                       cond_needs(preset, me.start, me.end), downstream, measure_error=bool(h.get("measure_error")),
                       loras=loras)
        infos = []
        try:
            if len(stages) > 1:
                job.next_peer = stages[1]
                channel = await self.pool.get(stages[1].peer)
                onward = {k: v for k, v in h.items() if k not in ("op", "id")}
                reply = await channel.request("prepare", {**onward, "stages": [s.to_wire() for s in stages[1:]]},
                                              request.frame.segments, on_event=relay_compile_events(request.event),
                                              timeout=limits.PREPARE_TIMEOUT_S)
                infos = reply.header.get("stages")
                if not isinstance(infos, list) or not infos:
                    raise MeshError("protocol", "downstream prepare reply lacks stage infos", peer=channel.name)
                job.next_link = await self.choose_link(stages[1], infos[0], geometry, me.codec, floor)
            await compiling
        except BaseException:
            # A failed prepare downstream or a failed compile here: a compile not yet started on the GPU
            # worker is dropped, and what the stages after this one prepared is released too.
            compiling.cancel()
            if job.next_peer is not None:
                self._spawn(self._relay_release(job))
            raise
        self.jobs[job_id] = job
        mine = {"peer": str(me.peer), "node": self.name, "node_id": self.node_id, "blocks": [me.start, me.end],
                "caps": self.caps.to_dict(), "device": str(self.device), "host_id": ipc.host_id(),
                "codec_out": job.next_link.label if job.next_link else None,
                "link": job.next_link.info if job.next_link else None}
        return {"stages": [mine, *infos]}, []

    async def compile_for(self, geometry: Geometry, loras: tuple[LoraSpec, ...], event) -> float:
        """Compile this peer's blocks for ``geometry`` if they have not run it yet (announced by events)."""
        scale = self.model.preset.size_multiple
        return await compile_blocks(self.model, self.worker, geometry.txt_len, geometry.img_h * geometry.img_w,
                                    loras, size=f"{geometry.img_w * scale}x{geometry.img_h * scale}",
                                    node=self.name, progress=event)

    async def choose_link(self, nxt: Stage, next_info: dict, geometry: Geometry, forced: str,
                          floor: float) -> LinkPlan:
        """How this stage's output reaches ``nxt``: CUDA IPC when both are GPUs of this host and mapping
        the memory works (tried, not assumed), else the codec the policy picks from the measured
        bandwidth and both ends' capabilities (or the one the plan forces)."""
        if await self._ipc_works(nxt, next_info) and forced in ("auto", "raw"):
            return LinkPlan("cuda-ipc", None, {"to": str(nxt.peer), "transport": "cuda-ipc", "codec": "cuda-ipc",
                                              "why": "same host: the stream moves GPU to GPU, no TCP"})
        try:
            next_caps = Capabilities.from_dict(next_info.get("caps"))
        except ValueError as exc:
            raise MeshError("protocol", f"peer {nxt.peer} sent bad capabilities: {exc}") from None
        bandwidth = await self.pool.bandwidth(nxt.peer)
        stream_bytes = geometry.batch * geometry.tokens * self.model.preset.hidden * self.model.dtype.itemsize
        try:
            choice = choose_codec(stream_bytes, bandwidth.bytes_per_s, self.caps, next_caps, quality_floor=floor,
                                  force=None if forced == "auto" else forced,
                                  calibration=self.calibrations.setdefault(str(nxt.peer), Calibration()))
        except codec.CodecError as exc:
            raise MeshError("mismatch", f"link {self.name} -> {nxt.peer}: {exc}") from None
        spec = CodecSpec(choice.spec.name, qp=choice.spec.qp,
                         layout=TokenLayout(geometry.txt_len, geometry.img_h, geometry.img_w))
        return LinkPlan("tcp", spec, {"to": str(nxt.peer), "transport": "tcp", "bandwidth_bps": bandwidth.bytes_per_s,
                                      "rtt_ms": bandwidth.rtt_ms, "codec": spec.label, "why": choice.reason,
                                      "emulated": self.emulation.describe() if self.emulation else None},
                        receiver=next_caps, replan=lambda: self.choose_link(nxt, next_info, geometry, forced, floor))

    def learn_hop(self, link: LinkPlan, sent: SendStats, hop: dict) -> None:
        """Fold a hop this daemon sent over ``link`` (``hop``: the receiver's record) into the link's
        codec calibration: encode speed here, decode speed there, the ratio these activations got."""
        decode_ms = hop.get("decode_ms")
        if link.transport != "tcp" or not isinstance(decode_ms, (int, float)) or isinstance(decode_ms, bool):
            return
        self.calibrations.setdefault(link.info["to"], Calibration()).observe_hop(
            sent.codec, self.caps, link.receiver, sent.raw_bytes, sent.wire_bytes, sent.encode_ms / 1e3,
            decode_ms / 1e3)

    async def _ipc_works(self, nxt: Stage, next_info: dict) -> bool:
        """Try the same-host path once per peer: the peer maps a probe tensor of ours and checks it."""
        if self.device.type != "cuda" or self.emulation is not None or not self.config.same_host_ipc:
            return False
        if next_info.get("host_id") != ipc.host_id() or not str(next_info.get("device", "")).startswith("cuda"):
            return False
        key = str(nxt.peer)
        if key not in self._ipc_ok:
            probe = ipc.probe_tensor(self.device)
            torch.cuda.synchronize(self.device)
            try:
                channel = await self.pool.get(nxt.peer)
                reply = await channel.request("ipc-probe", {"ipc": ipc.export(probe)}, timeout=30)
                self._ipc_ok[key] = reply.header.get("ok") is True
            except MeshError as exc:
                log.info("same-host path to %s unavailable: %s", key, exc.message)
                self._ipc_ok[key] = False
            del probe
            ipc.collect()
        return self._ipc_ok[key]

    async def _ipc_probe(self, request: Request):
        if not request.session.ipc_ok:
            return {"ok": False}, []
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, ipc.check_probe, request.header.get("ipc"), self.device)
        return {"ok": ok}, []

    async def _check_loras(self, loras: tuple[LoraSpec, ...]) -> None:
        """Make sure this peer can apply ``loras`` from its own files (loads their factors once)."""
        if not loras:
            return
        try:
            await self.worker.run(self.model.use_loras, loras)
        except LoraError as exc:
            raise MeshError("not-found", f"{self.name} cannot apply the LoRAs: {exc}") from None

    def resolve_loras(self, data: object) -> list:
        """LoRAs named by the client without a hash get the hash of the head's own copy."""
        if data is None:
            return []
        if not isinstance(data, list) or len(data) > 8:
            raise MeshError("bad-request", "loras must be a list of at most 8 entries")
        out = []
        for item in data:
            if isinstance(item, dict) and not item.get("sha256"):
                name, strength = item.get("name"), item.get("strength", 1.0)
                if not isinstance(name, str) or not isinstance(strength, (int, float)) or isinstance(strength, bool):
                    raise MeshError("bad-request", "a LoRA needs a name and a numeric strength")
                try:
                    item = self.lora_store.spec(name, float(strength)).to_wire()
                except LoraError as exc:
                    raise MeshError("not-found", f"{self.name}: {exc}") from None
            out.append(item)
        return out

    def _job(self, job_id: object) -> StageJob:
        job = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise MeshError("not-found", f"{self.name} has no job {job_id!r:.40} (never prepared, or released)")
        return job

    async def _forward(self, request: Request):
        h = request.header
        job = self._job(h.get("job"))
        preset, g = self.model.preset, job.geometry
        cond = self._unpack_cond(h, request.frame.segments, job.needs | job.downstream_needs, g.batch)
        if "ipc" in h and not request.session.ipc_ok:
            raise MeshError("bad-request", f"{self.name} takes no CUDA IPC input on this connection (a GPU daemon "
                                           "takes it from daemons of its own host, unless same_host_ipc = false)")
        stream, rx = await receive_activation(request, self.device, (g.batch, g.tokens, preset.hidden),
                                              self.model.dtype)
        if not self.model.holds(job.start, job.end):
            raise MeshError("mismatch", f"{self.name} no longer holds blocks {job.start}-{job.end - 1}")
        span = self.model.span

        def compute() -> torch.Tensor:
            self.model.use_loras(job.loras)  # jobs with other LoRAs may have run in between
            c = Conditioning(**{n: cond.get(n) for n in Conditioning.NAMES})
            s = span.run(job.start, job.end, Stream(g.txt_len, joint=stream), c, job.rotary)
            return span.final(s, c.temb) if job.tail else s.as_joint()

        out, seconds = await self.worker.run(compute)
        del stream
        record = {"node": self.name, "blocks": [job.start, job.end - 1], "codec": rx.codec, "bytes": rx.bytes,
                  "wire_ms": round(rx.wire_ms, 3), "decode_ms": round(rx.decode_ms, 3),
                  "compute_ms": round(seconds * 1e3, 3), **rx.breakdown()}
        if request.session.conn.stats is not None:  # this peer's link, keyed once at the handshake
            request.session.conn.stats.hop(rx.bytes, rx.wire_ms + rx.decode_ms)
        if job.tail:
            headers, buffers = pack_raw([out])
            return {"prediction": headers[0], "hops": [record]}, buffers
        names = sorted(job.downstream_needs)
        headers, buffers = pack_raw([cond[n] for n in names])
        channel = await self.pool.get(job.next_peer.peer)
        reply, sent = await send_activation(
            channel, {"job": job.id, "step": h.get("step"), "cond": headers, "cond_names": names},
            buffers, out, job.next_link, measure_error=job.measure_error,
        )
        job.next_link = await link_after(job.next_link, sent)
        hops = reply.header.get("hops")
        if not isinstance(hops, list) or not hops or not isinstance(hops[0], dict):
            raise MeshError("protocol", "downstream reply lacks hop records", peer=channel.name)
        self.learn_hop(job.next_link, sent, hops[0])
        hops[0].update(sent.to_dict())
        return {"prediction": reply.header.get("prediction"), "hops": [record, *hops]}, reply.segments

    def _unpack_cond(self, h: dict, segments: list, needs: set[str], batch: int) -> dict[str, torch.Tensor]:
        names = h.get("cond_names")
        if (not isinstance(names, list) or not all(isinstance(n, str) for n in names) or set(names) != needs
                or len(names) != len(needs)):
            raise MeshError("bad-request", f"forward must carry exactly the vectors {sorted(needs)}, got {names!r:.80}")
        d = self.model.preset.hidden
        widths = {"temb": d, "mod_img": 6 * d, "mod_txt": 6 * d, "mod_single": 3 * d}
        tensors = unpack_raw(h.get("cond"), segments, self.device, [(batch, widths[n]) for n in names])
        out = {}
        for name, t in zip(names, tensors):
            if t.dtype != self.model.dtype:
                raise MeshError("bad-request", f"vector {name} is {t.dtype}; this stage computes in {self.model.dtype}")
            out[name] = t
        return out

    def _drop_job(self, job_id: str, relay: bool) -> None:
        job = self.jobs.pop(job_id, None)
        if job is None:
            return
        if relay and job.next_peer is not None:
            self._spawn(self._relay_release(job))
        self.worker.free_memory()

    def _spawn(self, work) -> None:
        """Run clean-up work in the background (``stop`` waits for it): a reply, or an error, must not
        wait on a peer further down the line that may itself be gone or frozen."""
        task = asyncio.ensure_future(work)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _relay_release(self, job: StageJob) -> None:
        with contextlib.suppress(Exception):
            channel = await self.pool.get(job.next_peer.peer)
            await channel.request("release", {"job": job.id}, timeout=10)

    async def _release(self, request: Request):
        job_id = request.header.get("job")
        known = isinstance(job_id, str) and job_id in self.jobs
        if known:
            job = self.jobs[job_id]
            self._drop_job(job_id, relay=False)
            if job.next_peer is not None:
                await self._relay_release(job)
        return {"released": known}, []

    # --- the text encoder, for a head that does not run its own --------------------------------

    async def _encode_prompt(self, request: Request):
        """Prompt embeddings from this peer's text encoder, for a head whose plan places it here.

        Request ``{prompts: [text, ...]}`` (1..MAX_PROMPTS_PER_ENCODE, each at most MAX_PROMPT_BYTES);
        reply ``{embeds: [raw tensor header, ...], text_encoder: identity, model: identity}`` + one
        buffer per prompt. The head checks the identity against its own before it uses them."""
        prompts = request.header.get("prompts")
        if (not isinstance(prompts, list) or not 1 <= len(prompts) <= limits.MAX_PROMPTS_PER_ENCODE
                or not all(isinstance(p, str) and len(p.encode()) <= limits.MAX_PROMPT_BYTES for p in prompts)):
            raise MeshError("bad-request", f"encode-prompt needs prompts: 1 to {limits.MAX_PROMPTS_PER_ENCODE} texts "
                                           f"of at most {limits.MAX_PROMPT_BYTES} bytes")
        source = self.model.source
        if not source.has_text_encoder():
            raise MeshError("not-found", f"{self.name} has no text encoder for {self.model.identity.model_id}")
        try:
            embeds, seconds = await self.worker.run(self.model.prompts.embeds, prompts)
            identity = await asyncio.get_running_loop().run_in_executor(None, source.text_encoder_identity)
        except (ModelError, OSError) as exc:
            raise MeshError("not-found", f"{self.name} could not encode the prompt: {exc}") from None
        headers, buffers = pack_raw(embeds)
        return {"embeds": headers, "text_encoder": identity, "model": self.model.identity.to_dict(),
                "seconds": seconds}, buffers

    async def _remote_prompt_embeds(self, where: object, params: GenerationParams) -> dict[str, torch.Tensor]:
        """The embeddings a generation needs, from the peer its plan places the text encoder on."""
        if not isinstance(where, str):
            raise MeshError("bad-request", "text_encoder must be a peer's HOST:PORT")
        try:
            address = PeerAddress.parse(where)
        except (PlanError, ValueError) as exc:
            raise MeshError("bad-request", f"text_encoder: {exc}") from None
        prompts = prompts_needed(self.model, params)
        channel = await self.pool.get(address)
        reply = await channel.request("encode-prompt", {"prompts": prompts}, timeout=limits.ENCODE_PROMPT_TIMEOUT_S)
        h = reply.header
        theirs, mine = h.get("model"), self.model.identity
        their_preset = theirs.get("preset") if isinstance(theirs, dict) else None
        if their_preset != mine.preset:
            raise MeshError("mismatch", f"text encoder on {address} belongs to model preset {their_preset!r:.40}; "
                                        f"this head runs {mine.preset!r}", peer=str(address))
        if self.model.source.has_text_encoder():
            try:
                own = await asyncio.get_running_loop().run_in_executor(None, self.model.source.text_encoder_identity)
            except (ModelError, OSError) as exc:
                raise MeshError("not-found", f"{self.name} cannot read its own text encoder to compare: {exc}") from None
            if h.get("text_encoder") != own:
                raise MeshError("mismatch", f"text encoder on {address} is {str(h.get('text_encoder'))[:16]}…; this "
                                            f"head's own is {own[:16]}…: they would embed prompts differently",
                                peer=str(address))
        headers = h.get("embeds")
        if not isinstance(headers, list) or len(headers) != len(prompts):
            raise MeshError("protocol", f"encode-prompt reply must carry {len(prompts)} embeddings", peer=str(address))
        shape = (1, *self.model.prompts.shape)
        embeds = unpack_raw(headers, reply.segments, torch.device("cpu"), [shape] * len(prompts))
        for prompt, value in zip(prompts, embeds):
            try:
                self.model.remember_prompt(prompt, value)  # the next generation with this prompt needs no trip
            except ModelError as exc:
                raise MeshError("mismatch", f"embeddings from {address}: {exc}", peer=str(address)) from None
        return dict(zip(prompts, embeds))

    # --- the head: whole generations ----------------------------------------------------------

    async def _generate(self, request: Request):
        h = request.header
        preset = self.model.preset
        raw_params = h.get("params")
        if isinstance(raw_params, dict) and "loras" in raw_params:
            raw_params = {**raw_params, "loras": self.resolve_loras(raw_params["loras"])}
        params = GenerationParams.from_wire(raw_params, multiple=preset.size_multiple)
        await self._check_loras(params.loras)
        try:
            plan = SplitPlan.from_wire(h.get("plan")).validate(preset.num_blocks)
        except (PlanError, codec.CodecError) as exc:
            raise MeshError("bad-request", f"plan: {exc}") from None
        head = plan.stages[0]
        self._check_holds(head)
        if not self.model.has_head:
            raise MeshError("mismatch", f"{self.name} lacks the input layers the head runs (it must hold block 0)")
        if len(plan.stages) == 1 and not self.model.has_tail:
            raise MeshError("mismatch", f"{self.name} lacks the final layer")
        floor = h.get("quality_floor", self.config.quality_floor)
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
        if self._waiting_generations >= limits.MAX_QUEUED_GENERATIONS:
            raise MeshError("busy", f"{self.name} has {self._waiting_generations} generations waiting")
        self._waiting_generations += 1
        source = source_of(request.session.conn.address or request.peer)
        try:
            await request.event({"kind": "queued", "position": self._waiting_generations})
            await self._generation_slots.acquire(source)
        finally:
            self._waiting_generations -= 1
        try:
            embeds = None
            if h.get("text_encoder") is not None:
                await request.event({"kind": "encoding", "text_encoder": str(h.get("text_encoder"))[:200]})
                embeds = await self._remote_prompt_embeds(h.get("text_encoder"), params)
            return await self._run_generation(request, params, plan, floor, bool(h.get("measure_error", True)),
                                              bool(h.get("return_latents", False)), embeds)
        finally:
            self._generation_slots.release(source)

    async def _run_generation(self, request: Request, params: GenerationParams, plan: SplitPlan, floor,
                              measure_error: bool, return_latents: bool,
                              embeds: dict[str, torch.Tensor] | None = None):
        if len(plan.stages) == 1:
            runner = LocalRunner(self.worker)
            stages_info = [{"node": self.name, "blocks": [0, self.model.preset.num_blocks]}]
        else:
            runner = SplitRunner(self, plan, params, floor, measure_error, events=request.event)
        try:
            if isinstance(runner, SplitRunner):
                # The head compiles its own blocks while the stages compile theirs during prepare.
                g = runner.geometry
                head_compile = asyncio.ensure_future(self.compile_for(g, params.loras, request.event))
                head_compile.add_done_callback(lambda f: f.cancelled() or f.exception())
                try:
                    stages_info = await runner.prepare()
                except BaseException:
                    head_compile.cancel()  # the generation is over: nobody waits for these graphs
                    raise
                await head_compile
            await request.event({"kind": "prepared", "plan": plan.describe(), "stages": stages_info,
                                 "distilled": self.model.source.distilled(), "cfg": uses_cfg(self.model, params)})
            result = await run_generation(
                self.model, self.worker, params, runner,
                metadata={"plan": plan.describe(), "stages": stages_info, "head": self.name},
                progress=lambda event: request.event(event), embeds=embeds,
            )
        except ModelError as exc:  # no text encoder here and none placed on a peer, say
            raise MeshError("not-found", f"{self.name}: {exc}") from None
        finally:
            if isinstance(runner, SplitRunner):
                self._spawn(runner.release())
        if return_latents:
            headers, buffers = pack_raw([result.latents])
            return {"summary": result.summary, "latents": headers[0]}, [result.png, *buffers]
        return {"summary": result.summary}, [result.png]


def relay_compile_events(send: Callable[[dict], Awaitable[None]]) -> Callable:
    """An ``on_event`` for a downstream prepare: its stages' compile events go on up the line."""
    async def relay(frame) -> None:
        if frame.header.get("kind") in ("compiling", "compiled"):
            await send({k: v for k, v in frame.header.items() if k not in ("op", "id")})
    return relay


class SplitRunner:
    """The head's side of a split generation: its own blocks here, the rest across the mesh."""

    def __init__(self, daemon: Daemon, plan: SplitPlan, params: GenerationParams, floor: float,
                 measure_error: bool, events: Callable[[dict], Awaitable[None]] | None = None) -> None:
        self.daemon = daemon
        self.events = events  # where the stages' compiling events go (the generate request's stream)
        self.plan = plan
        self.params = params
        self.floor = floor
        self.measure_error = measure_error
        self.job_id = uuid.uuid4().hex
        preset = daemon.model.preset
        scale = preset.size_multiple
        self.geometry = Geometry(1, preset.max_sequence_length, params.height // scale, params.width // scale)
        self.head = plan.stages[0]
        self.downstream = set().union(*(cond_needs(preset, s.start, s.end) for s in plan.stages[1:]))
        self.channel = None
        self.link: LinkPlan | None = None

    async def prepare(self) -> list[dict]:
        d = self.daemon
        g = self.geometry
        from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline as P  # noqa: PLC0415

        txt_ids = P._prepare_text_ids(torch.zeros(1, g.txt_len, 1))
        img_ids = P._prepare_latent_ids(torch.zeros(1, 1, g.img_h, g.img_w))
        headers, buffers = pack_raw([txt_ids.contiguous(), img_ids.contiguous()])
        self.channel = await d.pool.get(self.plan.stages[1].peer)
        fields = {
            "job": self.job_id,
            "model": d.model.identity.to_dict(),
            "stages": [s.to_wire() for s in self.plan.stages[1:]],
            "geometry": g.to_wire(),
            "quality_floor": self.floor,
            "measure_error": self.measure_error,
            "ids": headers,
            "loras": loras_to_wire(self.params.loras),
        }
        reply = await self.channel.request("prepare", fields, buffers, timeout=limits.PREPARE_TIMEOUT_S,
                                           on_event=relay_compile_events(self.events) if self.events else None)
        infos = reply.header.get("stages")
        if not isinstance(infos, list) or not infos:
            raise MeshError("protocol", "prepare reply lacks stage infos", peer=self.channel.name)
        self.link = await d.choose_link(self.plan.stages[1], infos[0], g, self.head.codec, self.floor)
        mine = {"peer": str(self.head.peer), "node": d.name, "node_id": d.node_id,
                "blocks": [self.head.start, self.head.end], "caps": d.caps.to_dict(), "device": str(d.device),
                "host_id": ipc.host_id(), "codec_out": self.link.label, "link": self.link.info}
        return [mine, *infos]

    async def forward(self, sampler: Sampler, step: int, pass_index: int, cond: Conditioning):
        d = self.daemon
        span = d.model.span

        def head_compute() -> torch.Tensor:
            d.model.use_loras(self.params.loras)  # jobs with other LoRAs may have run in between
            return span.run(0, self.head.end, sampler.embed(pass_index), cond, sampler.rotary).as_joint()

        joint, seconds = await d.worker.run(head_compute)
        names = sorted(self.downstream)
        headers, buffers = pack_raw([getattr(cond, n) for n in names])
        reply, sent = await send_activation(
            self.channel, {"job": self.job_id, "step": step, "cond": headers, "cond_names": names},
            buffers, joint, self.link, measure_error=self.measure_error,
        )
        self.link = await link_after(self.link, sent)
        preset = d.model.preset
        out_channels = int(preset.transformer.get("out_channels") or preset.transformer["in_channels"])
        (prediction,) = unpack_raw([reply.header.get("prediction")], reply.segments, d.device,
                                   [(1, sampler.image_tokens, out_channels)])
        hops = reply.header.get("hops")
        if not isinstance(hops, list) or not hops:
            raise MeshError("protocol", "forward reply lacks hop records", peer=self.channel.name)
        d.learn_hop(self.link, sent, hops[0])
        hops[0].update(sent.to_dict())
        hops[0]["from"] = d.name
        d.links.get(self.channel.name).hop(sent.wire_bytes, hops[0].get("wire_ms", 0.0))
        return prediction, {"compute_ms": seconds * 1e3, "hops": hops,
                            "return_bytes": sum(memoryview(b).nbytes for b in reply.segments)}

    async def release(self) -> None:
        """Release the job on every stage; also after a failed or cancelled prepare (the stages may have
        prepared it anyway; releasing an unknown job is harmless)."""
        if self.channel is not None and self.channel.alive:
            with contextlib.suppress(Exception):
                await self.channel.request("release", {"job": self.job_id}, timeout=10)
