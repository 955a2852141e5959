"""sidecar: a reverse proxy that makes a stream-first server's events readable as state."""

__version__ = "0.1.0"
