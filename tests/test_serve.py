"""The OpenAI-compatible server, driven by the official `openai` client over real HTTP on 127.0.0.1.

The model is a tiny random LLaMA with SmolLM2's real tokenizer and chat template (random weights keep
compiles short; the tokenizer makes the text paths real). Every answer is compared with what
`Generator.generate` gives directly for the same prompt.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

from llama_e_jax.generate.generator import Generator
from llama_e_jax.generate.session import Completion, Request
from llama_e_jax.generate import sampling
from llama_e_jax import serve as S
from llama_e_jax.model.config import LlamaConfig

openai = pytest.importorskip("openai")

API_KEY = "test-key"
MODEL = "llama-e-tiny"
MAX_CONTEXT = 128


@pytest.fixture(scope="module")
def server(smollm2_hf_dir):
    """A running server: (ServerThread, Generator, BatchingEngine)."""
    from conftest import random_params
    from llama_e_jax.io.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_hf_dir)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         max_position_embeddings=MAX_CONTEXT, eos_token_ids=(tokenizer.eos_id,))
    generator = Generator(config, random_params(config, seed=5), tokenizer, max_batch_size=8,
                            max_length=MAX_CONTEXT, chunk_size=4)
    engine = S.BatchingEngine(generator, max_batch_size=8, chunk_size=4, batch_wait_s=0.02)
    app = S.create_app(engine, model_name=MODEL, api_key=API_KEY)
    with S.ServerThread(app) as thread:
        yield thread, generator, engine


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0].base_url, api_key=API_KEY, max_retries=0, timeout=120)


def direct(generator: Generator, prompts: str | list[str], max_tokens: int, *, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0, stop: tuple[str, ...] = ()) -> list[Completion]:
    """What the server should answer: the prompts run through the generator directly, in a session of
    the engine's shape (so the compiled functions are shared and the test stays fast)."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    sampler = sampling.TopP(p=top_p, temperature=temperature)
    session = generator.session(sampler, batch_size=8, max_length=MAX_CONTEXT, chunk_size=4)
    requests = [Request(generator.encode_prompt(p), max_tokens, sampler, stop, seed=seed) for p in prompts]
    session.run(requests)
    return [r.completion() for r in requests]


def chat_prompt(generator: Generator, content: str) -> str:
    return generator.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_completion_matches_direct_generation(server, client):
    _, generator, _ = server
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi there"}],
                                           max_tokens=12, temperature=0)
    (expected,) = direct(generator, chat_prompt(generator, "Hi there"), 12)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens


def test_chat_streaming_sends_the_same_text_in_pieces(server, client):
    _, generator, _ = server
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Stream please"}],
                                            max_tokens=14, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    (expected,) = direct(generator, chat_prompt(generator, "Stream please"), 14)
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(content) == expected.text and sum(1 for piece in content if piece) > 1  # streamed in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.completion_tokens


def test_completion_streaming(server, client):
    _, generator, _ = server
    (expected,) = direct(generator, "The shop sells", 12)
    chunks = list(client.completions.create(model=MODEL, prompt="The shop sells", max_tokens=12, temperature=0,
                                            stream=True))
    assert {c.object for c in chunks} == {"text_completion"}
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_completion_with_stop_n_and_seed(server, client):
    _, generator, _ = server
    (greedy,) = direct(generator, "Once upon a time", 16)
    stop = greedy.text[4:7]
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0,
                                      stop=[stop])
    assert reply.choices[0].text == greedy.text[:greedy.text.find(stop)]
    assert reply.choices[0].finish_reason == "stop"
    by_ids = client.completions.create(model=MODEL, prompt=generator.encode_prompt("Once upon a time"),
                                       max_tokens=16, temperature=0)  # a prompt given as token ids
    assert by_ids.choices[0].text == greedy.text and by_ids.usage.completion_tokens == greedy.completion_tokens

    sampled = dict(model=MODEL, prompt=["Once upon a time", "In a shop"], max_tokens=8, n=2, temperature=1.0,
                   top_p=0.9, seed=11)
    first, again = client.completions.create(**sampled), client.completions.create(**sampled)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert first.choices[0].text != first.choices[1].text  # the n choices differ
    # choice 0 of each prompt samples with key (seed, 0), as a direct run with that seed does
    expected = direct(generator, ["Once upon a time", "In a shop"], 8, temperature=1.0, top_p=0.9, seed=11)
    assert [first.choices[0].text, first.choices[2].text] == [c.text for c in expected]
    prompt_tokens = sum(len(generator.encode_prompt(p)) for p in sampled["prompt"])
    full_length = sum(8 for c in first.choices if c.finish_reason == "length")
    assert first.usage.prompt_tokens == prompt_tokens and full_length <= first.usage.completion_tokens <= 32


