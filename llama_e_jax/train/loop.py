"""The training loop behind `python -m llama_e_jax.train`: LoRA instruction tuning of a frozen LLaMA, resumable and preemptible.

    python -m llama_e_jax.train                                  # the embedded default (below)
    python -m llama_e_jax.train --config configs/llama2_7b_lora.py --config.model.path=/ckpt/llama-2-7b-hf
    python -m llama_e_jax.train --config configs/tiny.py --config.train.steps=20 --config.run_dir=/tmp/run

Configuration is data: a recipe file in `configs/` whose `get_config()` returns an ml_collections
`ConfigDict` (configs/default.py documents every field), then `--config.<section>.<field>=value`
overrides, parsed by `train/recipe.py` (the command line itself is `train/__main__.py`). An unknown
key is an error that names it; the effective config is printed and saved as `<run_dir>/config.json`.

Modules: recipe.py (config), data.py (records → tokenized splits), state.py (the compiled steps),
checkpoint.py, export.py (adapter, PEFT, merged files); this one runs them in order. The model comes
from the one loader, `llama_e_jax.io.load.load_model`.

With no arguments it trains the authors' LoRA recipe (r=8, alpha=16, dropout 0.05 on q/k/v/o) on
SmolLM2-135M-Instruct (the GGUF fetched by `llama_e_jax.io.default_model`) with the shipped seed
instructions (tfds `llama_e_instructions/seed`, train split), on a 2-core CPU in under 10 minutes,
printing validation loss before and after and a few generations.

Run directory (`config.run_dir`, default `runs/default/`, relative to the working directory, or a
gs:// URL: checkpoints go to the bucket, the other files are mirrored there, see train/storage.py):

    config.json       the effective config
    metrics.jsonl     one JSON object per train step / eval / sample (appended across resumes)
    tensorboard/      TensorBoard event files (`tensorboard --logdir runs/`)
    checkpoints/<n>/  orbax checkpoints: adapter, optimizer state, step, RNG, data position
    adapter/          the final adapter, our format (io/adapters.save_adapter)
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

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from llama_e_jax import metrics as metrics_lib
from llama_e_jax.data import schema
from llama_e_jax.data.pipeline import PipelineConfig, make_eval_iterator, make_train_iterator
from llama_e_jax.data.prompt import build_prompt
from llama_e_jax.generate.generator import Generator
from llama_e_jax.io import default_model, weights
from llama_e_jax.io.adapters import load_any_adapter
from llama_e_jax.io.load import DEFAULT_MODEL_NAME, LoadedModel, ModelLoadError, load_model
from llama_e_jax.model import config as model_config_lib
from llama_e_jax.model import lora as lora_lib
from llama_e_jax.model import sharding
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.train import checkpoint, distributed, export, profiling
from llama_e_jax.train import preemption as preemption_lib
from llama_e_jax.train.checkpoint import Checkpoints, expected_meta
from llama_e_jax.train.data import DataSplits, load_data, stacked_batches, total_steps_of
from llama_e_jax.train.metrics_log import MetricsLogger, format_duration
from llama_e_jax.train.preemption import PreemptionFlag
from llama_e_jax.train.storage import RunDir, check_durable, localize
from llama_e_jax.train.recipe import ConfigError, lora_config_of, model_argument, validate_config
from llama_e_jax.train.state import Trainer, TrainState, make_optimizer

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the newest checkpoint is the last good state."""


# =========================================================================================== model


