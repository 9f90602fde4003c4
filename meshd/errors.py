"""Errors that cross the wire: a code a program can act on and a message a person can."""

from __future__ import annotations

#: Error codes a meshd peer may send.
CODES = (
    "auth",  # wrong or missing cluster key
    "version",  # protocol versions differ
    "protocol",  # a malformed or oversized frame
    "bad-request",  # a well-formed request with invalid fields
    "mismatch",  # a plan that does not match what a peer holds (model, hash, blocks, dtype, codec)
    "not-found",  # an unknown job, model or LoRA
    "busy",  # queue full
    "draining",  # the daemon is shutting down
    "peer-lost",  # a downstream peer died or stopped answering
    "oom",  # the GPU ran out of memory
    "codec",  # encoded data that does not decode
    "cancelled",
    "internal",  # a bug: the daemon logs the traceback
)


class MeshError(Exception):
    """An error with a wire code; raised by handlers, sent to the peer, raised again on its side."""

    def __init__(self, code: str, message: str, *, peer: str | None = None) -> None:
        super().__init__(message)
        self.code = code if code in CODES else "internal"
        self.message = message
        self.peer = peer

    def __str__(self) -> str:
        return f"{self.peer}: {self.message}" if self.peer else self.message

    def to_wire(self) -> dict:
        out = {"code": self.code, "message": self.message[:4000]}
        if self.peer:
            out["peer"] = self.peer[:200]
        return out

    @classmethod
    def from_wire(cls, header: dict, peer: str) -> MeshError:
        code = header.get("code")
        message = header.get("message")
        origin = header.get("peer")
        return cls(
            code if isinstance(code, str) else "internal",
            message if isinstance(message, str) else "peer sent an error without a message",
            peer=origin if isinstance(origin, str) else peer,
        )


class PeerLost(MeshError):
    """The connection to a peer broke, or the peer stopped answering."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__("peer-lost", reason, peer=peer)
