"""What the caller asks for: which codec, with which settings, and how the tokens are laid out."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import CodecError
from .limits import DEFAULT_CHUNK_TOKENS, MAX_DIM

#: The codecs by name. ``hevc`` takes a QP (0-51) or none for lossless.
CODEC_NAMES = ("raw", "fp8", "u8", "hevc")

#: HEVC encoders a spec may ask for; ``auto`` takes NVENC where this host has it, else x265.
HEVC_ENCODERS = ("auto", "nvenc", "x265")

_HEVC_QP = re.compile(r"^hevc(?:[-:](?:qp=?)?(\d{1,2})|-lossless)?$")


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of a ``[..., tokens, channels]`` stream sit in the image.

    Each batch item holds ``prefix`` tokens with no spatial position (FLUX.2's text tokens come
    first) followed by ``height * width`` image tokens in row-major order. The HEVC codec lays the
    image tokens on their real grid so that intra prediction finds the spatial structure.
    """

    prefix: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for name in ("prefix", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_DIM:
                raise CodecError(f"token layout {name}={value!r} is not an integer in [0, {MAX_DIM}]")
        if self.height * self.width == 0:
            raise CodecError(f"token layout grid {self.height}x{self.width} is empty")

    @property
    def tokens_per_item(self) -> int:
        return self.prefix + self.height * self.width


@dataclass(frozen=True)
class CodecSpec:
    """A codec and its settings.

    ``qp`` is the HEVC constant QP (``None`` = lossless on the uint8 codes); ``chunk_tokens`` is how
    many tokens go into one chunk (0: the whole tensor is one chunk); ``encoder`` picks the HEVC
    encoder; ``layout`` places tokens on the image grid (HEVC only; without it tokens are laid out
    on a near-square grid per chunk).
    """

    name: str = "raw"
    qp: int | None = None
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    encoder: str = "auto"
    layout: TokenLayout | None = None

    def __post_init__(self) -> None:
        if self.name not in CODEC_NAMES:
            raise CodecError(f"unknown codec {self.name!r}; known codecs: {', '.join(CODEC_NAMES)}")
        if self.qp is not None:
            if self.name != "hevc":
                raise CodecError(f"codec {self.name!r} takes no QP (only hevc does)")
            if not isinstance(self.qp, int) or isinstance(self.qp, bool) or not 0 <= self.qp <= 51:
                raise CodecError(f"HEVC QP {self.qp!r} is outside 0-51")
        if not isinstance(self.chunk_tokens, int) or not 0 <= self.chunk_tokens <= MAX_DIM:
            raise CodecError(f"chunk_tokens={self.chunk_tokens!r} must be an integer >= 0")
        if self.encoder not in HEVC_ENCODERS:
            raise CodecError(f"unknown HEVC encoder {self.encoder!r}; choose one of {', '.join(HEVC_ENCODERS)}")

    @property
    def label(self) -> str:
        """The canonical short name: ``raw``, ``fp8``, ``u8``, ``hevc-lossless``, ``hevc-qp18``."""
        if self.name != "hevc":
            return self.name
        return "hevc-lossless" if self.qp is None else f"hevc-qp{self.qp}"

    @property
    def lossless(self) -> bool:
        """True when decoding gives back the input bit for bit."""
        return self.name == "raw"

    @classmethod
    def parse(cls, text: str, **overrides) -> CodecSpec:
        """Parse a user's codec name: ``raw``, ``fp8``, ``u8``, ``hevc`` / ``hevc-lossless``, ``hevc-qp18``."""
        text = text.strip().lower()
        if text in ("raw", "fp8", "u8"):
            return cls(name=text, **overrides)
        match = _HEVC_QP.match(text)
        if match:
            qp = int(match.group(1)) if match.group(1) is not None else None
            return cls(name="hevc", qp=qp, **overrides)
        raise CodecError(
            f"unknown codec {text!r}; use raw, fp8, u8, hevc-lossless or hevc-qpN (N in 0-51)"
        )
