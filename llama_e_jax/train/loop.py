"""`python -m llama_e_jax.train`: LoRA instruction tuning of a frozen LLaMA, resumable and preemptible.

    python -m llama_e_jax.train                                  # the embedded default (below)
    python -m llama_e_jax.train --config configs/llama2_7b_lora.py --config.model.path=/ckpt/llama-2-7b-hf
    python -m llama_e_jax.train --config configs/tiny.py --config.train.steps=20 --config.run_dir=/tmp/run

Configuration is data: a recipe file in `configs/` whose `get_config()` returns an ml_collections
`ConfigDict` (configs/default.py documents every field), then `--config.<section>.<field>=value`
overrides. An unknown key is an error that names it; the effective config is printed and saved as
`<run_dir>/config.json`.

With no arguments it trains the authors' LoRA recipe (r=8, alpha=16, dropout 0.05 on q/k/v/o) on
SmolLM2-135M-Instruct (the GGUF fetched by `llama_e_jax.io.default_model`) with the shipped seed
instructions (tfds `llama_e_instructions/seed`, train split), on a 2-core CPU in under 10 minutes,
printing validation loss before and after and a few generations.

Run directory (`config.run_dir`, default `runs/default/`):

    config.json       the effective config
    metrics.jsonl     one JSON object per train step / eval / sample (appended across resumes)
    tensorboard/      TensorBoard event files (`tensorboard --logdir runs/`)
    checkpoints/<n>/  orbax checkpoints: adapter, optimizer state, step, RNG, data position
    adapter/          the final adapter, our format (lora.save_adapter)
    peft_adapter/     the final adapter as HF PEFT files (when export.peft)
    merged_hf/        base + adapter merged, an HF checkpoint (when export.merged_hf)

Lifecycle. Starting a run in a directory that has checkpoints resumes from the newest readable one
(an unreadable newest one falls back to the previous, with a warning). SIGTERM — what a TPU VM
gets before preemption — lets the current step finish, writes a checkpoint and exits 0, so the
same command resumes later. A non-finite loss or gradient norm stops the run with exit status 1
and a message; nothing is saved after it, so the newest checkpoint is the last good state.
`train.time_limit_s` bounds a run's wall-clock time: past it, training stops after the current step,
checkpoints, and the run finishes as usual (evaluation, samples, export); rerunning continues.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from llama_e_jax.model import lora as lora_lib
from llama_e_jax.train import distributed
from llama_e_jax.model import sharding
from llama_e_jax.train.checkpoint import Checkpoints, expected_meta
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.io.default_model import enable_compilation_cache
from llama_e_jax.train.metrics_log import MetricsLogger, format_duration
from llama_e_jax.io.tokenizer import ByteTokenizer
from llama_e_jax.train.state import Trainer, TrainState, make_optimizer, perplexity

log = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = CONFIGS_DIR / "default.py"
MODEL_SOURCES = ("default", "gguf", "hf", "random")
DATA_SOURCES = ("tfds", "jsonl")


class ConfigError(ValueError):
    """A recipe or command-line override that cannot be used (the message names the key)."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the newest checkpoint is the last good state."""


# =========================================================================================== config


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """`get_config()` of a recipe file (a path, or a name in configs/ such as "tiny")."""
    path = Path(path)
    if not path.is_file() and (CONFIGS_DIR / path).is_file():
        path = CONFIGS_DIR / path
    if not path.is_file() and (CONFIGS_DIR / f"{path}.py").is_file():
        path = CONFIGS_DIR / f"{path}.py"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if p.stem != "__init__"))
        raise ConfigError(f"config file {path} not found (recipes in {CONFIGS_DIR}: {known})")
    if str(CONFIGS_DIR.parent) not in sys.path:
        sys.path.insert(0, str(CONFIGS_DIR.parent))  # recipes import `configs.default`
    spec = importlib.util.spec_from_file_location(f"_llama_e_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: a recipe must define get_config() -> ml_collections.ConfigDict")
    return module.get_config()


def _parse_value(key: str, raw: str, current: Any) -> Any:
    """The override string `raw` as the type of the field's current value."""
    try:
        if isinstance(current, bool):
            lowered = raw.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"expected true/false, got {raw!r}")
            return lowered in ("true", "1", "yes")
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, (tuple, list)):
            if raw.strip()[:1] in ("(", "["):
                return tuple(ast.literal_eval(raw))
            return tuple(item.strip() for item in raw.split(",") if item.strip())
        if isinstance(current, str):
            return raw
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError) as error:
        raise ConfigError(f"--config.{key}={raw}: cannot parse as {type(current).__name__} ({error})") from None


