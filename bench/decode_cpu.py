"""Decode throughput on this CPU: llama_e_jax's Generator next to transformers' `generate`.

    python bench/decode_cpu.py                 # markdown table; python -m bench.run_all runs it too
    python bench/decode_cpu.py --new-tokens 32 --batch-sizes 1,16

Workload (identical on both sides): SmolLM2-135M-Instruct, the embedded default model, fp32
weights (dequantised from the GGUF once; transformers loads the converted HF directory), greedy
decoding of exactly `new_tokens` tokens per row (EOS does not stop either side), prompts built with
the Alpaca template from a few e-commerce instructions (lengths differ, so a batch is padded:
right-padded here, left-padded with an attention mask for transformers).

Tokens/s = batch x new_tokens / wall time of one whole `generate` call (prefill included,
compilation excluded: each side first runs the same call once). transformers runs with the torch
thread count that is faster here (its default and 1 are tried on a short batch-1 run first: on a
shared 2-core machine OpenMP spinning can make 2 threads 10x slower than 1); the count is reported.
Run it on a quiet machine: both sides are memory-bound on a CPU, and other processes skew both.

XLA runs its CPU matmuls through XNNPACK here (`--xla_cpu_use_xnnpack=true`, added to XLA_FLAGS when
this module is imported, before JAX starts; `LLAMA_E_BENCH_XNNPACK=0` turns it off): on the 2-core
Xeon this was written on, a [1, 576] x [576, 1536] fp32 product streams weights at 11.5 GB/s with it
and 5.2 GB/s with XLA's default Eigen path (torch, 1 thread: 10 GB/s). Greedy outputs are unchanged
(tests/test_generate.py passes with the flag set). The flag in effect is recorded in the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

XNNPACK_FLAG = "--xla_cpu_use_xnnpack=true"
if os.environ.get("LLAMA_E_BENCH_XNNPACK", "1") != "0" and "xla_cpu_use_xnnpack" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XNNPACK_FLAG}".strip()  # before JAX starts

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

INSTRUCTIONS = [
    ("Write a short advertisement for this product.", "Stainless steel water bottle, 750 ml, keeps drinks cold 24 h"),
    ("Rewrite this product title to be clear and searchable.", "NEW!!! mug cup ceramic 300ml red gift coffee tea"),
    ("Which category does this product belong to?", "Wireless ergonomic mouse with USB receiver"),
    ("What does the customer probably want?", "Do you ship to Canada and how long does it take?"),
    ("Answer the customer's question.", "Can I return shoes that I already wore outside?"),
    ("Write a short advertisement for this product.", "Organic green tea, 100 bags"),
    ("Rewrite this product title.", "kids bike 16 inch blue"),
    ("Summarise the product in one sentence.", ""),
]


def prompts(batch: int) -> list[str]:
    from llama_e_jax.data.prompt import build_prompt

    return [build_prompt(*INSTRUCTIONS[i % len(INSTRUCTIONS)]) for i in range(batch)]


def measure_ours(generator: Any, texts: list[str], new_tokens: int) -> float:
    """Seconds for one generate call (after a compiling call of the same shapes)."""
    generator.generate(texts, max_new_tokens=new_tokens)
    started = time.perf_counter()
    completions = generator.generate(texts, max_new_tokens=new_tokens)
    elapsed = time.perf_counter() - started
    assert all(c.completion_tokens == new_tokens for c in completions)
    return elapsed


def measure_transformers(model: Any, tokenizer: Any, texts: list[str], new_tokens: int) -> float:
    import torch

    ids = [tokenizer.encode(t) for t in texts]
    width = max(map(len, ids))
    pad = tokenizer.eos_id
    inputs = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    options = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=pad)
    with torch.no_grad():
        model.generate(inputs, **{**options, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        started = time.perf_counter()
        out = model.generate(inputs, **options)
        elapsed = time.perf_counter() - started
    assert out.shape[1] == width + new_tokens
    return elapsed


def run(batch_sizes: tuple[int, ...] = (1, 16), new_tokens: int = 64) -> dict[str, Any]:
    """Tokens/s of both implementations per batch size; `rows` is what bench.run_all prints."""
    import torch
    import transformers

    from llama_e_jax.io.default_model import ensure_default_gguf, ensure_default_hf_dir
    from llama_e_jax.generate.generator import Generator
    from llama_e_jax.io.tokenizer import load_tokenizer
    from llama_e_jax.io.gguf_file import load_gguf

    hf_dir = ensure_default_hf_dir()
    config, params = load_gguf(ensure_default_gguf(), dtype="float32")
    tokenizer = load_tokenizer(hf_dir)
    generator = Generator(config, params, tokenizer, max_batch_size=max(batch_sizes), chunk_size=new_tokens,
                          eos_ids=())  # exactly new_tokens per row, as min_new_tokens does for transformers
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    default_threads = torch.get_num_threads()

    # transformers' faster thread count, chosen on a short batch-1 run.
    probe = {}
    for threads in sorted({default_threads, 1}):
        torch.set_num_threads(threads)
        probe[threads] = measure_transformers(hf_model, tokenizer, prompts(1), 8)
    hf_threads = min(probe, key=probe.get)
    torch.set_num_threads(hf_threads)

    result: dict[str, Any] = {"model": "SmolLM2-135M-Instruct fp32", "new_tokens": new_tokens, "rows": [],
                              "torch_threads": hf_threads, "torch_thread_probe_s": probe,
                              "xla_flags": os.environ.get("XLA_FLAGS", "")}
    for batch in batch_sizes:
        texts = prompts(batch)
        ours_s = measure_ours(generator, texts, new_tokens)
        hf_s = measure_transformers(hf_model, tokenizer, texts, new_tokens)
        ours_tps, hf_tps = batch * new_tokens / ours_s, batch * new_tokens / hf_s
        result[f"batch_{batch}"] = {"ours": {"tokens_per_s": ours_tps, "seconds": ours_s},
                                    "hf_generate": {"tokens_per_s": hf_tps, "seconds": hf_s, "torch_threads": hf_threads}}
        result["rows"].append({"metric": f"decode tokens/s, batch {batch}", "ours": ours_tps,
                               "alternative": hf_tps, "ratio": ours_tps / hf_tps})
    torch.set_num_threads(default_threads)
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Greedy decoding, {result['model']}, {result['new_tokens']} new tokens per row (prefill included).",
             "", "| batch | llama_e_jax tokens/s | transformers tokens/s (torch threads) | speed-up |",
             "|---:|---:|---:|---:|"]
    for key, entry in result.items():
        if key.startswith("batch_"):
            ours, hf = entry["ours"], entry["hf_generate"]
            lines.append(f"| {key[6:]} | {ours['tokens_per_s']:.1f} | {hf['tokens_per_s']:.1f} ({hf['torch_threads']}) "
                         f"| {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x |")
    return "\n".join(lines)


def report(result: dict[str, Any], table: str, json_path: str | None) -> int:
    """The end of every CPU bench's main: the raw result to `json_path` (if given), the table to stdout."""
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    result = run(tuple(int(b) for b in args.batch_sizes.split(",")), args.new_tokens)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
