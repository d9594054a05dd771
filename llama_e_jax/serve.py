"""An OpenAI-compatible HTTP server for a (LoRA-tuned) LLaMA, so existing `openai` clients work unchanged.

    python -m llama_e_jax.serve --adapter runs/ads/adapter --api-key $KEY      # 127.0.0.1:8000
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (streaming as
server-sent events ending with `data: [DONE]`, or not), with `max_tokens`, `temperature`, `top_p`,
`stop`, `n`, `seed`, `stream_options.include_usage`, and `usage` counts. Chat completions take
`response_format` `{"type": "text"}` or `{"type": "json_schema", "json_schema": {"name": ...,
"schema": {...}}}` for a flat object of required string properties: decoding is then constrained
(structured.py) so the reply parses as that object. Chat prompts use the
model's chat template; `--template instruction` (or `"template": "instruction"` in a request body,
`extra_body` in the openai client) uses the Alpaca template LLaMA-E was tuned with instead: the last
user message is the instruction and an optional `"input"` body field its input.

How requests share the device. One `BatchingEngine` thread owns a `DecodeSession` (generate.py):
B cache rows that decode together in chunks of a few tokens. HTTP handlers only validate and
tokenize, then hand `Request`s to the engine; between chunks the engine admits waiting requests into
free rows (after a short wait when idle, so a burst is prefilled together), streams the new text
back to the handlers through thread-safe callbacks, and frees the rows of finished or disconnected
clients. So concurrent clients share decode steps instead of queueing behind each other, and a
request arriving mid-way starts at the next chunk boundary.

Errors use OpenAI's body (`{"error": {"message", "type", "param", "code"}}`): 400 for malformed
JSON, fields of the wrong type or range, unsupported options and prompts that do not fit the
context; 401 for a missing or wrong bearer key (when `--api-key` is set); 404 for an unknown model
or path. Everything is checked before a request reaches the engine, so a bad request never touches
the batch; should a decode step itself fail, the requests in flight get a 500 and the engine starts
a fresh session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_e_jax.generate import sampling
from llama_e_jax.generate import structured
from llama_e_jax.generate.engine import (GenerationError, Generator, Progress, Request, enable_compilation_cache,
                                  load_generator, stable_text_end)

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_CHOICES = 64
MAX_STOP_SEQUENCES = 4


# ============================================================================= errors


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# ============================================================================= request bodies


class _Strict(BaseModel):
    # strict: "5" is not an int and 1 is not a bool; extra fields are accepted (clients send many
    # optional ones) and the unsupported ones that would change the output are refused below.
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationBody(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None


class ContentPart(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: str
    content: str | list[ContentPart] | None = None


class ChatBody(_GenerationBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    template: Literal["chat", "instruction"] | None = None
    input: str = ""  # the instruction template's "### Input:" text
    response_format: dict[str, Any] | None = None  # text, or json_schema (structured.py)


class CompletionBody(_GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]  # text(s) or token ids, as OpenAI's API
    echo: bool = False


# Options that would change the output and that this server does not implement: refusing them
# beats returning something else than what was asked for. (field, value meaning "off"); a field the
# body declares (chat's response_format) is handled by its endpoint instead.
_UNSUPPORTED = (("frequency_penalty", 0), ("presence_penalty", 0), ("logit_bias", None), ("logit_bias", {}),
                ("logprobs", None), ("logprobs", False), ("top_logprobs", None), ("tools", None),
                ("functions", None), ("response_format", None), ("response_format", {"type": "text"}),
                ("best_of", None), ("best_of", 1), ("suffix", None), ("echo", False))


def _parse(body_type: type[_Strict], raw: bytes) -> Any:
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        body = body_type.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])  # e.g. "messages.0.content" or "stop.str"
        param = str(first["loc"][0]) if first["loc"] else None
        got = json.dumps(first.get("input"), default=str)[:80]
        raise ApiError(400, f"{where}: {first['msg']} (got {got})", param=param) from None
    off_values: dict[str, list[Any]] = {}
    for field, off in _UNSUPPORTED:
        off_values.setdefault(field, []).append(off)
    for field, offs in off_values.items():
        if field in payload and payload[field] not in offs and field not in body_type.model_fields:
            raise ApiError(400, f"{field}={json.dumps(payload[field])[:80]} is not supported by this server",
                           param=field, code="unsupported_parameter")
    return body


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", param="stop")
    return tuple(s for s in stops if s)


# ============================================================================= the batching engine


class BatchingEngine:
    """Runs one decoding session on a background thread and feeds it requests from any thread.

    Args:
      generator: the model.
      max_batch_size: cache rows decoded together.
      chunk_size: decode steps between looks at the queue (and streamed text updates).
      batch_wait_s: when idle, how long to wait after a first request for others to join its prefill.
    """

    def __init__(self, generator: Generator, *, max_batch_size: int = 16, chunk_size: int = 8,
                 batch_wait_s: float = 0.005) -> None:
        self.generator = generator
        self.max_batch_size, self.chunk_size, self.batch_wait_s = max_batch_size, chunk_size, batch_wait_s
        self.session = self._new_session()
        self.inbox: queue.Queue[list[Request]] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode chunks run (for tests and logs)
        self.max_rows_in_use = 0

    def _new_session(self):
        sampler = sampling.TopP(p=1.0, temperature=0.0)  # every request's values go in per row
        return self.generator.session(sampler, self.max_batch_size, self.generator.max_length, self.chunk_size)

    @property
    def max_length(self) -> int:
        return self.session.max_length

    def warmup(self) -> None:
        """Compiles prefill (one short prompt) and a decode chunk before serving."""
        done = Request([self.generator.tokenizer.bos_id or 0], 2, sampling.TopP(p=1.0, temperature=0.0))
        self.session.run([done])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="batching-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, requests: list[Request]) -> None:
        """Queues requests (raises GenerationError, before queueing anything, if one cannot run)."""
        for request in requests:
            self.session.check(request)
        self.inbox.put(requests)

    # ---------------------------------------------------------------- the thread

    def _loop(self) -> None:
        while not self._stopping.is_set():
            if not self.session.busy and not self._wait_for_work():
                continue
            self._take_inbox()
            try:
                self.session.step()
                self.steps += 1
                self.max_rows_in_use = max(self.max_rows_in_use, self.session.rows_in_last_chunk)
            except Exception:  # noqa: BLE001 - a failed step must not kill the server
                log.exception("decode step failed; failing the requests in flight and starting a new session")
                self._fail_in_flight()

    def _wait_for_work(self) -> bool:
        """Idle: block for a first request, then give a burst `batch_wait_s` to arrive together."""
        try:
            self._accept(self.inbox.get(timeout=0.1))
        except queue.Empty:
            return False
        deadline = time.monotonic() + self.batch_wait_s
        while len(self.session.queue) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
            try:
                self._accept(self.inbox.get(timeout=left))
            except queue.Empty:
                break
        return True

    def _take_inbox(self) -> None:
        while True:
            try:
                self._accept(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _accept(self, requests: list[Request]) -> None:
        for request in requests:
            self.session.queue.append(request)  # checked in submit()

    def _fail_in_flight(self) -> None:
        failed = [r for r in self.session.rows if r is not None] + list(self.session.queue)
        self.session = self._new_session()
        for request in failed:
            request.finish_reason = "error"
            if request.on_update is not None:
                request.on_update(request.progress())


# ============================================================================= the app


class _Served:
    """What the route handlers share: the engine, the generator and the serving options."""

    def __init__(self, engine: BatchingEngine, model_name: str, api_key: str | None, template: str) -> None:
        self.engine, self.generator = engine, engine.generator
        self.model_name, self.api_key, self.template = model_name, api_key, template
        self.created = int(time.time())


def create_app(engine: BatchingEngine, *, model_name: str, api_key: str | None = None,
               template: str = "chat", start_engine: bool = True) -> FastAPI:
    """The FastAPI app; the engine thread runs while the app is served (lifespan)."""
    served = _Served(engine, model_name, api_key, template)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            if start_engine:
                engine.stop()

    app = FastAPI(title="llama_e_jax", lifespan=lifespan)
    app.state.served = served

    @app.exception_handler(ApiError)
    async def api_error(_request: HttpRequest, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: HttpRequest, error: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return ApiError(error.status_code, str(error.detail), code=code).response()

    @app.exception_handler(Exception)
    async def server_error(_request: HttpRequest, error: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return ApiError(500, f"internal error: {type(error).__name__}", error_type="server_error").response()

    @app.middleware("http")
    async def bearer_auth(request: HttpRequest, call_next):
        if served.api_key is not None and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            scheme, _, key = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), served.api_key.encode()):
                message = "missing API key (send 'Authorization: Bearer <key>')" if not header else "incorrect API key"
                return ApiError(401, message, code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict:
        _check_model(served, model_id)
        return _model_card(served)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = _parse(CompletionBody, await request.body())
        _check_model(served, body.model)
        prompt_ids = _completion_prompts(served, body.prompt)
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
        return await _respond(served, body, prompt_ids, max_tokens, kind="text_completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = _parse(ChatBody, await request.body())
        _check_model(served, body.model)
        program = _response_program(served, body.response_format)
        prompt_ids = [_encode(served, _chat_prompt(served, body), "messages")]
        max_tokens = body.max_completion_tokens or body.max_tokens or served.engine.max_length
        return await _respond(served, body, prompt_ids, max_tokens, kind="chat.completion", program=program)

    return app


def _model_card(served: _Served) -> dict:
    return {"id": served.model_name, "object": "model", "created": served.created, "owned_by": "llama_e_jax"}


def _check_model(served: _Served, model: str) -> None:
    if model != served.model_name:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{served.model_name}'",
                       param="model", code="model_not_found")


def _message_text(message: Message, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"messages.{index}.content: only text parts are supported, got {part.type!r}",
                           param=f"messages.{index}.content")
        texts.append(part.text)
    return "".join(texts)


def _chat_prompt(served: _Served, body: ChatBody) -> str:
    """The prompt text: the chat template, or the Alpaca instruction template."""
    messages = [{"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(body.messages)]
    if (body.template or served.template) == "instruction":
        from llama_e_jax.data.prompt import build_prompt

        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise ApiError(400, "messages: the instruction template needs a user message", param="messages")
        return build_prompt(users[-1], body.input)
    tokenizer = served.generator.tokenizer
    if tokenizer.chat_template is None:
        raise ApiError(400, "this model has no chat template; send \"template\": \"instruction\" or use "
                       "/v1/completions", param="messages")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as error:  # noqa: BLE001 - jinja raises many types for bad conversations
        raise ApiError(400, f"messages: the chat template refused them: {error}", param="messages") from None


def _response_program(served: _Served, response_format: dict[str, Any] | None) -> list[int] | None:
    """The token program that constrains the reply (structured.py), or None for plain text."""
    try:
        program = structured.compile_response_format(response_format, served.generator.tokenizer.encode)
        if program is not None:
            served.engine.session.vocab_masks()  # the tokenizer must support it (built once, cached)
    except structured.SchemaError as error:
        raise ApiError(400, f"response_format: {error}", param="response_format",
                       code="unsupported_parameter") from None
    if program is None:
        return None
    limit = served.engine.session.program_length
    if len(program) > limit:
        raise ApiError(400, f"response_format: the schema's fixed text takes {len(program)} tokens; this server "
                       f"allows at most {limit} (fewer or shorter property names)", param="response_format",
                       code="unsupported_parameter")
    return program.tolist()


def _completion_prompts(served: _Served, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    """Token ids of each prompt; /v1/completions takes text, texts, token ids or lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt: at least one prompt is needed", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]  # one prompt given as token ids
    return [_encode(served, p, "prompt") for p in prompt]  # type: ignore[arg-type]


