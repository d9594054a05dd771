"""Device meshes, partition rules and sharded placement for training and decoding.

One mesh, three axes. Every run — one CPU, 8 GPUs, a v5e-256 pod — uses a mesh with the axes
("data", "fsdp", "tensor"):

* data: plain data parallelism; parameters are replicated along it, the batch is split.
* fsdp: fully-sharded data parallelism; the batch is split *and* every weight is split along its
  hidden (D) dimension, so a 30B base (60 GB in bf16) costs 60 GB / fsdp per chip. XLA all-gathers a
  layer's weights right before it is used.
* tensor: Megatron-style tensor parallelism; q/k/v/gate/up are split on their output (heads / F)
  and o/down on their input, so a block needs one reduction per projection pair.

Where each array goes is written once, as a short ordered table of (regex over the '/'-joined tree
path, PartitionSpec) — the first rule whose pattern `re.search`es the path wins, and a leaf that
matches no rule is an error naming its path (a silently replicated 30B weight would only show up as an
out-of-memory on the pod). Because patterns match the *end* of a path, the same table places the
base params, the LoRA adapters, the optimizer moments of those adapters (`opt_state/0/mu/layers/...`
ends like the adapter it follows) and a KV cache. Scalars (step counters, `count`, PRNG keys) are
always replicated.

Dimensions that do not divide. A tiny test model with 4 heads on tensor=8, or a decode batch of 1 on
data=8, cannot be split evenly and `NamedSharding` would refuse it. Rather than make every config
think about this, `param_specs` keeps, per dimension, the longest prefix of the rule's mesh axes whose
product divides the size — ("data", "fsdp") falls back to "data" and then to replication. The result
stays correct (GSPMD inserts the collectives); only memory and speed change, and the golden table
(configs/sharding_rules.golden.txt) shows exactly which dims fell back.

Nothing is materialised unsharded: the loader (`io/load.py`) and the Trainer run `eval_shape` →
`param_shardings` → `jit(init, out_shardings=...)`, so each device only ever allocates its own
shards, and `load_sharded` builds
arrays with `jax.make_array_from_callback`, asking a checkpoint reader for exactly the slice each
local device holds. Multi-host batches are assembled with `jax.make_array_from_process_local_data`
from the rows each host read itself (`process_batch_shard` tells the input pipeline which rows).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension is split over every data-parallel axis

Rules = Sequence[tuple[str, P]]

# Ordered: first match wins. Kernels are [L, in, out] (layers stacked by nn.scan), adapters
# lora_a [L, in, r] / lora_b [L, r, out]; an adapter is split like the kernel it corrects so its
# output lands with the same sharding as the base projection's.
PARAM_RULES: Rules = (
    (r"embed/embedding$", P("tensor", "fsdp")),  # [V, D]
    (r"lm_head/kernel$", P("fsdp", "tensor")),  # [D, V]
    (r"(q|k|v|gate|up)_proj/kernel$", P(None, "fsdp", "tensor")),  # [L, D, out]
    (r"(o|down)_proj/kernel$", P(None, "tensor", "fsdp")),  # [L, in, D]
    (r"(q|k|v|gate|up)_proj/lora_a$", P(None, "fsdp", None)),  # [L, D, r]
    (r"(q|k|v|gate|up)_proj/lora_b$", P(None, None, "tensor")),  # [L, r, out]
    (r"(o|down)_proj/lora_a$", P(None, "tensor", None)),  # [L, in, r]
    (r"(o|down)_proj/lora_b$", P(None, None, "fsdp")),  # [L, r, D]
    # Stacked multi-adapter tables (adapter_stack.py), slot axis N after L, split like lora_a / lora_b.
    (r"(q|k|v|gate|up)_proj/lora_stack_a$", P(None, None, "fsdp", None)),  # [L, N, D, R]
    (r"(q|k|v|gate|up)_proj/lora_stack_b$", P(None, None, None, "tensor")),  # [L, N, R, out]
    (r"(o|down)_proj/lora_stack_a$", P(None, None, "tensor", None)),  # [L, N, in, R]
    (r"(o|down)_proj/lora_stack_b$", P(None, None, None, "fsdp")),  # [L, N, R, D]
    (r"norm/scale$", P()),  # [L, D] / [D]: tiny, replicated
)
# The KV cache (llama.KVCache), heads-major: rows over the batch axes, kv heads over "tensor".
CACHE_RULES: Rules = (
    (r"(^|/)(keys|values)/\d+$", P(BATCH, "tensor", None, None)),  # per layer (unrolled): [B, K, S, Dh]
    (r"(^|/)(keys|values)$", P(None, BATCH, "tensor", None, None)),  # stacked (scanned): [L, B, K, S, Dh]
    (r"(^|/)lengths$", P(BATCH)),  # [B]
)
DEFAULT_RULES: Rules = PARAM_RULES + CACHE_RULES


class ShardingError(ValueError):
    """A mesh or a tree cannot be placed as asked (the message names the path or field)."""


# ----------------------------------------------------------------------------- meshes


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ("data", "fsdp", "tensor") mesh axes; at most one may be -1 (= the rest)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """The three axis sizes for `num_devices` devices, with the -1 axis filled in."""
        sizes = (self.data, self.fsdp, self.tensor)
        unknown = [name for name, size in zip(AXES, sizes) if size == -1]
        bad = [f"{name}={size}" for name, size in zip(AXES, sizes) if size == 0 or size < -1]
        if bad or len(unknown) > 1:
            raise ShardingError(f"mesh {self}: sizes must be positive with at most one -1, got {bad or unknown}")
        known = math.prod(size for size in sizes if size != -1)
        if num_devices % known:
            raise ShardingError(f"mesh {self} needs a multiple of {known} devices, have {num_devices}")
        resolved = tuple(num_devices // known if size == -1 else size for size in sizes)
        if math.prod(resolved) != num_devices:
            raise ShardingError(f"mesh {self} has {math.prod(resolved)} devices, have {num_devices}")
        return resolved  # type: ignore[return-value]


def make_mesh(mesh_config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all) in `mesh_utils` order.

    `mesh_utils` lays the axes onto the physical torus so the innermost axis (tensor) gets the fastest
    links. With several TPU slices (devices carrying distinct `slice_index`) the mesh is hybrid: the
    slices are stacked along "data", the only axis whose traffic (one gradient reduction per step)
    tolerates the slow data-centre network.
    """
    grid = device_grid(mesh_config, list(jax.devices() if devices is None else devices))
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return Mesh(grid, AXES, axis_types=auto)


