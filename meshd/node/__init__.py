"""One meshd node: the daemon (listener, admission, the op registry), its lifecycle, its GPU queue, discovery."""
