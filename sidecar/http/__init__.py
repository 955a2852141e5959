"""HTTP mechanics: messages, not meaning.

Owns the exchange abstraction (``exchange``: one request and the means to
answer it, whichever server read it), the header rules (``headers``:
hop-by-hop, forwarding, credentials and their fingerprints, preferences),
content codings (``codings``), merged ETags (``etags``), the sidecar's own
error answers (``errors``), the front door (``front``: the lean HTTP/1.1
server of the hot path), the lean upstream client (``client``), and the one
place that chooses between the two clients (``upstream``).

May import: ``sidecar.core``.
"""
