"""The handshake, sans I/O: each side is fed the peer's frame headers and answers with the next one.

::

    client -> server  hello      {proto, nonce_c, insecure, ...}
    server -> client  challenge  {proto, nonce_s, proof_s}
    client -> server  proof      {proof_c}
    server -> client  welcome    {node}       (sealed: the first record of the server's direction)

The MACs are those of :mod:`meshd.auth`, over a :class:`Transcript` of the handshake as TLS 1.3
binds its own: the hello and the challenge frames byte for byte as they travel (the challenge's
proof covers the challenge with those 32 bytes zeroed; the client's proof and the session keys
cover it whole). Every field sent in clear before keys exist (``proto``, ``node``, ``daemon``,
``insecure``, the nonces) is thereby authenticated: an on-path rewrite makes the other side's MAC
check fail, and the connection ends naming the handshake. Pre-auth frames are read in the one
canonical encoding only (``PREAUTH_LIMITS``), so re-encoding a received header gives back the very
bytes that arrived. Each nonce is the public half of a fresh X25519 key (32 bytes that are as
unpredictable as random ones), so the MACs also authenticate an ephemeral key exchange. Once the
client has checked the server's proof, and the server the client's, both know
:func:`meshd.wire.seal.session_keys` (cluster key + the X25519 secret: forward secrecy, salted
with the transcript); everything after ``proof`` is sealed. A refusal (wrong key, wrong version,
a malformed hello) is a :class:`MeshError` whose code and message the server sends back unsealed
before it closes.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .. import auth, limits
from ..errors import MeshError
from .frames import frame_bytes
from .seal import SessionKeys, session_keys

#: What an on-path rewrite of the handshake looks like from either side: the MAC over the transcript fails.
_ALTERED = "or the handshake was altered on the way (its hello or challenge rewritten)"


class Transcript:
    """The running SHA-256 of the handshake's frames, each as the bytes that carry it on the wire."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256(b"meshd 2 handshake\0")

    def add(self, header: dict) -> None:
        """Add one header-only frame (length-prefixed, so no two transcripts run into each other)."""
        data = frame_bytes(header)
        self._hash.update(len(data).to_bytes(4, "little") + data)

    def digest(self, *more: dict) -> bytes:
        """The hash so far, with ``more`` frames added to a copy (the running one is unchanged)."""
        fork = Transcript()
        fork._hash = self._hash.copy()
        for header in more:
            fork.add(header)
        return fork._hash.digest()


def _unproven(challenge: dict) -> dict:
    """The challenge as its own proof covers it: the proof's bytes zeroed, every other byte as sent."""
    return {**challenge, "proof": bytes(auth.PROOF_BYTES)}


def _ephemeral() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key and its public half, which serves as the handshake nonce."""
    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _shared(private: X25519PrivateKey, their_nonce: bytes, peer: str) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(their_nonce))
    except ValueError:  # a low-order point: only a key holder gets this far, and it is refused
        raise MeshError("protocol", "the peer's nonce is not a usable X25519 key", peer=peer) from None


class ClientHandshake:
    """The client's half: :meth:`hello`, then :meth:`on_challenge` -> proof, then :meth:`on_welcome`."""

    def __init__(self, key: bytes | None, fields: dict | None = None, peer: str = "") -> None:
        self.key = key
        self.peer = peer
        self.fields = fields or {}
        self._private, self.nonce = _ephemeral()
        #: The session's keys once the server has proven the cluster key (None when insecure).
        self.keys: SessionKeys | None = None
        self._transcript: Transcript | None = None

    def hello(self) -> dict:
        """The first frame's header (the transcript starts with it: send exactly this)."""
        hello = {"op": "hello", "proto": limits.PROTOCOL_VERSION, "nonce": self.nonce,
                 "insecure": self.key is None, **self.fields}
        self._transcript = Transcript()
        self._transcript.add(hello)
        return hello

    def on_challenge(self, header: dict) -> dict:
        """Check the server's proof; return our proof."""
        self._refused(header, "challenge")
        if self.key is None:
            return {"op": "proof", "proof": b""}
        if self._transcript is None:
            raise MeshError("protocol", "a challenge arrived before our hello was sent", peer=self.peer)
        try:
            nonce_s = auth.check_nonce(header.get("nonce"), self.peer)
        except auth.AuthError as exc:
            raise MeshError("auth", str(exc), peer=self.peer) from None
        expected = auth.server_proof(self.key, self._transcript.digest(_unproven(header)))
        if not auth.verify(expected, header.get("proof")):  # not bytes, or another length: False
            raise MeshError("auth", f"handshake failed: either the server does not hold our cluster key (wrong key "
                                    f"file?), {_ALTERED}", peer=self.peer)
        transcript = self._transcript.digest(header)
        self.keys = session_keys(self.key, transcript, _shared(self._private, nonce_s, self.peer), client=True)
        return {"op": "proof", "proof": auth.client_proof(self.key, transcript)}

    def on_welcome(self, header: dict) -> dict:
        """The server's node info."""
        self._refused(header, "welcome")
        node = header.get("node")
        return node if isinstance(node, dict) else {}

    def _refused(self, header: dict, expected: str) -> None:
        op = header.get("op")
        if op == "error":
            raise MeshError.from_wire(header, self.peer)
        if op != expected:
            raise MeshError("protocol", f"expected {expected}, got {str(op)[:32]!r}", peer=self.peer)


