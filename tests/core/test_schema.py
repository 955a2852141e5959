"""The published schema: generated from the one table, committed, and true of what is served."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.cli import schema_text
from sidecar.core import merge, schema
from sidecar.core.snapshot import FIELDS, STATUSES, STREAM_STATES, Snapshot

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "schema"
SNAPSHOT = jsonschema.Draft202012Validator(schema.snapshot_schema())
WEBHOOK = jsonschema.Draft202012Validator(schema.webhook_schema())


@pytest.mark.parametrize(
    ("name", "webhook", "profile"),
    [
        ("snapshot.schema.json", False, None),
        ("webhook.schema.json", True, None),
        ("openapi-gptme.json", False, "gptme"),
        ("openapi-opencode.json", False, "opencode"),
    ],
)
def test_the_committed_schema_is_the_generated_one(
    name: str, webhook: bool, profile: str | None
) -> None:
    assert (DOCS / name).read_text(encoding="utf-8") == schema_text(webhook, profile), (
        f"docs/schema/{name} is out of date: `sidecar schema` regenerates it (docs/schema.md)"
    )


def test_the_schemas_are_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(schema.snapshot_schema())
    jsonschema.Draft202012Validator.check_schema(schema.webhook_schema())
    for profile, key in (("gptme", "session"), ("opencode", "sidecar")):
        doc = schema.openapi(profile, key, "0")
        assert doc["openapi"].startswith("3.1")
        for component in doc["components"]["schemas"].values():
            jsonschema.Draft202012Validator.check_schema(component)


def test_the_table_names_every_field_the_snapshot_serves_in_order() -> None:
    assert list(Snapshot().as_dict()) == [f.name for f in FIELDS]


def test_the_readme_table_is_the_snapshot_table() -> None:
    """The README's "fields under session" table lists the table's fields, and
    its status line every status, in order: the docs cannot drift either."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The snapshot", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \|", section, re.M)
    assert rows == [f.name for f in FIELDS]
    status_row = next(line for line in section.splitlines() if line.startswith("| `status`"))
    assert re.findall(r"`([a-z_]+)`", status_row)[1:] == list(STATUSES)


snapshots = st.builds(
    Snapshot,
    status=st.sampled_from(STATUSES),
    last_error=st.none() | st.text(max_size=20),
    pending_tools=st.lists(
        # (orjson reads events: their integers fit 64 bits, larger ones are floats)
        st.tuples(
            st.text(max_size=5),
            st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1)),
        ),
        max_size=3,
    ).map(tuple),
    session_id=st.none() | st.text(max_size=10),
    retry=st.none()
    | st.fixed_dictionaries(
        {
            "attempt": st.none() | st.integers(0, 100),
            "message": st.none() | st.text(max_size=10),
            "next_at": st.none() | st.just("2026-01-01T00:00:00.000Z"),
        }
    ),
    stream=st.sampled_from(STREAM_STATES),
    updated_at=st.none() | st.floats(0, 4e9),
    version=st.integers(1, 10**6),
)


@settings(max_examples=200, deadline=None)
@given(snap=snapshots)
def test_every_snapshot_merged_into_any_upstream_object_fits_the_schema(snap: Snapshot) -> None:
    SNAPSHOT.validate(snap.as_dict())
    # gptme 0.35.1 has its own session object: merged, it still fits.
    own = {"id": "s1", "generating": False, "last_error": None}
    doc = orjson.loads(merge.merge(orjson.dumps({"session": own}), "session", snap))
    SNAPSHOT.validate(doc["session"])
    payload = schema.webhook_payload("c", snap, "generating", 1.0)
    WEBHOOK.validate(payload)
    assert payload["type"] == f"conversation.{snap.status}"


def test_the_schema_refuses_what_the_sidecar_never_serves() -> None:
    good = Snapshot(status="generating", stream="live", updated_at=1.0).as_dict()
    for broken in (
        {**good, "generating": False},  # known status: generating follows from it
        {**good, "status": "thinking"},
        {**good, "stream": "maybe"},
        {k: v for k, v in good.items() if k != "stream"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            SNAPSHOT.validate(broken)
