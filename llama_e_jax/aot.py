"""`python -m llama_e_jax.aot`: will this training config fit on that TPU slice, and how fast could it be?

    python -m llama_e_jax.aot --config configs/default.py --topology v5e:2x4
    python -m llama_e_jax.aot --config configs/llama_30b_lora.py --topology v5e-16 --decode \\
        --config.data.seq_len=2048 --config.train.batch_size=16

Any `--config` recipe and `--config.*` override of `python -m llama_e_jax.train` works; the model
shape comes from `model.preset` (no weights are read, so `model.path` may be left empty).

Renting a pod to find out that a 30B LoRA run needs 17 GiB per 16 GiB chip is expensive. XLA can
compile for a TPU it does not have: `jax.experimental.topologies` describes a named slice (libtpu
from PyPI provides the compiler), and `jit(...).lower(<abstract, sharded args>).compile()` runs the
real TPU compiler — the same partitioning, fusion and buffer assignment a TPU VM would do — on this
CPU. No array is ever allocated, so a 30B model costs nothing but compile time. From the compiled
executable we read, per device:

* memory (`memory_analysis`): arguments (base params, train state, batch), outputs that are not
  donated in place, temporaries (activations, gradients, collectives' buffers) and code; their sum
  against the chip's HBM decides "fits". When it does not fit, the TPU compiler refuses and says by
  how much; we report that instead of failing.
* cost (`cost_analysis`): FLOPs and HBM bytes the step executes on one device. XLA counts a loop
  body once, and the compiled step holds several loops, so the count comes from two loop-free
  compiles of the same step with 2 and 3 layers unrolled (`straight_line_cost`), beside the hand
  count of llama_e_jax.roofline. The FLOPs at the chip's peak bf16 rate give the implied step time,
  a lower bound (roofline.predict_step adds MFU, HBM and ICI); the bytes at full HBM bandwidth are
  shown beside it as a hint of memory-boundness (XLA's byte count is generous).

Compiling a 7B-30B step takes a few minutes of one CPU core (the probes add two small compiles).

The step compiled is the real one: train.state.Trainer's jitted step (`Trainer.lower_step`) with the
recipe's model, LoRA, optimizer, gradient accumulation, mesh, the sharding rules of sharding.py and
the model's activation constraints — not a model of it. `--decode` also compiles the real decode
step: generate.decode_chunk for one token per row, on the Generator's unrolled layers and its
sharded KV cache (adapter merged, the server's sampler, stop checks included).

libtpu pins jax exactly, so this runs from its own environment (see docs/tpu.md):

    python3.11 -m venv .venv-tpu && .venv-tpu/bin/pip install -e '.[tpu]'
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_e_jax.generate import kernels, sampling
from llama_e_jax.io.load import ModelLoadError, abstract_params, load_config
from llama_e_jax import roofline
from llama_e_jax.model import sharding
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.train import recipe
from llama_e_jax.train.state import Trainer, make_optimizer

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Public per-chip figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm, per version page)."""

    name: str
    hbm_bytes: int
    bf16_flops: float  # peak dense bf16 matmul FLOP/s
    hbm_bandwidth: float  # bytes/s


CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1228e9),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2765e9),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 1640e9),
}
# Cloud accelerator names → topology names. v4/v5p names count TensorCores (2 per chip), v5e/v6e chips.
NAMED_SLICES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4",
    "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8", "v5e-64": "v5e:8x8",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4",
    "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4",
}


class FitError(ValueError):
    """A topology or config the fit check cannot handle (the message says which and why)."""


@dataclasses.dataclass
class StepReport:
    """What the compiler says about one step on one device of the slice (bytes, FLOPs, seconds)."""

    step: str  # "train" or "decode"
    topology: str
    chips: int
    mesh: dict[str, int]
    hbm_bytes: int
    fits: bool
    total_bytes: int  # arguments + non-aliased outputs + temporaries + code (or the compiler's OOM figure)
    argument_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    compute_time_s: float = 0.0  # flops / peak FLOP/s
    memory_time_s: float = 0.0  # bytes accessed / HBM bandwidth
    tokens: int = 0  # tokens processed per step (whole slice)
    compiler_message: str = ""  # the TPU compiler's out-of-memory message when it does not fit
    analytic_flops: float = 0.0  # the hand count of the same step per device (roofline.train_flops; train only)

    @property
    def step_time_s(self) -> float:
        """The implied step time: the compiler's FLOPs at the chip's peak (a lower bound).

        `memory_time_s` (XLA's count of HBM bytes at full bandwidth) is reported beside it, not
        folded in: XLA counts every fused op's operands as HBM traffic, an over-estimate on TPU.
        """
        return self.compute_time_s

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "step_time_s": self.step_time_s}