def set_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Applies one `--config.a.b=value`; an unknown key is an error naming it and the known ones."""
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        known = list(node.keys())
        if part not in known:
            where = ".".join(parts[:depth]) or "the config"
            close = difflib.get_close_matches(part, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}: {where} has no field {part!r} "
                              f"(known: {', '.join(sorted(known))}){hint}")
        if depth < len(parts) - 1:
            node = node[part]
            if not isinstance(node, ml_collections.ConfigDict):
                raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:depth + 1])} is a value, not a section")
    if isinstance(node[parts[-1]], ml_collections.ConfigDict):
        raise ConfigError(f"--config.{key}: is a section; set one of its fields ({', '.join(node[parts[-1]].keys())})")
    with node.unlocked():
        node[parts[-1]] = _parse_value(key, raw, node[parts[-1]])


def parse_args(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """`[--config FILE] [--config.a.b=value ...]` → the effective ConfigDict (validated)."""
    config_file: str | Path = DEFAULT_CONFIG
    overrides: list[tuple[str, str]] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        if arg == "--config" or arg.startswith("--config="):
            config_file = arg.split("=", 1)[1] if "=" in arg else _next_value(args, arg)
        elif arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            overrides.append((key, value if eq else _next_value(args, arg)))
        else:
            raise ConfigError(f"unexpected argument {arg!r}; use --config FILE and --config.<section>.<field>=value")
    config = load_config_file(config_file)
    for key, value in overrides:
        set_override(config, key, value)
    validate_config(config)
    return config


def _next_value(args: list[str], flag: str) -> str:
    if not args:
        raise ConfigError(f"{flag} needs a value")
    return args.pop(0)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks that are about meaning, not keys: choices, positive sizes, required paths."""
    problems = []
    if config.model.source not in MODEL_SOURCES:
        problems.append(f"model.source={config.model.source!r}: expected one of {MODEL_SOURCES}")
    if config.model.source in ("gguf", "hf") and not config.model.path:
        problems.append(f"model.path: required with model.source={config.model.source!r}")
    if config.model.source == "random" and not config.model.preset:
        problems.append("model.preset: required with model.source='random'")
    if config.data.source not in DATA_SOURCES:
        problems.append(f"data.source={config.data.source!r}: expected one of {DATA_SOURCES}")
    if config.data.source == "jsonl" and not config.data.files:
        problems.append("data.files: required with data.source='jsonl'")
    for key in ("train.batch_size", "train.grad_accum_steps", "train.eval_batch_size", "data.seq_len",
                "train.checkpoint_every", "train.keep_checkpoints"):
        section, field = key.split(".")
        if config[section][field] < 1:
            problems.append(f"{key}={config[section][field]}: must be >= 1")
    if config.train.steps <= 0 and config.train.epochs <= 0:
        problems.append("train.steps or train.epochs must be positive")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def lora_config_of(config: ml_collections.ConfigDict) -> lora_lib.LoraConfig:
    c = config.lora
    return lora_lib.LoraConfig(rank=c.rank, alpha=float(c.alpha), dropout=float(c.dropout), targets=tuple(c.targets))


# =========================================================================================== model


@dataclasses.dataclass
class LoadedModel:
    config: LlamaConfig
    params: Any  # base params (jax arrays, not yet on the mesh, or already sharded for "hf"); None once placed
    tokenizer: Any
    tokenizer_source: Any  # what save_hf_checkpoint copies the tokenizer from
    name: str  # for PEFT's base_model_name_or_path


