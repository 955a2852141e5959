"""Mutable state: what has been observed, kept, and shared.

Owns the conversations (``conversation``) and the registry that holds them
(``registry``: observing, bounds, events into the reducer), the evidence
timers (``evidence``), one upstream event stream each (``subscription``),
the stores snapshots outlive the process in (``store``: memory, SQLite) and
a fleet's shared store in Redis (``fleet``). The registry and the fleet talk
through the two interfaces of ``ports``; neither imports the other.

May import: ``sidecar.core``, ``sidecar.http``.
"""
