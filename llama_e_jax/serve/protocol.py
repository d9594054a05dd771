"""The OpenAI wire format: request bodies, their validation, and the error body.

Design, and why. Everything a client sends is checked here, before it reaches a tokenizer or the
engine, so that no input can crash a handler or a decode step:

- the raw body is parsed by `parse_body` (run off the event loop by the app), which refuses JSON
  nested deeper than `MAX_JSON_DEPTH` (the C parser would raise RecursionError at ~1,000 levels and
  pydantic and the schema compiler recurse too) and strings that are not valid Unicode (a lone
  surrogate such as "\\ud800" is legal JSON but cannot be encoded to UTF-8, so no tokenizer takes it);
  the error names the field, e.g. `messages.0.content`;
- pydantic models in strict mode check types and ranges ("5" is not an int, 1 is not a bool);
- options that would change the output and that the server does not implement are refused rather
  than silently ignored (`UNSUPPORTED`).

Every refusal is an `ApiError`, answered with OpenAI's body
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# OpenAI's chat default is "what the context has left", bounded by each model's output limit (4,096
# tokens for gpt-4-turbo). A small model rarely writes anything useful past a few hundred tokens, and
# an unbounded default lets one forgetful client hold a row for the whole context: ours is 512,
# bounded by the context left after the prompt.
DEFAULT_CHAT_MAX_TOKENS = 512
MAX_CHOICES = 128  # OpenAI's bound on `n`; the server's --max-rows-per-request usually binds first
MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_STOP_CHARS = 128  # each stop string is matched against the growing text after every chunk
MAX_JSON_DEPTH = 32  # a chat body needs 5 levels; a response_format schema a few more
ROLES = ("system", "developer", "user", "assistant")  # tool/function messages need tools (unsupported)


class ApiError(Exception):
    """An error answered with OpenAI's error body (and optional headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type
        self.headers = headers

    def response(self) -> JSONResponse:
        # backslashreplace: an error message must never fail to encode (that would be a 500)
        message = self.message.encode("utf-8", "backslashreplace").decode("utf-8")
        body = {"error": {"message": message, "type": self.error_type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ============================================================================= request bodies


class _Strict(BaseModel):
    # strict: "5" is not an int and 1 is not a bool; extra fields are accepted (clients send many
    # optional ones) and the unsupported ones that would change the output are refused below.
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False


class GenerationBody(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-2**63, le=2**64 - 1)
    guided_choice: list[str] | None = Field(default=None, min_length=1)  # vLLM's names: the reply is one of
    guided_regex: str | None = Field(default=None, min_length=1)  # these / matches this regex in full


class ContentPart(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: str | list[ContentPart] | None = None


class ChatBody(GenerationBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    template: Literal["chat", "instruction"] | None = None
    input: str = ""  # the instruction template's "### Input:" text
    response_format: dict[str, Any] | None = None  # text, json_schema or json_object (generate/guided.py)


class CompletionBody(GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]  # text(s) or token ids, as OpenAI's API
    echo: bool = False


# Options that would change the output and that this server does not implement: refusing them
# beats returning something else than what was asked for. (field, value meaning "off"); a field the
# body declares (chat's response_format) is handled by its endpoint instead.
UNSUPPORTED = (("frequency_penalty", 0), ("presence_penalty", 0), ("logit_bias", None), ("logit_bias", {}),
               ("logprobs", None), ("logprobs", False), ("top_logprobs", None), ("tools", None),
               ("functions", None), ("response_format", None), ("response_format", {"type": "text"}),
               ("best_of", None), ("best_of", 1), ("suffix", None), ("echo", False))


class AdapterBody(_Strict):
    """POST /v1/adapters: serve the adapter in `path` (inside --adapter-root) as model `name`."""

    name: str = Field(min_length=1, max_length=64)
    path: str = Field(min_length=1, max_length=4096)


def parse_body(body_type: type[_Strict], raw: bytes) -> Any:
    """The validated body, or an ApiError(400) naming what is wrong and where."""
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"request body is not valid JSON: {error}") from None
    except RecursionError:
        raise ApiError(400, f"request body: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "request body must be a JSON object")
    check_json(payload)
    try:
        body = body_type.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])  # e.g. "messages.0.content" or "stop.str"
        param = str(first["loc"][0]) if first["loc"] else None
        got = json.dumps(first.get("input"), default=str)[:80]
        raise ApiError(400, f"{where}: {first['msg']} (got {got})", param=param) from None
    off_values: dict[str, list[Any]] = {}
    for field, off in UNSUPPORTED:
        off_values.setdefault(field, []).append(off)
    for field, offs in off_values.items():
        if field in payload and payload[field] not in offs and field not in body_type.model_fields:
            raise ApiError(400, f"{field}={json.dumps(payload[field])[:80]} is not supported by this server",
                           param=field, code="unsupported_parameter")
    return body


def check_json(payload: dict) -> None:
    """Refuses nesting deeper than MAX_JSON_DEPTH and strings (values or keys) that are not valid
    Unicode, naming the field. Iterative, so a deep document cannot exhaust the stack."""
    stack: list[tuple[Any, tuple, int]] = [(payload, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"{_dotted(path)}: JSON nested deeper than {MAX_JSON_DEPTH} levels",
                           param=_param(path))
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                _check_text(key, path)
            if isinstance(item, (str, dict, list)):  # numbers, booleans and null need no look
                stack.append((item, (*path, key), depth + 1))


def _check_text(text: str, path: tuple) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ApiError(400, f"{_dotted(path)}: invalid Unicode: a lone surrogate (U+{ord(text[error.start]):04X}) at "
                       f"character {error.start}; text must be valid UTF-8", param=_param(path)) from None


def _dotted(path: tuple) -> str:
    return ".".join(str(part) for part in path) or "request body"


def _param(path: tuple) -> str | None:
    return str(path[0]) if path else None


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop: each sequence may have at most {MAX_STOP_CHARS} characters", param="stop")
    return tuple(s for s in stops if s)
