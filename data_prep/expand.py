"""Expand the seed instructions with a teacher model over any OpenAI-compatible API.

    python -m data_prep.expand --seeds data_prep/seeds --out data/expanded.jsonl --target 24000 \
        [--base-url URL] [--model gpt-3.5-turbo-0301] [--concurrency 8] [--max-requests N] [--max-tokens N] \
        [--response-format {text,json_object,json_schema}]

Each output record is one *job*: variant `k` of one seed, with the stable id `exp-<seed id>-<k>`.
What the teacher is asked per task is described in `teacher_prompts` (rewrite the instruction only
for the two label tasks, write a whole new example otherwise). The design follows from running for
hours against a paid, rate-limited endpoint:

* **Resumable by id, appended line by line.** Every accepted record is appended, flushed and fsynced
  at once, so a kill loses at most the requests in flight. On start the output is read back; its ids
  are skipped, so a rerun (of the same plan) adds exactly the missing records: no duplicates, no
  gaps. A kill can leave a torn last line; it is cut off (or completed, if it is a whole record that
  only lacks its newline) and the repair is reported. Any other bad line is an error, never skipped.
* **We own the retries.** The client's own retries are disabled (`max_retries=0`) and every request
  has a timeout, so each attempt is counted, budgeted and logged here. 408/409/429, 5xx, timeouts,
  connection errors, malformed JSON and replies that fail `schema.parse_record` are retried with
  exponential backoff and full jitter (at least half the step, honouring `Retry-After`); other 4xx
  fail that one job; 401/403/404 mean the whole run is misconfigured and stop it.
* **Budgets are hard stops.** `--max-requests` counts every attempt, retries included, and is never
  exceeded. `--max-tokens` counts `usage.total_tokens`; no request starts once it is reached, so the
  overshoot is at most the requests already in flight (`concurrency` x one reply).
* **Bounded concurrency** with asyncio: `concurrency` workers share one `AsyncOpenAI` client and pull
  jobs in plan order. Records land in completion order; the ids, not the order, carry the identity.
* **The API key never leaves the client.** It is not a command-line flag (it would show in `ps`), is
  left out of the config's repr, redacted from every log line that passes our handlers (servers may
  echo it in error bodies), and a reply containing it is rejected instead of written. Keys shorter
  than 8 characters (`x` for a local server) are no secret: redacting them would mangle every log line.
* **Structured replies when the server offers them.** `--response-format json_schema` sends the
  reply object's schema (`reply_schema`), which our own server (and OpenAI's) enforce while decoding,
  so even a small local teacher answers with parseable JSON; `json_object` asks for any JSON object;
  `text` (the default, for gpt-3.5-turbo-0301) sends nothing.

`expand(config)` / `expand_async(config, client=...)` are the callable core; `main` only parses flags.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import logging
import os
import random
import sys
import time
import urllib.parse
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import openai
import tqdm

from data_prep import jsonl_files
from data_prep.teacher_prompts import TeacherReplyError, build_messages, parse_reply, reply_keys
from llama_e_jax.data.schema import TASKS, InstructionRecord, RecordError, parse_record, read_jsonl

log = logging.getLogger("data_prep.expand")  # not __name__: that is "__main__" under -m

DEFAULT_MODEL = "gpt-3.5-turbo-0301"  # the teacher named in the LLaMA-E paper
RETRYABLE_STATUS = frozenset({408, 409, 429})  # plus every 5xx
FATAL_STATUS = frozenset({401, 403, 404})  # bad key, no access, unknown model/endpoint: stop the run
EXIT_INCOMPLETE = 3  # budget reached or some jobs gave up; rerun to fill the gaps
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
MIN_SECRET_LENGTH = 8  # shorter API keys are placeholders for local servers, not secrets


@dataclasses.dataclass(frozen=True)
class ExpandConfig:
    """Everything one expansion run needs; see `--help` for each field."""

    seeds: tuple[str, ...]  # JSONL files or directories of *.jsonl
    out: str  # output JSONL, appended to and resumed from
    per_seed: int | None = None  # variants per seed ...
    target: int | None = None  # ... or expanded records per task (round-robin over its seeds)
    tasks: tuple[str, ...] = TASKS
    model: str = DEFAULT_MODEL
    base_url: str | None = None  # None: $OPENAI_BASE_URL, else api.openai.com
    api_key: str | None = dataclasses.field(default=None, repr=False)  # None: $OPENAI_API_KEY
    concurrency: int = 8
    max_requests: int | None = None  # budget: attempts, retries included
    max_tokens: int | None = None  # budget: usage.total_tokens summed over all attempts
    max_reply_tokens: int = 1024  # `max_tokens` of each completion
    temperature: float = 1.0
    seed: int | None = None  # jitter RNG and the per-request `seed` sent to the API
    response_format: str = "text"  # one of RESPONSE_FORMATS; text sends none (as 0301 models need)
    request_timeout: float = 60.0  # seconds per attempt
    max_attempts: int = 8  # per job, before it is given up (a rerun tries it again)
    backoff_base: float = 1.0  # seconds; attempt i waits ~ base * 2**i, jittered, capped
    backoff_cap: float = 60.0
    progress: bool = True

    def __post_init__(self):
        if (self.per_seed is None) == (self.target is None):
            raise ValueError("give exactly one of per_seed and target")
        if (self.per_seed or 0) < 0 or (self.target or 0) < 0:
            raise ValueError("per_seed / target must be >= 0")
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {TASKS}")
        if self.concurrency < 1 or self.max_attempts < 1:
            raise ValueError("concurrency and max_attempts must be >= 1")
        if self.response_format not in RESPONSE_FORMATS:
            raise ValueError(f"response_format={self.response_format!r}; expected one of {RESPONSE_FORMATS}")


@dataclasses.dataclass(frozen=True)
class Job:
    """Variant `variant` (0-based) of `seed`."""

    seed: InstructionRecord
    variant: int

    @property
    def record_id(self) -> str:
        return expansion_id(self.seed.id, self.variant)


def expansion_id(seed_id: str, variant: int) -> str:
    """The stable id of variant `variant` of seed `seed_id`; resuming relies on it."""
    return f"exp-{seed_id}-{variant}"


class ExpandError(RuntimeError):
    """The run cannot go on (bad key, unknown model, bad seeds or output file)."""


# ----------------------------------------------------------------------------- seeds and plan


def load_seeds(paths: Iterable[str]) -> list[InstructionRecord]:
    """All seed records, validated; ids must be unique across files (expanded ids derive from them)."""
    seeds: list[InstructionRecord] = []
    first_file: dict[str, str] = {}
    for path in jsonl_files(paths):
        for record in read_jsonl(path):
            if record.id in first_file:
                raise ExpandError(f"{path}: seed id {record.id!r} already used in {first_file[record.id]}")
            first_file[record.id] = path
            seeds.append(record)
    return seeds


def plan_jobs(
    seeds: Sequence[InstructionRecord],
    *,
    per_seed: int | None = None,
    target: int | None = None,
    tasks: Iterable[str] = TASKS,
) -> list[Job]:
    """The deterministic list of jobs, task by task.

    `per_seed`: variants 0..per_seed-1 of every seed. `target`: `target` jobs per task, dealt
    round-robin over that task's seeds (job j -> seed j % n, variant j // n), so every seed gets
    ceil or floor of target / n variants and raising `target` later only appends jobs.
    """
    jobs: list[Job] = []
    for task in tasks:
        task_seeds = [s for s in seeds if s.task == task]
        if per_seed is not None:
            jobs += [Job(s, k) for s in task_seeds for k in range(per_seed)]
        elif target:
            if not task_seeds:
                raise ExpandError(f"--target {target} asked for task {task!r}, but no seed has that task")
            n = len(task_seeds)
            jobs += [Job(task_seeds[j % n], j // n) for j in range(target)]
    return jobs


# ----------------------------------------------------------------------------- output file


@dataclasses.dataclass(frozen=True)
class TornTail:
    """A last line without its newline (a kill mid-write) and what repairing it means."""

    keep_bytes: int  # the file's length after the repair, before any newline is added
    complete: bool  # the tail is a whole valid record: keep it and add the newline; else cut it
    tail_bytes: int

    def describe(self, path: str) -> str:
        if self.complete:
            return f"completed the last line of {path} (a whole record missing its newline)"
        return f"cut a torn last line of {self.tail_bytes} bytes from {path}"


def find_torn_tail(path: str) -> TornTail | None:
    """The torn last line of `path`, or None; reads only (a dry run must not modify the file)."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    if not data or data.endswith(b"\n"):
        return None
    cut = data.rfind(b"\n") + 1  # 0 when the torn line is the only one
    tail = data[cut:]
    try:
        parse_record(json.loads(tail.decode("utf-8")), f"{path}:tail")
    except (ValueError, RecordError):  # JSONDecodeError / UnicodeDecodeError are ValueErrors
        return TornTail(keep_bytes=cut, complete=False, tail_bytes=len(tail))
    return TornTail(keep_bytes=len(data), complete=True, tail_bytes=len(tail))


