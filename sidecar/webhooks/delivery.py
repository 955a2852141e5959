"""Delivery: each transition to a receiver's statuses, POSTed, signed, retried, in order.

Theory of operation
-------------------
:class:`Deliveries` is what the registry and a fleet's store tell of
transitions (``sidecar.state.ports.Transitions``). A transition to a status
some receiver asked for becomes one :class:`~sidecar.webhooks.outbox.Entry`:
its ``webhook-id`` (random, made once: the same on every retry and every
replica) and its body, the conversation's id, the snapshot as its GET
merges it, the previous status and the snapshot's version
(``sidecar.core.schema.webhook_payload``). The entry goes into each such
receiver's queue of the outbox; nothing waits on the network there.

Each receiver has its own :class:`Courier`: one task, one HTTP connection
pool, one queue. It delivers the head of its queue, and only then the next,
so a receiver gets each conversation's transitions in order. A delivery is a
``POST`` of the body with the Standard Webhooks headers
(``sidecar.webhooks.signing``: signed anew at each attempt), bounded by
``webhook_timeout``; a ``2xx`` is delivered, anything else (a redirect too:
the URL is the operator's, and it is not followed) is tried again after a
delay drawn at random between 0 and ``min(webhook_retry_max,
webhook_retry_min * 2**attempt)`` (exponential back-off, full jitter), until
the entry is older than ``webhook_max_age``: then it is dropped, counted
(``expired``) and said in the log. A receiver that is down, slow or failing
therefore holds only its own queue: never the proxy, never another receiver.

Everything a courier did is counted per receiver and result (the metrics
``sidecar_webhook_*``) and shown by the state API (``/_sidecar/webhooks``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from ..core.histogram import DELIVERY_BUCKETS, Histogram
from ..core.schema import webhook_payload
from ..core.snapshot import STATUSES, Snapshot, iso_time
from ..state.ports import OutboxPush
from .outbox import MAX_ENTRY, Entry, Outbox
from .receivers import Receiver, WebhookSettings
from .redis_outbox import RedisOutbox
from .signing import Secrets, signature

__all__ = ["Courier", "Deliveries"]

log = logging.getLogger("sidecar.webhooks")

#: The bytes of a receiver's answer read (then it is closed): it is not used.
ANSWER_READ = 64 * 1024
#: How long an idle courier waits before it looks again (a put wakes it at once).
IDLE_WAIT = 1.0


def _new_id() -> str:
    return "msg_" + secrets.token_hex(16)


@dataclass
class InHand:
    """The entry a courier is delivering, and how that goes."""

    entry: Entry
    attempts: int = 0
    next_at: float | None = None
    last_result: str | None = None
    last_error: str | None = None


class Courier:
    """One receiver's delivery: one task, its own connections, its queue in order."""

    def __init__(
        self,
        receiver: Receiver,
        secrets_file: Secrets,
        outbox: Outbox,
        settings: WebhookSettings,
        user_agent: str,
    ) -> None:
        self.receiver = receiver
        self.secrets = secrets_file
        self.outbox = outbox
        self.settings = settings
        self.user_agent = user_agent
        #: Entries by result: delivered, expired (refused and invalid are the outbox's).
        self.results: Counter[str] = Counter()
        #: Attempts by outcome: 2xx, 3xx, 4xx, 5xx, timeout, error.
        self.attempts: Counter[str] = Counter()
        #: From the transition to its delivery, seconds.
        self.latency = Histogram(DELIVERY_BUCKETS)
        self.in_hand: InHand | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.receiver.name

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=4, keepalive_timeout=30),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"sidecar-webhook-{self.name}"
        )

    async def close(self) -> None:
        """Stop: an entry in hand stays in the outbox (sent again, same id)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        name, outbox = self.name, self.outbox
        while True:
            try:
                entry = await outbox.head(name)
                if entry is None:
                    await outbox.wait(name, IDLE_WAIT)
                    continue
                await self._deliver(entry)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end this receiver's deliveries
                log.exception("webhook courier failed", extra={"receiver": name})
                await asyncio.sleep(IDLE_WAIT)

    async def _deliver(self, entry: Entry) -> None:
        settings, outbox, name = self.settings, self.outbox, self.name
        hand = self.in_hand = InHand(entry)
        try:
            while True:
                age = time.time() - entry.created
                if age > settings.webhook_max_age:
                    self.results["expired"] += 1
                    log.warning(
                        "webhook dropped: not delivered within webhook_max_age",
                        extra={
                            "receiver": name,
                            "webhook_id": entry.id,
                            "resource": entry.conversation,
                            "status": entry.status,
                            "attempts": hand.attempts,
                            "last_error": hand.last_error,
                        },
                    )
                    await outbox.done(name, entry)
                    return
                outcome, error = await self._post(entry)
                hand.attempts += 1
                hand.last_result, hand.last_error = outcome, error
                self.attempts[outcome] += 1
                if outcome == "2xx":
                    self.results["delivered"] += 1
                    self.latency.observe(max(0.0, time.time() - entry.created))
                    await outbox.done(name, entry)
                    return
                cap = settings.webhook_retry_min * 2 ** min(hand.attempts - 1, 62)
                delay = random.uniform(0, min(settings.webhook_retry_max, cap))
                delay = min(delay, max(0.0, settings.webhook_max_age - age) + 0.01)
                hand.next_at = time.time() + delay
                if hand.attempts == 1 or hand.attempts % 10 == 0:
                    log.info(
                        "webhook not delivered: trying again",
                        extra={
                            "receiver": name,
                            "webhook_id": entry.id,
                            "attempts": hand.attempts,
                            "error": error,
                            "delay_s": round(delay, 3),
                        },
                    )
                await asyncio.sleep(delay)
                if not outbox.delivers(name):
                    return  # another replica delivers this receiver now (it has the entry)
        finally:
            self.in_hand = None

    async def _post(self, entry: Entry) -> tuple[str, str | None]:
        """One attempt: its outcome (2xx, 3xx, 4xx, 5xx, timeout, error) and why."""
        assert self._session is not None
        now = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": self.user_agent,
            "webhook-id": entry.id,
            "webhook-timestamp": str(now),
            "webhook-signature": signature(entry.id, now, entry.body, self.secrets.current()),
        }
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout)
        try:
            async with self._session.post(
                self.receiver.url,
                data=entry.body,
                headers=headers,
                allow_redirects=False,
                timeout=timeout,
            ) as resp:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    await resp.content.read(ANSWER_READ)
                status = resp.status
        except TimeoutError:
            return (
                "timeout",
                f"no answer within webhook_timeout ({self.settings.webhook_timeout:g} s)",
            )
        except (aiohttp.ClientError, OSError) as exc:
            return "error", f"{type(exc).__name__}: {exc}"
        kind = f"{status // 100}xx" if 200 <= status < 600 else "error"
        return kind, None if kind == "2xx" else f"HTTP {status}"

    def state(self) -> dict[str, Any]:
        """This receiver as the state API shows it."""
        outbox, name = self.outbox, self.name
        pending = outbox.pending(name)
        hand = self.in_hand
        oldest = min((e.created for e in pending), default=None)
        return {
            "name": name,
            "url": self.receiver.shown_url,
            "statuses": [s for s in STATUSES if s in self.receiver.statuses],
            "delivering_here": outbox.delivers(name),
            "pending": outbox.count(name),
            "oldest_pending_s": round(time.time() - oldest, 3) if oldest is not None else None,
            "in_hand": None
            if hand is None
            else {
                "webhook_id": hand.entry.id,
                "conversation": hand.entry.conversation,
                "status": hand.entry.status,
                "attempts": hand.attempts,
                "last_result": hand.last_result,
                "last_error": hand.last_error,
                "next_attempt_at": iso_time(hand.next_at),
            },
            "queue": [
                {
                    "webhook_id": e.id,
                    "conversation": e.conversation,
                    "status": e.status,
                    "at": iso_time(e.created),
                }
                for e in pending[:20]
            ],
            "results": {
                **dict(self.results),
                "refused": outbox.dropped[(name, "refused")],
                "invalid": outbox.dropped[(name, "invalid")],
            },
            "attempts": dict(self.attempts),
        }


class Deliveries:
    """Every receiver's courier, and the transitions they are given (see the module's text)."""

    def __init__(self, settings: WebhookSettings, outbox: Outbox, user_agent: str) -> None:
        """Raises ``SecretError`` if a receiver's secret file cannot be used."""
        self.settings = settings
        self.outbox = outbox
        self.couriers = {
            r.name: Courier(r, Secrets(r.secret_file), outbox, settings, user_agent)
            for r in settings.receivers
        }
        #: Per status, the receivers that asked for it.
        self._wanted: dict[str, list[str]] = {
            status: [r.name for r in settings.receivers if status in r.statuses]
            for status in STATUSES
        }

    # ------------------------------------------------- from the registry
    def _entry(self, resource_id: str, before: Snapshot, after: Snapshot) -> Entry | None:
        now = time.time()
        at = after.updated_at if after.updated_at is not None else now
        body = orjson.dumps(webhook_payload(resource_id, after, before.status, at))
        if len(body) > MAX_ENTRY:
            for name in self._wanted[after.status]:
                self.outbox.refused(name, why="too_large")
            return None
        return Entry(_new_id(), resource_id, after.status, at, body)

    def transitioned(self, resource_id: str, before: Snapshot, after: Snapshot) -> None:
        names = self._wanted.get(after.status)
        if not names or after.status == before.status:
            return
        entry = self._entry(resource_id, before, after)
        if entry is None:
            return
        for name in names:
            self.outbox.put(name, entry)

    def to_share(
        self, resource_id: str, steps: list[tuple[Snapshot, Snapshot]]
    ) -> OutboxPush | None:
        outbox = self.outbox
        if not isinstance(outbox, RedisOutbox):
            return None
        queued: list[tuple[str, Entry]] = []
        for before, after in steps:
            names = self._wanted.get(after.status)
            if not names or after.status == before.status:
                continue
            entry = self._entry(resource_id, before, after)
            if entry is not None:
                queued += [(name, entry) for name in names]
        return outbox.share(queued) if queued else None

    def shared(self, push: OutboxPush, refused: list[int]) -> None:
        if isinstance(self.outbox, RedisOutbox):
            self.outbox.shared(push, refused)

    # ----------------------------------------------------------- lifetime
    async def start(self) -> None:
        await self.outbox.start()
        for courier in self.couriers.values():
            courier.start()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.couriers.values()))
        await self.outbox.close()

    def state(self) -> dict[str, Any]:
        return {
            "outbox": {"kind": self.outbox.kind, "degraded": self.outbox.degraded},
            "receivers": [c.state() for c in self.couriers.values()],
        }
