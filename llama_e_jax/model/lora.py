"""LoRA: low-rank adapters on the projections of a frozen LLaMA — the layer, the adapter tree and
merging. The file formats (our own and HF PEFT's) live in `llama_e_jax.io.adapters`.

How base and adapter are split. Every projection of the model is a `LoraLinear`. Its frozen weight
lives in the `params` collection; when the projection is targeted, its adapter matrices `lora_a`
[in, r] and `lora_b` [r, out] live in a separate `lora` collection. The two trees are passed to
`model.apply({'params': base, 'lora': adapter}, ...)` side by side, so differentiating with respect to
the adapter alone gives the base no gradients and no optimizer state, and the base can stay in bf16
while the adapter is fp32. Because the model scans over layers, adapter leaves are stacked like the
base: `lora_a` is [L, in, r].

The forward is unmerged: y = x·W + (alpha/r)·dropout(x)·A·B, never forming W + s·A·B, so the adapter
costs two thin matmuls. A is initialised as PEFT does (uniform ±1/sqrt(in), torch's kaiming_uniform
with a=sqrt(5)) and B is zero, so step 0 is exactly the base model.

Everything else works on the adapter tree as plain arrays, addressed by the projection's path in a
block ("attn/q_proj", the string `LoraConfig.targets` is matched against):

* `init_adapter` builds a fresh tree from shapes alone (`adapter_shapes`), without the base weights.
* `merge` / `unmerge` fold s·A·B into (out of) the base kernels for export or adapter-free serving.
* `model_shape` is what an adapter file records about its model (io/adapters.py checks it on load).

Serving several adapters at once does not use the `lora` collection: adapter_stack.py puts them all
into per-slot tables in `params` (`lora_stack_a` / `lora_stack_b`), and `LoraLinear` adds each row's
own slot when called with `adapter_ids` [B] (`_stacked_update`). An int8 kernel (model/quant.py) has a
per-column `kernel_scale` [out] beside it, applied after the matmul.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_e_jax.model.config import LlamaConfig

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which projections get adapters and how big they are.

    Defaults are the LLaMA-E authors' released recipe: r=8, alpha=16, dropout 0.05 on q, k, v, o.

    Attributes:
      rank: r, the inner width of A·B.
      alpha: scale numerator; the adapter output is multiplied by alpha / rank.
      dropout: dropout rate on the adapter input during training.
      targets: regular expressions searched in a projection's path ("attn/q_proj", "mlp/up_proj");
        a projection is adapted when any pattern matches.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def targets_path(self, path: str) -> bool:
        """Whether the projection at `path` (e.g. "attn/q_proj") gets an adapter."""
        return any(re.search(pattern, path) for pattern in self.targets)


def _peft_uniform_init(rng: jax.Array, shape: tuple[int, int]) -> jax.Array:
    fan_in = shape[0]
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


class LoraLinear(nn.Module):
    """A bias-free linear layer `x @ kernel` with an optional low-rank adapter.

    Attributes:
      features: output width.
      lora: adapter settings, or None for a plain frozen projection.
      dtype: compute dtype; param_dtype: storage dtype of the base kernel.
      deterministic: disables adapter dropout (evaluation and decoding).
    """

    features: int
    lora: LoraConfig | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, adapter_ids: jax.Array | None = None) -> jax.Array:  # [..., in] -> [..., out]
        """`adapter_ids` [B] (x is then [B, T, in]): each row's slot in the stacked adapter tables, used
        only when the params hold them (model/adapter_stack.py; slot 0 = the base)."""
        in_features = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (in_features, self.features), self.param_dtype
        )
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.has_variable("params", "kernel_scale"):  # int8 weight-only kernel (model/quant.py): per-column scale
            y = y * self.get_variable("params", "kernel_scale").astype(self.dtype)  # [out]
        if adapter_ids is not None and self.has_variable("params", STACK_A):
            y = y + self._stacked_update(x, adapter_ids).astype(y.dtype)
        if self.lora is None:
            return y
        lora_a = self.variable(
            "lora", "lora_a", lambda: _peft_uniform_init(self.make_rng("params"), (in_features, self.lora.rank))
        ).value
        lora_b = self.variable("lora", "lora_b", lambda: jnp.zeros((self.lora.rank, self.features), jnp.float32)).value
        x_adapter = nn.Dropout(self.lora.dropout)(x, deterministic=self.deterministic)
        update = jnp.dot(jnp.dot(x_adapter.astype(self.dtype), lora_a.astype(self.dtype)), lora_b.astype(self.dtype))
        return y + (self.lora.scale * update).astype(y.dtype)

    def _stacked_update(self, x: jax.Array, adapter_ids: jax.Array) -> jax.Array:  # [B, T, in] -> [B, T, out]
        """Each row's own adapter from the stacked tables (scale already folded into B).

        Prefill (T > 1) or more slots than rows: gather each row's [in, R] / [R, out] slices, then two
        thin batched matmuls. A decode step (T = 1) with N <= B slots: x times every slot's A at once
        (one [B, in] x [in, N*R] matmul), zero the slots that are not the row's own, times every B
        ([B, N*R] x [N*R, out]): it reads each table once instead of copying B slices of it, and the
        zeroed products add exactly nothing. When every row is on the base (slot 0) nothing is computed
        (`lax.cond`)."""
        table_a = self.get_variable("params", STACK_A)  # [N, in, R]
        table_b = self.get_variable("params", STACK_B)  # [N, R, out]
        slots = table_a.shape[0]
        x = x.astype(self.dtype)

        def dense() -> jax.Array:
            low = jnp.einsum("bti,nir->btnr", x, table_a.astype(self.dtype))
            own = adapter_ids[:, None, None, None] == jnp.arange(slots)[None, None, :, None]  # [B, 1, N, 1]
            return jnp.einsum("btnr,nro->bto", jnp.where(own, low, 0), table_b.astype(self.dtype))

        def gathered() -> jax.Array:
            row_a = jnp.take(table_a, adapter_ids, axis=0).astype(self.dtype)  # [B, in, R]
            row_b = jnp.take(table_b, adapter_ids, axis=0).astype(self.dtype)  # [B, R, out]
            return jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", x, row_a), row_b)

        update = dense if x.shape[1] == 1 and slots <= x.shape[0] else gathered
        # Every row on the base (slot 0, zeros): skip the tables altogether.
        zeros = lambda: jnp.zeros((*x.shape[:-1], table_b.shape[-1]), self.dtype)
        return jax.lax.cond(jnp.any(adapter_ids != 0), update, zeros)


# ===================================================================================== adapter trees
#
# An adapter tree mirrors the `lora` collection: {'layers': {'attn': {'q_proj': {'lora_a': [L, in, r],
# 'lora_b': [L, r, out]}, ...}, 'mlp': {...}}}. The functions below address a projection by its path
# inside a block ("attn/q_proj"), the same string `LoraConfig.targets` is matched against.

Adapter = dict  # the nested dict above; leaves are jax or numpy arrays

LORA_A, LORA_B = "lora_a", "lora_b"
# Several adapters at once (model/adapter_stack.py): per projection, params leaves [N, in, R] / [N, R, out]
# (stacked over layers: [L, N, ...]) next to `kernel`, slot 0 the base (zeros).
STACK_A, STACK_B = "lora_stack_a", "lora_stack_b"

class AdapterError(ValueError):
    """An adapter file or tree that does not fit the model or LoRA config (the message says what differs)."""


# Every projection inside a decoder block, in HF's order.
PROJECTIONS = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
               "mlp/down_proj")


def projection_shapes(model_config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every projection inside a decoder block, keyed by path ("attn/q_proj")."""
    c = model_config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {
        "attn/q_proj": (c.hidden_size, q_out),
        "attn/k_proj": (c.hidden_size, kv_out),
        "attn/v_proj": (c.hidden_size, kv_out),
        "attn/o_proj": (q_out, c.hidden_size),
        "mlp/gate_proj": (c.hidden_size, c.intermediate_size),
        "mlp/up_proj": (c.hidden_size, c.intermediate_size),
        "mlp/down_proj": (c.intermediate_size, c.hidden_size),
    }