def repair_torn_tail(path: str) -> str | None:
    """Fix a last line without its newline; return what was done, or None.

    The tail is kept (a newline is added) when it is a complete, valid record, else cut off.
    """
    torn = find_torn_tail(path)
    if torn is None:
        return None
    with open(path, "rb+") as f:
        f.truncate(torn.keep_bytes)
        if torn.complete:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
    return torn.describe(path)


def existing_ids(path: str, *, ignore_torn_tail: bool = False) -> set[str]:
    """Ids already in the output; every line must be a valid record (raises InvalidRecordsError).

    `ignore_torn_tail`: read as if the torn last line had been repaired, without touching the file.
    """
    if not os.path.exists(path):
        return set()
    torn = find_torn_tail(path) if ignore_torn_tail else None
    if torn is None:
        return {r.id for r in read_jsonl(path)}
    with open(path, "rb") as f:
        head = f.read(torn.keep_bytes).decode("utf-8", errors="strict")
    records = [parse_record(json.loads(line), f"{path}:{n}")
               for n, line in enumerate(head.split("\n"), start=1) if line.strip()]
    return {r.id for r in records}


class RecordAppender:
    """Appends one record per line and makes it durable before the next (flush + fsync)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def append(self, record: InstructionRecord) -> None:
        self._file.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


# ----------------------------------------------------------------------------- bookkeeping


@dataclasses.dataclass
class ExpandSummary:
    """What a run did; `format()` is the human table, `to_json()` the machine one."""

    planned: int = 0
    already_done: int = 0  # planned ids found in the output at start
    existing_unplanned: int = 0  # ids in the output that this plan does not contain
    written: int = 0
    gave_up: int = 0  # jobs that failed max_attempts times (or hit a non-retryable 4xx)
    requests: int = 0
    retries_by_cause: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    gave_up_by_cause: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    requests_without_usage: int = 0
    stopped_by: str | None = None  # "max_requests" / "max_tokens" when a budget ended the run
    repaired: str | None = None
    elapsed_s: float = 0.0

    @property
    def missing(self) -> int:
        return self.planned - self.already_done - self.written

    @property
    def complete(self) -> bool:
        return self.missing == 0

    def to_json(self) -> dict[str, Any]:
        obj = dataclasses.asdict(self)
        obj.update(missing=self.missing, complete=self.complete)
        obj["retries_by_cause"] = dict(self.retries_by_cause)
        obj["gave_up_by_cause"] = dict(self.gave_up_by_cause)
        return obj

    def format(self) -> str:
        retries = ", ".join(f"{c} {n}" for c, n in self.retries_by_cause.most_common()) or "none"
        lines = [
            f"planned {self.planned}: {self.already_done} already in the output, {self.written} written, "
            f"{self.gave_up} gave up, {self.missing} missing",
            f"requests {self.requests}; retries by cause: {retries}",
            f"tokens: prompt {self.prompt_tokens}, completion {self.completion_tokens}, total {self.total_tokens}"
            + (f" ({self.requests_without_usage} replies without usage)" if self.requests_without_usage else ""),
        ]
        if self.gave_up_by_cause:
            lines.append("gave up by last cause: " + ", ".join(f"{c} {n}" for c, n in self.gave_up_by_cause.items()))
        if self.stopped_by:
            lines.append(f"stopped early: budget {self.stopped_by} reached")
        if self.repaired:
            lines.append(f"repaired: {self.repaired}")
        if self.existing_unplanned:
            lines.append(f"{self.existing_unplanned} records in the output are not in this plan (kept)")
        lines.append(f"elapsed {self.elapsed_s:.1f} s" + ("" if self.complete else "; rerun to fill the gaps"))
        return "\n".join(lines)


class Budget:
    """Request and token budgets shared by all workers (one event loop, so no locks needed)."""

    def __init__(self, summary: ExpandSummary, max_requests: int | None, max_tokens: int | None):
        self._summary, self._max_requests, self._max_tokens = summary, max_requests, max_tokens

    def exhausted(self) -> str | None:
        s = self._summary
        if self._max_requests is not None and s.requests >= self._max_requests:
            return "max_requests"
        if self._max_tokens is not None and s.total_tokens >= self._max_tokens:
            return "max_tokens"
        return None

    def take_request(self) -> bool:
        """Reserve one request; False (and the reason recorded) once a budget is spent."""
        reason = self.exhausted()
        if reason:
            self._summary.stopped_by = self._summary.stopped_by or reason
            return False
        self._summary.requests += 1
        return True

    def add_usage(self, usage: Any) -> None:
        s = self._summary
        if usage is None:
            s.requests_without_usage += 1
            return
        s.prompt_tokens += usage.prompt_tokens or 0
        s.completion_tokens += usage.completion_tokens or 0
        s.total_tokens += usage.total_tokens or (usage.prompt_tokens or 0) + (usage.completion_tokens or 0)


def is_secret(key: str | None) -> bool:
    """Whether `key` is worth hiding: at least MIN_SECRET_LENGTH characters."""
    return bool(key) and len(key) >= MIN_SECRET_LENGTH


class SecretRedactor(logging.Filter):
    """Replaces a secret in every log record that passes (message and arguments); a short key
    (`is_secret` false) is left alone."""

    def __init__(self, secret: str | None):
        super().__init__()
        self._secret = secret if is_secret(secret) else None

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secret:
            message = record.getMessage()
            if self._secret in message:
                record.msg, record.args = message.replace(self._secret, "***"), None
        return True


def redact_url(url: str | None) -> str:
    """`url` without user:password, for printing."""
    if not url:
        return "(default OpenAI endpoint)"
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


# ----------------------------------------------------------------------------- one job


class _Retry(Exception):
    """One failed attempt; `cause` names it, `retryable` says whether another attempt may help."""

    def __init__(self, cause: str, message: str, *, retryable: bool = True, retry_after: float | None = None):
        super().__init__(message)
        self.cause, self.retryable, self.retry_after = cause, retryable, retry_after


def _retry_after_seconds(error: openai.APIStatusError) -> float | None:
    try:
        return float(error.response.headers.get("retry-after", ""))
    except ValueError:
        return None


def classify_api_error(error: Exception) -> _Retry:
    """Map a client exception to a retry cause; raise ExpandError when the run must stop."""
    if isinstance(error, openai.APITimeoutError):
        return _Retry("timeout", str(error))
    if isinstance(error, openai.APIConnectionError):
        return _Retry("connection", str(error))
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        if status in FATAL_STATUS:
            raise ExpandError(f"teacher API answered HTTP {status} ({type(error).__name__}): {error}")
        if status == 429:
            return _Retry("rate_limit", str(error), retry_after=_retry_after_seconds(error))
        if status >= 500 or status in RETRYABLE_STATUS:
            return _Retry("server_error", f"HTTP {status}: {error}", retry_after=_retry_after_seconds(error))
        return _Retry("bad_request", f"HTTP {status}: {error}", retryable=False)
    if isinstance(error, (openai.APIResponseValidationError, json.JSONDecodeError)):
        return _Retry("invalid_json", f"response body is not the expected JSON: {error}")
    raise error


def _reply_text(completion: Any) -> str:
    try:
        text = completion.choices[0].message.content
    except (AttributeError, IndexError, TypeError):
        raise TeacherReplyError("invalid_json", "response has no choices[0].message.content") from None
    if not isinstance(text, str):
        raise TeacherReplyError("invalid_json", "choices[0].message.content is not a string")
    return text


def reply_schema(task: str) -> dict[str, Any]:
    """The JSON schema of the teacher's reply object for `task`: its `reply_keys`, all strings."""
    keys = reply_keys(task)
    return {"type": "object", "properties": {k: {"type": "string"} for k in keys}, "required": list(keys),
            "additionalProperties": False}


