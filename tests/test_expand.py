"""Teacher expansion against a fault-injecting fake OpenAI server: exact output, resume, budgets, secrets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep import expand as ex
from data_prep.teacher_prompts import TeacherReplyError, build_messages, parse_reply
from llama_e_jax.data.labels import PRODUCT_CATEGORIES, PURCHASE_INTENTS
from llama_e_jax.data.schema import parse_record, read_jsonl

try:
    from tests.fake_openai_server import FakeOpenAIServer, default_reply
except ImportError:  # tests/ on sys.path instead of the repository root
    from fake_openai_server import FakeOpenAIServer, default_reply

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-test-7f3a9c-DO-NOT-LEAK"

CATEGORY_OPTIONS = list(PRODUCT_CATEGORIES[:4])
INTENT_OPTIONS = list(PURCHASE_INTENTS[:3])


def _seed(id_, task, instruction, input_, output, **extra):
    return {"id": id_, "task": task, "instruction": instruction, "input": input_, "output": output,
            "aspects": ["seller"], "source": "seed", **extra}


SEEDS = [
    _seed("ads-1", "ads_generation", "Write a short ad for this kettle.", "Steel kettle, 1.7 l", "Boil fast."),
    _seed("ads-2", "ads_generation", "Write an ad for these shoes.", "Trail shoes, size 42", "Run far."),
    _seed("title-1", "title_rewriting", "Rewrite this product title.", "kettle STEEL 1.7l new!!", "Steel Kettle 1.7 L"),
    _seed("title-2", "title_rewriting", "Make this title clearer.", "shoe trail 42 blk", "Black Trail Shoe, Size 42"),
    _seed("cls-1", "product_classification",
          "Which category fits this product? Options: " + "; ".join(CATEGORY_OPTIONS), "Dog leash, 2 m",
          CATEGORY_OPTIONS[0], options=CATEGORY_OPTIONS),
    _seed("cls-2", "product_classification", "Classify the product into one of the given categories.",
          "Baby onesie", CATEGORY_OPTIONS[1], options=CATEGORY_OPTIONS),
    _seed("int-1", "intent_speculation", "Why did the customer buy these items?", "Tent; sleeping bag",
          INTENT_OPTIONS[0], options=INTENT_OPTIONS),
    _seed("int-2", "intent_speculation", "Guess the purchase intent.", "Printer ink x4", INTENT_OPTIONS[2],
          options=INTENT_OPTIONS),
    _seed("qa-1", "general_qa", "How do I return an item?", "", "Open your orders and choose Return."),
    _seed("qa-2", "general_qa", "What does free shipping mean?", "", "The seller pays for delivery."),
]
SEEDS_BY_ID = {s["id"]: s for s in SEEDS}


@pytest.fixture
def seeds_file(tmp_path: Path) -> Path:
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in SEEDS), encoding="utf-8")
    return path


def _config(seeds_file: Path, out: Path, server: FakeOpenAIServer, **overrides) -> ex.ExpandConfig:
    fields = dict(seeds=(str(seeds_file),), out=str(out), per_seed=2, base_url=server.base_url, api_key=API_KEY,
                  request_timeout=5.0, backoff_base=0.001, backoff_cap=0.01, concurrency=4, progress=False)
    fields.update(overrides)
    return ex.ExpandConfig(**fields)


def _expected_ids(per_seed: int) -> set[str]:
    return {ex.expansion_id(s["id"], k) for s in SEEDS for k in range(per_seed)}


def _ids_in(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- plan and prompts


def test_plan_target_deals_jobs_round_robin_and_only_appends_when_raised(seeds_file):
    seeds = ex.load_seeds([str(seeds_file)])
    jobs = ex.plan_jobs(seeds, target=5, tasks=("ads_generation", "general_qa"))
    assert [j.record_id for j in jobs] == [
        "exp-ads-1-0", "exp-ads-2-0", "exp-ads-1-1", "exp-ads-2-1", "exp-ads-1-2",
        "exp-qa-1-0", "exp-qa-2-0", "exp-qa-1-1", "exp-qa-2-1", "exp-qa-1-2",
    ]
    more = ex.plan_jobs(seeds, target=7, tasks=("ads_generation",))
    assert [j.record_id for j in more][:5] == [j.record_id for j in jobs[:5]]
    with pytest.raises(ex.ExpandError, match="no seed has that task"):
        ex.plan_jobs(seeds[:2], target=1, tasks=("general_qa",))


def test_duplicate_seed_ids_across_files_are_an_error(tmp_path, seeds_file):
    other = tmp_path / "more.jsonl"
    other.write_text(json.dumps(SEEDS[0]) + "\n", encoding="utf-8")
    with pytest.raises(ex.ExpandError, match="seed id 'ads-1' already used"):
        ex.load_seeds([str(seeds_file), str(other)])


def test_prompts_ask_for_the_right_keys_and_differ_per_variant():
    cls, ads = parse_record(SEEDS[4], "t"), parse_record(SEEDS[0], "t")
    cls_prompt = build_messages(cls, 0)[-1]["content"]
    assert '{"instruction": "..."}' in cls_prompt and "<options>" in cls_prompt
    assert '{"instruction": "...", "input": "...", "output": "..."}' in build_messages(ads, 0)[-1]["content"]
    assert build_messages(ads, 0) != build_messages(ads, 1)


@pytest.mark.parametrize("reply", [
    '{"instruction": "a", "input": "", "output": "b"}',
    '```json\n{"instruction": "a", "input": "", "output": "b"}\n```',
    'Here you go: {"instruction": "a", "input": "", "output": "b", "extra": 1} Enjoy!',
])
def test_parse_reply_accepts_fences_and_prose(reply):
    assert parse_reply(reply, ("instruction", "input", "output")) == {"instruction": "a", "input": "", "output": "b"}


@pytest.mark.parametrize("reply, cause", [
    ("", "invalid_json"), ("no json here", "invalid_json"), ('{"instruction": ', "invalid_json"),
    ("[1, 2]", "invalid_json"), ('{"input": "x"}', "invalid_record"),
])
def test_parse_reply_rejects_what_is_not_the_object_asked_for(reply, cause):
    with pytest.raises(TeacherReplyError) as error:
        parse_reply(reply, ("instruction",))
    assert error.value.cause == cause


# ----------------------------------------------------------------------------- faults, resume


def test_expansion_is_exact_despite_every_kind_of_fault(tmp_path, seeds_file):
    faults = {2: "429", 4: "500", 6: "slow", 8: "malformed_content", 10: "malformed_body", 12: "429"}
    out = tmp_path / "out.jsonl"
    with FakeOpenAIServer(faults, slow_seconds=4.0) as server:  # timeout generous enough for a busy CI box
        summary = ex.expand(_config(seeds_file, out, server, request_timeout=1.5))
        num_requests = server.num_chat_requests
    records = read_jsonl(out)  # strict: every line a valid record
    assert sorted(r.id for r in records) == sorted(_expected_ids(2))
    assert summary.complete and summary.written == 20 and summary.gave_up == 0
    assert summary.requests == num_requests == 20 + len(faults)  # each fault costs exactly one retry
    assert dict(summary.retries_by_cause) == {"rate_limit": 2, "server_error": 1, "timeout": 1, "invalid_json": 2}
    assert summary.total_tokens == summary.prompt_tokens + summary.completion_tokens > 0
    for record in records:
        seed = SEEDS_BY_ID[record.id.rsplit("-", 1)[0].removeprefix("exp-")]
        assert record.task == seed["task"] and record.source == "expanded:gpt-3.5-turbo-0301"
        if seed["task"] in ("product_classification", "intent_speculation"):  # only the instruction changes
            assert (record.input, record.output, list(record.options)) == (seed["input"], seed["output"], seed["options"])
            assert record.instruction != seed["instruction"]
        else:
            assert record.input != seed["input"] or not seed["input"]
            assert record.output != seed["output"]


def test_reply_that_drops_the_listed_options_is_retried(tmp_path, seeds_file):
    seen: set[str] = set()

    def first_reply_drops_options(messages):
        prompt = messages[-1]["content"]
        if "Options:" in prompt and prompt not in seen:
            seen.add(prompt)
            return json.dumps({"instruction": "Which category is it?"})
        return default_reply(messages)

    out = tmp_path / "out.jsonl"
    with FakeOpenAIServer(reply_fn=first_reply_drops_options) as server:
        summary = ex.expand(_config(seeds_file, out, server, tasks=("product_classification",)))
    assert summary.retries_by_cause == {"invalid_record": 2}  # cls-1 (lists options) x 2 variants
    assert all(all(o in r.instruction for o in CATEGORY_OPTIONS) for r in read_jsonl(out) if r.id.startswith("exp-cls-1"))


def test_killed_run_resumes_without_duplicates_or_gaps(tmp_path, seeds_file):
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "PYTHONPATH": str(REPO)}
    with FakeOpenAIServer(reply_delay=0.05) as server:
        args = [sys.executable, "-m", "data_prep.expand", "--seeds", str(seeds_file), "--out", str(out),
                "--per-seed", "6", "--base-url", server.base_url, "--concurrency", "2", "--no-progress"]
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while (not out.exists() or len(out.read_bytes().splitlines()) < 8) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with open(out, "ab") as f:  # what a kill in the middle of a write leaves behind
            f.write(b'{"id": "exp-ads-1-5", "task": "ads_gen')
        before = set(_ids_in_valid_lines(out))
        assert 8 <= len(before) < 60, "the run was not interrupted mid-way"
        requests_before = server.num_chat_requests

        summary = ex.expand(_config(seeds_file, out, server, per_seed=6))
        requests_after = server.num_chat_requests
    ids = _ids_in(out)
    assert len(ids) == len(set(ids)) == 60 and set(ids) == _expected_ids(6)
    assert summary.repaired and "torn" in summary.repaired
    assert summary.already_done == len(before) and summary.written == 60 - len(before)
    assert requests_after - requests_before == 60 - len(before)  # nothing asked twice


def _ids_in_valid_lines(path: Path) -> list[str]:
    ids = []
    for line in path.read_bytes().splitlines():
        try:
            ids.append(json.loads(line)["id"])
        except (ValueError, KeyError):
            pass
    return ids


def test_torn_tail_that_is_a_whole_record_is_kept(tmp_path, seeds_file):
    out = tmp_path / "out.jsonl"
    with FakeOpenAIServer() as server:
        ex.expand(_config(seeds_file, out, server, per_seed=1))
        out.write_bytes(out.read_bytes().rstrip(b"\n"))  # whole last record, newline missing
        summary = ex.expand(_config(seeds_file, out, server, per_seed=1))
    assert "completed the last line" in summary.repaired
    assert summary.already_done == 10 and summary.written == 0
    assert len(read_jsonl(out)) == 10


def test_corrupt_line_in_the_middle_is_an_error_not_skipped(tmp_path, seeds_file):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "broken"\n', encoding="utf-8")
    with FakeOpenAIServer() as server, pytest.raises(ValueError, match=r"out.jsonl:1"):
        ex.expand(_config(seeds_file, out, server))


# ----------------------------------------------------------------------------- budgets, fatal errors


def test_max_requests_is_never_exceeded(tmp_path, seeds_file):
    out = tmp_path / "out.jsonl"
    with FakeOpenAIServer({1: "500", 3: "429"}) as server:
        summary = ex.expand(_config(seeds_file, out, server, max_requests=7))
        assert server.num_chat_requests == summary.requests == 7
    assert summary.stopped_by == "max_requests" and not summary.complete
    assert summary.written == len(_ids_in(out)) == 5


def test_max_tokens_stops_after_the_request_that_reaches_it(tmp_path, seeds_file):
    sizes = dict(per_seed=4, tasks=("general_qa",), concurrency=1)
    with FakeOpenAIServer() as server:
        probe = ex.expand(_config(seeds_file, tmp_path / "probe.jsonl", server, **sizes))
    budget = int(2.5 * probe.total_tokens / probe.requests)  # the prompts differ by a few words only
    with FakeOpenAIServer() as server:
        summary = ex.expand(_config(seeds_file, tmp_path / "out.jsonl", server, max_tokens=budget, **sizes))
        assert server.num_chat_requests == 3  # the third request crosses the budget; no fourth starts
    assert summary.stopped_by == "max_tokens" and summary.total_tokens >= budget
    assert summary.written == 3 and summary.missing == 5


def test_bad_key_stops_the_run_at_once(tmp_path, seeds_file):
    out = tmp_path / "out.jsonl"
    with FakeOpenAIServer(lambda n: "401", echo_auth_in_errors=True) as server:
        with pytest.raises(ex.ExpandError, match="HTTP 401") as error:
            ex.expand(_config(seeds_file, out, server, concurrency=1))
        assert server.num_chat_requests == 1
    assert API_KEY not in str(error.value)


def test_api_key_is_never_written_to_logs_or_outputs(tmp_path, seeds_file):
    out, log_file, summary_file = tmp_path / "out.jsonl", tmp_path / "run.log", tmp_path / "summary.json"
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "PYTHONPATH": str(REPO)}
    with FakeOpenAIServer({1: "500", 2: "429", 3: "500"}, echo_auth_in_errors=True) as server:
        result = subprocess.run(
            [sys.executable, "-m", "data_prep.expand", "--seeds", str(seeds_file), "--out", str(out), "--per-seed", "1",
             "--base-url", server.base_url, "--backoff-base", "0.001", "--log-file", str(log_file),
             "--summary-json", str(summary_file), "--verbose"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )
        assert server.requests[0]["authorization"] == f"Bearer {API_KEY}"  # the key was really used
    assert result.returncode == 0, result.stderr
    log_text = log_file.read_text(encoding="utf-8")
    assert "you sent Authorization: Bearer ***" in log_text  # the echoed key reached the log, redacted
    for path in tmp_path.iterdir():
        assert API_KEY not in path.read_text(encoding="utf-8"), path
    assert API_KEY not in result.stdout + result.stderr
    assert json.loads(summary_file.read_text())["written"] == 10
    assert API_KEY not in repr(_config(seeds_file, out, server))


def test_short_keys_are_not_redacted_but_real_ones_are():
    import logging

    def filtered(secret: str, message: str) -> str:
        record = logging.LogRecord("t", logging.INFO, __file__, 1, message, None, None)
        ex.SecretRedactor(secret).filter(record)
        return record.getMessage()

    assert filtered("x", "expanding with x") == "expanding with x"  # OPENAI_API_KEY=x for a local server
    assert filtered(API_KEY, f"echo {API_KEY}!") == "echo ***!"
    job = ex.Job(parse_record(SEEDS[0], "t"), 0)
    reply = '{"instruction": "Write an ad.", "input": "x", "output": "Boil fast, x."}'
    assert ex.build_record(job, reply, model="m", api_key="x").input == "x"  # not "contains the key"
    with pytest.raises(TeacherReplyError, match="API key"):
        ex.build_record(job, reply.replace("Boil", API_KEY), model="m", api_key=API_KEY)


@pytest.mark.parametrize("fmt, sent", [
    ("text", None),
    ("json_object", {"type": "json_object"}),
    ("json_schema", {"type": "json_schema", "json_schema": {"name": "product_classification_reply", "strict": True,
     "schema": {"type": "object", "properties": {"instruction": {"type": "string"}}, "required": ["instruction"],
                "additionalProperties": False}}}),
])
def test_response_format_flag_decides_what_is_sent(tmp_path, fmt, sent):
    args = ex.parse_args(["--out", str(tmp_path / "o.jsonl"), "--per-seed", "1", "--response-format", fmt])
    config = ex.config_from_args(args)
    run = ex._Run(config=config, client=None, api_key=None, summary=ex.ExpandSummary(), budget=None,
                  appender=None, rng=None, progress=None)
    kwargs = run.request_kwargs(ex.Job(parse_record(SEEDS[4], "t"), 0))
    assert kwargs.get("response_format") == sent
    with pytest.raises(SystemExit):
        ex.parse_args(["--out", "o", "--per-seed", "1", "--json-mode"])  # the old flag is gone


def test_request_seed_is_stable_per_attempt_and_new_per_retry(tmp_path):
    """A rerun repeats each attempt's seed (same question, same way); a retry after a bad reply sends
    another seed, since a seeded teacher would otherwise repeat the reply that just failed."""
    args = ex.parse_args(["--out", str(tmp_path / "o.jsonl"), "--per-seed", "1", "--seed", "7"])
    run = ex._Run(config=ex.config_from_args(args), client=None, api_key=None, summary=ex.ExpandSummary(),
                  budget=None, appender=None, rng=None, progress=None)
    job = ex.Job(parse_record(SEEDS[4], "t"), 0)
    seeds = [run.request_kwargs(job, attempt)["seed"] for attempt in (0, 1, 2, 0)]
    assert seeds[0] == seeds[3]
    assert len(set(seeds[:3])) == 3
    other_job = ex.Job(parse_record(SEEDS[4], "t"), 1)
    assert run.request_kwargs(other_job, 0)["seed"] != seeds[0]


@pytest.mark.parametrize("tail", [b'{"id": "exp-ads-1-', None], ids=["torn", "whole-record-no-newline"])
def test_dry_run_writes_nothing_even_with_a_torn_last_line(tmp_path, seeds_file, tail, capfd):
    out = tmp_path / "out.jsonl"
    lines = [json.dumps(dict(SEEDS[0], id="exp-ads-1-0", source="expanded:t"))]
    content = "\n".join(lines).encode() + (b"\n" + tail if tail else b"")  # no final newline either way
    out.write_bytes(content)
    before = os.stat(out)
    code = ex.main(["--seeds", str(seeds_file), "--out", str(out), "--per-seed", "1", "--dry-run"])
    assert code == 0
    assert out.read_bytes() == content  # not cut, not completed
    assert os.stat(out).st_mtime_ns == before.st_mtime_ns
    logged = capfd.readouterr().err  # main() installs its own stderr handler (caplog does not see it)
    assert "would have" in logged and ("cut a torn" in logged) == (tail is not None)
    assert "1 already done" in logged  # the resume check saw the whole record, as a real run would
