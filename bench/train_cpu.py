"""LoRA training throughput and peak memory on this CPU: our JAX step next to HF transformers + peft.

    python -m bench.train_cpu                      # prints a markdown row and the JSON result
    python -m bench.train_cpu --batch 4 --seq 384 --steps 3

Workload, identical on both sides: SmolLM2-135M-Instruct (the default model, fp32 weights from the
GGUF / its HF conversion), LoRA r=8, alpha=16, dropout 0.05 on q/k/v/o with fp32 adapters, AdamW
(lr 1e-4, no weight decay, no clipping), `batch` rows of `seq` random tokens, next-token loss on
every position, one optimiser update per step. Tokens/s counts all batch x seq input tokens of a
step, timed over `steps` steps after one warm-up step (JAX's compilation is in the warm-up and is
reported separately as `compile_s`).

Ours is exactly what training runs: `llama_e_jax.train.state.Trainer.step` (scan over layers,
unmerged LoRA, jit with the train state donated). The alternative is what a user would otherwise
run: `LlamaForCausalLM` (sdpa attention) + `peft.get_peft_model` + `torch.optim.AdamW`, with torch's
default thread count.

Each side runs in its own child process, so the reported peak memory (the child's peak resident
set, `ru_maxrss`, weights included) is its own and neither inherits the other's thread pools. The
machine may be shared: the load average at the start is recorded with the result, and so is the
CPU time per step (user + system of the child over the timed steps), which other processes on the
machine disturb far less than wall time.

`--threads N` pins each child to the first N cores it may use (`sched_setaffinity`; XLA:CPU sizes its
thread pool from the affinity mask) and sets torch's intra-op threads to N, so that an A/B on a shared
machine compares equal compute on both sides. `--side ours` skips the alternative (quick A/B of a
change to our step).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

LORA = dict(rank=8, alpha=16.0, dropout=0.05, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
LEARNING_RATE = 1e-4


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _pin_threads(threads: int | None) -> None:
    """Restrict this process to `threads` of its allowed cores (before JAX or torch start their pools)."""
    if threads:
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[:threads])


def _random_batch(batch: int, seq: int, vocab: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, (batch, seq + 1)).astype(np.int32)  # [B, T + 1]


def measure_ours(batch: int, seq: int, steps: int, threads: int | None = None) -> dict[str, Any]:
    """Our training step on the default model (runs in the calling process)."""
    _pin_threads(threads)
    import jax
    import ml_collections
    import numpy as np

    from llama_e_jax.model import sharding
    from llama_e_jax.io.default_model import ensure_default_gguf
    from llama_e_jax.model.lora import LoraConfig
    from llama_e_jax.train.state import Trainer, make_optimizer
    from llama_e_jax.io.gguf_file import load_gguf

    config, params = load_gguf(ensure_default_gguf(), dtype="float32")
    optim = ml_collections.ConfigDict(dict(learning_rate=LEARNING_RATE, warmup_steps=0, end_learning_rate_ratio=1.0,
                                           weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=0.0))
    direction, schedule = make_optimizer(optim, total_steps=steps + 1)
    trainer = Trainer(config, LoraConfig(**LORA), direction, schedule, sharding.make_mesh(sharding.MeshConfig()))
    base = trainer.place_base(params)
    state = trainer.init(jax.random.PRNGKey(0))
    tokens = _random_batch(batch, seq, config.vocab_size)
    host_batch = {
        "input_ids": tokens[:, None, :-1], "targets": tokens[:, None, 1:],
        "loss_mask": np.ones((batch, 1, seq), np.float32), "segment_ids": np.ones((batch, 1, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, 1, seq)).copy(),
    }  # [B, A=1, T]
    device_batch = trainer.place_batch(host_batch)

    started = time.perf_counter()
    state, metrics = trainer.step(state, base, device_batch, 0)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - started
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    for step in range(1, steps + 1):
        state, metrics = trainer.step(state, base, device_batch, step)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - started) / steps
    return {"tokens_per_s": batch * seq / seconds, "step_s": seconds, "peak_rss_mib": _peak_rss_mib(),
            "cpu_s_per_step": (_cpu_seconds() - cpu_started) / steps, "compile_s": compile_s,
            "loss": float(metrics["loss"]), "threads": len(os.sched_getaffinity(0)),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def measure_hf_peft(batch: int, seq: int, steps: int, threads: int | None = None) -> dict[str, Any]:
    """The same step with transformers + peft (runs in the calling process)."""
    _pin_threads(threads)
    import peft
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)

    from llama_e_jax.io.default_model import ensure_default_hf_dir

    model = transformers.LlamaForCausalLM.from_pretrained(ensure_default_hf_dir(), dtype=torch.float32)
    lora_config = peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                  target_modules=list(LORA["targets"]), task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora_config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=0.0)
    tokens = torch.from_numpy(_random_batch(batch, seq, model.config.vocab_size)).long()
    input_ids, labels = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        logits = model(input_ids=input_ids).logits  # [B, T, V]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    for _ in range(steps):
        loss = step()
    seconds = (time.perf_counter() - started) / steps
    return {"tokens_per_s": batch * seq / seconds, "step_s": seconds, "peak_rss_mib": _peak_rss_mib(),
            "cpu_s_per_step": (_cpu_seconds() - cpu_started) / steps, "loss": loss,
            "torch_threads": torch.get_num_threads()}


def _in_child(side: str, batch: int, seq: int, steps: int, threads: int | None) -> dict[str, Any]:
    code = (f"import json, sys; sys.path.insert(0, {str(REPO_ROOT)!r}); import bench.train_cpu as b; "
            f"print('RESULT ' + json.dumps(b.measure_{side}({batch}, {seq}, {steps}, {threads})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} benchmark failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run(batch: int = 4, seq: int = 256, steps: int = 3, threads: int | None = None,
        side: str = "both") -> dict[str, Any]:
    """Both sides, each in a child process; ratios are ours / HF (tokens/s) and ours / HF (peak RSS).

    `side` "ours" or "hf_peft" measures only that one (no ratios)."""
    load = os.getloadavg()
    result: dict[str, Any] = {"preset": "smollm2_135m", "batch": batch, "seq_len": seq, "steps": steps,
                              "threads": threads, "load_average_at_start": load,
                              "cores": threads or len(os.sched_getaffinity(0))}
    for name in ("ours", "hf_peft"):
        if side in ("both", name):
            result[name] = _in_child(name, batch, seq, steps, threads)
    if side == "both":
        ours, hf = result["ours"], result["hf_peft"]
        result["speedup_tokens_per_s"] = ours["tokens_per_s"] / hf["tokens_per_s"]
        result["peak_rss_ratio"] = ours["peak_rss_mib"] / hf["peak_rss_mib"]
        result["cpu_s_per_step_ratio"] = ours["cpu_s_per_step"] / hf["cpu_s_per_step"]
    return result


def markdown_row(result: dict[str, Any]) -> str:
    ours, hf = result["ours"], result["hf_peft"]
    return (f"| LoRA train, SmolLM2-135M, {result['batch']}x{result['seq_len']}, CPU {result['cores']} cores | "
            f"{ours['tokens_per_s']:.0f} tok/s, {ours['peak_rss_mib']:.0f} MiB | "
            f"{hf['tokens_per_s']:.0f} tok/s, {hf['peak_rss_mib']:.0f} MiB | "
            f"{result['speedup_tokens_per_s']:.2f}x | {result['peak_rss_ratio']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="cores per side (default: all allowed)")
    parser.add_argument("--side", choices=("both", "ours", "hf_peft"), default="both")
    args = parser.parse_args()
    result = run(args.batch, args.seq, args.steps, args.threads, args.side)
    if args.side == "both":
        print("| benchmark | ours | HF transformers + peft | tokens/s ours/HF | peak memory ours/HF |")
        print("|---|---|---|---|---|")
        print(markdown_row(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
