"""The meshd wire protocol without I/O: bytes and headers in, bytes, headers and errors out.

- :mod:`meshd.wire.frames`: the frame format and its incremental reader.
- :mod:`meshd.wire.handshake`: the mutual HMAC handshake, one class per side.
- :mod:`meshd.wire.seal`: per-direction AEAD records with sequence numbers and key rotation.
- :mod:`meshd.wire.session`: request ids, chunk accounting, keep-alive and cancel, per side.

Nothing here touches a socket; :mod:`meshd.wire.connection` moves the bytes. See docs/protocol.md.
"""