def build_record(job: Job, reply: str, *, model: str, api_key: str | None = None) -> InstructionRecord:
    """The expanded record from the teacher's reply text; raises TeacherReplyError / RecordError.

    The seed supplies task, aspects, and for rewrite-only tasks the input, label and options; the
    reply supplies the keys of `reply_keys(task)`. The result is validated with `parse_record`.
    """
    seed = job.seed
    fields = parse_reply(reply, reply_keys(seed.task))
    obj = {**seed.to_json(), **fields, "id": job.record_id, "source": f"expanded:{model}"}
    record = parse_record(obj, f"teacher reply for {job.record_id}")
    if seed.options and all(o in seed.instruction for o in seed.options):
        dropped = [o for o in seed.options if o not in record.instruction]
        if dropped:
            raise TeacherReplyError("invalid_record", f"rewritten instruction dropped option(s) {dropped}")
    if is_secret(api_key) and api_key in json.dumps(obj, ensure_ascii=False):
        raise TeacherReplyError("invalid_record", "reply contains the API key; not written")
    return record


@dataclasses.dataclass
class _Run:
    """State shared by the workers of one run."""

    config: ExpandConfig
    client: Any  # openai.AsyncOpenAI or anything with the same chat.completions.create
    api_key: str | None
    summary: ExpandSummary
    budget: Budget
    appender: RecordAppender
    rng: random.Random
    progress: tqdm.tqdm

    def redact(self, text: str) -> str:
        return text.replace(self.api_key, "***") if is_secret(self.api_key) else text

    def backoff_seconds(self, attempt: int, retry_after: float | None) -> float:
        step = min(self.config.backoff_cap, self.config.backoff_base * 2**attempt)
        delay = step * self.rng.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.config.backoff_cap))
        return delay

    def request_kwargs(self, job: Job, attempt: int = 0) -> dict[str, Any]:
        cfg = self.config
        kwargs: dict[str, Any] = dict(
            model=cfg.model,
            messages=build_messages(job.seed, job.variant),
            temperature=cfg.temperature,
            max_tokens=cfg.max_reply_tokens,
        )
        if cfg.seed is not None:
            # Stable per (job, attempt): a rerun asks the same question the same way, while a retry
            # after a bad reply samples anew (a seeded server would repeat the bad reply).
            kwargs["seed"] = (cfg.seed * 1_000_003 + zlib.crc32(f"{job.record_id}#{attempt}".encode())) % 2**31
        if cfg.response_format == "json_object":
            kwargs["response_format"] = {"type": "json_object"}
        elif cfg.response_format == "json_schema":
            kwargs["response_format"] = {"type": "json_schema", "json_schema": {
                "name": f"{job.seed.task}_reply", "schema": reply_schema(job.seed.task), "strict": True}}
        return kwargs

    async def attempt(self, job: Job, attempt: int = 0) -> InstructionRecord:
        """Attempt number `attempt` (0-based) at `job`; raises _Retry on any failure."""
        try:
            completion = await self.client.chat.completions.create(**self.request_kwargs(job, attempt))
        except (openai.APIError, json.JSONDecodeError) as error:
            try:
                failure = classify_api_error(error)
            except ExpandError as fatal:  # its text may quote a server body that echoes the key
                raise ExpandError(self.redact(str(fatal))) from None
            raise failure from None
        self.budget.add_usage(getattr(completion, "usage", None))
        try:
            return build_record(job, _reply_text(completion), model=self.config.model, api_key=self.api_key)
        except TeacherReplyError as error:
            raise _Retry(error.cause, str(error)) from None
        except RecordError as error:
            raise _Retry("invalid_record", str(error)) from None

    async def run_job(self, job: Job) -> InstructionRecord | None:
        """The record for `job`, or None when it gave up or a budget stopped it."""
        for attempt in range(self.config.max_attempts):
            if not self.budget.take_request():
                return None
            try:
                return await self.attempt(job, attempt)
            except _Retry as failure:
                last_try = not failure.retryable or attempt + 1 == self.config.max_attempts
                if last_try:
                    self.summary.gave_up += 1
                    self.summary.gave_up_by_cause[failure.cause] += 1
                    log.warning("gave up on %s after %d attempt(s): %s: %s", job.record_id, attempt + 1,
                                failure.cause, failure)
                    return None
                self.summary.retries_by_cause[failure.cause] += 1
                delay = self.backoff_seconds(attempt, failure.retry_after)
                log.debug("retry %s (attempt %d) in %.2f s after %s: %s", job.record_id, attempt + 2, delay,
                          failure.cause, failure)
                await asyncio.sleep(delay)
        return None

    async def worker(self, jobs: Iterable[Job]) -> None:
        for job in jobs:  # a shared iterator: each job goes to exactly one worker
            reason = self.budget.exhausted()
            if reason:
                self.summary.stopped_by = self.summary.stopped_by or reason
                return
            record = await self.run_job(job)
            if record is not None:
                self.appender.append(record)
                self.summary.written += 1
            s = self.summary
            self.progress.update(1)
            self.progress.set_postfix_str(
                f"req={s.requests} tok={s.total_tokens} fail={s.gave_up} retry={sum(s.retries_by_cause.values())}",
                refresh=False,
            )