def load_model(model_section: ml_collections.ConfigDict, mesh) -> LoadedModel:
    """Base params, model config and tokenizer from `config.model` (see configs/default.py)."""
    from llama_e_jax.io import weights

    dtype, source = model_section.param_dtype, model_section.source
    if source == "random":
        config = LlamaConfig.from_preset(model_section.preset, param_dtype=dtype)
        params, checkpoint, name = _random_params(config, seed=0), None, f"random:{model_section.preset}"
    elif source in ("default", "gguf"):
        from llama_e_jax.io.default_model import ensure_default_gguf

        checkpoint = ensure_default_gguf() if source == "default" else Path(model_section.path)
        config, params = weights.load_gguf(checkpoint, dtype=dtype)
        name = "HuggingFaceTB/SmolLM2-135M-Instruct" if source == "default" else str(checkpoint)
    else:
        checkpoint = Path(model_section.path)
        config = LlamaConfig.from_hf_dir(checkpoint, param_dtype=dtype)
        params, name = _load_hf_sharded(checkpoint, config, mesh), str(checkpoint)
    tokenizer, tokenizer_source = _load_tokenizer(model_section.tokenizer, checkpoint)
    config = config.replace(dtype=model_section.dtype, remat_policy=model_section.remat_policy)
    _check_preset(model_section.preset, config, source)
    return LoadedModel(config, params, tokenizer, tokenizer_source, name)


def _load_tokenizer(choice: str, checkpoint: Path | None) -> tuple[Any, Any]:
    """(tokenizer, what an HF export copies it from): `model.tokenizer`, else the checkpoint's own."""
    from llama_e_jax.io.tokenizer import load_tokenizer

    if choice == "bytes" or (not choice and checkpoint is None):
        return ByteTokenizer(), None
    source = choice or checkpoint
    tokenizer = load_tokenizer(source)
    return tokenizer, (tokenizer if str(source).endswith(".gguf") else Path(source))  # a GGUF has no files to copy


def _check_preset(preset: str, config: LlamaConfig, source: str) -> None:
    if not preset or source == "random":
        return
    differences = lora_lib.describe_differences(lora_lib.model_shape(LlamaConfig.from_preset(preset)),
                                                lora_lib.model_shape(config), labels=("preset", "checkpoint"))
    if differences:
        raise ConfigError(f"model.preset={preset!r} does not match the checkpoint: " + "; ".join(differences))


def _random_params(config: LlamaConfig, seed: int) -> Any:
    return _random_init(config)(jax.random.key(seed))


@functools.lru_cache(maxsize=4)
def _random_init(config: LlamaConfig) -> Callable[[jax.Array], Any]:
    """The jitted init of a random base model (cached: test runs build the same one many times)."""
    from llama_e_jax.model.llama import Llama

    return jax.jit(lambda rng: Llama(config).init(rng, np.zeros((1, 2), np.int32))["params"])


def _load_hf_sharded(path: Path, config: LlamaConfig, mesh) -> Any:
    """Each host reads only its devices' slices of the safetensors (no full copy on one host)."""
    from llama_e_jax.model.llama import Llama
    from llama_e_jax.io.weights import CheckpointReader

    abstract = jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), np.zeros((1, 2), np.int32))["params"])
    with CheckpointReader(path, config) as reader:
        return sharding.load_sharded(reader, abstract, mesh)


# ============================================================================================ data


def repo_path(path: str) -> str:
    """A relative path as given if it exists from the working directory, else from the repository root."""
    if Path(path).is_absolute() or Path(path).exists() or not (CONFIGS_DIR.parent / path).exists():
        return path
    return str(CONFIGS_DIR.parent / path)


@dataclasses.dataclass
class DataSplits:
    train: Any  # pipeline.TokenizedSplit
    eval: Any
    eval_records: list  # InstructionRecords of the eval split, in order (for sample generations)


def load_records(data_section: ml_collections.ConfigDict) -> dict[str, list]:
    """Records per split name, from the tfds dataset or straight from JSONL files."""
    from llama_e_jax.data import tfds_builder

    wanted = (data_section.train_split, data_section.eval_split)
    if data_section.source == "tfds":
        builder = tfds_builder.build_dataset(data_section.tfds_config, data_section.data_dir or None,
                                             extra_files=tuple(repo_path(f) for f in data_section.files))
        data_dir = builder.data_dir_root
        return {split: list(tfds_builder.load_split(split, data_section.tfds_config, data_dir)) for split in wanted}
    from llama_e_jax.data.schema import read_jsonl_files

    records, _ = read_jsonl_files(tfds_builder.expand_paths([repo_path(f) for f in data_section.files]))
    splits = tfds_builder.assign_splits(records)  # the same id-hash split as the tfds dataset
    return {split: splits[split] for split in wanted}