def _encode(served: _Served, text: str | list[int], param: str) -> list[int]:
    if isinstance(text, str):
        ids = served.generator.encode_prompt(text)
    else:
        vocab = served.generator.config.vocab_size
        ids = list(text)
        if any(not 0 <= i < vocab for i in ids):
            raise ApiError(400, f"{param}: token ids must be in [0, {vocab})", param=param)
    limit = served.engine.max_length
    if not ids:
        raise ApiError(400, f"{param}: the prompt is empty", param=param)
    if len(ids) >= limit:
        raise ApiError(400, f"{param}: this model's context is {limit} tokens; the prompt has {len(ids)} tokens "
                       "(at least one token must be left to generate)", param=param, code="context_length_exceeded")
    return ids


# ============================================================================= running a request


def _requests(body: _GenerationBody, prompt_ids: list[list[int]], max_tokens: int,
              program: list[int] | None = None) -> list[Request]:
    """One engine Request per (prompt, choice); choice j of a seeded request samples with (seed, j)."""
    sampler = sampling.from_openai(temperature=body.temperature, top_p=body.top_p)
    seed = body.seed if body.seed is not None else uuid.uuid4().int % 2**32
    stop = _stop_strings(body.stop)
    return [Request(list(ids), max_tokens, sampler, stop, seed=seed, stream=choice, program=program)
            for ids in prompt_ids for choice in range(body.n)]


