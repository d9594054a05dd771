"""The batching engine: one thread owns the decoding session; HTTP handlers only hand it requests.

Design, and why. A `DecodeSession` (generate/) holds B cache rows that decode together in chunks of
a few tokens; it is not safe to share across threads, and the engine replaces it with a fresh one
when a decode step fails. So the session has exactly one owner, the engine thread, and the contract
with every other thread is:

- `submit(requests)` (any thread) checks the requests against the session's fixed shape (context,
  sampler type: the same for every session this engine makes), checks the queue
  cap, and appends them to the engine's waiting line under `_lock`. It never touches the session.
- The engine thread moves waiting requests into the session only as rows are free, so that requests
  cancelled while waiting (their client left) are dropped without ever being prefilled, and the
  waiting line is the one place that counts queued rows.
- `Request.cancel()` (any thread) is a flag the session reads at the next chunk boundary, which
  frees the row: a client that disconnects costs at most one more chunk.
- Progress goes back through each request's `on_update` callback, called on the engine thread.
- `rows_in_use`, `queued_rows` and `idle` are snapshots the engine thread publishes under `_lock`
  after every step, for the caps, tests and logs.
- Changing the generator's adapters (hot loading) is a command: `add_adapter` / `remove_adapter`
  (any thread) queue it and return a `concurrent.futures.Future`; the engine thread runs it between
  two steps, so no step ever sees a half-written adapter table and no request in flight is dropped.
  A removal waits until no request still waiting for a row names the adapter (those were accepted
  while it existed, so they run with it); rows already decoding with it finish with it (Generator).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from llama_e_jax.generate import sampling
from llama_e_jax.generate.constraints import JSON_OBJECT_SCHEMA, Automaton, Budget
from llama_e_jax.generate.generator import Generator
from llama_e_jax.generate.guided import Guide, GuideCompiler
from llama_e_jax.generate.session import GenerationError, Request
from llama_e_jax.model.lora import Adapter, LoraConfig

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting line has no room for a request's rows now (answered 429 with Retry-After)."""

    def __init__(self, rows: int, queued: int, limit: int, retry_after_s: int) -> None:
        super().__init__(f"the server is busy: {queued} rows are waiting and this request needs {rows} more "
                         f"(at most {limit} may wait); retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class BatchingEngine:
    """Runs one decoding session on a background thread and feeds it requests from any thread.

    Args:
      generator: the model.
      max_batch_size: cache rows decoded together.
      chunk_size: decode steps between looks at the waiting line (and streamed text updates).
      batch_wait_s: when idle, how long to wait after a first request for others to join its prefill.
      max_queue: rows that may wait for a free cache row; `submit` raises QueueFull past it.
      guide_budget / guide_time_limit_s: limits on compiling a request's constraint (guided.py): its
        automaton's size, and how long a request waits for the compile (in a worker process).
    """

    def __init__(self, generator: Generator, *, max_batch_size: int = 16, chunk_size: int = 8,
                 batch_wait_s: float = 0.005, max_queue: int = 256, guide_budget: Budget = Budget(),
                 guide_time_limit_s: float = 30.0) -> None:
        self.generator = generator
        self.max_batch_size, self.chunk_size, self.batch_wait_s = max_batch_size, chunk_size, batch_wait_s
        self.max_queue = max_queue
        self.guides = GuideCompiler(generator.tokenizer, eos_ids=generator.eos_ids,
                                    vocab_size=generator.config.vocab_size, budget=guide_budget,
                                    time_limit_s=guide_time_limit_s)
        self._session = self._new_session()  # owned by the engine thread once started
        # Only its fixed shape is read from other threads (see `check`); it is never stepped there.
        self._shape = self._session
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # notified when requests arrive or on stop
        self._waiting: collections.deque[Request] = collections.deque()  # guarded by _lock
        self._rows_in_use = 0  # guarded by _lock; published by the engine thread
        self._stopping = False  # guarded by _lock
        self._commands: collections.deque[_Command] = collections.deque()  # guarded by _lock
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode chunks run (for tests and logs); written by the engine thread only
        self.max_rows_in_use = 0
        self.sessions_started = 1

    def _new_session(self):
        sampler = sampling.TopP(p=1.0, temperature=0.0)  # every request's values go in per row
        return self.generator.session(sampler, self.max_batch_size, self.generator.max_length, self.chunk_size)

    # ---------------------------------------------------------------- any thread

    @property
    def max_length(self) -> int:
        """Cache slots per row: prompt + generated tokens."""
        return self._shape.max_length

    def compile_guide(self, guide: Guide) -> Automaton:
        """The automaton of a request's constraint (any thread but the engine's: it waits for the
        compiler, up to its time limit). Raises constraints.ConstraintError naming what is wrong."""
        return self.guides.compile(guide)

    @property
    def rows_in_use(self) -> int:
        """Cache rows holding a request after the engine's last step."""
        with self._lock:
            return self._rows_in_use

    @property
    def queued_rows(self) -> int:
        """Requests waiting for a free row."""
        with self._lock:
            return len(self._waiting)

    @property
    def idle(self) -> bool:
        """Nothing waiting and no row in use."""
        with self._lock:
            return not self._waiting and not self._rows_in_use

    def check(self, request: Request) -> None:
        """Raises GenerationError if `request` can never run. Reads only the session's fixed shape
        (context, sampler type), which every session of this engine shares."""
        self._shape.check(request)

    def submit(self, requests: list[Request]) -> None:
        """Queues requests, all or none: raises GenerationError if one can never run, QueueFull if the
        waiting line has no room for all of them now."""
        for request in requests:
            self.check(request)
        with self._lock:
            queued = len(self._waiting)
            if queued + len(requests) > self.max_queue:
                raise QueueFull(len(requests), queued, self.max_queue, self._retry_after_s(queued))
            self._waiting.extend(requests)
            self._work.notify()

    def _retry_after_s(self, queued: int) -> int:
        # A crude estimate: each batch of waiting rows takes about a second of decoding on a CPU.
        return max(1, -(-queued // self.max_batch_size))

    def add_adapter(self, name: str, adapter: Adapter, lora_config: LoraConfig, *,
                    source: str) -> concurrent.futures.Future:
        """Adds an adapter between two steps (`Generator.add_adapter`, which validates it first and
        changes nothing on error). The future's result is None, or the error (lora.AdapterError,
        GenerationError for a name already present)."""
        return self._command(lambda: self.generator.add_adapter(name, adapter, lora_config, source=source))

    def remove_adapter(self, name: str) -> concurrent.futures.Future:
        """Removes an adapter between two steps, once no waiting request names it; requests already
        decoding with it finish with it. The future's error is GenerationError for an unknown name."""
        return self._command(lambda: self.generator.remove_adapter(name), blocked_by=name)

    def _command(self, function: Callable[[], Any], blocked_by: str | None = None) -> concurrent.futures.Future:
        command = _Command(function, blocked_by)
        with self._lock:
            if self._stopping:
                command.future.set_exception(RuntimeError("the engine is stopping"))
                return command.future
            self._commands.append(command)
            running = self._thread is not None and self._thread.is_alive()
            self._work.notify()
        if not running:  # nobody steps the session (a test, or before `start`): run it here, now
            self._run_commands()
        return command.future

    def warmup(self) -> None:
        """Compiles prefill (one short prompt) and a decode chunk before serving (before `start`), and
        starts compiling the generic `json_object` automaton, the slowest common one, in the background."""
        self.guides.submit(Guide.json_schema(JSON_OBJECT_SCHEMA))
        done = Request([self.generator.tokenizer.bos_id or 0], 2, sampling.TopP(p=1.0, temperature=0.0))
        self._session.run([done])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="batching-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Cancels everything waiting or running, fails the commands not yet run, ends the thread."""
        with self._lock:
            self._stopping = True
            for request in self._waiting:
                request.cancel()
            self._work.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            commands, self._commands = list(self._commands), collections.deque()
        for command in commands:
            command.future.set_exception(RuntimeError("the engine stopped before running this command"))
        self.guides.close()

    # ---------------------------------------------------------------- the engine thread

    def _loop(self) -> None:
        while self._wait_for_work():
            self._admit_waiting()
            self._run_commands()
            if not self._session.busy:
                continue  # woken for a command only
            try:
                self._session.step()
                self.steps += 1
                self.max_rows_in_use = max(self.max_rows_in_use, self._session.rows_in_last_chunk)
            except Exception:  # noqa: BLE001 - a failed step must not kill the server
                log.exception("decode step failed; failing the requests in flight and starting a new session")
                self._fail_in_flight()
            self._publish()
        self._cancel_all()

    def _wait_for_work(self) -> bool:
        """Returns False to stop. Idle: block for a first request, then give a burst `batch_wait_s`
        to arrive so that it is prefilled together."""
        with self._lock:
            if (self._session.busy or self._commands) and not self._stopping:
                return True
            while not self._waiting and not self._commands and not self._stopping:
                self._work.wait(timeout=0.5)
            if self._stopping:
                return False
            if not self._waiting:
                return True  # a command: no burst to wait for
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._waiting) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                self._work.wait(timeout=left)
            return not self._stopping

    def _admit_waiting(self) -> None:
        """Moves waiting requests into the session's free rows; cancelled ones are dropped here."""
        free = self._session.num_free_rows - len(self._session.queue)
        admitted = []
        with self._lock:
            while self._waiting and len(admitted) < free:
                request = self._waiting.popleft()
                if request.cancelled:
                    request.finish_reason = "cancelled"
                else:
                    admitted.append(request)
        for request in admitted:
            try:
                self._session.submit(request)  # checked in submit(); the session checks again
            except GenerationError:  # cannot happen while removals wait for the waiting line; be safe
                log.exception("a request accepted earlier no longer fits the session")
                request.finish_reason = "error"
                if request.on_update is not None:
                    request.on_update(request.progress())

    def _run_commands(self) -> None:
        """Runs the queued commands in order (between steps); a removal still blocked by a waiting
        request stays queued, and so does everything after it, keeping their order."""
        while True:
            with self._lock:
                if not self._commands or self._blocked(self._commands[0]):
                    return
                command = self._commands.popleft()
            try:
                command.future.set_result(command.function())
            except Exception as error:  # noqa: BLE001 - the caller gets it through the future
                command.future.set_exception(error)

    def _blocked(self, command: "_Command") -> bool:
        """True while a request waiting for a row (here or in the session's queue) names the adapter
        that `command` removes. Called under _lock."""
        if command.blocked_by is None:
            return False
        waiting = list(self._waiting) + list(self._session.queue)
        return any(r.adapter == command.blocked_by and not r.cancelled for r in waiting)

    def _publish(self) -> None:
        rows = sum(request is not None for request in self._session.rows)
        with self._lock:
            self._rows_in_use = rows

    def _fail_in_flight(self) -> None:
        failed = [r for r in self._session.rows if r is not None] + list(self._session.queue)
        self._session = self._new_session()
        self.sessions_started += 1
        for request in failed:
            request.finish_reason = "error"
            if request.on_update is not None:
                request.on_update(request.progress())

    def _cancel_all(self) -> None:
        """On stop: every request still held finishes as "cancelled", and its handler hears so."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._rows_in_use = 0
        held = [r for r in self._session.rows if r is not None] + list(self._session.queue)
        for request in waiting + held:
            request.cancel()
            request.finish_reason = "cancelled"
            if request.on_update is not None:
                request.on_update(request.progress())


class _Command:
    """A change to the generator, run on the engine thread between steps; `future` gets its result."""

    def __init__(self, function: Callable[[], Any], blocked_by: str | None) -> None:
        self.function, self.blocked_by = function, blocked_by
        self.future: concurrent.futures.Future = concurrent.futures.Future()


__all__ = ["BatchingEngine", "GenerationError", "QueueFull"]
