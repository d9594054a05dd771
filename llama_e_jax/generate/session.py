"""The host side of decoding: requests, their text, and the session that owns a decode state.

Design, and why:

* A `Request` is one sequence: its settings and, as tokens arrive, its token ids and text. Stop
  strings are checked on the text here as well as on device (a stop string can be produced by
  tokens other than its own tokenization; the text check is authoritative and cuts the text).
* A `DecodeSession` is B rows of cache on device (kernels.DecodeState) plus the host's view of which
  request owns which row. `submit` queues requests; `step` admits queued ones into free rows
  (prefill), runs one decode chunk, books the tokens and frees finished rows; `run` steps until
  everything submitted is done.

Threads. `submit` is the session's one entry point and the only method that may be called from
any thread (it checks the request and appends it to the queue under a lock), as may
`Request.cancel()` (a flag read at the next chunk boundary). Everything else — `step`, `run`, and
reading `rows` — belongs to the one thread that owns the session (the server's engine thread, or
the caller of `Generator.generate`); `on_update` callbacks run on that thread.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from llama_e_jax.generate import sampling
from llama_e_jax.generate.constraints import UNCONSTRAINED, Automaton
from llama_e_jax.generate.guided import Capacity, PackedGuides, remap_states
from llama_e_jax.generate.kernels import (
    FINISH_REASONS, MAX_DEVICE_STOPS, RUNNING, STOP_WINDOW, Admission, GenerationError, bucket, decode_chunk,
    length_bucket, new_state, prefill, release_rows, sampler_rows,
)

if TYPE_CHECKING:  # annotation only: generator.py imports this module
    from llama_e_jax.generate.generator import Generator

__all__ = ["Completion", "DecodeSession", "GenerationError", "Progress", "Request", "length_bucket", "make_admission",
           "stable_text_end"]


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated sequence.

    Attributes:
      text: the generated text, without the prompt, EOS or the stop string that ended it.
      token_ids: the tokens the model generated (an ending EOS included; tokens after a stop
        string are not).
      prompt_tokens / completion_tokens: counts for usage reports (completion = len(token_ids)).
      finish_reason: "stop" (EOS or a stop sequence) or "length" (max_new_tokens or cache full).
    """

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclasses.dataclass(frozen=True)
class Progress:
    """A snapshot of a request, handed to `Request.on_update` (immutable, so safe across threads)."""

    text: str
    completion_tokens: int
    finish_reason: str | None


@dataclasses.dataclass
class Request:
    """One sequence to generate: its settings, and the tokens and text produced so far.

    `on_update(progress)` (optional) is called from the decoding thread whenever new tokens arrived
    and once more when the request finishes. `cancel()` may be called from any thread; the row is
    freed at the next chunk boundary. `constraint` (optional) is an automaton (constraints.py, made
    by `Generator.guide`) that the generated tokens must follow: choices, a regex, a JSON schema.
    `adapter` names one of a multi-adapter Generator's adapters (None: the base model, or the
    adapter merged into a single-adapter Generator); `adapter_slot` is set by the session at submit.
    """

    prompt_ids: list[int]
    max_new_tokens: int
    sampler: Any = dataclasses.field(default_factory=sampling.Greedy)
    stop: tuple[str, ...] = ()
    seed: int = 0
    stream: int = 0
    on_update: Callable[[Progress], None] | None = None
    constraint: Automaton | None = None
    adapter: str | None = None
    adapter_slot: int = dataclasses.field(default=0, repr=False)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        self.cancelled = True

    def completion(self) -> Completion:
        return Completion(self.text, tuple(self.token_ids), len(self.prompt_ids), len(self.token_ids),
                          self.finish_reason or "length")

    def progress(self) -> Progress:
        return Progress(self.text, len(self.token_ids), self.finish_reason)

    def add_tokens(self, new_ids: Sequence[int], decode: Callable[[Sequence[int]], str]) -> None:
        """Appends tokens; cuts at the first stop string (then finish_reason = "stop")."""
        before = len(self.token_ids)
        self.token_ids.extend(int(t) for t in new_ids)
        text = decode(self.token_ids)
        longest_stop = max((len(s) for s in self.stop), default=0)
        cut = _first_stop(text, self.stop, max(0, len(self.text) - longest_stop))
        if cut is None:
            self.text = text
            return
        # Keep only the tokens up to the one that completed the stop string.
        for count in range(before + 1, len(self.token_ids) + 1):
            if _first_stop(decode(self.token_ids[:count]), self.stop, 0) is not None:
                del self.token_ids[count:]
                break
        self.text = text[:cut]
        self.finish_reason = "stop"


