"""Profiles: what an upstream looks like, as data.

A profile names the paths that are event streams, triggers and enrich targets,
the pattern a resource id must match, and the rules that turn events into
snapshot changes. The gptme profile (``config/gptme.toml``) is built in; a
second upstream needs a new file, not new code.

Loading validates everything up front and raises :class:`ProfileError` with a
message naming the key at fault, so a bad profile stops the process at start-up
with one clear line instead of misbehaving at the first event.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from .credentials import DEFAULT_HEADERS, CredentialRules
from .paths import PathRules
from .snapshot import CLEARABLE, RETRY_KEYS, STATE_KEYS, STATUSES

__all__ = [
    "BUILTIN_PROFILES",
    "EventRule",
    "FollowRule",
    "JoinRules",
    "PathTemplate",
    "Profile",
    "ProfileError",
    "Route",
    "Trigger",
    "field_value",
    "load_profile",
]

BUILTIN_PROFILES = ("gptme", "opencode")


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the key."""


class PathTemplate:
    """A path with at most one ``{id}`` segment, matched against canonical
    request paths (:meth:`sidecar.paths.PathRules.normalise`).

    In a canonical path a slash inside a segment is still ``%2F``, so the id
    is one segment; it is then decoded and checked against the profile's id
    pattern. With ``case_sensitive`` false the template's fixed segments
    match in any case, the id never. Building a path percent-encodes the id,
    so no id can ever make the sidecar request a different path. Matching
    never raises, whatever the path holds.
    """

    def __init__(
        self,
        template: str,
        id_pattern: re.Pattern[str],
        where: str,
        case_sensitive: bool = True,
    ) -> None:
        if not template.startswith("/"):
            raise ProfileError(f"{where}: path {template!r} must start with '/'")
        if template.count("{id}") > 1:
            raise ProfileError(f"{where}: path {template!r} has more than one {{id}}")
        self.template = template
        self.has_id = "{id}" in template
        self._id_pattern = id_pattern
        head, _, tail = template.partition("{id}")
        fixed = [re.escape(p) if case_sensitive else f"(?i:{re.escape(p)})" for p in (head, tail)]
        regex = fixed[0] + ("([^/?#]+)" + fixed[1] if self.has_id else "")
        self._regex = re.compile(regex + r"\Z")
        #: The template's path or any path below it.
        self._prefix = re.compile(regex + r"(?:/|\Z)")

    def match(self, path: str) -> str | None:
        """The decoded resource id if ``path`` (no query) fits, else None.

        A template without ``{id}`` matches with the empty id.
        """
        m = self._regex.match(path)
        if m is None:
            return None
        if not self.has_id:
            return ""
        return self._valid(m.group(1))

    def match_below(self, path: str) -> str | None:
        """Like :meth:`match`, for the template's path or any path below it."""
        m = self._prefix.match(path)
        if m is None or not self.has_id:
            return None
        return self._valid(m.group(1))

    def _valid(self, resource_id: str) -> str | None:
        if "%" in resource_id:
            try:
                resource_id = unquote(resource_id, errors="strict")
            except UnicodeDecodeError:
                return None  # not UTF-8: not an id the sidecar can name
        return resource_id if valid_id(resource_id, self._id_pattern) else None

    def build(self, resource_id: str) -> str:
        return self.template.replace("{id}", quote(resource_id, safe=""))


@dataclass(frozen=True, slots=True)
class Route:
    """What a request is, read from its method and path as the upstream reads them.

    ``kind``: ``enrich``, ``trigger``, ``list``, ``create`` or ``pass``. ``resource_id``:
    the enrich target's or the trigger's id; for ``pass``, the resource a
    passed-through request is for (a GET: only its stream; any other method:
    any of its paths). ``owner``: for a request other than GET and HEAD, the
    resource whose body it may change.
    """

    kind: str
    #: The canonical path (its fixed segments in the client's case).
    path: str = field(compare=False)
    resource_id: str | None = None
    owner: str | None = None
    trigger: Trigger | None = None
    #: A GET of the event stream (a resource's, or the shared one).
    stream: bool = False


def field_value(event: dict[str, Any], path: str) -> Any:
    """The value at a dotted path in an event (or a request body), or None."""
    value: Any = event
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def valid_id(resource_id: str, pattern: re.Pattern[str]) -> bool:
    return resource_id not in (".", "..") and pattern.fullmatch(resource_id) is not None


