"""Sealing, sans I/O: every frame after the handshake travels as AEAD records.

A sealed connection carries records, one direction each::

    record   16 bytes   magic "FXMS" | sequence number u64 | ciphertext length u32
             ciphertext AES-256-GCM of the plaintext, then its 16-byte tag

A frame is one *head* record (its plaintext: the frame's prefix, length table and msgpack header,
see :mod:`meshd.wire.frames`) followed by its segments, each cut into records of at most
``SEAL_RECORD_BYTES``. The nonce is the sequence number (4 zero bytes | u64): it is never sent twice
under one key, and the 16-byte record header is the associated data. Because the receiver knows
which number is due, a replayed, dropped or reordered record is named as such before it is
decrypted; a flipped bit or a record sealed without this session's key fails its tag.

Keys: HKDF-SHA256 over the cluster key and the X25519 secret of the two ephemeral keys the
handshake's nonces are, salted with the handshake's transcript hash (both hellos byte for byte, so
both nonces and every plain field), one key per direction (:func:`session_keys`): a cluster key
stolen later does not open connections recorded before, and a rewritten hello yields other keys. Each direction moves to a new key (HKDF of the old one; the old one is
forgotten) every ``REKEY_RECORDS`` records or ``REKEY_BYTES`` bytes, at the same record on both
sides, so no key seals more than the AES-GCM usage limits allow and the counter cannot wrap.

Why AES-256-GCM: on CPUs with AES-NI/VAES it seals ~10 GB/s on one core here, ChaCha20-Poly1305
~3.4 GB/s (bench/seal_bench.py measures both).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from .. import limits
from .frames import LENGTH, PREFIX, ProtocolError

RECORD = struct.Struct("<4sQI")
NONCE = struct.Struct("<4xQ")
TAG_BYTES = 16
KEY_BYTES = 32
RECORD_MAGIC = limits.SEALED_MAGIC

#: Whether this cryptography seals into and opens into caller buffers (recent releases): big segments
#: then need no copy besides the cipher's own output.
_IN_PLACE = hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")

#: Largest head record: a frame prefix, its length table and its msgpack header.
MAX_HEAD_RECORD = PREFIX.size + LENGTH.size * limits.MAX_SEGMENTS + limits.MAX_HEADER_BYTES

#: Set only by benchmark code (bench/seal_bench.py, bench/split_bench.py's --unsealed daemons) to
#: measure what sealing costs against the same transport unsealed. Nothing a peer sends and nothing in
#: the configuration can reach it; a sealed peer refuses an unsealed one at its first frame.
BENCH_UNSEALED = False


class SealError(ProtocolError):
    """A sealed record that is not the one due: altered, forged, replayed, dropped or reordered."""


@dataclass(frozen=True)
class SessionKeys:
    send: bytes
    receive: bytes


def session_keys(cluster_key: bytes, transcript: bytes, shared: bytes = b"", *, client: bool) -> SessionKeys:
    """The per-direction keys of one connection, from the cluster key, the handshake's transcript hash
    (which holds both nonces) and the X25519 secret of the two ephemeral keys those nonces are (see
    meshd.wire.handshake)."""

    def derive(label: bytes) -> bytes:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=transcript,
                    info=b"meshd 2 " + label)
        return hkdf.derive(cluster_key + shared)

    to_server, to_client = derive(b"client->server"), derive(b"server->client")
    return SessionKeys(to_server, to_client) if client else SessionKeys(to_client, to_server)


def _next_key(key: bytes) -> bytes:
    return HKDFExpand(algorithm=hashes.SHA256(), length=KEY_BYTES, info=b"meshd 2 rekey").derive(key)


class _Direction:
    """One direction's key, sequence number and what the key has sealed so far."""

    def __init__(self, key: bytes, rekey_records: int | None, rekey_bytes: int | None) -> None:
        self.key = key
        self.aead = AESGCM(key)
        self.seq = 0
        self.epoch = 0
        self.rekey_records = limits.REKEY_RECORDS if rekey_records is None else rekey_records
        self.rekey_bytes = limits.REKEY_BYTES if rekey_bytes is None else rekey_bytes
        self._records = 0
        self._bytes = 0

    def advance(self, n: int) -> None:
        """Count a record of ``n`` plaintext bytes; move to the next key once this one has done enough."""
        if self.seq >= limits.MAX_RECORD_SEQUENCE:
            raise SealError("sealed record counter exhausted; the connection must be re-established")
        self.seq += 1
        self._records += 1
        self._bytes += n
        if self._records >= self.rekey_records or self._bytes >= self.rekey_bytes:
            self.key = _next_key(self.key)
            self.aead = AESGCM(self.key)
            self.epoch += 1
            self._records = self._bytes = 0


class _Side:
    """One direction's key schedule and counters, as the sealing or the opening side holds them."""

    def __init__(self, key: bytes, *, record_bytes: int | None = None, rekey_records: int | None = None,
                 rekey_bytes: int | None = None) -> None:
        self._dir = _Direction(key, rekey_records, rekey_bytes)
        self.record_bytes = record_bytes or limits.SEAL_RECORD_BYTES

    @property
    def epoch(self) -> int:
        """How many times this direction has changed its key."""
        return self._dir.epoch

    @property
    def sequence(self) -> int:
        """The number of the next record (records sealed or opened so far)."""
        return self._dir.seq


