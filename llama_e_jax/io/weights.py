"""Base weights in and out: HF safetensors checkpoints (import and export); GGUF import is io/gguf.py.

Why it is built this way:

* One table, `PARAM_SPECS`, says for every leaf of our parameter tree (docs/ARCHITECTURE.md) which HF
  tensor and which GGUF tensor it comes from, whether it is stacked over layers and whether it is
  transposed (HF `weight` is [out, in], our `kernel` is [in, out]). Import, export and validation all
  read that table, so the three cannot drift apart.
* `CheckpointReader` reads *any slice* of one of our stacked parameters straight from the
  safetensors files: `reader.read("layers/attn/q_proj/kernel", (slice(0, 4), slice(None), slice(0, 128)))`.
  Files are memory-mapped and only the requested rows are touched, so a sharded loader can build each
  device's shard directly (`jax.make_array_from_callback(shape, sharding, lambda idx: reader.read(path, idx))`)
  without one host ever holding the whole model. Memory-mapping also sidesteps numpy's missing
  bfloat16 (safetensors' numpy reader refuses BF16; `ml_dtypes.bfloat16` gives it a numpy dtype).
* `load_hf_checkpoint` validates the whole checkpoint (every tensor present, shapes right, nothing
  unknown) *before* reading a byte of weights, then fills each preallocated stacked array layer by
  layer and hands it to JAX — host memory holds one copy of one parameter at a time. An error
  always names the tensor or field; no half-loaded tree is ever returned.
* `save_hf_checkpoint` writes what `transformers.LlamaForCausalLM.from_pretrained` loads
  (transformers 5 `config.json` naming, sharded safetensors with an index above `shard_size`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np

from llama_e_jax.model.config import LlamaConfig

Index = tuple  # a numpy basic index into one of our (stacked) parameters: ints and slices

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "generation_config.json",
)

# safetensors dtype tag -> numpy dtype (bfloat16/fp8 via ml_dtypes)
_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

# Stored dtypes accepted for weights (fp8 / int tensors come from quantized checkpoints).
_WEIGHT_DTYPES = ("F32", "BF16", "F16", "F64")

# Tensors some HF checkpoints carry that hold nothing we need (recomputed rotary tables).
_HARMLESS_EXTRA = re.compile(r"^model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into."""


# ---------------------------------------------------------------------------- the mapping table


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One leaf of our parameter tree and where it lives in HF and GGUF files.

    Attributes:
      path: '/'-joined path in our tree, e.g. "layers/attn/q_proj/kernel".
      hf_name: HF tensor name; "{i}" is the layer index for stacked leaves.
      gguf_name: llama.cpp tensor name; "{i}" as above.
      layered: stacked over layers on axis 0 (one file tensor per layer).
      transposed: our layout is the transpose of the file's (kernels: ours [in, out], HF [out, in]).
      shape: our shape, per layer for stacked leaves (the full leaf is [L, *shape]).
      rotary_heads: for q/k, the config field with the head count llama.cpp permuted rows by.
    """

    path: str
    hf_name: str
    gguf_name: str
    layered: bool
    transposed: bool
    shape: tuple[int, ...]
    rotary_heads: str | None = None

    def file_shape(self) -> tuple[int, ...]:
        """Shape of one file tensor (HF/GGUF orientation)."""
        return self.shape[::-1] if self.transposed else self.shape

    def full_shape(self, config: LlamaConfig) -> tuple[int, ...]:
        return (config.num_layers, *self.shape) if self.layered else self.shape

    def hf_names(self, config: LlamaConfig) -> list[str]:
        return [self.hf_name.format(i=i) for i in range(config.num_layers)] if self.layered else [self.hf_name]


def param_specs(config: LlamaConfig) -> list[ParamSpec]:
    """The leaves of `Llama(config)`'s base parameters, in HF file order."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim

    def layer(path: str, hf: str, gguf: str, shape: tuple[int, ...], transposed: bool = True, heads=None):
        return ParamSpec(f"layers/{path}", f"model.layers.{{i}}.{hf}", f"blk.{{i}}.{gguf}", True, transposed,
                         shape, heads)

    specs = [
        ParamSpec("embed/embedding", "model.embed_tokens.weight", "token_embd.weight", False, False, (v, d)),
        layer("attn_norm/scale", "input_layernorm.weight", "attn_norm.weight", (d,), transposed=False),
        layer("attn/q_proj/kernel", "self_attn.q_proj.weight", "attn_q.weight", (d, q_out), heads="num_heads"),
        layer("attn/k_proj/kernel", "self_attn.k_proj.weight", "attn_k.weight", (d, kv_out), heads="num_kv_heads"),
        layer("attn/v_proj/kernel", "self_attn.v_proj.weight", "attn_v.weight", (d, kv_out)),
        layer("attn/o_proj/kernel", "self_attn.o_proj.weight", "attn_output.weight", (q_out, d)),
        layer("mlp_norm/scale", "post_attention_layernorm.weight", "ffn_norm.weight", (d,), transposed=False),
        layer("mlp/gate_proj/kernel", "mlp.gate_proj.weight", "ffn_gate.weight", (d, f)),
        layer("mlp/up_proj/kernel", "mlp.up_proj.weight", "ffn_up.weight", (d, f)),
        layer("mlp/down_proj/kernel", "mlp.down_proj.weight", "ffn_down.weight", (f, d)),
        ParamSpec("final_norm/scale", "model.norm.weight", "output_norm.weight", False, False, (d,)),
    ]
    if not config.tie_word_embeddings:
        specs.append(ParamSpec("lm_head/kernel", "lm_head.weight", "output.weight", False, True, (d, v)))
    return specs


