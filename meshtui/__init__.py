"""meshtui: the flux-mesh terminal dashboard and the headless ``meshtui generate`` command."""

__version__ = "0.1.0"