class Sealer(_Side):
    """Seals the frames one side sends."""

    def seal(self, data, out: bytearray | memoryview | None = None):
        """One record of ``data`` (at most a record's worth): into ``out`` when given (no allocation),
        else as new bytes. Returns the record's bytes."""
        view = memoryview(data).cast("B")
        n = len(view)
        head = RECORD.pack(RECORD_MAGIC, self._dir.seq, n)
        nonce = NONCE.pack(self._dir.seq)
        if out is None:
            record = head + self._dir.aead.encrypt(nonce, view, head)
        else:
            record = memoryview(out)[: RECORD.size + n + TAG_BYTES]
            record[: RECORD.size] = head
            if _IN_PLACE:
                self._dir.aead.encrypt_into(nonce, view, head, record[RECORD.size :])
            else:  # an older cryptography: one more copy
                record[RECORD.size :] = self._dir.aead.encrypt(nonce, view, head)
        self._dir.advance(n)
        return record

    def pieces(self, segment) -> list[memoryview]:
        """How a segment is cut into records."""
        view = memoryview(segment).cast("B")
        return [view[i : i + self.record_bytes] for i in range(0, len(view), self.record_bytes)]

    def seal_frame(self, buffers: list) -> list:
        """Every record of a frame from :func:`encode_frame`'s buffers (tests and small frames)."""
        records = [self.seal(buffers[0])]
        for segment in buffers[1:]:
            records.extend(self.seal(piece) for piece in self.pieces(segment))
        return records


class Opener(_Side):
    """Checks and opens the records one side receives, in order."""

    def check(self, head, expected: int | None = None, maximum: int = MAX_HEAD_RECORD) -> int:
        """Validate a record header before its body is read; return the body's size (ciphertext + tag).

        ``expected`` is the exact plaintext size of a segment record; a head record may be up to
        ``maximum``."""
        magic, seq, n = RECORD.unpack(head)
        due = self._dir.seq
        if magic != RECORD_MAGIC:
            if magic == limits.MAGIC:
                raise SealError(f"an unsealed frame arrived where sealed record {due} was due (injected, or a "
                                "peer built without sealing)")
            raise SealError(f"not a sealed record where record {due} was due (magic {bytes(magic)!r})")
        if seq < due:
            raise SealError(f"sealed record {seq} arrived again where record {due} was due: a replayed frame")
        if seq > due:
            raise SealError(f"sealed record {seq} arrived where record {due} was due: "
                            f"{seq - due} record(s) dropped, or frames reordered")
        if expected is not None and n != expected:
            raise SealError(f"sealed record {seq} holds {n} bytes where a segment piece of {expected} was due")
        if expected is None and not PREFIX.size <= n <= maximum:
            raise SealError(f"sealed frame head of {n} bytes is outside 16..{maximum}", code="too-large")
        return n + TAG_BYTES

    def open(self, head, body) -> bytes:
        """The plaintext of a record whose header passed :meth:`check`."""
        try:
            plain = self._dir.aead.decrypt(NONCE.pack(self._dir.seq), memoryview(body).cast("B"), bytes(head))
        except InvalidTag:
            raise self._forged() from None
        self._dir.advance(len(plain))
        return plain

    def open_into(self, head, body, out) -> None:
        """Decrypt a record straight into ``out`` (exactly its plaintext size): no intermediate copy."""
        try:
            if _IN_PLACE:
                self._dir.aead.decrypt_into(NONCE.pack(self._dir.seq), memoryview(body).cast("B"), bytes(head), out)
            else:  # an older cryptography: one more copy
                memoryview(out).cast("B")[:] = self._dir.aead.decrypt(NONCE.pack(self._dir.seq), bytes(body), bytes(head))
        except InvalidTag:
            raise self._forged() from None
        self._dir.advance(len(memoryview(out)))

    def _forged(self) -> SealError:
        return SealError(f"sealed record {self._dir.seq} failed authentication: altered in transit, or not "
                         "sealed with this connection's key (injected)")


def split_head(plain: bytes, reader) -> object:
    """Feed a head record's plaintext to a :class:`FrameReader`; it must be exactly a prefix and what
    that prefix announces. Returns what the reader returns (a frame without segments, or None)."""
    if len(plain) < PREFIX.size:
        raise SealError(f"sealed frame head of {len(plain)} bytes is shorter than a frame prefix")
    reader.push(plain[: PREFIX.size])
    rest = len(plain) - PREFIX.size
    if reader.needed() != rest:
        raise SealError(f"sealed frame head holds {rest} bytes after its prefix, which announces {reader.needed()}")
    return reader.push(plain[PREFIX.size :])


class SealedReader:
    """Push-style reader of a sealed byte stream (tests, the relay's view): bytes in, frames out."""

    def __init__(self, opener: Opener, frame_limits=None) -> None:
        from .frames import DEFAULT_LIMITS, FrameReader

        self.opener = opener
        self._frames = FrameReader(frame_limits or DEFAULT_LIMITS)
        self._buffer = bytearray()
        self._segment: bytearray | None = None
        self._filled = 0

    def feed(self, data: bytes) -> list:
        """Append bytes; return every frame they complete (SealError on the first bad record)."""
        self._buffer += data
        frames = []
        while len(self._buffer) >= RECORD.size:
            head = bytes(self._buffer[: RECORD.size])
            piece = None
            if self._segment is not None:
                piece = min(self.opener.record_bytes, len(self._segment) - self._filled)
            size = self.opener.check(head, piece)
            if len(self._buffer) < RECORD.size + size:
                break
            body = bytes(self._buffer[RECORD.size : RECORD.size + size])
            del self._buffer[: RECORD.size + size]
            if self._segment is None:
                frame = split_head(self.opener.open(head, body), self._frames)
            else:
                self.opener.open_into(head, body, memoryview(self._segment)[self._filled : self._filled + piece])
                self._filled += piece
                frame = None
                if self._filled == len(self._segment):
                    frame = self._frames.push(self._segment)
                    self._segment = None
            if frame is None and self._segment is None and self._frames.expecting_segment:
                self._segment, self._filled = bytearray(self._frames.needed()), 0
            if frame is not None:
                frames.append(frame)
        return frames
