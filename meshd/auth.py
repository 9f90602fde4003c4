"""Cluster keys and the mutual HMAC challenge-response every connection starts with.

Handshake (each line one small frame, read under the pre-auth size cap)::

    client -> server  hello      {proto, nonce_c, ...}
    server -> client  challenge  {proto, nonce_s, proof_s = HMAC(key, "meshd server" | proto | H(hello, challenge'))}
    client -> server  proof      {proof_c = HMAC(key, "meshd client" | proto | H(hello, challenge))}
    server -> client  welcome    {node info}      or an error, then close

``H`` is the transcript hash of meshd.wire.handshake: the hello and the challenge frames byte for
byte as sent (``challenge'`` with its proof's bytes zeroed), so nothing sent before the keys exist
can be rewritten on the way unnoticed. Both sides prove knowledge of the key over fresh nonces; the
labels stop a proof from being reflected back, and MACs are compared in constant time. Nothing but
``hello``/``proof`` is read from an unauthenticated peer. Like CPython's ``multiprocessing.connection``,
minus the pickles.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from .limits import PROTOCOL_VERSION

KEY_BYTES = 32
NONCE_BYTES = 32
_DIGEST = "sha256"


class AuthError(Exception):
    """Authentication failed: wrong or missing key, or a peer that did not follow the handshake."""


def generate_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def write_key(path: Path, key: bytes, *, force: bool = False) -> None:
    """Write ``key`` as hex, readable by its owner only. Refuses to overwrite unless ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to replace the cluster key")
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (
            "# flux-mesh cluster key: the same file on every box of one cluster. Keep it secret.\n"
            + key.hex() + "\n"
        ).encode())
    finally:
        os.close(fd)


def read_key(path: Path) -> bytes:
    """Read a key file written by ``meshd keygen`` (hex, '#' comments allowed)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise AuthError(f"cluster key file {path} does not exist (make one with: meshd keygen --out {path})") from None
    except PermissionError:
        raise AuthError(f"cluster key file {path} is not readable by this user") from None
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) != 1:
        raise AuthError(f"cluster key file {path} must hold one line of hex")
    try:
        key = bytes.fromhex(lines[0])
    except ValueError:
        raise AuthError(f"cluster key file {path} is not hex") from None
    if len(key) < 16:
        raise AuthError(f"cluster key in {path} is only {len(key)} bytes; use meshd keygen (32 bytes)")
    return key


def key_is_private(path: Path) -> bool:
    """True when the key file is not readable by group or others."""
    return not (Path(path).stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def fingerprint(key: bytes) -> str:
    """A short, non-secret name of the key (in mDNS TXT records, so peers can tell clusters apart)."""
    return hashlib.sha256(b"flux-mesh key fingerprint\0" + key).hexdigest()[:16]


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


#: Length of a proof (an HMAC-SHA256).
PROOF_BYTES = 32


def _mac(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, label + PROTOCOL_VERSION.to_bytes(2, "little") + transcript, _DIGEST).digest()


def server_proof(key: bytes, transcript: bytes) -> bytes:
    """The server's proof over the transcript hash of the hello and its challenge (proof zeroed)."""
    return _mac(key, b"meshd server\0", transcript)


def client_proof(key: bytes, transcript: bytes) -> bytes:
    """The client's proof over the transcript hash of the hello and the whole challenge."""
    return _mac(key, b"meshd client\0", transcript)


def verify(expected: bytes, received: object) -> bool:
    return isinstance(received, bytes) and hmac.compare_digest(expected, received)


def check_nonce(value: object, who: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != NONCE_BYTES:
        raise AuthError(f"{who} sent a malformed nonce")
    return value
