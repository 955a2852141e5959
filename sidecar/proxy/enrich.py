"""Enrich: the snapshot merged into the upstream's answer to a resource's GET.

The pipeline, in the order a request goes through it:

1. **Hold** (``Prefer: wait``, ``sidecar.proxy.longpoll``): only for a client
   the upstream has accepted for this resource, holding its current tag.
2. **Look up the cache** (``sidecar.proxy.cache``, when on): a hit is answered
   there, merged with the snapshot as it is now; a miss says how its answer
   may be kept.
3. **Ask the upstream** with the right validators (:class:`Conditions`): the
   client's ``If-None-Match`` translated back to the upstream's tags while
   they are current (``sidecar.http.etags``), or the cache entry's own
   validator to revalidate it. With a shared store, the fleet's copy of the
   snapshot is read meanwhile.
4. **Answer**: anything but a 2xx or 304 is relayed as it came (a 401/403
   revokes this client's access) and nothing is merged into it; a 304 is
   the client's if nothing changed since it was asked for (else the upstream
   is asked once more, with no condition); a 2xx JSON body is decoded,
   merged, encoded again with its coding, tagged (:class:`Merger`), and kept
   by the cache if it may.

Only an answer the upstream gave this client is merged into, and only then
is the resource observed (its stream opened): an unauthorised client learns
nothing and costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Container, Iterator
from dataclasses import dataclass

from multidict import CIMultiDict

from ..core.credentials import Credentials
from ..core.merge import merge
from ..core.profile import Profile
from ..http.client import UpstreamResponse
from ..http.codings import decodable_accept, decode_body, encode_body, supported_encoding
from ..http.errors import UpstreamError
from ..http.etags import merged_etag, translate_if_none_match
from ..http.exchange import Exchange
from ..http.headers import is_json, relayable_reason, response_headers
from ..http.upstream import Upstream, read_at_most
from ..state.conversation import Conversation
from ..state.registry import Registry
from .cache import Cache, Fill, Merged, Rendered
from .counts import Counts
from .longpoll import LongPoll
from .relay import LARGE_ANSWER, Relay

__all__ = ["Conditions", "Enrich", "Merger", "ask_decodable"]

log = logging.getLogger("sidecar.proxy")

UNMERGED_EVERY = 60.0  # seconds between two log lines for one reason
_UNMERGED_WHY = {
    "not_json": "the upstream's answer is not JSON",
    "no_transform": "the upstream's answer says Cache-Control: no-transform",
    "encoding": "the upstream's content coding cannot be decoded here",
    "too_large": "the answer is larger than merge_limit",
    "memory": "max_merge_memory is held by answers being merged",
}


def ask_decodable(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """An answer to be merged is asked for only in codings decoded here (the
    client's ``Accept-Encoding`` among them, ``sidecar.http.codings``); a
    forwarded request keeps the client's header as it came. The cache keys
    on the client's own header, of which this is a function."""
    values = headers.getall("Accept-Encoding", ())
    if values:
        joined = ", ".join(values)
        asked = decodable_accept(joined)
        if asked is not None and asked != joined:
            headers["Accept-Encoding"] = asked
    return headers


@dataclass(frozen=True, slots=True)
class Conditions:
    """What one request upstream is conditional on, and what it was asked under."""

    #: ``Conversation.epoch`` when it was asked (None: not observed yet).
    epoch: int | None
    #: The ``If-None-Match`` sent upstream (None: none).
    if_none_match: str | None
    #: That tag is the cache entry's own validator (a revalidation).
    revalidating: bool = False

    @classmethod
    def of(
        cls,
        exchange: Exchange,
        conv: Conversation | None,
        fill: Fill | None,
        current: Container[str],
    ) -> Conditions:
        """The client's tags, translated back while ``current``; else the entry's."""
        epoch = conv.epoch if conv is not None else None
        inm = exchange.headers.get("If-None-Match")
        sent = None
        if inm is not None:
            sent = translate_if_none_match(inm, current)
        validator = fill.validator(client_tag=sent is not None) if fill is not None else None
        if validator is not None:
            return cls(epoch, validator, revalidating=True)
        return cls(epoch, sent)

    @classmethod
    def none(cls, conv: Conversation) -> Conditions:
        """Asked again with no condition: the client gets the body as it is."""
        return cls(conv.epoch, None)


class Enrich:
    def __init__(
        self,
        profile: Profile,
        registry: Registry,
        upstream: Upstream,
        relay: Relay,
        counts: Counts,
        longpoll: LongPoll,
        merger: Merger,
        cache: Cache | None,
    ) -> None:
        self.profile = profile
        self.registry = registry
        self.upstream = upstream
        self.relay = relay
        self.counts = counts
        self.longpoll = longpoll
        self.merger = merger
        self.cache = cache
        if cache is not None:
            cache.revalidator = self._revalidate

    def answer_now(self, exchange: Exchange, target: str, resource_id: str) -> Rendered | None:
        """A cache hit's answer, made at once, for a request nothing would
        hold (no ``Prefer``); None: :meth:`enrich` serves it, as any other."""
        if self.cache is None or "Prefer" in exchange.headers:
            return None
        conv = self.registry.get(resource_id)
        if conv is None:
            return None
        derived = exchange.derived
        fingerprint = derived.get("fingerprint")
        if fingerprint is None:
            client = self.profile.credentials.of(exchange.headers, target)
            fingerprint = derived["fingerprint"] = client.fingerprint
        return self.cache.hit_now(exchange, target, conv, fingerprint)

    async def enrich(self, exchange: Exchange, target: str, resource_id: str) -> None:
        client = self.profile.credentials.of(exchange.headers, target)
        fingerprint = client.fingerprint
        conv = self.registry.get(resource_id)
        if conv is not None and fingerprint in conv.authorised:
            await self.longpoll.hold(exchange, conv)
        fill: Fill | None = None
        if self.cache is not None:
            fill = await self.cache.lookup(exchange, target, conv, fingerprint)
            if fill is None:
                return  # answered from the cache
        try:
            await self._ask(exchange, target, resource_id, conv, client, fill)
        finally:
            if fill is not None:
                fill.done()

    async def _revalidate(
        self, exchange: Exchange, target: str, conv: Conversation, fill: Fill
    ) -> None:
        """A stale entry asked for again with no client waiting (``exchange``
        is ``Detached``): steps 3 and 4, whose answer only the cache keeps."""
        assert self.cache is not None
        entry = fill.entry
        client = self.profile.credentials.of(exchange.headers, target)
        try:
            await self._ask(exchange, target, conv.id, conv, client, fill)
        except UpstreamError as exc:
            self.cache.count("background", "failed")
            log.info(
                "background revalidation failed",
                extra={"resource": conv.id, "status": exc.status, "why": exc.message},
            )
            return
        if fill.stored is None:
            # Refused, an error, or not storable: the entry ages out as it is.
            reason = "not_stored"
        else:
            reason = "not_modified" if fill.stored is entry else "refreshed"
        self.cache.count("background", reason)

    async def _ask(
        self,
        exchange: Exchange,
        target: str,
        resource_id: str,
        conv: Conversation | None,
        client: Credentials,
        fill: Fill | None,
    ) -> None:
        """Steps 3 and 4 of the module's pipeline."""
        fingerprint = client.fingerprint
        headers = ask_decodable(self.upstream.headers(exchange))
        # A shared store: its snapshot is read while the upstream answers.
        shared = self.registry.fetch_soon(resource_id)
        current = self.registry.current_tags(conv) if conv is not None else ()
        asked = Conditions.of(exchange, conv, fill, current)
        upstream = await self._send(exchange, target, headers, asked, conv, fingerprint)
        if upstream is None:
            return  # relayed as it came
        conv = self.registry.observe(resource_id, client)
        if shared is not None:
            await self.registry.fetched(conv, shared)
        epoch = asked.epoch if asked.epoch is not None else conv.epoch
        if upstream.status != 304:
            if asked.revalidating and fill is not None and not fill.background:
                assert self.cache is not None
                self.cache.count("revalidated", "modified")
            await self.merger.merge(exchange, upstream, conv, epoch, fill)
            return
        if asked.revalidating:
            assert self.cache is not None and fill is not None
            if await self.cache.confirmed(exchange, conv, fill, upstream):
                return
        elif conv.epoch == epoch:
            await self.merger.not_modified(exchange, upstream, conv)
            return
        else:
            upstream.release()
        # The state changed while the upstream answered 304 (or an event came
        # after the entry it confirmed): ask again with no condition, so the
        # client gets the state as it is now.
        again = Conditions.none(conv)
        upstream = await self._send(exchange, target, headers, again, conv, fingerprint)
        if upstream is None:
            return
        conv = self.registry.observe(resource_id, client)
        assert again.epoch is not None
        if upstream.status == 304:  # to no condition: the upstream's own doing
            await self.merger.not_modified(exchange, upstream, conv)
            return
        await self.merger.merge(exchange, upstream, conv, again.epoch, fill)

    async def _send(
        self,
        exchange: Exchange,
        target: str,
        headers: CIMultiDict[str],
        asked: Conditions,
        conv: Conversation | None,
        fingerprint: str,
    ) -> UpstreamResponse | None:
        """The upstream's 2xx or 304 under ``asked``; anything else is relayed
        here as it came, and None returned."""
        if asked.if_none_match is None:
            headers.popall("If-None-Match", None)
        else:
            headers["If-None-Match"] = asked.if_none_match
        upstream = await self.upstream.send(exchange, target, headers=headers)
        if 200 <= upstream.status < 300 or upstream.status == 304:
            return upstream
        if conv is not None and upstream.status in (401, 403):
            conv.revoke(fingerprint)
        self.counts.count_merge("not_2xx")
        await self.relay.relay(exchange, upstream)
        return None


class Merger:
    """A 2xx answer decoded, merged with the snapshot, encoded again and tagged."""

    def __init__(
        self,
        *,
        key: str,
        registry: Registry,
        relay: Relay,
        counts: Counts,
        merge_limit: int,
        max_merge_memory: int,
    ) -> None:
        self.key = key
        self.registry = registry
        self.relay = relay
        self.counts = counts
        self.merge_limit = merge_limit
        self.max_merge_memory = max_merge_memory
        self._merging = 0  # bytes held by merges until their clients take them
        self._unmerged_said: dict[tuple[str, str], float] = {}  # (kind, reason): last logged

    async def not_modified(
        self, exchange: Exchange, upstream: UpstreamResponse, conv: Conversation
    ) -> None:
        headers = response_headers(upstream, exchange.version, self.relay.via)
        upstream_tag = upstream.headers.get("ETag")
        digest = self.registry.tag_digest(conv, upstream_tag, conv.snapshot, conv.epoch, None)
        headers["ETag"] = merged_etag(upstream_tag, digest)
        upstream.release()
        await exchange.respond(304, relayable_reason(upstream), headers, b"")

    async def merge(
        self,
        exchange: Exchange,
        upstream: UpstreamResponse,
        conv: Conversation,
        epoch: int,
        fill: Fill | None = None,
    ) -> None:
        if upstream.status == 204:
            self.counts.count_merge("not_2xx")  # no body to merge into: nothing to say
            await self.relay.relay(exchange, upstream)
            return
        skip = self.skip_reason(upstream)
        if skip is not None:
            self.unmerged(skip, conv.id)
            await self.relay.relay(exchange, upstream)
            return
        with self.holding(upstream, conv.id):
            encoding = upstream.headers.get("Content-Encoding", "")
            await self._merge_held(exchange, upstream, conv, epoch, encoding, fill)

    def skip_reason(self, upstream: UpstreamResponse) -> str | None:
        """Why a 2xx answer is passed without the snapshot, known from its
        headers alone (None: it can be merged into)."""
        length = upstream.content_length
        if not is_json(upstream.content_type):
            return "not_json"
        if "no-transform" in upstream.headers.get("Cache-Control", "").lower():
            return "no_transform"
        if not supported_encoding(upstream.headers.get("Content-Encoding", "")):
            return "encoding"
        if length is not None and length > self.merge_limit:
            return "too_large"
        return None

    @contextlib.contextmanager
    def holding(
        self, upstream: UpstreamResponse, resource: str, kind: str = "enrich"
    ) -> Iterator[None]:
        """Count the answer's bytes against ``max_merge_memory`` while it is
        merged and its client takes it; beyond it, a clear 503."""
        length = upstream.content_length
        held = length if length is not None else self.merge_limit
        if self._merging + held > self.max_merge_memory:
            # Merged answers are held until the client has taken them: many
            # large ones to slow clients would otherwise exhaust memory.
            upstream.close()
            self.unmerged("memory", resource, kind=kind)
            raise UpstreamError(
                503, "too many large answers are being merged at once (max_merge_memory)"
            )
        self._merging += held
        try:
            yield
        finally:
            self._merging -= held
            if held >= LARGE_ANSWER:
                self.relay.large_answers += 1

    async def _merge_held(
        self,
        exchange: Exchange,
        upstream: UpstreamResponse,
        conv: Conversation,
        epoch: int,
        encoding: str,
        fill: Fill | None,
    ) -> None:
        limit = self.merge_limit
        body = await read_at_most(upstream, limit)
        if len(body) > limit:  # a chunked body larger than the limit
            self.unmerged("too_large", conv.id)
            await self.relay.relay(exchange, upstream, first=body)
            return
        snap = conv.snapshot
        try:
            decoded = decode_body(body, encoding, limit)
            merged = merge(decoded, self.key, snap)
            out = encode_body(merged, encoding)
        except (OSError, ValueError) as exc:
            self.unmerged("invalid", conv.id, str(exc))
            await self.relay.relay(exchange, upstream, first=body)
            return
        self.counts.count_merge("merged")
        headers = response_headers(upstream, exchange.version, self.relay.via)
        headers["Content-Length"] = str(len(out))  # known: headers go out with the body
        headers.popall("Content-MD5", None)
        upstream_tag = upstream.headers.get("ETag")
        digest = self.registry.tag_digest(conv, upstream_tag, snap, epoch, len(body))
        headers["ETag"] = merged_etag(upstream_tag, digest)
        conv.remember_served(digest, epoch)
        upstream.release()
        if fill is not None:
            kept = Merged(decoded, encoding, len(body), snap, out)
            headers["Cache-Status"] = fill.status(fill.keep(upstream, exchange, headers, kept))
            del kept
        del body, decoded, merged  # only the answer is held while the client reads it
        await exchange.respond(upstream.status, relayable_reason(upstream), headers, out)

    def unmerged(
        self, reason: str, resource: str, detail: str | None = None, kind: str = "enrich"
    ) -> None:
        """A 2xx answer the client gets without the snapshot: counted, and
        said in the log once per reason (and kind: a GET, a list) per minute
        (a metric alone is easy to miss; a line per request would flood)."""
        if kind == "list":
            self.counts.count_list(reason)
        else:
            self.counts.count_merge(reason)
        now = time.monotonic()
        said = (kind, reason)
        if now - self._unmerged_said.get(said, -UNMERGED_EVERY) >= UNMERGED_EVERY:
            self._unmerged_said[said] = now
            log.warning(
                "list passed without snapshots"
                if kind == "list"
                else "answer passed without the snapshot",
                extra={
                    "reason": reason,
                    "why": detail or _UNMERGED_WHY.get(reason, reason),
                    "resource": resource,
                    "next_said_in_s": UNMERGED_EVERY,
                },
            )
