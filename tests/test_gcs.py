"""gs:// run directories against a local GCS emulator: train → SIGTERM → resume on a fresh disk → export,
with the data read from the bucket, everything left in the bucket and nothing on local disk named `gs:`.

The emulator (`gcp-storage-emulator`, in-process, in memory) speaks GCS's JSON API on a loopback port.
Each library is pointed at it by its own switch: gcsfs (behind etils.epath: orbax's directory
handling, our mirror and fetches) by STORAGE_EMULATOR_HOST; tensorstore (orbax's array writes) by
TENSORSTORE_GCS_HTTP_URL, with GOOGLE_AUTH_TOKEN_FOR_TESTING standing in for credentials. The
training runs are subprocesses, so SIGTERM is delivered as a TPU VM receives it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from llama_e_jax.train import storage
from llama_e_jax.train.checkpoint import Checkpoints, expected_meta
from llama_e_jax.train.recipe import ConfigError

emulator = pytest.importorskip("gcp_storage_emulator.server")
gcsfs = pytest.importorskip("gcsfs")

REPO = Path(__file__).resolve().parent.parent
BUCKET = "llama-e-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_generation_header() -> None:
    """Makes the stub emulator send `x-goog-generation` with object downloads, as GCS does.

    tensorstore reads an object's generation from that header (OCDBT's manifest is read back and
    rewritten within one checkpoint save); gcp-storage-emulator leaves it out, and tensorstore then
    fails with "Malformed StorageGeneration". Nothing else about the emulator is changed.
    """
    def with_generation(download):
        def handler(request, response, storage, *args, **kwargs):
            try:
                obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
                response["x-goog-generation"] = str(obj["generation"])
            except Exception:  # noqa: BLE001 - a missing object: the emulator's own handler answers 404
                pass
            return download(request, response, storage, *args, **kwargs)

        handler.wrapped = download
        return handler

    original = emulator.objects.download
    if getattr(original, "wrapped", None):
        return
    wrapped = with_generation(original)
    # `objects.get` answers `?alt=media` by calling the module's `download`, so the module attribute is
    # replaced as well as the routing table's entries (the `/download/...` and XML paths).
    emulator.objects.download = wrapped
    for _, methods in emulator.HANDLERS:
        for method, handler in methods.items():
            if handler is original:
                methods[method] = wrapped


def _check_generation_header(url: str) -> None:
    """Fails fast, naming the cause, if a newer emulator routes downloads around the shim above: without the
    header tensorstore's checkpoint writes fail only now and then ("Malformed StorageGeneration")."""
    name = "probe%2Fgeneration"
    upload = urllib.request.Request(f"{url}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={name}",
                                    data=b"x", method="POST")
    urllib.request.urlopen(upload).read()
    with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o/{name}?alt=media") as reply:
        assert reply.headers.get("x-goog-generation", "").isdigit(), "the emulator sends no x-goog-generation"
    urllib.request.urlopen(urllib.request.Request(f"{url}/storage/v1/b/{BUCKET}/o/{name}", method="DELETE"))


@pytest.fixture(scope="module")
def gcs():
    """An empty in-memory bucket, and this process's environment pointing every GCS client at it."""
    _serve_generation_header()
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    _check_generation_header(url)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
           "NO_GCE_CHECK": "True"}  # google-auth: no probing for a GCE metadata server (seconds per call)
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def bucket_files(prefix: str) -> set[str]:
    """Object names under gs://BUCKET/prefix/, relative to it (read fresh, no listing cache)."""
    fs = gcsfs.GCSFileSystem()
    fs.invalidate_cache()
    root = f"{BUCKET}/{prefix}/"
    return {name[len(root):] for name in fs.find(root)}


def read_bucket(path: str) -> str:
    fs = gcsfs.GCSFileSystem()
    fs.invalidate_cache()
    return fs.cat(f"{BUCKET}/{path}").decode()


# ----------------------------------------------------------------------------- refusing runs that cannot survive


@pytest.mark.parametrize("run_dir, processes, env, refused", [
    ("runs/r1", 2, {}, "spans 2 hosts"),
    ("runs/r1", 1, {"LLAMA_E_SPOT": "1"}, "spot run"),
    ("runs/r1", 1, {}, None),  # one host, not spot: a local directory is fine
    ("gs://b/r1", 4, {"LLAMA_E_SPOT": "1"}, None),
    ("/mnt/filestore/r1", 4, {"LLAMA_E_SHARED_RUN_DIR": "1"}, None),  # said to be shared by every host
])
def test_local_run_dir_refused_for_multi_host_and_spot(run_dir, processes, env, refused):
    if refused is None:
        storage.check_durable(run_dir, processes, env)
        return
    with pytest.raises(ConfigError, match=rf"run_dir='runs/r1' is a local path, but .*{refused}.*gs://BUCKET/RUN") as e:
        storage.check_durable(run_dir, processes, env)
    assert "\n" not in str(e.value)


def test_url_paths_stay_urls(tmp_path):
    run = storage.RunDir(f"gs://{BUCKET}/r1", staging_root=tmp_path)
    assert str(run.checkpoints) == f"gs://{BUCKET}/r1/checkpoints" and run.remote
    assert run.local.is_relative_to(tmp_path)
    local = storage.RunDir("runs/r1")
    assert not local.remote and local.local == Path("runs/r1")
    assert str(local.checkpoints) == str(Path("runs/r1/checkpoints").absolute())


