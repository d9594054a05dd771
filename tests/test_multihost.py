"""Two processes × 4 CPU devices, joined over loopback, train like one process and checkpoint across hosts.

This file is also the worker: `python tests/test_multihost.py <process_id> <num_processes> <port> <out_dir>`.
Each worker joins the job through `distributed.initialize` (JAX_COORDINATOR_ADDRESS & co.), builds a
data=2 fsdp=2 tensor=2 mesh over the 8 global devices, loads the base params slice by slice
(`sharding.load_sharded`), feeds only its own rows of each global batch (`process_batch_shard` +
`shard_batch`), runs 3 real train steps (train_state.Trainer), saves an orbax checkpoint
(checkpoint.Checkpoints; each process writes its shards), restores it and checks it. The reference is
one process with one device running the same script.

The second harness (`python tests/test_multihost.py train <out_dir>`) runs the real training loop
(`loop.train`, configs/tiny.py) on two processes and delivers SIGTERM to one of them only: both must
stop after the same step, checkpoint it together, exit cleanly, and resume to the losses of a run that
was never interrupted.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # worker: 4 CPU devices per process, set before JAX starts its backend
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
        " --xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
        " --xla_llvm_disable_expensive_passes=true")
    os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np
import pytest

from llama_e_jax.train import distributed

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- in-process unit tests


def test_config_from_env_explicit_and_auto():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.config_from_env(env) == distributed.DistributedConfig("10.0.0.2:1234", 4, 3)
    assert distributed.config_from_env({"LLAMA_E_DISTRIBUTED": "auto"}).auto
    assert not distributed.config_from_env({}).enabled


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID is not"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "not an integer"),
    ({"LLAMA_E_DISTRIBUTED": "yes"}, "expected 'auto' or 'off'"),
])
def test_config_from_env_rejects_incomplete_settings(env, message):
    with pytest.raises(ValueError, match=message):
        distributed.config_from_env(env)


def test_initialize_without_settings_is_a_single_process_noop():
    assert distributed.initialize(distributed.DistributedConfig()) is False


# ----------------------------------------------------------------------------- the two-process run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(process_id: int, num_processes: int, port: int, out: Path, *mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "LLAMA_E_DISTRIBUTED"):
        env.pop(name, None)
    if num_processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
                   JAX_PROCESS_ID=str(process_id))
    env["LLAMA_E_SHARED_RUN_DIR"] = "1"  # the two processes share this machine's disk
    log = open(out / f"worker{process_id}.log", "a")
    return subprocess.Popen([sys.executable, __file__, *mode, str(out)], env=env, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """{'reference': one process, 1 device; 'multi': [process 0, process 1]} worker results."""
    single_dir, multi_dir = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("multi")
    port = _free_port()
    procs = [_spawn(0, 1, port, single_dir)] + [_spawn(i, 2, port, multi_dir) for i in range(2)]
    for proc in procs:
        try:
            proc.wait(timeout=400)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
    logs = {d: (d / f"worker{i}.log").read_text()[-4000:] for d, i in ((single_dir, 0), (multi_dir, 0), (multi_dir, 1))}
    assert all(p.returncode == 0 for p in procs), f"worker failed: {[p.returncode for p in procs]}\n" + "\n".join(
        f"--- {d}:\n{text}" for d, text in logs.items())
    read = lambda d, i: json.loads((d / f"result{i}.json").read_text())
    return {"reference": read(single_dir, 0), "multi": [read(multi_dir, 0), read(multi_dir, 1)]}


def test_processes_see_the_global_mesh(runs):
    for process_id, result in enumerate(runs["multi"]):
        assert result["process"] == [process_id, 2]
        assert result["devices"] == {"global": 8, "local": 4}
        assert result["batch_shard"] == [process_id, 2]  # each host feeds half of every global batch


def test_two_process_losses_equal_one_process(runs):
    from conftest import assert_close, train_loss_bound  # here, not at the top: workers run this file
    from test_sharding import tiny_setup

    reference = runs["reference"]["losses"]
    tolerance = train_loss_bound(tiny_setup()[0], reference, tokens=8 * 16)  # test_sharding._host_batches' rows
    assert len(reference) == 3 and reference[2] < reference[0] - 100 * tolerance
    for result in runs["multi"]:
        assert_close(result["losses"], reference, atol=tolerance, why="fp32 losses, 2 processes' sums")
    # The trained adapters agree too (sum of |x| per leaf, over the gathered global arrays): each element
    # to 1e-3 of an Adam step (see test_sharding), and B's elements are about a step in size.
    np.testing.assert_allclose(runs["multi"][0]["adapter_checksum"], runs["reference"]["adapter_checksum"], rtol=1e-3)


def test_checkpoint_saved_and_restored_across_hosts(runs):
    for result in runs["multi"]:
        assert result["checkpoint"]["steps"] == [3]
        assert result["checkpoint"]["restored_step"] == 3
        assert result["checkpoint"]["restored_equal"]  # every shard on every host came back bit-exact
        # each host wrote its own shards: the q_proj lora_b leaf is split over tensor (2 hosts' devices)
        assert result["checkpoint"]["restored_spec"] == [None, None, "tensor"]


# ----------------------------------------------------------------------------- SIGTERM on one host

TRAIN_STEPS = 12


def _wait_all(procs: list[subprocess.Popen], out_dirs: list[Path], timeout: float = 500) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
    logs = "\n".join(f"--- {d}/worker{i}.log:\n{(d / f'worker{i}.log').read_text()[-3000:]}"
                     for d in out_dirs for i in range(2))
    assert all(p.returncode == 0 for p in procs), f"worker failed: {[p.returncode for p in procs]}\n{logs}"


def _progress(out: Path, process_id: int) -> int:
    """The last step process `process_id` finished (its on_step writes it), 0 before the first."""
    path = out / f"progress{process_id}.txt"
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text else 0


def _train_results(out: Path) -> list[dict]:
    results = [json.loads((out / f"train_result{i}.json").read_text()) for i in range(2)]
    (out / "train_result0.json").unlink()
    (out / "train_result1.json").unlink()
    return results


def test_sigterm_on_one_host_stops_both_at_the_same_step_and_resumes_exactly(tmp_path):
    """Process 1 alone gets SIGTERM at a random step. Both processes must stop after one agreed step,
    save that step together and exit 0; resumed, both must reproduce the losses of an uninterrupted
    two-process run bit for bit (same programs, same devices, same data order and PRNG state)."""
    seed = random.randrange(10**6)
    target = random.Random(seed).randint(2, 6)
    reference_dir, preempted_dir = tmp_path / "reference", tmp_path / "preempted"
    reference_dir.mkdir()
    preempted_dir.mkdir()
    ports = _free_port(), _free_port()
    reference = [_spawn(i, 2, ports[0], reference_dir, "train") for i in range(2)]
    preempted = [_spawn(i, 2, ports[1], preempted_dir, "train") for i in range(2)]
    deadline = time.monotonic() + 400
    while _progress(preempted_dir, 1) < target and time.monotonic() < deadline and preempted[1].poll() is None:
        time.sleep(0.05)
    assert preempted[1].poll() is None, f"process 1 ended before step {target} (seed {seed})"
    preempted[1].send_signal(signal.SIGTERM)  # process 0 never sees a signal
    _wait_all(reference + preempted, [reference_dir, preempted_dir])

    stopped = _train_results(preempted_dir)
    assert [r["status"] for r in stopped] == ["preempted", "preempted"], (seed, stopped)
    stop_step = stopped[0]["step"]
    assert stopped[1]["step"] == stop_step and target <= stop_step < TRAIN_STEPS, (seed, target, stopped)
    assert stopped[0]["checkpoint_steps"] == stopped[1]["checkpoint_steps"] == [stop_step]

    port = _free_port()
    resumed = [_spawn(i, 2, port, preempted_dir, "train") for i in range(2)]
    _wait_all(resumed, [preempted_dir])
    after = _train_results(preempted_dir)
    whole = _train_results(reference_dir)
    assert [r["status"] for r in after] == ["completed", "completed"]
    assert [r["start_step"] for r in after] == [stop_step, stop_step]
    expected = {step: loss for step, loss in whole[0]["losses"].items() if int(step) > stop_step}
    assert after[0]["losses"] == after[1]["losses"] == expected, (seed, target)
    assert stopped[0]["losses"] == {k: v for k, v in whole[0]["losses"].items() if int(k) <= stop_step}


# ----------------------------------------------------------------------------- the workers


def _train_worker(out_dir: Path) -> None:
    """Runs configs/tiny.py through the real loop in `out_dir/run`; writes train_result<process>.json."""
    distributed.initialize()
    import jax

    from llama_e_jax.train import loop, recipe

    process = jax.process_index()
    config = recipe.load_config_file("tiny")
    config.run_dir = str(out_dir / "run")
    config.train.steps = TRAIN_STEPS
    config.train.checkpoint_every = 1000  # only the preemption checkpoint and the final one
    config.train.max_eval_batches = 1
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2  # the 8 devices of the two processes
    config.train.batch_size = config.train.eval_batch_size = 4  # global rows: a multiple of data*fsdp

    def on_step(step: int, metrics: dict) -> None:
        (out_dir / f"progress{process}.txt").write_text(str(step))
        time.sleep(0.2)  # pacing, so that the signal lands mid-run on a fast machine

    result = loop.train(config, on_step=on_step)
    steps = sorted(int(p.name) for p in (out_dir / "run" / "checkpoints").iterdir() if p.name.isdigit())
    summary = {"status": result.status, "step": result.step, "start_step": min(result.losses, default=1) - 1,
               "losses": {str(k): v for k, v in sorted(result.losses.items())}, "checkpoint_steps": steps}
    (out_dir / f"train_result{process}.json").write_text(json.dumps(summary))




def _worker(out_dir: Path) -> dict:
    distributed.initialize()  # from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, if set
    import jax
    from jax.experimental import multihost_utils

    from llama_e_jax.model import lora as lora_lib
    from llama_e_jax.model import sharding
    from llama_e_jax.train.checkpoint import Checkpoints, expected_meta

    sys.path.insert(0, str(REPO / "tests"))
    from test_sharding import _host_batches, _trainer, tiny_setup, variables_init

    config, model = tiny_setup()
    multi = jax.process_count() > 1
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2) if multi else sharding.MeshConfig(), None if multi else jax.devices()[:1])
    shard_index, num_shards = sharding.process_batch_shard(mesh)

    # Same base weights everywhere, computed on the host; each process reads only its devices' slices.
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        host_base = jax.tree.map(np.asarray, jax.jit(variables_init(model))(jax.random.key(0))["params"])
    flat = {sharding.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(host_base)}

    class Reader:
        def read(self, path, index):
            return flat[path][index]

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host_base)
    base = sharding.load_sharded(Reader(), abstract, mesh)

    trainer = _trainer(mesh, config, model.lora)
    state = trainer.init(jax.random.PRNGKey(0))
    losses = []
    for global_batch in _host_batches():
        rows = global_batch["input_ids"].shape[0] // num_shards
        host_rows = {k: v[shard_index * rows:(shard_index + 1) * rows] for k, v in global_batch.items()}
        state, metrics = trainer.step(state, base, trainer.place_batch(host_rows))
        losses.append(float(jax.device_get(metrics["loss"])))
    gathered = multihost_utils.process_allgather(state.adapter, tiled=True) if multi else jax.device_get(state.adapter)
    checksum = [float(np.sum(np.abs(x))) for x in jax.tree.leaves(gathered)]

    abstract_state = trainer.abstract_state()
    meta = expected_meta(lora_lib.model_shape(config), lora_lib.lora_config_dict(model.lora), abstract_state)
    checkpoints = Checkpoints(out_dir / "checkpoints", keep=2, meta=meta)
    checkpoints.save(3, state, {"epoch": 0, "row": 24})
    checkpoints.wait_until_finished()
    restored = checkpoints.restore_latest(abstract_state)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a.addressable_data(0)),
                                                         np.asarray(b.addressable_data(0)))), restored.state, state)
    same_everywhere = multihost_utils.process_allgather(np.array(all(jax.tree.leaves(same))), tiled=False) if multi \
        else [all(jax.tree.leaves(same))]
    q_lora_b = restored.state.adapter["layers"]["attn"]["q_proj"]["lora_b"]
    result = {
        "process": [jax.process_index(), jax.process_count()],
        "devices": {"global": jax.device_count(), "local": jax.local_device_count()},
        "batch_shard": [shard_index, num_shards],
        "losses": losses,
        "adapter_checksum": checksum,
        "checkpoint": {"steps": checkpoints.all_steps(), "restored_step": restored.step,
                       "restored_equal": bool(np.all(same_everywhere)),
                       "restored_spec": [list(e) if isinstance(e, tuple) else e for e in q_lora_b.sharding.spec]},
    }
    checkpoints.close()
    return result


if __name__ == "__main__" and sys.argv[1] == "train":
    _train_worker(Path(sys.argv[2]))
elif __name__ == "__main__":
    out = Path(sys.argv[1])
    result = _worker(out)
    import jax

    (out / f"result{jax.process_index()}.json").write_text(json.dumps(result))
