"""End to end, as a user runs it: `python -m llama_e_jax.generate --jsonl` vs a plain transformers script.

    python bench/e2e_generate.py                  # markdown table
    python bench/e2e_generate.py --prompts 32 --variants "--no-speculative" "--speculative-k 1"

Workload: `prompts` real test-split records (seed test split + imported test files, round-robin over
the five tasks; bench/decode_speculative.py's `mixed_records`), written to one JSONL file; greedy,
batch 16, up to `new_tokens` new tokens, EOS stops. Each side is one whole process, timed from start
to exit (interpreter start, imports, model load, compilation or cache load, decoding, writing):

* ours: `python -m llama_e_jax.generate --jsonl FILE --batch-size 16 --max-new-tokens N --output OUT`
  plus each variant's flags (default: the CLI's defaults). A first, untimed run of every variant fills
  JAX's persistent compilation cache (the CLI enables it), so timed runs load compiled programs
  ("warm compilation cache"), as a shop's second and later runs do;
* transformers: a plain script (below, written to a temp file) that loads the converted HF checkpoint
  of the same model, applies the same Alpaca template, left-pads groups of 16 and calls
  `generate(do_sample=False)`; torch threads as `--torch-threads` (1 is faster than 2 on this shared
  2-core machine; recorded).

Texts are compared row by row (our `text` field vs transformers' decoded tokens up to EOS). The
1-minute load average is recorded before and after each process: only ratios of one run mean
something on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The environment a user's processes get: bench.decode_cpu adds XNNPACK to XLA_FLAGS when imported
# (for its in-process decode loops); both timed processes run without that (it made the CLI's prefill
# of these prompts ~9% slower), exactly as the user's shell would start them.
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.decode_cpu import REPO_ROOT, report  # noqa: E402
from bench.decode_speculative import mixed_records  # noqa: E402

HF_SCRIPT = r'''
import json, sys
import torch, transformers
from llama_e_jax.data.prompt import build_prompt  # the template text only (a pure-Python module)

records_path, hf_dir, out_path, new_tokens, threads = sys.argv[1:6]
torch.set_num_threads(int(threads))
tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
records = [json.loads(line) for line in open(records_path)]
prompts = [build_prompt(r["instruction"], r["input"]) for r in records]
tokenizer.padding_side = "left"
tokenizer.pad_token = tokenizer.eos_token
texts = []
with torch.no_grad():
    for start in range(0, len(prompts), 16):
        batch = tokenizer(prompts[start:start + 16], return_tensors="pt", padding=True)
        out = model.generate(**batch, max_new_tokens=int(new_tokens), do_sample=False,
                             pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            row = row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
with open(out_path, "w") as out:
    for record, text in zip(records, texts):
        out.write(json.dumps({"id": record["id"], "text": text}) + "\n")
'''


def _timed_process(command: list[str]) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=_user_environment())
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"seconds": seconds, "load_before": load_before, "load_after": os.getloadavg()[0],
            "command": shlex.join(command)}


def _user_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return env if USER_XLA_FLAGS is None else {**env, "XLA_FLAGS": USER_XLA_FLAGS}


def _texts(path: Path) -> dict[str, str]:
    return {row["id"]: row["text"] for row in map(json.loads, path.read_text().splitlines())}


def run(num_prompts: int, new_tokens: int, variants: list[str], torch_threads: int) -> dict[str, Any]:
    from llama_e_jax.io.default_model import ensure_default_hf_dir

    records = mixed_records(num_prompts)
    work = Path(tempfile.mkdtemp(prefix="e2e_generate_"))
    records_path = work / "records.jsonl"
    records_path.write_text("".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records))
    (work / "hf_generate.py").write_text(HF_SCRIPT)
    hf_dir = ensure_default_hf_dir()
    python = sys.executable
    result: dict[str, Any] = {"prompts": len(records), "new_tokens": new_tokens, "batch": 16,
                              "torch_threads": torch_threads, "xla_flags": USER_XLA_FLAGS or "", "ours": {}}

    def ours_command(variant: str, out: Path) -> list[str]:
        return [python, "-m", "llama_e_jax.generate", "--jsonl", str(records_path), "--batch-size", "16",
                "--max-new-tokens", str(new_tokens), "--output", str(out), *shlex.split(variant)]

    for variant in variants:  # untimed: fills the persistent compilation cache
        _timed_process(ours_command(variant, work / "warmup.jsonl"))
    hf_out = work / "hf.jsonl"
    result["transformers"] = _timed_process([python, str(work / "hf_generate.py"), str(records_path), str(hf_dir),
                                             str(hf_out), str(new_tokens), str(torch_threads)])
    reference = _texts(hf_out)
    for index, variant in enumerate(variants):
        out = work / f"ours{index}.jsonl"
        entry = result["ours"][variant or "(defaults)"] = _timed_process(ours_command(variant, out))
        texts = _texts(out)
        entry["identical_texts"] = sum(texts[k].strip() == reference[k].strip() for k in reference)
        entry["ratio"] = result["transformers"]["seconds"] / entry["seconds"]
    return result


def markdown(result: dict[str, Any]) -> str:
    hf = result["transformers"]
    lines = [f"{result['prompts']} test-split prompts, batch {result['batch']}, greedy, up to {result['new_tokens']} "
             f"new tokens, whole process (warm compilation cache); transformers with {result['torch_threads']} "
             "torch thread(s).", "",
             "| run | seconds | vs transformers | texts identical | load before / after |", "|---|---:|---:|---:|---|",
             f"| transformers script | {hf['seconds']:.1f} | 1.00x | - "
             f"| {hf['load_before']:.1f} / {hf['load_after']:.1f} |"]
    for variant, entry in result["ours"].items():
        lines.append(f"| `generate {variant}` | {entry['seconds']:.1f} | {entry['ratio']:.2f}x | "
                     f"{entry['identical_texts']} / {result['prompts']} | {entry['load_before']:.1f} / "
                     f"{entry['load_after']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=80)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=[""],
                        help='flag sets for our CLI, one run each ("" = its defaults)')
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--json", help="also write the raw result here")
    args = parser.parse_args(argv)
    result = run(args.prompts, args.new_tokens, args.variants, args.torch_threads)
    return report(result, markdown(result), args.json)


if __name__ == "__main__":
    sys.exit(main())