def param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Our full (stacked) shape of every base parameter, keyed by '/'-joined path."""
    return {spec.path: spec.full_shape(config) for spec in param_specs(config)}


def _set_leaf(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _get_leaf(tree: Mapping, path: str) -> Any:
    for key in path.split("/"):
        if not isinstance(tree, Mapping) or key not in tree:
            raise CheckpointError(f"params: missing leaf {path!r}")
        tree = tree[key]
    return tree


def _leaf_paths(tree: Mapping, prefix: str = "") -> Iterator[str]:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _leaf_paths(value, path + "/")
        else:
            yield path


# ---------------------------------------------------------------------------- safetensors reading


@dataclasses.dataclass(frozen=True)
class _StoredTensor:
    """Where one tensor's bytes are: file, byte range and layout (from the safetensors header)."""

    file: Path
    tag: str  # safetensors dtype name, e.g. "BF16"
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def _read_safetensors_header(file: Path) -> dict[str, _StoredTensor]:
    """Parses a safetensors header: u64 little-endian length, then JSON {name: {dtype, shape, data_offsets}}."""
    with open(file, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        file_size = file.stat().st_size
        if header_len <= 0 or 8 + header_len > file_size:
            raise CheckpointError(f"{file}: not a safetensors file (header length {header_len})")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{file}: not a safetensors file (bad header: {error})") from None
    tensors = {}
    data_start = 8 + header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name}: unsupported dtype {entry['dtype']}")
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        begin, end = (data_start + offset for offset in entry["data_offsets"])
        if end - begin != int(np.prod(shape)) * dtype.itemsize or end > file_size:
            raise CheckpointError(f"{file}: tensor {name}: byte range {entry['data_offsets']} does not fit "
                                  f"shape {list(shape)} {entry['dtype']} (file truncated?)")
        tensors[name] = _StoredTensor(file, entry["dtype"], dtype, shape, begin, end)
    return tensors


