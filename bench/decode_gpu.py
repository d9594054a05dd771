"""Greedy decoding at LLaMA-7B shape on one GPU: llama_e_jax's Generator next to transformers' generate.

    python3 bench/decode_gpu.py --out decode_gpu.json     # the real run (H100: about 2-3 minutes)
    python3 bench/decode_gpu.py --tiny                    # CPU check of the same code, tokens compared

What is measured, and why this way:

* **Workload** (both sides): the LLaMA-7B shape (`configs/models/llama_7b.json`), random weights
  (normal x 0.02, norm scales 1) stored and computed in bf16, batch 1 and 16, 128 random prompt
  tokens per row, exactly 128 greedy new tokens per row (no EOS: `eos_ids=()` here,
  `generation_config.eos_token_id = None` for transformers).
* **Numbers**: ms/token = wall time of one whole generate call / 128 (prefill included; at batch
  16 it is the time per decode step, shared by 16 rows), tokens/s = batch x 128 / that time.
  Ours also reports the time to the first token (prefill + one decode step) and the decode step
  time without it. Compilation is excluded
  (each batch size is run once before timing; the compiles of both batch sizes run concurrently).
* **Separate processes**: each implementation runs in its own child process, so one's allocator
  cannot crowd the other. Ours runs first (the budget is shared: `--budget-s`, default 160 s to fit
  gpu_suite.sh's 170 s limit); transformers gets the time that is left.
* **Ours**: `llama_e_jax.generate.generator.Generator` as the server and evaluation use it — per-layer weight
  arrays (unrolled layers), a heads-major bf16 KV cache of 256 slots updated in place, prefill and
  a 128-step `lax.while_loop` decode each one compiled call. Weights are drawn on the device layer
  by layer: no fp32 or host copy of the 13.5 GB base ever exists.
* **Imports**: jax, flax, numpy, torch, transformers only (plus this repository's config, model,
  lora, generate, sampling, weights modules, none of which imports tfds, grain, openai or
  ml_collections).
* `--tiny`: the tiny preset in fp32 on CPU, 16 + 16 tokens, batch 1 and 4; transformers loads the
  very same weights (an HF checkpoint written by ours), and the generated tokens must be equal.
* `--speculative-k K` (gpu_suite.sh passes 4): ours also decodes the same prompts with prompt-lookup
  speculation (generate/speculative.py, k drafts from 3..1-gram matches, every batch size), checks the
  tokens equal plain greedy's, and reports tokens/s and the acceptance length (tokens per verify
  pass, host replay); transformers also runs `generate(prompt_lookup_num_tokens=K)` at batch 1 (its
  speculation is batch-1 only). Random weights and random prompts: drafts come mostly from the text
  the model itself repeats, so the acceptance length says little about real text; the verify pass's
  cost (ms per step of k+1 positions vs 1) is the transferable figure.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TARGETS = {"batch_1_ms_per_token_max": 6.0, "batch_16_tokens_per_s_min": 2400.0}
HF_BASELINE_ANCHOR = {"device": "H100", "batch_1_ms_per_token": 95.0, "batch_16_tokens_per_s": 236.0}


class IdTokenizer:
    """The generator only decodes text for stop strings and streaming; a benchmark needs neither."""

    bos_id, eos_id, pad_id, add_bos, chat_template = 1, None, None, False, None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError("the benchmark passes token ids")


def workload(args: argparse.Namespace):
    from llama_e_jax.model.config import LlamaConfig

    return LlamaConfig.from_preset(args.preset).replace(param_dtype=args.dtype, dtype=args.dtype)


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed + batch)
    return rng.integers(3, vocab, size=(batch, length)).tolist()


# ============================================================================= ours


def random_weights_per_layer(config, seed: int) -> dict:
    """Decode weights (layers as a tuple of per-layer trees), drawn on the device in param_dtype."""
    import jax
    import jax.numpy as jnp

    from llama_e_jax.model.llama import Llama

    abstract = jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    draw = jax.jit(lambda key, shape, dtype: (jax.random.normal(key, shape, dtype) * 0.02).astype(dtype),
                   static_argnums=(1, 2))
    counter = iter(range(1 << 30))

    def leaf(path, struct, shape):
        if path[-1].key == "scale":
            return jnp.ones(shape, struct.dtype)
        return draw(jax.random.key(seed * 100_000 + next(counter)), shape, struct.dtype)

    layers = abstract.pop("layers")
    weights = jax.tree_util.tree_map_with_path(lambda p, s: leaf(p, s, s.shape), abstract)
    weights["layers"] = tuple(jax.tree_util.tree_map_with_path(lambda p, s: leaf(p, s, s.shape[1:]), layers)
                              for _ in range(config.num_layers))
    return weights


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import numpy as np

    from llama_e_jax.generate import sampling, speculative
    from llama_e_jax.generate.generator import Generator
    from llama_e_jax.generate.session import Request, length_bucket

    config = workload(args)
    started = time.perf_counter()
    if args.tiny:  # the same weights as transformers will load
        from llama_e_jax.io import weights as weights_io

        params = tiny_params(config)
        weights_io.save_hf_checkpoint(params, config, args.checkpoint)
        weights = params
    else:
        weights = random_weights_per_layer(config, seed=0)
    jax.block_until_ready(weights)
    init_s = time.perf_counter() - started
    batches = [int(b) for b in args.batch_sizes.split(",")]
    generator = Generator(config, weights, IdTokenizer(), max_batch_size=max(batches), chunk_size=args.new_tokens,
                          eos_ids=(), layer_loop=args.layer_loop)
    del weights
    speculating = None
    if args.speculative_k:
        speculation = speculative.Speculation(num_draft=args.speculative_k, ngram_max=3, ngram_min=1,
                                              max_rows=max(batches))
        speculating = Generator(config, generator.weights, IdTokenizer(), max_batch_size=max(batches),
                                chunk_size=args.new_tokens, eos_ids=(), layer_loop=args.layer_loop,
                                speculation=speculation)
    max_length = length_bucket(args.prompt_len + args.new_tokens, generator.max_length, minimum=64)  # as generate_ids
    prompts = {b: random_prompts(b, args.prompt_len, config.vocab_size) for b in batches}

    def generate(batch: int) -> list:
        return generator.generate_ids(prompts[batch], max_new_tokens=args.new_tokens)

    def prefill_only(batch: int) -> None:  # same shapes as `generate`: the prefill and the first token
        session = generator.session(sampling.Greedy(), batch, max_length, args.new_tokens)
        session.run([Request(p, 1) for p in prompts[batch]])

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(batches)) as pool:  # compile both sizes at once
        list(pool.map(lambda b: (generate(b), prefill_only(b)), batches))
        if speculating is not None:
            list(pool.map(lambda b: speculating.generate_ids(prompts[b], max_new_tokens=args.new_tokens), batches))
    compile_s = time.perf_counter() - started

    result: dict[str, Any] = {"init_s": init_s, "compile_and_first_run_s": compile_s,
                              "device": str(jax.devices()[0].device_kind), "layer_loop": args.layer_loop}
    for batch in batches:
        totals, prefills = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            completions = generate(batch)
            totals.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            prefill_only(batch)
            prefills.append(time.perf_counter() - t0)
        assert all(c.completion_tokens == args.new_tokens for c in completions)
        total, prefill = float(np.median(totals)), float(np.median(prefills))
        result[f"batch_{batch}"] = {
            "ms_per_token": 1000 * total / args.new_tokens,
            "tokens_per_s": batch * args.new_tokens / total,
            "prefill_and_first_token_ms": 1000 * prefill,
            "decode_ms_per_step": 1000 * (total - prefill) / max(args.new_tokens - 1, 1),
            "seconds": totals,
            "tokens": [list(c.token_ids) for c in completions] if args.tiny else None,
        }
        if speculating is not None:
            result[f"speculative_batch_{batch}"] = _speculative_timing(speculating, prompts[batch], completions, args)
    return result


def _speculative_timing(generator, prompts: list[list[int]], plain: list, args: argparse.Namespace) -> dict[str, Any]:
    """Timed speculative generate calls (median), tokens checked against plain greedy, acceptance length."""
    import numpy as np

    from llama_e_jax.generate import speculative

    totals = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        completions = generator.generate_ids(prompts, max_new_tokens=args.new_tokens)
        totals.append(time.perf_counter() - t0)
    total = float(np.median(totals))
    steps = [speculative.acceptance_lengths(p, list(c.token_ids), generator.speculation)
             for p, c in zip(prompts, completions)]
    emitted = [n for row in steps for n in row]
    return {"k": generator.speculation.num_draft, "ms_per_token": 1000 * total / args.new_tokens,
            "tokens_per_s": len(prompts) * args.new_tokens / total,
            "seconds": totals,
            "equal_to_plain_greedy": [c.token_ids for c in completions] == [c.token_ids for c in plain],
            "acceptance_length": sum(emitted) / len(emitted),
            "ms_per_verify_step": 1000 * total / max(len(row) for row in steps)}


def tiny_params(config) -> dict:
    """Random fp32 params (numpy, seeded) for the --tiny correctness run."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llama_e_jax.model.llama import Llama

    abstract = jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    rng = np.random.default_rng(0)

    def leaf(path, struct):
        if path[-1].key == "scale":
            return (1.0 + 0.1 * rng.standard_normal(struct.shape)).astype(np.float32)
        fan_in = struct.shape[-2] if path[-1].key == "kernel" else 1.0
        return (rng.standard_normal(struct.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


# ============================================================================= transformers


def run_hf(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    import transformers

    config = workload(args)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    if args.tiny:
        model = transformers.LlamaForCausalLM.from_pretrained(args.checkpoint, dtype=dtype)
    else:
        hf_config = transformers.LlamaConfig(**{k: v for k, v in config.to_hf_dict().items() if k != "torch_dtype"})
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = transformers.LlamaForCausalLM(hf_config)
        torch.set_default_dtype(torch.float32)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None  # exactly new_tokens per row, like eos_ids=() for ours
    model.generation_config.pad_token_id = 0
    init_s = time.perf_counter() - started

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    result: dict[str, Any] = {"init_s": init_s, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                              "transformers": transformers.__version__, "torch": torch.__version__}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        ids = torch.tensor(random_prompts(batch, args.prompt_len, config.vocab_size), device=device)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)  # warm-up
            sync()
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False)
            sync()
            total = time.perf_counter() - t0
        new = out[:, args.prompt_len:].cpu().numpy()
        assert new.shape == (batch, args.new_tokens)
        result[f"batch_{batch}"] = {"ms_per_token": 1000 * total / args.new_tokens,
                                    "tokens_per_s": batch * args.new_tokens / total, "seconds": [total],
                                    "tokens": np.asarray(new).tolist() if args.tiny else None}
        if args.speculative_k and batch == 1:  # transformers' prompt lookup is batch-1 only
            with torch.no_grad():
                sync()
                t0 = time.perf_counter()
                looked = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                                        prompt_lookup_num_tokens=args.speculative_k)
                sync()
                total = time.perf_counter() - t0
            result["prompt_lookup_batch_1"] = {
                "ms_per_token": 1000 * total / args.new_tokens, "tokens_per_s": args.new_tokens / total,
                "equal_to_plain_greedy": looked[:, args.prompt_len:].cpu().tolist() == np.asarray(new).tolist()}
    return result


