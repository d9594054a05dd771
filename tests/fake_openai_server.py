"""A tiny OpenAI-compatible HTTP server for tests, with faults injected on a schedule.

It speaks `GET /v1/models` and `POST /v1/chat/completions` in OpenAI's JSON shape on 127.0.0.1 (a
free port, a background thread), so the real `openai` client, and therefore the real retry, timeout
and parsing code paths, can be exercised without a network or a model.

Replies are deterministic functions of the request (`default_reply`): the server reads the JSON
shape the prompt asks for (`{"instruction": "...", ...}`) and the seed fields between
`<instruction>` / `<input>` / `<response>` tags, and returns a JSON object with those keys whose
values derive from the seed text and a hash of the whole prompt. Token usage is the word count of
prompt and reply, so budgets can be checked exactly.

Faults are keyed by the 1-based number of the chat request (`faults={2: "429", 5: "slow"}`) or
given as a callable `number -> fault | None`:

    "429"               HTTP 429 with Retry-After: 0
    "500"               HTTP 500
    "401"               HTTP 401 (a bad key)
    "slow"              sleep `slow_seconds` (longer than the client timeout), then reply normally
    "malformed_content" HTTP 200 whose message content is not JSON
    "malformed_body"    HTTP 200 whose body is not JSON at all

`echo_auth_in_errors=True` makes error bodies quote the Authorization header, as some proxies do,
to prove that a client never logs what a server sends back.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

FAULTS = ("429", "500", "401", "slow", "malformed_content", "malformed_body")

_SHAPE = re.compile(r'\{"\w+": "\.\.\."(?:, "\w+": "\.\.\.")*\}')


def _tag(text: str, name: str) -> str:
    match = re.search(rf"<{name}>\n(.*?)\n</{name}>", text, re.DOTALL)
    return match.group(1) if match else ""


def default_reply(messages: list[dict[str, Any]]) -> str:
    """A JSON object with the keys the prompt asks for, derived from the prompt."""
    prompt = messages[-1]["content"]
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
    shape = _SHAPE.search(prompt)
    keys = list(json.loads(shape.group(0))) if shape else ["instruction", "input", "output"]
    instruction, seed_input = _tag(prompt, "instruction"), _tag(prompt, "input")
    values = {
        "instruction": f"Variant {digest}: {instruction}",
        "input": f"{seed_input} (edition {digest})" if seed_input else "",
        "output": f"Answer {digest} to: {instruction}",
    }
    return json.dumps({k: values.get(k, f"{k} {digest}") for k in keys})


class FakeOpenAIServer:
    """Start with `with FakeOpenAIServer(...) as server:`; point a client at `server.base_url`."""

    def __init__(
        self,
        faults: Mapping[int, str] | Callable[[int], str | None] | None = None,
        *,
        slow_seconds: float = 1.0,
        reply_delay: float = 0.0,
        reply_fn: Callable[[list[dict[str, Any]]], str] = default_reply,
        echo_auth_in_errors: bool = False,
    ):
        schedule = faults or {}
        self._fault_for: Callable[[int], str | None] = schedule if callable(schedule) else schedule.get
        self.slow_seconds = slow_seconds
        self.reply_delay = reply_delay
        self.reply_fn = reply_fn
        self.echo_auth_in_errors = echo_auth_in_errors
        self.requests: list[dict[str, Any]] = []  # one per chat request: number, fault, body, auth
        self._lock = threading.Lock()
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # do not wait for "slow" replies at shutdown
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def num_chat_requests(self) -> int:
        with self._lock:
            return len(self.requests)

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _register(self, body: dict[str, Any], auth: str) -> tuple[int, str | None]:
        with self._lock:
            number = len(self.requests) + 1
            fault = self._fault_for(number)
            self.requests.append({"number": number, "fault": fault, "body": body, "authorization": auth})
        return number, fault

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _send(self, status: int, payload: bytes, headers: Mapping[str, str] = {}) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def _error(self, status: int, message: str, headers: Mapping[str, str] = {}) -> None:
                if server.echo_auth_in_errors:
                    message += f" (you sent Authorization: {self.headers.get('Authorization', '')})"
                body = {"error": {"message": message, "type": "fake_error", "code": str(status)}}
                self._send(status, json.dumps(body).encode(), headers)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    models = {"object": "list", "data": [{"id": "fake-teacher", "object": "model", "owned_by": "tests"}]}
                    self._send(200, json.dumps(models).encode())
                else:
                    self._error(404, f"no route {self.path}")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._error(404, f"no route {self.path}")
                    return
                number, fault = server._register(body, self.headers.get("Authorization", ""))
                if fault == "429":
                    self._error(429, "rate limited", {"Retry-After": "0"})
                elif fault == "500":
                    self._error(500, "internal error")
                elif fault == "401":
                    self._error(401, "invalid api key")
                elif fault == "malformed_body":
                    self._send(200, b'{"id": "chatcmpl-broken", "choices": [')
                else:
                    if fault == "slow":
                        time.sleep(server.slow_seconds)
                    elif server.reply_delay:
                        time.sleep(server.reply_delay)
                    content = "Sure! {not json" if fault == "malformed_content" else server.reply_fn(body["messages"])
                    self._send(200, json.dumps(_completion(number, body, content)).encode())

        return Handler


def _completion(number: int, body: dict[str, Any], content: str) -> dict[str, Any]:
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    completion_tokens = len(content.split())
    return {
        "id": f"chatcmpl-{number}",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "fake-teacher"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
