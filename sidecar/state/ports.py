"""How the registry and a fleet's shared store talk, and whom they tell of transitions.

The registry (``sidecar.state.registry``) owns the conversations and their
streams; the shared store (``sidecar.state.fleet``) owns leases, revisions
and the channel. Each needs a few things of the other, named here as
protocols; neither module imports the other, and the wiring
(``sidecar.app``) hands each its counterpart: ``Registry(..., fleet=store)``
and ``await store.start(registry)``.

Both tell of each change of a conversation's status through
:class:`Transitions` (the webhooks, ``sidecar.webhooks``, implement it):
the registry, of the changes it makes alone (no shared store, or it is
down); a fleet's store, of the changes it writes to the shared copy, with
the outbox entries pushed in the same script as the write
(:class:`OutboxPush`), so each transition is queued once, by whichever
replica wrote it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from ..core.snapshot import Snapshot
from .conversation import Change, Conversation

__all__ = ["FleetHost", "OutboxPush", "SharedStore", "Transitions"]


class SharedStore(Protocol):
    """What the registry asks of a fleet's shared store."""

    #: This replica's name in leases and messages.
    replica: str
    #: Why the store cannot be used now (None: it can).
    degraded: str | None
    #: Lease values this replica holds, by stream key.
    leases: dict[str, str]
    #: Credentials of the clients served, by stream key (what a takeover opens with).
    standby: OrderedDict[str, dict[str, str]]
    #: Counters for operators (``takeovers`` is the registry's to count).
    counts: dict[str, int]

    def claim_soon(self, key: str, credentials: dict[str, str] | None) -> None: ...
    def holds(self, key: str) -> bool: ...
    def hold_back(self, key: str, change: Callable[[], object]) -> None: ...
    def believed(self, holder: str | None, key: str) -> bool: ...
    def enqueue(self, conv: Conversation, change: Change) -> None: ...
    def touch(self, resource_id: str) -> None: ...
    def alive(self, replica: str) -> bool: ...
    async def release(self, key: str) -> None: ...
    def fetch_soon(self, resource_id: str) -> asyncio.Task[Any] | None: ...
    async def snapshots(self, resource_ids: list[str]) -> dict[str, Snapshot]: ...
    async def fetched(self, conv: Conversation, task: asyncio.Task[Any]) -> None: ...
    async def written(self, changes: Iterable[asyncio.Future[None]]) -> None: ...


class FleetHost(Protocol):
    """What a fleet's shared store asks of the registry."""

    def get(self, resource_id: str) -> Conversation | None: ...
    def valid_id(self, resource_id: str) -> bool: ...
    def watching(self, key: str) -> bool: ...
    def forget_state(self, conv: Conversation, at: float) -> None: ...
    def conversations(self) -> list[Conversation]: ...
    def conversations_of(self, key: str) -> list[Conversation]: ...
    def stream_key(self, resource_id: str) -> str: ...
    def stream_keys(self) -> list[str]: ...
    def remember(self, resource_id: str) -> Conversation: ...
    def own_credentials(self) -> dict[str, str]: ...
    def take_over(self, key: str, credentials: dict[str, str], lease: str) -> bool: ...
    def lease_lost(self, key: str, follow: bool = True) -> None: ...
    def fleet_degraded(self) -> None: ...
    def adopt(
        self,
        conv: Conversation,
        base: Snapshot,
        transitions: list[dict[str, Any]],
        last_event_id: str | None,
    ) -> None: ...
    def rebased(self, conv: Conversation) -> None: ...
    def holders_checked(self) -> None: ...


@dataclass(frozen=True)
class OutboxPush:
    """Outbox entries a fleet's write pushes with the state: entry ``i`` onto
    list ``keys[i]`` (the queue of ``receivers[i]``), each list at most ``limit`` long."""

    receivers: list[str]
    keys: list[str]
    entries: list[bytes]
    limit: int


class Transitions(Protocol):
    """Who hears of each change of a conversation's status (the webhooks)."""

    def transitioned(self, resource_id: str, before: Snapshot, after: Snapshot) -> None:
        """A change made here alone (no shared store, or it is down): queued here."""
        ...

    def to_share(
        self, resource_id: str, steps: list[tuple[Snapshot, Snapshot]]
    ) -> OutboxPush | None:
        """What a fleet's write of these steps (before, after) pushes with it."""
        ...

    def shared(self, push: OutboxPush, refused: list[int]) -> None:
        """That write is in (``refused``: the 1-based entries the bound turned away)."""
        ...
