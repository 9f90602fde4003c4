"""Choosing a codec per link: the fastest one that both ends can run and that meets the quality floor;
of codecs predicted to be about as fast, the most accurate.

The cost of sending a tensor of ``S`` bytes with codec ``c`` over a link of ``B`` bytes/s is modelled
from calibrated figures: encode time ``S / enc(c)``, wire time ``S / (ratio(c) * B)``, decode time
``S / dec(c)``. Chunks overlap the three stages, so with ``k`` chunks the total is the slowest stage
plus a ``1/k`` share of the other two (``k = 1``: their plain sum).

Speeds are bytes of *input tensor* per second, so the three terms add up; they depend on where the
work runs (``cuda`` or ``cpu`` for the quantisers, ``nvenc``/``x265`` and ``nvdec``/``ffmpeg`` for
HEVC). The defaults come from ``bench/codec_bench.py`` (docs/benchmarks.md). A :class:`Calibration`
learns: whoever owns one per link (the daemon that sends over it, the dashboard that forecasts it)
feeds it every measured hop through :meth:`Calibration.observe_hop` (encode and decode speed on the
engines used, and the ratio these activations really compress to) and passes it to
:func:`choose_codec`. Without one, ``choose_codec`` uses the benchmark figures as they are.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

from .errors import CodecError, CodecUnavailable
from .probe import Capabilities
from .spec import CodecSpec

#: Codecs the policy considers unless told otherwise.
DEFAULT_CANDIDATES = ("raw", "fp8", "u8", "hevc-lossless", "hevc-qp18")

#: Default quality floor: the smallest acceptable cosine similarity per hop.
DEFAULT_QUALITY_FLOOR = 0.999

#: Predicted times closer than this (relative) are a tie, and the more accurate codec wins it: the
#: figures are not that exact (fp8 and u8 differ by 0.4 % in bytes on FLUX.2 activations, while u8's
#: error is less than half of fp8's).
TIE_MARGIN = 0.02


@dataclass(frozen=True)
class CodecFigures:
    """Calibrated figures of one codec setting."""

    ratio: float  # raw bytes / wire bytes
    cosine: float  # worst cosine seen on the benchmark fixtures (1.0 = bit-exact)
    encode_bps: dict[str, float]  # by engine: input bytes per second
    decode_bps: dict[str, float]


def _figures() -> dict[str, CodecFigures]:
    # Measured by bench/codec_bench.py on the [1, 4608, 4096] bf16 fixtures (docs/benchmarks.md):
    # ratios and cosines from the structured fixture's worst case, speeds rounded down.
    return {
        "raw": CodecFigures(1.0, 1.0, {"cuda": 12e9, "cpu": 4e9}, {"cuda": 12e9, "cpu": 4e9}),
        "fp8": CodecFigures(1.99, 0.9993, {"cuda": 8e9, "cpu": 0.25e9}, {"cuda": 8e9, "cpu": 0.4e9}),
        "u8": CodecFigures(1.99, 0.9998, {"cuda": 8e9, "cpu": 0.2e9}, {"cuda": 8e9, "cpu": 0.4e9}),
        "hevc-lossless": CodecFigures(2.3, 0.9998, {"nvenc": 1.0e9, "x265": 0.02e9}, {"nvdec": 1.5e9, "ffmpeg": 0.04e9}),
        "hevc-qp18": CodecFigures(5.0, 0.995, {"nvenc": 1.5e9, "x265": 0.03e9}, {"nvdec": 2.5e9, "ffmpeg": 0.06e9}),
    }


def _measured(value: object) -> bool:
    """A figure worth learning from: a finite number > 0. A NaN or an infinity would stay in the moving
    averages for good (and a NaN speed fails every later choice); zeros and negatives measure nothing."""
    try:
        return value > 0 and math.isfinite(value)
    except (TypeError, OverflowError):  # not a number; an integer beyond a float
        return False


@dataclass
class Calibration:
    """Per-codec figures, updated as real transfers are measured (exponential moving average)."""

    figures: dict[str, CodecFigures] = field(default_factory=_figures)
    alpha: float = 0.3
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def get(self, label: str) -> CodecFigures:
        try:
            return self.figures[label]
        except KeyError:
            raise CodecError(f"no calibration for codec {label!r}") from None

    def observe(self, label: str, engine: str, direction: str, nbytes: int, seconds: float) -> None:
        """Fold a measured encode or decode (``direction``) of ``nbytes`` input bytes into the figures
        (ignored unless both, and the speed they give, are finite and > 0)."""
        if not (_measured(seconds) and _measured(nbytes)) or label not in self.figures:
            return
        rate = nbytes / seconds
        if not _measured(rate):  # a time so short that the speed is past the largest float
            return
        with self._lock:
            fig = self.figures[label]
            table = dict(fig.encode_bps if direction == "encode" else fig.decode_bps)
            old = table.get(engine)
            table[engine] = rate if old is None else (1 - self.alpha) * old + self.alpha * rate
            if direction == "encode":
                self.figures[label] = CodecFigures(fig.ratio, fig.cosine, table, fig.decode_bps)
            else:
                self.figures[label] = CodecFigures(fig.ratio, fig.cosine, fig.encode_bps, table)

    def observe_hop(self, label: str, sender: Capabilities | None, receiver: Capabilities | None, raw_bytes: int,
                    wire_bytes: int, encode_s: float, decode_s: float) -> None:
        """Fold one measured hop in: ``raw_bytes`` encoded by ``sender`` in ``encode_s``, sent as
        ``wire_bytes``, decoded by ``receiver`` in ``decode_s`` (capabilities of None: that side's engine
        is not known, its time is not used). A label without figures (``cuda-ipc``) is ignored, and so is
        any figure that is not finite and > 0."""
        if label not in self.figures or not _measured(raw_bytes):
            return
        name = CodecSpec.parse(label).name
        encoder = engines(sender, name, "encode") if sender is not None else None
        decoder = engines(receiver, name, "decode") if receiver is not None else None
        if encoder is not None:
            self.observe(label, encoder, "encode", raw_bytes, encode_s)
        if decoder is not None:
            self.observe(label, decoder, "decode", raw_bytes, decode_s)
        if _measured(wire_bytes) and _measured(raw_bytes / wire_bytes):
            with self._lock:
                fig = self.figures[label]
                ratio = (1 - self.alpha) * fig.ratio + self.alpha * raw_bytes / wire_bytes
                self.figures[label] = CodecFigures(ratio, fig.cosine, fig.encode_bps, fig.decode_bps)


@dataclass(frozen=True)
class Estimate:
    label: str
    encode_ms: float
    wire_ms: float
    decode_ms: float
    total_ms: float
    wire_bytes: int


@dataclass(frozen=True)
class Choice:
    """The chosen codec, its predicted cost, and why the others lost."""

    spec: CodecSpec
    estimate: Estimate
    reason: str
    considered: tuple[Estimate, ...] = ()
    excluded: tuple[tuple[str, str], ...] = ()


def engines(caps: Capabilities, codec: str, direction: str) -> str | None:
    """Which engine runs ``codec``'s ``direction`` on a host with ``caps`` (None: it cannot)."""
    if direction == "encode" and not caps.can_encode(codec):
        return None
    if direction == "decode" and not caps.can_decode(codec):
        return None
    on_gpu = caps.device.startswith("cuda")
    if codec == "hevc":
        return caps.hevc_encoder if direction == "encode" else caps.hevc_decoder
    return "cuda" if on_gpu else "cpu"


