"""Constrained decoding tables (llama_e_jax/generate/constraints.py) on the real SmolLM2 tokenizer.

What is checked, and how:
* choices: *every* token path the automaton allows spells exactly one choice. Paths are enumerated
  by walking the automaton (the set of byte strings reachable from each state, memoised per state, so
  the thousands of segmentations of a multi-token choice are all covered without listing them one by one).
* JSON schemas / regexes: random walks through the automaton end in texts that parse and validate
  with `jsonschema` (resp. `re.fullmatch`). A walk picks a random *token class* first, so closing
  quotes and brackets are as likely as any letter and walks end quickly.
* the device tables (`pack`, `allowed_mask`, `next_state`) agree with the host walker step by step,
  and leave unconstrained rows bit-identical.
* budgets and unsupported features fail with errors that name them.
"""

from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from llama_e_jax.generate import constraints as C
from llama_e_jax.io.tokenizer import ByteTokenizer, load_tokenizer
from llama_e_jax.model.llama import Llama

RESPONSE_PREFIX = "### Response:\n"

# Shared prefixes, a choice that is a prefix of another, multi-token and non-ASCII choices, regex
# metacharacters.
HARD_CHOICES = ["Home & Kitchen", "Home Decor", "Toys", "Toys & Games", "Electronics", "Küche (Haushalt)",
                "日本語", "🍳 Cooking", "C++ [x]?"]

CATEGORY_SCHEMA = {
    "type": "object",
    "properties": {"category": {"enum": ["Electronics", "Home & Kitchen", "Toys", "Toys & Games"]}},
    "required": ["category"],
}
PRICE_SCHEMA = {"type": "object", "properties": {"price": {"type": "number"}}, "required": ["price"]}
HASHTAGS_SCHEMA = {
    "type": "object",
    "properties": {"hashtags": {"type": "array", "items": {"type": "string", "pattern": "^#[A-Za-z0-9_]+$"},
                                "minItems": 1, "maxItems": 3}},
    "required": ["hashtags"],
}
AD_SCHEMA = {
    "type": "object",
    "properties": {
        "headline": {"type": "string", "maxLength": 60},
        "descriptions": {"type": "array", "items": {"type": "string", "maxLength": 90}, "minItems": 1, "maxItems": 3},
    },
    "required": ["headline", "descriptions"],
}
# The issue's measured schema: enum, number, maxLength-80 string, 3-item string array.
PRODUCT_SCHEMA = {
    "type": "object",
    "properties": {
        "category": {"enum": ["Electronics", "Home & Kitchen", "Toys", "Beauty"]},
        "price": {"type": "number"},
        "title": {"type": "string", "maxLength": 80},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["category", "price", "title", "tags"],
}
NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "in_stock": {"type": "boolean"},
        "quantity": {"type": "integer"},
        "seller": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                    "rating": {"type": "number"}},
                   "required": ["name", "rating"]},
    },
    "required": ["in_stock", "quantity", "seller"],
}


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf_dir):
    return load_tokenizer(smollm2_hf_dir)


@pytest.fixture(scope="module")
def spelled(tokenizer) -> list[bytes | None]:
    return C.token_bytes(tokenizer)


# ---------------------------------------------------------------------------------------- walking


def completions(automaton: C.Automaton, spelled: list[bytes | None]) -> tuple[set[bytes], int]:
    """(every byte string a complete path spells, number of distinct token paths), for an acyclic
    automaton (EOS self-loops aside). Memoised per state; each state must lead to some completion."""
    eos = set(automaton.eos_ids)

    @functools.lru_cache(maxsize=None)
    def from_state(state: int) -> tuple[frozenset[bytes], int]:
        texts, paths = ({b""}, 1) if automaton.final[state] else (set(), 0)
        for token in automaton.allowed_tokens(state):
            if int(token) in eos:
                assert automaton.final[state], f"EOS allowed in non-final state {state}"
                continue
            suffixes, count = from_state(automaton.step(state, int(token)))
            texts |= {spelled[token] + s for s in suffixes}
            paths += count
        assert texts, f"state {state} is a dead end: no path from it completes"
        return frozenset(texts), paths

    texts, paths = from_state(0)
    return set(texts), paths


def random_walk(automaton: C.Automaton, spelled: list[bytes | None], rng: np.random.Generator,
                max_steps: int = 2000) -> bytes:
    """Bytes of one random complete path: a random allowed class, then a random token of it; in a final
    state, stop with probability 1/2."""
    eos = set(automaton.eos_ids)
    state, text = 0, b""
    for _ in range(max_steps):
        if automaton.final[state] and rng.random() < 0.5:
            return text
        classes = np.flatnonzero(automaton.class_next[state] >= 0)
        members = np.flatnonzero(automaton.token_class == rng.choice(classes))
        token = int(rng.choice(members))
        if token in eos:
            return text
        text += spelled[token]
        state = automaton.step(state, token)
    raise AssertionError(f"walk did not finish in {max_steps} steps: {text[:200]!r}")


