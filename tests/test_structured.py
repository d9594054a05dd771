"""Structured outputs through the constraint tables: the flat object of strings that the teacher
expansion asks for, the response_format parsing, constrained decoding and the server.

Decoding and serving run on the real SmolLM2-135M-Instruct (a random model would never close a
string), with one generator whose shapes (8 rows, 640 slots, chunks of 8) tests/test_expand_e2e.py
shares, so compiles are shared too. The automata themselves are checked in test_constraints.py.
"""

from __future__ import annotations

import json
import random
import string

import httpx
import pytest

from llama_e_jax.generate.generator import Generator
from llama_e_jax.generate.session import GenerationError, Request
from llama_e_jax.generate import constraints, guided, sampling
from llama_e_jax import serve as S
from llama_e_jax.io.tokenizer import ByteTokenizer, load_tokenizer

openai = pytest.importorskip("openai")

ROWS, MAX_CONTEXT, CHUNK = 8, 640, 8  # the real-model shapes (see the module doc)
MODEL = "smollm2"
GREEDY = sampling.TopP(p=1.0, temperature=0.0)


def response_format(*keys: str) -> dict:
    schema = {"type": "object", "properties": {k: {"type": "string"} for k in keys}, "required": list(keys),
              "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


def flat_automaton(tokenizer, *keys: str) -> constraints.Automaton:
    guide = guided.from_response_format(response_format(*keys))
    return guide.compile(tokenizer, eos_ids=(tokenizer.eos_id,), vocab_size=tokenizer.vocab_size)


# ----------------------------------------------------------------------------- the flat object


@pytest.mark.parametrize("keys", [("instruction", "input", "output"), ("instruction",), ('say "hi"', "prix €")])
def test_flat_object_accepts_exactly_objects_of_its_keys(tokenizer, keys):
    automaton = flat_automaton(tokenizer, *keys)
    good = dict.fromkeys(keys, "A steel bottle, 750 ml.")
    assert automaton.accepts(tokenizer.encode(json.dumps(good, ensure_ascii=False)))
    # Strings may now hold escaped quotes, backslashes and newlines (the old token programs refused them).
    assert automaton.accepts(tokenizer.encode(json.dumps(dict.fromkeys(keys, 'say "hi"\\n\n'), ensure_ascii=False)))
    assert not automaton.accepts(tokenizer.encode(json.dumps(dict.fromkeys(keys[1:], "x"))))  # a key missing
    assert not automaton.accepts(tokenizer.encode(json.dumps(good)[:-1]))  # unfinished
    assert not automaton.accepts(tokenizer.encode(json.dumps({**good, "extra": "x"}, ensure_ascii=False)))


def test_text_means_no_constraint():
    assert guided.from_response_format(None) is None
    assert guided.from_response_format({"type": "text"}) is None


def _schema(**changes) -> dict:
    fmt = response_format("a", "b")
    fmt["json_schema"]["schema"].update(changes)
    return fmt


@pytest.mark.parametrize("fmt, names", [
    ({"type": "xml"}, "type="),
    ({"type": "json_schema"}, "json_schema.schema"),
    (_schema(minProperties=1), "minProperties"),
    (_schema(properties={"a": {"type": "integer", "minimum": 0}, "b": {"type": "string"}}), "minimum"),
])
def test_unsupported_schemas_are_refused_naming_the_part(tokenizer, fmt, names):
    with pytest.raises(constraints.ConstraintError, match=names):
        guided.from_response_format(fmt).compile(tokenizer, eos_ids=(2,), vocab_size=tokenizer.vocab_size)


@pytest.mark.parametrize("fmt", [
    {"type": "json_object"},
    _schema(type="object", properties={"a": {"type": "number"}, "b": {"enum": ["x", "y"]}}),
    _schema(properties={"a": {"type": "object", "properties": {"c": {"type": "boolean"}}}, "b": {"type": "string"}},
            required=["a"]),
])
def test_schemas_the_token_programs_refused_are_now_accepted(fmt):
    assert guided.from_response_format(fmt).kind == "json_schema"


def test_the_gguf_and_hf_tokenizers_spell_every_token_alike(tokenizer, smollm2_hf_dir):
    assert constraints.token_bytes(tokenizer) == constraints.token_bytes(load_tokenizer(smollm2_hf_dir))


# ----------------------------------------------------------------------------- decoding, real model


@pytest.fixture(scope="module")
def generator(smollm2_params, tokenizer):
    config, params = smollm2_params
    return Generator(config, params, tokenizer, max_batch_size=ROWS, max_length=MAX_CONTEXT, chunk_size=CHUNK)


def chat(generator: Generator, text: str) -> list[int]:
    prompt = generator.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return generator.encode_prompt(prompt)


def run(generator: Generator, requests: list[Request]) -> list[Request]:
    generator.session(GREEDY, ROWS, MAX_CONTEXT, CHUNK).run(requests)
    return requests


ASKS = [  # (prompt, keys): greedy SmolLM2 closes these strings (it loops forever inside some others)
    ("Name a fruit and its color. Answer in JSON.", ("fruit", "color")),
    ("Write a short title for a blue cotton t-shirt. Answer in JSON.", ("title",)),
    ("Give the city and country of the Eiffel Tower. Answer in JSON.", ("city", "country")),
]
FREE_PROMPT = "Say hello to a customer who bought a kettle."


def guide(generator: Generator, fmt: dict) -> constraints.Automaton:
    return generator.guide(guided.from_response_format(fmt))


def test_constrained_rows_return_the_schema_object_next_to_an_unchanged_free_row(generator):
    automata = [guide(generator, response_format(*keys)) for _, keys in ASKS]
    constrained = [Request(chat(generator, prompt), 64, GREEDY, constraint=automaton)
                   for (prompt, _), automaton in zip(ASKS, automata)]
    free = Request(chat(generator, FREE_PROMPT), 24, GREEDY)
    run(generator, [constrained[0], free, *constrained[1:]])
    (alone,) = run(generator, [Request(chat(generator, FREE_PROMPT), 24, GREEDY)])
    assert free.token_ids == alone.token_ids and free.text == alone.text  # the constraint is per row
    for request, (_, keys) in zip(constrained, ASKS):
        reply = json.loads(request.text)
        assert list(reply) == list(keys) and all(isinstance(v, str) for v in reply.values()), request.text
        # The row ends with EOS, which the automaton allows only once the object is complete.
        assert request.finish_reason == "stop" and request.token_ids[-1] in generator.eos_ids


def test_a_row_that_runs_out_of_tokens_inside_a_string_stops_at_its_budget(generator):
    automaton = guide(generator, response_format("story"))
    (request,) = run(generator, [Request(chat(generator, "Tell a long story about a shop."), 12, GREEDY,
                                           constraint=automaton)])
    assert request.finish_reason == "length" and len(request.token_ids) == 12
    # Still inside the string: the automaton has not reached a final state.
    assert '"story"' in request.text and not automaton.final[automaton.walk(request.token_ids)]


def test_sessions_refuse_constraints_they_cannot_run(generator):
    session = generator.session(GREEDY, ROWS, MAX_CONTEXT, CHUNK)
    with pytest.raises(GenerationError, match="Automaton"):
        session.check(Request([1, 2], 4, GREEDY, constraint=[5, 6]))
    other = guided.Guide.choices(["a", "b"]).compile(ByteTokenizer(), eos_ids=(2,), vocab_size=256)
    with pytest.raises(GenerationError, match="256"):  # compiled for another vocabulary
        session.check(Request([1, 2], 4, GREEDY, constraint=other))


# ----------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def server(generator):
    # A small state budget, so that a schema over it compiles in a second or two.
    engine = S.BatchingEngine(generator, max_batch_size=ROWS, chunk_size=CHUNK, batch_wait_s=0.02,
                              guide_budget=constraints.Budget(max_states=256))
    with S.ServerThread(S.create_app(engine, model_name=MODEL)) as thread:
        yield thread, generator


def test_server_returns_schema_objects_streamed_or_not(server):
    thread, generator = server
    client = openai.OpenAI(base_url=thread.base_url, api_key="unused", max_retries=0, timeout=300)
    prompt, keys = ASKS[0]
    ask = dict(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=64, temperature=0,
               response_format=response_format(*keys))
    reply = client.chat.completions.create(**ask)
    (direct,) = run(generator, [Request(chat(generator, prompt), 64, GREEDY,
                                          constraint=guide(generator, ask["response_format"]))])
    content = reply.choices[0].message.content
    assert content == direct.text and list(json.loads(content)) == list(keys)
    assert reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == content and sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert chunks[-1].choices[0].finish_reason == "stop"


def _big_enum(count: int = 24, length: int = 24) -> dict:
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_letters, k=length)) for _ in range(count)]
    return response_format("a") | {"json_schema": {"name": "r", "schema": {"enum": words}}}


