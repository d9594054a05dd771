"""Training checkpoints: one orbax `CheckpointManager` directory per run, with resume and fallback.

Each checkpoint `<run_dir>/checkpoints/<step>/` holds three orbax items:

* `state` — the `TrainState` (adapter, optimizer state, step, PRNG key) as sharded arrays; every
  host writes and reads only its own shards, so this works unchanged on a pod.
* `data`  — the input pipeline's `get_state()` (a small JSON dict: epoch and row of the packing
  plan), so a resumed run sees exactly the batches the interrupted one would have seen.
* `meta`  — what the state belongs to: the model shape, the LoRA settings and every state leaf's
  path and shape. It is compared with the current run *before* any array is read, so resuming
  with another model or rank fails with the differing fields named, instead of an orbax shape error
  deep in a restore (and a mismatch is never mistaken for corruption).

Restoring walks the steps newest first. A checkpoint that fails to read (a preempted write that got
half-way, a truncated file) is skipped with a warning and the previous one is tried; orbax already
ignores unfinished temporary directories, this catches the rest. Only the newest `keep` checkpoints
are kept. Saves are asynchronous: training continues while the files are written, and
`wait_until_finished` (called before exit) makes them durable.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from llama_e_jax.model import sharding
from llama_e_jax.model.lora import describe_differences

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The run's checkpoints were written for another model, LoRA config or optimizer layout."""


class NoRestorableCheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be read."""


@dataclasses.dataclass
class Restored:
    """A checkpoint read back: the step it was written after, the train state and the data position."""

    step: int
    state: Any
    data_state: dict[str, Any]


def state_layout(abstract_state: Any) -> dict[str, list[int]]:
    """'/'-joined leaf path → shape, for every leaf of a (possibly abstract) train state."""
    leaves = jax.tree_util.tree_leaves_with_path(abstract_state)
    return {sharding.path_str(path): list(leaf.shape) for path, leaf in leaves}


class Checkpoints:
    """Save/restore of train state + data position under one directory.

    Args:
      directory: where step directories go (created).
      keep: how many of the newest checkpoints to keep.
      meta: what this run's state belongs to (JSON-able dict; see `expected_meta`). Saved with every
        checkpoint and compared on restore.
    """

    def __init__(self, directory: str | Path, keep: int, meta: dict[str, Any]):
        self.directory = Path(directory).absolute()
        self.meta = meta
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        """Starts writing checkpoint `step` (asynchronously); overwrites nothing already saved."""
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(self.meta),
            ),
        )

    def restore_latest(self, abstract_state: Any) -> Restored | None:
        """The newest readable checkpoint, or None when there is none.

        `abstract_state`: ShapeDtypeStructs with shardings (the restore target). Raises
        CheckpointMismatchError if a checkpoint belongs to another model/config, and
        NoRestorableCheckpointError if checkpoints exist but none can be read.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        failures = []
        for step in steps:
            try:
                saved_meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            except Exception as error:  # noqa: BLE001 - any read failure means "corrupt", see module doc
                failures.append(self._skip(step, error))
                continue
            self._check_meta(step, saved_meta)
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                            data=ocp.args.JsonRestore()),
                )
            except Exception as error:  # noqa: BLE001
                failures.append(self._skip(step, error))
                continue
            return Restored(step=step, state=restored.state, data_state=dict(restored.data))
        if failures:
            raise NoRestorableCheckpointError(f"{self.directory}: no checkpoint could be read:\n  " + "\n  ".join(failures))
        return None

    def _skip(self, step: int, error: Exception) -> str:
        message = f"checkpoint {self.directory / str(step)} is unreadable ({type(error).__name__}: {error})"
        log.warning("%s; falling back to the previous checkpoint", message)
        return message

    def _check_meta(self, step: int, saved: dict[str, Any]) -> None:
        problems = []
        for section in ("model", "lora"):
            problems += [f"{section}.{line}" for line in describe_differences(saved.get(section, {}), self.meta[section])]
        if not problems:
            problems = [f"state leaf {line}" for line in describe_differences(saved.get("state", {}), self.meta["state"])]
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)} was written by a different run "
                f"(use another run_dir, or delete the checkpoints to start over): " + "; ".join(problems)
            )

    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def expected_meta(model_shape: dict[str, int], lora: dict[str, Any], abstract_state: Any) -> dict[str, Any]:
    """The `meta` a run saves and checks: model shape, LoRA settings and the state's leaf layout."""
    return {"model": model_shape, "lora": lora, "state": state_layout(abstract_state)}