def test_instruction_template_on_request(server, client):
    from llama_e_jax.data.prompt import build_prompt

    _, generator, _ = server
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Rewrite the title"}],
                                           max_tokens=6, temperature=0,
                                           extra_body={"template": "instruction", "input": "Red mug 300ml"})
    (expected,) = direct(generator, build_prompt("Rewrite the title", "Red mug 300ml"), 6)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.prompt_tokens


def test_sixteen_concurrent_clients_are_batched_and_all_correct(server):
    thread, generator, engine = server
    prompts = [f"Customer {i} asks about order {i * 7}" for i in range(16)]
    expected = direct(generator, [chat_prompt(generator, p) for p in prompts], 10)

    def ask(prompt: str) -> str:
        client = openai.OpenAI(base_url=thread.base_url, api_key=API_KEY, max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=10, temperature=0)
        return reply.choices[0].message.content

    engine.max_rows_in_use = 0
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [c.text for c in expected]
    assert engine.max_rows_in_use > 1  # requests shared decode steps


def _post(thread, path: str, content: bytes | None = None, *, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(thread.base_url + path, content=content, headers=headers, timeout=60, **kwargs)


@pytest.mark.parametrize("path,body,key,status,param", [
    ("/chat/completions", b'{"model": "llama-e-tiny", "messages": [', API_KEY, 400, None),  # malformed JSON
    ("/completions", b'{"model": "llama-e-tiny", "prompt": 5}', API_KEY, 400, "prompt"),
    ("/completions", b'{"model": "llama-e-tiny", "prompt": "x", "max_tokens": "10"}', API_KEY, 400, "max_tokens"),
    ("/completions", b'{"model": "llama-e-tiny", "prompt": "x", "temperature": 5}', API_KEY, 400, "temperature"),
    ("/chat/completions", b'{"model": "llama-e-tiny", "messages": "hi"}', API_KEY, 400, "messages"),
    ("/completions", b'{"model": "llama-e-tiny", "prompt": "x", "logprobs": 3}', API_KEY, 400, "logprobs"),
    ("/completions", b'{"model": "llama-e-tiny", "prompt": [5, 99999999]}', API_KEY, 400, "prompt"),
    ("/completions", json.dumps({"model": MODEL, "prompt": "word " * MAX_CONTEXT}).encode(), API_KEY, 400, "prompt"),
    ("/completions", b'{"model": "llama-e-tiny", "prompt": "x"}', None, 401, None),
    ("/completions", b'{"model": "llama-e-tiny", "prompt": "x"}', "wrong-key", 401, None),
    ("/models", None, "wrong-key", 401, None),
    ("/completions", b'{"model": "gpt-4", "prompt": "x"}', API_KEY, 404, "model"),
])
def test_errors_have_openai_shape_and_status(server, path, body, key, status, param):
    thread = server[0]
    if body is None:
        response = httpx.get(thread.base_url + path, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    else:
        response = _post(thread, path, body, key=key)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if status == 401:
        assert error["code"] == "invalid_api_key"
    if status == 404:
        assert error["code"] == "model_not_found"


def test_openai_client_raises_its_typed_errors(server):
    thread = server[0]
    bad_key = openai.OpenAI(base_url=thread.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    good = openai.OpenAI(base_url=thread.base_url, api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError, match="context"):
        good.completions.create(model=MODEL, prompt="word " * MAX_CONTEXT)


def test_bad_requests_and_disconnects_do_not_disturb_requests_in_flight(server):
    thread, generator, engine = server
    (expected,) = direct(generator, chat_prompt(generator, "Long answer please"), 60)
    client = openai.OpenAI(base_url=thread.base_url, api_key=API_KEY, max_retries=0, timeout=120)

    def long_stream() -> str:
        stream = client.chat.completions.create(model=MODEL, stream=True, max_tokens=60, temperature=0,
                                                messages=[{"role": "user", "content": "Long answer please"}])
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    def abandoned_stream() -> None:  # reads one chunk, then hangs up
        with httpx.stream("POST", thread.base_url + "/completions", timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": MODEL, "prompt": "abandon", "max_tokens": 100, "stream": True}) as response:
            next(response.iter_lines())

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        in_flight = pool.submit(long_stream)
        hang_up = pool.submit(abandoned_stream)
        statuses = [_post(thread, "/completions", b"{oops").status_code,
                    _post(thread, "/completions", json.dumps({"model": MODEL, "prompt": "x", "n": 0}).encode()).status_code]
        hang_up.result()
        assert in_flight.result() == expected.text
    assert statuses == [400, 400]
    deadline = time.monotonic() + 30
    while not engine.idle and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.rows_in_use == 0 and engine.queued_rows == 0  # the abandoned row was freed
    reply = client.completions.create(model=MODEL, prompt="still fine", max_tokens=5, temperature=0)
    assert reply.choices[0].text == direct(generator, "still fine", 5)[0].text


def test_cli_parser_defaults_to_localhost():
    args = S.build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.api_key is None
    assert (args.max_rows_per_request, args.max_queue, args.max_body_bytes, args.docs) == (64, 256, 4 << 20, False)