def stable_text_end(text: str, finished: bool, stop: Sequence[str]) -> int:
    """How much of a growing text can be streamed: not a trailing incomplete UTF-8 character
    (decoded as U+FFFD) and not what could still turn out to be the start of a stop string."""
    if finished:
        return len(text)
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    held = 0
    for s in stop:
        held = max([held] + [k for k in range(1, len(s)) if text[:end].endswith(s[:k])])
    return end - held


def _first_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _device_stop_ids(stops: Sequence[str], encode: Callable[[str], list[int]]) -> np.ndarray:  # [M, W]
    """Stop strings as right-aligned token rows for on-device matching (-1 pads); the first
    MAX_DEVICE_STOPS that fit in STOP_WINDOW tokens are matched on device, all on the host."""
    table = np.full((MAX_DEVICE_STOPS, STOP_WINDOW), -1, np.int32)
    usable = [ids for ids in (encode(s) for s in stops if s) if 0 < len(ids) <= STOP_WINDOW]
    for row, ids in enumerate(usable[:MAX_DEVICE_STOPS]):
        table[row, STOP_WINDOW - len(ids):] = ids
    return table


def make_admission(
    requests: Sequence[Request],
    rows: Sequence[int],
    batch_size: int,
    max_length: int,
    encode: Callable[[str], list[int]],
    constraint_states: Sequence[int] | None = None,
) -> Admission:
    """Prefill inputs for `requests` going into cache `rows`, padded to bucketed shapes.

    Budgets are capped so prompt + output fits the row's `max_length` slots. Padding entries target
    row `batch_size`, which every write drops. `constraint_states`: each request's initial automaton
    state in the session's tables (default: all unconstrained).
    """
    count = bucket(len(requests), maximum=batch_size)
    longest = max(len(request.prompt_ids) for request in requests) - 1  # the last token is decoded
    prompt_len = length_bucket(longest, max_length)
    ids = np.zeros((count, prompt_len), np.int32)
    lengths = np.zeros((count,), np.int32)
    last_tokens = np.zeros((count,), np.int32)
    target_rows = np.full((count,), batch_size, np.int32)
    budgets = np.ones((count,), np.int32)
    seeds, streams = np.zeros((count,), np.uint32), np.zeros((count,), np.uint32)
    stop_ids = np.full((count, MAX_DEVICE_STOPS, STOP_WINDOW), -1, np.int32)
    constraint = np.full((count,), UNCONSTRAINED, np.int32)
    adapter = np.zeros((count,), np.int32)
    if constraint_states is not None:
        constraint[:len(requests)] = constraint_states
    for i, (request, row) in enumerate(zip(requests, rows)):
        n = len(request.prompt_ids)
        ids[i, :n - 1], lengths[i], last_tokens[i] = request.prompt_ids[:-1], n - 1, request.prompt_ids[-1]
        target_rows[i] = row
        budgets[i] = min(request.max_new_tokens, max_length - n)
        seeds[i], streams[i] = request.seed % 2**32, request.stream % 2**32
        stop_ids[i] = _device_stop_ids(request.stop, encode)
        adapter[i] = request.adapter_slot
    return Admission(
        prompt_ids=ids, prompt_lengths=lengths, last_tokens=last_tokens, rows=target_rows, max_new_tokens=budgets,
        seeds=seeds, streams=streams, stop_ids=stop_ids, constraint=constraint,
        sampler=sampler_rows([request.sampler for request in requests], count), adapter=adapter,
    )


