"""Several LoRA adapters on one unmerged base: the stacked tables every row picks its adapter from.

Why this design. Merging (lora.merge) costs nothing per token but gives one full copy of the weights
per adapter, and one batch can only use one of them. Serving many adapters at once instead keeps the
base unmerged and puts every adapter of a projection into one table: `lora_stack_a` [N, in, R] and
`lora_stack_b` [N, R, out] per layer, N slots, R the largest rank. Each row of a batch carries its
slot index (`Llama(..., adapter_ids=[B])`); lora.LoraLinear gathers the row's slice and adds
x·A·B with two thin batched matmuls, so rows with different adapters share one forward pass and one
compiled step.

* Slot 0 is the base model: all zeros, it adds exactly nothing.
* An adapter of rank r < R fills the first r columns of A and rows of B; the zero padding adds
  nothing (exact). Its scale alpha/r is folded into B, so adapters with different alphas mix.
* A projection an adapter does not target stays zero in its slot; the stack has tables only for the
  union of projections its adapters target (`StackShape.targets`).
* The tables are ordinary params leaves next to each projection's `kernel`, stacked [L, N, ...]
  like every layer param, so `llama.split_layers` splits them for the unrolled decode, the sharding
  rules (sharding.py: split like the kernel they correct) place them, and params without them
  (training, merged decoding) take the old path untouched.
* Writing an adapter into a slot (`write_slot`) is one jitted scatter with the slot as a traced
  argument: loading adapter #k compiles nothing new once the first has been written. A stack too
  small (no free slot, a larger rank, a new projection) is rebuilt bigger (`attach` of a larger
  `StackShape`): new shapes, so the next decode step recompiles.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from llama_e_jax.model import sharding
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.model.llama import is_unrolled, split_layers
from llama_e_jax.model.lora import (
    LORA_A, LORA_B, PROJECTIONS, STACK_A, STACK_B, Adapter, AdapterError, LoraConfig, check_adapter,
    flatten_adapter, projection_shapes,
)


@dataclasses.dataclass(frozen=True)
class StackShape:
    """The size of the stacked tables: `slots` adapters (plus slot 0, the base), inner width `rank`,
    tables for the projections `targets` (paths such as "attn/q_proj", in PROJECTIONS order)."""

    slots: int
    rank: int
    targets: tuple[str, ...]

    @property
    def num_slots(self) -> int:  # N, the tables' slot dimension
        return self.slots + 1

    def fits(self, lora_config: LoraConfig) -> bool:
        return lora_config.rank <= self.rank and set(targeted_paths(lora_config)) <= set(self.targets)

    def grown(self, slots: int, configs: Iterable[LoraConfig]) -> "StackShape":
        """A shape holding `slots` adapters and every config in `configs` (never smaller than self)."""
        configs = list(configs)
        rank = max([self.rank, *(c.rank for c in configs)])
        paths = set(self.targets).union(*(targeted_paths(c) for c in configs))
        return StackShape(max(self.slots, slots), rank, tuple(p for p in PROJECTIONS if p in paths))


def targeted_paths(lora_config: LoraConfig) -> tuple[str, ...]:
    return tuple(path for path in PROJECTIONS if lora_config.targets_path(path))


def initial_shape(configs: Iterable[LoraConfig], slots: int, rank: int | None) -> StackShape:
    """The stack for `configs`: rank `rank` (default the largest given, at least 8), the union of
    their targets (q, k, v, o when none is given)."""
    configs = list(configs)
    paths = set().union(*(targeted_paths(c) for c in configs)) if configs else set(
        targeted_paths(LoraConfig()))
    rank = rank if rank is not None else max([8, *(c.rank for c in configs)])
    return StackShape(slots, rank, tuple(p for p in PROJECTIONS if p in paths))


def validate(adapter: Adapter, lora_config: LoraConfig, model_config: LlamaConfig, source: str) -> None:
    """Raises AdapterError naming each tensor that does not fit the model (with both shapes), an
    unknown projection, or a target pattern that matches no projection."""
    try:
        flat = flatten_adapter(adapter)
    except AdapterError as error:
        raise AdapterError(f"{source}: {error}") from None
    problems = [f"target {pattern!r} matches no projection of this model {list(PROJECTIONS)}"
                for pattern in lora_config.targets if not any(re.search(pattern, p) for p in PROJECTIONS)]
    for path, leaves in sorted(flat.items()):
        if path not in PROJECTIONS:
            found = {leaf: list(np.shape(value)) for leaf, value in leaves.items()}
            problems.append(f"{path}: not a projection of this model (tensors {found}; projections "
                            f"{list(PROJECTIONS)})")
    if problems:
        raise AdapterError(f"{source}: adapter does not fit the model:\n  " + "\n  ".join(problems))
    check_adapter(adapter, model_config, lora_config, source)  # names tensor, found and expected shapes


def slot_values(adapter: Adapter, lora_config: LoraConfig, shape: StackShape,
                model_config: LlamaConfig) -> dict[str, dict[str, np.ndarray]]:
    """One slot's content per table path: A [L, in, R], scale·B [L, R, out] in fp32, zero-padded
    from rank r to R; zeros for a projection the adapter does not target."""
    flat = flatten_adapter(adapter) if adapter else {}
    layers, r = model_config.num_layers, lora_config.rank
    values = {}
    for path in shape.targets:
        fan_in, fan_out = projection_shapes(model_config)[path]
        a = np.zeros((layers, fan_in, shape.rank), np.float32)
        b = np.zeros((layers, shape.rank, fan_out), np.float32)
        if path in flat:
            a[:, :, :r] = np.asarray(flat[path][LORA_A], np.float32)
            b[:, :r, :] = lora_config.scale * np.asarray(flat[path][LORA_B], np.float32)
        values[path] = {STACK_A: a, STACK_B: b}
    return values


def _group(path: str) -> tuple[str, str]:
    group, name = path.split("/")
    return group, name


def _weights_mesh(weights: dict) -> jax.sharding.Mesh | None:
    for leaf in jax.tree.leaves(weights["layers"]):
        leaf_sharding = getattr(leaf, "sharding", None)
        if isinstance(leaf_sharding, jax.sharding.NamedSharding):
            return leaf_sharding.mesh
    return None


def strip(weights: dict) -> dict:
    """`weights` without any stacked tables (the plain base params, same layout)."""
    def clean(tree):
        if not isinstance(tree, Mapping):
            return tree
        return {key: clean(value) for key, value in tree.items() if key not in (STACK_A, STACK_B)}
    return {**weights, "layers": clean(weights["layers"])}


def attach(weights: dict, shape: StackShape, model_config: LlamaConfig, dtype) -> dict:
    """`weights` (stacked or unrolled layout) with zeroed tables of `shape` (replacing any present),
    placed like the kernels they correct when the weights are sharded."""
    layers, n, r = model_config.num_layers, shape.num_slots, shape.rank
    projections = projection_shapes(model_config)
    stacked: dict = {"layers": {}}
    for path in shape.targets:
        group, name = _group(path)
        fan_in, fan_out = projections[path]
        stacked["layers"].setdefault(group, {})[name] = {
            STACK_A: jnp.zeros((layers, n, fan_in, r), dtype), STACK_B: jnp.zeros((layers, n, r, fan_out), dtype)}
    mesh = _weights_mesh(weights)
    if mesh is not None:
        stacked = jax.device_put(stacked, sharding.param_shardings(stacked, mesh))
    base = strip(weights)
    if is_unrolled(base):
        split = split_layers(stacked)["layers"]
        return {**base, "layers": {i: _merge_trees(base["layers"][i], split[i]) for i in base["layers"]}}
    return {**base, "layers": _merge_trees(base["layers"], stacked["layers"])}


def _merge_trees(tree: dict, extra: dict) -> dict:
    merged = dict(tree)
    for key, value in extra.items():
        merged[key] = _merge_trees(tree[key], value) if isinstance(value, dict) else value
    return merged


def tables(weights: dict) -> dict:
    """The sub-tree of `weights` holding only the stacked tables (same nesting)."""
    def pick(tree):
        if STACK_A in tree:
            return {STACK_A: tree[STACK_A], STACK_B: tree[STACK_B]}
        found = {key: pick(value) for key, value in tree.items() if isinstance(value, Mapping)}
        return {key: value for key, value in found.items() if value}
    return {"layers": pick(weights["layers"])}


def table_bytes(weights: dict) -> int:
    """Bytes held by the stacked tables."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tables(weights)))


@jax.jit
def _write(table_tree: dict, values: dict, slot: jax.Array) -> dict:
    # Slot axis is the third from last in both layouts: [L, N, in, R] or [N, in, R].
    return jax.tree.map(lambda table, value: table.at[..., slot, :, :].set(value.astype(table.dtype)),
                        table_tree, values)


def write_slot(weights: dict, slot: int, values: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """`weights` with slot `slot` of every table set to `values` (from `slot_values`). One compile
    per stack shape; the slot is a traced argument."""
    current = tables(weights)
    if is_unrolled(weights):
        laid_out = {"layers": {i: _by_group({p: {k: v[int(i)] for k, v in leaves.items()}
                                             for p, leaves in values.items()}) for i in current["layers"]}}
    else:
        laid_out = {"layers": _by_group(values)}
    written = _write(current, laid_out, jnp.int32(slot))
    return {**weights, "layers": _merge_trees(weights["layers"], written["layers"])}


def _by_group(values: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    tree: dict = {}
    for path, leaves in values.items():
        group, name = _group(path)
        tree.setdefault(group, {})[name] = dict(leaves)
    return tree