class ServerHandshake:
    """The server's half: :meth:`on_hello` -> challenge, then :meth:`on_proof`; then ``keys``."""

    def __init__(self, key: bytes | None, peer: str = "") -> None:
        self.key = key
        self.peer = peer
        self.hello: dict = {}
        self.keys: SessionKeys | None = None
        self._nonce_c = b""
        self._private: X25519PrivateKey | None = None
        self._transcript = b""  # the hash of hello and challenge, once the challenge is made

    def _refuse(self, code: str, message: str) -> MeshError:
        return MeshError(code, message, peer=self.peer)

    def on_hello(self, header: dict) -> dict:
        """Check the hello; return the challenge (or raise the refusal to send back)."""
        op = header.get("op")
        if op != "hello":
            raise self._refuse("protocol", f"expected hello, got {str(op)[:32]!r}")
        proto = header.get("proto")
        if proto != limits.PROTOCOL_VERSION:
            upgrade = (" (protocol 2 seals every frame)" if isinstance(proto, int) and proto < limits.PROTOCOL_VERSION
                       else "")
            raise self._refuse("version", f"client speaks meshd protocol {proto!r:.16}; this daemon speaks "
                                          f"{limits.PROTOCOL_VERSION}{upgrade}: upgrade meshd on the older side")
        self.hello = header
        if self.key is None:
            return {"op": "challenge", "proto": limits.PROTOCOL_VERSION, "insecure": True}
        if header.get("insecure"):
            raise self._refuse("auth", "this daemon requires the cluster key; the client connected without one")
        try:
            self._nonce_c = auth.check_nonce(header.get("nonce"), self.peer)
        except auth.AuthError as exc:
            raise self._refuse("protocol", str(exc)) from None
        self._private, nonce_s = _ephemeral()
        transcript = Transcript()
        transcript.add(header)  # as it arrived: PREAUTH_LIMITS admits only the encoding we re-create
        challenge = _unproven({"op": "challenge", "proto": limits.PROTOCOL_VERSION, "nonce": nonce_s})
        challenge["proof"] = auth.server_proof(self.key, transcript.digest(challenge))
        self._transcript = transcript.digest(challenge)
        return challenge

    def on_proof(self, header: dict) -> None:
        """Check the client's proof; afterwards ``keys`` seal the session (None when insecure)."""
        if self.key is None:
            return
        if not self._transcript:
            raise self._refuse("protocol", "a proof arrived before the hello")
        if header.get("op") != "proof" or not auth.verify(auth.client_proof(self.key, self._transcript),
                                                          header.get("proof")):
            raise self._refuse("auth", f"handshake failed: either the client does not hold this cluster's key, "
                                       f"{_ALTERED}")
        self.keys = session_keys(self.key, self._transcript, _shared(self._private, self._nonce_c, self.peer),
                                 client=False)
