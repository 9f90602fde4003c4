#!/usr/bin/env python3
"""What sealing costs: one core's AEAD throughput, and the meshd transport sealed vs unsealed.

    python bench/seal_bench.py --json                       # ciphers on one core + loopback TCP transport
    python bench/seal_bench.py --emulate-link 1gbit,0.3ms   # the transport over an emulated link too

``cipher``: AES-256-GCM and ChaCha20-Poly1305 sealing and opening 1 MiB records (the transport's
record size) on one thread, in GB/s. ``transport``: one process sends frames carrying one segment of
``--segment-mib`` (36 MiB: klein-9B's joint stream at 1024^2, raw bf16) to a receiving process over
loopback TCP, through meshd.wire.connection, once with every frame sealed and once unsealed (the same
Connection, never given keys: what protocol 1 did); per frame seconds and GB/s, and the added share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305  # noqa: E402

from meshd import limits  # noqa: E402
from meshd.wire.connection import Connection  # noqa: E402
from meshd.wire.link import LinkEmulation  # noqa: E402
from meshd.wire import seal  # noqa: E402


def cipher_throughput(total_mib: int) -> dict:
    """GB/s of one thread sealing and opening 1 MiB records, per AEAD."""
    n = limits.SEAL_RECORD_BYTES
    data = bytearray(os.urandom(n))
    sealed, opened = bytearray(n + 16), bytearray(n)
    reps = max(1, total_mib * (1 << 20) // n)
    out = {}
    for name, cls in (("aes-256-gcm", AESGCM), ("chacha20-poly1305", ChaCha20Poly1305)):
        aead = cls(os.urandom(32))
        nonce = bytes(12)
        t0 = time.perf_counter()
        for _ in range(reps):
            aead.encrypt_into(nonce, data, b"", sealed)
        t1 = time.perf_counter()
        for _ in range(reps):
            aead.decrypt_into(nonce, sealed, b"", opened)
        t2 = time.perf_counter()
        out[name] = {"seal_GBps": round(reps * n / (t1 - t0) / 1e9, 2), "open_GBps": round(reps * n / (t2 - t1) / 1e9, 2)}
    return out


def _keys(client: bool) -> seal.SessionKeys:
    # Fixed inputs: both processes derive the same session keys without a handshake.
    return seal.session_keys(b"k" * 32, b"t" * 32, b"s" * 32, client=client)


def _receiver(port: int, frames: int, sealed: bool, emulate: str, result) -> None:
    async def run() -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        conn = Connection(sock, "sender", emulation=LinkEmulation.parse(emulate) if emulate else None)
        if sealed:
            conn.seal(_keys(client=False))
        for _ in range(frames):
            frame = await conn.recv()
            await conn.send({"op": "reply", "id": frame.header["id"]})
        conn.abort()

    asyncio.run(run())
    result.put("done")


async def transport(segment: int, frames: int, sealed: bool, emulate: str) -> dict:
    """Per-frame seconds of a request carrying one ``segment``-byte segment and its (empty) reply."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    result = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(
        target=_receiver, args=(listener.getsockname()[1], frames, sealed, emulate, result))
    child.start()
    sock, _ = listener.accept()  # the child connects at once
    conn = Connection(sock, "receiver", emulation=LinkEmulation.parse(emulate) if emulate else None)
    if sealed:
        conn.seal(_keys(client=True))
    payload = os.urandom(segment)
    times = []
    for i in range(frames):
        t0 = time.perf_counter()
        await conn.send({"op": "probe", "id": i + 1}, [payload])
        await conn.recv()
        times.append(time.perf_counter() - t0)
    conn.abort()
    result.get(timeout=60)
    child.join(30)
    listener.close()
    timed = times[1:]  # the first warms both ends up
    median = statistics.median(timed)
    return {"median_s": round(median, 5), "GBps": round(segment / median / 1e9, 3), "frames": len(timed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segment-mib", type=float, default=36.0)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--cipher-mib", type=int, default=512, help="MiB sealed per cipher")
    parser.add_argument("--emulate-link", default="", help="also over an emulated link, e.g. 1gbit,0.3ms")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    segment = int(args.segment_mib * (1 << 20))
    result = {"bench": "seal", "machine": {"host": platform.node(), "cpus": os.cpu_count(),
                                           "cpu": platform.processor() or platform.machine()},
              "record_bytes": limits.SEAL_RECORD_BYTES, "cipher_one_core": cipher_throughput(args.cipher_mib)}
    links = [("loopback TCP", "")] + ([(f"emulated {args.emulate_link}", args.emulate_link)] if args.emulate_link else [])
    result["transport"] = {}
    for label, emulate in links:
        frames = args.frames if not emulate else max(4, args.frames // 3)
        plain = asyncio.run(transport(segment, frames, False, emulate))
        sealed = asyncio.run(transport(segment, frames, True, emulate))
        result["transport"][label] = {
            "segment_bytes": segment, "unsealed": plain, "sealed": sealed,
            "added_pct": round(100 * (sealed["median_s"] / plain["median_s"] - 1), 2)}
    print(json.dumps(result, indent=1 if args.json else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
