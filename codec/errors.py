"""The one exception type the codec raises for bad input or an unusable backend."""


class CodecError(ValueError):
    """Bad encoded input, an unknown codec or dtype, an absurd size, or a backend that cannot run.

    The message names the cause; the codec never crashes or allocates on input it rejects.
    """


class CodecUnavailable(CodecError):
    """The codec is valid but this host cannot run it (no NVENC, no PyAV, ...)."""
