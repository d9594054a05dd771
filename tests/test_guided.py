"""Guided decoding end to end: guides, their compiler, a session's packed tables, and decoding.

What is checked, and how:
* `from_response_format` accepts text / json_schema / json_object and names what it refuses.
* `GuideCompiler` caches per guide, compiles once however many ask, and a wait past its time limit
  is an error naming the limit (the compile still lands in the cache).
* `PackedGuides` re-packs without moving a running row out of its automaton: walking the remapped
  state through the new tables gives what the old tables gave.
* Decoding on a tiny random model (byte tokenizer): every constrained reply is exactly one of the
  hard choices whatever the logits, rows without a constraint are bit-identical to a batch without
  any constraint, and more requests than rows (re-packs while rows run) change nothing.
* The real SmolLM2 (marked by conftest): choices after `### Response:\\n` and the issue's schemas
  give replies that are one option / validate with `jsonschema`, with finish_reason "stop".
"""

from __future__ import annotations

import json
import threading
import time

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from llama_e_jax.generate import constraints as C
from llama_e_jax.generate import guided, sampling
from llama_e_jax.generate.generator import Generator
from llama_e_jax.generate.session import Request
from llama_e_jax.io.tokenizer import ByteTokenizer, load_tokenizer
from llama_e_jax.model.config import LlamaConfig

from test_constraints import AD_SCHEMA, CATEGORY_SCHEMA, HARD_CHOICES, HASHTAGS_SCHEMA, PRICE_SCHEMA

GREEDY = sampling.Greedy()
BYTES = ByteTokenizer()


def byte_guide(*choices: str) -> C.Automaton:
    return guided.Guide.choices(choices).compile(BYTES, eos_ids=(BYTES.eos_id,), vocab_size=256)


# ----------------------------------------------------------------------------- response_format


def test_response_formats_become_guides():
    schema = {"type": "object", "properties": {"b": {"type": "number"}, "a": {"type": "string"}}}
    assert guided.from_response_format(None) is None and guided.from_response_format({"type": "text"}) is None
    guide = guided.from_response_format({"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    assert guide.kind == "json_schema" and list(json.loads(guide.value)["properties"]) == ["b", "a"]  # order kept
    assert guided.from_response_format({"type": "json_object"}) == guided.Guide.json_schema(C.JSON_OBJECT_SCHEMA)
    assert guided.Guide.choices(["a", "b"]) == guided.Guide.choices(("a", "b"))  # a cache key


def test_property_names_that_json_escapes_are_escaped():
    # outlines-core writes names into the regex as they are: `{"say "hi"": ...}` would be accepted.
    schema = {"type": "object", "properties": {'say "hi"': {"type": "string"}, "back\\slash": {"type": "integer"}},
              "required": ['say "hi"', "back\\slash"]}
    automaton = guided.Guide.json_schema(schema).compile(BYTES, eos_ids=(2,), vocab_size=256)
    good = json.dumps({'say "hi"': "x", "back\\slash": 3})
    assert automaton.accepts(list(good.encode())) and json.loads(good)
    assert not automaton.accepts(list('{"say "hi"": "x", "back\\slash": 3}'.encode()))


@pytest.mark.parametrize("fmt, names", [
    ("json", "must be an object"),
    ({"type": "xml"}, "type="),
    ({"type": "json_schema"}, "json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": []}}, "json_schema.schema"),
])
def test_bad_response_formats_are_named(fmt, names):
    with pytest.raises(C.ConstraintError, match=names):
        guided.from_response_format(fmt)


@pytest.mark.parametrize("bad", ["one string", None, 3])
def test_choices_must_be_a_list(bad):
    with pytest.raises(C.ConstraintError, match="choices"):
        guided.Guide.choices(bad)


# ----------------------------------------------------------------------------- the compiler


def test_compiler_caches_and_names_its_time_limit():
    compiler = guided.GuideCompiler(BYTES, eos_ids=(2,), vocab_size=256, processes=False, time_limit_s=0.0)
    guide = guided.Guide.choices(["alpha", "beta"])
    gate = threading.Event()
    compiler._pool.submit(gate.wait)  # the one worker is busy, so the compile cannot end within the wait
    try:
        with pytest.raises(C.ConstraintError, match="time limit of 0 s"):
            compiler.compile(guide)
        gate.set()
        deadline = time.monotonic() + 60
        while guide not in compiler._cache and time.monotonic() < deadline:  # the compile finishes anyway
            time.sleep(0.01)
        first = compiler.compile(guide)  # now cached: no wait at all
        assert first is compiler.compile(guide) and first.accepts(list(b"beta"))
        with pytest.raises(C.ConstraintError, match="minimum"):
            compiler.time_limit_s = 60.0
            compiler.compile(guided.Guide.json_schema({"type": "integer", "minimum": 3}))
    finally:
        gate.set()
        compiler.close()


