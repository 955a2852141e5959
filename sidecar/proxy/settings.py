"""The options the request path reads."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ProxySettings"]


@dataclass(frozen=True)
class ProxySettings:
    """A slice of ``sidecar.config.Settings`` (same names; the defaults are only
    there). See docs/configuration.md for each."""

    upstream: str
    preserve_host: bool
    connect_timeout: float
    response_timeout: float
    trigger_wait: float
    merge_limit: int
    max_merge_memory: int
    max_request_body: int
    max_ws_message: int
    body_timeout: float
    max_wait: float
    max_held: int
    cache: str
    cache_max_age: float
    cache_stale_while_revalidate: float
    cache_revalidations: int
    cache_max_bytes: int
    list_observe: int
    fan_out: bool
    fan_out_replay: int
    fan_out_client_bytes: int
