"""The server under abuse and abandonment (issue 16) and the engine's thread contract (issue 11).

Each probe of the issue is rerun as written, at a tiny scale: a random 2-layer LLaMA with SmolLM2's
real tokenizer and chat template (so the template and tokenizer paths that used to crash are the
real ones). Hypothesis-generated bodies go to the ASGI app in process and must never get a 5xx;
clients that hang up, alone or in a storm, must leave no row in use.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import threading
import time

import httpx
import jax
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings, strategies as st

from llama_e_jax import serve as S
from llama_e_jax.generate.generator import Generator
from llama_e_jax.generate.session import Progress, Request
from llama_e_jax.generate import sampling
from llama_e_jax.io import adapters as adapters_io
from llama_e_jax.io.load import load_model
from llama_e_jax.io.tokenizer import load_tokenizer
from llama_e_jax.model import lora
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.serve import prompts as P
from llama_e_jax.serve.protocol import DEFAULT_CHAT_MAX_TOKENS, MAX_JSON_DEPTH

MODEL, KEY, CONTEXT, ROWS, CHUNK = "tiny", "k", 128, 8, 4
HEADERS = {"Authorization": f"Bearer {KEY}"}
STEP_DELAY_S = 0.03  # the slow engine's extra time per chunk: long enough to hang up mid-request


@pytest.fixture(scope="module")
def generator(smollm2_hf_dir):
    from conftest import random_params

    tokenizer = load_tokenizer(smollm2_hf_dir)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         max_position_embeddings=CONTEXT, eos_token_ids=(tokenizer.eos_id,))
    return Generator(config, random_params(config, seed=3), tokenizer, max_batch_size=ROWS, max_length=CONTEXT,
                       chunk_size=CHUNK)


class SlowEngine(S.BatchingEngine):
    """Each decode chunk takes STEP_DELAY_S longer, and chunk number `fail_every` × k raises: a CPU-sized
    stand-in for a big model, and a way to make the engine swap sessions while clients submit."""

    def __init__(self, *args, fail_every: int = 0, **kwargs) -> None:
        self.fail_every, self.chunks = fail_every, 0
        super().__init__(*args, **kwargs)

    def _new_session(self):
        session = super()._new_session()
        step = session.step

        def slow_step() -> None:
            self.chunks += 1
            time.sleep(STEP_DELAY_S)
            if self.fail_every and self.chunks % self.fail_every == 0:
                raise RuntimeError("injected device failure")
            step()

        session.step = slow_step
        return session


def wait_idle(engine: S.BatchingEngine, timeout_s: float) -> float:
    """Seconds until the engine held no row and nothing waited (fails past timeout_s)."""
    started = time.monotonic()
    while not engine.idle:
        assert time.monotonic() - started < timeout_s, (engine.rows_in_use, engine.queued_rows)
        time.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def client(generator):
    """The ASGI app in process (TestClient runs its lifespan, so the engine thread runs)."""
    # 2 rows: few prefill shapes to compile (row count × prompt length buckets), so the fuzz stays fast
    engine = S.BatchingEngine(generator, max_batch_size=2, chunk_size=CHUNK, batch_wait_s=0.0, max_queue=32)
    app = S.create_app(engine, model_name=MODEL, api_key=KEY, max_rows_per_request=16, max_body_bytes=1 << 16)
    with TestClient(app, headers=HEADERS, raise_server_exceptions=False) as test_client:
        yield test_client, engine


@pytest.fixture(scope="module")
def slow_server(generator):
    engine = SlowEngine(generator, max_batch_size=ROWS, chunk_size=CHUNK, batch_wait_s=0.0, max_queue=64)
    with S.ServerThread(S.create_app(engine, model_name=MODEL, api_key=KEY, max_rows_per_request=16)) as thread:
        yield thread, engine


def assert_openai_error(response: httpx.Response, status: int, *, param: str | None = None, says: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert says in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    return error


# ============================================================================= the probes, as written


@pytest.mark.parametrize("path,body,param,field", [
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a\ud800b"}]},
     "messages", "messages.0.content"),
    ("/v1/completions", {"model": MODEL, "prompt": "\ud800"}, "prompt", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["ok", "x\udfff"]}, "prompt", "prompt.1"),
])
def test_lone_surrogate_is_a_400_naming_the_field_and_the_connection_lives(client, path, body, param, field):
    test_client, _ = client
    raw = json.dumps(body).encode()  # json escapes the surrogate as "\ud800": legal JSON, invalid Unicode
    response = test_client.post(path, content=raw, headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 400, param=param, says=f"{field}: invalid Unicode")
    assert "surrogate" in error["message"]
    fine = test_client.post("/v1/completions", json={"model": MODEL, "prompt": "fine", "max_tokens": 2})
    assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] >= 1


def test_deep_json_is_a_400(client):
    test_client, _ = client
    for depth in (30_000, MAX_JSON_DEPTH + 1):  # 30,000: deeper than the recursion limit, within the body cap
        raw = b'{"model": "tiny", "prompt": "x", "extra": ' + b"[" * depth + b"]" * depth + b"}"
        assert_openai_error(test_client.post("/v1/completions", content=raw), 400, says="nested deeper")


def test_body_over_the_limit_is_a_413(client):
    test_client, _ = client
    raw = json.dumps({"model": MODEL, "prompt": "x" * (1 << 16)}).encode()
    assert_openai_error(test_client.post("/v1/completions", content=raw), 413, says="limit of 65536 bytes")


def test_docs_are_off_by_default_and_behind_the_key_when_on(client, generator):
    test_client, _ = client
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert test_client.get(path).status_code == 404
    engine = S.BatchingEngine(generator, max_batch_size=ROWS, chunk_size=CHUNK)
    with TestClient(S.create_app(engine, model_name=MODEL, api_key=KEY, docs=True, start_engine=False)) as docs:
        assert docs.get("/openapi.json").status_code == 401
        assert docs.get("/openapi.json", headers=HEADERS).status_code == 200


def test_max_tokens_beyond_the_context_is_a_400_with_the_limit(client):
    test_client, _ = client
    response = test_client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": CONTEXT})
    error = assert_openai_error(response, 400, param="max_tokens", says=f"context is {CONTEXT} tokens")
    assert error["code"] == "context_length_exceeded"
    response = test_client.post("/v1/chat/completions", json={"model": MODEL, "max_completion_tokens": 10_000,
                                                               "messages": [{"role": "user", "content": "hi"}]})
    assert_openai_error(response, 400, param="max_completion_tokens", says=f"context is {CONTEXT} tokens")


def test_unknown_role_is_a_400(client):
    test_client, _ = client
    response = test_client.post("/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "wizard", "content": "hi"}]})
    assert_openai_error(response, 400, param="messages", says="messages.0.role")


def test_chat_default_max_tokens_is_bounded(generator):
    class WideEngine:  # only the context is read when budgeting
        max_length = 4096

    body = S.protocol.ChatBody.model_validate({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert P.prepare_chat(generator, WideEngine(), body, "chat").max_tokens == DEFAULT_CHAT_MAX_TOKENS == 512
    prepared = P.prepare_chat(generator, type("Narrow", (), {"max_length": CONTEXT})(), body, "chat")
    assert prepared.max_tokens == CONTEXT - len(prepared.prompt_ids[0])  # bounded by the context left


def test_prompts_times_n_past_the_cap_is_a_429(client):
    test_client, engine = client
    steps = engine.steps
    response = test_client.post("/v1/completions", json={"model": MODEL, "prompt": ["hi"] * 64, "n": 64,
                                                          "max_tokens": 1})
    error = assert_openai_error(response, 429, says="4096 rows")
    assert error["code"] == "rate_limit_exceeded" and response.headers["retry-after"] == "1"
    assert engine.steps == steps and engine.idle  # nothing reached the engine


def test_queue_past_the_cap_is_a_429_with_retry_after(slow_server):
    thread, engine = slow_server
    body = {"model": MODEL, "prompt": ["hold"] * 16, "max_tokens": 40}

    def post() -> httpx.Response:
        return httpx.post(thread.base_url + "/completions", json=body, headers=HEADERS, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: post(), range(6)))  # 96 rows: 8 decode, 64 may wait, 24 refused
    refused = [r for r in responses if r.status_code == 429]
    assert refused and all(r.status_code in (200, 429) for r in responses)
    assert int(refused[0].headers["retry-after"]) >= 1 and "rows are waiting" in refused[0].json()["error"]["message"]
    wait_idle(engine, 5)


# ============================================================================= abandonment


def test_non_streaming_client_that_times_out_frees_its_rows(slow_server):
    thread, engine = slow_server
    chunks = engine.chunks
    with pytest.raises(httpx.ReadTimeout):  # 3 rows of 120 tokens = 30 chunks; the client leaves after ~3
        httpx.post(thread.base_url + "/completions", headers=HEADERS, timeout=4 * STEP_DELAY_S,
                   json={"model": MODEL, "prompt": "abandon me", "n": 3, "max_tokens": 120, "temperature": 0})
    waited = wait_idle(engine, 5)
    assert waited < 1.0 and engine.chunks - chunks < 15, (waited, engine.chunks - chunks)


def test_request_timeout_cancels_and_answers_504(generator):
    engine = SlowEngine(generator, max_batch_size=ROWS, chunk_size=CHUNK, batch_wait_s=0.0)
    app = S.create_app(engine, model_name=MODEL, request_timeout_s=0.2)
    with TestClient(app) as test_client:
        response = test_client.post("/v1/completions", json={"model": MODEL, "prompt": "slow", "max_tokens": 120})
        assert_openai_error(response, 504, says="--request-timeout of 0.2 s")
        stream = test_client.post("/v1/completions", json={"model": MODEL, "prompt": "slow", "max_tokens": 120,
                                                            "stream": True})
        assert "--request-timeout" in stream.text and "[DONE]" not in stream.text
        wait_idle(engine, 2)


def test_disconnect_storm_leaks_no_rows(slow_server):
    """24 clients, 36 rows for 8 cache rows: streams hang up after a few events, the others time out."""
    thread, engine = slow_server
    rng = random.Random(0)
    plans = [(i, rng.choice([1, 2]), rng.randint(0, 3), rng.uniform(0.05, 0.3)) for i in range(24)]

    def hang_up(plan: tuple[int, int, int, float]) -> None:
        i, n, events, timeout_s = plan
        body = {"model": MODEL, "prompt": f"storm {i}", "max_tokens": 100, "n": n, "stream": i % 2 == 0}
        if body["stream"]:
            with httpx.stream("POST", thread.base_url + "/completions", json=body, headers=HEADERS,
                              timeout=30) as response:
                for _, _line in zip(range(events), response.iter_lines()):
                    pass  # leaving the block closes the connection mid-stream
            return
        with pytest.raises(httpx.TimeoutException):
            httpx.post(thread.base_url + "/completions", json=body, headers=HEADERS, timeout=timeout_s)

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        list(pool.map(hang_up, plans))
    wait_idle(engine, 5)
    reply = httpx.post(thread.base_url + "/completions", headers=HEADERS, timeout=60,
                       json={"model": MODEL, "prompt": "after the storm", "max_tokens": 4})
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] in ("length", "stop")


# ============================================================================= the engine's thread contract


def test_submit_from_many_threads_while_the_engine_swaps_sessions(generator):
    """Every 7th chunk fails, so the engine replaces its session while 4 threads keep submitting.
    Every request must finish (ok or "error", never lost or stuck) and the engine end idle."""
    engine = SlowEngine(generator, max_batch_size=ROWS, chunk_size=CHUNK, batch_wait_s=0.0, max_queue=1000,
                        fail_every=7)
    finished: list[str] = []
    lock = threading.Lock()

    def on_update(progress: Progress) -> None:
        if progress.finish_reason is not None:
            with lock:
                finished.append(progress.finish_reason)

    def hammer(worker: int) -> None:
        sampler = sampling.TopP(p=1.0, temperature=0.0)
        for i in range(15):
            request = Request([1, 2 + worker, 3 + i], 6, sampler, on_update=on_update)
            engine.submit([request])
            time.sleep(0.001 * (i % 3))

    engine.start()
    try:
        threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        deadline = time.monotonic() + 60
        while len(finished) < 60 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        engine.stop()
    assert len(finished) == 60 and set(finished) <= {"length", "stop", "error"}
    assert "error" in finished and "length" in finished and engine.sessions_started > 1
    assert engine.idle


# ============================================================================= fuzz


_text = st.one_of(*[st.text(max_size=12)] * 7, st.sampled_from(["\ud800", "hi \udfff", "", "\x00", "é" * 5]))
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), _text)
_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                     max_leaves=8)
# Valid bodies, then (half the time) one field replaced by arbitrary JSON: most requests get far
# enough to be tokenized and decoded, and every field also meets junk.
_prompt = st.one_of(_text, st.lists(_text, min_size=1, max_size=3), st.lists(st.integers(0, 49_151), max_size=6),
                    st.lists(st.lists(st.integers(-1, 50_000), max_size=4), max_size=2))
_part = st.fixed_dictionaries({"type": st.sampled_from(["text"] * 5 + ["image_url"]), "text": _text})
_message = st.fixed_dictionaries({"role": st.sampled_from(["user"] * 6 + ["system", "assistant", "developer", "tool"]),
                                  "content": st.one_of(_text, st.lists(_part, max_size=2), st.none())})
_common = {
    "max_tokens": st.integers(1, 6), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "n": st.integers(1, 3), "stream": st.booleans(), "stop": st.one_of(_text, st.lists(_text, max_size=5)),
    "seed": st.integers(-2**63, 2**64 - 1), "stream_options": st.just({"include_usage": True}),
}
_completion = st.fixed_dictionaries({"model": st.just(MODEL), "prompt": _prompt}, optional=_common)
_chat = st.fixed_dictionaries({"model": st.just(MODEL), "messages": st.lists(_message, min_size=1, max_size=3),
                               "max_tokens": st.integers(1, 6)},  # the default budget is tested above
                              optional={**{k: v for k, v in _common.items() if k != "max_tokens"}, "template": st.sampled_from(["chat", "instruction"]),
                                        "input": _text, "response_format": st.sampled_from(
                                            [{"type": "text"}] * 4 + [{"type": "json_object"}, {"type": "json_schema"}])})
_field = st.sampled_from(sorted({"model", "prompt", "messages", "logprobs", "response_format", *_common}))


@st.composite
def _bodies(draw) -> tuple[str, dict | bytes]:
    path, body = draw(st.one_of(st.tuples(st.just("/v1/completions"), _completion),
                                st.tuples(st.just("/v1/chat/completions"), _chat)))
    if draw(st.booleans()):
        body[draw(_field)] = draw(_json)
    if draw(st.integers(0, 9)) == 9:
        return path, draw(st.one_of(_json, st.binary(max_size=30)))  # not even an object
    return path, body


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(path_and_body=_bodies())
def test_fuzzed_bodies_never_get_a_5xx(client, path_and_body):
    test_client, _ = client
    path, body = path_and_body
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = test_client.post(path, content=raw, headers={"Content-Type": "application/json"})
    event(f"status {response.status_code} {response.text[:40] if response.status_code >= 400 else ''}")
    assert response.status_code < 500, (raw[:300], response.text[:300])
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    elif not (isinstance(body, dict) and body.get("stream") is True):
        assert response.json()["choices"]


def test_fuzz_left_no_rows_behind(client):  # runs after the fuzz test (file order)
    wait_idle(client[1], 5)
    assert client[0].get("/health").json() == {"status": "ok", "rows_in_use": 0, "queued_rows": 0}


# ============================================================================= the command line


@pytest.mark.parametrize("damage", ["truncated", "wrong_shape"])
def test_cli_prints_one_line_for_a_bad_adapter(tmp_path, capsys, damage):
    tiny = load_model("tiny")
    lora_config = lora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj",))
    other = tiny.config.replace(num_layers=tiny.config.num_layers + 1)  # a different model's adapter
    made_for = tiny.config if damage == "truncated" else other
    adapter = lora.init_adapter(made_for, lora_config, jax.random.key(0))
    directory = adapters_io.save_adapter(tmp_path / "adapter", adapter, lora_config, made_for)
    if damage == "truncated":
        weights = directory / adapters_io.NATIVE_WEIGHTS
        weights.write_bytes(weights.read_bytes()[:100])
    assert S.main(["--model", "tiny", "--adapter", str(directory), "--no-warmup"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(directory) in err and "Traceback" not in err, err