# ----------------------------------------------------------------------------- packed tables


def _device_walk(tables: C.ConstraintTables, state: int, data: bytes) -> int:
    states = jnp.asarray([state], jnp.int32)
    for byte in data:
        states = C.next_state(tables, states, jnp.asarray([byte], jnp.int32))
    return int(states[0])


def test_repacking_keeps_running_rows_in_place():
    first, second, third = byte_guide("apple", "apricot"), byte_guide("pear"), byte_guide("plum", "prune")
    packed = guided.PackedGuides(256, guided.Capacity(states=4, entries=4, automata=1))
    packed.empty_tables()
    (a, none), tables, _ = packed.admit([], [first, None])
    assert none == C.UNCONSTRAINED and a >= 1
    mid = _device_walk(tables, a, b"apr")  # a row half way through "apricot"
    # The first automaton no longer runs its other row; `second` is dropped, `third` arrives.
    (b,), tables, _ = packed.admit([first], [second])
    assert _device_walk(tables, b, b"pear") > C.DEAD
    (c,), new_tables, remap = packed.admit([first], [third])
    assert remap is not None and second not in packed.packed
    moved = int(guided.remap_states(jnp.asarray([mid, C.UNCONSTRAINED], jnp.int32), remap)[0])
    end = _device_walk(new_tables, moved, b"icot")
    assert bool(new_tables.final[end]) and end == _device_walk(new_tables, packed.offsets[0], b"apricot")
    assert bool(new_tables.final[_device_walk(new_tables, c, b"prune")])
    assert guided.remap_states(jnp.asarray([C.UNCONSTRAINED], jnp.int32), remap)[0] == C.UNCONSTRAINED
    # Nothing new: the tables stay as they are.
    assert packed.admit([first, third], [third, None]) == ([c, C.UNCONSTRAINED], None, None)


# ----------------------------------------------------------------------------- decoding, tiny model


@pytest.fixture(scope="module")
def tiny_generator():
    from conftest import random_params

    config = LlamaConfig.from_preset("tiny")
    return Generator(config, random_params(config, seed=0), BYTES, max_batch_size=4, max_length=96, chunk_size=8)


def test_every_constrained_reply_is_one_choice_and_free_rows_are_untouched(tiny_generator):
    gen = tiny_generator
    choice_lists = [HARD_CHOICES, ["yes", "no"], ["Toys", "Toys & Games"], ["日本語", "🍳 Cooking"]]
    prompts = [gen.encode_prompt(f"### Instruction:\nPick one.\n\n### Response:\n{i}") for i in range(10)]
    automata = [gen.guide(guided.Guide.choices(choice_lists[i % 4])) if i % 3 else None for i in range(10)]
    mixed = gen.generate_ids(prompts, 48, GREEDY, constraints=automata)  # 10 requests on 4 rows: re-packs
    free = gen.generate_ids(prompts, 48, GREEDY)
    for i, (completion, automaton) in enumerate(zip(mixed, automata)):
        if automaton is None:
            assert completion.token_ids == free[i].token_ids, i  # bit-identical greedy choices
        else:
            assert completion.text in choice_lists[i % 4] and completion.finish_reason == "stop", completion
    sampled = gen.generate_ids(prompts[:4], 48, sampling.from_settings(1.5, 1.0, 0), seed=7,
                               constraints=[gen.guide(guided.Guide.choices(HARD_CHOICES))] * 4)
    assert all(c.text in HARD_CHOICES for c in sampled)  # random, hot sampling: still one option each


def test_generate_cli_choices_give_one_option_per_prompt(tmp_path):
    from llama_e_jax.generate import cli

    out = tmp_path / "replies.jsonl"
    choices = ["Toys", "Toys & Games", "日本語", "C++ [x]?"]
    status = cli.main(["--model", "tiny", "--raw", "Q: pick one\nA:", "### Response:\n", "x",
                       "--choices", json.dumps(choices), "--max-new-tokens", "24", "--output", str(out)])
    assert status == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["text"] in choices and r["finish_reason"] == "stop" for r in rows), rows
    assert cli.main(["--model", "tiny", "x", "--choices", "a|b", "--regex", "a+"]) == 2  # one constraint at most


# ----------------------------------------------------------------------------- the real model

