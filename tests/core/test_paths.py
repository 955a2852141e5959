"""Paths as the upstream reads them (sidecar.paths, Profile.route): every
spelling an upstream routes to a resource is the same request to the
sidecar's rules; spellings it routes nowhere are not. What the released
servers do is measured in ``tests/test_real_paths.py``."""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.core.paths import PathRules
from sidecar.core.profile import load_profile

GPTME = load_profile("gptme")
OPENCODE = load_profile("opencode")
SESSION = "ses_" + "Ab3" * 8 + "xy"

#: (method, path with {id}): every kind of path each profile has a rule for,
#: and paths beside them.
GPTME_PATHS = [
    ("GET", "/api/v2/conversations/{id}"),
    ("GET", "/api/v2/conversations/{id}/events"),
    ("POST", "/api/v2/conversations/{id}/step"),
    ("POST", "/api/v2/conversations/{id}/tool/confirm"),
    ("POST", "/api/v2/conversations/{id}/interrupt"),
    ("DELETE", "/api/v2/conversations/{id}"),
    ("PUT", "/api/v2/conversations/{id}"),
    ("POST", "/api/v2/conversations/{id}"),
    ("PATCH", "/api/v2/conversations/{id}/config"),
    ("DELETE", "/api/v2/conversations/{id}/messages/3"),
    ("GET", "/api/v2/conversations"),
]
OPENCODE_PATHS = [
    ("GET", "/session/{id}"),
    ("POST", "/session/{id}/prompt_async"),
    ("POST", "/session/{id}/abort"),
    ("POST", "/session"),
    ("DELETE", "/session/{id}"),
    ("PATCH", "/session/{id}"),
    ("POST", "/session/{id}/revert"),
    ("GET", "/session/status"),
    ("GET", "/event"),
    ("GET", "/session"),
]


def test_each_kind_is_routed_on_the_plain_spelling() -> None:
    cid = "conv-1"
    kinds = [GPTME.route(m, p.format(id=cid)) for m, p in GPTME_PATHS]
    assert [(r.kind, r.resource_id, r.owner) for r in kinds] == [
        ("enrich", cid, None),
        ("pass", cid, None),
        ("trigger", cid, cid),
        ("trigger", cid, cid),
        ("trigger", cid, cid),
        ("pass", cid, cid),
        ("pass", cid, cid),
        ("pass", cid, cid),
        ("pass", None, cid),
        ("pass", None, cid),
        ("list", None, None),  # the list: its items carry their snapshots
    ]
    kinds = [OPENCODE.route(m, p.format(id=SESSION)) for m, p in OPENCODE_PATHS]
    assert [(r.kind, r.resource_id, r.owner) for r in kinds] == [
        ("enrich", SESSION, None),
        ("trigger", SESSION, SESSION),
        ("trigger", SESSION, SESSION),
        ("create", None, None),
        ("pass", SESSION, SESSION),
        ("pass", SESSION, SESSION),
        ("pass", None, SESSION),
        ("pass", None, None),
        ("pass", None, None),
        ("list", None, None),
    ]


# --------------------------------------------------- equivalent spellings

UNRESERVED = string.ascii_letters + string.digits + "-._~"
#: Characters a gptme id may hold (its pattern takes anything but "/" and
#: controls): unreserved, sub-delimiters, non-ASCII.
GPTME_ID = st.text(UNRESERVED + "!$&'()*+,=:@é€日", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)
OPENCODE_ID = st.text(string.ascii_letters + string.digits, min_size=26, max_size=26).map(
    lambda s: "ses_" + s
)


#: What a client may send as itself in a path segment (RFC 3986's pchar
#: less ";", which ends an opencode path): anything else is escaped.
AS_ITSELF = UNRESERVED + "!$&'()*+,=:@"


def _escape(char: str, upper: bool) -> str:
    escaped = "".join(f"%{b:02X}" for b in char.encode())
    return escaped if upper else escaped.lower()


def _encoded(segment: str) -> str:
    """A segment as a client must send it at least."""
    return "".join(c if c in AS_ITSELF else _escape(c, True) for c in segment)


@st.composite
def spelling(draw: st.DrawFn, segments: list[str], fixed: set[str], opencode: bool) -> str:
    """The path of these (decoded) segments as a client may spell it for
    the profile's upstream to read it the same: escapes where none is
    needed (either case), and per upstream, extra slashes, fixed segments in
    another case, ``;...``, a fragment."""
    out = []
    for segment in segments:
        if opencode and segment in fixed and draw(st.booleans()):
            segment = "".join(c.upper() if draw(st.booleans()) else c for c in segment)
        chars = [
            _escape(c, draw(st.booleans()))
            if c not in AS_ITSELF or draw(st.integers(0, 3)) == 0
            else c
            for c in segment
        ]
        out.append("".join(chars))
    joined = ""
    for i, segment in enumerate(out):
        if opencode or i == 0:
            sep = "/" * draw(st.integers(1, 3))  # leading slashes: merged by both
        else:
            # gptme decodes "%2F" before it routes: a separator either way.
            sep = draw(st.sampled_from(["/", "%2F", "%2f"]))
        joined += sep + segment
    if opencode and draw(st.booleans()):
        joined += "/" * draw(st.integers(1, 2))  # a trailing slash is ignored
    if opencode and draw(st.booleans()):
        joined += ";" + draw(st.text("abc=/;.%", max_size=6))
    if draw(st.booleans()):
        joined += "#" + draw(st.text("ab/?#%.", max_size=6))
    return joined