# ----------------------------------------------------------------------------- topology


def resolve_topology(name: str) -> tuple[str, Chip]:
    """'v5e-8' or 'v5e:2x4' → ('v5e:2x4', the v5e chip)."""
    topology = NAMED_SLICES.get(name, name)
    version = topology.split(":", 1)[0]
    if ":" not in topology or version not in CHIPS:
        raise FitError(f"--topology {name!r}: expected <version>:<shape> with version in {sorted(CHIPS)} "
                       f"(e.g. v5e:2x4) or a slice name in {sorted(NAMED_SLICES)}")
    return topology, CHIPS[version]


def use_cpu_host() -> None:
    """This is a CPU-side tool: keep JAX off any local TPU and stop libtpu probing for TPU hosts.

    Only compiles, so several fit checks (or one next to a training run) may load libtpu at once.
    Effective before JAX starts its backends (the CLI calls it first thing)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(topology: str) -> list[Any]:
    """Abstract TPU devices of a named topology (needs libtpu; no TPU required)."""
    from jax.experimental import topologies

    use_cpu_host()
    # v4 chips have two TensorCores; JAX on a v4 VM drives them as one "megacore" device per chip.
    options = {"chip_config_name": "megacore"} if topology.startswith("v4:") else {}
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu", **options).devices)
    except Exception as error:  # libtpu missing, or a shape libtpu does not know
        raise FitError(f"topology {topology!r}: cannot describe it ({type(error).__name__}: {error}); "
                       "is libtpu installed? (pip install -e '.[tpu]' in a separate venv)") from error


# ----------------------------------------------------------------------------- the model of a recipe


def model_config_of(config: Any) -> LlamaConfig:
    """The model shapes and dtypes a recipe trains, without loading any weights."""
    model = config.model
    # the recipe's preset names the shape (training checks the checkpoint against it); else the loader's
    # config of what the recipe names, read from metadata only
    source = model.preset or recipe.model_argument(model)
    return load_config(source, dtype=model.dtype, param_dtype=model.param_dtype).replace(
        remat_policy=model.remat_policy)


def parse_recipe(recipe_args: Sequence[str]) -> Any:
    """The training config, as `python -m llama_e_jax.train` would parse it.

    A recipe for real weights (model.source hf/gguf) needs model.path to train, but the fit check
    reads no weights — only the shape its model.preset names — so a missing path is not an error here.
    """
    try:
        return recipe.parse_config(recipe_args)
    except recipe.ConfigError as error:
        if "model.path: required" not in str(error):
            raise
        return recipe.parse_config([*recipe_args, "--config.model.source=random"])


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), tree, shardings)


def abstract_base(model_config: LlamaConfig, mesh: jax.sharding.Mesh) -> Any:
    """ShapeDtypeStructs of the base params, sharded as the rules say."""
    shapes = abstract_params(model_config)
    return _with_shardings(shapes, sharding.param_shardings(shapes, mesh))


def _abstract_batch(mesh, rows: int, micro_batches: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    batch_sharding = sharding.batch_sharding(mesh)
    dtypes = {"input_ids": jnp.int32, "targets": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32,
              "loss_mask": jnp.float32}
    return {name: jax.ShapeDtypeStruct((rows, micro_batches, seq_len), dtype, sharding=batch_sharding)
            for name, dtype in dtypes.items()}


# ----------------------------------------------------------------------------- compiling


def compile_train_step(config: Any, model_config: LlamaConfig, mesh: jax.sharding.Mesh):
    """The recipe's real train step (train.state.Trainer's jitted step), lowered on abstract sharded
    arguments and compiled for `mesh`."""
    optimizer, schedule = make_optimizer(config.optim, max(int(config.train.steps), 1))
    trainer = Trainer(model_config, recipe.lora_config_of(config), optimizer, schedule, mesh)
    batch = _abstract_batch(mesh, config.train.batch_size, config.train.grad_accum_steps, config.data.seq_len)
    learning_rate = jax.ShapeDtypeStruct((), jnp.float32)
    lowered = trainer.lower_step(trainer.abstract_state(), abstract_base(model_config, mesh), batch, learning_rate)
    return lowered.compile()


def unrolled_layers(base: Any) -> Any:
    """Abstract base params as generate.Generator decodes them (its default layer_loop="unroll",
    llama.split_layers): the stacked [L, ...] layers as L per-layer trees `layers/0`, ..., each leaf
    keeping its sharding minus the layer axis."""

    def layer_leaf(leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        per_layer = jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec(*leaf.sharding.spec[1:]))
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=per_layer)

    num_layers = jax.tree.leaves(base["layers"])[0].shape[0]
    layer = jax.tree.map(layer_leaf, base["layers"])
    return {**{name: tree for name, tree in base.items() if name != "layers"},
            "layers": {str(i): layer for i in range(num_layers)}}


def abstract_decode_state(model_config: LlamaConfig, weights: Any, batch_size: int, max_length: int) -> Any:
    """kernels.new_state for B rows of S cache slots, as sharded ShapeDtypeStructs.

    new_state places the cache itself (by the cache rule, on the weights' mesh); compiling it — a
    program of zeros, cheap — reads that placement back without allocating anything. The sampler
    is the server's (per-row top-p and temperature: the costliest sampling, a sort over the vocab).
    """
    make = jax.jit(lambda: kernels.new_state(model_config, weights, batch_size, max_length,
                                               sampling.TopP(p=1.0, temperature=0.0), model_config.eos_token_ids))
    shapes = jax.eval_shape(make)
    return _with_shardings(shapes, make.lower().compile().output_shardings)


def compile_decode_step(model_config: LlamaConfig, mesh: jax.sharding.Mesh, batch_size: int, max_length: int):
    """The decode step generate.Generator runs: `kernels.decode_chunk` for one token per row (B rows,
    caches of `max_length` slots, sampling and stop checks included); the adapter is merged, so no LoRA."""
    weights = unrolled_layers(abstract_base(model_config, mesh))
    state = abstract_decode_state(model_config, weights, batch_size, max_length)
    return kernels.decode_chunk.lower(model_config, weights, state, 1).compile()


# The TPU compiler's out-of-memory messages, e.g. "Used 20.50G of 15.75G hbm" or "the total memory
# required for HLO temporaries (1.09T) exceeds available HBM (15.75G)".
_OOM_PATTERNS = (
    re.compile(r"Used ([\d.]+)([KMGT]?)i?B? of [\d.]+[KMGT]?i?B? hbm", re.IGNORECASE),
    re.compile(r"required for [\w ]+ \(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM", re.IGNORECASE),
)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_oom(message: str) -> int | None:
    """Bytes the compiler wanted (at least), from its out-of-memory message; None if it is not one."""
    for pattern in _OOM_PATTERNS:
        match = pattern.search(message)
        if match:
            return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    return None


def memory_fields(compiled: Any, chip: Chip) -> dict[str, Any]:
    """Per-device memory of a compiled step, from XLA's buffer assignment."""
    memory = compiled.memory_analysis()
    outputs = max(memory.output_size_in_bytes - memory.alias_size_in_bytes, 0)  # donated outputs reuse inputs
    total = memory.argument_size_in_bytes + outputs + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes
    return dict(fits=total <= chip.hbm_bytes, total_bytes=int(total), argument_bytes=int(memory.argument_size_in_bytes),
                output_bytes=int(outputs), temp_bytes=int(memory.temp_size_in_bytes),
                code_bytes=int(memory.generated_code_size_in_bytes))


def _cost(compiled: Any) -> np.ndarray:  # [flops, bytes accessed] per device
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return np.array([float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))])


