"""Triggers: requests that start or steer work (gptme's ``POST .../step``, opencode's
``POST /session/{id}/prompt_async``).

In order:

1. If the upstream has let this client see the resource before, its stream
   is made live first (up to ``trigger_wait``), so no event of the work this
   starts can be missed.
2. A small body is read whole (and forwarded exactly as received): it may
   name the client's session, or the tool a confirm skips.
3. The reducer's token is taken *before* the request goes upstream: events
   are the truth, and an answer that arrives after events of its own work
   must not undo them (``sidecar.core.reducer``).
   In a fleet the trigger is then noted in the shared store as forwarded,
   and the request goes once the note is written (up to ``store_timeout``):
   if this replica is lost before the answer, the one taking the stream over
   judges the step by the evidence rules (``sidecar.state.evidence``),
   rather than nobody knowing it ran. The answer clears the note.
4. The answer: a 2xx applies the trigger's ``on_accept`` rules (``starting``
   at once, so the next GET says ``generating: true``); a 5xx carrying an
   error (gptme 0.35.1's early failure) fails the work with it; a 401/403
   revokes this client's access. With a shared store, the client's answer
   waits until the change is in it, so the next GET on any replica sees it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..core import reducer
from ..core.profile import Profile, Trigger
from ..http.exchange import WebExchange
from ..http.upstream import Upstream
from ..state.registry import Registry
from .bodies import SMALL_BODY, answer_field, json_field, json_object, read_small
from .relay import Relay

__all__ = ["Triggers"]

log = logging.getLogger("sidecar.proxy")


class Triggers:
    def __init__(
        self,
        profile: Profile,
        registry: Registry,
        upstream: Upstream,
        relay: Relay,
        *,
        trigger_wait: float,
        body_timeout: float,
    ) -> None:
        self.profile = profile
        self.registry = registry
        self.upstream = upstream
        self.relay = relay
        self.trigger_wait = trigger_wait
        self.body_timeout = body_timeout

    async def trigger(
        self, exchange: WebExchange, target: str, trigger: Trigger, resource_id: str
    ) -> None:
        request = exchange.request
        registry = self.registry
        client = self.profile.credentials.of(request.headers, target)
        conv = registry.get(resource_id)
        if conv is not None and client.fingerprint in conv.authorised:
            # Known to the upstream for this client: make its stream live
            # first, so no event of the work this starts can be missed.
            conv = registry.observe(resource_id, client)
            if not await registry.ensure_live(conv, self.trigger_wait):
                log.warning(
                    "trigger forwarded before its stream was live",
                    extra={"resource": resource_id, "stream": conv.snapshot.stream},
                )
        else:
            conv = None  # observed only once the upstream accepts the request
        data = None
        body: dict[str, Any] = {}
        length = request.content_length
        if request.body_exists and length is not None and length <= SMALL_BODY:
            try:
                async with asyncio.timeout(self.body_timeout):
                    data = await request.read()  # forwarded exactly as received
            except TimeoutError:
                raise self.upstream.stalled() from None
            body = json_object(data)
        token = reducer.trigger_token(conv.snapshot) if conv is not None else None
        forwarded = None
        if conv is not None:
            noted = registry.forwarding(conv, trigger)
            if noted is not None:
                forwarded, done = noted
                if done is not None:
                    await registry.written(done)
        try:
            upstream = await self.upstream.send(exchange, target, data=data)
        except BaseException:
            if forwarded is not None and conv is not None:
                registry.answered(conv, forwarded)  # alive: its stream tells the rest
            raise
        finally:
            registry.write_answered(resource_id)  # a step may write to it at once
        if forwarded is not None and conv is not None and not 200 <= upstream.status < 300:
            registry.answered(conv, forwarded)
        if 200 <= upstream.status < 300:
            conv = registry.observe(resource_id, client)
            session_id = json_field(body, trigger.session_field)
            if session_id is not None and not self.profile.id_is_session:
                registry.update(conv, lambda s: reducer.learn_session(s, session_id))
            if token is None:
                token = reducer.trigger_token(conv.snapshot)
            written = registry.accept_trigger(conv, token, trigger, body, forwarded)
            if written is not None:
                # A shared store: the answer goes once every replica's next
                # read sees the step (or store_timeout has passed).
                await registry.written(written)
        elif upstream.status >= 500 and trigger.error_field and conv is not None:
            answer = await read_small(upstream)
            if answer is not None:
                error = answer_field(upstream, answer, trigger.error_field)
                if error is not None:
                    assert token is not None
                    now, seq = time.time(), token
                    failed = registry.update(
                        conv, lambda s: reducer.fail_trigger(s, seq, error, now)
                    )
                    if failed is not None:
                        await registry.written(failed)
                await self.relay.relay(exchange, upstream, first=answer)
                return
        elif conv is not None and upstream.status in (401, 403):
            conv.revoke(client.fingerprint)
        await self.relay.relay(exchange, upstream)
