"""What operators look at: probes, metrics, the state API and page, ``sidecar check``.

Owns the admin endpoints (``admin``), the Prometheus metrics built from the
parts' own counters at scrape time (``metrics``), and ``sidecar check``
(``check``).

May import: ``sidecar.core``, ``sidecar.http``, ``sidecar.state`` and
``sidecar.config``; never ``sidecar.proxy`` (what it reads of the request
path, it reads through the small protocols of ``metrics``).
"""
