"""Requests the sidecar only forwards: everything but enrich, triggers and WebSocket.

They go upstream as they came and their answers come back as they came
(``sidecar.proxy.relay``). What the sidecar learns on the way:

* a 2xx for one of a resource's paths (gptme: the ``PUT`` that creates a
  conversation, a client's own event stream) makes it observed; a write
  (not GET/HEAD) also makes the tags served for it stale;
* a write to one of its paths, or below its enrich path, answered with any
  status, means no body fetched before may be reused (the response cache);
* a create (opencode's ``POST /session``) names the new resource in its
  answer, which is observed at once, so its stream is live before the first
  prompt.
"""

from __future__ import annotations

from ..core.profile import Profile
from ..http.exchange import Exchange
from ..http.upstream import Upstream, read_at_most
from ..state.registry import Registry
from .bodies import SMALL_BODY, answer_field
from .relay import Relay

__all__ = ["Forward"]


class Forward:
    def __init__(self, profile: Profile, registry: Registry, upstream: Upstream, relay: Relay):
        self.profile = profile
        self.registry = registry
        self.upstream = upstream
        self.relay = relay

    async def forward(
        self, exchange: Exchange, target: str, resource_id: str | None, owner: str | None = None
    ) -> None:
        """``resource_id``: the resource the path is for; ``owner``: the one
        whose body a write to it may change."""
        try:
            upstream = await self.upstream.send(exchange, target)
        finally:
            if owner is not None:
                self.registry.write_answered(owner)  # before its client can read again
        if resource_id is not None and 200 <= upstream.status < 300:
            # The upstream accepted this client's request for the resource
            # (gptme: the PUT that creates a conversation): observe it now.
            client = self.profile.credentials.of(exchange.headers, target)
            conv = self.registry.observe(resource_id, client)
            if exchange.method not in ("GET", "HEAD"):
                conv.changed()  # its body may have changed: served tags are stale
        await self.relay.relay(exchange, upstream)

    async def create(self, exchange: Exchange, target: str) -> None:
        """A request that creates a resource (opencode's ``POST /session``):
        the upstream's answer names it, and the sidecar observes it at once."""
        upstream = await self.upstream.send(exchange, target)
        if not 200 <= upstream.status < 300:
            await self.relay.relay(exchange, upstream)
            return
        answer = await read_at_most(upstream, SMALL_BODY)
        if len(answer) <= SMALL_BODY:
            created = answer_field(upstream, answer, self.profile.create_id_field)
            if created is not None and self.profile.valid_id(created):
                self.registry.observe(
                    created, self.profile.credentials.of(exchange.headers, target)
                )
        await self.relay.relay(exchange, upstream, first=answer)
