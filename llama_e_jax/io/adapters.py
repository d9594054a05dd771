"""Adapter files: our own format, HF PEFT's (both ways), and torch `.bin` adapters read without torch.

Design, and why:

* **Our format keeps the stacked layout.** adapter.safetensors holds "attn/q_proj/lora_a" [L, in, r]
  etc. and adapter_config.json the LoRA settings plus the model shape it was trained for
  (`lora.model_shape`), so loading onto a different model fails with the differing fields named
  instead of a shape error.
* **PEFT interop** unstacks and transposes on export and stacks back on import, so adapters move both
  ways between this code and transformers + peft, including the LLaMA-E authors' torch
  `adapter_model.bin`, which `read_torch_state_dict` opens without torch through an allowlisting
  unpickler (a malicious .bin cannot run code).
* **One detection function.** `load_any_adapter` tells the two formats apart by adapter_config.json
  (`format` vs `peft_type`); every caller (training's `lora.init_from`, `load_model(adapter=...)`,
  evaluation) goes through it.

The LoRA layer, the adapter tree and merging live in `llama_e_jax.model.lora`; this module only
converts between that tree and files.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.model.lora import (LORA_A, LORA_B, PROJECTIONS, Adapter, AdapterError, LoraConfig, check_adapter,
                                    describe_differences, flatten_adapter, lora_config_dict, model_shape,
                                    projection_shapes, unflatten_adapter)

# PEFT module name of each block group: HF calls our "attn" "self_attn".
_HF_GROUP = {"attn": "self_attn", "mlp": "mlp"}
_OUR_GROUP = {hf: ours for ours, hf in _HF_GROUP.items()}
NATIVE_WEIGHTS, NATIVE_CONFIG = "adapter.safetensors", "adapter_config.json"
PEFT_WEIGHTS, PEFT_WEIGHTS_BIN, PEFT_CONFIG = "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json"
NATIVE_FORMAT = "llama_e_jax.model.lora/1"  # the on-disk tag (kept from when this code lived in lora.py)


# ===================================================================================== native save / load


def save_adapter(directory: str | Path, adapter: Adapter, lora_config: LoraConfig, model_config: LlamaConfig) -> Path:
    """Writes adapter.safetensors + adapter_config.json (a few MB even for 7B); returns the directory."""
    check_adapter(adapter, model_config, lora_config, "save_adapter")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{path}/{leaf}": np.asarray(jax.device_get(value), np.float32)
               for path, leaves in flatten_adapter(adapter).items() for leaf, value in leaves.items()}
    save_file(tensors, str(out / NATIVE_WEIGHTS))
    meta = {"format": NATIVE_FORMAT, "lora": lora_config_dict(lora_config), "model": model_shape(model_config)}
    (out / NATIVE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_adapter(
    directory: str | Path, model_config: LlamaConfig, expected: LoraConfig | None = None
) -> tuple[Adapter, LoraConfig]:
    """Reads an adapter written by `save_adapter`; checks it against the model (and `expected`, if given).

    Returns (adapter tree of fp32 numpy arrays, its LoraConfig). A PEFT directory is pointed to
    `import_peft` in the error.
    """
    directory = Path(directory)
    config_path = directory / NATIVE_CONFIG
    if not config_path.is_file():
        raise AdapterError(f"{directory}: no {NATIVE_CONFIG}")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != NATIVE_FORMAT:
        hint = " (this is a PEFT adapter: use adapters.import_peft or load_any_adapter)" if meta.get("peft_type") else ""
        raise AdapterError(f"{config_path}: field 'format' is {meta.get('format')!r}, expected {NATIVE_FORMAT!r}{hint}")
    saved = meta["lora"]
    lora_config = LoraConfig(rank=saved["rank"], alpha=saved["alpha"], dropout=saved["dropout"],
                             targets=tuple(saved["targets"]))
    shape_diff = describe_differences(meta["model"], model_shape(model_config))
    if shape_diff:
        raise AdapterError(f"{config_path}: adapter was trained for a different model: " + "; ".join(shape_diff))
    if expected is not None:
        _check_expected_lora(lora_config, expected, str(config_path))
    flat: dict[str, dict[str, np.ndarray]] = {}
    for name, value in _read_safetensors(directory / NATIVE_WEIGHTS).items():
        path, leaf = name.rsplit("/", 1)
        flat.setdefault(path, {})[leaf] = value.astype(np.float32)
    adapter = unflatten_adapter(flat)
    check_adapter(adapter, model_config, lora_config, str(directory / NATIVE_WEIGHTS))
    return adapter, lora_config


def _check_expected_lora(found: LoraConfig, expected: LoraConfig, source: str) -> None:
    """Rank, alpha and the set of adapted projections must agree (dropout only matters in training)."""
    problems = []
    if found.rank != expected.rank:
        problems.append(f"rank: adapter has r={found.rank}, config has r={expected.rank}")
    if found.alpha != expected.alpha:
        problems.append(f"alpha: adapter has {found.alpha}, config has {expected.alpha}")
    found_paths = [p for p in PROJECTIONS if found.targets_path(p)]
    expected_paths = [p for p in PROJECTIONS if expected.targets_path(p)]
    if found_paths != expected_paths:
        problems.append(f"targets: adapter adapts {found_paths}, config adapts {expected_paths}")
    if problems:
        raise AdapterError(f"{source}: adapter does not match the LoRA config: " + "; ".join(problems))


def load_any_adapter(
    directory: str | Path, model_config: LlamaConfig, expected: LoraConfig | None = None
) -> tuple[Adapter, LoraConfig]:
    """Our format or PEFT's, told apart by adapter_config.json (`format` vs `peft_type`)."""
    config_path = Path(directory) / NATIVE_CONFIG
    if not config_path.is_file():
        raise AdapterError(f"{directory}: no {NATIVE_CONFIG}; expected an adapter directory")
    if "peft_type" in json.loads(config_path.read_text()):
        return import_peft(directory, model_config, expected)
    return load_adapter(directory, model_config, expected)


