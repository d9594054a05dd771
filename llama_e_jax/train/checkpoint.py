"""Training checkpoints: one orbax `CheckpointManager` directory per run, with resume, fallback and healing.

Each checkpoint `<run_dir>/checkpoints/<step>/` holds three orbax items:

* `state` — the `TrainState` (adapter, optimizer state, step, PRNG key) as sharded arrays; every
  host writes and reads only its own shards, so this works unchanged on a pod.
* `data`  — the input pipeline's `get_state()` (a small JSON dict: epoch and row of the packing
  plan), so a resumed run sees exactly the batches the interrupted one would have seen.
* `meta`  — what the state belongs to: the model shape, the LoRA settings and every state leaf's
  path and shape. It is compared with the current run *before* any array is read, so resuming
  with another model or rank fails with the differing fields named, instead of an orbax shape error
  deep in a restore (and a mismatch is never mistaken for corruption).

Design, and why:

* **Directories are URLs.** The directory is an `etils.epath.Path`, so `gs://bucket/run/checkpoints`
  stays a bucket path (orbax and tensorstore write it directly; a `pathlib.Path` would turn it into a
  local folder named `gs:`). Local paths are made absolute, as before.
* **A corrupt checkpoint heals the run instead of poisoning it.** Restoring walks the steps newest
  first. A checkpoint that fails to read (a preempted write that got half-way, a truncated file) is
  moved aside to `checkpoints/corrupt/<step>` (kept for inspection, one warning line) and the
  previous one is tried. Moved aside, it is no longer a step to orbax: the run rewrites that step
  when it gets there, and rotation (`keep` newest) counts only the checkpoints that remain, all
  newer than the one restored being gone. Without this, the corrupt newest step stayed (a save
  "already exists"), and rotation deleted the last good one.
* **One line per failure.** Orbax/tensorstore errors can be pages long (nested asyncio tracebacks):
  the warning carries the first line of the error, the full exception goes to the debug log.
* **Hosts agree.** On a multi-host run each host reads only its shards, so one host may fail where
  another succeeds; the hosts agree (any failure = corrupt) before anything is moved, and only
  process 0 moves directories.

Saves are asynchronous: training continues while the files are written, and `wait_until_finished`
(called before exit) makes them durable. Orbax ignores unfinished temporary directories itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from llama_e_jax.model import sharding
from llama_e_jax.model.lora import describe_differences

log = logging.getLogger(__name__)

CORRUPT_DIR = "corrupt"  # <checkpoints>/corrupt/<step>: checkpoints found unreadable, moved aside
_CORRUPT_NOTE = ("Checkpoints that could not be read when a run resumed, moved here by llama_e_jax (the run fell\n"
                 "back to the previous one and rewrote these steps). Kept for inspection; safe to delete.\n")
_NOISY_LOGGERS = ("asyncio", "absl", "orbax", "tensorstore")  # whose error tracebacks go to the debug log


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


def as_path(directory: str | Path | epath.Path) -> epath.Path:
    """A local path (made absolute) or a URL such as gs://bucket/dir, kept a URL."""
    path = epath.Path(directory)
    return path if "://" in str(directory) else epath.Path(Path(directory).absolute())


def state_layout(abstract_state: Any) -> dict[str, list[int]]:
    """'/'-joined leaf path → shape, for every leaf of a (possibly abstract) train state."""
    leaves = jax.tree_util.tree_leaves_with_path(abstract_state)
    return {sharding.path_str(path): list(leaf.shape) for path, leaf in leaves}


