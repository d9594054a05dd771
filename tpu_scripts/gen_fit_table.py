"""Regenerates docs/tpu_fit.md: LLaMA 7B/13B/30B LoRA training, AOT-compiled for TPU slices on a CPU.

    .venv-tpu/bin/python tpu_scripts/gen_fit_table.py            # all 60 rows (hours on 2 cores; resumable)
    .venv-tpu/bin/python tpu_scripts/gen_fit_table.py --only 7b   # a subset, merged into the saved results

Every row is `llama_e_jax.aot.check` of the paper's recipes (configs/llama_{7b,13b,30b}_lora.py: bf16
weights and compute, full remat, the authors' LoRA r=8 on q/k/v/o, the whole slice as one fsdp
axis) with the row's sequence length and micro-batch, compiled by libtpu for the named topology.
A 7B compile takes 3-20 minutes of a CPU core (v4 and 16-chip slices are the slow ones), so results
are cached in docs/tpu_fit.json, keyed by row: an interrupted run resumes, and rows are computed
slice by slice, quickest slices first, so a partial table is still a table (missing rows are listed
as not yet compiled). --only / --force recompute a subset.

FLOPs come twice, side by side: the compiler's (XLA's cost analysis of the step compiled loop-free
with 2 and 3 layers, extrapolated: aot.straight_line_cost) and the hand count
(llama_e_jax.roofline.train_flops); the table is not written when the two differ by more than 10 %.
The compiler's count depends only on the per-chip work (model, rows per chip, sequence length), so it
is cached per shape in the JSON ("_probes_v2") and shown for every row of that shape, compiled or
not; `--reprobe` computes just these counts (two small compiles per shape) without the real,
expensive compiles. Counts stored in rows compiled before issue 18's fix ("flops" of rows without
"accounting": 2) came from the scanned program and are not shown. The predicted step time, MFU,
tokens/s and cost are llama_e_jax.roofline's (compute at MaxText's published MFU, HBM and ICI
rooflines), for every row.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llama_e_jax import aot, roofline  # noqa: E402
from llama_e_jax.model import sharding  # noqa: E402
from llama_e_jax.train import recipe  # noqa: E402

aot.use_cpu_host()

MODELS = {"7b": "llama_7b_lora", "13b": "llama_13b_lora", "30b": "llama_30b_lora"}  # recipes in configs/
SEQ_LENS = (512, 2048)
ROWS_PER_CHIP = (1, 4)
SLICES = ("v4-8", "v5e-8", "v5e-16", "v5p-8", "v6e-8")
JSON_PATH = REPO / "docs" / "tpu_fit.json"
MD_PATH = REPO / "docs" / "tpu_fit.md"


def recipe_args(recipe: str, seq_len: int, batch_size: int) -> list[str]:
    return [
        "--config", str(REPO / "configs" / f"{recipe}.py"),
        f"--config.data.seq_len={seq_len}", f"--config.train.batch_size={batch_size}",
        "--config.train.grad_accum_steps=1",  # one micro-batch: accumulation adds time, not memory
        "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1",
    ]


SLICE_PRIORITY = ("v5e-8", "v5p-8", "v6e-8", "v4-8", "v5e-16")  # quickest compiles first (v4, v5e-16: ~20 min a row)


def rows_in_priority_order() -> list[tuple[str, int, int, str]]:
    """Slice by slice; within a slice every model at the smallest shape first, so a partial table
    still answers "which model fits where" for the slices it has."""
    return [(model, seq_len, rows, slice_name) for slice_name in SLICE_PRIORITY for rows in ROWS_PER_CHIP
            for seq_len in SEQ_LENS for model in MODELS]


def row_key(model: str, seq_len: int, rows_per_chip: int, slice_name: str) -> str:
    return f"{model}/seq{seq_len}/x{rows_per_chip}/{slice_name}"


def run_row(model: str, seq_len: int, rows_per_chip: int, slice_name: str, probe_cache: dict) -> dict:
    topology, _ = aot.resolve_topology(slice_name)
    chips = len(aot.topology_devices(topology))
    config = aot.parse_recipe(recipe_args(MODELS[model], seq_len, rows_per_chip * chips))
    started = time.perf_counter()
    report = aot.check(config, slice_name, probe_cache=probe_cache)[0]
    return {**report.to_json(), "model": model, "seq_len": seq_len, "batch_size": rows_per_chip * chips,
            "slice": slice_name, "compile_s": round(time.perf_counter() - started, 1), "accounting": 2}


class SavedProbes(dict):
    """aot.check's probe cache, kept in the JSON (under "_probes_v2") so a resumed run reuses it.

    ("_probes" holds the pre-fix probes of issue 18, measured on the loop form; no longer read.)"""

    def __init__(self, saved: dict[str, list[float]]):
        super().__init__()
        self.saved = saved

    def __contains__(self, key) -> bool:
        return repr(key) in self.saved

    def __getitem__(self, key):
        return np.array(self.saved[repr(key)])

    def __setitem__(self, key, value) -> None:
        self.saved[repr(key)] = [float(v) for v in value]


@functools.cache
def model_config(model: str):
    """(LlamaConfig, LoraConfig) of a model's recipe, as the rows train it (shapes do not depend on the row)."""
    config = aot.parse_recipe(recipe_args(MODELS[model], 512, 8))
    return aot.model_config_of(config), recipe.lora_config_of(config)


