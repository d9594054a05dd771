"""Guided decoding, host side: what a request asks for -> a compiled automaton -> a decode session's tables.

Design, and why:

* **A `Guide` is the request's wish, as a value**: choices (vLLM's `guided_choice`), a regex
  (`guided_regex`) or a JSON schema (`response_format` json_schema, or json_object). It is frozen and
  hashable, so it is also the cache key; `Guide.compile` turns it into a `constraints.Automaton` over a
  tokenizer (constraints.py caches automata per regex and tokenizer, so a repeated guide costs a dict
  lookup). `from_response_format` is the one parser of OpenAI's `response_format`; every refusal is a
  `ConstraintError` naming the field, the keyword or the budget (the server answers it with a 400).
* **Compiling never blocks decoding.** A JSON schema can take seconds to compile (the generic
  `json_object` automaton tens of seconds on a busy CPU). `GuideCompiler` runs compiles on its own
  worker threads and waits at most `time_limit_s`: past it the caller gets a ConstraintError naming the
  limit while the compile finishes and lands in the cache, so the next identical request is
  immediate. The worker is a separate (spawned) process: on a thread, building the host tables of the
  product schema held the GIL for up to 1.4 s at a time (measured), which would stall the engine
  thread's decode loop; the price is pickling the tokenizer once and each automaton's tables back.
* **One table set per session, with room to spare.** A decode session holds the packed tables of the
  automata its rows follow (`constraints.pack`) inside its device state, with fixed minimum
  capacities (`Capacity`): admitting a request with a new constraint re-packs the tables on the host
  but keeps their shapes, so the compiled decode step is reused. `PackedGuides` knows which automaton
  sits at which state offset; when a re-pack moves automata (ones no row uses any more are dropped),
  it returns a `remap` from old to new global states that the session applies to the rows still
  running, so a row never loses its place.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import multiprocessing
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from llama_e_jax.generate.constraints import (
    DEAD, JSON_OBJECT_SCHEMA, UNCONSTRAINED, Automaton, Budget, ConstraintError, ConstraintTables, compile_choices,
    compile_regex, pack, regex_escape,
)
from llama_e_jax.generate.constraints import schema_regex as constraints_schema_regex

__all__ = ["Capacity", "ConstraintError", "Guide", "GuideCompiler", "PackedGuides", "from_response_format",
           "remap_states"]


# ============================================================================= what a request asks for


@dataclasses.dataclass(frozen=True)
class Guide:
    """A constraint a request asks for. `value`: the choices (a tuple), the regex, or the schema's JSON text
    (property order kept: it is the order the reply writes them in)."""

    kind: Literal["choices", "regex", "json_schema"]
    value: tuple[str, ...] | str

    @classmethod
    def choices(cls, choices: Sequence[str]) -> "Guide":
        if isinstance(choices, str) or not isinstance(choices, Sequence):
            raise ConstraintError(f"choices: expected a list of strings, got {type(choices).__name__}")
        return cls("choices", tuple(choices))

    @classmethod
    def regex(cls, regex: str) -> "Guide":
        if not isinstance(regex, str) or not regex:
            raise ConstraintError("regex: expected a non-empty string")
        return cls("regex", regex)

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> "Guide":
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema, ensure_ascii=False))

    def compile(self, tokenizer: Any, *, eos_ids: Sequence[int], vocab_size: int,
                budget: Budget = Budget()) -> Automaton:
        """The automaton over `tokenizer` (cached by constraints.py); ConstraintError if it cannot be built."""
        options = dict(eos_ids=tuple(eos_ids), vocab_size=vocab_size, budget=budget)
        if self.kind == "choices":
            return compile_choices(self.value, tokenizer, **options)
        if self.kind == "regex":
            return compile_regex(self.value, tokenizer, **options)
        return compile_regex(schema_regex(self.value), tokenizer, description=f"JSON schema {self.value[:160]}",
                             **options)


def schema_regex(schema_text: str) -> str:
    """constraints.schema_regex, with property names that JSON must escape (`"`, `\\`, control
    characters) written escaped: outlines-core 0.2 puts names into the regex unescaped, so
    `{"say \\"hi\\"": ...}` would come out as the invalid `{"say "hi"": ...}`. Such names are swapped
    for plain placeholders before the regex is built and put back, JSON-escaped, after."""
    try:
        schema = json.loads(schema_text)
    except json.JSONDecodeError as error:
        raise ConstraintError(f"JSON schema: not valid JSON ({error})") from error
    names: dict[str, str] = {}
    renamed = _rename_properties(schema, names)
    regex = constraints_schema_regex(json.dumps(renamed, ensure_ascii=False) if names else schema_text)
    for placeholder, name in names.items():
        escaped = json.dumps(name, ensure_ascii=False)[1:-1]
        regex = regex.replace(placeholder, regex_escape(escaped))
    return regex


def _rename_properties(schema: Any, names: dict[str, str]) -> Any:
    """`schema` with every property name that needs JSON escaping replaced by a placeholder (recorded
    in `names`), in `properties` and `required` alike."""
    if isinstance(schema, list):
        return [_rename_properties(item, names) for item in schema]
    if not isinstance(schema, dict):
        return schema
    local: dict[str, str] = {}
    properties = schema.get("properties")
    if isinstance(properties, dict):
        for name in properties:
            if isinstance(name, str) and json.dumps(name, ensure_ascii=False)[1:-1] != name:
                local[name] = f"zqxguidedname{len(names)}zqx"
                names[local[name]] = name
    out = {}
    for key, value in schema.items():
        if key == "properties" and isinstance(value, dict):
            out[key] = {local.get(name, name): _rename_properties(sub, names) for name, sub in value.items()}
        elif key == "required" and isinstance(value, list):
            out[key] = [local.get(name, name) if isinstance(name, str) else name for name in value]
        else:
            out[key] = _rename_properties(value, names)
    return out


def from_response_format(response_format: Any) -> Guide | None:
    """The guide of an OpenAI `response_format`: None for {"type": "text"} (or None), a JSON-schema guide for
    {"type": "json_schema", "json_schema": {"schema": {...}}} and for {"type": "json_object"}."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ConstraintError('must be an object such as {"type": "json_schema", "json_schema": {...}}')
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Guide.json_schema(JSON_OBJECT_SCHEMA)
    if kind != "json_schema":
        raise ConstraintError(f'type={json.dumps(kind)}: expected "text", "json_schema" or "json_object"')
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
        raise ConstraintError("json_schema.schema: a JSON schema object is required")
    return Guide.json_schema(spec["schema"])


