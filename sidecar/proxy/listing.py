"""Lists: each item the sidecar has observed carries its snapshot, as its own GET would.

The profile's list (gptme: ``GET /api/v2/conversations``, an array, or with
``paginated=1`` on 0.35.1 an object whose ``conversations`` are the items;
opencode: ``GET /session``) goes through these steps:

1. **Ask the upstream** with no condition: ``If-None-Match`` and
   ``If-Modified-Since`` are the sidecar's to judge, since the upstream's
   ``304`` (gptme 0.35.1 tags its list) would hide states that changed.
2. **Admit** only a ``2xx`` JSON answer within the single merge's bounds
   (``merge_limit``, the codings it can decode and encode again,
   ``max_merge_memory``); anything else is relayed as it came, with no
   ``Sidecar-Enriched`` header, and counted (``sidecar_list_merges_total``).
3. **Look up** the listed ids (``list_id_field``) that match the profile's
   id pattern: this replica's snapshots, and with a shared store the fleet's
   copies of the others, in one round trip.
4. **Merge** each found snapshot into its item, under the profile's key and
   in the shape of the single GET (``sidecar.core.merge``); other items keep
   their values. ``Sidecar-Enriched: N`` says how many items were. With none,
   the upstream's bytes and tag go out as they came; otherwise the body is
   encoded again with its coding and tagged ``W/"sc-<digest of the body>"``.
   A client whose ``If-None-Match`` names the tag gets a ``304``.
5. **Observe** the ``list_observe`` most recently modified listed items
   (``list_modified_field``), when the client sent credentials: their streams
   open, so the next list shows what they do.

Who may see what: the list's ``2xx`` is the upstream's decision that this
client may see these items, and the snapshot is a summary of each item's
own work; so every listed item the sidecar observes is enriched for the
client it was listed to, whoever first opened its stream. Listing does not
authorise the client for anything else: a held ``Prefer: wait`` or a cached
answer of the item's own GET still needs that GET's own ``2xx``. A client
without credentials never starts observation (one request cannot open
``list_observe`` upstream streams for anyone who reaches the port), and the
bound is counted against ``max_subscriptions`` like every other stream.

The response cache does not apply: a list changes with every item, and no
event vouches for all of them.
"""

from __future__ import annotations

import hashlib
import logging

from multidict import CIMultiDict

from ..core.credentials import Credentials
from ..core.merge import Listed, MergeError, merge_list, read_list
from ..core.profile import Profile
from ..core.schema import ENRICHED_HEADER
from ..core.snapshot import Snapshot
from ..http.client import UpstreamResponse
from ..http.codings import decode_body, encode_body
from ..http.etags import parse_etags
from ..http.exchange import Exchange
from ..http.headers import relayable_reason, response_headers
from ..http.upstream import Upstream, read_at_most
from ..state.registry import Registry
from .counts import Counts
from .enrich import Merger, ask_decodable
from .relay import Relay

__all__ = ["Listing"]

log = logging.getLogger("sidecar.proxy")

#: Conditions the sidecar judges itself on a list (see step 1).
_CONDITIONS = ("If-None-Match", "If-Modified-Since")


