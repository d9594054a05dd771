"""LoRA training step at LLaMA-7B shape on one GPU: our JAX step next to HF transformers + peft.

    python3 bench/train_gpu.py --out train_gpu.json        # the real run (H100: < 4 minutes)
    python3 bench/train_gpu.py --tiny                      # CPU correctness run of the same code

What is measured, and why this way:

* **Workload** (both sides identical): the LLaMA-7B shape (`configs/models/llama_7b.json`, 6.74 B
  parameters), random weights, frozen base in bf16, LoRA r=8, alpha=16, dropout 0.05 on q/k/v/o with
  fp32 adapter weights, AdamW (lr 1e-4, no weight decay, no clipping), batch 8 x 512 random tokens,
  next-token loss on every position. Tokens/s counts all 8 x 512 input tokens of a step.
* **Separate processes.** Each implementation runs in its own child process, so one's allocator
  state cannot inflate the other's peak; JAX runs with `XLA_PYTHON_CLIENT_PREALLOCATE=false` so
  `peak_bytes_in_use` is what the step really needed. Peaks are whole-process peaks (weights
  included), JAX: device `memory_stats()["peak_bytes_in_use"]`; torch: `max_memory_allocated()`.
* **Ours** is `llama_e_jax.model.llama.Llama` with scan over layers, a remat policy, cuDNN flash attention
  (`attention_impl="cudnn"`) and the loss of `llama_e_jax.train.state.summed_token_loss`
  (train.py itself imports ml_collections, which the GPU image lacks; the step below is
  train_state's step without gradient accumulation and without packing — unpacked rows are what
  let cuDNN's causal kernel run, and the baseline does not pack either). The base is initialised
  directly on the device in bf16 by one jit-compiled function (layer by layer, via `lax.map`), so
  no fp32 or host copy of the 13.5 GB base ever exists; only the adapter (fp32) is differentiated.
* **Remat policies.** Each policy in `--remat` is a separate run. `mlp_dots_saveable` (model.py) keeps
  only the MLP's gate and up projection outputs (named with `checkpoint_name`) and recomputes the
  rest of a block.
  Why: with a frozen base, backward through a linear layer needs no saved input, so the only big
  tensors the backward needs are the attention inputs and the SwiGLU inputs. Keeping the SwiGLU
  inputs (2 x [B, T, F] per layer) and recomputing the cheaper attention block costs ~1/3 of a
  forward in extra FLOPs and fits the 21.7 GiB target, where `dots_with_no_batch_dims_saveable`
  keeps every projection output (~14.7 GiB of activations at this shape) and `full` recomputes a
  whole forward. A `+rbg` suffix (`mlp_dots_saveable+rbg`)
  runs the same step with JAX's `rbg` PRNG instead of the default threefry: LoRA dropout draws
  random bits for every adapted projection's input ([B, T, D] per projection and layer, again when
  recomputed), and `rbg` uses the device's random-bit generator, which is far cheaper than threefry
  on GPUs. Same semantics (dropout 0.05), different random stream.
* **MFU** uses model FLOPs, not hardware FLOPs: LoRA training does no weight-gradient matmuls for
  the frozen base, so a step is forward (2·N·tokens) + input gradients (2·N·tokens) = 4·N·tokens,
  plus causal attention 6·B·L·T²·D (forward 2·B·L·T²·D, backward twice that). N counts parameters
  used in matmuls (everything but the input embedding table); adapter FLOPs (< 0.01 %) and
  recomputation are not counted. Peak FLOP/s is a bf16 8192³ matmul measured through JAX in the
  same run on the same device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
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

from llama_e_jax.train.metrics_log import package_versions  # noqa: E402  (stdlib only; runs on the bare GPU image)

GIB = 2**30
HF_BASELINE_ANCHOR = {"tokens_per_s": 11916, "peak_gib": 36.2}  # /work/shared/BENCHMARKS.md, H100
TARGETS = {"speedup_vs_hf": 1.6, "memory_vs_hf": 0.6, "peak_gib": 21.7}
DEFAULT_REMAT = ("mlp_dots_saveable", "dots_with_no_batch_dims_saveable", "mlp_dots_saveable+rbg")
LORA = dict(rank=8, alpha=16.0, dropout=0.05, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
LEARNING_RATE = 1e-4


# ============================================================================ shared arithmetic


def matmul_params(config) -> int:
    """Parameters that take part in matmuls: all but the input embedding table (tied: all)."""
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return config.num_params - embedding


def model_flops_per_step(config, batch: int, seq: int) -> float:
    """4·N·tokens + 6·B·L·T²·D (see the module docstring); recomputation not counted."""
    tokens = batch * seq
    attention = 6.0 * batch * config.num_layers * seq * seq * config.num_heads * config.head_dim
    return 4.0 * matmul_params(config) * tokens + attention


def random_tokens(batch: int, seq: int, vocab: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, size=(batch, seq), dtype=np.int32)  # [B, T]


def host_peak_gib() -> float:
    """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


