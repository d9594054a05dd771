"""The HTTP side: routes, auth, limits, and turning engine progress into OpenAI responses.

Design, and why. The event loop only moves bytes. A request's body is read with a size cap (413),
then parsed, validated, templated and tokenized on a small worker pool (`PREP_WORKERS` threads) so
that one huge or slow request cannot stall `/v1/models` or other clients. Its rows (prompts × n)
are capped per request (`max_rows_per_request`) and, in the engine, in total while waiting
(`max_queue`); past either the answer is 429 with `Retry-After`.

Each request then lives in an `_Exchange`: the engine's progress callbacks are forwarded into an
asyncio queue, and a watcher task reads the ASGI `receive` channel for `http.disconnect`. When the
client hangs up (streaming or not), or the request passes its deadline (`request_timeout_s`), the
exchange cancels its engine requests, which frees their rows at the next chunk boundary.

`/docs` and `/openapi.json` are off unless `docs=True`, and then behind the key like `/v1`. `/health`
(no key) reports the rows in use and waiting.

Several adapters (a multi-adapter Generator): each is a `model` id next to the base, and a request's
`model` becomes its rows' `Request.adapter`. `/v1/adapters` (GET, POST, DELETE) loads and removes
them while serving, behind the admin key and inside `--adapter-root` (adapters.py says how).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_e_jax import playground
from llama_e_jax.generate import sampling
from llama_e_jax.generate.session import GenerationError, Progress, Request, stable_text_end
from llama_e_jax.model.lora import AdapterError
from llama_e_jax.serve import prompts
from llama_e_jax.serve.adapters import (AdapterInfo, ModelRegistry, check_adapter_name, check_admin_key,
                                        read_adapter, resolve_inside)
from llama_e_jax.serve.engine import BatchingEngine, QueueFull
from llama_e_jax.serve.protocol import (AdapterBody, ApiError, ChatBody, CompletionBody, GenerationBody,
                                        parse_body, stop_strings)

log = logging.getLogger(__name__)

PREP_WORKERS = 2  # threads that parse and tokenize request bodies
DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
ADMIN_PATH = "/v1/adapters"  # behind the admin key, not the API key


class _Served:
    """What the route handlers share: the engine, the generator and the serving options."""

    def __init__(self, engine: BatchingEngine, api_key: str | None, template: str,
                 max_rows_per_request: int, request_timeout_s: float, max_body_bytes: int,
                 models: ModelRegistry, admin_key: str | None, adapter_root: Path | None) -> None:
        self.engine, self.generator = engine, engine.generator
        self.api_key, self.template = api_key, template
        self.max_rows_per_request, self.request_timeout_s = max_rows_per_request, request_timeout_s
        self.max_body_bytes = max_body_bytes
        self.models, self.admin_key, self.adapter_root = models, admin_key, adapter_root
        self.prep_pool = concurrent.futures.ThreadPoolExecutor(PREP_WORKERS, thread_name_prefix="serve-prep")

    async def off_loop(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.prep_pool, functools.partial(function, *args))


def create_app(engine: BatchingEngine, *, model_name: str, api_key: str | None = None, template: str = "chat",
               start_engine: bool = True, max_rows_per_request: int = 64, request_timeout_s: float = 600.0,
               max_body_bytes: int = 4 << 20, docs: bool = False,
               adapter_infos: Mapping[str, AdapterInfo] | None = None, admin_key: str | None = None,
               adapter_root: str | Path | None = None) -> FastAPI:
    """The FastAPI app; the engine thread runs while the app is served (lifespan) if `start_engine`.

    With a multi-adapter generator, the base is served as `model_name` and each adapter under its name
    (`adapter_infos` describes those loaded at start; default: names only). `admin_key` enables the
    /v1/adapters endpoints; POST loads only from inside `adapter_root`.
    """
    adapter_infos = adapter_infos or {}
    unknown = set(adapter_infos) - set(engine.generator.adapter_names)
    if unknown:
        raise ValueError(f"adapter_infos names adapters the generator does not have: {sorted(unknown)}")
    infos = {name: adapter_infos.get(name, AdapterInfo("", 0, (), int(time.time())))
             for name in engine.generator.adapter_names}
    served = _Served(engine, api_key, template, max_rows_per_request, request_timeout_s,
                     max_body_bytes, ModelRegistry(model_name, infos), admin_key,
                     None if adapter_root is None else Path(adapter_root))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            if start_engine:
                engine.stop()
            served.prep_pool.shutdown(wait=False, cancel_futures=True)

    hidden = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="llama_e_jax", lifespan=lifespan, **hidden)
    app.state.served = served
    app.add_middleware(_BearerAuth, api_key=api_key)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:  # for load balancers and bench/serve_load.py; no key: it tells only the load
        return {"status": "ok", "rows_in_use": engine.rows_in_use, "queued_rows": engine.queued_rows}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [served.models.card(model) for model in served.models.ids()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict:
        served.models.adapter_for(model_id)  # 404 if unknown
        return served.models.card(model_id)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await served.off_loop(parse_body, CompletionBody, await _read_body(served, request))
        served.models.adapter_for(body.model)  # 404 before any tokenizing
        _check_rows(served, prompts.prompt_count(body.prompt) * body.n)
        prepared = await served.off_loop(prompts.prepare_completion, served.generator, engine, body)
        return await _respond(served, request, body, prepared, kind="text_completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await served.off_loop(parse_body, ChatBody, await _read_body(served, request))
        served.models.adapter_for(body.model)
        _check_rows(served, body.n)
        prepared = await served.off_loop(prompts.prepare_chat, served.generator, engine, body, served.template)
        return await _respond(served, request, body, prepared, kind="chat.completion")

    _add_adapter_routes(app, served)
    playground.mount(app)  # the web page at / (llama_e_jax/playground/)
    return app


# ============================================================================= hot loading


def _add_adapter_routes(app: FastAPI, served: _Served) -> None:
    def require_admin(request: HttpRequest) -> None:
        check_admin_key(request.headers.get("authorization", ""), served.admin_key)
        if not served.generator.multi_adapter:
            raise ApiError(403, "hot loading is disabled: this server merged its adapter into the weights "
                           "(serve adapters by name, --adapter NAME=DIR, to keep the base unmerged)",
                           code="hot_loading_disabled")

    @app.get(ADMIN_PATH)
    async def list_adapters(request: HttpRequest) -> dict:
        require_admin(request)
        return {"object": "list", "data": [served.models.admin_card(name) for name in served.models.adapters]}

    @app.post(ADMIN_PATH)
    async def load_adapter(request: HttpRequest) -> dict:
        require_admin(request)
        body = await served.off_loop(parse_body, AdapterBody, await _read_body(served, request))
        check_adapter_name(body.name)
        directory = await served.off_loop(resolve_inside, served.adapter_root, body.path)  # 403/400 first
        served.models.reserve(body.name)  # 409 on a clash; the name stays invisible until committed
        try:
            adapter, lora_config = await served.off_loop(read_adapter, directory, served.generator.config)
            source, stack_before = str(directory), served.generator.stack_shape
            future = served.engine.add_adapter(body.name, adapter, lora_config, source=source)
            try:
                await asyncio.wrap_future(future)
            except (AdapterError, GenerationError) as error:
                raise ApiError(400, str(error), param="path", code="invalid_adapter") from None
            served.models.commit(body.name, AdapterInfo.of(source, lora_config))
        finally:
            served.models.release(body.name)
        log.info("loaded adapter %r from %s", body.name, directory)
        if served.generator.stack_shape != stack_before:
            log.warning("adapter %r did not fit the adapter stack %s: it grew to %s, so the next steps recompile "
                        "(size it with --max-adapters / --max-lora-rank)", body.name, stack_before,
                        served.generator.stack_shape)
        return served.models.admin_card(body.name)

    @app.delete(ADMIN_PATH + "/{name}")
    async def delete_adapter(name: str, request: HttpRequest) -> dict:
        require_admin(request)
        served.models.remove(name)  # hidden at once: later requests naming it get a 404
        try:
            await asyncio.wrap_future(served.engine.remove_adapter(name))
        except GenerationError as error:
            raise ApiError(404, str(error), code="model_not_found") from None
        log.info("removed adapter %r", name)
        return {"id": name, "object": "model", "deleted": True}


# ============================================================================= guards


class _BearerAuth:
    """Pure ASGI middleware: `Authorization: Bearer KEY` on /v1 and the docs (timing-safe compare).
    Pure ASGI, not BaseHTTPMiddleware, so the routes see the client's own `receive` (disconnects)."""

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        admin = path == ADMIN_PATH or path.startswith(ADMIN_PATH + "/")  # its own key, checked by its routes
        if scope["type"] == "http" and self.api_key is not None and not admin and \
                (path.startswith("/v1") or path in DOC_PATHS):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, key = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.api_key.encode()):
                message = "missing API key (send 'Authorization: Bearer <key>')" if not header else "incorrect API key"
                await ApiError(401, message, code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
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


async def _read_body(served: _Served, request: HttpRequest) -> bytes:
    limit = served.max_body_bytes
    too_big = ApiError(413, f"request body: larger than this server's limit of {limit} bytes",
                       code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_big
        parts.append(part)
    return b"".join(parts)


def _check_rows(served: _Served, rows: int) -> None:
    if rows > served.max_rows_per_request:
        raise ApiError(429, f"this request needs {rows} rows (prompts × n); this server allows at most "
                       f"{served.max_rows_per_request} per request: send fewer prompts or a smaller n",
                       param="n", code="rate_limit_exceeded", error_type="requests", headers={"Retry-After": "1"})


# ============================================================================= running a request


def _requests(body: GenerationBody, prepared: prompts.Prepared, adapter: str | None) -> list[Request]:
    """One engine Request per (prompt, choice); choice j of a seeded request samples with (seed, j)."""
    sampler = sampling.from_openai(temperature=body.temperature, top_p=body.top_p)
    seed = body.seed if body.seed is not None else uuid.uuid4().int % 2**32
    stop = stop_strings(body.stop)
    return [Request(list(ids), prepared.max_tokens, sampler, stop, seed=seed, stream=choice,
                    constraint=prepared.constraint, adapter=adapter)
            for ids in prepared.prompt_ids for choice in range(body.n)]


class _ClientGone(Exception):
    pass


class _Exchange:
    """One HTTP request's engine requests: progress in, cancellation out.

    The engine thread calls `on_update`; it is forwarded onto the event loop. `hang_up` (the client
    left) and the deadline cancel every unfinished request, so their rows are freed.
    """

    def __init__(self, served: _Served, http_request: HttpRequest, requests: list[Request]) -> None:
        self.requests = requests
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + served.request_timeout_s
        self.timeout_s = served.request_timeout_s
        self.inbox: asyncio.Queue[tuple[int, Progress] | None] = asyncio.Queue()
        for index, request in enumerate(requests):
            request.on_update = functools.partial(self._forward, index)
        try:
            served.engine.submit(requests)
        except GenerationError as error:
            raise ApiError(400, str(error)) from None
        except QueueFull as error:
            raise ApiError(429, str(error), code="rate_limit_exceeded", error_type="requests",
                           headers={"Retry-After": str(error.retry_after_s)}) from None
        self.watcher = asyncio.ensure_future(self._watch(http_request.receive))

    def _forward(self, index: int, progress: Progress) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown)
            self.loop.call_soon_threadsafe(self.inbox.put_nowait, (index, progress))

    async def _watch(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.cancel()
        self.inbox.put_nowait(None)

    def cancel(self) -> None:
        for request in self.requests:
            if not request.done:
                request.cancel()

    async def updates(self) -> AsyncIterator[tuple[int, Progress]]:
        """(choice index, progress) until every request finished; raises _ClientGone or TimeoutError."""
        unfinished = len(self.requests)
        try:
            while unfinished:
                async with asyncio.timeout_at(self.deadline):
                    item = await self.inbox.get()
                if item is None:
                    raise _ClientGone
                unfinished -= item[1].finish_reason is not None
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self.cancel()
        self.watcher.cancel()


def _failure(progress: Progress) -> ApiError | None:
    if progress.finish_reason == "error":
        return ApiError(500, "generation failed on the device; please retry", error_type="server_error")
    if progress.finish_reason == "cancelled":
        return ApiError(503, "the server is shutting down", error_type="server_error")
    return None


def _timeout(exchange: _Exchange) -> ApiError:
    return ApiError(504, f"the request ran past this server's --request-timeout of {exchange.timeout_s:g} s",
                    error_type="timeout", code="request_timeout")


async def _respond(served: _Served, http_request: HttpRequest, body: GenerationBody, prepared: prompts.Prepared,
                   kind: str):
    # Checked again: the adapter may have been deleted while the prompt was prepared (then 404).
    requests = _requests(body, prepared, served.models.adapter_for(body.model))
    prompt_tokens = sum(len(ids) for ids in prepared.prompt_ids)
    response_id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
    header = {"id": response_id, "created": int(time.time()), "model": body.model}
    exchange = _Exchange(served, http_request, requests)  # 400/429 here, before any response
    if body.stream:
        chunks = _stream(header, kind, exchange, prompt_tokens, body)
        return StreamingResponse(chunks, media_type="text/event-stream")
    final: dict[int, Progress] = {}
    try:
        async for index, progress in exchange.updates():
            if progress.finish_reason is not None:
                final[index] = progress
    except TimeoutError:
        raise _timeout(exchange) from None
    except _ClientGone:
        return JSONResponse({}, status_code=499)  # nobody reads it; the rows are already freed
    for progress in final.values():
        if (failure := _failure(progress)) is not None:
            raise failure
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


def _sse_error(error: ApiError) -> str:
    return _sse({"error": {"message": error.message, "type": error.error_type, "param": None, "code": error.code}})


async def _stream(header: dict, kind: str, exchange: _Exchange, prompt_tokens: int,
                  body: GenerationBody) -> AsyncIterator[str]:
    """SSE chunks: text deltas per choice as they become stable, a finish chunk each, [DONE]."""
    chunk_object = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"  # as OpenAI
    count = len(exchange.requests)
    sent, started, completion_tokens = [0] * count, [False] * count, [0] * count
    try:
        async for index, progress in exchange.updates():
            finished = progress.finish_reason is not None
            if finished and (failure := _failure(progress)) is not None:
                yield _sse_error(failure)
                return
            end = stable_text_end(progress.text, finished, exchange.requests[index].stop)
            delta = progress.text[sent[index]:end] if end > sent[index] else ""
            sent[index] = max(sent[index], end)
            completion_tokens[index] = progress.completion_tokens
            if delta or finished or not started[index]:
                choice = _chunk_choice(kind, index, delta, progress.finish_reason if finished else None,
                                       first=not started[index])
                started[index] = True
                yield _sse({**header, "object": chunk_object, "choices": [choice]})
    except TimeoutError:
        yield _sse_error(_timeout(exchange))
        return
    except _ClientGone:
        return
    finally:
        exchange.close()
    if body.stream_options is not None and body.stream_options.include_usage:
        yield _sse({**header, "object": chunk_object, "choices": [],
                    "usage": _usage(prompt_tokens, sum(completion_tokens))})
    yield _sse("[DONE]")
