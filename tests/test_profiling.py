"""llama_e_jax.train.profiling: a jax.profiler trace covering exactly the requested train steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from llama_e_jax.train import profiling


def run_steps(profiler: profiling.StepProfiler, steps: range, events: list) -> None:
    step_fn = jax.jit(lambda x: jnp.tanh(x @ x))
    x = jnp.ones((64, 64))
    for step in steps:
        with profiler.step(step):
            events.append(("step", step, profiler.active))
            x = step_fn(x)


def test_traces_only_the_requested_steps_and_writes_a_tensorboard_profile(tmp_path, monkeypatch):
    calls = []
    start, stop = jax.profiler.start_trace, jax.profiler.stop_trace
    monkeypatch.setattr(jax.profiler, "start_trace", lambda d: (calls.append(("start", d)), start(d)))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: (calls.append(("stop",)), stop()))
    events = []
    with profiling.profile_steps(str(tmp_path), first_step=2, num_steps=3) as profiler:
        run_steps(profiler, range(7), events)
    assert calls == [("start", str(tmp_path)), ("stop",)]
    assert [active for _, _, active in events] == [False, False, True, True, True, False, False]
    assert profiler.traced_steps == [2, 3, 4]
    traces = list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))  # what TensorBoard's profile plugin reads
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_a_run_ending_inside_the_range_still_closes_the_trace(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with profiling.profile_steps(str(tmp_path), first_step=0, num_steps=10) as profiler:
            run_steps(profiler, range(2), [])
            raise RuntimeError("boom")
    assert not profiler.active and profiler.traced_steps == [0, 1]
    assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))


def test_no_trace_dir_traces_nothing(monkeypatch):
    monkeypatch.setattr(jax.profiler, "start_trace", lambda d: pytest.fail("traced without a trace dir"))
    with profiling.profile_steps(None, first_step=0, num_steps=3) as profiler:
        run_steps(profiler, range(4), [])
    assert profiler.traced_steps == []


@pytest.mark.parametrize("first, num", [(-1, 3), (2, 0)])
def test_a_bad_step_range_is_refused(tmp_path, first, num):
    with pytest.raises(ValueError, match="profiling: first step must be >= 0"):
        profiling.StepProfiler(str(tmp_path), first, num)