def load_data(data_section: ml_collections.ConfigDict, tokenizer: Any) -> DataSplits:
    from llama_e_jax.data import pipeline

    records = load_records(data_section)
    train_records, eval_records = records[data_section.train_split], records[data_section.eval_split]
    if not train_records or not eval_records:
        raise ConfigError(f"data: split {data_section.train_split!r} has {len(train_records)} records and "
                          f"{data_section.eval_split!r} has {len(eval_records)}; both must be non-empty")
    return DataSplits(
        train=pipeline.tokenize_split(train_records, tokenizer, data_section.seq_len),
        eval=pipeline.tokenize_split(eval_records, tokenizer, data_section.seq_len),
        eval_records=eval_records,
    )


def stacked_batches(iterator: Iterator[dict[str, np.ndarray]], accum: int) -> Iterator[dict[str, np.ndarray]]:
    """Groups `accum` consecutive [B, T] batches into one [B, A, T] batch (rows first; see train_state)."""
    while True:
        micro = [next(iterator) for _ in range(accum)]
        yield {name: np.stack([m[name] for m in micro], axis=1) for name in micro[0]}


# ============================================================================================ run


@dataclasses.dataclass
class TrainResult:
    """What a run did: why it stopped, where, and the numbers a caller checks."""

    status: str  # "completed", "preempted" (SIGTERM) or "time_limit" (train.time_limit_s; resumable)
    step: int
    run_dir: Path
    losses: dict[int, float]  # train loss per step run in this invocation
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    samples: list[dict[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Run:
    """Everything a training run holds besides the train state, built once by `prepare`."""

    config: ml_collections.ConfigDict
    model: LoadedModel
    lora_config: lora_lib.LoraConfig
    data: DataSplits
    trainer: Trainer
    base: Any  # the frozen base params, on the mesh
    checkpoints: Checkpoints
    train_iterator: Any  # pipeline.PackedBatchIterator: this host's rows
    total_steps: int
    data_shard: tuple[int, int]  # (index, count) of this host among the hosts feeding data
    started: float  # time.monotonic() at the start

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


class PreemptionFlag:
    """Set by SIGTERM; checked between steps so the step in flight finishes first."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "PreemptionFlag":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no preemption handling
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        log.warning("SIGTERM received: finishing this step, then checkpointing and exiting")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def total_steps_of(config: ml_collections.ConfigDict, train_split: Any, rows_per_step: int) -> int:
    """`train.steps`, or `train.epochs` worth of optimiser steps when steps is 0."""
    if config.train.steps > 0:
        return int(config.train.steps)
    from llama_e_jax.data.pipeline import epoch_order, pack_rows

    rows = len(pack_rows(epoch_order(len(train_split), config.data.shuffle_seed, 0, True),
                         train_split.lengths, train_split.seq_len))
    return max(1, math.ceil(config.train.epochs * rows / rows_per_step))


def prepare(config: ml_collections.ConfigDict) -> Run:
    """Loads model and data, builds the compiled steps and the checkpoint manager (no training yet)."""
    from llama_e_jax.data.pipeline import PipelineConfig, make_train_iterator

    started = time.monotonic()
    mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh))
    model = load_model(config.model, mesh)
    lora_config = lora_config_of(config)
    data = load_data(config.data, model.tokenizer)
    shard_index, num_shards = sharding.process_batch_shard(mesh)
    if config.train.batch_size % num_shards or config.train.eval_batch_size % num_shards:
        raise ConfigError(f"train.batch_size={config.train.batch_size} and train.eval_batch_size="
                          f"{config.train.eval_batch_size} must be multiples of the {num_shards} hosts feeding data")
    total_steps = total_steps_of(config, data.train, config.train.batch_size * config.train.grad_accum_steps)

    optimizer, schedule = make_optimizer(config.optim, total_steps)
    trainer = Trainer(model.config, lora_config, optimizer, schedule, mesh)
    base = trainer.place_base(model.params)
    model.params = None  # the run holds the placed copy
    meta = expected_meta(lora_lib.model_shape(model.config), lora_lib.lora_config_dict(lora_config),
                         trainer.abstract_state())
    checkpoints = Checkpoints(Path(config.run_dir) / "checkpoints", config.train.keep_checkpoints, meta)
    pipeline_config = PipelineConfig(seq_len=config.data.seq_len, batch_size=config.train.batch_size // num_shards,
                                     seed=config.data.shuffle_seed, shuffle=True, num_epochs=None)
    train_iterator = make_train_iterator(data.train, None, pipeline_config, process_index=shard_index,
                                         process_count=num_shards)
    return Run(config, model, lora_config, data, trainer, base, checkpoints, train_iterator, total_steps,
               (shard_index, num_shards), started)


def train(
    config: ml_collections.ConfigDict,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Runs (or resumes) the training described by `config`; see the module docstring.

    `on_step(step, metrics)` is called after each step (and its checkpoint); tests use it to
    interrupt a run. Raises NonFiniteLossError when the loss diverges.
    """
    validate_config(config)
    primary = jax.process_index() == 0
    if primary:
        print(f"effective config:\n{config}", file=sys.stderr, flush=True)
    run = prepare(config)
    if primary:  # saved once model and data loaded, so a mistyped path leaves no run directory behind
        _save_effective_config(config, run.run_dir)
    state = _initial_state(run)
    start_step = int(state.step)
    logger = MetricsLogger(run.run_dir, run.total_steps, start_step, config.train.log_every, enabled=primary)
    logger.message(_describe(run, state, start_step))
    result = TrainResult("completed", start_step, run.run_dir, {})
    try:
        result.eval_before = _run_eval(run, state.adapter, start_step, logger,
                                       "before training" if start_step == 0 else "at resume")
        with PreemptionFlag() as preemption:
            state = _train_loop(run, state, logger, preemption, result, on_step)
        if result.status != "preempted":
            result.eval_after = _run_eval(run, state.adapter, result.step, logger, "after training")
            result.samples = _sample_generations(run, state.adapter, logger, result.step)
            _export(run, state.adapter, logger, primary)
    finally:
        run.checkpoints.close()
        logger.close()
    return result


def _describe(run: Run, state: TrainState, start_step: int) -> str:
    c, lora_config = run.model.config, run.lora_config
    trainable = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state.adapter))
    return (f"model {run.model.name}: {c.num_params / 1e6:.1f}M params, {trainable / 1e6:.3f}M trainable "
            f"(LoRA r={lora_config.rank} on {', '.join(lora_config.targets)}); {len(run.data.train)} train / "
            f"{len(run.data.eval)} eval examples; steps {start_step}->{run.total_steps}; "
            f"ready in {format_duration(time.monotonic() - run.started)}")