def probe_key(model: str, seq_len: int, rows_per_chip: int) -> tuple:
    """aot.check's probe-cache key for a row: the same per-chip program on every slice."""
    return ("train", model_config(model)[0], (rows_per_chip, seq_len), 1)


def reprobe(model: str, seq_len: int, rows_per_chip: int, probe_cache: SavedProbes) -> None:
    """The compiler's FLOP count for a row shape (aot.straight_line_cost, compiled for v5e-8: per chip the
    program is the same on every slice) into the cache, unless it is there."""
    key = probe_key(model, seq_len, rows_per_chip)
    if key in probe_cache:
        return
    topology, _ = aot.resolve_topology("v5e-8")
    devices = aot.topology_devices(topology)
    config = aot.parse_recipe(recipe_args(MODELS[model], seq_len, rows_per_chip * len(devices)))
    mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh), devices)
    probe_cache[key] = aot.straight_line_cost(lambda c: aot.compile_train_step(config, c, mesh), key[1])


def compiler_flops(results: dict, model: str, seq_len: int, rows_per_chip: int) -> float | None:
    """The compiler's FLOPs per chip for a row shape, or None while its probes are not compiled."""
    saved = results.get("_probes_v2", {}).get(repr(probe_key(model, seq_len, rows_per_chip)))
    return None if saved is None else saved[0]


# Public on-demand list prices, US dollars per chip-hour, from cloud.google.com/tpu/pricing (us-central /
# us-east regions, as listed in 2025; re-check before budgeting: prices differ by region and change).
PRICES_PER_CHIP_HOUR = {"v4": 3.22, "v5e": 1.20, "v5p": 4.20, "v6e": 2.70}
PRICES_AS_OF = "2025 list prices"


def slice_chips(slice_name: str) -> int:
    topology, _ = aot.resolve_topology(slice_name)
    return int(np.prod([int(n) for n in topology.split(":")[1].split("x")]))


def prediction(model: str, seq_len: int, rows_per_chip: int, slice_name: str) -> tuple[roofline.StepPrediction, int]:
    """(the roofline prediction of the row's step, tokens per step)."""
    chips = slice_chips(slice_name)
    config, lora = model_config(model)
    chip = roofline.ACCELERATORS[slice_name.split("-")[0]]
    tokens = rows_per_chip * chips * seq_len
    return roofline.predict_step(config, lora, chip, tokens, seq_len, chips, fsdp=chips), tokens


def dollars_per_million_tokens(step: roofline.StepPrediction, tokens: int, slice_name: str) -> float:
    hourly = PRICES_PER_CHIP_HOUR[slice_name.split("-")[0]] * slice_chips(slice_name)
    return hourly / 3600 * step.step_s / tokens * 1e6


def _row_cells(results: dict, model: str, seq_len: int, rows: int, slice_name: str) -> tuple[str, float | None]:
    """(the markdown row, its predicted $ per million tokens when it is compiled and fits)."""
    step, tokens = prediction(model, seq_len, rows, slice_name)
    dollars = dollars_per_million_tokens(step, tokens, slice_name)
    flops = compiler_flops(results, model, seq_len, rows)
    if flops is None:
        counted = "*not probed* | –"
    else:
        roofline.check_flops(flops, step.flops, row_key(model, seq_len, rows, slice_name))
        counted = f"{flops / 1e12:.2f} | {flops / step.flops - 1:+.1%}"
    flop_cells = f"{counted.split(' | ')[0]} | {step.flops / 1e12:.2f} | {counted.split(' | ')[1]}"
    predicted = (f"{step.step_s * 1e3:,.0f} | {step.bound} | {step.mfu:.0%} | {tokens / step.step_s:,.0f} | "
                 f"{dollars:.2f}")
    r = results.get(row_key(model, seq_len, rows, slice_name))
    head = f"| {model} | {seq_len} | {rows} | {slice_name} | {slice_chips(slice_name)} |"
    if r is None:
        return f"{head} – | *not compiled* | {flop_cells} | {predicted} |", None
    memory = f"{r['total_bytes'] / aot.GIB:.1f} of {r['hbm_bytes'] / aot.GIB:.0f}"
    if r["compiler_message"]:
        return f"{head} {memory} | **OOM** | {flop_cells} | {predicted} |", None
    fits = "yes" if r["fits"] else "**no**"
    return f"{head} {memory} | {fits} | {flop_cells} | {predicted} |", (dollars if r["fits"] else None)


