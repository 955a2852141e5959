"""Settings: one table of options, read from a TOML file, ``SIDECAR_*``
environment variables and command-line flags (later sources win).

Every option is declared once in :data:`OPTIONS` (type, help, check) and has
its default in :class:`Settings`, nowhere else; the CLI flags, the environment
names and the validation all come from that table, so they cannot drift
apart. A wrong key or value raises :class:`ConfigError` with one line naming
the key and the problem.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .webhooks.receivers import (
    Receiver,
    ReceiverError,
    check_url,
    parse_receivers,
    parse_statuses,
)

__all__ = [
    "CHECK_OPTIONS",
    "OPTIONS",
    "WATCH_OPTIONS",
    "ConfigError",
    "Option",
    "Settings",
    "load_settings",
]

ENV_PREFIX = "SIDECAR_"


class ConfigError(ValueError):
    pass


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if "@" in parts.netloc:
        # Said without the value: the password must not reach a terminal or a log.
        raise ValueError(
            "must not carry credentials (user:password@): a URL ends up in answers, "
            "logs and `ps`; give upstream_authorization_file (e.g. 'Basic <base64>') instead"
        )
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    return value.rstrip("/")


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError("must be between 0 and 65535")
    return value


def _count(value: int) -> int:
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _at_least_zero(value: int) -> int:
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _names(value: str) -> str:
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    for name in names:
        if not all(c.isalnum() or c in "-._" for c in name):
            raise ValueError(f"{name!r} is not a host name")
    return ",".join(names)


def _store(value: str) -> str:
    if value in ("memory", "sqlite") or (value.startswith("sqlite:") and len(value) > 7):
        return value
    if value.startswith(("redis://", "rediss://")):
        url = urlsplit(value)
        if not url.hostname:
            raise ValueError(f"{value!r} names no Redis host")
        return value
    raise ValueError(
        "must be memory, sqlite (the default file), sqlite:PATH or redis://HOST[:PORT][/DB]"
        " (rediss:// for TLS)"
    )


def _receiver_url(value: str) -> str:
    try:
        return check_url(value, "url")
    except ReceiverError as exc:
        raise ValueError(str(exc).removeprefix("url: ")) from None


def _statuses(value: str) -> str:
    try:
        statuses = parse_statuses(value, "webhook_statuses")
    except ReceiverError as exc:
        raise ValueError(str(exc).removeprefix("webhook_statuses: statuses: ")) from None
    return ",".join(sorted(statuses))


def _cache(value: str) -> str:
    if value not in ("off", "events"):
        raise ValueError("must be off or events")
    return value


def _level(value: str) -> str:
    if value.lower() not in ("debug", "info", "warning", "error"):
        raise ValueError("must be debug, info, warning or error")
    return value.lower()


@dataclass(frozen=True)
class Option:
    name: str
    kind: type
    help: str
    check: Callable[[Any], Any] | None = None
    secret: bool = False
    #: How the help states a default that Settings computes (None there).
    computed: str | None = None
    #: This option names a file that holds the value of that (secret) option.
    file_of: str | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("upstream", str, "the upstream server's base URL", _url),
    Option("host", str, "address to listen on"),
    Option("port", int, "port to listen on", _port),
    Option("profile", str, "built-in profile name or profile file path"),
    Option("preserve_host", bool, "forward the client's Host header unchanged"),
    Option(
        "upstream_authorization",
        str,
        "Authorization header for the sidecar's own subscriptions",
        secret=True,
        computed="the client's",
    ),
    Option(
        "upstream_authorization_file",
        str,
        "a file holding upstream_authorization (its trailing newline dropped)",
        file_of="upstream_authorization",
    ),
    Option("connect_timeout", float, "seconds to connect to the upstream", _positive),
    Option(
        "response_timeout",
        float,
        "seconds from sending a request to the upstream's response headers",
        _positive,
    ),
    Option(
        "trigger_wait",
        float,
        "seconds a trigger waits for its stream to be live before it is forwarded",
        _positive,
    ),
    Option(
        "stale_after",
        float,
        "seconds of stream silence taken as a dead connection",
        _positive,
        computed="3 heartbeats of the profile",
    ),
    Option(
        "stream_head_timeout",
        float,
        "seconds an event stream's response headers may take before it is tried again",
        _positive,
    ),
    Option(
        "start_timeout",
        float,
        "seconds an accepted step may show no event before it is reported failed",
        _positive,
    ),
    Option(
        "confirm_timeout",
        float,
        "seconds after a lost stream is back for a step in flight to show an event",
        _positive,
    ),
    Option("reconnect_min", float, "first reconnect delay, seconds", _positive),
    Option("reconnect_max", float, "reconnect delay cap, seconds", _positive),
    Option("max_subscriptions", int, "live upstream subscriptions at most", _count),
    Option("max_snapshots", int, "snapshots kept at most", _count),
    Option(
        "store",
        str,
        "where snapshots outlive a restart: memory, sqlite (one file per upstream under "
        "$XDG_STATE_HOME/sidecar), sqlite:PATH, or redis://HOST:PORT/DB (rediss:// for TLS),"
        " shared by a fleet of replicas",
        _store,
    ),
    Option(
        "store_password",
        str,
        "the Redis password, if the store's URL has none",
        secret=True,
    ),
    Option(
        "store_password_file",
        str,
        "a file holding store_password (its trailing newline dropped)",
        file_of="store_password",
    ),
    Option(
        "store_prefix",
        str,
        "the prefix of every Redis key and channel (fleets that share a Redis differ here)",
    ),
    Option(
        "store_timeout",
        float,
        "seconds a Redis call may take before the store counts as degraded",
        _positive,
    ),
    Option(
        "lease_ttl",
        float,
        "seconds a replica's hold on a stream lasts unless renewed: how soon another "
        "takes over from a replica that died",
        _positive,
    ),
    Option(
        "workers",
        int,
        "processes serving the port (SO_REUSEPORT); more than 1 needs a redis:// store",
        _count,
    ),
    Option("store_flush", float, "seconds between writes of the store (coalesced)", _positive),
    Option(
        "retention",
        float,
        "seconds a finished conversation's snapshot is kept in the store",
        _positive,
    ),
    Option(
        "store_adopt",
        bool,
        "use a store made for another upstream, keeping what it holds (it is then this "
        "upstream's); without it, such a store is refused at start",
    ),
    Option("merge_limit", int, "largest body merged, bytes", _count),
    Option(
        "cache",
        str,
        "off, or events: answer an enrich GET from the upstream's last answer while its "
        "stream is live and no content event nor write came since",
        _cache,
    ),
    Option(
        "cache_max_age",
        float,
        "seconds a cached answer is reused at most, events or not",
        _positive,
    ),
    Option(
        "cache_stale_while_revalidate",
        float,
        "seconds past cache_max_age an answer still valid by the events is served at once "
        "while the upstream is asked again in the background (0: the poller waits)",
        _at_least_zero,
    ),
    Option(
        "cache_revalidations",
        int,
        "background revalidations asked of the upstream at once, at most (the others wait "
        "their turn, their entries served stale meanwhile)",
        _count,
    ),
    Option("cache_max_bytes", int, "bytes the response cache holds at most", _count),
    Option(
        "list_observe",
        int,
        "how many of a list's most recently modified items a list answered to a client "
        "with credentials starts observing (0: listing observes nothing)",
        _at_least_zero,
    ),
    Option(
        "fan_out",
        bool,
        "serve clients' event streams from the sidecar's own subscription, one upstream "
        "stream per conversation (where the profile has it verified: gptme)",
    ),
    Option(
        "fan_out_replay",
        int,
        "events a fanned-out stream keeps per conversation for clients that resume "
        "(Last-Event-ID); at most 1 MiB of them",
        _count,
    ),
    Option(
        "fan_out_client_bytes",
        int,
        "bytes queued at most for one fanned-out client; one that does not read is dropped",
        _count,
    ),
    Option(
        "max_merge_memory",
        int,
        "bytes of answers held for merging at once (503 beyond)",
        _count,
    ),
    Option("max_event_bytes", int, "largest SSE event kept, bytes", _count),
    Option("max_request_body", int, "largest request body forwarded, bytes", _count),
    Option("max_ws_message", int, "largest WebSocket message relayed, bytes", _count),
    Option(
        "admin_port",
        int,
        "serve /healthz, /readyz, /metrics and /_sidecar/ on this port instead of the main one",
        _port,
    ),
    Option(
        "admin_host",
        str,
        "address the admin port listens on; state and metrics need admin_token unless loopback",
    ),
    Option(
        "admin_token",
        str,
        "token for metrics, the state API and the page; without it they are served "
        "only on an admin port bound to loopback",
        secret=True,
    ),
    Option(
        "admin_token_file",
        str,
        "a file holding admin_token (its trailing newline dropped)",
        file_of="admin_token",
    ),
    Option(
        "admin_hosts",
        str,
        "comma-separated host names the admin endpoints answer to besides IP addresses "
        "and localhost (against DNS rebinding)",
        _names,
    ),
    Option(
        "shutdown_grace",
        float,
        "seconds in-flight requests get to finish after SIGTERM",
        _positive,
    ),
    Option(
        "header_timeout",
        float,
        "seconds a client has to send a whole request head (408 after)",
        _positive,
    ),
    Option(
        "body_timeout",
        float,
        "seconds a request body may pause between reads (408 after)",
        _positive,
    ),
    Option("max_connections", int, "client connections open at once, at most", _count),
    Option(
        "front_door",
        bool,
        "serve GETs with the lean HTTP/1.1 server (off: aiohttp's server answers everything)",
    ),
    Option(
        "keepalive_timeout",
        float,
        "seconds an idle client connection stays open (longer than a load balancer's)",
        _positive,
    ),
    Option("probe_interval", float, "seconds between upstream reachability probes", _positive),
    Option("max_wait", float, "longest `Prefer: wait` honoured, seconds", _positive),
    Option("max_held", int, "requests held by `Prefer: wait` at once, at most", _count),
    Option(
        "webhook_url",
        str,
        "one receiver of webhooks on transitions (more: [[webhooks]] tables in the config file)",
        _receiver_url,
    ),
    Option(
        "webhook_secret_file",
        str,
        "the file holding that receiver's whsec_... secret (one a line while rotating)",
    ),
    Option(
        "webhook_statuses",
        str,
        "the statuses that receiver is told of, comma-separated",
        _statuses,
        computed="completed,failed,interrupted,awaiting_tool,awaiting_input",
    ),
    Option(
        "webhook_max_age",
        float,
        "seconds a webhook is tried for; then it is dropped and counted",
        _positive,
    ),
    Option(
        "webhook_retry_min",
        float,
        "the first retry's delay bound, seconds (doubled each attempt, full jitter)",
        _positive,
    ),
    Option("webhook_retry_max", float, "the retry delay's cap, seconds", _positive),
    Option("webhook_timeout", float, "seconds a receiver has to answer an attempt", _positive),
    Option(
        "webhook_outbox_max",
        int,
        "webhooks waiting per receiver at most (more are dropped, counted and logged)",
        _count,
    ),
    Option("access_log", bool, "log every request (one JSON line each)"),
    Option("log_level", str, "debug, info, warning or error", _level),
)
_BY_NAME = {o.name: o for o in OPTIONS}
#: What `sidecar check` reads: it connects, it does not serve.
CHECK_OPTIONS = (
    "upstream",
    "profile",
    "upstream_authorization",
    "upstream_authorization_file",
    "connect_timeout",
    "max_event_bytes",
)


#: What `sidecar watch` reads: where the state API is, and its token.
WATCH_OPTIONS = ("host", "port", "admin_port", "admin_host", "admin_token")


@dataclass(frozen=True)
class Settings:
    """The effective options; the defaults here are the only ones."""

    upstream: str
    host: str = "127.0.0.1"
    port: int = 8080
    profile: str = "gptme"
    preserve_host: bool = False
    upstream_authorization: str | None = None
    upstream_authorization_file: str | None = None
    connect_timeout: float = 5.0
    response_timeout: float = 60.0
    trigger_wait: float = 2.0
    stale_after: float | None = None
    stream_head_timeout: float = 3.0
    start_timeout: float = 30.0
    confirm_timeout: float = 5.0
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    max_subscriptions: int = 1000
    max_snapshots: int = 10000
    store: str = "sqlite"
    store_password: str | None = None
    store_password_file: str | None = None
    store_prefix: str = "sidecar:"
    store_timeout: float = 0.5
    lease_ttl: float = 10.0
    workers: int = 1
    store_flush: float = 0.1
    retention: float = 7 * 24 * 3600.0
    store_adopt: bool = False
    merge_limit: int = 32 * 1024 * 1024
    cache: str = "off"
    # Together they bound how late a change made without an event is seen
    # (10 s); fresh for 6 of them keeps the expiry's own GETs under 2% of the
    # polls of ten pollers a conversation polling once a second
    # (docs/performance.md).
    cache_max_age: float = 6.0
    cache_stale_while_revalidate: float = 4.0
    cache_revalidations: int = 4
    cache_max_bytes: int = 64 * 1024 * 1024
    list_observe: int = 10
    fan_out: bool = True
    fan_out_replay: int = 1000
    fan_out_client_bytes: int = 4 * 1024 * 1024
    max_merge_memory: int = 256 * 1024 * 1024
    max_event_bytes: int = 4 * 1024 * 1024
    max_request_body: int = 1024**3
    max_ws_message: int = 4 * 1024 * 1024
    admin_port: int | None = None
    admin_host: str = "127.0.0.1"
    admin_token: str | None = None
    admin_token_file: str | None = None
    admin_hosts: str = ""
    shutdown_grace: float = 20.0
    header_timeout: float = 60.0
    body_timeout: float = 60.0
    max_connections: int = 10000
    front_door: bool = True
    keepalive_timeout: float = 3630.0
    probe_interval: float = 5.0
    max_wait: float = 60.0
    max_held: int = 1000
    webhook_url: str | None = None
    webhook_secret_file: str | None = None
    webhook_statuses: str | None = None
    webhook_max_age: float = 24 * 3600.0
    webhook_retry_min: float = 1.0
    webhook_retry_max: float = 300.0
    webhook_timeout: float = 10.0
    webhook_outbox_max: int = 10000
    access_log: bool = False
    log_level: str = "info"
    #: The config file's ``[[webhooks]]`` tables (the ``webhook_*`` options add one).
    webhooks: tuple[Receiver, ...] = ()

    @property
    def receivers(self) -> tuple[Receiver, ...]:
        """Every receiver: the file's tables, and the one of the ``webhook_*`` options."""
        if self.webhook_url is None:
            return self.webhooks
        table: dict[str, Any] = {"url": self.webhook_url, "secret_file": self.webhook_secret_file}
        if self.webhook_statuses:
            table["statuses"] = self.webhook_statuses
        return parse_receivers([*(r.as_table() for r in self.webhooks), table], "webhooks")

    def masked(self) -> dict[str, Any]:
        """The effective settings, secrets masked: safe to print or log."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "webhooks":
                out[f.name] = [r.as_table() for r in value]
                continue
            if _BY_NAME[f.name].secret and value:
                value = "***"
            elif f.name == "store":
                value = masked_url(value)
            out[f.name] = value
        return out


def masked_url(url: str) -> str:
    """A URL with its password (``redis://:secret@host``) masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def _coerce(option: Option, value: Any, source: str) -> Any:
    where = f"{source}: {option.name}"
    if isinstance(value, str) and option.kind is not str:
        text = value.strip()
        try:
            if option.kind is bool:
                if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                value = text.lower() in ("1", "true", "yes", "on")
            else:
                value = option.kind(text)
        except ValueError:
            raise ConfigError(f"{where}: expected {option.kind.__name__}, got {value!r}") from None
    if option.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, option.kind) or (option.kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {option.kind.__name__}, got {value!r}")
    if option.check is not None:
        try:
            value = option.check(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return value


def _merge(values: dict[str, Any], source: dict[str, Any], where: str) -> None:
    """One source's options over the earlier ones'. A secret given by file
    (``admin_token_file``: the convention of container secrets) is read
    now; a source that gives it both ways is refused."""
    for key, value in source.items():
        option = _BY_NAME[key]
        if option.file_of is not None:
            if option.file_of in source:
                raise ConfigError(f"{where}: {option.file_of} and {key}: give one of them")
            values[option.file_of] = _read_secret(value, f"{where}: {key}")
        elif option.secret:
            values.pop(key + "_file", None)  # given here: no longer from the file
        values[key] = value


def _read_secret(path: str, where: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {path} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if any(c in text for c in "\r\n\x00"):
        raise ConfigError(f"{where}: {path} holds more than one line")
    return text


def load_settings(
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    require_upstream: bool = True,
) -> Settings:
    """Defaults, then the file, then ``SIDECAR_*`` variables, then flags."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    config_file = config_file or env.get(ENV_PREFIX + "CONFIG") or None
    if config_file:
        try:
            data = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"config file {config_file}: cannot read ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file}: not valid TOML ({exc})") from None
        data = data.get("sidecar", data) if isinstance(data.get("sidecar"), dict) else data
        source = {}
        for key, value in data.items():
            if key == "webhooks":
                where = f"config file {config_file}: webhooks"
                if not isinstance(value, list):
                    raise ConfigError(f"{where}: expected [[webhooks]] tables")
                try:
                    values[key] = parse_receivers(value, where)
                except ReceiverError as exc:
                    raise ConfigError(str(exc)) from None
                continue
            option = _BY_NAME.get(key)
            if option is None:
                raise ConfigError(f"config file {config_file}: {key}: unknown key")
            source[key] = _coerce(option, value, f"config file {config_file}")
        _merge(values, source, f"config file {config_file}")
    source = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        key = name[len(ENV_PREFIX) :].lower()
        option = _BY_NAME.get(key)
        if option is None:
            raise ConfigError(f"environment: {name}: unknown variable")
        source[key] = _coerce(option, value, "environment")
    _merge(values, source, "environment")
    source = {}
    for key, value in (flags or {}).items():
        if value is not None:
            source[key] = _coerce(_BY_NAME[key], value, "command line")
    _merge(values, source, "command line")
    if require_upstream and not values.get("upstream"):
        raise ConfigError(
            "upstream: missing (give --upstream URL, SIDECAR_UPSTREAM or `upstream` in the file)"
        )
    values.setdefault("upstream", "")  # (a command that only reads a running sidecar)
    settings = Settings(**values)
    if settings.reconnect_min > settings.reconnect_max:
        raise ConfigError("reconnect_min: must not exceed reconnect_max")
    if settings.admin_port is not None and settings.admin_port == settings.port != 0:
        raise ConfigError("admin_port: must differ from port")
    if settings.workers > 1 and not settings.store.startswith(("redis://", "rediss://")):
        raise ConfigError(
            "workers: more than 1 needs a shared store (store = redis://...): each worker "
            "is a replica, and replicas share their snapshots there"
        )
    if settings.workers > 1 and settings.port == 0:
        raise ConfigError("workers: more than 1 needs a fixed port (they share it)")
    if settings.webhook_retry_min > settings.webhook_retry_max:
        raise ConfigError("webhook_retry_min: must not exceed webhook_retry_max")
    webhook_options = (settings.webhook_secret_file, settings.webhook_statuses)
    if settings.webhook_url is None and any(v is not None for v in webhook_options):
        raise ConfigError("webhook_url: missing (webhook_secret_file and _statuses are for it)")
    if settings.webhook_url is not None and not settings.webhook_secret_file:
        raise ConfigError(
            "webhook_secret_file: missing (a file holding the whsec_... secret the receiver "
            "verifies signatures with)"
        )
    try:
        settings.receivers  # noqa: B018 (two receivers with one name raise here)
    except ReceiverError as exc:
        raise ConfigError(str(exc)) from None
    return settings
