"""Fixtures of the webhook tests: secrets, receivers in this process and as processes."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from sidecar.webhooks.receivers import Receiver, parse_receivers

from ..conftest import Start
from .receiver import SCHEMA, ReceiverProcess


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhook-secret"
    path.write_text(new_secret() + "\n")
    return path


@dataclass
class Hook:
    """A receiver in the test's own loop: verifies, records, answers as told."""

    secret: str
    url: str = ""
    #: Statuses to answer, in turn (then 204 for good).
    answers: list[int] = field(default_factory=list)
    #: Seconds to wait before answering (a slow receiver).
    delay: float = 0.0
    #: Verify signatures and the schema (off: bodies the test wrote itself).
    check: bool = True
    got: list[dict[str, Any]] = field(default_factory=list)
    tries: list[dict[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        if self.check:
            doc = Webhook(self.secret).verify(body, headers)
            SCHEMA.validate(doc)
        else:
            doc = orjson.loads(body)
        self.tries.append(headers)
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.answers.pop(0) if self.answers else 204
        if 200 <= status < 300:
            self.got.append({"id": headers["webhook-id"], **doc})
        return web.Response(status=status)

    def bodies(self, conversation: str | None = None) -> list[dict[str, Any]]:
        return [
            g
            for g in self.got
            if conversation is None or g["data"]["conversation_id"] == conversation
        ]

    def receiver(self, secret_file: Path, name: str, **table: Any) -> Receiver:
        return parse_receivers(
            [{"url": self.url, "secret_file": str(secret_file), "name": name, **table}], "test"
        )[0]


@pytest.fixture
def hook(serve: Start, secret_file: Path) -> Callable[..., Awaitable[Hook]]:
    secret = secret_file.read_text().strip()

    async def start(**options: Any) -> Hook:
        made = Hook(secret, **options)
        app = web.Application()
        app.router.add_post("/hook", made.handle)
        server = await serve(app)
        made.url = str(server.make_url("/hook"))
        return made

    return start


@pytest.fixture
def receiver_process(tmp_path: Path, secret_file: Path) -> Iterator[Callable[..., ReceiverProcess]]:
    made: list[ReceiverProcess] = []

    def make(status: int = 204) -> ReceiverProcess:
        process = ReceiverProcess(tmp_path, secret_file, status)
        made.append(process)
        return process

    yield make
    for process in made:
        process.stop()


def payloads(deliveries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each distinct webhook once (at least once: an id may come twice), in arrival order."""
    seen: set[str] = set()
    out = []
    for delivery in deliveries:
        headers = {k.lower(): v for k, v in delivery["headers"].items()}
        if headers["webhook-id"] in seen:
            continue
        seen.add(headers["webhook-id"])
        out.append({"id": headers["webhook-id"], **delivery["body"]})
    return out


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()