@dataclass(frozen=True)
class Trigger:
    method: str
    path: PathTemplate
    session_field: str | None = None
    #: Rules for a 2xx answer, matched against the request's JSON body.
    on_accept: tuple[EventRule, ...] = ()
    error_field: str | None = None


#: Where a rule reads: the event (or, for a trigger, the request body).
Fields = dict[str, Any]


@dataclass(frozen=True)
class EventRule:
    """One rule: when it applies, and what it does to a snapshot.

    Conditions (all must hold; see docs/profiles.md): ``match`` on field
    values, ``when_status`` / ``unless_status`` on the current status,
    ``if_seen`` on what the stream has carried. Effects: the rest. Field names
    are dotted paths into the event's JSON (or a trigger's request body).
    """

    status: str | None = None
    last_error: str | None = None  # field to copy into last_error
    clear: tuple[str, ...] = ()
    add_pending: str | None = None
    remove_pending: str | None = None
    state: dict[str, str] | None = None
    #: retry fields (attempt, message, next_at) read from these paths
    retry: dict[str, str] | None = None
    #: (field path, accepted values): the field must equal one of them
    match: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    when_status: frozenset[str] | None = None
    unless_status: frozenset[str] | None = None
    #: apply only once the stream's current connection carried one of these
    if_seen: frozenset[str] | None = None
    #: (triggers only) statuses that events reached after the request was
    #: sent which this answer still overrides: they were its own effect
    supersedes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class FollowRule:
    """One synthetic event sent after the stream's first event, for each
    resource whose status is one of ``when_status`` (``[[stream.join.follow]]``)."""

    when_status: frozenset[str]
    #: The event's JSON object; a string ``"{id}"`` anywhere in it stands for
    #: the resource's id.
    event: dict[str, Any]


@dataclass(frozen=True)
class JoinRules:
    """What a client's own event stream is told first (``[stream.join]``).

    The upstream's first event, if it is of type ``event``, has the fields of
    ``set`` overwritten from the resource's snapshot (a stream with ``{id}``),
    and is followed by the ``follow`` events of each resource that needs one
    (a shared stream). At most ``max_bytes`` and ``max_seconds`` are waited
    for it; then, or for any other first event, every byte passes as it came.
    """

    event: str
    #: Snapshot field (generating, last_error, pending_tools) -> the event's
    #: field (a dotted path) that is set from it.
    set: dict[str, str] = field(default_factory=dict)
    follow: tuple[FollowRule, ...] = ()
    #: A field of ``set`` the event lacks is added (else only those it has are set).
    add_missing: bool = False
    max_bytes: int = 64 * 1024
    max_seconds: float = 3.0


