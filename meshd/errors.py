"""Errors that cross the wire: a code a program can act on and a message a person can.

Every wire code has its exception type (:class:`Busy` for ``busy``, :class:`PeerLost` for
``peer-lost``, ...), so callers catch types instead of comparing strings. ``MeshError(code, message)``
still names an error by its code, as the raise sites and :meth:`MeshError.from_wire` do, and gives an
instance of that code's type: ``isinstance(MeshError("busy", "..."), Busy)`` holds, whoever raised it.
"""

from __future__ import annotations

from typing import ClassVar

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

_BY_CODE: dict[str, type[MeshError]] = {}


class _TypedByCode(type):
    """Makes ``MeshError(code, ...)`` an instance of the code's own type (its fields set as the base sets
    them), so an error raised by code anywhere is caught by type everywhere."""

    def __call__(cls, *args, **kwargs):
        if cls is not MeshError:
            return super().__call__(*args, **kwargs)
        code = args[0] if args else kwargs.get("code")
        error = Exception.__new__(_BY_CODE.get(code if isinstance(code, str) else "", _BY_CODE["internal"]))
        MeshError.__init__(error, *args, **kwargs)
        return error


class MeshError(Exception, metaclass=_TypedByCode):
    """An error with a wire code; raised by handlers, sent to the peer, raised again on its side."""

    code: str = "internal"
    #: The wire code of a subclass (set by its class statement: ``class Busy(MeshError, code="busy")``).
    CODE: ClassVar[str] = "internal"

    def __init_subclass__(cls, *, code: str | None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if code is None:  # a base for the types below, not a code's own type
            return
        if code not in CODES or code in _BY_CODE:
            raise TypeError(f"{cls.__name__}: wire code {code!r} is unknown or already has a type")
        cls.CODE = cls.code = code
        _BY_CODE[code] = cls

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
        return MeshError(
            code if isinstance(code, str) else "internal",
            message if isinstance(message, str) else "peer sent an error without a message",
            peer=origin if isinstance(origin, str) else peer,
        )


class _Coded(MeshError, code=None):
    """The types below are raised with a message alone: their class says the code."""

    def __init__(self, message: str, *, peer: str | None = None) -> None:
        super().__init__(self.CODE, message, peer=peer)


class InternalError(_Coded, code="internal"):
    """A bug on the peer's side (it logs the traceback); also what an unknown wire code becomes."""


class AuthRefused(_Coded, code="auth"):
    """A wrong or missing cluster key (on either side of the handshake)."""


class VersionMismatch(_Coded, code="version"):
    """The peers speak different protocol versions."""


class ProtocolViolation(_Coded, code="protocol"):
    """A malformed or oversized frame, or a reply of the wrong shape."""


class BadRequest(_Coded, code="bad-request"):
    """A well-formed request with invalid fields."""


class Mismatch(_Coded, code="mismatch"):
    """A plan that does not match what a peer holds: model, hash, precision, blocks or codec."""


class NotFound(_Coded, code="not-found"):
    """An unknown job, model or LoRA."""


class Busy(_Coded, code="busy"):
    """The peer's queue is full."""


class Draining(_Coded, code="draining"):
    """The daemon is shutting down and takes no new work."""


class OutOfMemory(_Coded, code="oom"):
    """The GPU ran out of memory."""


class CodecFailure(_Coded, code="codec"):
    """Encoded data that does not decode."""


class Cancelled(_Coded, code="cancelled"):
    """The work was cancelled (the client went away or asked to stop)."""


class PeerLost(MeshError, code="peer-lost"):
    """The connection to a peer broke, or the peer stopped answering."""

    def __init__(self, peer: str | None, reason: str) -> None:
        super().__init__("peer-lost", reason, peer=peer)


#: Errors after which a generation is worth running again on the peers left: one of them died, froze,
#: was cut off, or is shutting down.
RETRYABLE: tuple[type[MeshError], ...] = (PeerLost, Draining)


def file_refusal(node: str, exc: BaseException) -> MeshError:
    """What a client is told when a node's own files fail it (a ModelError or a LoraError: a file gone,
    closed or damaged): not-found, in one line naming the node. Not internal: it is no bug, and needs no
    traceback in the log."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return MeshError("not-found", f"{node}: {first}")