def _save_effective_config(config: ml_collections.ConfigDict, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config.to_json(indent=2, sort_keys=True) + "\n")


def _initial_state(run: Run) -> TrainState:
    """The newest readable checkpoint (also restoring the data position), else a fresh state."""
    restored = run.checkpoints.restore_latest(run.trainer.abstract_state())
    if restored is not None:
        run.train_iterator.set_state(restored.data_state)
        log.info("resumed from %s at step %d", run.checkpoints.directory, restored.step)
        return restored.state
    trainer = run.trainer
    state = trainer.init(jax.random.PRNGKey(run.config.seed))
    if run.config.lora.init_from:
        adapter, _ = lora_lib.load_any_adapter(run.config.lora.init_from, run.model.config, expected=run.lora_config)
        adapter = jax.device_put(adapter, trainer.state_shardings.adapter)
        state = trainer.place_state(state.replace(adapter=adapter, opt_state=trainer.optimizer.init(adapter)))
    return state


def evaluate(run: Run, adapter: Any) -> dict[str, float]:
    """Mean response-token loss and perplexity over the eval split (or its first max_eval_batches)."""
    from llama_e_jax.data.pipeline import make_eval_iterator

    shard_index, num_shards = run.data_shard
    config = run.config.train
    iterator = make_eval_iterator(run.data.eval, None, seq_len=run.data.eval.seq_len,
                                  batch_size=config.eval_batch_size // num_shards,
                                  process_index=shard_index, process_count=num_shards)
    loss_sum, tokens = 0.0, 0.0
    for index, host_batch in enumerate(iterator):
        if config.max_eval_batches and index >= config.max_eval_batches:
            break
        batch_loss, batch_tokens = run.trainer.eval(adapter, run.base, run.trainer.place_batch(host_batch))
        loss_sum, tokens = loss_sum + float(batch_loss), tokens + float(batch_tokens)
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens}


def _run_eval(run: Run, adapter: Any, step: int, logger: MetricsLogger, label: str) -> dict[str, float]:
    metrics = evaluate(run, adapter)
    logger.eval(step, metrics, label)
    return metrics