@pytest.mark.parametrize("path, fmt, message", [
    ("/chat/completions", {"type": "xml"}, "type="),
    ("/chat/completions", response_format("a") | {"json_schema": {"name": "r", "schema": {"type": "integer",
                                                                                          "minimum": 1}}},
     "'minimum' is not supported"),
    ("/chat/completions", _big_enum(), "max_states=256"),  # ~550 states: over the test server's budget
    ("/chat/completions", "json", "response_format"),
    ("/completions", response_format("a"), "not supported"),
])
def test_bad_response_formats_get_openai_shaped_400s(server, path, fmt, message):
    thread, _ = server
    body = {"model": MODEL, "max_tokens": 4, "response_format": fmt}
    body |= {"prompt": "x"} if path == "/completions" else {"messages": [{"role": "user", "content": "x"}]}
    response = httpx.post(thread.base_url + path, json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == "response_format"
    assert message in error["message"]


def test_text_response_format_is_plain_generation(server):
    thread, generator = server
    body = {"model": MODEL, "max_tokens": 6, "temperature": 0, "response_format": {"type": "text"},
            "messages": [{"role": "user", "content": FREE_PROMPT}]}
    response = httpx.post(thread.base_url + "/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    (alone,) = run(generator, [Request(chat(generator, FREE_PROMPT), 6, GREEDY)])
    assert response.json()["choices"][0]["message"]["content"] == alone.text
