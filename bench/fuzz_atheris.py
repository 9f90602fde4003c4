#!/usr/bin/env python3
"""Coverage-guided fuzzing (libFuzzer, through atheris) of what a peer's bytes reach first: the frame
parser, the handshake, and the codec decoders.

    pip install atheris            # a tool for this run, not a dependency of flux-mesh
    python bench/fuzz_atheris.py seeds corpus       # valid frames and handshakes to start from
    python bench/fuzz_atheris.py frames    corpus/frames    -max_total_time=600 -print_final_stats=1
    python bench/fuzz_atheris.py handshake corpus/handshake -max_total_time=600 -print_final_stats=1
    python bench/fuzz_atheris.py codec     -max_total_time=600 -print_final_stats=1

Arguments after the target go to libFuzzer (a corpus folder, -jobs, -runs, ...). An input that raises
anything but the expected error (ProtocolError, MeshError, CodecError), breaks a limit, or crashes
the process is a finding: libFuzzer stops and writes it to ``crash-*``. The hypothesis suite
(tests/test_fuzz.py) runs the same properties in CI; this one runs for as long as you let it.
"""

from __future__ import annotations

import asyncio
import sys
import zlib
from pathlib import Path

import atheris

# Third-party modules load uninstrumented; only the project's own code is traced for coverage.
import msgpack
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports(include=["meshd", "codec"]):
    import codec
    from codec import CodecError, CodecSpec, Encoded
    from meshd import auth, limits
    from meshd.errors import MeshError
    from meshd.wire.frames import DEFAULT_LIMITS, LENGTH, PREAUTH_LIMITS, PREFIX, FrameLimits, FrameReader, ProtocolError
    from tests.daemons import server_side_of  # the same harness the hypothesis fuzz uses

SMALL_LIMITS = FrameLimits(max_header=64, max_segments=2, max_segment=32, max_frame=48)
LIMITS = (DEFAULT_LIMITS, PREAUTH_LIMITS, SMALL_LIMITS)


# --- frames ---------------------------------------------------------------------------------------------


def fuzz_frames(data: bytes) -> None:
    """First byte: which limits; the rest: a byte stream. ProtocolError, or frames within the limits;
    the parser never asks for more bytes at once than the limits allow (that is what gets allocated)."""
    if not data:
        return
    lim, stream = LIMITS[data[0] % len(LIMITS)], data[1:]
    ceiling = max(PREFIX.size, LENGTH.size * lim.max_segments + lim.max_header, lim.max_segment)
    reader, pos = FrameReader(lim), 0
    try:
        while pos + reader.needed() <= len(stream):
            n = reader.needed()
            if n > ceiling:
                raise AssertionError(f"parser asked for {n} bytes; the limits allow {ceiling}")
            frame = reader.push(stream[pos : pos + n])
            pos += n
            if frame is not None and (len(frame.segments) > lim.max_segments or not isinstance(frame.op, str)):
                raise AssertionError(f"frame beyond the limits: {frame.header!r:.200}")
    except ProtocolError:
        pass


# --- handshake ------------------------------------------------------------------------------------------

KEY = auth.generate_key()
_loop = asyncio.new_event_loop()


def fuzz_handshake(data: bytes) -> None:
    """Whatever a peer without the key sends before authenticating: refused (MeshError), never welcomed."""
    if len(data) > 4096:  # the pre-auth cap is 512 bytes a frame; longer inputs add nothing
        return
    outcome = _loop.run_until_complete(server_side_of(data, KEY))
    if not isinstance(outcome, MeshError):
        raise AssertionError(f"a peer without the key got through the handshake: {outcome!r:.200}")


# --- codec ----------------------------------------------------------------------------------------------