class Listing:
    def __init__(
        self,
        profile: Profile,
        registry: Registry,
        upstream: Upstream,
        relay: Relay,
        counts: Counts,
        merger: Merger,
        observe: int,
    ) -> None:
        """``observe``: how many of a list's most recently modified items
        listing observes (``list_observe``; 0: none)."""
        self.profile = profile
        self.registry = registry
        self.upstream = upstream
        self.relay = relay
        self.counts = counts
        self.merger = merger
        self.observe = observe

    async def list(self, exchange: Exchange, target: str) -> None:
        headers = ask_decodable(self.upstream.headers(exchange))
        for name in _CONDITIONS:
            headers.popall(name, None)
        upstream = await self.upstream.send(exchange, target, headers=headers)
        if not 200 <= upstream.status < 300 or upstream.status == 204:
            self.counts.count_list("not_2xx")
            await self.relay.relay(exchange, upstream)
            return
        where = self.profile.list_path or target
        skip = self.merger.skip_reason(upstream)
        if skip is not None:
            self.merger.unmerged(skip, where, kind="list")
            await self.relay.relay(exchange, upstream)
            return
        with self.merger.holding(upstream, where, kind="list"):
            client = self.profile.credentials.of(exchange.headers, target)
            await self._merge(exchange, upstream, where, client)

    async def _merge(
        self, exchange: Exchange, upstream: UpstreamResponse, where: str, client: Credentials
    ) -> None:
        merger, profile = self.merger, self.profile
        limit = merger.merge_limit
        body = await read_at_most(upstream, limit)
        if len(body) > limit:  # a chunked body larger than the limit
            merger.unmerged("too_large", where, kind="list")
            await self.relay.relay(exchange, upstream, first=body)
            return
        encoding = upstream.headers.get("Content-Encoding", "")
        try:
            decoded = decode_body(body, encoding, limit)
        except (OSError, ValueError) as exc:
            merger.unmerged("invalid", where, str(exc), kind="list")
            await self.relay.relay(exchange, upstream, first=body)
            return
        try:
            listed = read_list(decoded, profile.list_items)
            snapshots = await self._snapshots(listed)
            merged, enriched = merge_list(listed, profile.key, profile.list_id_field, snapshots)
        except MergeError as exc:
            merger.unmerged("not_a_list", where, str(exc), kind="list")
            await self.relay.relay(exchange, upstream, first=body)
            return
        headers = response_headers(upstream, exchange.version, self.relay.via)
        if merged is not None:
            out = encode_body(merged, encoding)
            headers["Content-Length"] = str(len(out))
            headers.popall("Content-MD5", None)
            digest = hashlib.blake2b(merged, digest_size=8).hexdigest()
            headers["ETag"] = f'W/"sc-{digest}"'
        else:
            out = body  # nothing observed: the upstream's bytes, and its tag
        headers[ENRICHED_HEADER] = str(enriched)
        self.counts.count_list("merged" if enriched else "none", enriched)
        upstream.release()
        del body, decoded, merged
        self._observe(client, listed)
        del listed
        if _not_modified(exchange, headers):
            headers.popall("Content-Length", None)
            await exchange.respond(304, None, headers, b"")
            return
        await exchange.respond(upstream.status, relayable_reason(upstream), headers, out)

    async def _snapshots(self, listed: Listed) -> dict[str, Snapshot]:
        """The snapshots of the listed ids: this replica's, then the fleet's."""
        profile, registry = self.profile, self.registry
        found: dict[str, Snapshot] = {}
        missing: list[str] = []
        for resource_id in listed.ids(profile.list_id_field):
            if resource_id is None or resource_id in found or not profile.valid_id(resource_id):
                continue
            conv = registry.get(resource_id)
            if conv is not None:
                found[resource_id] = conv.snapshot
            else:
                missing.append(resource_id)
        if missing:
            found.update(await registry.shared_snapshots(missing))
        return found

    def _observe(self, client: Credentials, listed: Listed) -> None:
        """Step 5 of the module's pipeline."""
        if self.observe <= 0 or not (client or client.query):
            return
        profile = self.profile
        newest = listed.newest(profile.list_id_field, profile.list_modified_field, self.observe)
        for resource_id in newest:
            if profile.valid_id(resource_id):
                self.registry.observe(resource_id, client, authorise=False)


def _not_modified(exchange: Exchange, headers: CIMultiDict[str]) -> bool:
    """The client's ``If-None-Match`` names the answer's tag (weak comparison)."""
    inm = exchange.headers.get("If-None-Match")
    tag = headers.get("ETag")
    if inm is None or tag is None:
        return False
    if inm.strip() == "*":
        return True
    ours = tag.removeprefix("W/")
    return any(quoted == ours for _, quoted in parse_etags(inm))