def _safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files: from the shard index if there is one, else model.safetensors."""
    index_file = directory / SAFETENSORS_INDEX
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_file}: missing field 'weight_map'")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index_file}: shard files listed but not found: {', '.join(missing)}")
        return files
    if (directory / SINGLE_SAFETENSORS).is_file():
        return [directory / SINGLE_SAFETENSORS]
    found = sorted(directory.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise CheckpointError(
        f"{directory}: no {SINGLE_SAFETENSORS} or {SAFETENSORS_INDEX} (found {len(found)} *.safetensors files; "
        "PyTorch .bin checkpoints are not supported, convert them to safetensors first)"
    )


class CheckpointReader:
    """Reads slices of our stacked parameters straight from an HF safetensors checkpoint.

    Construction validates the checkpoint against `config` (all problems reported together);
    `read(path, index)` then returns `stacked_param[index]` as a fresh numpy array, touching only the
    bytes it needs. Use as a context manager, or call `close()`, to release the memory maps.

        with CheckpointReader(ckpt_dir) as reader:
            reader.shapes()["layers/attn/q_proj/kernel"]      # (L, D, H*Dh)
            reader.read("layers/attn/q_proj/kernel", (3,))    # layer 3: [D, H*Dh]
    """

    def __init__(self, directory: str | Path, config: LlamaConfig | None = None) -> None:
        self.directory = Path(directory)
        self.config = config if config is not None else LlamaConfig.from_hf_dir(self.directory)
        self.specs = {spec.path: spec for spec in param_specs(self.config)}
        self._tensors: dict[str, _StoredTensor] = {}
        for file in _safetensors_files(self.directory):
            for name, stored in _read_safetensors_header(file).items():
                if name in self._tensors:
                    raise CheckpointError(f"{file}: tensor {name} also stored in {self._tensors[name].file}")
                self._tensors[name] = stored
        self._maps: dict[Path, np.memmap] = {}
        self._validate()

    def _validate(self) -> None:
        problems = []
        expected = set()
        for spec in self.specs.values():
            for name in spec.hf_names(self.config):
                expected.add(name)
                stored = self._tensors.get(name)
                if stored is None:
                    problems.append(f"missing tensor {name} (expected shape {list(spec.file_shape())})")
                elif stored.shape != spec.file_shape():
                    problems.append(f"tensor {name}: expected shape {list(spec.file_shape())}, "
                                    f"found {list(stored.shape)} in {stored.file.name}")
                elif stored.tag not in _WEIGHT_DTYPES:
                    problems.append(f"tensor {name}: dtype {stored.tag} is not one of {', '.join(_WEIGHT_DTYPES)} "
                                    "(quantized checkpoints are not supported)")
        for name in sorted(set(self._tensors) - expected):
            # A tied checkpoint may still store lm_head.weight; transformers ignores it, so do we.
            if _HARMLESS_EXTRA.match(name) or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            problems.append(f"unexpected tensor {name} in {self._tensors[name].file.name}")
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise CheckpointError(f"{self.directory}: checkpoint does not match the config:\n  {shown}{more}")

    # -------------------------------------------------------------- listing

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Full (stacked) shape of every parameter, keyed by '/'-joined path."""
        return {path: spec.full_shape(self.config) for path, spec in self.specs.items()}

    def dtypes(self) -> dict[str, np.dtype]:
        """Stored dtype of every parameter (of its first layer's tensor)."""
        return {path: self._tensors[spec.hf_names(self.config)[0]].dtype for path, spec in self.specs.items()}

    # -------------------------------------------------------------- reading

    def read(self, path: str, index: Index = (), dtype: Any = None) -> np.ndarray:
        """`stacked_param[index]` as a new array, cast to `dtype` (default: stored dtype).

        `index` holds ints and slices (numpy basic indexing, at most one entry per axis); for stacked
        parameters its first entry selects layers.
        """
        spec = self._spec(path)
        index = _normalize_index(index, len(spec.full_shape(self.config)), path)
        if not spec.layered:
            return np.array(self.view(path)[index], dtype=dtype, order="C")
        layers, per_layer = index[0], index[1:]
        if isinstance(layers, int):
            layer = range(self.config.num_layers)[layers]  # negative ints count from the end
            return np.array(self.view(path, layer)[per_layer], dtype=dtype, order="C")
        selected = range(self.config.num_layers)[layers]
        first = self.view(path, 0)[per_layer]
        out = np.empty((len(selected), *first.shape), dtype=dtype or first.dtype)
        for slot, layer in enumerate(selected):
            np.copyto(out[slot], self.view(path, layer)[per_layer], casting="unsafe")
        return out

    def view(self, path: str, layer: int | None = None) -> np.ndarray:
        """Zero-copy, read-only view of one file tensor in our orientation (one layer if stacked)."""
        spec = self._spec(path)
        if spec.layered != (layer is not None):
            raise IndexError(f"{path}: a layer index is {'required' if spec.layered else 'not allowed'}")
        if spec.layered and not 0 <= layer < self.config.num_layers:
            raise IndexError(f"{path}: layer {layer} out of range 0..{self.config.num_layers - 1}")
        return self._file_view(spec.hf_name.format(i=layer), spec)

    def _spec(self, path: str) -> ParamSpec:
        if path not in self.specs:
            raise KeyError(f"unknown parameter {path!r}; known: {', '.join(self.specs)}")
        return self.specs[path]

    def _file_view(self, name: str, spec: ParamSpec) -> np.ndarray:
        stored = self._tensors[name]
        if stored.file not in self._maps:
            self._maps[stored.file] = np.memmap(stored.file, dtype=np.uint8, mode="r")
        raw = self._maps[stored.file][stored.begin : stored.end]
        view = raw.view(stored.dtype).reshape(stored.shape)
        return view.T if spec.transposed else view

    def close(self) -> None:
        self._maps.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _normalize_index(index: Any, ndim: int, path: str) -> tuple:
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > ndim or not all(isinstance(i, (int, np.integer, slice)) for i in index):
        raise IndexError(f"{path}: index {index!r} must be at most {ndim} ints/slices")
    return tuple(int(i) if isinstance(i, np.integer) else i for i in index) + (slice(None),) * (ndim - len(index))


