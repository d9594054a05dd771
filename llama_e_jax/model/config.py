"""Model configuration: one frozen dataclass for every LLaMA-family checkpoint we support.

Why a frozen dataclass and not a dict: the config is a static argument of jit-compiled functions and
an attribute of Flax modules, so it must be hashable, and a typo in a field name must fail loudly.
Everything that describes a checkpoint (HF `config.json`, a GGUF header, a named preset) is converted
into this one shape at the edge, with errors that name the offending field; the model never sees
HF's naming drift (LLaMA-1 vs Llama-3 vs transformers 5's `rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import configs

# Presets ship inside the installed `configs` package (package data), in a checkout and in a wheel alike.
PRESETS_DIR = Path(configs.__file__).resolve().parent / "models"

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "mlp_dots_saveable")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A checkpoint or preset describes something this model cannot represent."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-frequency rescaling for long contexts.

    `rope_type="linear"` divides positions by `factor`; `"llama3"` is Llama-3.1's piecewise rule that
    leaves high frequencies alone, divides low ones by `factor` and interpolates in between.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and numerics of a LLaMA-family decoder.

    Attributes:
      vocab_size: V, rows of the embedding table.
      hidden_size: D, the residual stream width.
      intermediate_size: F, the SwiGLU hidden width.
      num_layers: L, decoder blocks (stacked and scanned).
      num_heads: H, query heads.
      num_kv_heads: K, key/value heads (K divides H; K < H is grouped-query attention).
      head_dim: Dh, width of one head.
      rope_theta: rotary base frequency.
      rope_scaling: optional long-context rescaling of the rotary frequencies.
      rms_norm_eps: epsilon inside RMSNorm.
      tie_word_embeddings: the output head reuses the embedding table.
      max_position_embeddings: context length the checkpoint was trained for.
      bos_token_id / eos_token_ids / pad_token_id: special token ids from the checkpoint.
      param_dtype: storage dtype of the base weights ("float32" or "bfloat16").
      dtype: compute dtype of matmuls and attention.
      remat_policy: what the backward pass keeps instead of recomputing, one of REMAT_POLICIES.
      attention_impl: "auto" picks cuDNN flash attention on GPU for bf16/fp16 causal attention.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat_policy: str = "none"
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy={self.remat_policy!r}, expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl={self.attention_impl!r}, expected one of {ATTENTION_IMPLS}")

    def replace(self, **changes: Any) -> "LlamaConfig":
        """A copy with some fields changed (e.g. dtypes chosen by a training recipe)."""
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Parameter count of the base model (embeddings and head included)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = d * q_out * 2 + d * kv_out * 2 + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_layers * per_layer + d + head

    # ----------------------------------------------------------------- HF config.json <-> ours

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json", **overrides: Any) -> "LlamaConfig":
        """Reads an HF `config.json` dict (LLaMA-1/2/3, SmolLM2; transformers 4 or 5 naming)."""
        _check_architecture(hf, source)
        heads = _require(hf, "num_attention_heads", source)
        hidden = _require(hf, "hidden_size", source)
        rope = hf.get("rope_parameters") or {}
        eos = hf.get("eos_token_id", 2)
        fields = dict(
            vocab_size=_require(hf, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_require(hf, "intermediate_size", source),
            num_layers=_require(hf, "num_hidden_layers", source),
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rope_scaling=_rope_scaling_from_hf(hf.get("rope_scaling") or rope, source),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
            pad_token_id=hf.get("pad_token_id"),
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf_dir(cls, path: str | Path, **overrides: Any) -> "LlamaConfig":
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise ConfigError(f"{config_path}: no config.json in the checkpoint directory")
        return cls.from_hf_dict(json.loads(config_path.read_text()), source=str(config_path), **overrides)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """A named preset from `configs/models/<name>.json` (HF config.json format)."""
        path = PRESETS_DIR / f"{name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
            raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(known)}")
        return cls.from_hf_dict(json.loads(path.read_text()), source=str(path), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF `config.json` dict that transformers' LlamaForCausalLM loads."""
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters = {
                **dataclasses.asdict(self.rope_scaling),
                "rope_theta": self.rope_theta,
            }
        eos = list(self.eos_token_ids)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope_parameters,
            "rope_scaling": None if self.rope_scaling is None else rope_parameters,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": self.pad_token_id,
            "attention_bias": False,
            "mlp_bias": False,
            "dtype": self.param_dtype,
        }


def _require(hf: dict[str, Any], field: str, source: str) -> Any:
    if field not in hf:
        raise ConfigError(f"{source}: missing field {field!r}")
    return hf[field]


def _check_architecture(hf: dict[str, Any], source: str) -> None:
    model_type = hf.get("model_type", "llama")
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    if model_type != "llama" or "LlamaForCausalLM" not in architectures:
        raise ConfigError(
            f"{source}: unsupported architecture (model_type={model_type!r}, "
            f"architectures={architectures}); only LlamaForCausalLM is supported"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConfigError(f"{source}: field {flag}=true is not supported (LLaMA has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: field hidden_act={hf['hidden_act']!r} is not supported, expected 'silu'")


def _rope_scaling_from_hf(raw: dict[str, Any], source: str) -> RopeScaling | None:
    rope_type = raw.get("rope_type") or raw.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: field rope_scaling.rope_type={rope_type!r} is not supported "
                          f"(supported: {SUPPORTED_ROPE_TYPES})")
    if rope_type == "default":
        return None
    return RopeScaling(
        rope_type=rope_type,
        factor=float(raw["factor"]),
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
    )