def _train_loop(run: Run, state: TrainState, logger: MetricsLogger, preemption: PreemptionFlag,
                result: TrainResult, on_step) -> TrainState:
    """Steps until total_steps, SIGTERM or the time limit; checkpoints on schedule and whenever it stops."""
    config, total_steps, checkpoints = run.config.train, run.total_steps, run.checkpoints
    deadline = run.started + config.time_limit_s if config.time_limit_s > 0 else None
    batches = stacked_batches(run.train_iterator, config.grad_accum_steps)
    step = int(state.step)
    while step < total_steps:
        host_batch = next(batches)
        data_state = run.train_iterator.get_state()  # the position after this step's batches
        tick = time.perf_counter()
        state, device_metrics = run.trainer.step(state, run.base, run.trainer.place_batch(host_batch), step)
        metrics = _host_metrics(device_metrics)  # waits for the step
        step += 1
        _check_finite(step, metrics, checkpoints)
        logger.train_step(step, metrics, time.perf_counter() - tick)
        result.losses[step] = metrics["loss"]
        result.step = step
        if config.eval_every and step % config.eval_every == 0 and step < total_steps:
            _run_eval(run, state.adapter, step, logger, "")
        if run.config.samples.every_steps and step % run.config.samples.every_steps == 0 and step < total_steps:
            _sample_generations(run, state.adapter, logger, step)
        stopping = _stop_reason(step, total_steps, preemption, deadline)
        if step % config.checkpoint_every == 0 or step == total_steps or stopping:
            checkpoints.save(step, state, data_state)
        if on_step is not None:
            on_step(step, metrics)
        if stopping:
            checkpoints.wait_until_finished()
            logger.message(f"{stopping} after step {step} of {total_steps}: checkpoint written to "
                           f"{checkpoints.directory}; the same command resumes the remaining steps")
            result.status = "preempted" if preemption.requested else "time_limit"
            break
    return state


def _stop_reason(step: int, total_steps: int, preemption: PreemptionFlag, deadline: float | None) -> str | None:
    """Why to stop before total_steps, or None to go on."""
    if step >= total_steps:
        return None
    if preemption.requested:
        return "SIGTERM"
    if deadline is not None and time.monotonic() > deadline:
        return "train.time_limit_s reached"
    return None


def _host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {name: float(value) for name, value in jax.device_get(metrics).items()}


def _check_finite(step: int, metrics: dict[str, float], checkpoints: Checkpoints) -> None:
    bad = {k: metrics[k] for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])}
    if bad:
        last = checkpoints.latest_step
        raise NonFiniteLossError(
            f"step {step}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; training stopped. "
            f"The last good checkpoint is {'step ' + str(last) if last is not None else 'none (no checkpoint was written)'} "
            f"in {checkpoints.directory}. Lower optim.learning_rate, check the data, or raise optim.warmup_steps."
        )


# ===================================================================================== end of run


def _sample_generations(run: Run, adapter: Any, logger: MetricsLogger, step: int) -> list[dict[str, str]]:
    """Greedy generations for a fixed set of eval prompts, printed next to the references.

    The set: the first `samples.count` eval records whose prompt plus `samples.max_new_tokens` fits the
    longest context the model has worked with (its own, or data.seq_len if training used more).
    """
    if run.config.samples.count <= 0:
        return []
    from llama_e_jax.data.prompt import build_prompt

    max_new = run.config.samples.max_new_tokens
    context = max(run.model.config.max_position_embeddings, run.config.data.seq_len)
    tokenizer = run.model.tokenizer
    records, prompts = [], []
    for record in run.data.eval_records:
        prompt = build_prompt(record.instruction, record.input)
        if len(tokenizer.encode(prompt)) + 1 + max_new <= context and len(records) < run.config.samples.count:
            records.append(record)
            prompts.append(prompt)
    if not records:
        logger.message(f"samples: no eval prompt fits {context} tokens with {max_new} new tokens; none generated")
        return []
    outputs = generate_texts(run.model, run.lora_config, run.base, adapter, prompts, max_new, context)
    samples = []
    for record, output in zip(records, outputs):
        samples.append({"id": record.id, "task": record.task, "instruction": record.instruction,
                        "input": record.input, "reference": record.output, "generated": output})
        logger.text(step, f"sample/{record.id}", output)
        logger.message(f"--- sample {record.id} ({record.task}) at step {step}\n"
                       f"instruction: {record.instruction}\n"
                       + (f"input: {record.input}\n" if record.input.strip() else "")
                       + f"reference: {record.output}\ngenerated: {output}")
    return samples