def render(results: dict[str, dict]) -> str:
    lines = [
        "# Will it fit, how fast, at what cost? LLaMA LoRA training on TPU slices",
        "",
        "Generated by `tpu_scripts/gen_fit_table.py` (see docs/tpu.md); do not edit by hand. Each row is the",
        "real train step of the paper's recipe for the model (`configs/llama_{7b,13b,30b}_lora.py`: bf16 weights",
        "and compute, `remat_policy=full`, LoRA r=8 on q/k/v/o, AdamW) with one micro-batch, the whole slice as",
        "one `fsdp` mesh axis, compiled for the topology by libtpu's compiler on a CPU (`python -m llama_e_jax.aot`).",
        "",
        "* **memory**: per chip, arguments + outputs + temporaries + code from XLA's buffer assignment, against",
        "  the chip's HBM (GiB). *OOM*: the compiler refused; the figure is what it asked for.",
        "* **TFLOP compiler / analytic / Δ**: per chip and step, XLA's cost analysis of the step compiled without",
        "  loops (`aot.straight_line_cost`), beside the hand count (`llama_e_jax.roofline`: 6·N per token with",
        "  full remat and a frozen base, plus attention's T×T scores, plus LoRA). The generator refuses to write",
        "  the table when they differ by more than 10 %. The compiler's count is per chip and shape, the same on",
        "  every slice; *not probed*: its two small compiles are not done yet (`--reprobe`).",
        "* **step / bound / MFU / tokens/s / $ per M tokens**: predicted, for every row, compiled or not: the",
        "  largest of the compute roofline (FLOPs at the chip's peak × MaxText's published LLaMA-2 MFU on it),",
        "  the HBM roofline and the ICI roofline of the fsdp all-gathers (`roofline.predict_step`); MFU = FLOPs",
        "  / (step × peak), so it never exceeds MaxText's figure. Cost: on-demand list price × chips × step",
        f"  time per token ({PRICES_AS_OF}, see below).",
        "* **rows**: packed rows of `seq` tokens per chip in the micro-batch. Gradient accumulation multiplies the",
        "  step time, not the memory.",
        "",
        "| model | seq | rows / chip | slice | chips | memory / HBM (GiB) | fits | TFLOP compiler | TFLOP analytic "
        "| Δ | step (ms) | bound | MFU | tokens/s | $ / M tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cheapest: dict[str, tuple[float, str]] = {}
    for model in MODELS:
        for seq_len in SEQ_LENS:
            for rows in ROWS_PER_CHIP:
                for slice_name in SLICES:
                    line, dollars = _row_cells(results, model, seq_len, rows, slice_name)
                    lines.append(line)
                    if dollars is not None and dollars < cheapest.get(model, (float("inf"), ""))[0]:
                        cheapest[model] = (dollars, row_key(model, seq_len, rows, slice_name))
    computed = sum(row_key(*row) in results for row in rows_in_priority_order())
    lines += ["", f"{computed} of {len(rows_in_priority_order())} rows are compiled; "
              "`.venv-tpu/bin/python tpu_scripts/gen_fit_table.py` compiles the rest (it resumes, quickest slices "
              "first; 2-24 CPU-minutes a row).",
              f"{sum(compiler_flops(results, *shape) is not None for shape in row_shapes(''))} of "
              f"{len(row_shapes(''))} row shapes have the compiler's FLOP count; `--reprobe` computes the rest "
              "(two compiles of the 2- and 3-layer step per shape: several CPU-minutes for 7B, more for 13B and 30B).",
              "", "## Cheapest compiled slice that fits, per model", "",
              "| model | row | predicted tokens/s | $ / M tokens |", "|---|---|---|---|"]
    for model, (dollars, key) in cheapest.items():
        name, seq, rows, slice_name = key.split("/")
        step, tokens = prediction(name, int(seq[3:]), int(rows[1:]), slice_name)
        lines.append(f"| {model} | {key} | {tokens / step.step_s:,.0f} | {dollars:.2f} |")
    gpu, measured = roofline.calibrate_gpu()
    lines += ["", "## Calibration on a GPU", "",
              "The same method predicts the H200 step that `bench/train_gpu.py` measured (docs/benchmarks.md:",
              "LLaMA-2-7B shape, bf16, LoRA r=8, batch 8 × 512, remat `mlp_dots_saveable`):",
              "",
              "| | step (s) | bound | FLOPs (T) |", "|---|---|---|---|",
              f"| predicted (at {roofline.ACCELERATORS['h200'].mfu:.0%} of peak) | {gpu.step_s:.3f} | {gpu.bound} | "
              f"{gpu.flops / 1e12:.1f} |",
              f"| measured (2026-11-27) | {measured:.3f} | | |",
              "",
              f"The measured step runs at {gpu.flops / (measured * gpu.peak):.0%} of the H200's peak on the executed "
              f"FLOPs; the prediction is {gpu.step_s / measured - 1:+.0%} off. ",
              "",
              "Chip figures (per chip): " + "; ".join(
                  f"{c.name}: {c.peak_flops / 1e12:.0f} TFLOP/s bf16, {c.hbm_bandwidth / 1e9:.0f} GB/s HBM, "
                  f"ICI {c.ici_bandwidth / 1e9:.0f} GB/s, MFU {c.mfu:.1%}"
                  for name, c in roofline.ACCELERATORS.items() if name != "h200") + ". MFU: MaxText's published "
              "LLaMA-2 figures (github.com/AI-Hypercomputer/maxtext, getting_started/Run_Llama2.md: 70B on v4-128 "
              "57 %, v5p-128 65 %, v5e-256 57 %; docs/reference/models/tiering.md: 70B on v6e-256 43.8 %).",
              "", "Prices (US$ per chip-hour, on demand, cloud.google.com/tpu/pricing, " + PRICES_AS_OF + "): "
              + ", ".join(f"{k} {v:.2f}" for k, v in PRICES_PER_CHIP_HOUR.items()) + ".", ""]
    return "\n".join(lines)


def save(results: dict) -> None:
    JSON_PATH.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def row_shapes(only: str) -> list[tuple[str, int, int]]:
    """(model, seq, rows per chip) of every row matching `only`, cheapest compiles first."""
    shapes = {(model, seq_len, rows) for model, seq_len, rows, slice_name in rows_in_priority_order()
              if only in row_key(model, seq_len, rows, slice_name)}
    return sorted(shapes, key=lambda s: (list(MODELS).index(s[0]), s[1] * s[2]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only rows whose key contains this (e.g. 7b, v5e-16, seq512)")
    parser.add_argument("--force", action="store_true", help="recompute rows already in docs/tpu_fit.json")
    parser.add_argument("--render-only", action="store_true", help="rewrite the markdown from the JSON")
    parser.add_argument("--reprobe", action="store_true",
                        help="compile only the FLOP probes of every row shape (two small compiles each), then stop")
    args = parser.parse_args(argv)
    results = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else {}
    probe_cache = SavedProbes(results.setdefault("_probes_v2", {}))
    if args.reprobe:
        for model, seq_len, rows in row_shapes(args.only):
            started = time.perf_counter()
            reprobe(model, seq_len, rows, probe_cache)
            save(results)
            print(f"probes {model}/seq{seq_len}/x{rows}: {time.perf_counter() - started:.0f} s", flush=True)
            MD_PATH.write_text(render(results))
    for model, seq_len, rows, slice_name in ([] if args.render_only or args.reprobe else rows_in_priority_order()):
        key = row_key(model, seq_len, rows, slice_name)
        if args.only not in key or (key in results and not args.force):
            continue
        results[key] = run_row(model, seq_len, rows, slice_name, probe_cache)
        print(f"{key}: {'fits' if results[key]['fits'] else 'does not fit'} "
              f"({results[key]['total_bytes'] / aot.GIB:.1f} GiB, {results[key]['compile_s']} s)", flush=True)
        save(results)
        MD_PATH.write_text(render(results))
    MD_PATH.write_text(render(results))
    print(f"wrote {MD_PATH} ({sum(not k.startswith('_') for k in results)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
