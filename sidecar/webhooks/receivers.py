"""The receivers an operator configured, and the options delivery reads.

A receiver comes only from the operator: a ``[[webhooks]]`` table of the
config file (``url``, ``secret_file``, ``statuses``, optionally ``name``),
or the one given by ``--webhook-url``, ``--webhook-secret-file`` and
``--webhook-statuses`` (and their ``SIDECAR_WEBHOOK_*`` variables). Never
from a request: nothing a client sends names where the sidecar POSTs.

Its ``name`` labels its metrics, its outbox and its state; by default it is
made of the URL's host, port and path (never its query or user info, which
may hold a token). Two receivers with one name are refused at start-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..core.snapshot import STATUSES

__all__ = [
    "DEFAULT_STATUSES",
    "Receiver",
    "ReceiverError",
    "WebhookSettings",
    "check_url",
    "parse_receivers",
    "parse_statuses",
]

#: When a receiver names no statuses: where work ends, or waits for a human.
DEFAULT_STATUSES = ("completed", "failed", "interrupted", "awaiting_tool", "awaiting_input")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEYS = frozenset({"url", "secret_file", "statuses", "name"})


class ReceiverError(ValueError):
    """A receiver that cannot be used; the message names it and the key."""


@dataclass(frozen=True)
class Receiver:
    name: str
    url: str
    secret_file: str
    statuses: frozenset[str]

    @property
    def shown_url(self) -> str:
        """The URL without user info or query (either may hold a token)."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"

    def as_table(self) -> dict[str, Any]:
        """The receiver as a ``[[webhooks]]`` table (``sidecar config``)."""
        return {
            "name": self.name,
            "url": self.url,
            "secret_file": self.secret_file,
            "statuses": [s for s in STATUSES if s in self.statuses],
        }


@dataclass(frozen=True)
class WebhookSettings:
    """A slice of ``sidecar.config.Settings`` (same names; the defaults are only
    there). See docs/configuration.md for each."""

    #: Every receiver (the config file's tables, and the ``webhook_*`` options' one).
    receivers: tuple[Receiver, ...]
    webhook_max_age: float
    webhook_retry_min: float
    webhook_retry_max: float
    webhook_timeout: float
    webhook_outbox_max: int


def parse_statuses(value: Any, where: str) -> frozenset[str]:
    """A list of statuses (or a comma-separated string of them)."""
    if isinstance(value, str):
        value = [s.strip() for s in value.split(",") if s.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
        raise ReceiverError(f"{where}: statuses: expected a non-empty list of statuses")
    for status in value:
        if status not in STATUSES:
            raise ReceiverError(
                f"{where}: statuses: unknown status {status!r} (known: {', '.join(STATUSES)})"
            )
    return frozenset(value)


def check_url(url: Any, where: str) -> str:
    if not isinstance(url, str):
        raise ReceiverError(f"{where}: expected a string")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ReceiverError(f"{where}: must be an http:// or https:// URL with a host")
    if parts.fragment:
        raise ReceiverError(f"{where}: must not have a fragment")
    try:
        parts.port  # noqa: B018 (a bad port raises here)
    except ValueError:
        raise ReceiverError(f"{where}: the port is not a number in 0-65535") from None
    return url


def _default_name(url: str) -> str:
    parts = urlsplit(url)
    text = f"{parts.hostname}{'-' + str(parts.port) if parts.port else ''}{parts.path}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:64]
    return name or "webhook"


def receiver(table: Any, where: str) -> Receiver:
    """One ``[[webhooks]]`` table, checked."""
    if not isinstance(table, dict):
        raise ReceiverError(f"{where}: must be a table with url, secret_file and statuses")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ReceiverError(
            f"{where}: {unknown[0]}: unknown key (known: {', '.join(sorted(_KEYS))})"
        )
    if "url" not in table:
        raise ReceiverError(f"{where}: url: missing")
    url = check_url(table["url"], f"{where}: url")
    secret_file = table.get("secret_file")
    if not isinstance(secret_file, str) or not secret_file:
        raise ReceiverError(
            f"{where}: secret_file: missing (a file holding the whsec_... secret the receiver "
            "verifies signatures with)"
        )
    statuses = (
        parse_statuses(table["statuses"], where)
        if "statuses" in table
        else frozenset(DEFAULT_STATUSES)
    )
    name = table.get("name", _default_name(url))
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ReceiverError(
            f"{where}: name: {name!r}: 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return Receiver(name=name, url=url, secret_file=secret_file, statuses=statuses)


def parse_receivers(tables: list[Any], where: str) -> tuple[Receiver, ...]:
    """Every receiver, checked, with names that tell them apart."""
    found = tuple(receiver(t, f"{where}[{i}]") for i, t in enumerate(tables))
    seen: set[str] = set()
    for r in found:
        if r.name in seen:
            raise ReceiverError(
                f"{where}: two receivers are named {r.name!r}: give each its own `name`"
            )
        seen.add(r.name)
    return found
