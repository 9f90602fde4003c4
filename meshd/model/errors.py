"""The model layer's error: one type, so every loader's refusal reaches the user as one line."""

from __future__ import annotations


class ModelError(Exception):
    """A model that cannot be found, is outside the model folders, or does not match its preset."""