# ----------------------------------------------------------------------------- the run


def _resolve_api_key(config: ExpandConfig) -> str:
    key = config.api_key if config.api_key is not None else os.environ.get("OPENAI_API_KEY")
    if not key:
        raise ExpandError("set OPENAI_API_KEY (any non-empty value for a local server without auth)")
    return key


def prepare(config: ExpandConfig, *, dry_run: bool = False) -> tuple[list[Job], ExpandSummary]:
    """Load seeds, plan, repair and read the output; the jobs still to do and the summary so far.

    `dry_run`: write nothing; a torn last line is reported as what a real run would do to it.
    """
    jobs = plan_jobs(load_seeds(config.seeds), per_seed=config.per_seed, target=config.target, tasks=config.tasks)
    summary = ExpandSummary(planned=len(jobs))
    if dry_run:
        torn = find_torn_tail(config.out)
        summary.repaired = f"would have {torn.describe(config.out)}" if torn else None
    else:
        summary.repaired = repair_torn_tail(config.out)
    if summary.repaired:
        log.warning("%s", summary.repaired)
    done = existing_ids(config.out, ignore_torn_tail=dry_run)
    planned_ids = {j.record_id for j in jobs}
    summary.already_done = len(done & planned_ids)
    summary.existing_unplanned = len(done - planned_ids)
    return [j for j in jobs if j.record_id not in done], summary


