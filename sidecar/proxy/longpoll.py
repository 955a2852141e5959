"""``Prefer: wait=N`` (RFC 7240): push-like latency for a plain REST client.

A GET on an enrich target with ``Prefer: wait=N`` and an ``If-None-Match``
holding the sidecar's current tag is held until the snapshot or the
resource changes, or N seconds pass (at most ``max_wait``, and at most
``max_held`` requests at once), then answered as usual. A tag that is not
current (another body was served since, or the sidecar never served it) is
answered at once, and so is a client the upstream has not accepted for that
conversation (the caller checks it): no one can time another's state changes.
"""

from __future__ import annotations

from ..http.etags import etag_digests
from ..http.exchange import Exchange
from ..http.headers import prefer_wait
from ..state.conversation import Conversation
from ..state.registry import Registry

__all__ = ["LongPoll"]


class LongPoll:
    def __init__(self, registry: Registry, max_wait: float, max_held: int) -> None:
        self.registry = registry
        self.max_wait = max_wait
        self.max_held = max_held
        self.held = 0  # requests held now
        self.closing = False

    async def hold(self, exchange: Exchange, conv: Conversation) -> None:
        """Hold the request while its client's tag is current (see the module)."""
        if "Prefer" not in exchange.headers:
            return
        wait = prefer_wait(exchange.headers.getall("Prefer", ()))
        inm = exchange.headers.get("If-None-Match")
        if wait is None or inm is None or self.closing or self.held >= self.max_held:
            return
        current = self.registry.current_tags(conv)
        if not any(digest in current for digest in etag_digests(inm)):
            return  # the client has not seen the current body: answer now
        self.held += 1
        try:
            await conv.wait_changed(min(wait, self.max_wait))
        finally:
            self.held -= 1
