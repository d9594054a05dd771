"""Several LoRA adapters mixed row by row vs one merged adapter, on this CPU, in one run (issue 14).

    python bench/multi_lora.py                    # markdown table, JSON to bench/results/
    python bench/multi_lora.py --repeats 1 --new-tokens 16

Workload: SmolLM2-135M-Instruct fp32 (the embedded default model), 16 real test prompts (the seed
test split and any imported test files, round-robin over the five tasks, Alpaca template), greedy,
speculative decoding off, batch 16, exactly `new_tokens` per row (EOS disabled, so every decoder
generates the same number of tokens whatever the adapters do to the text). Adapters: rank 8 on
q, k, v, o with random A and B (B small, as after training, so the text stays text). Decoders:

* merged: one adapter merged into the weights (`Generator(adapter=...)`: no extra matmuls);
* multi: `Generator(adapters=4 of them)`, row i decoding with adapter i % 4, all in one batch;
* multi, base rows: the same multi-adapter Generator with every row on the base (slot 0): the cost
  of the stacked path when no adapter is used (the tables are still read and multiplied).

tokens/s = 16 x new_tokens / wall time of one `generate` call (prefill included); compilation
excluded (each decoder runs once untimed); median of `repeats` calls, decoders alternating. Memory:
a fresh process per adapter count (1, 4, 16) builds the multi-adapter Generator and decodes one
batch; it reports the bytes of the stacked tables and its peak RSS (VmHWM). The 1-minute load average
is recorded: on a shared machine only ratios from the same run mean something.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.decode_cpu import REPO_ROOT  # noqa: E402 (its import sets XLA_FLAGS for XNNPACK before JAX starts)
from bench.decode_speculative import mixed_records  # noqa: E402

import numpy as np  # noqa: E402

from llama_e_jax.data.prompt import build_prompt  # noqa: E402
from llama_e_jax.generate import speculative  # noqa: E402
from llama_e_jax.generate.generator import Generator  # noqa: E402
from llama_e_jax.io.load import load_model  # noqa: E402
from llama_e_jax.model import adapter_stack, lora  # noqa: E402

BATCH = 16


def random_adapters(config: Any, count: int, seed: int = 0) -> dict[str, tuple[dict, lora.LoraConfig]]:
    """`count` rank-8 q/k/v/o adapters with random A (PEFT's init range) and small random B."""
    lora_config = lora.LoraConfig(rank=8, alpha=16.0, dropout=0.0, targets=lora.DEFAULT_TARGETS)
    rng = np.random.default_rng(seed)
    out = {}
    for k in range(count):
        flat = {}
        for path, shapes in lora.adapter_shapes(config, lora_config).items():
            bound = 1.0 / np.sqrt(shapes[lora.LORA_A][1])
            flat[path] = {lora.LORA_A: rng.uniform(-bound, bound, shapes[lora.LORA_A]).astype(np.float32),
                          lora.LORA_B: (0.01 * rng.standard_normal(shapes[lora.LORA_B])).astype(np.float32)}
        out[f"a{k}"] = (lora.unflatten_adapter(flat), lora_config)
    return out


def _rss_mib(field: str = "VmHWM") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _generator(loaded: Any, new_tokens: int, **options: Any) -> Generator:
    return Generator(loaded.config, loaded.params, loaded.tokenizer, max_batch_size=BATCH, chunk_size=new_tokens,
                     speculation=speculative.OFF, eos_ids=(), **options)


def memory(count: int, new_tokens: int) -> dict[str, Any]:
    """(in a fresh process) tables' bytes and peak RSS with `count` adapters loaded and one batch decoded."""
    loaded = load_model(None, dtype="float32")
    prompts = [build_prompt(r.instruction, r.input) for r in mixed_records(BATCH)]
    generator = _generator(loaded, new_tokens, adapters=random_adapters(loaded.config, count))
    names = list(generator.adapter_names)
    generator.generate(prompts, max_new_tokens=new_tokens, adapters=[names[i % count] for i in range(BATCH)])
    return {"adapters": count, "table_bytes": adapter_stack.table_bytes(generator.weights),
            "stack": vars(generator.stack_shape) | {"targets": list(generator.stack_shape.targets)},
            "peak_rss_mib": round(_rss_mib(), 1)}


def speed(new_tokens: int, repeats: int) -> dict[str, Any]:
    loaded = load_model(None, dtype="float32")
    prompts = [build_prompt(r.instruction, r.input) for r in mixed_records(BATCH)]
    adapters = random_adapters(loaded.config, 4)
    merged = _generator(loaded, new_tokens, adapter=adapters["a0"][0], lora_config=adapters["a0"][1])
    multi = _generator(loaded, new_tokens, adapters=adapters)
    mixed = [f"a{i % 4}" for i in range(BATCH)]
    calls = {
        "merged": lambda: merged.generate(prompts, max_new_tokens=new_tokens),
        "multi": lambda: multi.generate(prompts, max_new_tokens=new_tokens, adapters=mixed),
        "multi_base_rows": lambda: multi.generate(prompts, max_new_tokens=new_tokens),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    tokens = {}
    for name, call in calls.items():  # compile
        tokens[name] = sum(c.completion_tokens for c in call())
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    result = {name: {"tokens": tokens[name], "seconds": [round(t, 3) for t in times[name]],
                     "tokens_per_s": round(tokens[name] / statistics.median(times[name]), 1)} for name in calls}
    result["ratio_multi_vs_merged"] = round(result["multi"]["tokens_per_s"] / result["merged"]["tokens_per_s"], 3)
    result["ratio_base_rows_vs_merged"] = round(
        result["multi_base_rows"]["tokens_per_s"] / result["merged"]["tokens_per_s"], 3)
    return result


def run(new_tokens: int, repeats: int) -> dict[str, Any]:
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()[0]
    result: dict[str, Any] = {"speed": speed(new_tokens, repeats)}
    load_after_speed = os.getloadavg()[0]
    result["memory"] = []
    for count in (1, 4, 16):
        proc = subprocess.run([sys.executable, __file__, "--memory", str(count), "--new-tokens", str(new_tokens)],
                              capture_output=True, text=True, cwd=REPO_ROOT, check=True)
        result["memory"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    result["meta"] = {
        "date": started.isoformat(timespec="seconds"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": "python bench/multi_lora.py " + " ".join(sys.argv[1:]), "batch": BATCH, "new_tokens": new_tokens,
        "repeats": repeats, "load_1min": {"start": load_start, "after_speed": load_after_speed,
                                          "end": os.getloadavg()[0]},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    return result


def markdown(result: dict[str, Any]) -> str:
    s, load = result["speed"], result["meta"]["load_1min"]
    lines = ["| decoder | tokens/s | vs merged |", "|---|---|---|"]
    for name, label in (("merged", "1 adapter, merged"), ("multi", "4 adapters (r=8, q,k,v,o) mixed row by row"),
                        ("multi_base_rows", "multi-adapter Generator, all rows base")):
        ratio = s[name]["tokens_per_s"] / s["merged"]["tokens_per_s"]
        lines.append(f"| {label} | {s[name]['tokens_per_s']} | {ratio:.2f}x |")
    lines += ["", f"load average (1 min): {load['start']:.1f} at start, {load['after_speed']:.1f} after the speed "
              f"runs, {load['end']:.1f} at the end", "",
              "| adapters loaded | stack (slots x rank) | table bytes | peak RSS MiB |", "|---|---|---|---|"]
    for m in result["memory"]:
        lines.append(f"| {m['adapters']} | {m['stack']['slots']} x {m['stack']['rank']} | "
                     f"{m['table_bytes'] / 2**20:.1f} MiB | {m['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", type=int, help=argparse.SUPPRESS)  # child process: one memory figure
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/multi-lora-<date>.json)")
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(memory(args.memory, args.new_tokens)))
        return
    result = run(args.new_tokens, args.repeats)
    out = Path(args.out or REPO_ROOT / "bench" / "results" /
               f"multi-lora-{datetime.date.today():%Y%m%d}.json")
    print(markdown(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