def adapter_shapes(model_config: LlamaConfig, lora_config: LoraConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Path → {'lora_a': (L, in, r), 'lora_b': (L, r, out)} for every targeted projection."""
    layers, rank = model_config.num_layers, lora_config.rank
    return {
        path: {LORA_A: (layers, fan_in, rank), LORA_B: (layers, rank, fan_out)}
        for path, (fan_in, fan_out) in projection_shapes(model_config).items()
        if lora_config.targets_path(path)
    }


def flatten_adapter(adapter: Adapter) -> dict[str, dict[str, Any]]:
    """{'layers': {'attn': {'q_proj': {...}}}} → {'attn/q_proj': {'lora_a': .., 'lora_b': ..}}."""
    if set(adapter) != {"layers"}:
        raise AdapterError(f"adapter tree must have the single top-level key 'layers', found {sorted(adapter)}")
    return {f"{group}/{name}": leaves for group, projections in adapter["layers"].items()
            for name, leaves in projections.items()}


def unflatten_adapter(flat: dict[str, dict[str, Any]]) -> Adapter:
    """Inverse of `flatten_adapter`."""
    layers: dict[str, dict[str, Any]] = {}
    for path, leaves in flat.items():
        group, name = path.split("/")
        layers.setdefault(group, {})[name] = dict(leaves)
    return {"layers": layers}


def init_adapter(model_config: LlamaConfig, lora_config: LoraConfig, rng: jax.Array) -> Adapter:
    """A fresh adapter: A ~ U(±1/sqrt(in)) per layer (as PEFT), B = 0, all fp32.

    Built from shapes alone, so initialising a 30B model's adapter never touches the base weights.
    """
    flat = {}
    for index, (path, shapes) in enumerate(sorted(adapter_shapes(model_config, lora_config).items())):
        _, fan_in, _ = shapes[LORA_A]
        bound = 1.0 / math.sqrt(fan_in)
        key = jax.random.fold_in(rng, index)
        flat[path] = {
            LORA_A: jax.random.uniform(key, shapes[LORA_A], jnp.float32, -bound, bound),
            LORA_B: jnp.zeros(shapes[LORA_B], jnp.float32),
        }
    return unflatten_adapter(flat)


def check_adapter(adapter: Adapter, model_config: LlamaConfig, lora_config: LoraConfig, source: str) -> None:
    """Raises AdapterError listing every projection or shape in `adapter` that the configs do not expect."""
    expected = adapter_shapes(model_config, lora_config)
    found = flatten_adapter(adapter)
    problems = [f"missing adapter for {path}" for path in sorted(set(expected) - set(found))]
    problems += [f"unexpected adapter for {path} (not in targets {list(lora_config.targets)})"
                 for path in sorted(set(found) - set(expected))]
    for path in sorted(set(expected) & set(found)):
        for leaf in (LORA_A, LORA_B):
            shape = tuple(np.shape(found[path].get(leaf)))
            if shape != expected[path][leaf]:
                problems.append(f"{path}/{leaf}: shape {list(shape)}, expected {list(expected[path][leaf])} "
                                f"(num_layers={model_config.num_layers}, rank={lora_config.rank})")
    if problems:
        raise AdapterError(f"{source}: adapter does not fit the model:\n  " + "\n  ".join(problems))


# ===================================================================================== merge / unmerge


def _add_delta(base: dict, adapter: Adapter, scale: float) -> dict:
    """base with kernel += scale·A·B for every adapted projection, in fp32 then cast back."""
    layers = dict(base["layers"])
    for path, leaves in flatten_adapter(adapter).items():
        group, name = path.split("/")
        kernel = layers[group][name]["kernel"]  # [L, in, out]
        delta = jnp.einsum("lir,lro->lio", leaves[LORA_A], leaves[LORA_B], precision=jax.lax.Precision.HIGHEST)
        merged = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
        layers[group] = {**layers[group], name: {**layers[group][name], "kernel": merged}}
    return {**base, "layers": layers}


_add_delta_jit = jax.jit(_add_delta, static_argnums=2)
_add_delta_donating = jax.jit(_add_delta, static_argnums=2, donate_argnums=0)


def merge(base: dict, adapter: Adapter, lora_config: LoraConfig, *, donate_base: bool = False) -> dict:
    """Base params with the adapter folded in: W' = W + (alpha/r)·A·B, in W's dtype.

    `donate_base=True` lets XLA reuse the old base buffers for the result (the caller's `base` is then
    invalid), which halves peak memory when merging a large model for export.
    """
    step = _add_delta_donating if donate_base else _add_delta_jit
    return step(base, adapter, lora_config.scale)


def unmerge(merged: dict, adapter: Adapter, lora_config: LoraConfig, *, donate_base: bool = False) -> dict:
    """Inverse of `merge`: W = W' - (alpha/r)·A·B. Exact up to rounding in W's dtype (bf16 loses bits)."""
    step = _add_delta_donating if donate_base else _add_delta_jit
    return step(merged, adapter, -lora_config.scale)


# ===================================================================================== model shape
#
# What an adapter (or a checkpoint of one) records about the model it belongs to, so that loading it onto
# a different model names the differing fields instead of failing with a shape error.

_MODEL_SHAPE_FIELDS = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                       "vocab_size")


def model_shape(model_config: LlamaConfig) -> dict[str, int]:
    """The model fields an adapter (or a checkpoint of one) depends on."""
    return {field: getattr(model_config, field) for field in _MODEL_SHAPE_FIELDS}


def describe_differences(saved: dict[str, Any], current: dict[str, Any],
                         labels: tuple[str, str] = ("saved", "now")) -> list[str]:
    """"field: saved X, now Y" for every field whose value differs (None where absent)."""
    first, second = labels
    return [f"{key}: {first} {saved.get(key)!r}, {second} {current.get(key)!r}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


def lora_config_dict(lora_config: LoraConfig) -> dict[str, Any]:
    return {"rank": lora_config.rank, "alpha": lora_config.alpha, "dropout": lora_config.dropout,
            "targets": list(lora_config.targets)}
