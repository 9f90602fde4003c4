"""FLUX.2 model spans: presets, checkpoints on disk in the layouts users have, the modules a span of
blocks needs, the LoRAs they carry, and the text encoder (docs/models.md)."""