# ============================================================================ ours (JAX)


def random_base_on_device(model, config, seed: int):
    """Random base params, born on the device in `param_dtype` (normal * 0.02, norm scales 1).

    Stacked layer leaves [L, ...] are drawn one layer at a time inside `lax.map`, so the only
    transient buffer is one layer's worth; nothing is materialised on the host or in fp32.
    """
    import jax
    import jax.numpy as jnp

    abstract = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                           jnp.zeros((1, 1), jnp.int32))["params"])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)

    def draw(key, path, leaf):
        if str(path[-1].key) == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        if str(path[0].key) == "layers":
            keys = jax.random.split(key, leaf.shape[0])
            return jax.lax.map(lambda k: (jax.random.normal(k, leaf.shape[1:], leaf.dtype) * 0.02)
                               .astype(leaf.dtype), keys)
        return (jax.random.normal(key, leaf.shape, leaf.dtype) * 0.02).astype(leaf.dtype)

    @jax.jit
    def init(key):
        keys = jax.random.split(key, len(leaves))
        return jax.tree_util.tree_unflatten(treedef, [draw(k, p, l) for k, (p, l) in zip(keys, leaves)])

    return init(jax.random.key(seed))


def measure_matmul_tflops(dtype: str, size: int, reps: int = 20) -> float:
    """Achieved TFLOP/s of size³ matmuls through JAX: `reps` calls queued back to back (waiting on
    each call would add a host round trip per ~1.4 ms matmul and understate the peak), best of 3."""
    import jax

    a = jax.random.normal(jax.random.key(1), (size, size), dtype)
    b = jax.random.normal(jax.random.key(2), (size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            out = matmul(a, b)  # the device runs the calls in order; waiting on the last waits on all
        out.block_until_ready()
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * size**3 / best / 1e12


def run_jax(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import optax

    from llama_e_jax.model.config import LlamaConfig
    from llama_e_jax.model.lora import LoraConfig, init_adapter
    from llama_e_jax.model.llama import Llama
    from llama_e_jax.train.state import summed_token_loss

    policy, _, option = args.remat.partition("+")
    if option == "rbg":
        jax.config.update("jax_default_prng_impl", "rbg")  # before any key exists
    elif option:
        raise ValueError(f"unknown variant option {option!r} in {args.remat!r} (known: rbg)")
    shape = LlamaConfig.from_preset(args.preset)
    config = shape.replace(param_dtype=args.dtype, dtype=args.dtype, remat_policy=policy,
                           attention_impl=args.attention)
    lora_config = LoraConfig(**LORA)
    model = Llama(config, lora_config)
    optimizer = optax.adamw(args.lr, weight_decay=0.0)

    started = time.perf_counter()
    base = random_base_on_device(model, config, seed=0)
    adapter = jax.jit(init_adapter, static_argnums=(0, 1))(config, lora_config, jax.random.key(1))
    opt_state = jax.jit(optimizer.init)(adapter)
    jax.block_until_ready((base, opt_state))
    init_s = time.perf_counter() - started

    ids = random_tokens(args.batch, args.seq, config.vocab_size)
    targets = jnp.asarray(ids).at[:, :-1].set(ids[:, 1:])
    loss_mask = jnp.ones(ids.shape, jnp.float32).at[:, -1].set(0.0)
    # positions/segment_ids None: plain causal rows, the case cuDNN's flash attention handles.
    batch = {"input_ids": jnp.asarray(ids), "targets": targets, "loss_mask": loss_mask,
             "positions": None, "segment_ids": None}

    def train_step(adapter, opt_state, base, batch, rng):
        def mean_loss(a):
            loss_sum, tokens = summed_token_loss(model, a, base, batch, rng)
            return loss_sum / tokens

        loss, grads = jax.value_and_grad(mean_loss)(adapter)  # w.r.t. the adapter only
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss

    step = jax.jit(train_step, donate_argnums=(0, 1))
    rngs = jax.random.split(jax.random.key(2), args.warmup + args.steps)
    started = time.perf_counter()
    adapter, opt_state, loss = step(adapter, opt_state, base, batch, rngs[0])
    first_loss = float(loss)
    compile_s = time.perf_counter() - started
    for i in range(1, args.warmup):
        adapter, opt_state, loss = step(adapter, opt_state, base, batch, rngs[i])
    loss.block_until_ready()
    started = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        adapter, opt_state, loss = step(adapter, opt_state, base, batch, rngs[i])
    last_loss = float(loss)  # waits for the last step
    step_s = (time.perf_counter() - started) / args.steps

    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    base_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(base))
    on_gpu = device.platform == "gpu"
    peak_tflops = measure_matmul_tflops("bfloat16" if on_gpu else "float32", 8192 if on_gpu else 1024)
    return {
        "impl": "ours (jax)",
        "remat_policy": args.remat,
        "prng_impl": str(jax.config.jax_default_prng_impl),
        "attention_impl": args.attention,
        "dtype": args.dtype,
        "device": device.device_kind,
        "step_s": step_s,
        "tokens_per_s": args.batch * args.seq / step_s,
        "peak_gib": peak / GIB if peak is not None else host_peak_gib(),
        "peak_source": "device peak_bytes_in_use" if peak is not None else "host ru_maxrss",
        "base_params_gib": base_bytes / GIB,
        "base_param_dtypes": sorted({str(leaf.dtype) for leaf in jax.tree.leaves(base)}),
        "adapter_dtypes": sorted({str(leaf.dtype) for leaf in jax.tree.leaves(adapter)}),
        "init_s": init_s,
        "compile_s": compile_s,
        "loss_first": first_loss,
        "loss_last": last_loss,
        "matmul_peak_tflops": peak_tflops,
        "versions": package_versions(("jax", "jaxlib", "flax", "optax")),
    }


# ============================================================================ baseline (torch)


def run_hf(args: argparse.Namespace) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    from llama_e_jax.model.config import LlamaConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    hf_config = transformers.LlamaConfig(**LlamaConfig.from_preset(args.preset).to_hf_dict())
    hf_config.use_cache = False
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    peft_config = peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                  target_modules=list(LORA["targets"]), task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, peft_config)  # adapters in fp32 (autocast_adapter_dtype)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    ids = torch.from_numpy(random_tokens(args.batch, args.seq, hf_config.vocab_size).astype("int64")).to(device)
    init_s = time.perf_counter() - started
    use_autocast = dtype != torch.float32

    def step() -> torch.Tensor:
        with torch.autocast(device_type=device, dtype=dtype, enabled=use_autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    first_loss = float(step())
    first_step_s = time.perf_counter() - started
    for _ in range(1, args.warmup):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    last_loss = float(loss)
    sync()
    step_s = (time.perf_counter() - started) / args.steps
    peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else host_peak_gib()
    return {
        "impl": "HF transformers + peft",
        "attention_impl": "sdpa",
        "dtype": f"{args.dtype} weights" + (" + autocast" if use_autocast else ""),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "step_s": step_s,
        "tokens_per_s": args.batch * args.seq / step_s,
        "peak_gib": peak,
        "peak_source": "torch.cuda.max_memory_allocated" if device == "cuda" else "host ru_maxrss",
        "adapter_dtypes": sorted({str(p.dtype) for p in trainable}),
        "init_s": init_s,
        "first_step_s": first_step_s,
        "loss_first": first_loss,
        "loss_last": last_loss,
        "versions": package_versions(("torch", "transformers", "peft")),
    }


# ============================================================================ driver


def _run_worker(kind: str, args: argparse.Namespace, remat: str | None, timeout_s: float) -> dict[str, Any]:
    """Runs one measurement in a child process; returns its result or an {"error": ...} record."""
    with tempfile.TemporaryDirectory() as scratch:
        result_path = Path(scratch) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--result", str(result_path),
                   "--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype,
                   "--attention", args.attention, "--remat", remat or "none", "--lr", str(args.lr)]
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
        label = f"{kind}" + (f" ({remat})" if remat else "")
        print(f"[train_gpu] running {label} ...", flush=True)
        started = time.perf_counter()
        try:
            proc = subprocess.run(command, env=env, timeout=timeout_s, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"impl": label, "error": f"timed out after {timeout_s:.0f} s"}
        wall = time.perf_counter() - started
        if proc.returncode != 0 or not result_path.is_file():
            tail = (proc.stderr or proc.stdout).strip()[-2000:]
            print(f"[train_gpu] {label} failed (exit {proc.returncode}):\n{tail}", flush=True)
            return {"impl": label, "remat_policy": remat, "error": f"exit {proc.returncode}: {tail[-600:]}"}
        result = json.loads(result_path.read_text())
        result["wall_s"] = wall
        print(f"[train_gpu] {label}: {result['tokens_per_s']:,.0f} tokens/s, peak {result['peak_gib']:.2f} GiB "
              f"({wall:.0f} s)", flush=True)
        return result


def summarise(results: list[dict[str, Any]], flops: float) -> list[dict[str, Any]]:
    """Adds MFU and ratios against the baseline to each successful result (in place)."""
    baseline = next((r for r in results if r.get("impl", "").startswith("HF") and "error" not in r), None)
    peaks = [r["matmul_peak_tflops"] for r in results if "matmul_peak_tflops" in r]
    peak_tflops = max(peaks) if peaks else None  # the best of the runs' measurements of one device
    for r in results:
        if "error" in r:
            continue
        if peak_tflops:
            r["mfu"] = flops / r["step_s"] / (peak_tflops * 1e12)
        if baseline is not None and r is not baseline:
            r["speedup_vs_hf"] = r["tokens_per_s"] / baseline["tokens_per_s"]
            r["memory_vs_hf"] = r["peak_gib"] / baseline["peak_gib"]
            r["meets_targets"] = (r["speedup_vs_hf"] >= TARGETS["speedup_vs_hf"]
                                  and r["memory_vs_hf"] <= TARGETS["memory_vs_hf"])
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    header = f"| {'implementation':<48} | {'tokens/s':>9} | {'step s':>7} | {'peak GiB':>8} | {'MFU':>6} | {'vs HF':>13} |"
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for r in results:
        name = r["impl"] + (f", remat {r['remat_policy']}" if r.get("remat_policy") and "jax" in r["impl"] else "")
        if "error" in r:
            lines.append(f"| {name:<48} | failed: {r['error'][:80]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        ratio = (f"{r['speedup_vs_hf']:.2f}x / {r['memory_vs_hf']:.2f}x" if "speedup_vs_hf" in r
                 else "baseline" if r["impl"].startswith("HF") else "-")
        lines.append(f"| {name:<48} | {r['tokens_per_s']:>9,.0f} | {r['step_s']:>7.3f} | {r['peak_gib']:>8.2f} | "
                     f"{mfu:>6} | {ratio:>13} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU correctness run: tiny preset, fp32, 2 x 64")
    parser.add_argument("--out", default="", help="write the results JSON here")
    parser.add_argument("--preset", default="llama_7b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first one compiles)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--attention", default="cudnn", help="our attention_impl: cudnn, xla or auto")
    parser.add_argument("--remat", default=",".join(DEFAULT_REMAT), help="comma-separated policies, one run each")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--budget-s", type=float, default=225, help="skip runs that would start after this")
    parser.add_argument("--worker", choices=("jax", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset, args.batch, args.seq, args.steps, args.warmup = "tiny", 2, 64, 3, 2
        args.dtype, args.attention, args.lr = "float32", "xla", 1e-2  # a visible loss drop in 4 steps

    if args.worker:
        result = run_jax(args) if args.worker == "jax" else run_hf(args)
        Path(args.result).write_text(json.dumps(result))
        return 0

    from llama_e_jax.model.config import LlamaConfig

    shape = LlamaConfig.from_preset(args.preset)
    flops = model_flops_per_step(shape, args.batch, args.seq)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    runs = ([] if args.skip_hf else [("hf", None)]) + [("jax", p) for p in args.remat.split(",") if p]
    for kind, remat in runs:
        left = args.budget_s - (time.perf_counter() - started)
        if left < 30:
            results.append({"impl": kind, "remat_policy": remat, "error": "skipped: time budget spent"})
            continue
        results.append(_run_worker(kind, args, remat, timeout_s=max(left, 30)))
    summarise(results, flops)

    report = {
        "benchmark": "lora_train_step",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": socket.gethostname(),
        "python": platform.python_version(),
        "workload": {"preset": args.preset, "params": shape.num_params, "batch": args.batch, "seq": args.seq,
                     "tokens_per_step": args.batch * args.seq, "dtype": args.dtype, "lora": LORA,
                     "optimizer": f"AdamW lr {args.lr}, no weight decay, no clipping"},
        "flops_formula": "4*N*tokens + 6*B*L*T^2*D (N = matmul params, no base weight grads; recompute not counted)",
        "model_flops_per_step": flops,
        "targets": TARGETS,
        "hf_anchor_h100": HF_BASELINE_ANCHOR,
        "results": results,
        "wall_s": time.perf_counter() - started,
    }
    print(format_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"[train_gpu] wrote {args.out}")
    failed = [r for r in results if "error" in r]
    if args.tiny:  # a correctness run: every implementation must have run and learned something
        for r in results:
            if "error" not in r and not r["loss_last"] < r["loss_first"]:
                failed.append(r)
                print(f"[train_gpu] {r['impl']}: loss did not decrease ({r['loss_first']} -> {r['loss_last']})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
