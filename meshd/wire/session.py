"""The session rules, sans I/O: what each frame after the handshake means, and which ones break them.

:class:`ServerRules` turns a received frame's header into one :class:`Action` for the server's I/O
layer (start a request, answer busy, pass a chunk on, cancel, pong, drop) and keeps request ids and
chunk accounting; :class:`ClientRules` numbers requests and routes what comes back. A frame that
breaks a rule is a :class:`ProtocolError`, which closes the connection after an error naming it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .. import limits
from .frames import ProtocolError


@dataclass(frozen=True)
class Action:
    """What the server does with one frame: ``kind`` is one of ``start``, ``busy``, ``chunk``,
    ``cancel``, ``pong``, ``ignore``; ``id`` the request it concerns."""

    kind: str
    id: int = 0
    message: str = ""


def announced_chunks(header: dict) -> int:
    """The chunk frames a request says follow it (0 unless an int within MAX_STREAM_CHUNKS)."""
    value = header.get("chunks")
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limits.MAX_STREAM_CHUNKS
    return value if ok else 0


class ChunkAccount:
    """Chunk frames one request announced and has received; one more is a protocol error."""

    def __init__(self, request_id: int, op: str, announced: int) -> None:
        self.request_id, self.op, self.announced = request_id, op, announced
        self.received = 0

    def take(self) -> None:
        """Count one chunk frame (ProtocolError beyond the announced number)."""
        if self.received >= self.announced:
            raise ProtocolError(f"request {self.request_id} ({self.op[:32]}) announced {self.announced} chunk "
                                "frames; more arrived")
        self.received += 1


class ServerRules:
    """Request ids and chunk accounting of one connection, server side."""

    def __init__(self, max_requests: int | None = None) -> None:
        self.max_requests = limits.MAX_REQUESTS_PER_SESSION if max_requests is None else max_requests
        self.running: dict[int, ChunkAccount] = {}
        self._last_id = 0  # highest request id seen (clients number requests upwards)

    def receive(self, header: dict) -> Action:
        """The action for one frame's header (ProtocolError when it breaks the rules)."""
        op, rid = header["op"], header.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            raise ProtocolError(f"{op[:32]!r} frame has no integer id")
        if op == "ping":
            return Action("pong", rid)
        if op == "pong":
            return Action("ignore", rid)
        if op == "cancel":
            return Action("cancel", rid) if rid in self.running else Action("ignore", rid)
        if op == "chunk":
            account = self.running.get(rid)
            if account is not None:
                account.take()
                return Action("chunk", rid)
            if rid > self._last_id:
                raise ProtocolError(f"chunk frame for request {rid}, which was never sent")
            return Action("ignore", rid)  # the rest of a stream whose request already ended (refused early)
        if rid in self.running:
            raise ProtocolError(f"request id {rid} is already in use")
        self._last_id = max(self._last_id, rid)  # from here on, its chunk frames (if any) are expected
        if len(self.running) >= self.max_requests:
            return Action("busy", rid, f"{self.max_requests} requests already run on this connection")
        self.running[rid] = ChunkAccount(rid, op, announced_chunks(header))
        return Action("start", rid)

    def finished(self, request_id: int) -> None:
        """A request ended (answered, failed or cancelled): later chunk frames for it are dropped."""
        self.running.pop(request_id, None)


class ClientRules:
    """Request numbering and routing of what comes back, client side."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        """The id of a new request (ids only go up, so the server can tell a late chunk from a bogus one)."""
        return next(self._ids)

    @staticmethod
    def route(header: dict) -> str:
        """``ping`` (answer it), ``pong`` (nothing), ``closing`` (the server's reason for ending the
        connection: every request fails with it) or ``request`` (for the request its id names)."""
        op = header["op"]
        if op in ("ping", "pong"):
            return op
        if op == "error" and header.get("id") == 0:
            return "closing"
        return "request"