@contextlib.contextmanager
def _layers_unrolled():
    """Traces model.py's layer `nn.scan` fully unrolled (straight-line HLO), for the cost probes only.

    `unroll=True`, not `unroll=length`: the latter may keep a one-trip `while` around the copies.
    JAX's tracing caches are cleared on the way in and out: they are keyed by function and argument
    shapes, not by this patch, so a scanned trace of the same shapes could otherwise be reused.
    """
    original = nn.scan

    def unrolled_scan(target, *args, length=None, **kwargs):
        kwargs.pop("unroll", None)
        return original(target, *args, length=length, unroll=True, **kwargs)

    jax.clear_caches()
    nn.scan = unrolled_scan
    try:
        yield
    finally:
        nn.scan = original
        jax.clear_caches()


def straight_line_cost(compile_for: Any, model_config: LlamaConfig) -> np.ndarray:
    """[flops, bytes accessed] per device of the whole step, from two loop-free compiles.

    XLA's cost analysis counts a `while` body once whatever its trip count, and the compiled step has
    more loops than the layer scan (its backward, and for larger shapes loops XLA adds itself), so
    the real executable's count cannot be corrected by one factor (issue 18: rows above 512 tokens
    per chip came out ≈ 3x low). Instead the step is compiled with 2 and 3 layers fully unrolled and
    the recipe's own remat policy; both must be loop-free (checked), so XLA counts every op, and
    C(L) = C(2) + (L - 2)·(C(3) - C(2)). Not 1 and 2 layers: in straight-line code XLA merges the
    last layer's recomputation with its forward, which makes a 1-layer step a different program
    (the increment 1 -> 2 is not a layer); from 2 layers on, each added layer adds the same ops, and
    the count is low by that one merged recomputation only (≈ 1 % at 32 layers with full remat).
    Per-device work does not depend on the number of chips, so callers cache this by (model, rows
    per shard, length, tensor size).
    """
    def probe(layers: int) -> np.ndarray:
        compiled = compile_for(model_config.replace(num_layers=layers))
        if " while(" in compiled.as_text():  # a loop left in would be counted once again
            raise FitError(f"cost probe with {layers} unrolled layers still has a while loop (gradient "
                           "accumulation, or one XLA added); its FLOPs would be undercounted")
        return _cost(compiled)

    with _layers_unrolled():
        two, three = probe(2), probe(3)
    return two + (model_config.num_layers - 2) * (three - two)


