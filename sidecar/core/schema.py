"""What the sidecar publishes, described: JSON Schemas and an OpenAPI document. Pure.

Every surface where a client learns state (the single GET, the list, a
webhook, the state API) shows the same object, the snapshot's
:meth:`~sidecar.core.snapshot.Snapshot.as_dict`. Its schema is generated
here from the one table of fields and statuses (``sidecar.core.snapshot``:
:data:`~sidecar.core.snapshot.FIELDS`, ``STATUSES``, ``STREAM_STATES``), so
the published description cannot drift from the code:

* :func:`snapshot_schema`: the merged object (JSON Schema draft 2020-12);
* :func:`webhook_payload` and :func:`webhook_schema`: the body of a webhook
  (Standard Webhooks' ``type`` / ``timestamp`` / ``data`` envelope);
* :func:`openapi`: an OpenAPI 3.1 document per profile, with a component
  for the profile's merged key, the list's ``Sidecar-Enriched`` header, and
  the webhook under ``webhooks``.

``sidecar schema`` prints them; ``docs/schema/`` holds them, and a test
checks that the committed files are the generated ones.
"""

from __future__ import annotations

from typing import Any

from .snapshot import ACTIVE, FIELDS, STATUSES, Snapshot, iso_time

__all__ = [
    "DIALECT",
    "ENRICHED_HEADER",
    "SNAPSHOT_ID",
    "WEBHOOK_ID",
    "openapi",
    "snapshot_schema",
    "webhook_payload",
    "webhook_schema",
    "webhook_type",
]

DIALECT = "https://json-schema.org/draft/2020-12/schema"
SNAPSHOT_ID = "urn:stream-state-sidecar:snapshot"
WEBHOOK_ID = "urn:stream-state-sidecar:webhook"
#: The list answer's header: how many of its items carry the snapshot.
ENRICHED_HEADER = "Sidecar-Enriched"
_EVENT_PREFIX = "conversation."


def _snapshot_body() -> dict[str, Any]:
    """The snapshot's schema without ``$schema`` / ``$id`` (for embedding)."""
    idle = [s for s in STATUSES if s not in ACTIVE and s != "unknown"]
    return {
        "title": "The sidecar's snapshot of one conversation",
        "description": (
            "What the sidecar has observed of one resource's work, merged into the "
            "upstream's answers under the profile's key. Only what was observed is "
            "reported: 'unknown' and a stream that is not 'live' are states. Keys the "
            "upstream's own object had under the same name are kept beside these."
        ),
        "type": "object",
        "required": [f.name for f in FIELDS],
        "properties": {f.name: {**f.schema, "description": f.meaning} for f in FIELDS},
        # While the status is known, generating follows from it; while it is
        # unknown the upstream's own value (if any) is left as it came.
        "allOf": [
            {
                "if": {"properties": {"status": {"enum": sorted(ACTIVE)}}},
                "then": {"properties": {"generating": {"const": True}}},
            },
            {
                "if": {"properties": {"status": {"enum": idle}}},
                "then": {"properties": {"generating": {"const": False}}},
            },
        ],
        "additionalProperties": True,
    }


def snapshot_schema() -> dict[str, Any]:
    """The merged object's JSON Schema (draft 2020-12)."""
    return {"$schema": DIALECT, "$id": SNAPSHOT_ID, **_snapshot_body()}


def webhook_type(status: str) -> str:
    """The event type of a transition to ``status`` (``conversation.failed``...)."""
    return _EVENT_PREFIX + status


def webhook_payload(resource_id: str, snap: Snapshot, previous: str, now: float) -> dict[str, Any]:
    """The body of the webhook for a transition to ``snap.status``.

    ``version`` is the snapshot's own: it grows with every change of the
    conversation's state, across restarts (the store keeps it) and across a
    fleet (the shared copy carries it), so a receiver can order transitions
    and drop one older than what it already holds.
    """
    return {
        "type": webhook_type(snap.status),
        "timestamp": iso_time(now),
        "data": {
            "conversation_id": resource_id,
            "previous_status": previous,
            "version": snap.version,
            "snapshot": snap.as_dict(),
        },
    }


