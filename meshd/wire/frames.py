"""The meshd wire format, sans I/O: bytes in -> frames out, frames -> bytes out.

A frame is::

    prefix   16 bytes   magic "FXMH" | frame format u16 | flags u16 | header length u32 | segments u32
    lengths  8 bytes per segment (u64)
    header   msgpack map with string keys; "op" names the message
    segments raw bytes (tensor payloads never go through msgpack)

All integers are little-endian. Every limit is in :mod:`meshd.limits`; a frame that breaks one is a
:class:`ProtocolError` before anything is allocated for it. See docs/protocol.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .. import limits

PREFIX = struct.Struct("<4sHHII")
LENGTH = struct.Struct("<Q")


class ProtocolError(Exception):
    """A peer broke the protocol: bad magic, wrong version, an oversized or malformed frame."""

    def __init__(self, message: str, code: str = "protocol") -> None:
        super().__init__(message)
        self.code = code  # the kind: "protocol", "magic", "version" or "too-large"

    @property
    def wire_code(self) -> str:
        """The error code a peer is sent (meshd.errors.CODES): a version mismatch or a protocol error."""
        return "version" if self.code == "version" else "protocol"


@dataclass
class Frame:
    header: dict[str, Any]
    segments: list = field(default_factory=list)
    started_at: float = 0.0  # perf_counter when its first bytes arrived (set by the transport)
    finished_at: float = 0.0  # ... and when its last did
    recv_s: float = 0.0  # time its big segments spent in socket reads (set by the transport)
    open_s: float = 0.0  # ... and in opening their sealed records

    @property
    def op(self) -> str:
        return self.header["op"]

    @property
    def payload_bytes(self) -> int:
        return sum(memoryview(s).nbytes for s in self.segments)


@dataclass(frozen=True)
class FrameLimits:
    max_header: int = limits.MAX_HEADER_BYTES
    max_segments: int = limits.MAX_SEGMENTS
    max_segment: int = limits.MAX_SEGMENT_BYTES
    max_frame: int = limits.MAX_FRAME_BYTES
    #: Only the one encoding :func:`pack_header` writes is accepted (and flags 0), so that the bytes a
    #: frame arrived as are exactly those re-encoded from what was decoded: what the handshake's
    #: transcript binds (meshd.wire.handshake) is then the frame as it was on the wire.
    canonical: bool = False


#: Limits for frames read before the peer is authenticated: one small header, no segments, in the
#: canonical encoding (the handshake binds those bytes into its MACs).
PREAUTH_LIMITS = FrameLimits(max_header=limits.PREAUTH_MAX_FRAME_BYTES, max_segments=0, max_segment=0, max_frame=0,
                             canonical=True)
DEFAULT_LIMITS = FrameLimits()


def pack_header(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def unpack_header(data: bytes, max_bytes: int = limits.MAX_HEADER_BYTES) -> dict[str, Any]:
    """Decode a header with msgpack's safety limits; it must be a map of string keys with an ``op``."""
    if len(data) > max_bytes:
        raise ProtocolError(f"frame header of {len(data)} bytes exceeds {max_bytes}", code="too-large")
    try:
        header = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.MAX_HEADER_STRING,
            max_bin_len=limits.MAX_HEADER_STRING,
            max_array_len=limits.MAX_HEADER_CONTAINER,
            max_map_len=limits.MAX_HEADER_CONTAINER,
            max_ext_len=0,
        )
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types for bad input
        raise ProtocolError(f"frame header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"frame header must be a map, got {type(header).__name__}")
    if not isinstance(header.get("op"), str):
        raise ProtocolError("frame header has no 'op' string")
    return header


def encode_frame(header: dict[str, Any], segments: list | tuple = (), flags: int = 0) -> list:
    """Serialise a frame into buffers for ``writelines`` (segments are passed through, not copied)."""
    head = pack_header(header)
    if len(head) > limits.MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(head)} bytes exceeds {limits.MAX_HEADER_BYTES}")
    if len(segments) > limits.MAX_SEGMENTS:
        raise ProtocolError(f"{len(segments)} segments exceed {limits.MAX_SEGMENTS}")
    sizes = [memoryview(s).nbytes for s in segments]
    prefix = PREFIX.pack(limits.MAGIC, limits.FRAME_FORMAT, flags, len(head), len(segments))
    table = b"".join(LENGTH.pack(n) for n in sizes)
    return [prefix + table + head, *segments]