ROWS, MAX_CONTEXT, CHUNK = 8, 640, 8  # test_structured.py's shapes: the compiles are shared
INTENTS = ["track order", "return item", "shipping time", "product question", "cancel order"]
CATEGORIES = ["Electronics", "Home & Kitchen", "Toys", "Toys & Games", "Beauty", "Sports & Outdoors"]
CHOICE_ASKS = [  # (instruction, input, choices): after `### Response:\n`, where BPE prefers " Word" forms
    ("Which category does this product belong to?", "Wireless ergonomic mouse with USB receiver", CATEGORIES),
    ("Which category does this product belong to?", "Building blocks set, 500 pieces, ages 6+", CATEGORIES),
    ("What does the customer want?", "Where is my parcel? I ordered last week.", INTENTS),
    ("What does the customer want?", "Can I send the shoes back if they do not fit?", INTENTS),
    ("Pick the best label.", "A cast-iron pan for the kitchen", HARD_CHOICES),
    ("Pick the best label.", "ラーメン", HARD_CHOICES),
]
SCHEMA_ASKS = [  # (request, schema): the issue's schemas
    ("Classify a stainless steel kettle into a category. Answer in JSON.", CATEGORY_SCHEMA),
    ("Give the price in dollars of a basic water bottle. Answer in JSON.", PRICE_SCHEMA),
    ("Give up to three hashtags for a yoga mat. Answer in JSON.", HASHTAGS_SCHEMA),
    ("Write an ad for a steel water bottle with a headline and descriptions. Answer in JSON.", AD_SCHEMA),
]
SCHEMA_MAX_TOKENS = 160  # the stated budget: every reply must be complete ("stop") within it


@pytest.fixture(scope="module")
def smollm2(smollm2_params, smollm2_gguf):
    config, params = smollm2_params
    return Generator(config, params, load_tokenizer(smollm2_gguf), max_batch_size=ROWS, max_length=MAX_CONTEXT,
                     chunk_size=CHUNK)


def test_choices_after_the_response_prefix_are_always_exactly_one_option(smollm2):
    from llama_e_jax.data.prompt import build_prompt

    prompts = [build_prompt(instruction, text) for instruction, text, _ in CHOICE_ASKS]
    assert all(p.endswith("### Response:\n") for p in prompts)
    automata = [smollm2.guide(guided.Guide.choices(choices)) for _, _, choices in CHOICE_ASKS]
    for sampler, seed in ((GREEDY, 0), (sampling.from_settings(1.0, 1.0, 0), 3)):
        replies = smollm2.generate(prompts, 24, sampler, seed=seed, constraints=automata)
        for reply, (_, _, choices) in zip(replies, CHOICE_ASKS):
            assert reply.text in choices and reply.finish_reason == "stop", (reply, choices)


def test_the_issue_schemas_give_replies_that_validate(smollm2):
    prompts = [smollm2.tokenizer.apply_chat_template([{"role": "user", "content": ask}], add_generation_prompt=True)
               for ask, _ in SCHEMA_ASKS]
    automata = [smollm2.guide(guided.Guide.json_schema(schema)) for _, schema in SCHEMA_ASKS]
    replies = smollm2.generate(prompts, SCHEMA_MAX_TOKENS, GREEDY, constraints=automata)
    for reply, (_, schema) in zip(replies, SCHEMA_ASKS):
        assert reply.finish_reason == "stop", reply
        jsonschema.validate(json.loads(reply.text), schema)


@pytest.fixture(scope="module")
def server(smollm2):
    from llama_e_jax import serve as S

    engine = S.BatchingEngine(smollm2, max_batch_size=ROWS, chunk_size=CHUNK, batch_wait_s=0.05)
    with S.ServerThread(S.create_app(engine, model_name="smollm2", template="instruction")) as thread:
        yield thread


def test_the_server_answers_one_option_by_guided_choice_and_by_enum(server):
    openai = pytest.importorskip("openai")
    from llama_e_jax.data.prompt import build_prompt

    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=600)
    for instruction, text, choices in CHOICE_ASKS:
        completion = client.completions.create(model="smollm2", prompt=build_prompt(instruction, text), max_tokens=24,
                                               temperature=0, extra_body={"guided_choice": choices})
        assert completion.choices[0].text in choices and completion.choices[0].finish_reason == "stop"
        schema = {"type": "object", "properties": {"label": {"enum": choices}}, "required": ["label"]}
        chat = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": instruction}], max_tokens=48, temperature=0.8,
            seed=1, extra_body={"input": text},
            response_format={"type": "json_schema", "json_schema": {"name": "label", "schema": schema}})
        assert json.loads(chat.choices[0].message.content)["label"] in choices
        assert chat.choices[0].finish_reason == "stop"


def test_the_server_refuses_two_constraints_and_names_bad_ones(server):
    import httpx

    body = {"model": "smollm2", "prompt": "x", "max_tokens": 4}
    cases = [({"guided_choice": ["a"], "guided_regex": "b+"}, "guided_regex", "at most one"),
             ({"guided_choice": ["a", ""]}, "guided_choice", "choices[1]"),
             ({"guided_regex": "(a"}, "guided_regex", "cannot be compiled")]
    for extra, param, message in cases:
        response = httpx.post(server.base_url + "/completions", json=body | extra, timeout=120)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and message in error["message"], error
