"""Tensor <-> wire bytes for the activations that cross a flux-mesh link.

A pure library: it knows nothing of sockets, daemons or models. Codecs: ``raw`` (bit-exact),
``fp8`` and ``u8`` (per-channel 8-bit), ``hevc`` (u8 codes laid out as YUV 4:4:4 video, encoded by
NVENC or libx265 and decoded by NVDEC or FFmpeg).
"""

from .core import ChunkDecoder, Encoded, EncodedChunk, decode, encode, encode_chunks, plan_chunks
from .errors import CodecError, CodecUnavailable
from .header import Header
from .metrics import ReconError, reconstruction_error
from .policy import Calibration, Choice, choose_codec
from .probe import Capabilities, probe
from .spec import CODEC_NAMES, CodecSpec, TokenLayout

__all__ = [
    "CODEC_NAMES",
    "Calibration",
    "Capabilities",
    "Choice",
    "ChunkDecoder",
    "CodecError",
    "CodecSpec",
    "CodecUnavailable",
    "Encoded",
    "EncodedChunk",
    "Header",
    "ReconError",
    "TokenLayout",
    "choose_codec",
    "decode",
    "encode",
    "encode_chunks",
    "plan_chunks",
    "probe",
    "reconstruction_error",
]