# ----------------------------------------------------------------------------- checkpoints in the bucket


def _state(step: int) -> dict:
    return {"step": jnp.asarray(step, jnp.int32), "adapter": {"w": jnp.full((4, 2), float(step))}}


def test_checkpoints_heal_inside_the_bucket(gcs):
    state = _state(0)
    abstract = {"step": jnp.zeros((), jnp.int32), "adapter": {"w": jnp.zeros((4, 2))}}
    meta = expected_meta({"layers": 1}, {"rank": 2}, state)
    directory = f"gs://{BUCKET}/heal/checkpoints"
    checkpoints = Checkpoints(directory, keep=2, meta=meta)
    for step in (2, 4):
        checkpoints.save(step, _state(step), {"row": step})
    checkpoints.close()
    fs = gcsfs.GCSFileSystem()
    for name in fs.find(f"{BUCKET}/heal/checkpoints/4/state"):  # a write cut off: every object emptied
        fs.pipe(name, b"")
    resumed = Checkpoints(directory, keep=2, meta=meta)
    restored = resumed.restore_latest(abstract)
    assert restored.step == 2 and float(np.asarray(restored.state["adapter"]["w"])[0, 0]) == 2.0
    assert resumed.all_steps() == [2]
    resumed.close()
    files = bucket_files("heal/checkpoints")
    assert any(f.startswith("corrupt/4/state/") for f in files) and not any(f.startswith("4/") for f in files)


# ----------------------------------------------------------------------------- the spot cycle, end to end


def _upload_seeds() -> str:
    """The shipped seed JSONL files, copied into the bucket; returns their gs:// directory."""
    fs = gcsfs.GCSFileSystem()
    for path in sorted((REPO / "data_prep" / "seeds").glob("*.jsonl")):
        fs.pipe(f"{BUCKET}/data/seeds/{path.name}", path.read_bytes())
    return f"gs://{BUCKET}/data/seeds"


def test_inputs_in_the_bucket_are_fetched_once(gcs, tmp_path):
    url = _upload_seeds()
    local = Path(storage.localize(url, cache_root=tmp_path))
    names = sorted(p.name for p in (REPO / "data_prep" / "seeds").glob("*.jsonl"))
    assert sorted(p.name for p in local.iterdir()) == names and local.is_relative_to(tmp_path)
    assert (local / names[0]).read_bytes() == (REPO / "data_prep" / "seeds" / names[0]).read_bytes()
    single = storage.localize(f"{url}/{names[0]}", cache_root=tmp_path)
    assert Path(single).read_bytes() == (local / names[0]).read_bytes()
    assert storage.localize("data_prep/seeds") == "data_prep/seeds"  # local paths pass through
    with pytest.raises(FileNotFoundError, match=rf"gs://{BUCKET}/nope.jsonl: no such file"):
        storage.localize(f"gs://{BUCKET}/nope.jsonl", cache_root=tmp_path)


def _train(gcs_env: dict, run_dir: str, staging: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, **gcs_env, "PYTHONPATH": str(REPO), "LLAMA_E_SPOT": "1",
           "LLAMA_E_STAGING_DIR": str(staging), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "llama_e_jax.train", "--config", "tiny", f"--config.run_dir={run_dir}",
               f"--config.data.files=gs://{BUCKET}/data/seeds", "--config.train.checkpoint_every=2",
               "--config.export.peft=True", *extra]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _train_steps(metrics_jsonl: str) -> list[int]:
    return [json.loads(line)["step"] for line in metrics_jsonl.splitlines() if '"kind": "train"' in line]


def test_train_preempt_resume_export_all_in_the_bucket(gcs, tmp_path):
    run_dir = f"gs://{BUCKET}/spot"
    _upload_seeds()  # the training data is read from the bucket too
    first = _train(gcs, run_dir, tmp_path / "disk1", "--config.train.steps=10000")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:  # until the step-2 checkpoint is in the bucket
        if any(name.startswith("checkpoints/2/") for name in bucket_files("spot")):
            break
        time.sleep(0.5)
    assert first.poll() is None, first.communicate()[0]
    first.send_signal(signal.SIGTERM)
    output, _ = first.communicate(timeout=120)
    assert first.returncode == 0 and "stopped by SIGTERM after step" in output, output
    stopped = int(output.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert _train_steps(read_bucket("spot/metrics.jsonl")) == list(range(1, stopped + 1))
    assert f"checkpoints/{stopped}/commit_success.txt" in bucket_files("spot")

    # the VM is recreated: a fresh disk (another staging directory), the same command, two more steps
    second = _train(gcs, run_dir, tmp_path / "disk2", f"--config.train.steps={stopped + 2}")
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output
    assert f"resumed from gs://{BUCKET}/spot/checkpoints at step {stopped}" in output
    files = bucket_files("spot")
    assert _train_steps(read_bucket("spot/metrics.jsonl")) == list(range(1, stopped + 3))  # one history
    assert {"config.json", "adapter/adapter_config.json", "peft_adapter/adapter_config.json",
            "peft_adapter/adapter_model.safetensors", f"checkpoints/{stopped + 2}/commit_success.txt"} <= files, files
    assert any(name.startswith("tensorboard/") for name in files)
    assert not (REPO / "gs:").exists()  # the old bug: a local folder named gs: in the working directory
