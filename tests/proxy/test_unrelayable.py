"""An upstream answer the sidecar cannot relay as it came (a control
character in a header value, which RFC 9110 section 5.5 forbids) is the
upstream's fault: the client gets the sidecar's 502 whatever the method,
the connection goes on, and nothing is logged as the sidecar's own error."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from .test_security import raw, sidecar_port


@pytest.fixture
async def bad_upstream() -> AsyncIterator[str]:
    """Answers every request with ``X-Bad: a\\x01b\\x7fc``, then a body."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                body = b'{"ok": true}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"X-Bad: a\x01b\x7fc\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()


@pytest.mark.parametrize("front_door", [True, False])
async def test_a_control_character_in_an_upstream_header_is_a_502_and_the_pipeline_goes_on(
    bad_upstream: str, start_sidecar, caplog, front_door: bool
) -> None:
    sc = await start_sidecar(bad_upstream, front_door=front_door)
    requests = b"".join(
        [
            b"POST /api/v2/conversations/c HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
            b"GET /api/v2/conversations HTTP/1.1\r\nHost: x\r\n\r\n",
            b"DELETE /api/v2/conversations/c HTTP/1.1\r\nHost: x\r\n\r\n",
            b"PUT /api/v2/conversations/c HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
            b"GET /api/v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ]
    )
    with caplog.at_level(logging.INFO):
        answer = await raw(sidecar_port(sc), requests, read_for=5)
    assert answer.count(b"HTTP/1.1 502 ") == 5, answer
    assert answer.count(b'"source":"sidecar"') == 5
    assert b"\x01" not in answer and b"\x7f" not in answer
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