@dataclass(frozen=True)
class Profile:
    name: str
    id_pattern: re.Pattern[str]
    stream: PathTemplate
    heartbeat_seconds: float
    type_field: str  # dotted path into the event's JSON, or "@event"
    id_field: str | None  # for a shared stream: where an event names its resource
    #: Event types that prove the stream is alive but say nothing of the work.
    keepalive_events: frozenset[str]
    #: Event types that change the enrich target's body (wake long-polls).
    content_events: frozenset[str]
    enrich_method: str
    enrich: PathTemplate
    key: str
    triggers: tuple[Trigger, ...]
    #: A cheap upstream path whose answer (any status) proves it is reachable.
    health_path: str
    #: The list of resources (its GET's items get their snapshots, and
    #: `sidecar check` finds an existing resource there), and each item's id field.
    list_path: str | None
    list_id_field: str
    #: Per event type, its rules in order: the first that applies wins.
    events: dict[str, tuple[EventRule, ...]] = field(default_factory=dict)
    #: The resource is itself the session (opencode): its id is ``session.id``.
    id_is_session: bool = False
    #: ``POST`` here creates a resource; the answer names it in this field.
    create_path: str | None = None
    create_id_field: str = "id"
    #: Where a list answered as an object holds its items (gptme 0.35.1's
    #: ``paginated=1``: ``conversations``); a list answered as an array is one.
    list_items: str | None = None
    #: Each item's time of last change (a number): which items listing observes first.
    list_modified_field: str | None = None
    source: str = "<builtin>"
    #: How the upstream routes a request path (``[paths]``).
    paths: PathRules = field(default_factory=PathRules)
    #: What the upstream authenticates a request by (``[credentials]``).
    credentials: CredentialRules = field(default_factory=CredentialRules)
    #: What a client's own event stream is told first (``[stream.join]``).
    join: JoinRules | None = None
    #: Clients' event streams may be served from the sidecar's own
    #: subscription (``stream.fan_out``: verified for this upstream).
    fan_out: bool = False

    @cached_property
    def list_template(self) -> PathTemplate | None:
        """The list's path, matched as every other rule's (raw path, no query)."""
        if self.list_path is None:
            return None
        return PathTemplate(
            self.list_path, self.id_pattern, "resource.list_path", self.paths.case_sensitive
        )

    @property
    def shared_stream(self) -> bool:
        return not self.stream.has_id

    @cached_property
    def _seen_watch(self) -> dict[str, tuple[tuple[str, str | None], ...]]:
        """Per event type, the ``if_seen`` tokens it can satisfy: ``TYPE``, or
        ``TYPE:FIELD`` (an event of that type that has that field)."""
        watch: dict[str, list[tuple[str, str | None]]] = {}
        for rules in self.events.values():
            for rule in rules:
                for token in rule.if_seen or ():
                    event_type, _, path = token.partition(":")
                    entry = (token, path or None)
                    if entry not in watch.setdefault(event_type, []):
                        watch[event_type].append(entry)
        return {k: tuple(v) for k, v in watch.items()}

    def seen_tokens(self, event_type: str, event: dict[str, Any]) -> list[str]:
        """What this event lets ``if_seen`` conditions see from now on."""
        watch = self._seen_watch.get(event_type)
        if not watch:
            return []
        return [t for t, path in watch if path is None or field_value(event, path) is not None]

    def match_trigger(self, method: str, raw_path: str) -> tuple[Trigger, str] | None:
        for trigger in self.triggers:
            if trigger.method == method:
                resource_id = trigger.path.match(raw_path)
                if resource_id is not None:
                    return trigger, resource_id
        return None

    def match_list(self, method: str, raw_path: str) -> bool:
        """A GET of the list of resources (its items get their snapshots)."""
        template = self.list_template
        return method == "GET" and template is not None and template.match(raw_path) == ""

    def match_enrich(self, method: str, raw_path: str) -> str | None:
        if method != self.enrich_method:
            return None
        return self.enrich.match(raw_path)

    def match_resource(self, raw_path: str) -> str | None:
        """The resource a path belongs to: the enrich target's, a trigger's or
        the stream's (any method), or None."""
        for template in (self.enrich, *(t.path for t in self.triggers), self.stream):
            if template.has_id:
                resource_id = template.match(raw_path)
                if resource_id is not None:
                    return resource_id
        return None

    def match_owner(self, raw_path: str) -> str | None:
        """The resource whose body a write to this path may change: any of
        its paths, or any path below the enrich target's (gptme's
        ``.../messages/3``, ``.../config``; opencode's ``.../revert``)."""
        return self.match_resource(raw_path) or self.enrich.match_below(raw_path)

    def valid_id(self, resource_id: str) -> bool:
        return valid_id(resource_id, self.id_pattern)

    @cached_property
    def _create(self) -> PathTemplate | None:
        if self.create_path is None:
            return None
        return PathTemplate(self.create_path, self.id_pattern, "create", self.paths.case_sensitive)

    def route(self, method: str, raw_path: str) -> Route:
        """What a request with this method and path (as sent, no query) is."""
        path, exact = self.paths.normalise(raw_path)
        owner = None if method in ("GET", "HEAD") else self.match_owner(path)
        if not exact:
            # An id that is not UTF-8: passed through as sent, and nothing of
            # the sidecar's own is built from it; a write still makes the
            # bodies cached for what the upstream reads it as stale.
            return Route("pass", path, owner=owner)
        trigger = self.match_trigger(method, path)
        if trigger is not None:
            return Route("trigger", path, trigger[1], owner, trigger[0])
        resource_id = self.match_enrich(method, path)
        if resource_id is not None:
            return Route("enrich", path, resource_id)
        if self.match_list(method, path):
            return Route("list", path)
        if method == "POST" and self._create is not None and self._create.match(path) is not None:
            return Route("create", path)
        if method == "GET":
            streamed = self.stream.match(path)
            resource_id = streamed if self.stream.has_id else None
            return Route("pass", path, resource_id, owner, stream=streamed is not None)
        return Route("pass", path, self.match_resource(path), owner)