async def expand_async(config: ExpandConfig, client: Any | None = None) -> ExpandSummary:
    """Run the expansion; `client` defaults to an AsyncOpenAI built from the config (and closed after)."""
    started = time.monotonic()
    api_key = _resolve_api_key(config) if client is None else config.api_key
    todo, summary = prepare(config)
    redactor = SecretRedactor(api_key)
    log.addFilter(redactor)
    own_client = client is None
    if own_client:
        client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=config.base_url,
            max_retries=0,  # retries are ours: counted, budgeted, logged
            timeout=config.request_timeout,
        )
    run = _Run(
        config=config,
        client=client,
        api_key=api_key,
        summary=summary,
        budget=Budget(summary, config.max_requests, config.max_tokens),
        appender=RecordAppender(config.out),
        rng=random.Random(config.seed),
        progress=tqdm.tqdm(total=len(todo), unit="rec", desc="expand", disable=not config.progress),
    )
    try:
        await _run_workers(run, todo)
    finally:
        run.appender.close()
        run.progress.close()
        if own_client:
            await client.close()
        log.removeFilter(redactor)
        summary.elapsed_s = time.monotonic() - started
    return summary


async def _run_workers(run: _Run, todo: list[Job]) -> None:
    """Start the workers; the first unexpected exception (e.g. ExpandError) cancels the rest."""
    shared = iter(todo)
    workers = [asyncio.create_task(run.worker(shared)) for _ in range(min(run.config.concurrency, len(todo)))]
    if not workers:
        return
    done, pending = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise task.exception()


