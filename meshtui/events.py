"""What a split load and a generation report while they run, as typed events.

A daemon streams ``event`` frames while it loads a span (``load``, then ``compiling``/``compiled``
for the default size) and while the head runs a generation (``queued``, ``encoding``, each
stage's ``compiling``/``compiled``, ``prepared``, one ``step`` per step, ``decode``). A
:class:`~meshtui.mesh.Mesh` adds its own (:class:`LoadStarted`, :class:`LoadDone`, :class:`Retry`,
:class:`Dropped`, :class:`Replanned`). Consumers match on the types.

:func:`from_wire` is the one place a frame's header becomes an event. A kind this client does not
know (a newer daemon's) becomes an :class:`OtherEvent`, never an error; a known kind with a
top-level field of the wrong type is a :class:`~meshd.errors.ProtocolViolation` naming the field,
so a daemon that breaks the contract fails the request with the cause instead of a screen that
quietly shows nothing. Missing optional fields read as None. Nested records (a step's passes and
hops, a prepared event's stages) are read by :mod:`meshd.pipeline.progress` with its own, lenient
rule, the one the summary's step records follow too: a malformed hop figure reads as unknown, and a
stage without readable blocks is left out.

No torch here: ``meshtui generate`` reads these before anything loads it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

from meshd.errors import ProtocolViolation
from meshd.model.compile_events import describe_event
from meshd.fields import MAX_TEXT, wire_int, wire_number, wire_text
from meshd.pipeline.blocks import BlockRange
from meshd.pipeline.progress import StageInfo, StepRecord

#: Frame fields that address a request, not part of its events.
_ADDRESSING = ("op", "id")


@dataclass(frozen=True)
class Queued:
    """The head took the request; ``position`` generations, this one included, wait for its GPU."""

    position: int


@dataclass(frozen=True)
class Encoding:
    """The head fetches the prompt's embeddings from the peer holding the text encoder."""

    text_encoder: str  # that peer, "host:port"


@dataclass(frozen=True)
class Prepared:
    """Every stage holds its blocks and agreed to the plan; the links are chosen."""

    plan: str
    stages: tuple[StageInfo, ...]
    distilled: bool | None  # a step-distilled model (None: the head did not say)
    cfg: bool | None  # a base model sampled with classifier-free guidance (two passes a step)


#: One denoising step done: :class:`meshd.pipeline.progress.StepRecord` (``step`` 1-based, ``steps`` set).
Step = StepRecord


@dataclass(frozen=True)
class Decoding:
    """The last step is done: the head decodes the image."""


@dataclass(frozen=True)
class Compiling:
    """A peer compiles its blocks for a new size before it runs them (``meshd.model.compile_events``)."""

    peer: str | None  # the label of the peer this client is loading (None: relayed inside a generation)
    node: str | None  # the compiling daemon's name
    blocks: str | None  # as the daemon shows them, "0-15"
    size: str | None  # "1024x1024"
    tokens: int | None
    cached: bool | None  # from the compile cache (seconds), not the first time (tens of seconds)
    estimate_s: float | None
    vae: bool | None = None  # the head's VAE decoder compiles too (blocks "" when it alone does)

    def describe(self) -> str:
        """"compiling blocks 0-15 on a for 1024x1024 (first time, ~18 s)": meshd's own wording."""
        return describe_event({"kind": "compiling", **asdict(self)})


@dataclass(frozen=True)
class Compiled:
    """The compile :class:`Compiling` announced is done."""

    peer: str | None  # as in Compiling
    node: str | None
    seconds: float | None

    def describe(self) -> str:
        """"compiled on a in 17.5 s"."""
        return describe_event({"kind": "compiled", **asdict(self)})


@dataclass(frozen=True)
class LoadProgress:
    """A peer read ``blocks_done`` of the ``blocks_total`` blocks it was asked to load."""

    peer: str | None  # the label this client loads it under
    blocks_done: int
    blocks_total: int


@dataclass(frozen=True)
class LoadStarted:
    """This client asked a peer to hold ``blocks`` (it held something else)."""

    peer: str  # its label
    blocks: tuple[BlockRange, ...]


@dataclass(frozen=True)
class LoadDone:
    """A peer holds the blocks asked for."""

    peer: str  # its label
    seconds: float | None  # as the peer timed the load (None: it did not say)