def _fixed(paths: list[tuple[str, str]]) -> set[str]:
    return {s for _, p in paths for s in p.split("/") if s and s != "{id}"}


def _segments(template: str, resource_id: str) -> list[str]:
    return [resource_id if s == "{id}" else s for s in template.split("/")[1:]]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), cid=GPTME_ID, case=st.sampled_from(GPTME_PATHS))
def test_every_gptme_spelling_is_handled_as_the_plain_one(data: st.DataObject, cid, case) -> None:
    method, template = case
    segments = _segments(template, cid)
    plain = "/" + "/".join(_encoded(s) for s in segments)
    odd = data.draw(spelling(segments, _fixed(GPTME_PATHS), opencode=False))
    expected = GPTME.route(method, plain)
    assert GPTME.route(method, odd) == expected, (odd, plain)
    if "{id}" in template:
        assert cid in (expected.resource_id, expected.owner)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), sid=OPENCODE_ID, case=st.sampled_from(OPENCODE_PATHS))
def test_every_opencode_spelling_is_handled_as_the_plain_one(
    data: st.DataObject, sid, case
) -> None:
    method, template = case
    segments = _segments(template, sid)
    plain = "/" + "/".join(segments)
    odd = data.draw(spelling(segments, _fixed(OPENCODE_PATHS), opencode=True))
    expected = OPENCODE.route(method, plain)
    assert OPENCODE.route(method, odd) == expected, (odd, plain)
    if "{id}" in template:
        assert sid in (expected.resource_id, expected.owner)


# ------------------------------------------ spellings routed elsewhere


@pytest.mark.parametrize(
    "path",
    [
        "/api/v2/conversations/c/",  # a trailing slash: 404 at gptme
        "/api/v2//conversations/c",  # inner "//": 404 (GET), 308 (POST)
        "/api/v2/x/../conversations/c",  # dot segments are not resolved
        "/api/v2/x/%2e%2e/conversations/c",
        "/api/v2/./conversations/c",
        "/api/v2/Conversations/c",  # case matters
        "/api/v2/conversations;a/c",  # ";" is part of its segment
    ],
)
def test_gptme_spellings_it_does_not_route_are_not_the_resource(path: str) -> None:
    route = GPTME.route("GET", path)
    assert route.kind == "pass" and route.resource_id is None


def test_a_semicolon_is_part_of_a_gptme_id_and_ends_an_opencode_path() -> None:
    assert GPTME.route("GET", "/api/v2/conversations/c;a").resource_id == "c;a"
    assert OPENCODE.route("GET", f"/session/{SESSION};a").resource_id == SESSION
    # "/session;a/ID" is "/session" to opencode: its list, not the session.
    assert OPENCODE.route("GET", f"/session;a/{SESSION}").kind == "list"
    assert OPENCODE.route("POST", f"/session;x/{SESSION}/abort").kind == "create"


def test_an_encoded_slash_is_a_separator_to_gptme_only() -> None:
    route = GPTME.route("POST", "/api/v2/conversations/c%2Fstep")
    assert (route.kind, route.resource_id) == ("trigger", "c")
    route = GPTME.route("PUT", "/api/v2/conversations/c%2Fconfig")
    assert (route.resource_id, route.owner) == (None, "c")
    assert OPENCODE.route("GET", f"/session/{SESSION}%2F").resource_id is None
    assert OPENCODE.route("GET", f"/session%2F{SESSION}").kind == "pass"


@pytest.mark.parametrize("escaped", ["%FF", "%C0%AE", "%ED%A0%80", "a%80b"])
def test_an_id_that_is_not_utf8_is_passed_through_but_a_write_to_it_counts(escaped) -> None:
    for method in ("GET", "POST", "DELETE"):
        route = GPTME.route(method, f"/api/v2/conversations/{escaped}")
        assert (route.kind, route.resource_id) == ("pass", None)
        assert GPTME.route(method, f"/api/v2/conversations/{escaped}/step").kind == "pass"
    # gptme reads it with U+FFFD: a write there changes the conversation of that name.
    assert GPTME.route("DELETE", "/api/v2/conversations/%FF").owner == "\ufffd"
    assert OPENCODE.route("GET", f"/session/{escaped}").resource_id is None


def test_the_canonical_form_is_rfc_3986s() -> None:
    rules = PathRules()
    assert rules.normalise("/a/%7e%41b%2fc%3A") == ("/a/~Ab%2Fc:", True)
    assert rules.normalise("/a b/ü") == ("/a%20b/%C3%BC", True)
    assert rules.normalise("/x/%ff") == ("/x/%EF%BF%BD", False)
    assert rules.normalise("/plain/path") == ("/plain/path", True)
    dots = PathRules(remove_dot_segments=True)
    assert dots.normalise("/a/b/../c/./d") == ("/a/c/d", True)
    assert dots.normalise("/a/%2e%2E/b") == ("/b", True)
    assert dots.normalise("/a/b/..") == ("/a/", True)
    assert dots.normalise("/../../a") == ("/a", True)


def test_matching_a_raw_path_never_raises() -> None:
    # Matching is on canonical paths, but a raw one must not raise either.
    assert GPTME.match_enrich("GET", "/api/v2/conversations/%FF") is None
    assert GPTME.match_trigger("POST", "/api/v2/conversations/%C0%AE/step") is None
    assert GPTME.match_owner("/api/v2/conversations/%ED%A0%80/config") is None
    assert GPTME.match_enrich("GET", "/api/v2/conversations/%zz") == "%zz"  # not an escape