async def _updates(served: _Served, requests: list[Request]) -> AsyncIterator[tuple[int, Progress]]:
    """(choice index, progress) as the engine produces them, until every request finished.

    Leaving early (a client disconnect) cancels the unfinished requests, which frees their rows.
    """
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[int, Progress]] = asyncio.Queue()

    def forward(index: int, progress: Progress) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown)
            loop.call_soon_threadsafe(inbox.put_nowait, (index, progress))

    for index, request in enumerate(requests):
        request.on_update = lambda progress, index=index: forward(index, progress)
    try:
        served.engine.submit(requests)
    except GenerationError as error:
        raise ApiError(400, str(error)) from None
    unfinished = len(requests)
    try:
        while unfinished:
            index, progress = await inbox.get()
            unfinished -= progress.finish_reason is not None
            yield index, progress
    finally:
        for request in requests:
            if not request.done:
                request.cancel()


async def _respond(served: _Served, body: _GenerationBody, prompt_ids: list[list[int]], max_tokens: int,
                   kind: str, program: list[int] | None = None):
    requests = _requests(body, prompt_ids, max_tokens, program)
    prompt_tokens = sum(len(ids) for ids in prompt_ids)
    response_id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
    header = {"id": response_id, "created": int(time.time()), "model": served.model_name}
    if body.stream:
        updates = _updates(served, requests)
        first = await anext(updates, None)  # a validation error still becomes a plain 400 response
        chunks = _stream(header, kind, requests, first, updates, prompt_tokens, body)
        return StreamingResponse(chunks, media_type="text/event-stream")
    final: dict[int, Progress] = {}
    async for index, progress in _updates(served, requests):
        if progress.finish_reason is not None:
            final[index] = progress
    if any(p.finish_reason == "error" for p in final.values()):
        raise ApiError(500, "generation failed on the device; please retry", error_type="server_error")
    choices = [_choice(kind, index, final[index].text, final[index].finish_reason) for index in range(len(requests))]
    completion_tokens = sum(p.completion_tokens for p in final.values())
    return {**header, "object": kind, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(kind: str, index: int, text: str, finish_reason: str | None) -> dict:
    if kind == "chat.completion":
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def _chunk_choice(kind: str, index: int, text: str | None, finish_reason: str | None, *, first: bool) -> dict:
    if kind == "chat.completion":
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        elif first:
            delta["content"] = ""
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(header: dict, kind: str, requests: list[Request], first: tuple[int, Progress] | None,
                  updates: AsyncIterator[tuple[int, Progress]], prompt_tokens: int,
                  body: _GenerationBody) -> AsyncIterator[str]:
    """SSE chunks: text deltas per choice as they become stable, a finish chunk each, [DONE]."""
    chunk_object = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"  # as OpenAI
    sent = [0] * len(requests)
    started = [False] * len(requests)
    completion_tokens = [0] * len(requests)
    pending = [] if first is None else [first]
    try:
        while True:
            for index, progress in pending:
                finished = progress.finish_reason is not None
                if finished and progress.finish_reason == "error":
                    yield _sse({"error": {"message": "generation failed on the device", "type": "server_error",
                                          "param": None, "code": None}})
                    return
                end = stable_text_end(progress.text, finished, requests[index].stop)
                delta = progress.text[sent[index]:end] if end > sent[index] else ""
                sent[index] = max(sent[index], end)
                completion_tokens[index] = progress.completion_tokens
                if delta or finished or not started[index]:
                    choice = _chunk_choice(kind, index, delta, progress.finish_reason if finished else None,
                                           first=not started[index])
                    started[index] = True
                    yield _sse({**header, "object": chunk_object, "choices": [choice]})
            item = await anext(updates, None)
            if item is None:
                break
            pending = [item]
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _sse({**header, "object": chunk_object, "choices": [],
                        "usage": _usage(prompt_tokens, sum(completion_tokens))})
        yield _sse("[DONE]")
    finally:
        await updates.aclose()


# ============================================================================= running the server


class ServerThread:
    """Serves an app on 127.0.0.1 from a background thread (tests, notebooks).

        with ServerThread(app) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key=...)
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = self.socket.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama_e_jax.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="GGUF file or HF checkpoint dir (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", help="LoRA adapter directory (ours or PEFT), merged into the weights")
    parser.add_argument("--tokenizer", help="tokenizer dir or GGUF (default: from --model)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--model-name", default="llama-e", help="the id clients pass as `model`")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 request")
    parser.add_argument("--template", default="chat", choices=("chat", "instruction"),
                        help="prompt format of /v1/chat/completions (a request's 'template' field overrides)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together")
    parser.add_argument("--max-context", type=int, default=2048, help="cache slots per sequence (prompt + output)")
    parser.add_argument("--chunk-size", type=int, default=8, help="decode steps between scheduling decisions")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="wait for a burst to batch its prefill")
    parser.add_argument("--no-warmup", action="store_true", help="skip compiling before accepting requests")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    enable_compilation_cache()
    generator = load_generator(args.model, args.adapter, dtype=args.dtype, tokenizer=args.tokenizer,
                               max_batch_size=args.max_batch_size, max_length=args.max_context)
    engine = BatchingEngine(generator, max_batch_size=args.max_batch_size, chunk_size=args.chunk_size,
                            batch_wait_s=args.batch_wait_ms / 1000)
    if not args.no_warmup:
        started = time.perf_counter()
        engine.warmup()
        log.info("compiled in %.1f s", time.perf_counter() - started)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", args.host)
    app = create_app(engine, model_name=args.model_name, api_key=args.api_key, template=args.template)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