# ===================================================================================== PEFT interop
#
# PEFT (HF) stores one [r, in] `lora_A.weight` and one [out, r] `lora_B.weight` per layer and
# projection, named `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, with r,
# lora_alpha, lora_dropout and target_modules in adapter_config.json. We unstack/transposes on export
# and stack/transpose back on import. Features that change the maths (rsLoRA, DoRA, per-module
# ranks, biases, extra trainable modules, a subset of layers) are refused by name rather than
# silently approximated.

_PEFT_NAME = re.compile(
    r"^base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?P<group>self_attn|mlp)\.(?P<name>\w+_proj)"
    r"\.lora_(?P<leaf>[AB])(?:\.[\w-]+)?\.weight$"
)
# adapter_config.json fields that change the maths when set, with their "off" value. Export writes
# these (older peft versions know them all); import refuses any that is on, plus the newer ones below.
_PEFT_OFF = {
    "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
    "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none",
}
_PEFT_OFF_NEWER = {"lora_bias": False, "layer_replication": None, "trainable_token_indices": None,
                   "alora_invocation_tokens": None, "use_qalora": False, "target_parameters": None}


def peft_tensor_name(path: str, layer: int, leaf: str) -> str:
    group, name = path.split("/")
    return f"base_model.model.model.layers.{layer}.{_HF_GROUP[group]}.{name}.lora_{'A' if leaf == LORA_A else 'B'}.weight"


