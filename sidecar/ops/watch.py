"""``sidecar watch ID``: one conversation in a terminal, as its state changes.

It reads the state API of a running sidecar (``/_sidecar/conversations/{id}``,
the same options as the server: ``admin_port``, ``admin_host``, ``port``,
``host``, ``admin_token``, from the config file, ``SIDECAR_*`` variables or
flags; ``--url`` names another sidecar, ``--token-file`` reads the token
from a file). It prints the current state once, then one line per
transition as it happens (from the conversation's own list of transitions,
so none is missed between two reads unless more than the 20 it keeps come
within ``--interval``), and the webhooks waiting for it. It changes nothing.

``--until STATUS,...`` ends it when the conversation reaches one of them
(exit 0), ``--timeout`` after so many seconds (exit 1): a script can wait
for a step to end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from typing import Any, TextIO
from urllib.parse import quote

import aiohttp
import orjson

from ..config import Settings

__all__ = ["run_watch", "state_url"]


def state_url(settings: Settings, url: str | None) -> str:
    """Where the state API of the sidecar these settings describe answers."""
    if url:
        return url.rstrip("/")
    if settings.admin_port is not None:
        host, port = settings.admin_host, settings.admin_port
    else:
        host, port = settings.host, settings.port
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # listening everywhere: this host is one of them
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _line(at: str | None, state: dict[str, Any]) -> str:
    when = (at or "")[11:23] or "--:--:--.---"
    status = state.get("status", "?")
    stream = state.get("stream", "?")
    text = f"{when}  {status:<14} stream={stream:<12}"
    if state.get("last_error"):
        text += f" last_error={state['last_error']}"
    return text.rstrip()


async def run_watch(
    settings: Settings,
    resource_id: str,
    out: TextIO,
    *,
    url: str | None = None,
    token: str | None = None,
    interval: float = 0.5,
    until: Collection[str] = (),
    timeout: float | None = None,
) -> int:
    base = state_url(settings, url)
    token = token or settings.admin_token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    target = f"{base}/_sidecar/conversations/{quote(resource_id, safe='')}"
    print(f"watching {resource_id} at {base} (Ctrl-C ends)", file=out, flush=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: set[tuple[Any, ...]] = set()
    said: str | None = None
    first = True
    async with aiohttp.ClientSession(headers=headers) as http:
        while deadline is None or time.monotonic() < deadline:
            doc, problem = await _read(http, target)
            if problem is not None:
                if problem != said:
                    print(f"  ({problem})", file=out, flush=True)
                    said = problem
                if problem.startswith(("401", "404 not served", "421")):
                    return 2  # waiting will not help: the state API refuses us
            elif doc is not None:
                said = None
                snap = doc.get("snapshot") or {}
                transitions = doc.get("transitions") or []
                if first:
                    print("now:", _line(snap.get("updated_at"), snap), file=out)
                    seen.update(_key(t) for t in transitions)
                    first = False
                for t in transitions:
                    if _key(t) not in seen:
                        seen.add(_key(t))
                        print(_line(t.get("at"), t), file=out)
                tools = snap.get("pending_tools") or []
                if tools and snap.get("status") == "awaiting_tool":
                    shown = orjson.dumps(tools).decode()
                    key = ("tools", shown)
                    if key not in seen:
                        seen.add(key)
                        print(f"              waiting for a human: {shown[:300]}", file=out)
                out.flush()
                if snap.get("status") in until:
                    return 0
            await asyncio.sleep(interval)
    wanted = ", ".join(sorted(until)) if until else "the ones asked for"
    print(f"  (none of {wanted} within {timeout:g} s)", file=out)
    return 1


def _key(transition: dict[str, Any]) -> tuple[Any, ...]:
    return (transition.get("at"), transition.get("status"), transition.get("stream"))


async def _read(http: aiohttp.ClientSession, target: str) -> tuple[Any, str | None]:
    """The state API's answer, or why there is none."""
    try:
        async with http.get(target, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            body = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return None, f"the sidecar cannot be reached: {type(exc).__name__}: {exc}"
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = {}
    error = doc.get("error") if isinstance(doc, dict) else None
    if status == 200 and isinstance(doc, dict):
        return doc, None
    if status == 404 and "no snapshot" in str(error):
        return None, "no snapshot yet: the sidecar has not observed it; waiting"
    if status == 404:
        return None, f"404 not served: {error}"
    return None, f"{status} {error}" if error else f"{status} {body[:200]!r}"