# ============================================================================= driver


def _run_worker(kind: str, args: argparse.Namespace, timeout_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        result_path = Path(scratch) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--result", str(result_path),
                   "--preset", args.preset, "--dtype", args.dtype, "--batch-sizes", args.batch_sizes,
                   "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                   "--repeats", str(args.repeats), "--layer-loop", args.layer_loop, "--checkpoint", args.checkpoint,
                   "--speculative-k", str(args.speculative_k)]
        if args.tiny:
            command.append("--tiny")
        print(f"[decode_gpu] {kind}: starting (limit {timeout_s:.0f} s)", flush=True)
        started = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=REPO_ROOT, timeout=timeout_s, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s"}
        wall = time.perf_counter() - started
        if proc.returncode != 0 or not result_path.is_file():
            tail = proc.stdout.strip()[-2000:]
            print(f"[decode_gpu] {kind} failed (exit {proc.returncode}):\n{tail}", flush=True)
            return {"error": f"exit {proc.returncode}: {tail[-600:]}"}
        print(f"[decode_gpu] {kind}: done in {wall:.0f} s", flush=True)
        return {**json.loads(result_path.read_text()), "wall_s": wall}


def summary_rows(ours: dict[str, Any], hf: dict[str, Any], batches: list[int]) -> list[dict[str, Any]]:
    rows = []
    for batch in batches:
        mine, theirs = ours.get(f"batch_{batch}", {}), hf.get(f"batch_{batch}", {})
        metric = ("ms_per_token", "ms/token") if batch == 1 else ("tokens_per_s", "tokens/s")
        a, b = mine.get(metric[0]), theirs.get(metric[0])
        ratio = (b / a if metric[0] == "ms_per_token" else a / b) if a and b else None
        rows.append({"batch": batch, "metric": metric[1], "ours": a, "transformers": b, "speedup": ratio,
                     "ours_prefill_ms": mine.get("prefill_and_first_token_ms"),
                     "ours_decode_ms_per_step": mine.get("decode_ms_per_step")})
        fast = ours.get(f"speculative_batch_{batch}")
        if fast:  # ours speculative vs HF prompt lookup at batch 1, vs HF plain otherwise
            lookup = hf.get("prompt_lookup_batch_1", {}) if batch == 1 else {}
            theirs_fast = lookup.get(metric[0], b)
            a = fast.get(metric[0])
            ratio = (theirs_fast / a if metric[0] == "ms_per_token" else a / theirs_fast) if a and theirs_fast else None
            rows.append({"batch": batch, "metric": f"{metric[1]}, speculative k={fast.get('k', '')}"
                         f" (HF: {'prompt lookup' if lookup else 'plain'})",
                         "ours": a, "transformers": theirs_fast, "speedup": ratio, "ours_prefill_ms": None,
                         "ours_decode_ms_per_step": fast.get("ms_per_verify_step")})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    show = lambda x: "-" if x is None else f"{x:,.2f}" if x < 100 else f"{x:,.0f}"
    lines = ["| batch | metric | llama_e_jax | transformers | speed-up | ours: prefill + 1st token ms "
             "| ours: decode ms/step |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['metric']} | {show(r['ours'])} | {show(r['transformers'])} | "
                     f"{show(r['speedup'])}{'x' if r['speedup'] else ''} | {show(r['ours_prefill_ms'])} | "
                     f"{show(r['ours_decode_ms_per_step'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU correctness run: tiny preset, fp32, 16 + 16 tokens")
    parser.add_argument("--out", default="", help="write the results JSON here")
    parser.add_argument("--preset", default="llama_7b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per batch size (median)")
    parser.add_argument("--layer-loop", default="unroll", choices=("unroll", "scan"))
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--speculative-k", type=int, default=0,
                        help="also decode with prompt-lookup speculation, k drafts (and HF prompt lookup, batch 1)")
    parser.add_argument("--budget-s", type=float, default=160, help="total time; transformers gets what is left")
    parser.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset, args.dtype, args.prompt_len, args.new_tokens = "tiny", "float32", 16, 16
        args.batch_sizes = "1,4" if args.batch_sizes == "1,16" else args.batch_sizes
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    if args.worker:
        result = run_ours(args) if args.worker == "ours" else run_hf(args)
        Path(args.result).write_text(json.dumps(result))
        return 0

    started = time.perf_counter()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        args.checkpoint = str(Path(scratch) / "tiny_checkpoint")  # --tiny: ours writes it, transformers reads it
        ours = _run_worker("ours", args, timeout_s=args.budget_s)
        left = args.budget_s - (time.perf_counter() - started)
        if args.skip_hf:
            hf: dict[str, Any] = {"error": "skipped (--skip-hf)"}
        elif left < 20:
            hf = {"error": f"skipped: {left:.0f} s of the time budget left"}
        else:
            hf = _run_worker("hf", args, timeout_s=left)
    rows = summary_rows(ours, hf, batches)
    report = {
        "benchmark": "decode",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": socket.gethostname(),
        "python": platform.python_version(),
        "workload": {"preset": args.preset, "dtype": args.dtype, "batch_sizes": batches,
                     "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens, "decoding": "greedy, no EOS"},
        "targets": TARGETS, "hf_anchor_h100": HF_BASELINE_ANCHOR,
        "ours": ours, "hf_generate": hf, "rows": rows, "wall_s": time.perf_counter() - started,
    }
    status = 0
    if args.tiny and "error" not in ours and "error" not in hf:
        report["tokens_equal"] = all(ours[f"batch_{b}"]["tokens"] == hf[f"batch_{b}"]["tokens"] for b in batches)
        print(f"[decode_gpu] --tiny: generated tokens equal to transformers': {report['tokens_equal']}")
        status = 0 if report["tokens_equal"] else 1
    speculative_equal = [ours[key]["equal_to_plain_greedy"] for key in ours if key.startswith("speculative_batch_")]
    if not all(speculative_equal):
        print("[decode_gpu] speculative tokens differ from plain greedy")
        status = 1
    print(format_table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"[decode_gpu] wrote {args.out}")
    return 1 if "error" in ours else status


if __name__ == "__main__":
    sys.exit(main())
