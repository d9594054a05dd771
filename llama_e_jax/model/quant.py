"""Lean decode weights: the frozen projection kernels stored as bfloat16 or int8 (weight-only).

    params = quantize_params(params, "int8")   # every q/k/v/o/gate/up/down kernel -> int8 + kernel_scale
    params = quantize_params(params, "bfloat16")  # the same kernels cast to bf16
    params = quantize_params(params, "float32")   # unchanged

Design, and why:

* **Weight-only, per output channel, symmetric.** Column j of a kernel W [in, out] is stored as
  q[:, j] = round(W[:, j] / s_j) in int8 with s_j = max_i |W[i, j]| / 127, so every column uses
  the full [-127, 127] range whatever its magnitude, and no zero point is needed. Activations stay
  in the compute dtype: y = (x · q) * s, which is exactly x · (q * s) because the scale is per
  column. Each weight is off by at most s_j / 2 (rounding to the nearest integer step).
* **Same params dict, one extra leaf.** The quantized kernel keeps its name and shape (`kernel`,
  int8, [.., in, out], a leading L when layers are stacked) and gains `kernel_scale` [.., out]
  (fp32) next to it. `LoraLinear` (model/lora.py) multiplies its output by `kernel_scale` when the
  leaf exists, so the model, the sharding rules (which match `kernel`) and `split_layers` need no
  other change.
* **Only the frozen projections.** Embeddings (also the tied output layer), norms and an untied
  `lm_head` stay as they are: they are a small part of a 7B model's weights, and the output layer
  is where rounding hurts the logits most directly.
* **After merging.** An adapter merged into the weights (`lora.merge`) must be merged into the float
  kernels first: merging into int8 would ignore the scale. `Generator(weights=...)` therefore applies
  this after its merge; callers that merge themselves do the same.
* **What it buys, measured** (docs/benchmarks.md, "Lean decode weights"): int8 cuts the projection
  bytes 4x; on XLA:CPU the int8 -> f32 convert is not fused into the dot (each step materialises
  an f32 copy of the kernel), so it saves memory but not time on this backend.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("float32", "bfloat16", "int8")
DEFAULT_MODE = "float32"
PROJECTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KERNEL, SCALE = "kernel", "kernel_scale"
INT8_MAX = 127  # symmetric: -128 is never used, so negation is exact


class QuantizationError(ValueError):
    """A mode or a params tree that cannot be quantized (the message says which and why)."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise QuantizationError(f"weights={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def quantize_kernel(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """kernel [.., in, out] float -> (q int8 [.., in, out], scale float32 [.., out]).

    scale = max |column| / 127 (1 for an all-zero column, which then stays zero exactly);
    |q * scale - kernel| <= scale / 2 element-wise.
    """
    kernel = jnp.asarray(kernel, jnp.float32)
    amax = jnp.max(jnp.abs(kernel), axis=-2)  # [.., out]
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(kernel / scale[..., None, :]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def dequantize_kernel(q: jax.Array, scale: jax.Array) -> jax.Array:  # [.., in, out] float32
    return q.astype(jnp.float32) * scale[..., None, :]


_quantize_kernel_jit = jax.jit(quantize_kernel)


def quantize_params(params: dict, mode: str) -> dict:
    """Base params with every decoder projection kernel stored as `mode` (see module doc).

    Works on stacked ([L, in, out]) and unrolled (`split_layers`) layouts; leaves outside the
    projections are returned as they are (the same objects). Raises QuantizationError for an
    unknown mode or kernels that are already int8.
    """
    check_mode(mode)
    if mode == "float32":
        return params
    if "layers" not in params:
        raise QuantizationError(f"params have no 'layers' subtree (top-level keys: {sorted(params)})")
    return {**params, "layers": _map_projections(params["layers"], mode, path="layers")}


def _map_projections(tree: Any, mode: str, path: str) -> Any:
    if not isinstance(tree, dict):
        return tree
    if KERNEL in tree and path.rsplit("/", 1)[-1] in PROJECTION_NAMES:
        return _convert_projection(tree, mode, path)
    return {name: _map_projections(child, mode, f"{path}/{name}") for name, child in tree.items()}


def _convert_projection(leaves: dict, mode: str, path: str) -> dict:
    kernel = leaves[KERNEL]
    if SCALE in leaves or jnp.dtype(kernel.dtype) == jnp.int8:
        raise QuantizationError(f"{path}/{KERNEL}: already int8 (dequantize before converting to {mode})")
    if mode == "bfloat16":
        return {**leaves, KERNEL: jnp.asarray(kernel).astype(jnp.bfloat16)}
    q, scale = _quantize_kernel_jit(kernel)
    return {**leaves, KERNEL: q, SCALE: scale}


def weight_bytes(params: dict) -> int:
    """Bytes of all param leaves (what a decode step reads, plus the embedding table)."""
    return int(sum(np.dtype(leaf.dtype).itemsize * int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--weights` flag shared by generate, serve and evaluate."""
    parser.add_argument("--weights", choices=MODES, default=DEFAULT_MODE,
                        help="storage of the frozen projection kernels while decoding: float32 (default), "
                             "bfloat16, or int8 weight-only with per-channel scales (4x smaller; on XLA:CPU "
                             "not faster, see docs/benchmarks.md)")


def from_arguments(args: argparse.Namespace) -> str:
    return check_mode(args.weights)
