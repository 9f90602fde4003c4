"""Live readings of a node by source (NVML, the host, the links), the service that streams them, and their records."""
