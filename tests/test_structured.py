"""Structured outputs: schema -> token program, the vocabulary masks, constrained decoding, the server.

Program and masks are checked on SmolLM2's real tokenizer; decoding and serving on the real
SmolLM2-135M-Instruct (a random model would never close a string), with one generator whose shapes
(8 rows, 640 slots, chunks of 8) tests/test_expand_e2e.py shares, so compiles are shared too.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from llama_e_jax.generate import engine as G
from llama_e_jax.generate import sampling
from llama_e_jax import serve as S
from llama_e_jax.generate import structured as st
from llama_e_jax.io.tokenizer import load_tokenizer

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


# ----------------------------------------------------------------------------- schema -> program


@pytest.mark.parametrize("keys", [("instruction", "input", "output"), ("instruction",), ('say "hi"', "prix €")])
def test_program_forces_exactly_the_json_skeleton(tokenizer, keys):
    program = st.compile_response_format(response_format(*keys), tokenizer.encode)
    assert program.dtype == np.int32 and program[-1] == st.END and list(program).count(st.END) == 1
    assert list(program).count(st.FREE_STRING) == len(keys)
    segments = np.split(program[:-1], np.flatnonzero(program[:-1] == st.FREE_STRING))
    forced = [tokenizer.decode([t for t in seg if t >= 0]) for seg in segments]
    # Each string body is closed by a sampled quote, so the forced pieces joined by `"` are the object.
    assert '"'.join(forced) == json.dumps(dict.fromkeys(keys, ""), ensure_ascii=False)


def test_text_means_no_program_and_programs_pad_to_rows():
    assert st.compile_response_format(None, str.split) is None
    assert st.compile_response_format({"type": "text"}, str.split) is None
    assert list(st.pad_program(None, 4)) == [st.NONE, st.END, st.END, st.END]
    assert list(st.pad_program([5, st.FREE_STRING, st.END], 4)) == [5, st.FREE_STRING, st.END, st.END]
    with pytest.raises(st.SchemaError, match="at most 2"):
        st.pad_program([5, st.FREE_STRING, st.END], 2)


def _schema(**changes) -> dict:
    fmt = response_format("a", "b")
    fmt["json_schema"]["schema"].update(changes)
    return fmt


@pytest.mark.parametrize("fmt, names", [
    ({"type": "json_object"}, "json_schema"),
    ({"type": "xml"}, "type="),
    ({"type": "json_schema"}, "json_schema.schema"),
    (_schema(type="array"), "schema.type"),
    (_schema(properties={"a": {"type": "string"}, "b": {"type": "number"}}), "properties.b"),
    (_schema(properties={"a": {"type": "string", "enum": ["x"]}, "b": {"type": "string"}}), "properties.a"),
    (_schema(properties={"a": {"type": "object", "properties": {}}, "b": {"type": "string"}}), "properties.a"),
    (_schema(required=["a"]), "required"),
    (_schema(additionalProperties=True), "additionalProperties"),
    (_schema(minProperties=1), "minProperties"),
])
def test_unsupported_schemas_are_refused_naming_the_part(fmt, names):
    with pytest.raises(st.SchemaError, match=names):
        st.object_keys(fmt)


# ----------------------------------------------------------------------------- vocabulary masks


def test_masks_on_the_real_tokenizer(tokenizer, smollm2_hf_dir):
    masks = st.vocab_masks(tokenizer, tokenizer.vocab_size, (tokenizer.eos_id,))
    ids = {text: tokenizer.encode(text) for text in ('"', '."', '",', " the", "\n", "\\", '\\"', "é")}
    assert all(len(v) == 1 for v in ids.values()), ids
    one = {text: v[0] for text, v in ids.items()}
    assert masks.close_quote[one['"']] and masks.close_quote[one['."']]  # `"` and `."` end a string ...
    assert not masks.string_safe[one['"']] and not masks.string_safe[one['."']]  # ... and are not inside one
    for text in ('",', "\n", "\\", '\\"'):  # would need escaping, or close the string and go on
        assert not masks.string_safe[one[text]] and not masks.close_quote[one[text]], text
    assert masks.string_safe[one[" the"]]
    assert masks.string_safe[one["é"]]  # multi-byte characters
    specials = sorted(tokenizer.special_ids)
    assert not masks.string_safe[specials].any() and not masks.close_quote[specials].any()
    assert 48_000 < masks.string_safe.sum() < tokenizer.vocab_size and 1 < masks.close_quote.sum() < 100
    # Padded vocabularies: ids past the tokenizer's are never allowed.
    padded = st.vocab_masks(tokenizer, tokenizer.vocab_size + 64, (tokenizer.eos_id,))
    assert not padded.string_safe[tokenizer.vocab_size:].any()
    # The HF-directory tokenizer spells every token the same way as the GGUF one.
    hf = st.vocab_masks(load_tokenizer(smollm2_hf_dir), tokenizer.vocab_size, (tokenizer.eos_id,))
    assert (hf.string_safe == masks.string_safe).all() and (hf.close_quote == masks.close_quote).all()


def test_tokenizers_that_are_not_byte_level_are_refused():
    class Chars:
        vocab_size = 96

    with pytest.raises(st.SchemaError, match="byte-level"):
        st.token_bytes(Chars())


# ----------------------------------------------------------------------------- decoding, real model


@pytest.fixture(scope="module")
def generator(smollm2_params, tokenizer):
    config, params = smollm2_params
    return G.Generator(config, params, tokenizer, max_batch_size=ROWS, max_length=MAX_CONTEXT, chunk_size=CHUNK)


def chat(generator: G.Generator, text: str) -> list[int]:
    prompt = generator.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return generator.encode_prompt(prompt)


def run(generator: G.Generator, requests: list[G.Request]) -> list[G.Request]:
    generator.session(GREEDY, ROWS, MAX_CONTEXT, CHUNK).run(requests)
    return requests


ASKS = [  # (prompt, keys): greedy SmolLM2 closes these strings (it loops forever inside some others)
    ("Name a fruit and its color. Answer in JSON.", ("fruit", "color")),
    ("Write a short title for a blue cotton t-shirt. Answer in JSON.", ("title",)),
    ("Give the city and country of the Eiffel Tower. Answer in JSON.", ("city", "country")),
]
FREE_PROMPT = "Say hello to a customer who bought a kettle."


def test_constrained_rows_return_the_schema_object_next_to_an_unchanged_free_row(generator):
    programs = [st.compile_response_format(response_format(*keys), generator.tokenizer.encode) for _, keys in ASKS]
    constrained = [G.Request(chat(generator, prompt), 64, GREEDY, program=program)
                   for (prompt, _), program in zip(ASKS, programs)]
    free = G.Request(chat(generator, FREE_PROMPT), 24, GREEDY)
    run(generator, [constrained[0], free, *constrained[1:]])
    (alone,) = run(generator, [G.Request(chat(generator, FREE_PROMPT), 24, GREEDY)])
    assert free.token_ids == alone.token_ids and free.text == alone.text  # the constraint is per row
    for request, (_, keys) in zip(constrained, ASKS):
        reply = json.loads(request.text)
        assert list(reply) == list(keys) and all(isinstance(v, str) for v in reply.values()), request.text
        assert request.finish_reason == "stop" and request.token_ids[-1] != generator.eos_ids[0]


def test_a_row_that_runs_out_of_tokens_inside_a_string_stops_at_its_budget(generator):
    program = st.compile_response_format(response_format("story"), generator.tokenizer.encode)
    (request,) = run(generator, [G.Request(chat(generator, "Tell a long story about a shop."), 12, GREEDY,
                                           program=program)])
    assert request.finish_reason == "length" and len(request.token_ids) == 12
    assert request.text.startswith('{"story": "') and '"' not in request.text[len('{"story": "'):]


def test_sessions_refuse_programs_they_cannot_run(generator):
    session = generator.session(GREEDY, ROWS, MAX_CONTEXT, CHUNK)
    too_long = np.asarray([5] * 70 + [st.END], np.int32)
    with pytest.raises(G.GenerationError, match="at most 64"):
        session.check(G.Request([1, 2], 4, GREEDY, program=too_long))
    with pytest.raises(G.GenerationError, match="END"):
        session.check(G.Request([1, 2], 4, GREEDY, program=[5, st.FREE_STRING]))


# ----------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def server(generator):
    engine = S.BatchingEngine(generator, max_batch_size=ROWS, chunk_size=CHUNK, batch_wait_s=0.02)
    with S.ServerThread(S.create_app(engine, model_name=MODEL)) as thread:
        yield thread, generator


def test_server_returns_schema_objects_streamed_or_not(server):
    thread, generator = server
    client = openai.OpenAI(base_url=thread.base_url, api_key="unused", max_retries=0, timeout=300)
    prompt, keys = ASKS[0]
    ask = dict(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=64, temperature=0,
               response_format=response_format(*keys))
    reply = client.chat.completions.create(**ask)
    (direct,) = run(generator, [G.Request(chat(generator, prompt), 64, GREEDY,
                                          program=st.compile_response_format(ask["response_format"],
                                                                             generator.tokenizer.encode))])
    content = reply.choices[0].message.content
    assert content == direct.text and list(json.loads(content)) == list(keys)
    assert reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == content and sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("path, fmt, message", [
    ("/chat/completions", {"type": "json_object"}, "json_schema"),
    ("/chat/completions", response_format("a") | {"json_schema": {"name": "r", "schema": {"type": "array"}}},
     "schema.type"),
    ("/chat/completions", response_format(*[f"property_{i}" for i in range(12)]), "at most 64"),
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
    (alone,) = run(generator, [G.Request(chat(generator, FREE_PROMPT), 6, GREEDY)])
    assert response.json()["choices"][0]["message"]["content"] == alone.text
