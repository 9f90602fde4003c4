"""Requests over a connection: :class:`Channel` (the client side: concurrent requests, their events and
replies, keep-alive pings) and :class:`ServerSession` (the server side: one :class:`Request` per
request id, chunk streams, events, replies), matched by request id. A dead peer is an error within
seconds on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from .. import limits
from ..errors import MeshError, PeerLost
from .frames import Frame, ProtocolError
from .bulk import SendTiming
from .connection import Connection, open_connection
from .session import ClientRules, ServerRules, announced_chunks

log = logging.getLogger(__name__)


# --- client channel ------------------------------------------------------------------------------


@dataclass
class _Pending:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class Channel:
    """Client side of a connection: concurrent requests, their events and replies.

    While requests are outstanding it pings the server; if nothing at all arrives for
    :data:`limits.PEER_SILENCE_TIMEOUT_S`, every outstanding request fails with :class:`PeerLost`.
    """

    def __init__(self, conn: Connection, node: dict | None = None) -> None:
        self.conn = conn
        self.node = node or {}
        self.name = conn.name
        self.rules = ClientRules()
        self._pending: dict[int, _Pending] = {}
        self._error: MeshError | None = None
        self._reader = asyncio.ensure_future(self._read_loop())
        self._pinger = asyncio.ensure_future(self._keepalive())

    @classmethod
    async def connect(cls, host: str, port: int, key: bytes | None, **kw) -> Channel:
        conn, node = await open_connection(host, port, key, **kw)
        return cls(conn, node)

    @property
    def alive(self) -> bool:
        return self._error is None and not self.conn.closed

    async def _read_loop(self) -> None:
        try:
            while True:
                # Routed in a call of its own, like the server's frames: a local here would keep the
                # last frame (and a staged segment in it) until the next one arrives.
                self._route(await self.conn.recv())
        except MeshError as exc:
            self._fail(exc)
        except ProtocolError as exc:  # a bad frame or a record that is not the one due: this link is done
            self._fail(MeshError(exc.wire_code, str(exc), peer=self.name))
            self.conn.abort()
        except asyncio.CancelledError:
            self._fail(PeerLost(self.name, "connection closed"))
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. no memory for a segment: fail the link, loudly
            log.exception("reading from %s failed", self.name)
            self._fail(PeerLost(self.name, f"reading failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"))
            self.conn.abort()

    def _route(self, frame: Frame) -> None:
        rid = frame.header.get("id")
        route = self.rules.route(frame.header)
        if route == "ping":
            self.conn.send_control("pong")  # never stop reading to answer
        elif route == "closing":
            # The server's reason for closing this connection: what every request here fails with.
            self._fail(MeshError.from_wire(frame.header, self.name))
        elif route != "pong":
            pending = self._pending.get(rid) if isinstance(rid, int) else None
            if pending is not None:
                pending.queue.put_nowait(frame)

    async def _keepalive(self) -> None:
        async def silent(seconds: float) -> None:
            self._fail(PeerLost(self.name, f"peer stopped answering ({seconds:.0f} s without a byte)"))
            await self.conn.close()

        await self.conn.heartbeat(lambda: bool(self._pending), silent)

    def _fail(self, exc: MeshError) -> None:
        if self._error is None:
            self._error = exc
        for pending in self._pending.values():
            pending.queue.put_nowait(exc)

    @property
    def idle(self) -> bool:
        """No request of ours is waiting for its answer."""
        return not self._pending

    async def request(self, op: str, fields: dict | None = None, segments: Iterable = (), *,
                      chunks: AsyncIterator[tuple[int, list]] | None = None,
                      on_event: Callable[[Frame], Awaitable[None] | None] | None = None,
                      timeout: float | None = limits.REQUEST_TIMEOUT_S, chunk_timing: SendTiming | None = None) -> Frame:
        """Send a request (and its chunk stream, its sending times added to ``chunk_timing``); return the
        reply frame or raise MeshError."""
        if self._error is not None:
            raise self._error
        rid = self.rules.next_id()
        pending = self._pending[rid] = _Pending()
        deadline = None if timeout is None else time.monotonic() + timeout
        answered = False
        try:
            # A send cancelled while it waits still goes out whole (see Connection.send), so from here
            # on a failure must be followed by ``cancel``.
            await self.conn.send({**(fields or {}), "op": op, "id": rid}, segments)
            if chunks is not None:
                async for index, buffers in chunks:
                    await self.conn.send({"op": "chunk", "id": rid, "index": index}, buffers, timing=chunk_timing)
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    item = await asyncio.wait_for(pending.queue.get(), remaining)
                except asyncio.TimeoutError:
                    raise MeshError("peer-lost", f"{op} got no reply within {timeout:.0f} s", peer=self.name) from None
                if isinstance(item, MeshError):
                    raise item
                if item.op == "event":
                    if on_event is not None:
                        result = on_event(item)
                        if asyncio.iscoroutine(result):
                            await result
                    continue
                answered = True
                if item.op == "error":
                    raise MeshError.from_wire(item.header, self.name)
                return item
        except BaseException:
            # We gave up (cancelled, timed out, our chunk stream failed): the server must not keep
            # working, and holding memory, for a request nobody waits for.
            if not answered and self.alive:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.conn.send({"op": "cancel", "id": rid}))
            raise
        finally:
            self._pending.pop(rid, None)

    async def close(self) -> None:
        self._pinger.cancel()
        self._reader.cancel()
        await self.conn.close()
        with contextlib.suppress(BaseException):
            await asyncio.gather(self._reader, self._pinger, return_exceptions=True)


# --- server session ------------------------------------------------------------------------------


class Request:
    """One request being handled on the server: its frame, its chunk stream, and a way to send events."""

    def __init__(self, session: ServerSession, frame: Frame) -> None:
        self.session = session
        self.frame = frame
        self.header = frame.header
        self.id = frame.header["id"]
        self.op = frame.op
        #: Chunk frames this request said will follow; no more are taken (the queue stays bounded:
        #: ServerRules counts them).
        self.announced_chunks = announced_chunks(frame.header)
        self._chunks: asyncio.Queue = asyncio.Queue()
        self.first_chunk_at: float | None = None
        self.last_chunk_at: float | None = None

    @property
    def peer(self) -> str:
        return self.session.conn.name

    def _push_chunk(self, frame: Frame) -> None:
        now = time.perf_counter()
        if self.first_chunk_at is None:
            self.first_chunk_at = now
        self.last_chunk_at = now
        self._chunks.put_nowait(frame)

    async def chunks(self, count: int) -> AsyncIterator[Frame]:
        """The ``count`` chunk frames that follow this request, as they arrive."""
        for _ in range(count):
            item = await self._chunks.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def event(self, fields: dict, segments: Iterable = ()) -> None:
        await self.session.conn.send({**fields, "op": "event", "id": self.id}, segments)


Handler = Callable[[Request], Awaitable[tuple[dict, list]]]


class ServerSession:
    """Server side of one authenticated connection: runs a handler task per request.

    A client that disconnects, or goes silent while its requests run, has them cancelled.
    """

    def __init__(self, conn: Connection, handler: Handler, client: dict,
                 holds: Callable[[], bool] = lambda: False) -> None:
        self.conn = conn
        self.handler = handler
        self.client = client
        #: True while the client owns state here (prepared jobs): its silence then counts too, even
        #: between requests, so that a frozen client does not pin that state until IDLE_TIMEOUT_S.
        self.holds = holds
        #: Whether requests on this connection may hand over CUDA memory (set by the daemon at the
        #: handshake: a GPU daemon with same_host_ipc on, and a client of this same host).
        self.ipc_ok = False
        self.tasks: dict[int, asyncio.Task] = {}
        self.requests: dict[int, Request] = {}
        self.rules = ServerRules()

    async def run(self) -> None:
        watchdog = asyncio.ensure_future(self._watch_silence())
        try:
            while True:
                # The frame is dispatched in a call of its own: a local here would keep the last one
                # (a stream's last chunk, in pinned staging) until the next frame arrives.
                await self._dispatch(await self.conn.recv(idle_timeout=limits.IDLE_TIMEOUT_S))
        except (MeshError, ProtocolError) as exc:
            if not isinstance(exc, PeerLost):
                log.warning("closing connection from %s: %s", self.conn.name, exc)
                code = exc.wire_code if isinstance(exc, ProtocolError) else exc.code
                with contextlib.suppress(Exception):
                    await self.conn.send({"op": "error", "id": 0, "code": code, "message": str(exc)})
        except Exception:  # noqa: BLE001 - a bug or resource failure: this connection ends, the daemon lives
            log.exception("connection from %s failed", self.conn.name)
        finally:
            watchdog.cancel()
            for request in self.requests.values():
                request._chunks.put_nowait(PeerLost(self.conn.name, "client disconnected"))
            for task in list(self.tasks.values()):
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            await self.conn.close()

    async def _dispatch(self, frame: Frame) -> None:
        action = self.rules.receive(frame.header)
        if action.kind == "pong":
            self.conn.send_control("pong")  # never stop reading to answer
        elif action.kind == "cancel":
            self.tasks[action.id].cancel()
        elif action.kind == "chunk":
            self.requests[action.id]._push_chunk(frame)
        elif action.kind == "busy":
            await self.conn.send({"op": "error", "id": action.id, "code": "busy", "message": action.message})
        elif action.kind == "start":
            request = Request(self, frame)
            self.requests[action.id] = request
            self.tasks[action.id] = asyncio.ensure_future(self._handle(request))

    async def _watch_silence(self) -> None:
        async def silent(seconds: float) -> None:
            log.warning("client %s went silent (%.1f s without a byte) with %d request(s) running; closing its "
                        "connection", self.conn.name, seconds, len(self.tasks))
            for task in list(self.tasks.values()):
                task.cancel()
            self.conn.abort()

        await self.conn.heartbeat(lambda: bool(self.tasks) or self.holds(), silent)

    async def _handle(self, request: Request) -> None:
        try:
            fields, segments = await self.handler(request)
            await self.conn.send({**fields, "op": "reply", "id": request.id}, segments)
        except asyncio.CancelledError:
            pass
        except MeshError as exc:
            with contextlib.suppress(MeshError):
                await self.conn.send({"op": "error", "id": request.id, **exc.to_wire()})
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the daemon
            log.exception("request %s from %s failed", request.op, self.conn.name)
            with contextlib.suppress(MeshError):
                await self.conn.send({"op": "error", "id": request.id, "code": "internal",
                                      "message": f"{type(exc).__name__}: {exc}"})
        finally:
            self.tasks.pop(request.id, None)
            self.requests.pop(request.id, None)
            self.rules.finished(request.id)
