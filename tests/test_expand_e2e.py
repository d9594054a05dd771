"""End to end: `python -m data_prep.expand --response-format json_schema` against our own server with the
real SmolLM2-135M-Instruct as the teacher.

The server runs in-process (as in test_serve.py) with the shapes of test_structured.py (8 rows, 640
slots, chunks of 8), so a run of both compiles once. The teacher decodes greedily: every reply is a
deterministic function of the seed, which makes the test reproducible; the seeds are the first of
each task whose greedy reply closes its strings within the token budget (SmolLM2 loops forever on some
others, which sampling and retries would only sometimes rescue).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import expand as ex
from llama_e_jax.generate.generator import Generator
from llama_e_jax import serve as S
from llama_e_jax.data.schema import read_jsonl
from llama_e_jax.io.tokenizer import load_tokenizer

pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[1]
SEED_IDS = ("seed-ads-0001", "seed-title-0001", "seed-cls-0003", "seed-intent-0001", "seed-qa-0005")
MAX_REPLY_TOKENS = 128
REWRITE_ONLY = ("product_classification", "intent_speculation")


def _run_expand(seeds: Path, out: Path, summary: Path, base_url: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "data_prep.expand", "--seeds", str(seeds), "--out", str(out), "--per-seed", "1",
            "--base-url", base_url, "--model", "teacher", "--response-format", "json_schema",
            "--temperature", "0", "--max-reply-tokens", str(MAX_REPLY_TOKENS), "--max-requests", "10",
            "--max-attempts", "2", "--request-timeout", "900", "--backoff-base", "0.01", "--no-progress",
            "--summary-json", str(summary)]
    env = {**os.environ, "OPENAI_API_KEY": "x", "PYTHONPATH": str(REPO)}  # a 1-character key: not redacted
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_expand_with_our_server_as_a_json_schema_teacher(tmp_path, smollm2_params, smollm2_gguf):
    seeds = {s.id: s for s in ex.load_seeds([str(REPO / "data_prep" / "seeds")]) if s.id in SEED_IDS}
    assert sorted(s.task for s in seeds.values()) == sorted(ex.TASKS)
    seeds_file = tmp_path / "seeds.jsonl"
    seeds_file.write_text("".join(json.dumps(s.to_json()) + "\n" for s in seeds.values()), encoding="utf-8")
    out, first, second = tmp_path / "expanded.jsonl", tmp_path / "first.json", tmp_path / "second.json"

    config, params = smollm2_params
    generator = Generator(config, params, load_tokenizer(smollm2_gguf), max_batch_size=8, max_length=640,
                            chunk_size=8)
    engine = S.BatchingEngine(generator, max_batch_size=8, chunk_size=8, batch_wait_s=0.5)
    with S.ServerThread(S.create_app(engine, model_name="teacher")) as server:
        result = _run_expand(seeds_file, out, first, server.base_url)
        assert result.returncode == 0, result.stderr
        lines_after_first = out.read_text(encoding="utf-8")
        rerun = _run_expand(seeds_file, out, second, server.base_url)
    assert rerun.returncode == 0, rerun.stderr
    assert "expanding with teacher" in result.stderr  # a short key is not redacted out of every word

    records = read_jsonl(out)  # every line passes schema.parse_record
    assert sorted(r.id for r in records) == sorted(f"exp-{seed_id}-0" for seed_id in SEED_IDS)
    for record in records:
        seed = seeds[record.id.removeprefix("exp-").removesuffix("-0")]
        assert record.task == seed.task and record.source == "expanded:teacher"
        if seed.task in REWRITE_ONLY:  # only the instruction is the teacher's
            assert (record.input, record.output, record.options) == (seed.input, seed.output, seed.options)
    summary = json.loads(first.read_text())
    print(f"\nfirst run: {summary['requests']} requests for {summary['written']} records, retries "
          f"{summary['retries_by_cause']}, {summary['completion_tokens']} completion tokens, "
          f"{summary['elapsed_s']:.0f} s")
    assert summary["written"] == len(records) == 5 and summary["complete"] and summary["gave_up"] == 0
    assert summary["requests"] == 5 + sum(summary["retries_by_cause"].values())
    again = json.loads(second.read_text())
    assert again["already_done"] == 5 and again["written"] == 0 and again["requests"] == 0
    assert out.read_text(encoding="utf-8") == lines_after_first  # the rerun added nothing
