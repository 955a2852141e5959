"""Webhooks: each transition of a conversation's status, POSTed to the receivers that asked.

Owns the receivers as configured (``receivers``), the Standard Webhooks
signature (``signing``), the outbox the transitions wait in until they are
delivered (``outbox``: memory, the SQLite file of the store; ``redis_outbox``:
a fleet's, delivered by one replica under a lease), and the delivery itself
(``delivery``: one queue and one task per receiver, retries with back-off).

The registry tells this wing of every transition through
``sidecar.state.ports.Transitions`` (and a fleet's shared store, of the
transitions it writes); nothing in ``sidecar.state`` imports it.

May import: ``sidecar.core``, ``sidecar.http``, ``sidecar.state``.
"""