_tensor = torch.randn(1, 80, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
TEMPLATES = [codec.encode(_tensor, CodecSpec.parse(name, chunk_tokens=40))
             for name in ("raw", "fp8", "u8", "hevc-lossless")]


def _value(fdp) -> object:
    kind = fdp.ConsumeIntInRange(0, 6)
    if kind == 0:
        return fdp.ConsumeIntInRange(-(2**63), 2**63 - 1)
    if kind == 1:
        return fdp.ConsumeIntInRange(0, 300)
    if kind == 2:
        return fdp.ConsumeUnicodeNoSurrogates(8)
    if kind == 3:
        return [fdp.ConsumeIntInRange(-2, 5000) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    if kind == 4:
        return None
    if kind == 5:
        return fdp.ConsumeBytes(8)
    return fdp.ConsumeFloat()


def fuzz_codec(data: bytes) -> None:
    """A real encoded tensor with its header fields and buffers damaged (or a header from raw msgpack):
    CodecError, or a tensor of exactly the declared shape."""
    fdp = atheris.FuzzedDataProvider(data)
    template = TEMPLATES[fdp.ConsumeIntInRange(0, len(TEMPLATES) - 1)]
    header = template.header.to_dict()
    buffers = [bytes(b) for b in template.buffers]
    if fdp.ConsumeIntInRange(0, 9) == 0:
        try:
            header = msgpack.unpackb(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200)), strict_map_key=False)
        except Exception:  # noqa: BLE001 - not msgpack: nothing to decode
            return
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        field = fdp.PickValueInList(["v", "codec", "dtype", "shape", "chunks", "qp", "encoder", "chunk"])
        chunks = header.get("chunks") if isinstance(header, dict) else None
        if field == "chunk" and isinstance(chunks, list) and chunks:
            chunk = chunks[fdp.ConsumeIntInRange(0, len(chunks) - 1)]
            if isinstance(chunk, list) and chunk:
                chunk[fdp.ConsumeIntInRange(0, len(chunk) - 1)] = _value(fdp)
        elif isinstance(header, dict):
            header[field] = _value(fdp)
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        if not buffers:
            break
        i = fdp.ConsumeIntInRange(0, len(buffers) - 1)
        action = fdp.ConsumeIntInRange(0, 3)
        if action == 0:
            buffers[i] = buffers[i][: fdp.ConsumeIntInRange(0, len(buffers[i]))]
        elif action == 1:
            buffers[i] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2048))
        elif action == 2:
            del buffers[i]
        else:
            buffers[i] += fdp.ConsumeBytes(16)
    if template.header.codec == "hevc" and fdp.ConsumeBool() and isinstance(header, dict):
        # A consistent liar: length/CRC tables that match the damaged frames, so FFmpeg sees them.
        try:
            channels, pos = header["shape"][-1], 0
            for chunk in header["chunks"]:
                frames = chunk[2][2]
                table = [(len(b), zlib.crc32(b)) for b in buffers[pos + 1 : pos + 1 + frames]]
                buffers[pos] = bytes(buffers[pos])[: 8 * channels] + np.array(table, dtype="<u4").tobytes()
                pos += 1 + frames
        except (KeyError, IndexError, TypeError, ValueError):
            pass
    try:
        out = codec.decode(Encoded.from_wire(header, buffers), "cpu")
    except CodecError:
        return
    declared = codec.Header.from_dict(header)
    if tuple(out.shape) != declared.shape or out.dtype != declared.torch_dtype:
        raise AssertionError(f"decoded {tuple(out.shape)} {out.dtype}; the header declares {declared}")


TARGETS = {"frames": fuzz_frames, "handshake": fuzz_handshake, "codec": fuzz_codec}


def write_seeds(folder: Path) -> None:
    """Valid inputs to start from: frames of every shape under each limit, and an honest handshake."""
    from meshd.wire.frames import frame_bytes  # noqa: PLC0415

    frames = [frame_bytes({"op": "echo", "id": 1}), frame_bytes({"op": "probe", "id": 2}, [b"abc", b""]),
              frame_bytes({"op": "hello", "proto": limits.PROTOCOL_VERSION, "nonce": bytes(32)}),
              frame_bytes({"op": "chunk", "id": 3, "index": 0}, [bytes(20)]) * 2]
    hello = frame_bytes({"op": "hello", "proto": limits.PROTOCOL_VERSION, "nonce": auth.new_nonce()})
    seeds = {"frames": [bytes([i]) + f for i in range(len(LIMITS)) for f in frames],
             "handshake": [hello, hello + frame_bytes({"op": "proof", "proof": bytes(32)})]}
    for target, inputs in seeds.items():
        (folder / target).mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(inputs):
            (folder / target / f"seed-{i}").write_bytes(data)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "seeds":
        write_seeds(Path(sys.argv[2]))
        return
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus]\n"
                 f"       {sys.argv[0]} seeds FOLDER   (writes FOLDER/frames and FOLDER/handshake)")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
