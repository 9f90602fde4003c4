"""Small versions of the benchmark fixtures (bench/fixtures.py) for fast tests."""

from bench.fixtures import noise_stream as _noise
from bench.fixtures import structured_stream as _structured


def structured_stream(tokens_h: int = 16, tokens_w: int = 16, prefix: int = 32, channels: int = 64, outliers: int = 2,
                      seed: int = 0, **kw):
    return _structured(tokens_h, tokens_w, prefix, channels, outliers, seed, **kw)


def noise_stream(tokens: int = 288, channels: int = 64, seed: int = 1, **kw):
    return _noise(tokens, channels, seed, **kw)
