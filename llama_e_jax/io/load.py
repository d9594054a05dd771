"""One loader: every entry point (train, generate, serve, evaluate, aot, the notebook) gets its model here.

    loaded = load_model()                                   # the embedded SmolLM2-135M-Instruct
    loaded = load_model("/ckpt/llama-2-7b-hf", adapter="runs/ads/adapter", dtype="bfloat16", mesh=mesh)
    loaded = load_model("tiny")                             # a preset: random weights (seed 0), byte tokenizer

Design, and why:

* **One function, every source.** `model` is None (the embedded default), a `.gguf` file, an HF
  checkpoint directory (config.json + safetensors) or a preset name from configs/models/ (random
  weights, for tests and fit checks). Whatever the source, the caller gets the same `LoadedModel`,
  so a test of this function is a test of what training and serving run.
* **The default loads from its converted copy.** The embedded GGUF is dequantised once into an HF
  directory (`default_model.ensure_default_hf_dir`, done by `make setup`); every later start reads
  that: 0.9 s for weights and tokenizer against 13.5 s to dequantise the Q4_1 file and rebuild its
  tokenizer, with bit-identical params and the same token ids.
* **Born where it lives.** With a `mesh`, an HF checkpoint is read slice by slice straight into its
  shards (`CheckpointReader` + `sharding.load_sharded`: each host reads only its devices' bytes), and
  random weights are initialised by a jit whose outputs are already sharded. A GGUF (small models
  only) is read on the host and then placed. Without a mesh, params are ordinary device arrays.
* **Adapters are kept apart.** The adapter (ours or PEFT, told apart by `adapters.load_any_adapter`)
  is returned unmerged next to the base; merging is the caller's choice (evaluate merges, decoding
  and training keep it separate).
* **One error type for bad input.** Anything wrong with a file the caller named raises
  `ModelLoadError` ("path: what is wrong"), a ValueError, with the original error chained.
* **No hidden state.** Nothing is cached between calls: a second call loads again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from llama_e_jax.io import adapters as adapters_io
from llama_e_jax.io import gguf_file, weights
from llama_e_jax.io.default_model import DefaultModelError, ensure_default_hf_dir
from llama_e_jax.io.tokenizer import ByteTokenizer, TokenizerError, load_tokenizer
from llama_e_jax.model import sharding
from llama_e_jax.model.config import PRESETS_DIR, ConfigError, LlamaConfig
from llama_e_jax.model.llama import Llama
from llama_e_jax.model.lora import AdapterError, LoraConfig

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF is (PEFT's base model name)
DEFAULT_MODEL_PRESET = "smollm2_135m"  # its shape, as a preset in configs/models/
BYTES = "bytes"  # the `tokenizer` value for UTF-8 bytes as ids (random presets)


class ModelLoadError(ValueError):
    """A model, tokenizer or adapter source that cannot be loaded; the message starts with the path."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A base model ready to run, and the adapter that goes with it (if any).

    Attributes:
      config: the model config; `.dtype` is the requested compute dtype, `.param_dtype` the storage one.
      params: base params, layers stacked (model/llama.py layout); on `mesh` if one was given.
      tokenizer: an `io.tokenizer.Tokenizer`, or a `ByteTokenizer` for random presets.
      adapter: the LoRA tree (fp32 numpy leaves), unmerged, or None.
      lora_config: the adapter's settings, or None.
      description: the source in words, for reports and logs.
      tokenizer_source: what an HF export copies tokenizer files from (a directory, or the tokenizer
        itself when it came from a GGUF); None for the byte tokenizer.
    """

    config: LlamaConfig
    params: dict
    tokenizer: Any
    adapter: Any | None
    lora_config: LoraConfig | None
    description: str
    tokenizer_source: Any


def load_model(
    model: str | None = None,
    *,
    adapter: str | None = None,
    tokenizer: str | None = None,
    dtype: str = "float32",
    param_dtype: str | None = None,
    mesh: Mesh | None = None,
) -> LoadedModel:
    """Loads a base model (and optionally an adapter) from any supported source.

    Args:
      model: None (the embedded SmolLM2-135M-Instruct), a `.gguf` file, an HF checkpoint directory, or
        a preset name in configs/models/ (random weights, seed 0).
      adapter: an adapter directory, our format or PEFT's.
      tokenizer: None (the checkpoint's own; bytes for presets), "bytes", an HF tokenizer dir or a GGUF.
      dtype: compute dtype ("float32", "bfloat16").
      param_dtype: storage dtype of the base params; None = `dtype`.
      mesh: place (and, for HF checkpoints and presets, create) the params sharded on this mesh.
    Raises:
      ModelLoadError: a path that is not a model, or a file that does not fit (the message says which).
    """
    param_dtype = param_dtype or dtype
    try:
        config, params, checkpoint, description = _load_base(model, param_dtype, mesh)
        loaded_tokenizer, tokenizer_source = _load_tokenizer(tokenizer, checkpoint)
        config = config.replace(dtype=dtype)
        adapter_tree, lora_config = (None, None) if adapter is None else _load_adapter(adapter, config)
    except ModelLoadError:
        raise
    except (weights.CheckpointError, ConfigError, TokenizerError, AdapterError, DefaultModelError, OSError) as error:
        raise ModelLoadError(str(error)) from error
    return LoadedModel(config, params, loaded_tokenizer, adapter_tree, lora_config, description, tokenizer_source)


def load_config(model: str | None = None, *, dtype: str = "float32", param_dtype: str | None = None) -> LlamaConfig:
    """The config `load_model(model, ...)` would return, from metadata alone (no weights are read).

    For the embedded default it is the `smollm2_135m` preset, the GGUF's shape, so nothing is
    downloaded. Used where only shapes matter: the TPU fit check (aot.py).
    """
    dtypes = dict(dtype=dtype, param_dtype=np.dtype(param_dtype or dtype).name)
    try:
        if model is None:
            return LlamaConfig.from_preset(DEFAULT_MODEL_PRESET, **dtypes)
        path = Path(model)
        if path.suffix == ".gguf" and path.is_file():
            return gguf_file.gguf_config(gguf_file.open_gguf(path), path).replace(**dtypes)
        if path.is_dir() and (path / "config.json").is_file():
            return LlamaConfig.from_hf_dir(path, **dtypes)
        if (PRESETS_DIR / f"{model}.json").is_file():
            return LlamaConfig.from_preset(model, **dtypes)
    except (weights.CheckpointError, ConfigError, OSError, ValueError) as error:
        raise ModelLoadError(f"{model}: {error}") from error
    raise ModelLoadError(_not_a_model(model))


def _load_base(model: str | None, param_dtype: str, mesh: Mesh | None) -> tuple[LlamaConfig, dict, Path | None, str]:
    """(config, params, checkpoint path or None for presets, description)."""
    if model is None:  # its converted HF copy, read as any HF directory is
        config, params, path, _ = _load_base(str(ensure_default_hf_dir()), param_dtype, mesh)
        return config, params, path, f"{DEFAULT_MODEL_NAME} (embedded default)"
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        config, params = gguf_file.load_gguf(path, dtype=param_dtype)
        return config, _place(params, mesh), path, str(path)
    if path.is_dir() and (path / "config.json").is_file():
        config = LlamaConfig.from_hf_dir(path, param_dtype=np.dtype(param_dtype).name)
        return config, _load_hf(path, config, mesh), path, str(path)
    if (PRESETS_DIR / f"{model}.json").is_file():
        config = LlamaConfig.from_preset(model, param_dtype=np.dtype(param_dtype).name)
        return config, random_params(config, seed=0, mesh=mesh), None, f"preset {model} (random weights, seed 0)"
    raise ModelLoadError(_not_a_model(model))


def _not_a_model(model: str) -> str:
    if Path(model).exists():
        return f"{model}: not a .gguf file or an HF checkpoint directory (no config.json)"
    known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.json")))
    return f"{model}: no such file or directory, and not a model preset ({known})"


def _load_hf(path: Path, config: LlamaConfig, mesh: Mesh | None) -> dict:
    """Without a mesh: the whole checkpoint. With one: each host reads only its devices' slices."""
    if mesh is None:
        return weights.load_hf_checkpoint(path, config=config)[1]
    with weights.CheckpointReader(path, config) as reader:
        return sharding.load_sharded(reader, abstract_params(config), mesh)


def abstract_params(config: LlamaConfig) -> Any:
    """ShapeDtypeStructs of the base params (no memory touched)."""
    return jax.eval_shape(lambda: _init(config, jax.random.key(0)))


def random_params(config: LlamaConfig, seed: int = 0, mesh: Mesh | None = None) -> dict:
    """The model's own initialisation of random base params; born sharded on `mesh` when given."""
    init = jax.jit(lambda key: _init(config, key),
                   out_shardings=None if mesh is None else sharding.param_shardings(abstract_params(config), mesh))
    return init(jax.random.key(seed))


def _init(config: LlamaConfig, key: jax.Array) -> dict:
    return Llama(config).init(key, np.zeros((1, 2), np.int32))["params"]


def _place(params: dict, mesh: Mesh | None) -> dict:
    return params if mesh is None else jax.device_put(params, sharding.param_shardings(params, mesh))


def _load_tokenizer(choice: str | None, checkpoint: Path | None) -> tuple[Any, Any]:
    """(tokenizer, what an HF export copies it from): `choice`, else the checkpoint's own, else bytes."""
    if choice == BYTES or (not choice and checkpoint is None):
        return ByteTokenizer(), None
    source = Path(choice or checkpoint)
    tokenizer = load_tokenizer(source)
    return tokenizer, (tokenizer if source.suffix == ".gguf" else source)  # a GGUF has no files to copy


def _load_adapter(directory: str, config: LlamaConfig) -> tuple[Any, LoraConfig]:
    if not Path(directory).is_dir():
        raise ModelLoadError(f"{directory}: adapter directory not found")
    return adapters_io.load_any_adapter(directory, config)
