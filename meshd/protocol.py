"""The frame format, kept under its old name: the code lives in :mod:`meshd.wire.frames`."""

from .wire.frames import (  # noqa: F401 - re-exported
    DEFAULT_LIMITS,
    LENGTH,
    PREAUTH_LIMITS,
    PREFIX,
    Frame,
    FrameLimits,
    FrameReader,
    ProtocolError,
    encode_frame,
    frame_bytes,
    pack_header,
    unpack_header,
)
