"""meshd: the flux-mesh daemon. It hosts a span of FLUX.2 blocks and serves authenticated requests."""

__version__ = "0.1.0"