def device_grid(mesh_config: MeshConfig, devices: Sequence[Any]) -> np.ndarray:  # [data, fsdp, tensor] devices
    """The devices arranged as the mesh (see make_mesh): torus-aware, slices stacked along "data"."""
    shape = mesh_config.resolve(len(devices))
    num_slices = len({getattr(device, "slice_index", 0) for device in devices})
    if num_slices == 1:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    if shape[0] % num_slices:
        raise ShardingError(f"mesh data={shape[0]} must be a multiple of the {num_slices} TPU slices "
                            "(slices only talk over the data-centre network, so they split the data axis)")
    per_slice = (shape[0] // num_slices, shape[1], shape[2])
    return mesh_utils.create_hybrid_device_mesh(per_slice, (num_slices, 1, 1), devices)


# ----------------------------------------------------------------------------- rules → specs


def path_str(path: Sequence[Any]) -> str:
    """'/'-joined tree path: dict keys, dataclass fields and sequence indices ("opt_state/0/mu/...")."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def spec_for(path: str, shape: Sequence[int], rules: Rules = DEFAULT_RULES) -> P:
    """The first matching rule's PartitionSpec for one leaf (before divisibility fallback)."""
    if len(shape) == 0:
        return P()
    for pattern, spec in rules:
        if re.search(pattern, path):
            if len(spec) > len(shape):
                raise ShardingError(f"{path}: rule {pattern!r} -> {spec} has {len(spec)} dims, leaf has shape {tuple(shape)}")
            return spec
    raise ShardingError(f"{path}: no partition rule matches this leaf (shape {tuple(shape)}); add one to the rules table")


def fit_spec(spec: P, shape: Sequence[int], axis_sizes: Mapping[str, int]) -> P:
    """Drops, per dim, trailing mesh axes until their product divides the dim size (see module doc)."""
    fitted = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        while axes and dim % math.prod(axis_sizes[a] for a in axes):
            axes = axes[:-1]
        fitted.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while fitted and fitted[-1] is None:
        fitted.pop()
    return P(*fitted)


def _leaf_shape(leaf: Any) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", np.shape(leaf)))


def param_specs(tree: Any, axis_sizes: Mapping[str, int], rules: Rules = DEFAULT_RULES) -> Any:
    """Tree of PartitionSpecs for `tree` (arrays or ShapeDtypeStructs) on a mesh of `axis_sizes`."""

    def leaf_spec(path, leaf):
        name, shape = path_str(path), _leaf_shape(leaf)
        return fit_spec(spec_for(name, shape, rules), shape, axis_sizes)

    return jax.tree_util.tree_map_with_path(leaf_spec, tree)


def param_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Tree of NamedShardings for any state tree: params, adapters, optimizer state, KV cache."""
    specs = param_specs(tree, dict(mesh.shape), rules)
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def describe_specs(tree: Any, axis_sizes: Mapping[str, int], rules: Rules = DEFAULT_RULES) -> list[str]:
    """One line per leaf, "path shape -> spec", for the golden table and for debugging."""
    specs = param_specs(tree, axis_sizes, rules)
    lines = []
    for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(tree),
                                  jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        lines.append(f"{path_str(path)} {list(_leaf_shape(leaf))} -> {tuple(spec)}")
    return lines


def place(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Moves an existing tree (e.g. params for decoding, a fresh KV cache) to the rules' shardings."""
    return jax.device_put(tree, param_shardings(tree, mesh, rules))


# ----------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ("data", "fsdp"); the rest replicated. Fits [B], [B, T], ..."""
    return NamedSharding(mesh, P(BATCH))


def process_batch_shard(mesh: Mesh) -> tuple[int, int]:
    """(shard_index, num_shards): which contiguous block of the global batch this host must read.

    Hosts whose devices hold the same batch rows (e.g. tensor parallelism across hosts) get the same
    index. Pass these to the input pipeline as its process_index / process_count.
    """
    rows = math.prod(mesh.shape[a] for a in BATCH)
    index_map = batch_sharding(mesh).devices_indices_map((rows,))
    local = {index_map[d][0].indices(rows)[:2] for d in mesh.local_devices}
    starts = sorted(start for start, _ in local)
    block = sum(stop - start for start, stop in local)
    if starts[-1] + 1 - starts[0] > block or rows % block:
        raise ShardingError(f"this host's devices hold non-contiguous batch rows {sorted(local)}; "
                            "order the mesh so each host owns a contiguous block")
    return starts[0] // block, rows // block


def check_batch_size(global_rows: int, mesh: Mesh, what: str = "batch") -> None:
    """Batch rows must split evenly over the batch axes (unlike weights, a batch has no fallback)."""
    shards = math.prod(mesh.shape[a] for a in BATCH)
    if global_rows % shards:
        raise ShardingError(f"{what} has {global_rows} rows, not a multiple of the mesh's data*fsdp = "
                            f"{mesh.shape['data']}*{mesh.shape['fsdp']} = {shards} batch shards")


def shard_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global batch arrays from this host's rows (all rows on one host, its block on a pod)."""
    sharding = batch_sharding(mesh)
    _, num_host_shards = process_batch_shard(mesh)
    batch = {}
    for name, rows in host_batch.items():
        rows = np.asarray(rows)
        if rows.ndim == 0:
            raise ShardingError(f"batch field {name!r} is a scalar; batch fields need a leading batch dim")
        check_batch_size(rows.shape[0] * num_host_shards, mesh, f"batch field {name!r}")
        try:
            batch[name] = jax.make_array_from_process_local_data(sharding, rows)
        except ValueError as error:
            raise ShardingError(f"batch field {name!r} with shape {rows.shape}: {error}") from error
    return batch


# ----------------------------------------------------------------------------- sharded state


class SliceReader(Protocol):
    """What `load_sharded` needs from a checkpoint: one slice of one tensor, in our layout."""

    def read(self, param_path: str, index: tuple[slice, ...]) -> np.ndarray: ...


def load_sharded(reader: SliceReader, abstract_params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Builds the param tree directly in its shards: each host reads only its devices' slices.

    Args:
      reader: gives `read(param_path, index)` -> np.ndarray of exactly that slice (e.g.
        llama_e_jax.io.weights.CheckpointReader); param_path is '/'-joined ("layers/attn/q_proj/kernel").
      abstract_params: ShapeDtypeStructs (from `jax.eval_shape` of the model init).
    """
    shardings = param_shardings(abstract_params, mesh, rules)

    def load_leaf(path, leaf, sharding):
        name = path_str(path)

        def read_slice(index: tuple[slice, ...]) -> np.ndarray:
            block = np.asarray(reader.read(name, index))
            expected = tuple(len(range(*s.indices(n))) for s, n in zip(index, leaf.shape))
            if block.shape != expected:
                raise ShardingError(f"{name}: reader returned shape {block.shape} for slice {index}, expected {expected}")
            return block.astype(leaf.dtype, copy=False)

        return jax.make_array_from_callback(leaf.shape, sharding, read_slice)

    return jax.tree_util.tree_map_with_path(load_leaf, abstract_params, shardings)


# ----------------------------------------------------------------------------- activations

ACTIVATION_SPECS = {
    "residual": P(BATCH, None, None),  # [B, T, D]: the residual stream, batch split, D whole
    "heads": P(BATCH, None, "tensor", None),  # [B, T, H|K, Dh]: q/k/v and attention output, heads split
    "mlp": P(BATCH, None, "tensor"),  # [B, T, F]: gate/up outputs, hidden split like their kernels
    "logits": P(BATCH, None, "tensor"),  # [B, T, V]: vocab split like lm_head
}


def constrain(x: jax.Array, kind: str, mesh: Mesh | None = None) -> jax.Array:
    """Pins an activation to `ACTIVATION_SPECS[kind]` on `mesh` (or the context mesh of
    `with jax.set_mesh(mesh):` when None); a no-op without a multi-device ("data", "fsdp", "tensor") mesh.

    Why: GSPMD propagates shardings from the weights, and under fsdp (weights split on D) it may pick
    a layout split on D instead of on the batch — all-gathering activations instead of weights; under
    tensor parallelism, pinning q/k/v heads and the MLP hidden to "tensor" keeps each device on its
    own heads between the column- and row-split projections (one reduction per pair, as Megatron).
    Dimensions that do not divide fall back as for weights (`fit_spec`). A constraint changes the
    layout only, never the values.
    """
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return x
    if not set(AXES) <= set(mesh.axis_names) or math.prod(mesh.shape.values()) == 1:
        return x
    spec = fit_spec(ACTIVATION_SPECS[kind], x.shape, dict(mesh.shape))
    target = NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec
    return jax.lax.with_sharding_constraint(x, target)
