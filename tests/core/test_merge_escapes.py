"""The merged body has exactly one snapshot key, however the upstream spells
its own: JSON lets a key be written with escapes (``"sess\\u0069on"``), and
most parsers keep the last of two equal keys, which would be the upstream's."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.merge import merge
from sidecar.core.snapshot import Snapshot

SNAP = Snapshot(status="failed", last_error="boom")


def _keys(body: bytes) -> list[str]:
    pairs = json.loads(body, object_pairs_hook=lambda items: items)
    return [k for k, _ in pairs]


@st.composite
def spelt(draw: st.DrawFn, key: str) -> str:
    """``key`` as JSON text may write it, each character plain or escaped."""
    out = []
    for char in key:
        if draw(st.booleans()):
            code = f"{ord(char):04x}"
            out.append("\\u" + (code.upper() if draw(st.booleans()) else code))
        elif char == "/" and draw(st.booleans()):
            out.append("\\/")
        else:
            out.append(char)
    return "".join(out)


@given(
    key=st.sampled_from(["session", "sidecar", "a/b"]),
    data=st.data(),
    before=st.booleans(),
)
def test_a_key_spelt_with_escapes_is_the_one_key(key: str, data: st.DataObject, before) -> None:
    name = data.draw(spelt(key))
    own = f'"{name}": {{"id": "upstream", "extra": 1}}'
    body = ("{" + own + ', "log": ["\\u00e9"]}') if before else ('{"log": [], ' + own + "}")
    merged = merge(body.encode(), key, SNAP)
    assert _keys(merged).count(key) == 1
    doc = json.loads(merged)
    assert doc[key]["status"] == "failed"
    assert doc[key]["extra"] == 1  # the upstream's own fields stay


def test_the_issues_body() -> None:
    merged = merge(b'{"sess\\u0069on": {"id": "s1"}, "log": []}', "session", SNAP)
    assert _keys(merged) == ["session", "log"]
    assert json.loads(merged)["session"]["id"] == "s1"