def expand(config: ExpandConfig, client: Any | None = None) -> ExpandSummary:
    """Synchronous wrapper around `expand_async`."""
    return asyncio.run(expand_async(config, client))


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep.expand", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", nargs="+", default=["data_prep/seeds"], help="seed JSONL files or directories")
    p.add_argument("--out", required=True, help="output JSONL (appended to; rerun to resume)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--per-seed", type=int, help="variants per seed")
    size.add_argument("--target", type=int, help="expanded records per task, round-robin over its seeds")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL"),
                   help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default $OPENAI_BASE_URL); "
                        "the key comes from $OPENAI_API_KEY")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--max-requests", type=int, help="budget: attempts, retries included")
    p.add_argument("--max-tokens", type=int, help="budget: total tokens reported in usage")
    p.add_argument("--max-reply-tokens", type=int, default=1024, help="max_tokens of each completion")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="seed for backoff jitter and the API's per-request seed")
    p.add_argument("--response-format", choices=RESPONSE_FORMATS, default="text",
                   help="json_schema: send the reply's JSON schema (constrained decoding on our server); "
                        "json_object: ask for any JSON object; text: send nothing (default)")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds per attempt")
    p.add_argument("--max-attempts", type=int, default=8, help="attempts per record before giving up")
    p.add_argument("--backoff-base", type=float, default=1.0, help="seconds; doubles per attempt")
    p.add_argument("--backoff-cap", type=float, default=60.0)
    p.add_argument("--log-file", help="also write the log here")
    p.add_argument("--summary-json", help="write the summary as JSON here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="plan and resume check only; no requests")
    p.add_argument("-v", "--verbose", action="store_true", help="log every retry and HTTP request")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ExpandConfig:
    return ExpandConfig(
        seeds=tuple(args.seeds), out=args.out, per_seed=args.per_seed, target=args.target,
        tasks=tuple(args.tasks), model=args.model, base_url=args.base_url, concurrency=args.concurrency,
        max_requests=args.max_requests, max_tokens=args.max_tokens, max_reply_tokens=args.max_reply_tokens,
        temperature=args.temperature, seed=args.seed, response_format=args.response_format,
        request_timeout=args.request_timeout, max_attempts=args.max_attempts, backoff_base=args.backoff_base,
        backoff_cap=args.backoff_cap, progress=not args.no_progress,
    )


def _setup_logging(log_file: str | None, verbose: bool, secret: str | None) -> None:
    """Handlers on the root logger, each redacting the key (covers httpx/openai messages too)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.addFilter(SecretRedactor(secret))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=handlers, force=True)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)  # retries at DEBUG; summary always


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    secret = os.environ.get("OPENAI_API_KEY")
    _setup_logging(args.log_file, args.verbose, secret)
    try:
        config = config_from_args(args)
        if args.dry_run:
            todo, summary = prepare(config, dry_run=True)
            by_task = collections.Counter(j.seed.task for j in todo)
            log.info("dry run: %d planned, %d already done, to do per task: %s", summary.planned,
                     summary.already_done, dict(by_task))
            return 0
        log.info("expanding with %s at %s into %s", config.model, redact_url(config.base_url), config.out)
        summary = expand(config)
    except (ExpandError, RecordError, ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:  # every accepted record is already on disk
        log.warning("interrupted; rerun the same command to resume")
        return 130
    log.info("summary:\n%s", summary.format())
    if args.summary_json:
        with open(args.summary_json, "w", encoding="utf-8") as f:
            json.dump(summary.to_json(), f, indent=2)
    return 0 if summary.complete else EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