def load_base(model_section: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> LoadedModel:
    """`config.model` through the one loader, on `mesh`, with the recipe's dtypes and remat policy.

    A `model.preset` next to a checkpoint is checked against it (a recipe sized for one model must
    not silently train another).
    """
    # gs:// model and tokenizer paths are fetched to a local cache first (storage.localize)
    loaded = load_model(localize(model_argument(model_section)), tokenizer=localize(model_section.tokenizer) or None,
                        dtype=model_section.dtype, param_dtype=model_section.param_dtype, mesh=mesh)
    _check_preset(model_section.preset, loaded.config, model_section.source)
    return dataclasses.replace(loaded, config=loaded.config.replace(remat_policy=model_section.remat_policy))


def _check_preset(preset: str, config: LlamaConfig, source: str) -> None:
    if not preset or source == "random":
        return
    differences = lora_lib.describe_differences(lora_lib.model_shape(LlamaConfig.from_preset(preset)),
                                                lora_lib.model_shape(config), labels=("preset", "checkpoint"))
    if differences:
        raise ConfigError(f"model.preset={preset!r} does not match the checkpoint: " + "; ".join(differences))


def peft_base_name(model_section: ml_collections.ConfigDict) -> str:
    """PEFT's `base_model_name_or_path`: the hub name of the embedded default, else what the recipe names."""
    return model_argument(model_section) or DEFAULT_MODEL_NAME


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
    model: LoadedModel  # config, tokenizer and description; its params are dropped once placed (see base)
    lora_config: lora_lib.LoraConfig
    data: DataSplits
    trainer: Trainer
    base: Any  # the frozen base params, on the mesh
    checkpoints: Checkpoints
    train_iterator: Any  # pipeline.PackedBatchIterator: this host's rows
    total_steps: int
    data_shard: tuple[int, int]  # (index, count) of this host among the hosts feeding data
    started: float  # time.monotonic() at the start
    files: RunDir  # where the run's files go: checkpoints (local or bucket), the rest locally (mirrored)

    @property
    def run_dir(self) -> Path:
        return self.files.local  # the run directory, or for a bucket run its local mirror (storage.py)


def prepare(config: ml_collections.ConfigDict) -> Run:
    """Loads model and data, builds the compiled steps and the checkpoint manager (no training yet)."""
    started = time.monotonic()
    check_durable(config.run_dir, jax.process_count())
    files = RunDir(config.run_dir)
    mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh))
    loaded = load_base(config.model, mesh)
    base, model = loaded.params, dataclasses.replace(loaded, params=None)  # the run holds the placed base
    lora_config = lora_config_of(config)
    data = load_data(config.data, model.tokenizer)
    shard_index, num_shards = sharding.process_batch_shard(mesh)
    if config.train.batch_size % num_shards or config.train.eval_batch_size % num_shards:
        raise ConfigError(f"train.batch_size={config.train.batch_size} and train.eval_batch_size="
                          f"{config.train.eval_batch_size} must be multiples of the {num_shards} hosts feeding data")
    total_steps = total_steps_of(config, data.train, config.train.batch_size * config.train.grad_accum_steps)

    optimizer, schedule = make_optimizer(config.optim, total_steps)
    trainer = Trainer(model.config, lora_config, optimizer, schedule, mesh)
    meta = expected_meta(lora_lib.model_shape(model.config), lora_lib.lora_config_dict(lora_config),
                         trainer.abstract_state())
    checkpoints = Checkpoints(files.checkpoints, config.train.keep_checkpoints, meta)
    pipeline_config = PipelineConfig(seq_len=config.data.seq_len, batch_size=config.train.batch_size // num_shards,
                                     seed=config.data.shuffle_seed, shuffle=True, num_epochs=None)
    train_iterator = make_train_iterator(data.train, None, pipeline_config, process_index=shard_index,
                                         process_count=num_shards)
    return Run(config, model, lora_config, data, trainer, base, checkpoints, train_iterator, total_steps,
               (shard_index, num_shards), started, files)


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
        run.files.pull()  # a bucket run's metrics.jsonl, to append to
        _save_effective_config(config, run.run_dir)
    state = _initial_state(run)
    start_step = int(state.step)
    logger = MetricsLogger(run.run_dir, run.total_steps, start_step, config.train.log_every, enabled=primary)
    logger.message(_describe(run, state, start_step))
    result = TrainResult("completed", start_step, run.files.location, {})
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
        if primary:
            run.files.push()  # a bucket run: metrics, tensorboard, config and exports into the bucket
    return result