def check(config: Any, topology_name: str, decode: bool = False, decode_batch: int = 8,
          decode_length: int | None = None, probe_cache: dict | None = None) -> list[StepReport]:
    """Compiles the recipe's train step (and a decode step) for a TPU topology; one report per step.

    `probe_cache` (optional, shared across calls) reuses the cost probes of `straight_line_cost`
    between topologies with the same per-device work (model, rows per batch shard, sequence length,
    tensor size): FLOPs and bytes of the same per-device program do not depend on how many chips
    there are. The fit-table generator keeps it in its JSON.
    """
    topology, chip = resolve_topology(topology_name)
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh), devices)
    sharding.check_batch_size(config.train.batch_size, mesh, "train.batch_size")
    if decode:
        sharding.check_batch_size(decode_batch, mesh, "--decode-batch")
    model_config = model_config_of(config)
    probe_cache = {} if probe_cache is None else probe_cache
    common = dict(topology=topology, chips=len(devices), mesh=dict(mesh.shape), hbm_bytes=chip.hbm_bytes)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    single_micro = config.copy_and_resolve_references()
    with single_micro.unlocked():
        single_micro.train.grad_accum_steps = 1
    accum, seq_len = config.train.grad_accum_steps, config.data.seq_len
    steps = [StepJob("train", lambda c: compile_train_step(config, c, mesh),
                     lambda c: compile_train_step(single_micro, c, mesh), accum,
                     config.train.batch_size * accum * seq_len, (config.train.batch_size // batch_shards, seq_len))]
    if decode:
        length = decode_length or seq_len
        decode_for = lambda c: compile_decode_step(c, mesh, decode_batch, length)
        steps.append(StepJob("decode", decode_for, None, 1, decode_batch, (decode_batch // batch_shards, length),
                             layer_scan=False))
    analytic = {"train": roofline.train_flops(model_config, recipe.lora_config_of(config), steps[0].tokens, seq_len,
                                              len(devices))}
    reports = []
    for job in steps:
        try:
            compiled = job.compile_real(model_config)
        except Exception as error:  # the TPU compiler's out-of-memory is an answer, not a crash
            wanted = parse_oom(str(error))
            if wanted is None:
                raise
            reports.append(StepReport(step=job.step, tokens=job.tokens, **common, fits=False, total_bytes=wanted,
                                      compiler_message=_first_line(str(error), "HBM"),
                                      analytic_flops=analytic.get(job.step, 0.0)))
            continue
        key = (job.step, model_config, job.per_device_shape, mesh.shape["tensor"])
        if job.layer_scan:  # one micro-batch, counted loop-free, times the accumulation steps
            if key not in probe_cache:
                probe_cache[key] = straight_line_cost(job.compile_probe, model_config)
            flops, accessed = probe_cache[key] * job.repeats
        else:  # layers unrolled: XLA counts every one (a decode chunk of one step runs its loop once)
            flops, accessed = _cost(compiled) * job.repeats
        reports.append(StepReport(step=job.step, tokens=job.tokens, **common, **memory_fields(compiled, chip),
                                  flops=float(flops), bytes_accessed=float(accessed),
                                  analytic_flops=analytic.get(job.step, 0.0),
                                  compute_time_s=flops / chip.bf16_flops, memory_time_s=accessed / chip.hbm_bandwidth))
    return reports


@dataclasses.dataclass(frozen=True)
class StepJob:
    """One step to compile: the real executable, the probe variant (one micro-batch), and its size."""

    step: str
    compile_real: Any  # LlamaConfig -> compiled executable
    compile_probe: Any  # LlamaConfig -> compiled executable (only with layer_scan)
    repeats: int  # gradient-accumulation micro-batches
    tokens: int  # tokens per step, whole slice
    per_device_shape: tuple[int, int]  # (rows per batch shard, sequence/cache length)
    layer_scan: bool = True  # layers in a scan, whose body XLA counts once (see straight_line_cost)


def _first_line(message: str, containing: str) -> str:
    lines = message.splitlines()
    return next((line.strip() for line in lines if containing.lower() in line.lower()), lines[0] if lines else "")


# ----------------------------------------------------------------------------- CLI


def _size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def format_report(report: StepReport) -> str:
    gib = _size
    mesh = " ".join(f"{axis}={size}" for axis, size in report.mesh.items())
    lines = [f"{report.step} step on {report.topology} ({report.chips} chips, mesh {mesh}), per device:"]
    if report.compiler_message:
        lines.append(f"  DOES NOT FIT: needs at least {gib(report.total_bytes)} of {gib(report.hbm_bytes)} HBM")
        lines.append(f"  compiler: {report.compiler_message}")
        return "\n".join(lines)
    lines += [
        f"  memory   arguments {gib(report.argument_bytes)} + outputs {gib(report.output_bytes)} + "
        f"temporaries {gib(report.temp_bytes)} + code {gib(report.code_bytes)}",
        f"           = {gib(report.total_bytes)} of {gib(report.hbm_bytes)} HBM -> "
        f"{'fits' if report.fits else 'DOES NOT FIT'} ({100 * report.total_bytes / report.hbm_bytes:.0f}%)",
        f"  compute  {report.flops / 1e12:.4g} TFLOP"
        + (f" (hand count {report.analytic_flops / 1e12:.4g})" if report.analytic_flops else "")
        + f", {gib(report.bytes_accessed)} HBM traffic per step",
        f"  time     >= {_duration(report.step_time_s)}/step at peak FLOP/s "
        f"(<= {report.tokens / max(report.step_time_s, 1e-12):,.0f} tokens/s); "
        f"HBM traffic at full bandwidth {_duration(report.memory_time_s)}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama_e_jax.aot",
        description="AOT-compile a training recipe for a TPU topology on this CPU and report memory and FLOPs. "
                    "Other arguments (--config FILE, --config.a.b=value) select the recipe as for llama_e_jax.train.",
    )
    parser.add_argument("--topology", required=True, help="e.g. v5e:2x4, v4:2x2x1, or a slice name like v5e-16")
    parser.add_argument("--decode", action="store_true", help="also compile one KV-cache decode step")
    parser.add_argument("--decode-batch", type=int, default=8, help="rows decoded together")
    parser.add_argument("--decode-length", type=int, default=None, help="cache length (default: data.seq_len)")
    parser.add_argument("--json", default=None, help="also write the reports to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    use_cpu_host()
    args, recipe_args = build_parser().parse_known_args(argv)
    try:
        config = parse_recipe(recipe_args)
        reports = check(config, args.topology, args.decode, args.decode_batch, args.decode_length)
    except (FitError, recipe.ConfigError, ModelLoadError, sharding.ShardingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for report in reports:
        print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_json() for r in reports], f, indent=2)
    return 0 if all(r.fits for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