@dataclass(frozen=True)
class Retry:
    """A generation lost a peer; the mesh re-plans over the peers left and runs it again."""

    lost: str | None  # the lost peer's label, else the address the error named (None: it named none)
    reason: str
    attempt: int  # 1 for the first retry


@dataclass(frozen=True)
class Dropped:
    """A peer that no longer answers was dropped from the mesh while re-planning."""

    peer: str  # its label
    reason: str | None


@dataclass(frozen=True)
class Replanned:
    """The split the retried generation runs on."""

    plan: str


@dataclass(frozen=True)
class OtherEvent:
    """An event of a kind this client does not know (from a newer daemon): kept, shown nowhere."""

    kind: str
    fields: Mapping[str, object]


Event = (Queued | Encoding | Prepared | Step | Decoding | Compiling | Compiled | LoadProgress | LoadStarted
         | LoadDone | Retry | Dropped | Replanned | OtherEvent)


class _Fields:
    """One event's header, read field by field; a field of the wrong type is a ProtocolViolation naming it."""

    def __init__(self, kind: str, header: Mapping, sender: str | None) -> None:
        self.kind, self.header, self.sender = kind, header, sender

    def _get(self, name: str, what: str, ok: Callable[[object], bool], required: bool) -> object:
        value = self.header.get(name)
        if value is None and not required:
            return None
        if value is None or not ok(value):
            found = "it is missing" if value is None else f"not {type(value).__name__}"
            raise ProtocolViolation(f"{self.kind} event: field {name!r} must be {what}, {found}", peer=self.sender)
        return value

    # The strict checks are the lenient readers of meshd's records (None: unreadable), so the two
    # never disagree about what a readable field is.
    def integer(self, name: str, *, required: bool = False) -> int | None:
        return wire_int(self._get(name, "an integer", lambda v: wire_int(v) is not None, required))

    def number(self, name: str) -> float | None:
        return wire_number(self._get(name, "a number", lambda v: wire_number(v) is not None, False))

    def text(self, name: str, *, required: bool = False) -> str | None:
        return wire_text(self._get(name, "text", lambda v: wire_text(v) is not None, required))

    def flag(self, name: str) -> bool | None:
        return self._get(name, "true or false", lambda v: isinstance(v, bool), False)

    def items(self, name: str) -> list | None:
        return self._get(name, "a list", lambda v: isinstance(v, list), False)


def _step(f: _Fields, peer: str | None) -> Step:
    # Checked here, read by the summary's own parser: an event's step is its 1-based number, of ``steps``.
    f.integer("step", required=True)
    f.integer("steps", required=True)
    f.number("ms")
    f.items("passes")
    return StepRecord.from_wire(dict(f.header))


def _prepared(f: _Fields, peer: str | None) -> Prepared:
    return Prepared(f.text("plan", required=True), StageInfo.many_from_wire(f.items("stages")), f.flag("distilled"),
                    f.flag("cfg"))


def _compiling(f: _Fields, peer: str | None) -> Compiling:
    return Compiling(peer, f.text("node"), f.text("blocks"), f.text("size"), f.integer("tokens"), f.flag("cached"),
                     f.number("estimate_s"), f.flag("vae"))


_KINDS = {
    "queued": lambda f, peer: Queued(f.integer("position", required=True)),
    "encoding": lambda f, peer: Encoding(f.text("text_encoder", required=True)),
    "prepared": _prepared,
    "step": _step,
    "decode": lambda f, peer: Decoding(),
    "compiling": _compiling,
    "compiled": lambda f, peer: Compiled(peer, f.text("node"), f.number("seconds")),
    "load": lambda f, peer: LoadProgress(peer, f.integer("done", required=True), f.integer("total", required=True)),
}


def from_wire(header: Mapping, peer: str | None = None, *, sender: str | None = None) -> Event:
    """The event an ``event`` frame's header carries. ``peer``: the label of the peer being loaded, for
    the load and compile events it sends; ``sender``: the daemon that sent it, named by an error."""
    kind = header.get("kind")
    if not isinstance(kind, str):
        raise ProtocolViolation(f"an event's field 'kind' must be text, not {type(kind).__name__}", peer=sender)
    parse = _KINDS.get(kind)
    if parse is None:
        return OtherEvent(kind[:MAX_TEXT], {k: v for k, v in header.items() if k not in (*_ADDRESSING, "kind")})
    return parse(_Fields(kind, header, sender), peer)
