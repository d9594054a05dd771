"""Constraints on what a row may decode (choices, a JSON schema, a regex) as tables a decode step indexes.

Design, and why:

* **The automaton comes from outlines-core.** A choice list, a JSON schema or a regex becomes a regex
  (choices: an alternation of the escaped strings; schemas: `outlines_core.json_schema`), and
  `outlines_core.Index` turns the regex plus the tokenizer's vocabulary *as bytes* into a token-level
  DFA: for each state, which tokens may come next and where each leads. Final states allow EOS.
  We do not write a regex or schema compiler ourselves.
* **Why outlines-core and not xgrammar or llguidance.** Both handle more (context-free grammars,
  recursive schemas), but both are *runtime matchers*: a host-side object computes
  the next-token bitmask every step (xgrammar's `GrammarMatcher.fill_next_token_bitmask`,
  llguidance's `LLMatcher.compute_mask`) because a pushdown automaton's stack is not a finite table.
  Our decode loop is one `lax.while_loop` on device, so a per-token host round trip is exactly what
  we must avoid. outlines-core's output is a finite DFA computed once, offline, which we can turn into
  arrays and index inside the loop. (Installing xgrammar 0.2.9 also pulled in torch and the CUDA
  wheels: a 5.7 GB virtual environment; llguidance 1.9 is light but has the same runtime model.)
  The price: regular languages only, so recursive schemas are unrolled to a fixed depth and some
  keywords (numeric bounds, uniqueItems, ...) are not expressible; those are refused by name
  (`UNSUPPORTED_KEYWORDS`) instead of being silently ignored as outlines-core would.
* **Token classes keep the next-state table small.** A dense [S, V] next-state table is 944 × 49,152
  int32 = 186 MB for the issue's product schema (944 states, 4.0 M token edges here; the issue
  measured 939). But most tokens behave identically in every state
  (all plain letters inside a string, all tokens that are never allowed, ...): grouping tokens whose
  next-state column is identical gives 261 classes for that schema (79 for a 4-way choice). The
  device tables are then `token_class[V]` plus `class_next[S, C]` (1 MB), and the step is two gathers.
  (CSR token lists with an on-device searchsorted would need 32 MB and ~16 dependent gathers.)
  Classes are found by hashing each token's column (a random 64-bit weight per state) and then
  *verified* exactly, so a hash collision can never merge different tokens.
* **The mask is a packed bitmask**, [S, ceil(V/32)] uint32 (5.8 MB at 944 states): one row gather and
  a broadcast shift per step, cheaper than re-deriving it from the class table ([B, V] gathers).
* **Full-match semantics.** outlines-core's DFA is leftmost-first, which cuts off an alternative
  behind a shorter one ("Toys|Toys & Games"); every regex is compiled as `(?:regex)$`, which accepts
  all full matches at the same state count.
* **Many constraints, one table set.** Rows of one batch may carry different constraints. `pack`
  concatenates automata into one global state space (state ids are offsets), so a row's state alone
  says which automaton it is in. Global state 0 is DEAD (only EOS allowed): a disallowed token, which
  the mask should make impossible, ends the row instead of corrupting it. Capacities are rounded up to
  powers of two so that a new constraint rarely changes the shapes the decode step was compiled for.
* **Unconstrained rows cost nothing.** State `UNCONSTRAINED` (-1) allows every token and never moves.
  `allowed_mask` / `next_state` are pure jnp; a decode loop calls them under
  `lax.cond(any(state >= 0), ...)` so a batch with no constrained row does no extra work and its
  logits are bit-identical.
* **Limits are explicit.** `Budget` bounds states and device-table bytes; exceeding either, or a
  schema keyword outside what the compiler supports, raises `ConstraintError` naming the budget or the
  keyword (the server turns it into a 400). Compiled automata are cached in memory per (regex,
  tokenizer, EOS ids, vocab width); compiling can take a while (the product schema 3 s, the generic
  `json_object` ~50 s on 2 busy cores), so a server compiles off its engine thread.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import weakref
from typing import Any, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from outlines_core import Index, Vocabulary
from outlines_core.json_schema import build_regex_from_schema

UNCONSTRAINED = -1  # a row's state when it carries no constraint: every token allowed, never moves
DEAD = 0  # global state 0 of packed tables: only EOS allowed (reached only by a disallowed token)

# Keywords that outlines-core 0.2 either rejects or silently ignores (measured: `minimum` leaves the
# integer regex unbounded). Refusing them by name is better than replies that fail validation.
UNSUPPORTED_KEYWORDS = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems",
    "contains", "minContains", "maxContains", "not", "if", "then", "else", "dependentRequired",
    "dependentSchemas", "dependencies", "propertyNames", "patternProperties", "unevaluatedProperties",
    "unevaluatedItems", "minProperties", "maxProperties",
})
_SCHEMA_MAP_KEYWORDS = ("properties", "$defs", "definitions")  # name -> subschema
_SCHEMA_LIST_KEYWORDS = ("anyOf", "oneOf", "allOf", "prefixItems")  # list of subschemas
_SCHEMA_VALUE_KEYWORDS = ("items", "additionalProperties")  # a subschema (or a bool)

# Choices: characters that mean something in a regex are escaped (outlines-core uses Rust's syntax).
_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


class ConstraintError(ValueError):
    """A constraint that cannot be compiled: unsupported feature, over budget, or malformed."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """Limits on one compiled constraint (defaults fit the issue's schemas with room to spare)."""

    max_states: int = 4096  # DFA states
    max_table_bytes: int = 64 << 20  # mask bits + class table + token classes, on device


# ============================================================================== one automaton (host)


@dataclasses.dataclass(frozen=True, eq=False)
class Automaton:
    """One compiled constraint as host arrays; state 0 is the initial state.

    Attributes:
      description: what was compiled (for errors and logs).
      token_class: [V] int32, the class of each token id (tokens with identical transitions share one).
      class_next: [S, C] int32, next state per (state, class); -1 = token not allowed.
      mask_bits: [S, ceil(V/32)] uint32, bit t % 32 of word t // 32 set when token t is allowed.
      final: [S] bool, states where the text so far is complete (EOS allowed there).
      eos_ids: the ids that end a row; allowed exactly in final states, where they lead to themselves.
      edges: number of (state, token) transitions, EOS included.
      build_seconds: wall time of the compile.
    """

    description: str
    token_class: np.ndarray
    class_next: np.ndarray
    mask_bits: np.ndarray
    final: np.ndarray
    eos_ids: tuple[int, ...]
    edges: int
    build_seconds: float

    @property
    def num_states(self) -> int:
        return self.class_next.shape[0]

    @property
    def num_classes(self) -> int:
        return self.class_next.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.token_class.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the device tables for this automaton."""
        return self.token_class.nbytes + self.class_next.nbytes + self.mask_bits.nbytes + self.final.nbytes

    # ------------------------------------------------------------------ the host-side reference walker

    def allowed_tokens(self, state: int) -> np.ndarray:
        """Sorted token ids allowed in `state` (from the class table, independently of `mask_bits`)."""
        return np.flatnonzero(self.class_next[state][self.token_class] >= 0)

    def step(self, state: int, token: int) -> int:
        """The state after `token`; ConstraintError when the token is not allowed in `state`."""
        nxt = int(self.class_next[state, self.token_class[token]])
        if nxt < 0:
            raise ConstraintError(f"{self.description}: token {token} is not allowed in state {state}")
        return nxt

    def walk(self, tokens: Iterable[int]) -> int:
        """The state after feeding `tokens` from the initial state (raises on a disallowed token)."""
        state = 0
        for token in tokens:
            state = self.step(state, int(token))
        return state

    def accepts(self, tokens: Sequence[int]) -> bool:
        """Whether `tokens` (without EOS) is a complete text of the constraint."""
        try:
            return bool(self.final[self.walk(tokens)])
        except ConstraintError:
            return False


# ============================================================================== compiling


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each token id spells (None for special tokens), for byte-level BPE, SentencePiece
    with byte fallback, and the byte tokenizer of random models."""
    if not hasattr(tokenizer, "backend"):  # ByteTokenizer: id = byte, 0-2 are pad/bos/eos
        return [None, None, None] + [bytes([b]) for b in range(3, 256)]
    special = tokenizer.special_ids
    pieces = [None if i in special else tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    byte_of_char = _byte_level_alphabet()
    if all(p is None or all(c in byte_of_char for c in p) for p in pieces):
        return [None if p is None else bytes(byte_of_char[c] for c in p) for p in pieces]
    return [None if p is None else _sentencepiece_bytes(p) for p in pieces]


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the other bytes
    for the characters 256, 257, ... in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    for offset, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + offset)
    return {c: b for b, c in chars.items()}


def _sentencepiece_bytes(piece: str) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def choices_regex(choices: Sequence[str], leading_space: bool = False) -> str:
    """A regex matching exactly one of `choices` (optionally after one space: the word-boundary form
    a BPE model may prefer right after a newline; `match_choice` strips it again)."""
    cleaned = list(dict.fromkeys(choices))  # duplicates would only add identical paths
    if not cleaned:
        raise ConstraintError("choices: the list is empty")
    for i, choice in enumerate(cleaned):
        if not isinstance(choice, str) or not choice:
            raise ConstraintError(f"choices[{i}]: must be a non-empty string, got {choice!r}")
    return ("( )?" if leading_space else "") + "(" + "|".join(regex_escape(choice) for choice in cleaned) + ")"


def regex_escape(text: str) -> str:
    """`text` as a regex (outlines-core's Rust syntax) that matches exactly it."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def match_choice(text: str, choices: Sequence[str]) -> str | None:
    """The choice `text` spells (exactly, or after the one optional leading space), else None."""
    for candidate in (text, text[1:] if text.startswith(" ") else None):
        if candidate is not None and candidate in choices:
            return candidate
    return None


def check_schema_keywords(schema: Any, where: str = "$") -> None:
    """ConstraintError naming the first keyword outlines-core cannot enforce, with its JSON path."""
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        if key in UNSUPPORTED_KEYWORDS:
            raise ConstraintError(f"JSON schema {where}: keyword {key!r} is not supported by the constraint "
                                  f"compiler (outlines-core cannot enforce it)")
        if key in _SCHEMA_MAP_KEYWORDS and isinstance(value, dict):
            for name, sub in value.items():
                check_schema_keywords(sub, f"{where}.{key}.{name}")
        elif key in _SCHEMA_LIST_KEYWORDS and isinstance(value, list):
            for i, sub in enumerate(value):
                check_schema_keywords(sub, f"{where}.{key}[{i}]")
        elif key in _SCHEMA_VALUE_KEYWORDS:
            check_schema_keywords(value, f"{where}.{key}")


def schema_regex(schema: dict | str) -> str:
    """The regex outlines-core derives from a JSON schema (whitespace: at most one space, so the
    automaton stays small and a reply cannot stall on blanks)."""
    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConstraintError(f"JSON schema: not valid JSON ({error})") from error
    check_schema_keywords(parsed)
    try:
        return build_regex_from_schema(text, r"[ ]?")
    except (ValueError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConstraintError(f"JSON schema: not supported by the constraint compiler: {first_line}") from error


JSON_OBJECT_SCHEMA = {"type": "object"}  # response_format {"type": "json_object"}


class _Compiler:
    """Per-tokenizer state: the outlines-core vocabulary (built once) and the automaton cache."""

    def __init__(self, tokenizer: Any, eos_ids: tuple[int, ...], vocab_size: int):
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size
        byte_map: dict[bytes, list[int]] = {}
        for token_id, spelled in enumerate(token_bytes(tokenizer)):
            if spelled:  # the empty string is never a useful step
                byte_map.setdefault(spelled, []).append(token_id)
        self.vocabulary = Vocabulary(eos_ids[0], byte_map)
        self.cache: dict[str, Automaton] = {}  # by regex; budgets are checked on every use
        self.lock = threading.Lock()

    def compile(self, regex: str, description: str, budget: Budget) -> Automaton:
        with self.lock:
            automaton = self.cache.get(regex)
        if automaton is None:
            automaton = _build(regex, description, self.vocabulary, self.eos_ids, self.vocab_size, budget)
            with self.lock:
                self.cache[regex] = automaton
        _check_budget(automaton.num_states, automaton.nbytes, description, budget)
        return automaton


_COMPILERS: "weakref.WeakKeyDictionary[Any, dict[tuple, _Compiler]]" = weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()


def _compiler(tokenizer: Any, eos_ids: Sequence[int] | None, vocab_size: int | None) -> _Compiler:
    eos = tuple(int(i) for i in (eos_ids if eos_ids is not None else [tokenizer.eos_id]))
    vocab = int(vocab_size if vocab_size is not None else tokenizer.vocab_size)
    if not eos:
        raise ConstraintError("eos_ids: at least one end-of-sequence id is needed")
    if vocab < tokenizer.vocab_size:
        raise ConstraintError(f"vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size}")
    with _COMPILERS_LOCK:
        per_tokenizer = _COMPILERS.setdefault(tokenizer, {})
        if (eos, vocab) not in per_tokenizer:
            per_tokenizer[(eos, vocab)] = _Compiler(tokenizer, eos, vocab)
        return per_tokenizer[(eos, vocab)]


def compile_regex(regex: str, tokenizer: Any, *, eos_ids: Sequence[int] | None = None,
                  vocab_size: int | None = None, budget: Budget = Budget(), description: str | None = None
                  ) -> Automaton:
    """The automaton of `regex` (full match) over `tokenizer`'s tokens, cached per tokenizer, EOS ids and
    width; `budget` is checked on every call, cached or not.

    `eos_ids` (default: the tokenizer's EOS) end a row and are allowed exactly in final states;
    `vocab_size` (default: the tokenizer's) is the model's logit width, ≥ the tokenizer's.
    """
    return _compiler(tokenizer, eos_ids, vocab_size).compile(regex, description or f"regex {regex!r}", budget)


def compile_choices(choices: Sequence[str], tokenizer: Any, *, leading_space: bool = False, **kwargs) -> Automaton:
    """The automaton whose complete paths spell exactly one of `choices` (see `choices_regex`)."""
    regex = choices_regex(choices, leading_space)
    return compile_regex(regex, tokenizer, description=f"choices {list(choices)!r}"[:200], **kwargs)


def compile_json_schema(schema: dict | str, tokenizer: Any, **kwargs) -> Automaton:
    """The automaton of the JSON texts valid under `schema` (see `schema_regex`)."""
    text = schema if isinstance(schema, str) else json.dumps(schema)
    return compile_regex(schema_regex(text), tokenizer, description=f"JSON schema {text[:160]}", **kwargs)


def _build(regex: str, description: str, vocabulary: Vocabulary, eos_ids: tuple[int, ...], vocab_size: int,
           budget: Budget) -> Automaton:
    start = time.perf_counter()
    # outlines-core's DFA has leftmost-first semantics: where an alternative matches, the alternatives
    # listed after it are cut off ("Toys|Toys & Games" never reaches " & Games", "(a|ab)+" rejects
    # "aab"). Anchoring the end with `$` makes it accept every full match, with the same state count.
    try:
        index = Index(f"(?:{regex})$", vocabulary)
    except (ValueError, TypeError) as error:
        if "start state" in str(error):  # what outlines-core says for a regex that matches ""
            raise ConstraintError(f"{description}: matches the empty string, which the constraint compiler "
                                  f"cannot express; make it non-empty (e.g. + instead of *)") from error
        raise ConstraintError(f"{description}: cannot be compiled: {error}") from error
    transitions = index.get_transitions()  # {state: {token: next state}}, outlines' own state ids
    _check_budget(len(transitions), 0, description, budget)  # before the big host arrays are built
    initial = index.get_initial_state()
    order = [initial] + sorted(s for s in transitions if s != initial)
    local = {s: i for i, s in enumerate(order)}
    final = np.zeros(len(order), bool)
    final[[local[s] for s in index.get_final_states() if s in local]] = True
    dtype = np.int16 if len(order) < 2**15 else np.int32  # halves the host peak for usual sizes
    rows = [_state_row(transitions[s], local, i, eos_ids, final[i], vocab_size, dtype) for i, s in enumerate(order)]
    token_class, class_next = _token_classes(rows, vocab_size)
    words = -(-vocab_size // 32)
    mask_bits = np.stack([_pack_bits(row >= 0, words) for row in rows])
    automaton = Automaton(description, token_class, class_next, mask_bits, final, eos_ids,
                          edges=int(sum((row >= 0).sum() for row in rows)),
                          build_seconds=time.perf_counter() - start)
    _check_budget(automaton.num_states, automaton.nbytes, description, budget)
    if not np.any(final):
        raise ConstraintError(f"{description}: no text satisfies the constraint with this tokenizer")
    return automaton


def _check_budget(num_states: int, nbytes: int, description: str, budget: Budget) -> None:
    if num_states > budget.max_states:
        raise ConstraintError(f"{description}: {num_states} automaton states exceed the budget of "
                              f"max_states={budget.max_states}")
    if nbytes > budget.max_table_bytes:
        raise ConstraintError(f"{description}: device tables of {nbytes / 2**20:.1f} MiB exceed the "
                              f"budget of max_table_bytes={budget.max_table_bytes / 2**20:.1f} MiB")


def _state_row(edges: dict[int, int], local: dict[int, int], here: int, eos_ids: tuple[int, ...],
               is_final: bool, vocab_size: int, dtype: Any) -> np.ndarray:
    """[V] next local state per token (-1: not allowed); every EOS id loops in final states."""
    row = np.full(vocab_size, -1, dtype)
    if edges:
        row[np.fromiter(edges.keys(), np.int64, len(edges))] = [local[s] for s in edges.values()]
    row[list(eos_ids)] = here if is_final else -1
    return row


def _token_classes(rows: list[np.ndarray], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(token_class [V], class_next [S, C]) such that rows[s][t] == class_next[s, token_class[t]].

    Each token's column over states is hashed with a random 64-bit weight per state; the grouping is
    then checked exactly (a collision would raise here, not mis-decode later).
    """
    weights = np.random.default_rng(0).integers(1, 2**63, size=len(rows), dtype=np.uint64)
    signature = np.zeros(vocab_size, np.uint64)
    for weight, row in zip(weights, rows):
        signature += (row.astype(np.int64) + 1).astype(np.uint64) * weight  # wraps mod 2**64, as intended
    _, representative, token_class = np.unique(signature, return_index=True, return_inverse=True)
    class_next = np.stack([row[representative] for row in rows]).astype(np.int32)
    for s, row in enumerate(rows):
        if not np.array_equal(class_next[s][token_class], row):
            raise ConstraintError("token classes: 64-bit signature collision (please report this)")
    return token_class.astype(np.int32), class_next


def _pack_bits(allowed: np.ndarray, words: int) -> np.ndarray:
    """[V] bool -> [words] uint32, bit t % 32 of word t // 32 = allowed[t]."""
    padded = np.zeros(words * 32, bool)
    padded[: allowed.shape[0]] = allowed
    return np.packbits(padded, bitorder="little").view("<u4").astype(np.uint32)


# ============================================================================== device tables


class ConstraintTables(NamedTuple):
    """Several automata packed into one global state space, as device arrays (a pytree).

    A row's state is a global id: `UNCONSTRAINED` (-1), `DEAD` (0), or an automaton's local state plus
    that automaton's offset. Shapes are capacities rounded up to powers of two (padding is DEAD-like).

    Attributes:
      mask_bits: [S, W] uint32, allowed tokens per state (W = ceil(V / 32)).
      final: [S] bool, states where the row may end (EOS allowed).
      automaton: [S] int32, which packed automaton a state belongs to (row of `token_class`).
      row_offset: [S] int32, where the state's row of classes starts in `class_next`.
      token_class: [K, V] int32, class of each token per automaton.
      class_next: [E] int32, flattened per-automaton [S_k, C_k] tables of *global* next states.
    """

    mask_bits: Any
    final: Any
    automaton: Any
    row_offset: Any
    token_class: Any
    class_next: Any


def _capacity(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def pack(automata: Sequence[Automaton], *, vocab_size: int | None = None, min_states: int = 1,
         min_entries: int = 1, min_automata: int = 1) -> tuple[ConstraintTables, list[int]]:
    """(tables, initial global state of each automaton) for rows that carry these automata.

    All automata must share one vocabulary width (`vocab_size`, needed only when `automata` is empty:
    then the tables hold DEAD alone). Pass each distinct automaton once; rows with the same constraint
    start from the same initial state. The `min_*` capacities let a server keep one table shape (one
    compiled decode step) across requests: states, class-table entries, automata.
    """
    widths = {a.vocab_size for a in automata} | ({vocab_size} if vocab_size is not None else set())
    if len(widths) != 1:
        raise ConstraintError(f"pack: need exactly one vocab size, got {sorted(widths)} (pass vocab_size=)")
    vocab = widths.pop()
    words = -(-vocab // 32)
    eos_ids = automata[0].eos_ids if automata else ()
    offsets = np.cumsum([1] + [a.num_states for a in automata])  # state 0 is DEAD
    flat_offsets = np.cumsum([0] + [a.num_states * a.num_classes for a in automata])
    num_states = _capacity(max(int(offsets[-1]), min_states))
    num_entries = _capacity(max(int(flat_offsets[-1]), min_entries))
    mask_bits = np.zeros((num_states, words), np.uint32)
    final = np.zeros(num_states, bool)
    automaton_of = np.zeros(num_states, np.int32)
    row_offset = np.zeros(num_states, np.int32)  # unused for DEAD (it never moves) and padding
    token_class = np.zeros((_capacity(max(len(automata), min_automata)), vocab), np.int32)
    class_next = np.full(num_entries, DEAD, np.int32)
    for eos in eos_ids:
        mask_bits[DEAD, eos // 32] |= np.uint32(1 << (eos % 32))
    for k, a in enumerate(automata):
        if a.eos_ids != eos_ids:
            raise ConstraintError(f"pack: automata with different eos_ids {a.eos_ids} and {eos_ids}")
        states = slice(offsets[k], offsets[k + 1])
        mask_bits[states] = a.mask_bits
        final[states] = a.final
        automaton_of[states] = k
        row_offset[states] = flat_offsets[k] + np.arange(a.num_states) * a.num_classes
        token_class[k] = a.token_class
        global_next = np.where(a.class_next >= 0, a.class_next + offsets[k], DEAD)
        class_next[flat_offsets[k]:flat_offsets[k + 1]] = global_next.reshape(-1)
    tables = ConstraintTables(*(jnp.asarray(x) for x in (mask_bits, final, automaton_of, row_offset,
                                                          token_class, class_next)))
    return tables, [int(o) for o in offsets[:-1]]


def allowed_mask(tables: ConstraintTables, state: jnp.ndarray, vocab_size: int) -> jnp.ndarray:
    """[B] int32 global states -> [B, V] bool, True where the token may come next.

    `UNCONSTRAINED` rows allow every token. `vocab_size` is the logits' width (static).
    """
    words = tables.mask_bits[jnp.maximum(state, 0)]  # [B, W] uint32
    shifts = jnp.arange(32, dtype=jnp.uint32)  # unpacking by broadcast: no [B, V] gather
    bits = (words[:, :, None] >> shifts) & jnp.uint32(1)  # [B, W, 32], bit t % 32 of word t // 32
    allowed = bits.reshape(words.shape[0], -1)[:, :vocab_size] == 1  # [B, V]
    return allowed | (state < 0)[:, None]


def next_state(tables: ConstraintTables, state: jnp.ndarray, token: jnp.ndarray) -> jnp.ndarray:
    """[B] states, [B] sampled tokens -> [B] states after the token (UNCONSTRAINED and DEAD stay)."""
    safe = jnp.maximum(state, 0)  # [B]
    token_class = tables.token_class[tables.automaton[safe], token]  # [B]
    nxt = tables.class_next[tables.row_offset[safe] + token_class]  # [B]
    return jnp.where(state <= DEAD, state, nxt)


def mask_logits(tables: ConstraintTables, state: jnp.ndarray, logits: jnp.ndarray) -> jnp.ndarray:
    """[B, V] logits with disallowed tokens at the dtype's lowest value (not -inf, so a softmax over a
    row stays finite); UNCONSTRAINED rows come back unchanged, bit for bit."""
    allowed = allowed_mask(tables, state, logits.shape[-1])
    return jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)


def constrain_logits(tables: ConstraintTables, state: jnp.ndarray, logits: jnp.ndarray) -> jnp.ndarray:
    """`mask_logits` when some row is constrained; otherwise the logits as they are, with no per-step
    work (lax.cond runs one branch). The decode step calls this between the model and the sampler."""
    return jax.lax.cond(jnp.any(state >= 0), lambda: mask_logits(tables, state, logits), lambda: logits)


def advance(tables: ConstraintTables, state: jnp.ndarray, token: jnp.ndarray) -> jnp.ndarray:
    """`next_state` when some row can move; otherwise the states as they are (lax.cond). The decode
    step calls this right after sampling `token` [B]."""
    return jax.lax.cond(jnp.any(state > DEAD), lambda: next_state(tables, state, token), lambda: state)