class Checkpoints:
    """Save/restore of train state + data position under one directory.

    Args:
      directory: where step directories go (created); a local path or a gs:// URL.
      keep: how many of the newest checkpoints to keep.
      meta: what this run's state belongs to (JSON-able dict; see `expected_meta`). Saved with every
        checkpoint and compared on restore.
    """

    def __init__(self, directory: str | Path | epath.Path, keep: int, meta: dict[str, Any]):
        self.directory = as_path(directory)
        self.meta = meta
        self._verified: set[int] = set()  # steps read back or written by this process
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        """Starts writing checkpoint `step` (asynchronously).

        A step already saved or restored by this run is not written twice; a step directory left by an
        earlier attempt that this run has not read (so cannot vouch for) is replaced.
        """
        if step in self._verified:
            return
        if step in self._manager.all_steps():
            log.warning("checkpoint %s exists from an earlier attempt; rewriting it", self._step_dir(step))
            self._manager.delete(step)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(self.meta),
            ),
        )
        self._verified.add(step)

    def restore_latest(self, abstract_state: Any) -> Restored | None:
        """The newest readable checkpoint, or None when there is none.

        `abstract_state`: ShapeDtypeStructs with shardings (the restore target). Unreadable checkpoints
        met on the way are moved to `<directory>/corrupt/`. Raises CheckpointMismatchError if a
        checkpoint belongs to another model/config, and NoRestorableCheckpointError if checkpoints
        existed but none could be read.
        """
        failures = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            restored, error = self._try_restore(step, abstract_state)
            if _any_host_failed(error is not None):
                failures.append(self._move_aside(step, error))
                continue
            self._verified.add(step)
            return restored
        if failures:
            raise NoRestorableCheckpointError(
                f"{self.directory}: no checkpoint could be read; all were moved to {self.directory / CORRUPT_DIR} "
                f"(a rerun starts from step 0): "
                + "; ".join(failures))
        return None

    def _try_restore(self, step: int, abstract_state: Any) -> tuple[Restored | None, Exception | None]:
        """(restored, None), or (None, the read error). A metadata mismatch is raised, not returned."""
        with _library_errors_to_debug():
            try:
                saved_meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            except Exception as error:  # noqa: BLE001 - any read failure means "corrupt", see module doc
                return None, error
            self._check_meta(step, saved_meta)
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                            data=ocp.args.JsonRestore()),
                )
            except Exception as error:  # noqa: BLE001
                return None, error
        return Restored(step=step, state=restored.state, data_state=dict(restored.data)), None

    def _move_aside(self, step: int, error: Exception | None) -> str:
        """Moves checkpoint `step` to corrupt/ (process 0), logs one line; returns that line."""
        source = self._step_dir(step)
        target = self._corrupt_target(step)
        reason = _first_line(error) if error is not None else "unreadable on another host"
        message = f"checkpoint {source} is unreadable ({reason})"
        log.warning("%s; moved to %s, falling back to the previous checkpoint", message, target)
        if error is not None:
            log.debug("checkpoint %s: full error", source, exc_info=error)
        if jax.process_index() == 0:
            # A bucket has no empty folders, and epath's rename wants the target's folder to exist:
            # a note inside it makes it exist (and says what the folder is).
            target.parent.mkdir(parents=True, exist_ok=True)
            (target.parent / "README.txt").write_text(_CORRUPT_NOTE)
            source.rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint-move-aside-{step}")
        self._manager.reload()
        return message

    def _corrupt_target(self, step: int) -> epath.Path:
        """corrupt/<step>, or corrupt/<step>.<n> when that step was already moved aside before."""
        corrupt = self.directory / CORRUPT_DIR
        target, n = corrupt / str(step), 1
        while target.exists():
            target, n = corrupt / f"{step}.{n}", n + 1
        return target

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _check_meta(self, step: int, saved: dict[str, Any]) -> None:
        problems = []
        for section in ("model", "lora"):
            differences = describe_differences(saved.get(section, {}), self.meta[section])
            problems += [f"{section}.{line}" for line in differences]
        if not problems:
            differences = describe_differences(saved.get("state", {}), self.meta["state"])
            problems = [f"state leaf {line}" for line in differences]
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {self._step_dir(step)} was written by a different run "
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


def _any_host_failed(failed_here: bool) -> bool:
    """True on every host when any host failed (a collective on multi-host runs)."""
    if jax.process_count() == 1:
        return failed_here
    return bool(np.any(multihost_utils.process_allgather(np.array(failed_here))))


def _first_line(error: Exception, limit: int = 300) -> str:
    text = (str(error).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(error).__name__}: {text}"


class _ToDebug(logging.Filter):
    """Re-logs library error records that carry a traceback at DEBUG on our logger, and drops them."""

    def filter(self, record: logging.LogRecord) -> bool:
        traceback = record.exc_info or record.exc_text or "Traceback" in record.getMessage()
        if record.levelno >= logging.ERROR and traceback:
            log.debug("%s: %s", record.name, record.getMessage(), exc_info=record.exc_info)
            return False
        return True


@contextlib.contextmanager
def _library_errors_to_debug() -> Iterator[None]:
    """While a restore is tried, tracebacks that orbax/tensorstore/asyncio log go to the debug log."""
    loggers, handler_filter = [logging.getLogger(name) for name in _NOISY_LOGGERS], _ToDebug()
    for logger in loggers:
        logger.addFilter(handler_filter)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(handler_filter)