# ---------------------------------------------------------------------------------------- choices


def test_every_choice_path_spells_exactly_one_choice(tokenizer, spelled):
    automaton = C.compile_choices(HARD_CHOICES, tokenizer)
    texts, paths = completions(automaton, spelled)
    assert {t.decode("utf-8") for t in texts} == set(HARD_CHOICES)
    assert paths > 10 * len(HARD_CHOICES)  # the walk really covered non-canonical segmentations
    assert not automaton.final[0]  # the empty reply is not an option


def test_choice_tokenizations_in_response_context_are_accepted(tokenizer):
    """The tokens a model sees after `### Response:\\n` (its word-boundary form) are a path, and
    so is each canonical encoding; EOS is allowed exactly at the end of a complete choice."""
    automaton = C.compile_choices(HARD_CHOICES, tokenizer)
    prompt_ids = tokenizer.encode(RESPONSE_PREFIX)
    for choice in HARD_CHOICES:
        in_context = tokenizer.encode(RESPONSE_PREFIX + choice)
        assert in_context[: len(prompt_ids)] == prompt_ids
        for ids in (in_context[len(prompt_ids):], tokenizer.encode(choice)):
            state = automaton.walk(ids)
            assert automaton.final[state] and tokenizer.eos_id in automaton.allowed_tokens(state)
    prefix_state = automaton.walk(tokenizer.encode("Toys"))  # both "Toys" and "Toys & Games" are open
    assert automaton.final[prefix_state] and len(automaton.allowed_tokens(prefix_state)) > 1
    assert not automaton.accepts(tokenizer.encode("Toy")) and not automaton.accepts(tokenizer.encode("Toys &"))


def test_leading_space_form(tokenizer, spelled):
    choices = ["Electronics", "Toys"]
    automaton = C.compile_choices(choices, tokenizer, leading_space=True)
    texts, _ = completions(automaton, spelled)
    assert {t.decode() for t in texts} == {"Electronics", "Toys", " Electronics", " Toys"}
    assert all(C.match_choice(t.decode(), choices) for t in texts)
    assert C.match_choice("  Toys", choices) is None and C.match_choice("Toys ", choices) is None


def test_choices_on_the_byte_tokenizer():
    automaton = C.compile_choices(["ab", "a€"], ByteTokenizer())
    assert automaton.vocab_size == 256 and automaton.eos_ids == (2,)
    assert automaton.accepts(list("a€".encode())) and not automaton.accepts(list(b"a"))


@pytest.mark.parametrize("bad", [[], [""], ["ok", 3]])
def test_bad_choice_lists(tokenizer, bad):
    with pytest.raises(C.ConstraintError, match="choices"):
        C.compile_choices(bad, tokenizer)


# ---------------------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("schema", [CATEGORY_SCHEMA, PRICE_SCHEMA, HASHTAGS_SCHEMA, AD_SCHEMA, PRODUCT_SCHEMA,
                                    NESTED_SCHEMA],
                         ids=["category", "price", "hashtags", "ad", "product", "nested"])
def test_schema_walks_parse_and_validate(tokenizer, spelled, schema):
    automaton = C.compile_json_schema(schema, tokenizer)
    rng = np.random.default_rng(0)
    for _ in range(40):
        value = json.loads(random_walk(automaton, spelled, rng).decode("utf-8"))
        jsonschema.validate(value, schema)
        assert list(value) == [key for key in schema["properties"] if key in value]  # the schema's order


def test_product_schema_size_and_escapes(tokenizer, spelled):
    """The issue's figure (939 states, 4.0 M edges) and the compression that makes it small on device."""
    automaton = C.compile_json_schema(PRODUCT_SCHEMA, tokenizer)
    assert 900 <= automaton.num_states <= 1000 and 3.5e6 < automaton.edges < 4.5e6
    assert automaton.num_classes < 400 and automaton.nbytes < 8 * 2**20  # dense [S, V] int32 would be 185 MB
    rng = np.random.default_rng(1)
    texts = [random_walk(automaton, spelled, rng).decode("utf-8") for _ in range(60)]
    assert any("\\" in t for t in texts)  # escapes were exercised and still parsed
    for text in texts:
        jsonschema.validate(json.loads(text), PRODUCT_SCHEMA)


