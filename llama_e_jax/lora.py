"""LoRA: low-rank adapters on the attention projections of a frozen LLaMA.

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
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

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
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        in_features = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (in_features, self.features), self.param_dtype
        )
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.lora is None:
            return y
        lora_a = self.variable(
            "lora", "lora_a", lambda: _peft_uniform_init(self.make_rng("params"), (in_features, self.lora.rank))
        ).value
        lora_b = self.variable("lora", "lora_b", lambda: jnp.zeros((self.lora.rank, self.features), jnp.float32)).value
        x_adapter = nn.Dropout(self.lora.dropout)(x, deterministic=self.deterministic)
        update = jnp.dot(jnp.dot(x_adapter.astype(self.dtype), lora_a.astype(self.dtype)), lora_b.astype(self.dtype))
        return y + (self.lora.scale * update).astype(y.dtype)
