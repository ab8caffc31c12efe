"""session-sidecar: read-only answers about live agent runs, from the backend's Redis keys."""

__version__ = "0.1.0"