def test_regex_alternatives_are_all_accepted(tokenizer):
    """Full-match semantics, not outlines-core's leftmost-first: no alternative is cut off by a shorter one."""
    automaton = C.compile_regex(r"(a|ab)+ (cat|category)", tokenizer)
    for text in ("aab cat", "aab category", "aba category", "a cat"):
        assert automaton.accepts(tokenizer.encode(text)), text
    assert not automaton.accepts(tokenizer.encode("aab categ"))
    with pytest.raises(C.ConstraintError, match="empty string"):
        C.compile_regex(r"(a|ab)*", tokenizer)


def test_regex_walks_match(tokenizer, spelled):
    pattern = r"SKU-[0-9]{3}-[A-Z]{2}( \(refurbished\))?"
    automaton = C.compile_regex(pattern, tokenizer)
    rng = np.random.default_rng(0)
    for _ in range(30):
        assert re.fullmatch(pattern, random_walk(automaton, spelled, rng).decode())


@pytest.mark.slow  # outlines-core takes ~50 s on 2 cores for the generic object (1,600 states)
def test_json_object_walks_parse(tokenizer, spelled):
    automaton = C.compile_json_schema(C.JSON_OBJECT_SCHEMA, tokenizer)
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert isinstance(json.loads(random_walk(automaton, spelled, rng)), dict)


# ---------------------------------------------------------------------------------------- limits


def test_state_budget_error_names_the_budget(tokenizer):
    with pytest.raises(C.ConstraintError, match=r"exceed the budget of max_states=20"):
        C.compile_json_schema(CATEGORY_SCHEMA, tokenizer, budget=C.Budget(max_states=20))
    # A cached automaton is held to the budget of each call too.
    C.compile_json_schema(CATEGORY_SCHEMA, tokenizer)
    with pytest.raises(C.ConstraintError, match=r"max_states=20"):
        C.compile_json_schema(CATEGORY_SCHEMA, tokenizer, budget=C.Budget(max_states=20))


def test_memory_budget_error_names_the_budget(tokenizer):
    with pytest.raises(C.ConstraintError, match=r"max_table_bytes=0\.1 MiB"):
        C.compile_choices(["Electronics", "Toys"], tokenizer, budget=C.Budget(max_table_bytes=100 << 10))