# ============================================================================= compiling off the engine thread


class GuideCompiler:
    """Compiles guides for one tokenizer in a worker process, each wait bounded by `time_limit_s`.

    Thread-safe. Compiled automata are cached here per guide (at most `cache_size`, least recently used
    dropped), and one guide is compiled once however many requests ask for it at the same time. A
    compile that outlives its wait keeps running and is cached when it ends, so the same guide asked
    again later is served at once. `processes=False` compiles on a thread instead (tests, tools).
    """

    def __init__(self, tokenizer: Any, *, eos_ids: Sequence[int], vocab_size: int, budget: Budget = Budget(),
                 time_limit_s: float = 30.0, processes: bool = True, cache_size: int = 64) -> None:
        self.tokenizer, self.eos_ids, self.vocab_size = tokenizer, tuple(eos_ids), vocab_size
        self.budget, self.time_limit_s, self.cache_size = budget, time_limit_s, cache_size
        settings = (tokenizer, self.eos_ids, vocab_size, budget)
        if processes:  # spawn: forking a process that runs XLA threads is unsafe
            self._pool: concurrent.futures.Executor = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=settings)
        else:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, "guide-compiler")
        self._processes, self._settings = processes, settings
        self._cache: collections.OrderedDict[Guide, Automaton] = collections.OrderedDict()
        self._running: dict[Guide, concurrent.futures.Future] = {}
        # Reentrant: add_done_callback runs `_finished` at once, under `submit`'s lock, when the compile
        # has already ended.
        self._lock = threading.RLock()

    def submit(self, guide: Guide) -> concurrent.futures.Future:
        """A future of the automaton (already done when cached)."""
        with self._lock:
            if guide in self._cache:
                self._cache.move_to_end(guide)
                done: concurrent.futures.Future = concurrent.futures.Future()
                done.set_result(self._cache[guide])
                return done
            future = self._running.get(guide)
            if future is None:
                future = (self._pool.submit(_compile_in_worker, guide) if self._processes
                          else self._pool.submit(_compile_with, self._settings, guide))
                self._running[guide] = future
                future.add_done_callback(lambda finished, guide=guide: self._finished(guide, finished))
            return future

    def _finished(self, guide: Guide, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._running.pop(guide, None)
            if not future.cancelled() and future.exception() is None:
                self._cache[guide] = future.result()
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)

    def compile(self, guide: Guide) -> Automaton:
        """The automaton, or ConstraintError (unsupported, over budget, or past the time limit)."""
        future = self.submit(guide)
        try:
            automaton = future.result(timeout=self.time_limit_s)
        except concurrent.futures.TimeoutError:
            raise ConstraintError(f"compiling the constraint took longer than the time limit of "
                                  f"{self.time_limit_s:g} s; it goes on in the background, so retrying the same "
                                  f"request later may succeed") from None
        with self._lock:  # one object per guide: the session's tables hold each automaton once
            return self._cache.get(guide, automaton)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_WORKER_SETTINGS: tuple = ()  # (tokenizer, eos_ids, vocab_size, budget) of this worker