def _describe(run: Run, state: TrainState, start_step: int) -> str:
    c, lora_config = run.model.config, run.lora_config
    trainable = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state.adapter))
    return (f"model {run.model.description}: {c.num_params / 1e6:.1f}M params, {trainable / 1e6:.3f}M trainable "
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
        adapter, _ = load_any_adapter(run.config.lora.init_from, run.model.config, expected=run.lora_config)
        adapter = jax.device_put(adapter, trainer.state_shardings.adapter)
        state = trainer.place_state(state.replace(adapter=adapter, opt_state=trainer.optimizer.init(adapter)))
    return state


def evaluate(run: Run, adapter: Any) -> dict[str, float]:
    """Mean response-token loss and perplexity over the eval split (or its first max_eval_batches)."""
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
    return {"loss": loss_sum / max(tokens, 1.0), "perplexity": metrics_lib.perplexity_from_loss(loss_sum, tokens),
            "tokens": tokens}


def _run_eval(run: Run, adapter: Any, step: int, logger: MetricsLogger, label: str) -> dict[str, float]:
    metrics = evaluate(run, adapter)
    logger.eval(step, metrics, label)
    return metrics


def _train_loop(run: Run, state: TrainState, logger: MetricsLogger, preemption: PreemptionFlag,
                result: TrainResult, on_step) -> TrainState:
    """Steps until total_steps, SIGTERM or the time limit; checkpoints on schedule and whenever it stops."""
    config, total_steps = run.config.train, run.total_steps
    deadline = run.started + config.time_limit_s if config.time_limit_s > 0 else None
    batches = stacked_batches(run.train_iterator, config.grad_accum_steps)
    step = int(state.step)
    with profiling.profile_steps(config.profile_dir, config.profile_first_step, config.profile_steps) as profiler:
        while step < total_steps:
            with profiler.step(step):
                state, data_state, metrics = _one_step(run, state, batches, step)
            step += 1
            stopping = _after_step(run, state, logger, preemption, result, step, metrics, data_state, deadline)
            if on_step is not None:
                on_step(step, metrics)
            if stopping:
                break
    return state


def _one_step(run: Run, state: TrainState, batches, step: int):
    """One optimizer step; returns the state, the data position after its batches and host metrics."""
    host_batch = next(batches)
    data_state = run.train_iterator.get_state()  # the position after this step's batches
    tick = time.perf_counter()
    state, device_metrics = run.trainer.step(state, run.base, run.trainer.place_batch(host_batch), step)
    metrics = _host_metrics(device_metrics)  # waits for the step
    metrics["step_seconds"] = time.perf_counter() - tick
    return state, data_state, metrics


def _after_step(run: Run, state: TrainState, logger: MetricsLogger, preemption: PreemptionFlag,
                result: TrainResult, step: int, metrics: dict, data_state, deadline: float | None) -> str | None:
    """Logging, evaluation, samples and checkpoints after `step`; returns why to stop, or None."""
    config, total_steps, checkpoints = run.config.train, run.total_steps, run.checkpoints
    step_seconds = metrics.pop("step_seconds")
    _check_finite(step, metrics, checkpoints)
    logger.train_step(step, metrics, step_seconds)
    result.losses[step] = metrics["loss"]
    result.step = step
    if config.eval_every and step % config.eval_every == 0 and step < total_steps:
        _run_eval(run, state.adapter, step, logger, "")
    if run.config.samples.every_steps and step % run.config.samples.every_steps == 0 and step < total_steps:
        _sample_generations(run, state.adapter, logger, step)
    stopping = _stop_reason(step, total_steps, preemption, deadline)
    if step % config.checkpoint_every == 0 or step == total_steps or stopping:
        checkpoints.save(step, state, data_state)
        if jax.process_index() == 0:
            run.files.push()  # a bucket run: the metrics up to this checkpoint into the bucket
    if stopping:
        checkpoints.wait_until_finished()
        logger.message(f"{stopping} after step {step} of {total_steps}: checkpoint written to "
                       f"{checkpoints.directory}; the same command resumes the remaining steps")
        result.status = "preempted" if stopping == preemption_lib.SIGTERM_REASON else "time_limit"
    return stopping


def _stop_reason(step: int, total_steps: int, preemption: PreemptionFlag, deadline: float | None) -> str | None:
    """Why to stop before total_steps, or None to go on; the same answer on every host (see preemption.py)."""
    if step >= total_steps:
        return None
    return preemption_lib.agree(preemption_lib.local_flags(preemption, deadline)).reason


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


def _sample_generations(run: Run, adapter: Any, logger: MetricsLogger, step: int) -> list[dict[str, str]]:
    """Greedy generations for a fixed set of eval prompts, printed next to the references.

    The set: the first `samples.count` eval records whose prompt plus `samples.max_new_tokens` fits the
    longest context the model has worked with (its own, or data.seq_len if training used more).
    """
    if run.config.samples.count <= 0:
        return []
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
    """Greedy continuations of `prompts` with the adapted model (the generator's KV-cache decoding).

    Layers are scanned rather than unrolled: a few samples do not repay the longer compile.
    """
    generator = Generator(model.config, base, model.tokenizer, adapter=adapter, lora_config=lora_config,
                          max_batch_size=len(prompts), max_length=context, layer_loop="scan")
    return [completion.text for completion in generator.generate(prompts, max_new_tokens=max_new_tokens)]


def _export(run: Run, adapter: Any, logger: MetricsLogger, primary: bool) -> None:
    """The final adapter (always), as PEFT files and as a merged HF checkpoint (when configured).

    Every host takes part in gathering the adapter; only the primary one writes.
    """
    paths = export.export_adapter(run.run_dir, adapter, run.lora_config, run.model.config, peft=run.config.export.peft,
                                  base_model_name=peft_base_name(run.config.model), primary=primary)
    if primary and run.config.export.merged_hf:
        base, run.base = run.base, None  # donated to the merge: the run's last use of the base
        paths.append(export.export_merged(run.run_dir / "merged_hf", base, adapter, run.lora_config,
                                          run.model.config, run.model.tokenizer_source))
    if primary:
        logger.message("exported: " + ", ".join(str(p) for p in paths))


# ============================================================================================ CLI


def run(config: ml_collections.ConfigDict) -> int:
    """Trains `config` as the command line does. Exit status: 0 completed or preempted (checkpoint
    written), 1 diverged, 2 bad config/input (one message, no traceback)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    default_model.enable_compilation_cache(min_compile_time_s=0.2)  # small steps too: a resume should not recompile
    distributed.initialize()  # joins a multi-host job when the environment describes one; else nothing
    try:
        result = train(config)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _print_summary(result)
    return 0


# Errors caused by the config or the input files: reported as one message, no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, ModelLoadError, model_config_lib.ConfigError, lora_lib.AdapterError,
    checkpoint.CheckpointMismatchError, checkpoint.NoRestorableCheckpointError, weights.CheckpointError,
    schema.InvalidRecordsError, sharding.ShardingError, default_model.DefaultModelError, FileNotFoundError)


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