def generate_texts(model: LoadedModel, lora_config, base, adapter, prompts: list[str], max_new_tokens: int,
                   context: int) -> list[str]:
    """Greedy continuations of `prompts` with the adapted model (generate.py's KV-cache decoding).

    Layers are scanned rather than unrolled: a few samples do not repay the longer compile.
    """
    from llama_e_jax.generate.engine import Generator

    generator = Generator(model.config, base, model.tokenizer, adapter=adapter, lora_config=lora_config,
                          max_batch_size=len(prompts), max_length=context, layer_loop="scan")
    return [completion.text for completion in generator.generate(prompts, max_new_tokens=max_new_tokens)]


def _export(run: Run, adapter: Any, logger: MetricsLogger, primary: bool) -> None:
    """The final adapter (always), as PEFT files and as a merged HF checkpoint (when configured).

    Every host takes part in gathering the adapter; only the primary one writes.
    """
    model, lora_config, run_dir = run.model, run.lora_config, run.run_dir
    host_adapter = _gather(adapter)
    if not primary:
        return
    paths = [lora_lib.save_adapter(run_dir / "adapter", host_adapter, lora_config, model.config)]
    if run.config.export.peft:
        paths.append(lora_lib.export_peft(run_dir / "peft_adapter", host_adapter, lora_config, model.config,
                                          base_model_name_or_path=model.name))
    if run.config.export.merged_hf:
        paths.append(_export_merged(run, adapter))
    logger.message("exported: " + ", ".join(str(p) for p in paths))


def _export_merged(run: Run, adapter: Any) -> Path:
    """Base + adapter merged on the mesh (donating the base: this is the run's last use of it), then
    written tensor by tensor, so the host never holds a second copy of the model."""
    from llama_e_jax.io.weights import save_hf_checkpoint

    if jax.process_count() > 1:
        raise ConfigError("export.merged_hf is written from one host; on a multi-host run export the adapter "
                          "and merge it on one machine (lora.merge + weights.save_hf_checkpoint)")
    merged = lora_lib.merge(run.base, adapter, run.lora_config, donate_base=True)
    run.base = None
    return save_hf_checkpoint(merged, run.model.config, run.run_dir / "merged_hf",
                              tokenizer_dir=run.model.tokenizer_source)


def _gather(tree: Any) -> Any:
    """A fully replicated host copy of a (possibly multi-host sharded) tree."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


# ============================================================================================ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 completed or preempted (checkpoint written), 1 diverged, 2 bad config/input."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    enable_compilation_cache(min_compile_time_s=0.2)  # small steps too: a resume should not recompile
    distributed.initialize()  # joins a multi-host job when the environment describes one; else nothing
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
        result = train(config)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except _user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _print_summary(result)
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by the config or the input files: reported as one message, no traceback."""
    from llama_e_jax.train import checkpoint
    from llama_e_jax.model import config
    from llama_e_jax.io import default_model
    from llama_e_jax.io import weights
    from llama_e_jax.data.schema import InvalidRecordsError

    return (ConfigError, config.ConfigError, lora_lib.AdapterError, checkpoint.CheckpointMismatchError,
            checkpoint.NoRestorableCheckpointError, weights.CheckpointError, InvalidRecordsError,
            sharding.ShardingError, default_model.DefaultModelError, FileNotFoundError)


def _print_summary(result: TrainResult) -> None:
    if result.status == "preempted":
        print(f"stopped by SIGTERM after step {result.step}; checkpoint in {result.run_dir / 'checkpoints'}")
        return
    if result.status == "time_limit":
        print(f"stopped at the time limit after step {result.step}; the same command trains the remaining steps")
    before, after = result.eval_before, result.eval_after
    if before and after:
        print(f"validation loss: {before['loss']:.4f} -> {after['loss']:.4f} "
              f"(perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f})")
    print(f"run directory: {result.run_dir} (adapter/, peft_adapter/, checkpoints/, metrics.jsonl, tensorboard/)")


if __name__ == "__main__":
    sys.exit(main())