def _init_worker(tokenizer: Any, eos_ids: tuple[int, ...], vocab_size: int, budget: Budget) -> None:
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = (tokenizer, eos_ids, vocab_size, budget)


def _compile_in_worker(guide: Guide) -> Automaton:
    return _compile_with(_WORKER_SETTINGS, guide)


def _compile_with(settings: tuple, guide: Guide) -> Automaton:
    tokenizer, eos_ids, vocab_size, budget = settings
    return guide.compile(tokenizer, eos_ids=eos_ids, vocab_size=vocab_size, budget=budget)


# ============================================================================= a session's tables


@dataclasses.dataclass(frozen=True)
class Capacity:
    """Minimum table sizes of a session (see constraints.pack): with these the issue's ~940-state product
    schema and a few choice lists fit without changing the compiled decode step's shapes (~8 MB for a
    49,152-token vocabulary)."""

    states: int = 1024
    entries: int = 1 << 18  # class-table entries: states x token classes, summed over automata
    automata: int = 4


class PackedGuides:
    """Which automata a session's device tables hold, and at which global state each starts.

    Host-only bookkeeping: the tables themselves live in the session's (donated) device state, so this
    object never keeps a reference to them.
    """

    def __init__(self, vocab_size: int, capacity: Capacity = Capacity()) -> None:
        self.vocab_size, self.capacity = vocab_size, capacity
        self.packed: list[Automaton] = []
        self.offsets: list[int] = []
        self.num_states = 0  # the current tables' state capacity (rows of mask_bits)

    def empty_tables(self) -> ConstraintTables:
        """Tables holding no automaton, at the session's capacities."""
        tables, _ = self._pack([])
        self.packed, self.offsets, self.num_states = [], [], tables.final.shape[0]
        return tables

    def _pack(self, automata: Sequence[Automaton]) -> tuple[ConstraintTables, list[int]]:
        return pack(automata, vocab_size=self.vocab_size, min_states=self.capacity.states,
                    min_entries=self.capacity.entries, min_automata=self.capacity.automata)

    def admit(self, running: Sequence[Automaton], new: Sequence[Automaton | None]
              ) -> tuple[list[int], ConstraintTables | None, np.ndarray | None]:
        """Initial global states for rows about to start with the automata `new` (None: unconstrained).

        `running`: the automata of rows still decoding (they must stay in the tables). Returns
        (initial states, new tables or None when the current ones already hold every automaton needed,
        remap [old state capacity] int32 from old to new global states, or None).
        """
        wanted = [a for a in new if a is not None]
        if all(any(a is p for p in self.packed) for a in wanted):
            return [self._initial(a) for a in new], None, None
        keep = _unique([p for p in self.packed if any(p is r for r in running)] + list(running) + wanted)
        tables, offsets = self._pack(keep)
        remap = np.full((self.num_states,), DEAD, np.int32)
        for automaton, old in zip(self.packed, self.offsets):
            for kept, offset in zip(keep, offsets):
                if kept is automaton:
                    remap[old:old + automaton.num_states] = np.arange(offset, offset + automaton.num_states)
        self.packed, self.offsets, self.num_states = keep, offsets, tables.final.shape[0]
        return [self._initial(a) for a in new], tables, remap

    def _initial(self, automaton: Automaton | None) -> int:
        if automaton is None:
            return UNCONSTRAINED
        return next(offset for packed, offset in zip(self.packed, self.offsets) if packed is automaton)


def _unique(automata: Sequence[Automaton]) -> list[Automaton]:
    out: list[Automaton] = []
    for automaton in automata:
        if not any(automaton is seen for seen in out):
            out.append(automaton)
    return out


def remap_states(states: jnp.ndarray, remap: np.ndarray) -> jnp.ndarray:
    """[B] global states after a re-pack: UNCONSTRAINED stays, others go through `remap`."""
    table = jnp.asarray(remap)
    return jnp.where(states < 0, states, table[jnp.clip(states, 0, table.shape[0] - 1)])