# ---------------------------------------------------------------------------- import


def _assemble(
    specs: list[ParamSpec],
    config: LlamaConfig,
    dtype: np.dtype,
    fetch: Callable[[ParamSpec, int | None], np.ndarray],
) -> dict:
    """Builds the param tree: each stacked leaf is preallocated and filled layer by layer.

    `fetch(spec, layer)` returns one file tensor in our orientation (layer is None for unstacked
    leaves). Each finished leaf is handed to JAX before the next one is built.
    """
    params: dict = {}
    for spec in specs:
        if spec.layered:
            host = np.empty(spec.full_shape(config), dtype=dtype)
            for layer in range(config.num_layers):
                np.copyto(host[layer], fetch(spec, layer), casting="unsafe")
        else:
            host = np.array(fetch(spec, None), dtype=dtype, order="C")
        _set_leaf(params, spec.path, jax.device_put(host))
        del host
    return params


def load_hf_checkpoint(
    path: str | Path,
    config: LlamaConfig | None = None,
    dtype: str | None = None,
) -> tuple[LlamaConfig, dict]:
    """Loads an HF LLaMA safetensors checkpoint directory into our parameter tree.

    Args:
      path: directory with config.json and model.safetensors (or a sharded index).
      config: use this config instead of the directory's config.json (shapes must match).
      dtype: parameter dtype ("float32", "bfloat16"); default config.param_dtype.
    Returns:
      (config with param_dtype=dtype, params) — params as in docs/ARCHITECTURE.md, jax arrays.
    Raises:
      ConfigError: unsupported architecture / field in config.json (names the field).
      CheckpointError: missing, misshapen or unexpected tensors (names them).
    """
    config = config if config is not None else LlamaConfig.from_hf_dir(path)
    dtype = dtype or config.param_dtype
    config = config.replace(param_dtype=np.dtype(dtype).name)
    with CheckpointReader(path, config) as reader:
        params = _assemble(
            list(reader.specs.values()),
            config,
            np.dtype(dtype),
            lambda spec, layer: reader.view(spec.path, layer),
        )
    return config, params


# ---------------------------------------------------------------------------- export