def power_of_two_parts(count: int) -> list[int]:
    """`count` as a sum of distinct powers of two, largest first (7 -> [4, 2, 1]).

    An admission of 7 prompts is prefilled as three calls of 4, 2 and 1 rows instead of one of 8
    (prefill row counts are powers of two, so that few shapes are compiled): no row of the prefill
    is padding. Each extra call reads the weights once more (~40 ms for the 135M model on CPU), a
    padding row of a 192-token prompt costs ~0.4 s (docs/benchmarks.md, end to end).
    """
    return [1 << bit for bit in reversed(range(count.bit_length())) if count >> bit & 1]


# ============================================================================= host side: a session

# Decode steps per chunk while requests wait for a free row (docs/benchmarks.md, end to end: 80 test-split
# prompts at batch 16, replies of 2-64 tokens; with shortest-first admission, 8-step chunks took 0.77x the
# time of 16-step ones and 0.72x that of 32-step ones).
REFILL_CHUNK = 8


class DecodeSession:
    """B rows of cache on device plus the host's view of which sequence owns which row.

    `submit` (any thread) queues sequences; `step` (the owning thread only) admits queued ones into
    free rows (prefill), runs one decode chunk, and books the tokens. `run` (owning thread) steps
    until everything submitted is done. See the module docstring for the thread contract.
    """

    def __init__(self, generator: "Generator", batch_size: int, max_length: int, sampler: Any,
                 chunk_size: int, capacity: Capacity = Capacity()) -> None:
        self.generator = generator
        self.batch_size, self.max_length, self.chunk_size = batch_size, max_length, chunk_size
        self.sampler_type = jax.tree.structure(sampler)
        self.guides = PackedGuides(generator.config.vocab_size, capacity)  # which automata the tables hold
        self.state = new_state(generator.config, generator.weights, batch_size, max_length, sampler,
                               generator.eos_ids, self.guides.empty_tables())
        self.rows: list[Request | None] = [None] * batch_size
        self.queue: collections.deque[Request] = collections.deque()  # appended by submit, under _lock
        self._lock = threading.Lock()
        self.rows_in_last_chunk = 0  # sequences that shared the last decode chunk

    @property
    def num_free_rows(self) -> int:
        return sum(seq is None for seq in self.rows)

    @property
    def waiting(self) -> bool:
        """Whether requests are queued for a free row."""
        with self._lock:
            return bool(self.queue)

    @property
    def busy(self) -> bool:
        return self.waiting or any(seq is not None for seq in self.rows)

    def check(self, seq: Request) -> None:
        """Raises GenerationError if `seq` can never run in this session."""
        if not seq.prompt_ids:
            raise GenerationError("empty prompt: at least one token is needed")
        if len(seq.prompt_ids) >= self.max_length:
            raise GenerationError(f"prompt of {len(seq.prompt_ids)} tokens does not fit the context of "
                                  f"{self.max_length} tokens (at least one new token must fit)")
        if seq.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={seq.max_new_tokens} must be at least 1")
        if jax.tree.structure(seq.sampler) != self.sampler_type:
            raise GenerationError(f"sampler {seq.sampler} does not match this session's {self.sampler_type}")
        if seq.constraint is not None:
            self._check_constraint(seq.constraint)
        if seq.adapter is not None and seq.adapter not in self.generator.adapter_names:
            raise GenerationError(f"unknown adapter {seq.adapter!r}")

    def _check_constraint(self, automaton: Automaton) -> None:
        if not isinstance(automaton, Automaton):
            raise GenerationError(f"constraint: expected a compiled Automaton (Generator.guide), got "
                                  f"{type(automaton).__name__}")
        if automaton.vocab_size != self.generator.config.vocab_size or \
                set(automaton.eos_ids) != set(self.generator.eos_ids):
            raise GenerationError(f"constraint {automaton.description[:80]}: compiled for {automaton.vocab_size} "
                                  f"tokens and EOS {automaton.eos_ids}, this model has "
                                  f"{self.generator.config.vocab_size} and {self.generator.eos_ids}")

    def submit(self, seq: Request) -> None:
        """Queues `seq` for the next `step` (any thread). Raises GenerationError if it can never run.

        The request holds its adapter's slot from here until it ends (a removed adapter's slot is
        reused only once no request holds it)."""
        self.check(seq)
        seq.adapter_slot = self.generator.acquire_adapter(seq.adapter)
        with self._lock:
            self.queue.append(seq)

    def run(self, sequences: Sequence[Request]) -> None:
        for seq in sequences:
            self.submit(seq)
        while self.busy:
            self.step()

    def step(self) -> None:
        """Admit what fits, decode one chunk, book the tokens, free finished rows.

        While requests wait for a row, the chunk is at most REFILL_CHUNK steps: a row that finishes
        early is refilled at the next chunk boundary, and until then it costs a full row of every
        step (the step's shapes are the whole batch).
        """
        self._admit()
        self.rows_in_last_chunk = sum(seq is not None for seq in self.rows)
        if not self.rows_in_last_chunk:
            return
        chunk_size = min(self.chunk_size, REFILL_CHUNK) if self.waiting else self.chunk_size
        state, emitted = decode_chunk(self.generator.config, self.generator.weights, self.state, chunk_size,
                                      self.generator.speculation.for_rows(self.rows_in_last_chunk))
        self.state = state
        emitted, finish = jax.device_get((emitted, state.finish))
        for row, seq in enumerate(self.rows):
            if seq is not None:
                self._book(row, [t for t in emitted[row] if t >= 0], int(finish[row]))
        self._release_finished()

    # ---------------------------------------------------------------- internals

    def _take_queued(self, free_rows: int) -> list[Request]:
        """Up to `free_rows` queued requests, oldest first; cancelled ones are finished and dropped."""
        with self._lock:
            while self.queue and self.queue[0].cancelled:
                dropped = self.queue.popleft()
                dropped.finish_reason = "cancelled"
                self.generator.release_adapter(dropped.adapter_slot)
            return [self.queue.popleft() for _ in range(min(free_rows, len(self.queue)))]

    def _admit(self) -> None:
        free = [row for row, seq in enumerate(self.rows) if seq is None]
        group = self._take_queued(len(free))
        if not group:
            return
        running = [seq.constraint for seq in self.rows if seq is not None and seq.constraint is not None]
        initial, tables, remap = self.guides.admit(running, [seq.constraint for seq in group])
        if tables is not None:  # new automata: re-packed tables (same shapes unless they outgrew them)
            self.state = self.state.replace(tables=tables, constraint=remap_states(self.state.constraint, remap))
        start = 0
        for size in power_of_two_parts(len(group)):
            part = slice(start, start + size)
            admission = make_admission(group[part], free[part], self.batch_size, self.max_length,
                                       self.generator.tokenizer.encode, initial[part])
            self.state = prefill(self.generator.config, self.generator.weights, self.state, admission)
            start += size
        for seq, row in zip(group, free):
            self.rows[row] = seq

    def _book(self, row: int, new_ids: list[int], finish_code: int) -> None:
        seq = self.rows[row]
        assert seq is not None
        if seq.cancelled:
            seq.finish_reason = "cancelled"
            return
        seq.add_tokens(new_ids, self.generator.decode)
        if not seq.done and finish_code != RUNNING:
            seq.finish_reason = FINISH_REASONS[finish_code]
        if seq.on_update is not None:
            seq.on_update(seq.progress())

    def _release_finished(self) -> None:
        finished = [row for row, seq in enumerate(self.rows) if seq is not None and seq.done]
        if finished:
            # Rows cut by a host-side stop string may still be active on device.
            released = np.zeros((self.batch_size,), bool)
            released[finished] = True
            self.state = release_rows(self.state, released)
            for row in finished:
                self.generator.release_adapter(self.rows[row].adapter_slot)
                self.rows[row] = None