@pytest.mark.parametrize("schema, keyword, where", [
    ({"type": "object", "properties": {"price": {"type": "number", "minimum": 0}}}, "minimum", "$.properties.price"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems", "$"),
    ({"anyOf": [{"type": "string"}, {"not": {"type": "null"}}]}, "not", "$.anyOf[1]"),
])
def test_unsupported_keyword_is_named(tokenizer, schema, keyword, where):
    with pytest.raises(C.ConstraintError, match=re.escape(f"{where}: keyword '{keyword}'")):
        C.compile_json_schema(schema, tokenizer)


def test_unsupported_structure_and_bad_regex(tokenizer):
    with pytest.raises(C.ConstraintError, match="not supported"):
        C.compile_json_schema({"$ref": "http://example.com/schema.json"}, tokenizer)
    with pytest.raises(C.ConstraintError, match="not valid JSON"):
        C.compile_json_schema("{not json", tokenizer)
    with pytest.raises(C.ConstraintError, match="cannot be compiled"):
        C.compile_regex("(unclosed", tokenizer)


def test_compiles_are_cached_per_tokenizer(tokenizer):
    first = C.compile_choices(["Electronics", "Toys"], tokenizer)
    assert C.compile_choices(["Electronics", "Toys"], tokenizer) is first
    assert C.compile_choices(["Electronics", "Toys"], tokenizer, eos_ids=[2, 0]) is not first


# ---------------------------------------------------------------------------------------- device tables


def test_device_tables_follow_the_host_walker(tokenizer):
    """Rows in two different automata plus one unconstrained row, stepped on device with random allowed
    tokens: the mask equals the host's allowed set and the states equal the host walker's."""
    choices = C.compile_choices(HARD_CHOICES, tokenizer)
    schema = C.compile_json_schema(AD_SCHEMA, tokenizer)
    tables, initial = C.pack([choices, schema])
    vocab = tokenizer.vocab_size
    mask_fn = jax.jit(C.allowed_mask, static_argnums=2)
    step_fn = jax.jit(C.next_state)
    device_state = jnp.asarray([initial[0], initial[1], C.UNCONSTRAINED], jnp.int32)
    host_state = [0, 0]
    rng = np.random.default_rng(0)
    for _ in range(12):
        mask = np.asarray(mask_fn(tables, device_state, vocab))
        assert mask[2].all()
        tokens = []
        for row, automaton in enumerate((choices, schema)):
            allowed = automaton.allowed_tokens(host_state[row])
            np.testing.assert_array_equal(np.flatnonzero(mask[row]), allowed)
            non_eos = [t for t in allowed if t not in automaton.eos_ids] or list(allowed)
            tokens.append(int(rng.choice(non_eos)))
            host_state[row] = automaton.step(host_state[row], tokens[-1])
        tokens.append(17)
        device_state = step_fn(tables, device_state, jnp.asarray(tokens, jnp.int32))
        assert device_state.tolist() == [host_state[0] + initial[0], host_state[1] + initial[1], C.UNCONSTRAINED]


def test_disallowed_token_goes_dead_and_unconstrained_logits_are_untouched(tokenizer):
    tables, initial = C.pack([C.compile_choices(["Electronics", "Toys"], tokenizer)])
    bad = tokenizer.encode("{")[0]
    state = C.next_state(tables, jnp.asarray([initial[0], C.UNCONSTRAINED], jnp.int32), jnp.asarray([bad, bad]))
    assert state.tolist() == [C.DEAD, C.UNCONSTRAINED]
    mask = C.allowed_mask(tables, state, tokenizer.vocab_size)
    assert np.flatnonzero(mask[0]).tolist() == [tokenizer.eos_id]  # a dead row can only end
    logits = jax.random.normal(jax.random.key(0), (2, tokenizer.vocab_size))
    masked = C.mask_logits(tables, state, logits)
    assert np.array_equal(np.asarray(masked[1]), np.asarray(logits[1]))  # bit-identical
    assert int(jnp.argmax(masked[0])) == tokenizer.eos_id


def test_pack_capacities_are_powers_of_two(tokenizer):
    tables, initial = C.pack([C.compile_choices(["Electronics", "Toys"], tokenizer)])
    assert initial == [1]
    for array in (tables.mask_bits, tables.final, tables.class_next):
        assert array.shape[0] & (array.shape[0] - 1) == 0
    assert tables.mask_bits.shape[1] == -(-tokenizer.vocab_size // 32)
    # A fixed capacity keeps one table shape (one compiled decode step) across requests.
    fixed, _ = C.pack([C.compile_choices(["Toys"], tokenizer)], min_states=2048, min_entries=1 << 20, min_automata=4)
    assert fixed.mask_bits.shape[0] == 2048 and fixed.class_next.shape == (1 << 20,) and fixed.token_class.shape[0] == 4
    empty, initial = C.pack([], vocab_size=tokenizer.vocab_size, min_states=2048)
    assert initial == [] and empty.mask_bits.shape == fixed.mask_bits.shape
    with pytest.raises(C.ConstraintError, match="vocab"):
        C.pack([])


def test_greedy_decode_loop_on_a_tiny_model(tiny_config, tiny_params):
    """The wiring a decode loop needs (`constrain_logits` between model and sampler, `advance` after
    sampling), in a jitted fori_loop: the constrained row spells a choice and ends; the unconstrained
    row decodes exactly as in a batch where no row is constrained (where lax.cond skips all the work)."""
    config = tiny_config("gqa", vocab_size=256)
    params = jax.tree.map(jnp.asarray, tiny_params(config))
    tokenizer = ByteTokenizer()
    choices = ["red", "re", "green", "grün", "blue"]
    tables, initial = C.pack([C.compile_choices(choices, tokenizer)])
    prompt, steps, eos = list(b"colour of the sky: "), 8, tokenizer.eos_id

    @jax.jit
    def decode(state):  # [B] -> ([B, steps] tokens, [B] final states)
        batch = state.shape[0]
        ids = jnp.zeros((batch, len(prompt) + steps), jnp.int32).at[:, : len(prompt)].set(jnp.asarray(prompt))
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)

        def step(i, carry):
            ids, state, done = carry
            logits = Llama(config).apply({"params": params}, ids, positions=positions)[:, len(prompt) + i - 1]
            token = jnp.argmax(C.constrain_logits(tables, state, logits), axis=-1).astype(jnp.int32)
            token = jnp.where(done, eos, token)
            return ids.at[:, len(prompt) + i].set(token), C.advance(tables, state, token), done | (token == eos)

        ids, state, _ = jax.lax.fori_loop(0, steps, step, (ids, state, jnp.zeros(batch, bool)))
        return ids[:, len(prompt):], state

    mixed, mixed_state = decode(jnp.asarray([initial[0], C.UNCONSTRAINED], jnp.int32))
    free, _ = decode(jnp.asarray([C.UNCONSTRAINED, C.UNCONSTRAINED], jnp.int32))
    reply = mixed[0].tolist()
    assert eos in reply and bytes(reply[: reply.index(eos)]).decode() in choices
    assert int(mixed_state[0]) > C.DEAD and bool(tables.final[mixed_state[0]])
    np.testing.assert_array_equal(mixed[1], free[1])
    assert mixed[0].tolist() != free[0].tolist()  # the constraint changed what the random model said