def load_profile(name_or_path: str) -> Profile:
    """Load a built-in profile by name, or a profile file by path."""
    if name_or_path in BUILTIN_PROFILES:
        text, source = _builtin_text(name_or_path), f"<builtin {name_or_path}>"
    else:
        path = Path(name_or_path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            if "/" not in name_or_path and not name_or_path.endswith(".toml"):
                raise ProfileError(
                    f"profile {name_or_path!r}: no such built-in profile "
                    f"(built-in: {', '.join(BUILTIN_PROFILES)}) and no such file"
                ) from exc
            raise ProfileError(f"profile {name_or_path!r}: cannot read ({exc.strerror})") from exc
        source = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {source}: not valid TOML ({exc})") from exc
    return parse_profile(data, source)


def _builtin_text(name: str) -> str:
    packaged = resources.files("sidecar") / "profiles" / f"{name}.toml"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # A source checkout or editable install: the file lives in config/.
    checkout = Path(__file__).resolve().parents[2] / "config" / f"{name}.toml"
    return checkout.read_text(encoding="utf-8")


class _Reader:
    """Reads one table, remembering the keys used so unknown ones are errors."""

    def __init__(self, table: Any, where: str) -> None:
        if not isinstance(table, dict):
            raise ProfileError(f"{where}: must be a table")
        self.table: dict[str, Any] = table
        self.where = where
        self.used: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                raise ProfileError(f"{self.where}.{key}: missing")
            return default
        value = self.table[key]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ProfileError(f"{self.where}.{key}: expected {names}, got {value!r}")
        return value

    def done(self) -> None:
        extra = sorted(set(self.table) - self.used)
        if extra:
            raise ProfileError(f"{self.where}.{extra[0]}: unknown key")


def parse_profile(data: dict[str, Any], source: str = "<dict>") -> Profile:
    top = _Reader(data, f"profile {source}")
    name = top.get("name", str)

    res = _Reader(top.get("resource", dict), "resource")
    pattern_text = res.get("id_pattern", str)
    try:
        id_pattern = re.compile(pattern_text)
    except re.error as exc:
        raise ProfileError(f"resource.id_pattern: invalid regex ({exc})") from exc
    list_path = res.get("list_path", str, None)
    if list_path is not None and not list_path.startswith("/"):
        raise ProfileError("resource.list_path: must start with '/'")
    if list_path is not None and "{" in list_path:
        raise ProfileError("resource.list_path: a list has no {id}")
    list_id_field = res.get("list_id_field", str, "id")
    list_items = res.get("list_items", str, None)
    list_modified_field = res.get("list_modified_field", str, None)
    id_is_session = res.get("is_session", bool, False)
    create_path = res.get("create_path", str, None)
    if create_path is not None and not create_path.startswith("/"):
        raise ProfileError("resource.create_path: must start with '/'")
    create_id_field = res.get("create_id_field", str, "id")
    res.done()

    paths = _path_rules(_Reader(top.get("paths", dict, {}), "paths"))
    credentials = _credential_rules(_Reader(top.get("credentials", dict, {}), "credentials"))
    cased = paths.case_sensitive

    st = _Reader(top.get("stream", dict), "stream")
    stream = PathTemplate(st.get("path", str), id_pattern, "stream.path", cased)
    heartbeat = float(st.get("heartbeat_seconds", (int, float), 15))
    if heartbeat <= 0:
        raise ProfileError("stream.heartbeat_seconds: must be positive")
    type_field = st.get("type_field", str, "type")
    id_field = st.get("id_field", str, None)
    keepalive = st.get("keepalive_events", list, [])
    if not all(isinstance(k, str) for k in keepalive):
        raise ProfileError("stream.keepalive_events: expected a list of event types")
    content = st.get("content_events", list, [])
    if not all(isinstance(k, str) for k in content):
        raise ProfileError("stream.content_events: expected a list of event types")
    if not stream.has_id and id_field is None:
        raise ProfileError("stream.id_field: required when stream.path has no {id}")
    join_table = st.get("join", dict, None)
    join = _join_rules(_Reader(join_table, "stream.join")) if join_table is not None else None
    if join is not None and join.set and not stream.has_id:
        raise ProfileError("stream.join.set: a shared stream's first event is no one resource's")
    fan_out = st.get("fan_out", bool, False)
    if fan_out and not stream.has_id:
        raise ProfileError("stream.fan_out: only a stream of one resource ({id}) is fanned out")
    st.done()

    en = _Reader(top.get("enrich", dict), "enrich")
    enrich_method = en.get("method", str, "GET").upper()
    enrich = PathTemplate(en.get("path", str), id_pattern, "enrich.path", cased)
    if not enrich.has_id:
        raise ProfileError("enrich.path: must contain {id}")
    key = en.get("key", str)
    en.done()

    triggers = []
    for i, raw in enumerate(top.get("triggers", list, [])):
        where = f"triggers[{i}]"
        tr = _Reader(raw, where)
        path = PathTemplate(tr.get("path", str), id_pattern, f"{where}.path", cased)
        if not path.has_id:
            raise ProfileError(f"{where}.path: must contain {{id}}")
        accept = tr.get("on_accept", (dict, list), None)
        on_accept = _rules(accept, f"{where}.on_accept") if accept is not None else ()
        for i, rule in enumerate(on_accept):
            if rule.state is not None or rule.if_seen is not None:
                raise ProfileError(f"{where}.on_accept[{i}]: state and if_seen are for events")
        triggers.append(
            Trigger(
                method=tr.get("method", str, "POST").upper(),
                path=path,
                session_field=tr.get("session_field", str, None),
                on_accept=on_accept,
                error_field=tr.get("error_field", str, None),
            )
        )
        tr.done()

    he = _Reader(top.get("health", dict, {}), "health")
    health_path = he.get("path", str, "/")
    if not health_path.startswith("/"):
        raise ProfileError("health.path: must start with '/'")
    he.done()

    events = {
        event_type: _rules(raw, f"events.{event_type}")
        for event_type, raw in top.get("events", dict, {}).items()
    }
    top.done()
    return Profile(
        name=name,
        id_pattern=id_pattern,
        stream=stream,
        heartbeat_seconds=heartbeat,
        type_field=type_field,
        id_field=id_field,
        keepalive_events=frozenset(keepalive),
        content_events=frozenset(content),
        enrich_method=enrich_method,
        enrich=enrich,
        key=key,
        triggers=tuple(triggers),
        health_path=health_path,
        list_path=list_path,
        list_id_field=list_id_field,
        events=events,
        id_is_session=id_is_session,
        create_path=create_path,
        create_id_field=create_id_field,
        list_items=list_items,
        list_modified_field=list_modified_field,
        source=source,
        paths=paths,
        credentials=credentials,
        join=join,
        fan_out=fan_out,
    )


def _join_rules(r: _Reader) -> JoinRules:
    event = r.get("event", str)
    where = r.where
    fields = _field_map(r, "set", STATE_KEYS, where) or {}
    follow = []
    for i, raw in enumerate(r.get("follow", list, [])):
        f = _Reader(raw, f"{where}.follow[{i}]")
        statuses = _statuses(f, "when_status", f.where)
        if not statuses:
            raise ProfileError(f"{f.where}.when_status: expected a non-empty list of statuses")
        template = f.get("event", dict)
        f.done()
        follow.append(FollowRule(statuses, template))
    add_missing = r.get("add_missing", bool, False)
    max_bytes = r.get("max_bytes", int, 64 * 1024)
    max_seconds = float(r.get("max_seconds", (int, float), 3.0))
    if not 0 < max_bytes <= 1024 * 1024:
        raise ProfileError(f"{where}.max_bytes: expected 1 to 1048576")
    if not 0 < max_seconds <= 60:
        raise ProfileError(f"{where}.max_seconds: expected more than 0, at most 60")
    if not fields and not follow:
        raise ProfileError(f"{where}: nothing to tell (neither set nor follow)")
    r.done()
    return JoinRules(event, fields, tuple(follow), add_missing, max_bytes, max_seconds)


def _choice(r: _Reader, key: str, choices: tuple[str, str], default: str) -> bool:
    """A two-way choice, as the second of ``choices`` (True) or the first."""
    value = r.get(key, str, default)
    if value not in choices:
        raise ProfileError(f"{r.where}.{key}: expected {' or '.join(map(repr, choices))}")
    return bool(value == choices[1])


def _path_rules(r: _Reader) -> PathRules:
    rules = PathRules(
        decode_slashes=r.get("decode_slashes", bool, False),
        merge_leading_slashes=_choice(r, "leading_slashes", ("keep", "merge"), "keep"),
        ignore_empty_segments=_choice(r, "empty_segments", ("keep", "ignore"), "keep"),
        remove_dot_segments=_choice(r, "dot_segments", ("keep", "remove"), "keep"),
        semicolon_ends_path=_choice(r, "semicolon", ("in-segment", "ends-path"), "in-segment"),
        case_sensitive=r.get("case_sensitive", bool, True),
    )
    r.done()
    return rules


def _credential_rules(r: _Reader) -> CredentialRules:
    headers = r.get("headers", list, list(DEFAULT_HEADERS))
    query = r.get("query", list, [])
    for key, names in (("headers", headers), ("query", query)):
        if not all(isinstance(n, str) and n and n.isprintable() and " " not in n for n in names):
            raise ProfileError(f"credentials.{key}: expected a list of names")
    r.done()
    return CredentialRules(headers=tuple(headers), query=tuple(query))


def _rules(raw: Any, where: str) -> tuple[EventRule, ...]:
    """One rule (a table) or several (an array of tables), in order."""
    if isinstance(raw, dict):
        return (_rule(raw, where),)
    if not isinstance(raw, list) or not raw:
        raise ProfileError(f"{where}: expected a table or a non-empty array of tables")
    return tuple(_rule(r, f"{where}[{i}]") for i, r in enumerate(raw))


def _statuses(r: _Reader, key: str, where: str) -> frozenset[str] | None:
    values = r.get(key, list, None)
    if values is None:
        return None
    for s in values:
        if s not in STATUSES:
            raise ProfileError(f"{where}.{key}: unknown status {s!r}")
    return frozenset(values)


def _field_map(r: _Reader, key: str, names: tuple[str, ...], where: str) -> dict[str, str] | None:
    table = r.get(key, dict, None)
    if table is None:
        return None
    for name, value in table.items():
        if name not in names:
            raise ProfileError(f"{where}.{key}: unknown field {name!r}")
        if not isinstance(value, str):
            raise ProfileError(f"{where}.{key}.{name}: expected a field name")
    return dict(table)


def _rule(raw: Any, where: str) -> EventRule:
    r = _Reader(raw, where)
    status = r.get("status", str, None)
    if status is not None and status not in STATUSES:
        raise ProfileError(f"{where}.status: unknown status {status!r}")
    clear = tuple(r.get("clear", list, []))
    for name in clear:
        if name not in CLEARABLE:
            raise ProfileError(f"{where}.clear: unknown field {name!r}")
    match = []
    for path, value in r.get("match", dict, {}).items():
        values = tuple(value) if isinstance(value, list) else (value,)
        if not values or not all(isinstance(v, str | int | float | bool) for v in values):
            raise ProfileError(f"{where}.match.{path}: expected a value or a list of values")
        match.append((path, values))
    seen = r.get("if_seen", list, None)
    if seen is not None and not all(isinstance(t, str) for t in seen):
        raise ProfileError(f"{where}.if_seen: expected a list of event types")
    rule = EventRule(
        status=status,
        last_error=r.get("last_error", str, None),
        clear=clear,
        add_pending=r.get("add_pending", str, None),
        remove_pending=r.get("remove_pending", str, None),
        state=_field_map(r, "state", STATE_KEYS, where),
        retry=_field_map(r, "retry", RETRY_KEYS, where),
        match=tuple(match),
        when_status=_statuses(r, "when_status", where),
        unless_status=_statuses(r, "unless_status", where),
        if_seen=frozenset(seen) if seen is not None else None,
        supersedes=_statuses(r, "supersedes", where) or frozenset(),
    )
    r.done()
    return rule
