"""Training recipes: `configs/*.py` files read into a checked ml_collections ConfigDict.

    config = parse_config(["--config", "configs/tiny.py", "--config.train.steps=20"])
    config = load_config_file("tiny")       # a recipe by name, no overrides

One small module that both `python -m llama_e_jax.train` and the TPU fit check (`aot.py`) use, so
the fit check parses a recipe exactly as training does without importing the training loop.

Design, and why:

* **Config as data, parsed by ml_collections.** `parse_config` defines a `config_flags` config-file
  flag on a fresh `absl.flags.FlagValues` per call: `--config FILE` picks the recipe, and
  `--config.<section>.<field>=value` overrides are typed by the field they set. A fresh FlagValues
  (not the process-wide FLAGS) keeps parsing free of hidden state, so a test or a notebook can
  parse many times.
* **Errors name the key.** Override keys are checked against the recipe before ml_collections sees
  them, so an unknown key is one line naming it, its section's fields and the closest match.
* **Recipes are a package.** `configs/` is installed next to `llama_e_jax` (pyproject's
  package-data), so a recipe name such as "tiny" resolves in a checkout and in a wheel install
  alike, and recipes import `configs.default` without any `sys.path` changes.
* **Meaning is checked after parsing** (`validate_config`): choices, positive sizes, paths a source
  requires.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import configs
import ml_collections
from absl import flags
from ml_collections import config_flags

from llama_e_jax.model.lora import LoraConfig

CONFIGS_DIR = Path(configs.__file__).resolve().parent
DEFAULT_CONFIG = CONFIGS_DIR / "default.py"
MODEL_SOURCES = ("default", "gguf", "hf", "random")
DATA_SOURCES = ("tfds", "jsonl")
_PROGRAM = "llama_e_jax.train"


class ConfigError(ValueError):
    """A recipe or command-line override that cannot be used (the message names the key)."""


def recipe_path(name: str | Path) -> Path:
    """A recipe file: a path as given, else `configs/<name>` or `configs/<name>.py`."""
    path = Path(name)
    for candidate in (path, CONFIGS_DIR / path, CONFIGS_DIR / f"{path}.py"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if p.stem != "__init__"))
    raise ConfigError(f"config file {path} not found (recipes in {CONFIGS_DIR}: {known})")


def load_config_file(name: str | Path) -> ml_collections.ConfigDict:
    """`get_config()` of a recipe file (a path, or a name in configs/ such as "tiny"), not validated."""
    path = recipe_path(name)
    spec = importlib.util.spec_from_file_location(f"_llama_e_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: a recipe must define get_config() -> ml_collections.ConfigDict")
    return module.get_config()


def parse_config(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """`[--config FILE] [--config.a.b=value ...]` (no program name) → the effective, validated config."""
    argv = list(argv)
    recipe, overrides = _split_arguments(argv)
    recipe = recipe_path(recipe)
    check_override_keys(load_config_file(recipe), overrides)
    command_line = [_PROGRAM, f"--config={recipe}", *_without_recipe(argv)]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", str(recipe), "training recipe", flag_values=flag_values,
                                             lock_config=True, sys_argv=command_line)
    try:
        positional = flag_values(command_line)[1:]
    except flags.Error as error:
        raise ConfigError(f"{error}; use --config FILE and --config.<section>.<field>=value") from None
    if positional:
        raise ConfigError(f"unexpected argument {positional[0]!r}; use --config FILE and --config.<section>.<field>=value")
    config = holder.value
    _split_comma_tuples(config, overrides)
    validate_config(config)
    return config


def _split_arguments(argv: list[str]) -> tuple[str | Path, list[str]]:
    """(the recipe named by --config, or the default; the override keys "a.b" in order)."""
    recipe: str | Path = DEFAULT_CONFIG
    keys = []
    for index, arg in enumerate(argv):
        if arg == "--config":
            if index + 1 == len(argv):
                raise ConfigError("--config needs a value")
            recipe = argv[index + 1]
        elif arg.startswith("--config="):
            recipe = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            keys.append(arg[len("--config."):].split("=", 1)[0])
    return recipe, keys


def _without_recipe(argv: list[str]) -> list[str]:
    """argv with --config FILE removed (it is passed again as the path `recipe_path` resolved)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--config":
            skip = True
        elif not arg.startswith("--config="):
            out.append(arg)
    return out


def check_override_keys(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
    """Every `a.b` names a field of `config`; else a ConfigError naming the key and the known ones."""
    for key in keys:
        node = config
        parts = key.split(".")
        for depth, part in enumerate(parts):
            known = list(node.keys())
            if part not in known:
                where = ".".join(parts[:depth]) or "the config"
                close = difflib.get_close_matches(part, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"unknown config key {key!r}: {where} has no field {part!r} "
                                  f"(known: {', '.join(sorted(known))}){hint}")
            node = node[part]
            if depth < len(parts) - 1 and not isinstance(node, ml_collections.ConfigDict):
                raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        if isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key}: is a section; set one of its fields ({', '.join(node.keys())})")


def _split_comma_tuples(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
    """`--config.lora.targets=q_proj,up_proj` means two targets (ml_collections would read one string)."""
    for key in keys:
        *sections, field = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        value = node[field]
        if isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], str) and "," in value[0]:
            node[field] = tuple(item.strip() for item in value[0].split(",") if item.strip())


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks that are about meaning, not keys: choices, positive sizes, required paths."""
    problems = []
    if config.model.source not in MODEL_SOURCES:
        problems.append(f"model.source={config.model.source!r}: expected one of {MODEL_SOURCES}")
    if config.model.source in ("gguf", "hf") and not config.model.path:
        problems.append(f"model.path: required with model.source={config.model.source!r}")
    if config.model.source == "random" and not config.model.preset:
        problems.append("model.preset: required with model.source='random'")
    if config.data.source not in DATA_SOURCES:
        problems.append(f"data.source={config.data.source!r}: expected one of {DATA_SOURCES}")
    if config.data.source == "jsonl" and not config.data.files:
        problems.append("data.files: required with data.source='jsonl'")
    for key in ("train.batch_size", "train.grad_accum_steps", "train.eval_batch_size", "data.seq_len",
                "train.checkpoint_every", "train.keep_checkpoints"):
        section, field = key.split(".")
        if config[section][field] < 1:
            problems.append(f"{key}={config[section][field]}: must be >= 1")
    if config.train.steps <= 0 and config.train.epochs <= 0:
        problems.append("train.steps or train.epochs must be positive")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def lora_config_of(config: ml_collections.ConfigDict) -> LoraConfig:
    c = config.lora
    return LoraConfig(rank=c.rank, alpha=float(c.alpha), dropout=float(c.dropout), targets=tuple(c.targets))


def model_argument(model_section: ml_collections.ConfigDict) -> str | None:
    """What `config.model` names, as `io.load.load_model`'s `model`: None (default), a path or a preset."""
    if model_section.source == "default":
        return None
    if model_section.source == "random":
        return model_section.preset
    return model_section.path
