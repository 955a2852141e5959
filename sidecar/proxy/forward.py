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

A client's own event stream is relayed as it came, but for its first event
when the profile says how to tell it (``[stream.join]``,
``sidecar.core.join``): the state as the sidecar knows it when that event
arrives, the conversation's, not the client's new session's.
"""

from __future__ import annotations

from functools import partial

from ..core.join import tell
from ..core.profile import JoinRules, Profile
from ..core.snapshot import Snapshot
from ..http.exchange import Exchange
from ..http.upstream import Upstream, read_at_most
from ..state.registry import Registry
from .bodies import SMALL_BODY, answer_field
from .relay import FirstEvent, Relay

__all__ = ["Forward"]


class Forward:
    def __init__(self, profile: Profile, registry: Registry, upstream: Upstream, relay: Relay):
        self.profile = profile
        self.registry = registry
        self.upstream = upstream
        self.relay = relay

    async def forward(
        self,
        exchange: Exchange,
        target: str,
        resource_id: str | None,
        owner: str | None = None,
        stream: bool = False,
    ) -> None:
        """``resource_id``: the resource the path is for; ``owner``: the one
        whose body a write to it may change; ``stream``: a GET of the event
        stream."""
        join = self.profile.join if stream else None
        # A shared store: its snapshot is read while the upstream answers.
        shared = self.registry.fetch_soon(resource_id) if join and resource_id else None
        try:
            upstream = await self.upstream.send(exchange, target)
        finally:
            if owner is not None:
                self.registry.write_answered(owner)  # before its client can read again
        accepted = 200 <= upstream.status < 300
        if resource_id is not None and accepted:
            # The upstream accepted this client's request for the resource
            # (gptme: the PUT that creates a conversation): observe it now.
            client = self.profile.credentials.of(exchange.headers, target)
            conv = self.registry.observe(resource_id, client)
            if exchange.method not in ("GET", "HEAD"):
                conv.changed()  # its body may have changed: served tags are stale
            if shared is not None:
                await self.registry.fetched(conv, shared)
        first_event = None
        if join is not None and accepted:
            first_event = FirstEvent(
                partial(self._tell, join, resource_id), join.max_bytes, join.max_seconds
            )
        await self.relay.relay(exchange, upstream, first_event=first_event)

    def told(self, resource_id: str, block: bytes) -> bytes | None:
        """A fanned-out stream's first event as a client is told it (None: as it came)."""
        join = self.profile.join
        return self._tell(join, resource_id, block) if join is not None else None

    def _tell(self, join: JoinRules, resource_id: str | None, block: bytes) -> bytes | None:
        """The stream's first event as the client is told it (None: as it came),
        from the snapshots as they are when it arrives."""
        conv = self.registry.get(resource_id) if resource_id is not None else None
        snap = conv.snapshot if conv is not None else None
        known: list[tuple[str, Snapshot]] = []
        if join.follow:
            if resource_id is None:  # a shared stream: every resource it carries
                known = [(c.id, c.snapshot) for c in self.registry.conversations()]
            elif snap is not None:
                known = [(resource_id, snap)]
        return tell(join, self.profile.type_field, block, snap, known)

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
