"""A webhook receiver as a real process: it verifies each delivery as a receiver would.

    python -m tests.webhooks.receiver --port P --secret-file F --log FILE [--status 503]

Every POST is verified with the ``standardwebhooks`` reference library (and
its body checked against the published schema); a verified one is answered
``--status`` (204 by default) and appended to ``--log`` as one JSON line
(``at``: the wall-clock time it arrived, ``headers``, ``body``). One that
fails verification is answered 400 and logged with ``"rejected"``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from sidecar.core.schema import webhook_schema

SCHEMA = jsonschema.Draft202012Validator(webhook_schema())


def app(secret: str, log: Path, status: int) -> web.Application:
    verifier = Webhook(secret)

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items()}
        line: dict[str, object] = {"at": time.time(), "headers": headers}
        try:
            doc = verifier.verify(body, headers)
            SCHEMA.validate(doc)
        except (WebhookVerificationError, jsonschema.ValidationError, ValueError) as exc:
            line["rejected"] = f"{type(exc).__name__}: {exc}"
            with log.open("a") as f:
                f.write(json.dumps(line) + "\n")
            return web.Response(status=400)
        line["body"] = doc
        with log.open("a") as f:
            f.write(json.dumps(line) + "\n")
        return web.Response(status=status)

    application = web.Application()
    application.router.add_post("/{tail:.*}", receive)
    return application


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret-file", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--status", type=int, default=204)
    args = parser.parse_args()
    secret = Path(args.secret_file).read_text().splitlines()[0].strip()
    web.run_app(
        app(secret, Path(args.log), args.status),
        host="127.0.0.1",
        port=args.port,
        print=None,
        handle_signals=True,
        loop=asyncio.new_event_loop(),
    )


if __name__ == "__main__":
    main()


class ReceiverProcess:
    """The receiver above as a process the tests start, stop and read."""

    def __init__(self, directory: Path, secret_file: Path, status: int = 204) -> None:
        from ..support import free_port

        self.port = free_port()
        self.secret_file = secret_file
        self.log = directory / f"receiver-{self.port}.jsonl"
        self.status = status
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/sidecar"

    def start(self) -> None:
        root = Path(__file__).resolve().parents[2]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.webhooks.receiver", "--port", str(self.port),
             "--secret-file", str(self.secret_file), "--log", str(self.log),
             "--status", str(self.status)],
            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("the receiver exited at start-up")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1)
            except urllib.error.HTTPError:
                return  # it answers (405 to a GET)
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the receiver did not start")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def deliveries(self) -> list[dict[str, object]]:
        """Every verified delivery so far, in arrival order (a rejected one fails here)."""
        if not self.log.exists():
            return []
        lines = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        rejected = [line for line in lines if "rejected" in line]
        assert not rejected, f"the receiver rejected deliveries: {rejected}"
        return lines
