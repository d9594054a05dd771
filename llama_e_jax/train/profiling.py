"""Profiler traces of a few train steps, for TensorBoard's profile plugin (`jax.profiler`).

Why a step range and not the whole run: a trace holds every kernel launch and collective of every
step it covers; ten steps of a 7B model already make hundreds of MB, and the first steps are
dominated by compilation. So the loop traces steps [first_step, first_step + num_steps) — by default
after a few warm-up steps — and nothing else. Each step inside the range is wrapped in a
`StepTraceAnnotation`, which TensorBoard's "overview" and "trace viewer" pages use to split the
timeline per step (step time, idle time, how much of it is collectives).

How the train loop uses it (`train.profile_dir`, `train.profile_first_step`, `train.profile_steps`):

    with profiling.profile_steps(config.train.profile_dir, config.train.profile_first_step,
                                 config.train.profile_steps) as profiler:
        for step in range(start, total_steps):
            with profiler.step(step):
                state, metrics = trainer.step(state, base, batch, step)

and views it with `pip install tensorboard tensorboard-plugin-profile` and
`tensorboard --logdir <profile_dir>` (Profile tab). On a multi-host slice every host writes its
own trace (files are named by host) into the same directory; a gs:// directory works, since
jax.profiler writes through TensorFlow-compatible file systems when available, else point it at a
local path and copy the files afterwards. With `profile_dir` empty nothing is traced and the
wrapper costs nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import jax


@dataclasses.dataclass
class StepProfiler:
    """Starts the trace when step `first_step` begins and stops it after step `first_step + num_steps - 1`."""

    trace_dir: str | None
    first_step: int
    num_steps: int
    active: bool = False
    traced_steps: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.trace_dir and (self.first_step < 0 or self.num_steps <= 0):
            raise ValueError(f"profiling: first step must be >= 0 and the number of steps > 0, got first_step="
                             f"{self.first_step}, num_steps={self.num_steps}")

    def _in_range(self, step: int) -> bool:
        return bool(self.trace_dir) and self.first_step <= step < self.first_step + self.num_steps

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Wraps one train step: starts the trace before the first traced step, annotates the traced
        steps, and stops the trace after the last one."""
        if not self._in_range(step):
            yield
            return
        if not self.active:
            jax.profiler.start_trace(self.trace_dir)
            self.active = True
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            yield
        self.traced_steps.append(step)
        if step == self.first_step + self.num_steps - 1:
            self.stop()

    def stop(self) -> None:
        """Ends the trace (if one is running) once the device has finished the traced work."""
        if self.active:
            jax.effects_barrier()  # steps are dispatched asynchronously: wait for their device work
            jax.profiler.stop_trace()
            self.active = False


@contextlib.contextmanager
def profile_steps(trace_dir: str | None, first_step: int = 3, num_steps: int = 5) -> Iterator[StepProfiler]:
    """A StepProfiler for the loop; the trace is closed on the way out, also when the run ends (or
    fails) inside the range, so the steps traced so far are kept."""
    profiler = StepProfiler(trace_dir, first_step, num_steps)
    try:
        yield profiler
    finally:
        profiler.stop()