def _parse_size(size: int | str) -> int:
    """Bytes from 2_000_000_000, "2GB" (10^9) or "2GiB" (2^30)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"shard_size={size!r}: expected bytes or e.g. '2GB', '500MB', '1GiB'")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match.group(1)) * units[(match.group(2) or "b").lower()])


def _check_params(params: Mapping, config: LlamaConfig) -> None:
    """Every expected leaf present with the expected shape, and no other leaf."""
    specs = param_specs(config)
    problems = []
    for spec in specs:
        try:
            leaf = _get_leaf(params, spec.path)
        except CheckpointError as error:
            problems.append(str(error))
            continue
        if tuple(leaf.shape) != spec.full_shape(config):
            problems.append(f"params: leaf {spec.path}: expected shape {list(spec.full_shape(config))}, "
                            f"found {list(leaf.shape)}")
    extra = set(_leaf_paths(params)) - {spec.path for spec in specs}
    problems += [f"params: unexpected leaf {path!r}" for path in sorted(extra)]
    if problems:
        raise CheckpointError("parameters do not match the config:\n  " + "\n  ".join(problems))


_FileTensor = tuple  # (HF name, ParamSpec, layer index or None)


def _hf_order(config: LlamaConfig) -> list[_FileTensor]:
    """Every file tensor, in HF's order: embeddings, then layer by layer, then final norm and head."""
    specs = param_specs(config)
    order = [(s.hf_name, s, None) for s in specs if s.path.startswith("embed")]
    for layer in range(config.num_layers):
        order += [(s.hf_name.format(i=layer), s, layer) for s in specs if s.layered]
    order += [(s.hf_name, s, None) for s in specs if not s.layered and not s.path.startswith("embed")]
    return order


def _file_tensor(params: Mapping, spec: ParamSpec, layer: int | None) -> np.ndarray:
    """One HF tensor from our tree: contiguous numpy, HF layout ([out, in] for kernels)."""
    leaf = _get_leaf(params, spec.path)
    host = np.asarray(jax.device_get(leaf if layer is None else leaf[layer]))
    return np.ascontiguousarray(host.T if spec.transposed else host)


def _plan_shards(params: Mapping, config: LlamaConfig, shard_bytes: int) -> list[list[_FileTensor]]:
    """File tensors in HF order, grouped into shards of at most shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[_FileTensor]] = [[]]
    used = 0
    for entry in _hf_order(config):
        spec = entry[1]
        size = int(np.prod(spec.shape)) * np.dtype(_get_leaf(params, spec.path).dtype).itemsize
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += size
    return shards


def save_hf_checkpoint(
    params: Mapping,
    config: LlamaConfig,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    shard_size: int | str = "2GB",
) -> Path:
    """Writes an HF LLaMA checkpoint (config.json + safetensors) that transformers loads.

    Tensors keep the dtype of `params` (config.json's dtype says which). Above `shard_size`, files are
    `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`. `tokenizer_dir`: an HF
    tokenizer directory whose files are copied, or a `Tokenizer` (saved with its `save`).
    Returns the output directory.
    """
    from safetensors.numpy import save_file

    _check_params(params, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtypes = {np.dtype(_get_leaf(params, spec.path).dtype).name for spec in param_specs(config)}
    stored_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    hf_config = {**config.to_hf_dict(), "torch_dtype": stored_dtype, "dtype": stored_dtype}

    shards = _plan_shards(params, config, _parse_size(shard_size))
    file_names = (
        [SINGLE_SAFETENSORS]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map, total_bytes = {}, 0
    for file_name, shard in zip(file_names, shards):
        # Only one shard's tensors are on the host at a time.
        tensors = {name: _file_tensor(params, spec, layer) for name, spec, layer in shard}
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        (out / file_name).chmod(0o644)  # safetensors creates it owner-only; a checkpoint is meant to be shared
        weight_map.update(dict.fromkeys(tensors, file_name))
        total_bytes += sum(t.nbytes for t in tensors.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    _write_tokenizer(tokenizer_dir, out)
    return out


def _write_tokenizer(tokenizer: Any, out: Path) -> None:
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save") and not isinstance(tokenizer, (str, Path)):
        tokenizer.save(out)
        return
    source = Path(tokenizer)
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise CheckpointError(f"{source}: tokenizer_dir has no tokenizer.json or tokenizer.model")
    for name in copied:
        shutil.copyfile(source / name, out / name)