def frame_bytes(header: dict[str, Any], segments: list | tuple = ()) -> bytes:
    """A whole frame as one bytes object (tests, small messages)."""
    return b"".join(bytes(b) for b in encode_frame(header, segments))


class FrameReader:
    """Incremental frame parser.

    Pull style for transports: ask :meth:`needed` how many bytes the next step wants, read exactly
    that many, :meth:`push` them; a complete frame comes back from ``push``. Push style for tests:
    :meth:`feed` any amount of bytes and get the complete frames.
    """

    def __init__(self, frame_limits: FrameLimits = DEFAULT_LIMITS) -> None:
        self.limits = frame_limits
        self._reset()
        self._buffer = bytearray()

    def _reset(self) -> None:
        self._state = "prefix"
        self._need = PREFIX.size
        self._header_len = 0
        self._sizes: list[int] = []
        self._header: dict[str, Any] | None = None
        self._segments: list = []
        self.flags = 0

    @property
    def expecting_segment(self) -> bool:
        """True when the next :meth:`needed` bytes are a segment's payload (not prefix or header)."""
        return self._state == "segment"

    @property
    def in_frame(self) -> bool:
        """True once a frame's prefix has arrived and before the frame is complete."""
        return self._state != "prefix"

    def needed(self) -> int:
        return self._need

    def push(self, data: bytes | bytearray | memoryview) -> Frame | None:
        """Consume exactly :meth:`needed` bytes; return a frame when one completes."""
        if len(data) != self._need:
            raise ValueError(f"push needs exactly {self._need} bytes, got {len(data)}")
        if self._state == "prefix":
            magic, version, flags, header_len, nseg = PREFIX.unpack(data)
            if magic == limits.SEALED_MAGIC:
                raise ProtocolError("a sealed record arrived where an unsealed frame was due (the peer seals its "
                                    "frames; this side was built without sealing)")
            if magic != limits.MAGIC:
                raise ProtocolError(f"not a meshd frame (magic {bytes(magic)!r})", code="magic")
            if version != limits.FRAME_FORMAT:
                raise ProtocolError(
                    f"peer uses meshd frame format {version}; this side uses {limits.FRAME_FORMAT}", code="version"
                )
            if header_len == 0 or header_len > self.limits.max_header:
                raise ProtocolError(f"frame header of {header_len} bytes exceeds the limit of {self.limits.max_header}",
                                    code="too-large")
            if self.limits.canonical and flags:
                raise ProtocolError(f"a handshake frame must have flags 0, not {flags:#x}")
            if nseg > self.limits.max_segments:
                raise ProtocolError(f"frame with {nseg} segments exceeds the limit of {self.limits.max_segments}",
                                    code="too-large")
            self.flags, self._header_len = flags, header_len
            self._state, self._need = "table", LENGTH.size * nseg + header_len
            return None
        if self._state == "table":
            nseg = (len(data) - self._header_len) // LENGTH.size
            sizes = [LENGTH.unpack_from(data, i * LENGTH.size)[0] for i in range(nseg)]
            for n in sizes:
                if n > self.limits.max_segment:
                    raise ProtocolError(f"segment of {n} bytes exceeds the limit of {self.limits.max_segment}",
                                        code="too-large")
            if sum(sizes) > self.limits.max_frame:
                raise ProtocolError(f"frame of {sum(sizes)} bytes exceeds the limit of {self.limits.max_frame}",
                                    code="too-large")
            raw = bytes(data[nseg * LENGTH.size :])
            self._header = unpack_header(raw, self.limits.max_header)
            if self.limits.canonical and pack_header(self._header) != raw:
                raise ProtocolError("a handshake frame's header is not msgpack as meshd writes it (re-encoded, "
                                    "or altered on the way)")
            self._sizes = sizes
            return self._next_segment()
        # a segment
        self._segments.append(data)
        return self._next_segment()

    def _next_segment(self) -> Frame | None:
        while len(self._segments) < len(self._sizes):
            n = self._sizes[len(self._segments)]
            if n:
                self._state, self._need = "segment", n
                return None
            self._segments.append(b"")
        return self._finish()

    def _finish(self) -> Frame:
        frame = Frame(self._header, self._segments)
        self._reset()
        return frame

    def feed(self, data: bytes) -> list[Frame]:
        """Append bytes; return every frame they complete."""
        self._buffer += data
        frames = []
        while len(self._buffer) >= self._need:
            chunk = bytes(self._buffer[: self._need])
            del self._buffer[: self._need]
            frame = self.push(chunk)
            if frame is not None:
                frames.append(frame)
        return frames
