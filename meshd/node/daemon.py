"""The daemon: one node of the mesh. It accepts authenticated connections, admits them fairly
(:mod:`.admission`), routes each request to the service that owns its op and tells peers what it holds.

Ops (see docs/protocol.md): ``info``, ``echo``, ``probe`` and ``load`` here; ``prepare``, ``forward``,
``release``, ``ipc-probe`` and ``shm-offer`` in :mod:`meshd.pipeline.stage`; ``generate`` in :mod:`meshd.pipeline.head`;
``encode-prompt`` in :mod:`meshd.pipeline.text`; more from the parts that register their own (telemetry).
GPU work goes through the one :class:`GpuWorker` queue; codec work runs on codec threads; the event loop
only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

import psutil
import torch

import codec
from codec import Capabilities

from .. import __version__, auth, limits
from ..config import DaemonConfig, describe_ranges, ranges
from ..errors import MeshError
from ..model.lora import LoraError, LoraSpec, LoraStore
from ..model.runtime import HostedModel
from ..pipeline.generation import compile_blocks
from ..pipeline.head import HeadService
from ..pipeline.peers import PeerPool
from ..pipeline.plan import Stage
from ..pipeline.relay import Geometry, Relay
from ..pipeline.stage import StageService
from ..pipeline.text import TextService
from ..wire import ipc
from ..wire.channel import Request, ServerSession
from ..wire.connection import Connection, HandshakeExpired, address_name, server_handshake
from ..wire.shm import ShmServer
from ..wire.link import LinkEmulation, LinkRegistry
from .admission import HalfOpen, source_of
from .gpu import GpuWorker
from .info import ModelInfo

log = logging.getLogger(__name__)

#: Requests that are followed by a chunk stream; any other request announcing one is refused at once,
#: so that no chunk frames queue up behind a long-running request.
STREAM_OPS = ("forward",)


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
        #: The shared regions this daemon gives its same-host inbound connections (transport host-shm).
        self.shm = ShmServer(self.node_id, self.device)
        # ``daemon``: this connection is a link between daemons (the one --emulate-link shapes).
        self.pool = PeerPool(key, self.links, self.emulation, hello={"node": self.name, "daemon": True},
                             allocator=self.allocator)
        codec.core.set_nvenc_session_budget(config.nvenc_sessions)
        codec.probe(self.device)  # probed once at start; see ``caps``
        self.lora_store = LoraStore(config.lora_dirs, config.cache_dir)
        model.lora_store = self.lora_store
        self.sessions: set[ServerSession] = set()
        self.draining = False
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._halfopen = HalfOpen()
        self._inflight: set[asyncio.Task] = set()
        self._connections: set[Connection] = set()
        self.started = time.time()
        # The services that own the ops of a generation (meshd.pipeline): the hop both ends share, the
        # stage, the head, the remote text encoder.
        self.relay = Relay(self)
        self.stage = StageService(self)
        self.head = HeadService(self)
        self.text = TextService(self)
        # Extension points for the parts that live in their own modules (telemetry, discovery, ...):
        self.on_change: list[Callable[[], None]] = []  # called when the held blocks change
        self.extra_ops: dict[str, Callable[[Request], Awaitable[tuple[dict, list]]]] = {}  # more request ops
        self.info_providers: list[Callable[[], dict]] = []  # merged into node_info()
        self.ops: dict[str, Callable[[Request], Awaitable[tuple[dict, list]]]] = {
            "info": self._info, "echo": self._echo, "probe": self._probe, "load": self._load,
            **self.stage.ops(), **self.head.ops(), **self.text.ops(),
        }

    @property
    def jobs(self) -> dict:
        """The jobs this node runs as a stage (see :class:`StageService`)."""
        return self.stage.jobs

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
        listener.listen(limits.LISTEN_BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        name = listener.getsockname()
        self.bound = (name[0], name[1])
        self._accepting = asyncio.ensure_future(self._accept_loop())
        log.info("meshd %s listening on %s:%s (%s, blocks %s, device %s)", __version__, name[0], name[1],
                 ModelInfo.of(self.model.identity).describe(), describe_ranges(self.model.blocks), self.device)
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
        self.relay.close()
        self.shm.close()
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
            if self.draining or len(self.sessions) >= limits.MAX_CONNECTIONS or not self._halfopen.admits(source):
                sock.close()  # refuse cheaply: no read, no allocation (the client retries with backoff)
                continue
            conn = Connection(sock, address_name(addr), emulation=self.emulation, allocator=self.allocator)
            self._halfopen.add(conn, source)
            self.spawn(self._serve_connection(conn, source))
            # Accepts that are ready complete without yielding: let the handshakes in progress read
            # their hellos between two accepts, or a flood would starve them.
            await asyncio.sleep(0)

    async def _serve_connection(self, conn: Connection, source: str) -> None:
        name = conn.name
        self._connections.add(conn)
        try:
            try:
                # The client's retries and deadline are its own; the slot is bounded by PREAUTH_TIMEOUT_S.
                hello = await server_handshake(conn, self.key, self.node_info)
            except HandshakeExpired as exc:
                log.info("dropped %s: %s", name, exc.message)
                return
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
                self._halfopen.done(conn)
            if self.emulation is not None and hello.get("daemon") is not True:
                # --emulate-link shapes the links between daemons; a client's own connection (the
                # dashboard, a benchmark fetching its PNG) is not part of the emulated link.
                conn.set_emulation(None)
            # Count traffic per peer (its node name and address), not per ephemeral client port.
            node = hello.get("node")
            host = str(conn.address[0]) if conn.address else name
            conn.stats = self.links.get(f"{node[:64]}@{host}" if isinstance(node, str) and node else host)
            session = ServerSession(conn, self.handle, hello,
                                    holds=lambda: self.stage.owns_jobs(session))
            session.ipc_ok = self.device.type == "cuda" and self.config.same_host_ipc and ipc.is_local_peer(conn.address)
            self.sessions.add(session)
            try:
                await session.run()
            finally:
                self.sessions.discard(session)
                self.stage.release_owned(session)
                self.shm.drop(session)
        finally:
            conn.abort()
            self._connections.discard(conn)

    # --- dispatch -----------------------------------------------------------------------------

    async def handle(self, request: Request) -> tuple[dict, list]:
        op = request.op
        if self.draining and op in ("prepare", "generate", "load"):
            raise MeshError("draining", f"{self.name} is shutting down")
        handler = self.extra_ops.get(op) or self.ops.get(op)
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
        try:
            # Warm the compiled blocks for the model's default size now, not at the first generation.
            grid = preset.latent_grid(preset.default_size, preset.default_size)
            await self.compile_for(Geometry(1, preset.max_sequence_length, *grid), (), request.event)
        finally:
            # The new blocks are held whether or not their warm-up compile worked (a failed one is
            # reported, and retried by the first generation): advertise what is held, always.
            for callback in self.on_change:
                callback()
        log.info("now holding blocks %s (loaded in %.1f s)", describe_ranges(self.model.blocks), seconds)
        return {"blocks": ranges(self.model.blocks), "seconds": seconds, "node": self.node_info()}, []

    # --- what the services share ------------------------------------------------------------

    def check_model(self, expected: object) -> None:
        if not isinstance(expected, dict):
            raise MeshError("bad-request", "prepare needs the plan's model identity")
        mine, theirs = ModelInfo.of(self.model.identity), ModelInfo.from_wire(expected)
        # The rule every client plans by (meshd.node.info.disagreement), so no proposal is refused here.
        if theirs.agreement != mine.agreement:
            raise MeshError("mismatch", f"{self.name} holds {mine.describe()}; the plan expects {theirs.describe()}")

    def check_holds(self, stage: Stage) -> None:
        if not self.model.holds(stage.start, stage.end):
            raise MeshError(
                "mismatch",
                f"{self.name} holds blocks {describe_ranges(self.model.blocks)} of {self.model.identity.model_id}; "
                f"the plan asks it for blocks {stage.start}-{stage.end - 1} (apply the plan to load them)",
            )

    async def compile_for(self, geometry: Geometry, loras: tuple[LoraSpec, ...], event) -> float:
        """Compile this peer's blocks for ``geometry`` if they have not run it yet (announced by events)."""
        scale = self.model.preset.size_multiple
        return await compile_blocks(self.model, self.worker, geometry.txt_len, geometry.img_h * geometry.img_w,
                                    loras, size=f"{geometry.img_w * scale}x{geometry.img_h * scale}",
                                    node=self.name, progress=event)

    async def check_loras(self, loras: tuple[LoraSpec, ...]) -> None:
        """Make sure this peer can apply ``loras`` from its own files (loads their factors once)."""
        if not loras:
            return
        try:
            await self.worker.run(self.model.use_loras, loras)
        except LoraError as exc:
            raise MeshError("not-found", f"{self.name} cannot apply the LoRAs: {exc}") from None

    def spawn(self, work) -> None:
        """Run clean-up work in the background (``stop`` waits for it): a reply, or an error, must not
        wait on a peer further down the line that may itself be gone or frozen."""
        task = asyncio.ensure_future(work)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
