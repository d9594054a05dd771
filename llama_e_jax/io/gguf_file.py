"""GGUF import: a llama.cpp LLaMA file (the embedded default model ships as one) into our parameter tree.

Why it is built this way:

* The same `param_specs` table that drives the HF import and export (io/weights.py) names every GGUF
  tensor, so validation and loading read one source of truth.
* The `gguf` package dequantizes any quantization it knows to numpy (no torch, no llama.cpp build).
* llama.cpp stores q/k rows per head as interleaved rotary pairs; `_undo_rotary_permutation` restores
  HF's rotate-half order, after which q/k equal transformers' weights exactly (docs: PITFALLS).
* The whole file is validated against its own metadata before anything is assembled: one error lists
  every missing, misshapen or unexpected tensor, and no half-loaded tree is returned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from llama_e_jax.io.weights import CheckpointError, ParamSpec, _assemble, param_specs
from llama_e_jax.model.config import ConfigError, LlamaConfig, RopeScaling


def gguf_config(reader: Any, path: str | Path = "<gguf>") -> LlamaConfig:
    """A LlamaConfig from a GGUF file's `general.*` / `llama.*` / `tokenizer.ggml.*` metadata."""
    meta = {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("tokenizer.ggml.") or name.endswith("_id")}

    def need(key: str) -> Any:
        if key not in meta:
            raise ConfigError(f"{path}: missing GGUF metadata field {key}")
        return meta[key]

    architecture = meta.get("general.architecture")
    if architecture != "llama":
        raise ConfigError(f"{path}: field general.architecture={architecture!r} is not supported, expected 'llama'")
    hidden, heads = int(need("llama.embedding_length")), int(need("llama.attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    rotary_dim = int(meta.get("llama.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ConfigError(f"{path}: field llama.rope.dimension_count={rotary_dim} != head_dim {head_dim} "
                          "(partial rotary is not supported)")
    tensor_names = {tensor.name for tensor in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ConfigError(f"{path}: tensor rope_freqs.weight (Llama-3.1 rope scaling baked into the file) is not "
                          "supported in GGUF import; load the HF checkpoint instead")
    vocab = meta.get("llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("llama.feed_forward_length")),
        num_layers=int(need("llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=_shortest_float(meta.get("llama.rope.freq_base", 10000.0)),
        rope_scaling=_gguf_rope_scaling(meta, path),
        rms_norm_eps=_shortest_float(need("llama.attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensor_names,
        max_position_embeddings=int(meta.get("llama.context_length", 2048)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def _shortest_float(value: float) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.99999974e-06; give the value it was written from."""
    return float(str(np.float32(value)))


def _gguf_rope_scaling(meta: dict[str, Any], path: str | Path) -> RopeScaling | None:
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=float(meta["llama.rope.scaling.factor"]))
    raise ConfigError(f"{path}: field llama.rope.scaling.type={kind!r} is not supported (none, linear)")


def _undo_rotary_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:  # [out, in] -> [out, in]
    """llama.cpp stores q/k rows per head as interleaved pairs; HF's rotate-half wants halves."""
    out_features, in_features = weight.shape
    return weight.reshape(num_heads, out_features // num_heads // 2, 2, in_features).swapaxes(1, 2).reshape(
        out_features, in_features
    )


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A reader of the file's header; a truncated or foreign file is one CheckpointError naming it.

    gguf's parser reports bad bytes as whatever numpy or struct raise (IndexError, ValueError, ...),
    so every exception of the header parse is turned into the one clear error here.
    """
    try:
        return gguf.GGUFReader(str(path))
    except Exception as error:  # noqa: BLE001  (see docstring)
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error})") from None


def load_gguf(path: str | Path, dtype: str = "float32") -> tuple[LlamaConfig, dict]:
    """Loads a llama.cpp GGUF LLaMA (any quantization `gguf` can dequantize) into our parameter tree.

    Quantized tensors are dequantized to float32 and cast to `dtype`. Returns (config, params).
    """
    path = Path(path)
    reader = open_gguf(path)
    config = gguf_config(reader, path).replace(param_dtype=np.dtype(dtype).name)
    specs = param_specs(config)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    _validate_gguf(tensors, specs, config, path)

    def fetch(spec: ParamSpec, layer: int | None) -> np.ndarray:
        tensor = tensors[spec.gguf_name.format(i=layer)]
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # file layout, e.g. [out, in]
        weight = weight.reshape(spec.file_shape())
        if spec.rotary_heads is not None:
            weight = _undo_rotary_permutation(weight, getattr(config, spec.rotary_heads))
        return weight.T if spec.transposed else weight

    return config, _assemble(specs, config, np.dtype(dtype), fetch)


def _validate_gguf(tensors: dict[str, Any], specs: list[ParamSpec], config: LlamaConfig, path: Path) -> None:
    problems, expected = [], set()
    for spec in specs:
        names = [spec.gguf_name.format(i=i) for i in range(config.num_layers)] if spec.layered else [spec.gguf_name]
        for name in names:
            expected.add(name)
            if name not in tensors:
                problems.append(f"missing tensor {name}")
                continue
            shape = tuple(int(n) for n in reversed(tensors[name].shape))  # GGML lists dims innermost first
            if shape != spec.file_shape():
                problems.append(f"tensor {name}: expected shape {list(spec.file_shape())}, found {list(shape)}")
    problems += [f"unexpected tensor {name}" for name in sorted(set(tensors) - expected)]
    if problems:
        raise CheckpointError(f"{path}: GGUF does not match its metadata:\n  " + "\n  ".join(problems))
