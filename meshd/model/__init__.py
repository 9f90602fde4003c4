"""FLUX.2 model spans: presets, files on disk, and the modules a span of blocks needs."""
