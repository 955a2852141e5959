"""A fake OpenAI-compatible model, scripted per request.

The real servers under test (gptme-server, opencode) call a model over the
OpenAI chat-completions API. This one answers on loopback, and what it does is
chosen by the newest user message: a word ``scenario:NAME`` in it picks one of
:data:`SCENARIOS`. Without one, it answers a short text. Once the newest
message other than a system note is not the user's (a tool's output came
back), it answers a short text, so a tool loop ends.

Run alone: ``python -m tests.real.model --port 8700`` prints its base URL.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import time
from collections import Counter
from typing import Any

import orjson
from aiohttp import web

__all__ = ["SCENARIOS", "FakeModel"]

#: What each scenario does: answer, fail with a status, or call a tool.
SCENARIOS = {
    "ok": "a short answer, five tokens",
    "slow": "a long answer, one token every 0.2 s for 12 s",
    "medium": "an answer of 20 tokens, one every 0.2 s (4 s)",
    "401": "HTTP 401 invalid_api_key",
    "500": "HTTP 500 every time",
    "429": "HTTP 429 every time",
    "flaky": "HTTP 429 on the first two calls of this message, then a short answer",
    "failfirst": "HTTP 401 for 1.5 s from the first call of this message, then a short answer",
    "tool": "a shell tool call: `ls`",
    "slowtool": "a shell tool call that runs 3 s: `sleep 3`",
}
_SCENARIO = re.compile(r"scenario:([a-z0-9]+)")
INVALID_KEY = {
    "error": {
        "message": "Incorrect API key provided: sk-fake. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class FakeModel:
    """The model: an aiohttp app, and what it was asked (for failure messages)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.first_call: dict[str, float] = {}
        self.requests: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        app = web.Application()
        for prefix in ("", "/v1"):
            app.router.add_post(prefix + "/chat/completions", self._complete)
            app.router.add_get(prefix + "/models", self._models)
        app.router.add_get("/calls", self._calls)  # what was asked, for diagnosis
        self.log: list[tuple[float, str, str, int]] = []
        self.app = app

    async def _calls(self, request: web.Request) -> web.Response:
        return web.json_response(self.log)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "tests"}]}
        )

    def scenario(self, body: dict[str, Any]) -> tuple[str, str]:
        """The scenario, and the user message that names it (the scenario's key)."""
        # System notes (gptme appends a token budget) do not count; once the
        # newest other message is not the user's, a tool's output came back.
        messages = [
            m for m in body.get("messages", []) if isinstance(m, dict) and m.get("role") != "system"
        ]
        last = messages[-1] if messages else {}
        if last.get("role") != "user":
            return "ok", ""
        text = _text_of(last)
        found = _SCENARIO.search(text)
        return (found.group(1) if found else "ok"), text

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        name, text = self.scenario(body)
        key = name + ":" + text
        self.calls[key] += 1
        self.log.append((time.time(), name, key[-80:], len(body.get("messages", []))))
        first = self.first_call.setdefault(key, time.monotonic())
        if name == "401" or (name == "failfirst" and time.monotonic() - first < 1.5):
            return web.json_response(INVALID_KEY, status=401)
        if name == "500":
            return web.json_response(
                {"error": {"message": "The server had an error", "type": "server_error"}},
                status=500,
            )
        if name == "429" or (name == "flaky" and self.calls[key] <= 2):
            return web.json_response(
                {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}},
                status=429,
                headers={"Retry-After": "1"},
            )
        native_tools = bool(body.get("tools"))
        if name in ("tool", "slowtool"):
            command = "ls" if name == "tool" else "sleep 3"
            if native_tools:
                call = _tool_call(_tool_names(body), command)
                return await self._answer(request, body, [], tool_call=call)
            tokens = ["I will run it.\n\n", "```shell\n", command + "\n", "```\n"]
            return await self._answer(request, body, tokens)
        if name in ("slow", "medium"):
            tokens = [f"word{i} " for i in range(60 if name == "slow" else 20)]
            return await self._answer(request, body, tokens, pace=0.2)
        return await self._answer(request, body, ["Hello ", "from ", "the ", "fake ", "model."])

    async def _answer(
        self,
        request: web.Request,
        body: dict[str, Any],
        tokens: list[str],
        pace: float = 0.01,
        tool_call: dict[str, Any] | None = None,
    ) -> web.StreamResponse:
        ident = f"chatcmpl-{next(self._ids)}"
        model = str(body.get("model", "fake"))
        finish = "tool_calls" if tool_call else "stop"
        usage = {"prompt_tokens": 10, "completion_tokens": len(tokens), "total_tokens": 10}

        def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
            }

        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": "".join(tokens)}
            if tool_call:
                message["tool_calls"] = [tool_call]
            return web.json_response(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": 0,
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage,
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(obj: Any) -> None:
            await response.write(b"data: " + orjson.dumps(obj) + b"\n\n")

        try:
            await send(chunk({"role": "assistant", "content": ""}))
            for token in tokens:
                await asyncio.sleep(pace)
                await send(chunk({"content": token}))
            if tool_call:
                await send(chunk({"tool_calls": [{"index": 0, **tool_call}]}))
            await send(chunk({}, finish))
            if (body.get("stream_options") or {}).get("include_usage"):
                await send({**chunk({}), "choices": [], "usage": usage})
            await response.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            pass  # the server stopped reading (an interrupt)
        return response


def _tool_names(body: dict[str, Any]) -> set[str]:
    return {
        str(t.get("function", {}).get("name"))
        for t in body.get("tools") or []
        if isinstance(t, dict) and isinstance(t.get("function"), dict)
    }


def _tool_call(names: set[str], command: str) -> dict[str, Any]:
    """A native call of the server's shell tool: gptme's ``shell``, opencode's ``bash``."""
    if "shell" in names:
        name, args = "shell", {"command": command}
    else:
        name, args = "bash", {"command": command, "description": "Run " + command}
    arguments = orjson.dumps(args).decode()
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8700)
    args = parser.parse_args()
    print(f"fake model on http://127.0.0.1:{args.port}/v1", flush=True)
    web.run_app(FakeModel().app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
