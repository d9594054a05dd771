"""Every CPU benchmark on this machine, each next to its alternative, in one table and one JSON file.

    python -m bench.run_all                    # all: train, decode, pipeline (make bench)
    python -m bench.run_all --only train,pipeline

Each benchmark module (`bench/train_cpu.py`, `bench/decode_cpu.py`, `bench/pipeline_cpu.py`) has a
`run() -> dict` that measures our implementation and the alternative in the same run
(transformers + peft for LoRA training, transformers `generate` for decoding, alpaca-lora's
preprocessing for the input pipeline). Here each runs in its own child process, so that one's
memory peak and thread pools cannot leak into the next, and the results are printed as one table
and written to `bench/results/<machine>-<date>.json` with the machine, date, versions and the
exact command. No benchmark is a timed test: numbers are recorded, not asserted.

MFU of the training step uses model FLOPs: a LoRA step does forward (2·N per token) and input
gradients (2·N per token) but no weight gradients for the frozen base, so FLOPs/token = 4·N +
6·L·T·D (causal attention: 2·L·T·D forward, twice that backward), N = parameters in matmuls (all
but the input embedding table), recomputation not counted. The CPU's peak is measured here: the
median FLOP/s of a 2048³ float32 matmul through JAX on all cores.
"""

from __future__ import annotations

import argparse
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

BENCHMARKS = {"train": "bench.train_cpu", "decode": "bench.decode_cpu", "pipeline": "bench.pipeline_cpu"}
RESULTS_DIR = REPO_ROOT / "bench" / "results"
TIMEOUT_S = 3600
ALTERNATIVE_KEYS = ("alternative", "hf", "baseline", "transformers", "peft", "hf_peft", "hf_generate")


# ============================================================================ machine facts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def versions() -> dict[str, str]:
    from llama_e_jax.train.metrics_log import package_versions

    return package_versions(("jax", "jaxlib", "flax", "optax", "tokenizers", "torch", "transformers", "peft"))


def measure_cpu_peak_flops(size: int = 2048, repeats: int = 7) -> float:
    """Median FLOP/s of a size³ float32 matmul through JAX (all cores)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / sorted(times)[repeats // 2]


def lora_flops_per_token(preset_or_config: Any, seq_len: int) -> float:
    """4·N + 6·L·T·D (see the module docstring)."""
    from llama_e_jax.model.config import LlamaConfig

    config = LlamaConfig.from_preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    matmul_params = config.num_params - embedding
    return 4.0 * matmul_params + 6.0 * config.num_layers * seq_len * config.num_heads * config.head_dim


# ============================================================================ running


def run_in_child(name: str, module: str, timeout_s: float) -> dict[str, Any]:
    """`module.run()` in a fresh interpreter; its dict, or {"error": ...}."""
    with tempfile.TemporaryDirectory() as scratch:
        result_path = Path(scratch) / "result.json"
        code = (f"import json, sys; sys.path.insert(0, {str(REPO_ROOT)!r}); import {module} as m; "
                f"open({str(result_path)!r}, 'w').write(json.dumps(m.run()))")
        print(f"[run_all] {name}: {module}.run() ...", flush=True)
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, timeout=timeout_s,
                                  capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s"}
        wall = time.perf_counter() - started
        if proc.returncode != 0 or not result_path.is_file():
            tail = (proc.stderr or proc.stdout).strip()[-1500:]
            print(f"[run_all] {name} failed (exit {proc.returncode}):\n{tail}", flush=True)
            return {"error": f"exit {proc.returncode}: {tail[-500:]}"}
        result = json.loads(result_path.read_text())
        print(f"[run_all] {name}: done in {wall:.0f} s", flush=True)
        return {**result, "wall_s": wall} if isinstance(result, dict) else {"result": result, "wall_s": wall}


# ============================================================================ the table


def _numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """Flattened numeric leaves: {"a.b": 1.0}."""
    if isinstance(tree, bool):
        return {}
    if isinstance(tree, (int, float)):
        return {prefix: float(tree)}
    if isinstance(tree, dict):
        out: dict[str, float] = {}
        for key, value in tree.items():
            out.update(_numbers(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {}


def comparison_rows(name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """(benchmark, metric, ours, alternative, ratio) rows for the printed table.

    A result may carry its own `rows` ([{"metric", "ours", "alternative"}]); otherwise the numeric
    fields shared by its `ours` entry and its alternative entry (`alternative`, `hf`, ...) are
    paired, per case when the result is keyed by case (e.g. {"batch_1": {"ours":..., "hf":...}}).
    """
    if "error" in result:
        return [{"benchmark": name, "metric": "error", "ours": result["error"][:90], "alternative": "", "ratio": ""}]
    if isinstance(result.get("rows"), list):
        return [{"benchmark": name, **row} for row in result["rows"]] + _decode_step_rows(name, result)
    if name == "train" and isinstance(result.get("ours"), dict) and isinstance(result.get("hf_peft"), dict):
        return _training_rows(result)
    rows = []
    for case, entry in _cases(result):
        ours = entry.get("ours")
        alternative_key = next((k for k in ALTERNATIVE_KEYS if isinstance(entry.get(k), dict)), None)
        if not isinstance(ours, dict) or alternative_key is None:
            continue
        ours_numbers, alt_numbers = _numbers(ours), _numbers(entry[alternative_key])
        for metric in [m for m in ours_numbers if m in alt_numbers]:
            a, b = ours_numbers[metric], alt_numbers[metric]
            rows.append({"benchmark": name, "metric": f"{case}{metric}", "ours": a, "alternative": b,
                         "ratio": a / b if b else ""})
    return rows


def _decode_step_rows(name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """ms per decode step (one token per row; prefill included) from a decode result's `batch_N` entries."""
    new_tokens = result.get("new_tokens")
    if name != "decode" or not new_tokens:
        return []
    rows = []
    for key, entry in result.items():
        if key.startswith("batch_") and isinstance(entry, dict):
            ours, alternative = entry.get("ours", {}), entry.get("hf_generate", {})
            if "seconds" in ours and "seconds" in alternative:
                ours_ms, alt_ms = 1000 * ours["seconds"] / new_tokens, 1000 * alternative["seconds"] / new_tokens
                rows.append({"metric": f"ms per step, batch {key[6:]} (lower is better)", "ours": ours_ms,
                             "alternative": alt_ms, "ratio": ours_ms / alt_ms})
    return [{"benchmark": name, **row} for row in rows]