def _webhook_body(snapshot_ref: str) -> dict[str, Any]:
    return {
        "title": "A transition of one conversation, as a webhook's body",
        "description": (
            "POSTed to each receiver configured for the new status, signed per the "
            "Standard Webhooks specification (webhook-id, webhook-timestamp, "
            "webhook-signature). Delivered at least once: a receiver may see the same "
            "webhook-id again, and should ignore a version older than one it has."
        ),
        "type": "object",
        "required": ["type", "timestamp", "data"],
        "properties": {
            "type": {
                "enum": [webhook_type(s) for s in STATUSES],
                "description": "conversation.<the new status>",
            },
            "timestamp": {
                "type": "string",
                "format": "date-time",
                "description": "when the sidecar saw the transition (ISO 8601, UTC)",
            },
            "data": {
                "type": "object",
                "required": ["conversation_id", "previous_status", "version", "snapshot"],
                "properties": {
                    "conversation_id": {
                        "type": "string",
                        "description": "the conversation's id (opencode: the session's)",
                    },
                    "previous_status": {
                        "enum": list(STATUSES),
                        "description": "the status before this transition",
                    },
                    "version": {
                        "type": "integer",
                        "minimum": 1,
                        "description": "grows with every change of the conversation's state",
                    },
                    "snapshot": {"$ref": snapshot_ref},
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    }


def webhook_schema() -> dict[str, Any]:
    """A webhook body's JSON Schema (draft 2020-12), the snapshot's embedded."""
    return {
        "$schema": DIALECT,
        "$id": WEBHOOK_ID,
        **_webhook_body("#/$defs/snapshot"),
        "$defs": {"snapshot": _snapshot_body()},
    }


def openapi(profile_name: str, key: str, version: str) -> dict[str, Any]:
    """An OpenAPI 3.1 document of what the sidecar adds in front of a profile's upstream.

    The upstream's own paths are its own to describe; this document gives the
    components a client composes with them (``allOf``): the merged key, the
    list's header, and the webhook.
    """
    ref = "#/components/schemas/SidecarSnapshot"
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": DIALECT,
        "info": {
            "title": f"sidecar in front of the {profile_name} profile's upstream",
            "version": version,
            "description": (
                f"What the sidecar adds to the upstream's answers: the snapshot under "
                f"{key!r} in the resource's GET and in each observed item of its list, "
                f"the {ENRICHED_HEADER} header of the list, and webhooks on transitions."
            ),
        },
        "components": {
            "schemas": {
                "SidecarSnapshot": _snapshot_body(),
                "SidecarEnriched": {
                    "description": (
                        f"An upstream object (the resource's GET, or an observed item of "
                        f"its list) with the snapshot under {key!r}; compose it with the "
                        f"upstream's own schema (allOf)."
                    ),
                    "type": "object",
                    "required": [key],
                    "properties": {key: {"$ref": ref}},
                },
                "SidecarWebhook": _webhook_body(ref),
            },
            "headers": {
                ENRICHED_HEADER: {
                    "description": (
                        "On the list's 2xx JSON answer: how many of its items carry the "
                        "snapshot (those the sidecar has observed). Absent when the list "
                        "was passed through without looking (too large, not JSON...)."
                    ),
                    "schema": {"type": "integer", "minimum": 0},
                }
            },
        },
        "webhooks": {
            "transition": {
                "post": {
                    "summary": "A conversation's status changed to one the receiver asked for",
                    "parameters": [
                        {
                            "name": name,
                            "in": "header",
                            "required": True,
                            "description": text,
                            "schema": {"type": "string"},
                        }
                        for name, text in (
                            ("webhook-id", "the message's id: the same on every retry"),
                            ("webhook-timestamp", "this attempt's time, seconds since the epoch"),
                            (
                                "webhook-signature",
                                "v1,<base64 HMAC-SHA256 of id.timestamp.body>, one per secret",
                            ),
                        )
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/SidecarWebhook"}
                            }
                        },
                    },
                    "responses": {
                        "2XX": {"description": "delivered: the sidecar will not send it again"},
                        "default": {
                            "description": "not delivered: tried again later, with back-off"
                        },
                    },
                }
            }
        },
    }