def export_peft(
    directory: str | Path,
    adapter: Adapter,
    lora_config: LoraConfig,
    model_config: LlamaConfig,
    base_model_name_or_path: str = "",
) -> Path:
    """Writes adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads."""
    check_adapter(adapter, model_config, lora_config, "export_peft")
    flat = flatten_adapter(adapter)
    tensors = {}
    for path, leaves in flat.items():
        stacked = {leaf: np.asarray(jax.device_get(value), np.float32) for leaf, value in leaves.items()}
        for layer in range(model_config.num_layers):
            for leaf, value in stacked.items():  # ours [in, r] / [r, out] → PEFT [r, in] / [out, r]
                tensors[peft_tensor_name(path, layer, leaf)] = np.ascontiguousarray(value[layer].T)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": lora_config.rank,
        "lora_alpha": lora_config.alpha,
        "lora_dropout": lora_config.dropout,
        "target_modules": sorted({path.split("/")[1] for path in flat}),
        "inference_mode": True,
        "init_lora_weights": True,
        **_PEFT_OFF,
    }
    (out / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    return out


def import_peft(
    path: str | Path, model_config: LlamaConfig, expected: LoraConfig | None = None
) -> tuple[Adapter, LoraConfig]:
    """Reads a PEFT LoRA adapter directory (adapter_model.safetensors, or a torch adapter_model.bin).

    Returns (adapter tree of fp32 numpy arrays, LoraConfig with targets = PEFT's module names).
    Raises AdapterError naming the field or tensor that does not fit `model_config` / `expected`.
    """
    directory = Path(path)
    config_path = directory / PEFT_CONFIG
    if not config_path.is_file():
        raise AdapterError(f"{directory}: no {PEFT_CONFIG} (is this a PEFT adapter directory?)")
    peft_config = json.loads(config_path.read_text())
    lora_config = _lora_config_from_peft(peft_config, str(config_path))
    tensors, weights_file = _read_peft_tensors(directory)
    flat = _stack_peft_tensors(tensors, model_config, lora_config, weights_file)
    targets = tuple(path.split("/")[1] for path in PROJECTIONS if path in flat)  # PEFT's module names
    _check_targets_listed(peft_config, targets, str(config_path))
    lora_config = LoraConfig(rank=lora_config.rank, alpha=lora_config.alpha, dropout=lora_config.dropout, targets=targets)
    if expected is not None:
        _check_expected_lora(lora_config, expected, str(directory))
    adapter = unflatten_adapter(flat)
    check_adapter(adapter, model_config, lora_config, weights_file)
    return adapter, lora_config


def _lora_config_from_peft(peft_config: dict[str, Any], source: str) -> LoraConfig:
    if peft_config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{source}: field peft_type={peft_config.get('peft_type')!r}, only 'LORA' is supported")
    for field, off in {**_PEFT_OFF, **_PEFT_OFF_NEWER}.items():
        value = peft_config.get(field, off)
        if value != off and not (_is_empty(off) and _is_empty(value)):
            raise AdapterError(f"{source}: field {field}={value!r} is not supported (only {off!r})")
    for field in ("r", "lora_alpha"):
        if field not in peft_config:
            raise AdapterError(f"{source}: missing field {field!r}")
    return LoraConfig(rank=int(peft_config["r"]), alpha=float(peft_config["lora_alpha"]),
                      dropout=float(peft_config.get("lora_dropout", 0.0)))


def _is_empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file; a missing, truncated or corrupt file is one AdapterError naming it."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise AdapterError(f"{path}: not a readable safetensors file ({error})") from None


def _read_peft_tensors(directory: Path) -> tuple[dict[str, np.ndarray], str]:
    safetensors_path, bin_path = directory / PEFT_WEIGHTS, directory / PEFT_WEIGHTS_BIN
    if safetensors_path.is_file():
        return _read_safetensors(safetensors_path), str(safetensors_path)
    if bin_path.is_file():
        return read_torch_state_dict(bin_path), str(bin_path)
    raise AdapterError(f"{directory}: neither {PEFT_WEIGHTS} nor {PEFT_WEIGHTS_BIN} found")


def _stack_peft_tensors(
    tensors: dict[str, np.ndarray], model_config: LlamaConfig, lora_config: LoraConfig, source: str
) -> dict[str, dict[str, np.ndarray]]:
    """Per-layer PEFT tensors → stacked [L, in, r] / [L, r, out] fp32, with every mismatch named."""
    per_layer: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    unknown = []
    for name, value in tensors.items():
        match = _PEFT_NAME.match(name)
        if match is None:
            unknown.append(name)
            continue
        path = f"{_OUR_GROUP[match['group']]}/{match['name']}"
        leaf = LORA_A if match["leaf"] == "A" else LORA_B
        per_layer.setdefault((path, leaf), {})[int(match["layer"])] = value
    if unknown:
        raise AdapterError(f"{source}: tensors that are not LoRA A/B weights of a LLaMA layer: {sorted(unknown)[:5]}"
                           + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    if not per_layer:
        raise AdapterError(f"{source}: no LoRA tensors found (the file is empty)")
    shapes, rank = projection_shapes(model_config), lora_config.rank
    flat: dict[str, dict[str, np.ndarray]] = {}
    for (path, leaf), layers in sorted(per_layer.items()):
        if path not in shapes:
            raise AdapterError(f"{source}: {path} is not a LLaMA projection")
        missing = sorted(set(range(model_config.num_layers)) - set(layers))
        extra = sorted(set(layers) - set(range(model_config.num_layers)))
        if missing or extra:
            raise AdapterError(f"{source}: {path} lora_{leaf[-1].upper()}: layers missing {missing}, beyond the "
                               f"model's {model_config.num_layers} layers {extra}")
        fan_in, fan_out = shapes[path]
        expected = (rank, fan_in) if leaf == LORA_A else (fan_out, rank)
        for layer, value in layers.items():
            if tuple(value.shape) != expected:
                name = peft_tensor_name(path, layer, leaf)
                raise AdapterError(f"{source}: {name} has shape {list(value.shape)}, expected {list(expected)} "
                                   f"(adapter_config.json r={rank}, model {path} is [{fan_in} -> {fan_out}])")
        stacked = np.stack([np.asarray(layers[i], np.float32).T for i in range(model_config.num_layers)])
        flat.setdefault(path, {})[leaf] = stacked
    half = [path for path, leaves in flat.items() if set(leaves) != {LORA_A, LORA_B}]
    if half:
        raise AdapterError(f"{source}: {half} have only one of lora_A / lora_B")
    return flat


def _check_targets_listed(peft_config: dict[str, Any], targets: tuple[str, ...], source: str) -> None:
    """A list-valued target_modules must name exactly the projections that have tensors."""
    listed = peft_config.get("target_modules")
    if isinstance(listed, list) and set(listed) != set(targets):
        raise AdapterError(f"{source}: target_modules {sorted(listed)} but the weights adapt {sorted(targets)}")


# ------------------------------------------------------------------------- torch .bin without torch
#
# torch.save writes a zip archive: `<root>/data.pkl` is a pickle whose tensors are calls to
# torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...) and whose storages are
# persistent ids ('storage', torch.<Dtype>Storage, key, location, numel) pointing at raw
# little-endian bytes in `<root>/data/<key>`. The unpickler below resolves exactly those names to
# numpy and refuses every other global, so a malicious .bin cannot run code.

_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_unused) -> np.ndarray:
    if not size:
        return storage[offset].copy()
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride))
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_unused) -> np.ndarray:
    return data


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A `torch.save`d dict of tensors (zip format, torch ≥ 1.6) as numpy arrays, without importing torch."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise AdapterError(f"{path}: not a torch zip archive (legacy pre-1.6 torch.save format is not supported; "
                           "re-save it with a recent torch or convert it to safetensors)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise AdapterError(f"{path}: expected one data.pkl in the archive, found {pickles}")
        root = pickles[0][: -len("data.pkl")]
        byteorder = archive.read(root + "byteorder").decode() if root + "byteorder" in archive.namelist() else "little"
        if byteorder != "little":
            raise AdapterError(f"{path}: big-endian torch archives are not supported")

        def load_storage(pid: tuple) -> np.ndarray:
            kind, storage_type, key, _location, _numel = pid
            if kind != "storage" or not isinstance(storage_type, _StorageType):
                raise AdapterError(f"{path}: unexpected persistent id {pid!r}")
            return np.frombuffer(archive.read(f"{root}data/{key}"), dtype=storage_type.dtype)

        state = _TorchUnpickler(archive.open(pickles[0]), load_storage, str(path)).load()
    if not isinstance(state, dict):
        raise AdapterError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return {str(k): v for k, v in state.items()}


class _TorchUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, load_storage, source: str):
        super().__init__(file)
        self._load_storage, self._source = load_storage, source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(np.dtype(_TORCH_STORAGE_DTYPES[name]))
        raise AdapterError(f"{self._source}: refusing to unpickle {module}.{name} (only tensors are allowed)")

    def persistent_load(self, pid: Any) -> Any:
        return self._load_storage(pid)