def _training_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """tokens/s, peak memory and MFU of the LoRA step, ours next to HF transformers + peft."""
    ours, hf = result["ours"], result["hf_peft"]
    workload = f"SmolLM2-135M {result.get('batch')}x{result.get('seq_len')}"
    rows = [{"benchmark": "train", "metric": f"LoRA step tokens/s ({workload})", "ours": ours["tokens_per_s"],
             "alternative": hf["tokens_per_s"], "ratio": ours["tokens_per_s"] / hf["tokens_per_s"]},
            {"benchmark": "train", "metric": "peak RSS MiB (lower is better)", "ours": ours["peak_rss_mib"],
             "alternative": hf["peak_rss_mib"], "ratio": ours["peak_rss_mib"] / hf["peak_rss_mib"]}]
    if "mfu" in ours and "mfu" in hf:
        rows.append({"benchmark": "train", "metric": "MFU % (4N+6LTD per token)", "ours": 100 * ours["mfu"],
                     "alternative": 100 * hf["mfu"], "ratio": ours["mfu"] / hf["mfu"]})
    return rows


def _cases(result: dict[str, Any]) -> list[tuple[str, dict]]:
    if "ours" in result:
        return [("", result)]
    return [(f"{key} ", value) for key, value in result.items() if isinstance(value, dict) and "ours" in value]


def add_training_mfu(result: dict[str, Any], peak_flops: float) -> None:
    """Adds `mfu` next to each `tokens_per_s` of the training result, when the workload is described."""
    preset = result.get("preset") or result.get("model_preset") or "smollm2_135m"
    seq_len = result.get("seq_len") or result.get("seq")
    if not seq_len:
        return
    try:
        per_token = lora_flops_per_token(preset, int(seq_len))
    except Exception as error:  # noqa: BLE001 - MFU is an annotation; report why it is missing
        result["mfu_error"] = str(error)
        return
    result["flops_per_token"] = per_token
    result["flops_formula"] = "4*N + 6*L*T*D per token (N = matmul params; no base weight grads; no recompute)"
    for entry in [v for v in result.values() if isinstance(v, dict)]:
        if isinstance(entry.get("tokens_per_s"), (int, float)):
            entry["mfu"] = entry["tokens_per_s"] * per_token / peak_flops


def format_table(rows: list[dict[str, Any]]) -> str:
    def show(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    width = max([len("metric")] + [len(str(row["metric"])) for row in rows])
    header = f"| {'benchmark':<9} | {'metric':<{width}} | {'ours':>12} | {'alternative':>12} | {'ours/alt':>8} |"
    lines = [header, f"|{'-' * 11}|{'-' * (width + 2)}|{'-' * 14}|{'-' * 14}|{'-' * 10}|"]
    for row in rows:
        ratio = f"{row['ratio']:.2f}x" if isinstance(row.get("ratio"), float) else show(row.get("ratio", ""))
        lines.append(f"| {row['benchmark']:<9} | {row['metric']:<{width}} | {show(row['ours']):>12} | "
                     f"{show(row['alternative']):>12} | {ratio:>8} |")
    return "\n".join(lines)


# ============================================================================ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {list(BENCHMARKS)}")
    parser.add_argument("--out", help="results JSON (default bench/results/<machine>-<date>.json)")
    parser.add_argument("--timeout-s", type=float, default=TIMEOUT_S, help="per benchmark")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        print(f"error: unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None  # the machine may be shared
    peak_flops = measure_cpu_peak_flops()
    print(f"[run_all] CPU: {cpu_model()}, {usable_cores()} cores, float32 matmul peak {peak_flops / 1e9:.1f} GFLOP/s",
          flush=True)
    results = {name: run_in_child(name, BENCHMARKS[name], args.timeout_s) for name in chosen}
    if "train" in results and "error" not in results["train"]:
        add_training_mfu(results["train"], peak_flops)
    rows = [row for name, result in results.items() for row in comparison_rows(name, result)]

    now = datetime.datetime.now(datetime.timezone.utc)
    machine = socket.gethostname()
    report = {
        "command": " ".join([Path(sys.executable).name, "-m", "bench.run_all", *(argv if argv is not None else sys.argv[1:])]),
        "date": now.isoformat(timespec="seconds"),
        "machine": machine,
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "load_average_at_start": load_at_start,
        "cpu_peak_flops_fp32": peak_flops,
        "versions": versions(),
        "results": results,
        "table": rows,
        "wall_s": time.perf_counter() - started,
    }
    out = Path(args.out) if args.out else RESULTS_DIR / f"{machine}-{now:%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(rows))
    print(f"[run_all] wrote {out}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