def estimate(label: str, tensor_bytes: int, link_bps: float, enc_engine: str, dec_engine: str,
             chunks: int, calibration: Calibration) -> Estimate:
    fig = calibration.get(label)
    enc_bps = fig.encode_bps.get(enc_engine)
    dec_bps = fig.decode_bps.get(dec_engine)
    if not enc_bps or not dec_bps:
        raise CodecError(f"no speed figures for {label} on {enc_engine}->{dec_engine}")
    wire_bytes = int(tensor_bytes / fig.ratio)
    enc = tensor_bytes / enc_bps * 1e3
    wire = wire_bytes / link_bps * 1e3
    dec = tensor_bytes / dec_bps * 1e3
    slowest = max(enc, wire, dec)
    total = slowest + (enc + wire + dec - slowest) / max(1, chunks)
    return Estimate(label, enc, wire, dec, total, wire_bytes)


def choose_codec(
    tensor_bytes: int,
    link_bps: float,
    sender: Capabilities,
    receiver: Capabilities,
    *,
    quality_floor: float = DEFAULT_QUALITY_FLOOR,
    chunks: int = 4,
    force: CodecSpec | str | None = None,
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES,
    calibration: Calibration | None = None,
) -> Choice:
    """Pick the codec that minimises encode + wire + decode time for one hop; of those within
    :data:`TIE_MARGIN` of the fastest, the most accurate.

    ``quality_floor`` is the smallest acceptable cosine (1.0 allows only bit-exact ``raw``).
    ``force`` overrides the choice, after checking both ends can run it. ``calibration`` is the
    link's own, learned from its measured hops; None: the benchmark figures.
    """
    calibration = calibration if calibration is not None else Calibration()
    if link_bps <= 0:
        raise CodecError(f"link bandwidth must be positive, got {link_bps}")
    if force is not None:
        spec = CodecSpec.parse(force) if isinstance(force, str) else force
        enc = engines(sender, spec.name, "encode")
        dec = engines(receiver, spec.name, "decode")
        if enc is None:
            raise CodecUnavailable(f"{sender.device} cannot encode {spec.label}: {_why(sender, spec.name, 'encode')}")
        if dec is None:
            raise CodecUnavailable(f"{receiver.device} cannot decode {spec.label}: {_why(receiver, spec.name, 'decode')}")
        try:
            est = estimate(spec.label, tensor_bytes, link_bps, enc, dec, chunks, calibration)
        except CodecError:
            est = Estimate(spec.label, 0.0, 0.0, 0.0, 0.0, tensor_bytes)
        return Choice(spec, est, "forced by the user")
    considered: list[Estimate] = []
    excluded: list[tuple[str, str]] = []
    for label in candidates:
        spec = CodecSpec.parse(label)
        fig = calibration.get(label)
        if fig.cosine < quality_floor:
            excluded.append((label, f"cosine {fig.cosine:.4f} is below the floor {quality_floor}"))
            continue
        enc = engines(sender, spec.name, "encode")
        dec = engines(receiver, spec.name, "decode")
        if enc is None or dec is None:
            side = sender if enc is None else receiver
            excluded.append((label, f"{side.device} cannot {'encode' if enc is None else 'decode'} it"))
            continue
        considered.append(estimate(label, tensor_bytes, link_bps, enc, dec, chunks, calibration))
    if not considered:
        raise CodecError("no codec meets the quality floor on both ends: " + "; ".join(f"{l}: {r}" for l, r in excluded))
    fastest = min(considered, key=lambda e: e.total_ms)
    tied = [e for e in considered if e.total_ms <= fastest.total_ms * (1 + TIE_MARGIN)]
    best = max(tied, key=lambda e: (calibration.get(e.label).cosine, -e.total_ms))
    reason = (
        f"{best.label}: {best.total_ms:.1f} ms predicted (encode {best.encode_ms:.1f}, wire {best.wire_ms:.1f}, "
        f"decode {best.decode_ms:.1f}) at {link_bps * 8 / 1e9:.2f} Gbit/s"
    )
    if best is not fastest:
        reason += (f"; as fast as {fastest.label} ({fastest.total_ms:.1f} ms) within {TIE_MARGIN:.0%} "
                   "and more accurate")
    return Choice(CodecSpec.parse(best.label), best, reason, tuple(considered), tuple(excluded))


def _why(caps: Capabilities, codec: str, direction: str) -> str:
    if codec == "hevc":
        return f"{caps.nvenc_reason if direction == 'encode' else caps.nvdec_reason}; {caps.cpu_hevc_reason}"
    if codec == "fp8":
        return "this torch has no float8_e4m3fn"
    return "unsupported"
