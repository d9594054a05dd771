"""Several adapters on one base: which `model` ids the server answers to, and the guards of hot loading.

Design, and why. A multi-adapter server (`serve --adapter NAME=DIR ...`, contract in
generate/generator.py) keeps the base unmerged and serves it under `--model-name`; each adapter is
served under its own name, and a request's `model` picks one (`ModelRegistry.adapter_for`). The
registry is the server's view of that set and is changed only on the event loop, in an order that
keeps every answer true:

- a hot load reserves its name first (a clash is a 409 at once, and two loads of one name cannot
  race), reads and validates the files off the event loop and off the engine thread, has the engine
  write the adapter into the stack between two steps, and only then makes the name visible
  (`commit`): a half-loaded adapter is never listed nor routable;
- a delete hides the name at once (later requests naming it are a 404), then has the engine remove
  it; requests accepted before finish with it (engine.py).

Hot loading is an admin action: its endpoints take their own key (`--admin-key`, never the
`--api-key`), and a directory is accepted only if, resolved with symlinks followed, it lies inside
`--adapter-root` (`resolve_inside`): `../` and a symlink pointing out are refused before any file
is opened. The resolved path is what gets read, so a name swapped for a symlink later is not
followed.
"""

from __future__ import annotations

import dataclasses
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from llama_e_jax.io.adapters import load_any_adapter
from llama_e_jax.io.load import ModelLoadError
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.model.lora import PROJECTIONS, Adapter, AdapterError, LoraConfig
from llama_e_jax.serve.protocol import ApiError

# A name goes in URLs (DELETE /v1/adapters/{name}) and in `model`: no slash, no spaces.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


# ============================================================================= the command line


def parse_adapter_args(values: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """`--adapter` values → (one bare directory to merge, or None; {name: directory}).

    `NAME=DIR` names an adapter (served unmerged, next to the base); a bare `DIR` is today's single
    merged adapter and cannot be mixed with named ones. Raises ValueError saying which value is wrong.
    """
    bare: list[str] = []
    named: dict[str, str] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not ADAPTER_NAME.fullmatch(name):
            bare.append(value)  # a directory (which may itself contain '=' after a '/')
        elif name in named:
            raise ValueError(f"--adapter {value}: the name {name!r} is given twice")
        elif not directory:
            raise ValueError(f"--adapter {value}: no directory after '='")
        else:
            named[name] = directory
    if len(bare) > 1 or (bare and named):
        raise ValueError(f"--adapter {bare[0]}: name every adapter (NAME=DIR) when serving more than one; "
                         "a single bare DIR is merged into the weights")
    return (bare[0] if bare else None), named


def read_adapter(directory: str | Path, config: LlamaConfig) -> tuple[Adapter, LoraConfig]:
    """Reads and checks an adapter directory (ours or PEFT); a bad one is a 400 naming file and tensor."""
    try:
        return load_any_adapter(directory, config)
    except (AdapterError, ModelLoadError) as error:
        raise ApiError(400, str(error), param="path", code="invalid_adapter") from None
    except (OSError, ValueError, KeyError) as error:  # unreadable or malformed files
        raise ApiError(400, f"{directory}: cannot read the adapter: {type(error).__name__}: {error}",
                       param="path", code="invalid_adapter") from None


# ============================================================================= admin guards


def check_admin_key(authorization: str, admin_key: str | None) -> None:
    """The hot-loading endpoints' own key (timing-safe compare). 403 when hot loading is off."""
    if admin_key is None:
        raise ApiError(403, "hot loading is disabled on this server (start it with --admin-key and "
                       "--adapter-root to enable /v1/adapters)", code="hot_loading_disabled")
    scheme, _, key = authorization.partition(" ")
    if not authorization:
        raise ApiError(401, "missing admin key (send 'Authorization: Bearer <admin key>')", code="invalid_api_key")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), admin_key.encode()):
        raise ApiError(401, "incorrect admin key", code="invalid_api_key")


def resolve_inside(root: Path | None, requested: str) -> Path:
    """`requested` (relative to `root`, or absolute) resolved with symlinks followed; it must be an
    existing directory inside `root`. Raises ApiError 403 (outside, or no root) / 400 (not a directory)."""
    if root is None:
        raise ApiError(403, "loading adapters is disabled on this server (start it with --adapter-root)",
                       code="hot_loading_disabled")
    if not requested or "\x00" in requested:
        raise ApiError(400, "path: must be a non-empty directory name", param="path")
    root = root.resolve()
    resolved = (root / requested).resolve()
    if not resolved.is_relative_to(root):
        raise ApiError(403, f"path {requested!r}: resolves outside the server's --adapter-root; only "
                       "directories inside it can be loaded", param="path", code="path_not_allowed")
    if not resolved.is_dir():
        raise ApiError(400, f"path {requested!r}: no such adapter directory under the --adapter-root",
                       param="path", code="invalid_adapter")
    return resolved


def check_adapter_name(name: str) -> None:
    if not ADAPTER_NAME.fullmatch(name):
        raise ApiError(400, f"name {name[:80]!r}: use 1-64 letters, digits, '.', '_', ':' or '-', starting "
                       "with a letter or digit", param="name")


# ============================================================================= the served models


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What the server says about an adapter it serves."""

    source: str  # the directory it was read from
    rank: int
    targets: tuple[str, ...]  # adapted projections, e.g. ("attn/q_proj", "attn/v_proj")
    created: int  # unix time it became servable

    @staticmethod
    def of(source: str | Path, lora_config: LoraConfig) -> "AdapterInfo":
        targets = tuple(p for p in PROJECTIONS if lora_config.targets_path(p))
        return AdapterInfo(str(source), lora_config.rank, targets, int(time.time()))


class ModelRegistry:
    """The `model` ids this server answers to: the base, and its adapters (multi-adapter mode).

    Used on the event loop only (no lock needed): `reserve` → `commit` / `release` for a hot load,
    `remove` for a delete.
    """

    def __init__(self, base: str, adapters: Mapping[str, AdapterInfo] = ()) -> None:
        self.base = base
        self.created = int(time.time())
        self.adapters: dict[str, AdapterInfo] = dict(adapters)
        self._reserved: set[str] = set()

    def ids(self) -> list[str]:
        return [self.base, *self.adapters]

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` picks (None: the base); unknown → 404 model_not_found."""
        if model == self.base:
            return None
        if model in self.adapters:
            return model
        raise ApiError(404, f"The model '{model[:200]}' does not exist; this server serves "
                       f"{', '.join(repr(m) for m in self.ids())}", param="model", code="model_not_found")

    def card(self, model: str) -> dict:
        """An OpenAI model object; an adapter's names the base as its root and parent (as vLLM)."""
        if model == self.base:
            return {"id": model, "object": "model", "created": self.created, "owned_by": "llama_e_jax"}
        info = self.adapters[model]
        return {"id": model, "object": "model", "created": info.created, "owned_by": "llama_e_jax",
                "root": self.base, "parent": self.base}

    def admin_card(self, name: str) -> dict:
        info = self.adapters[name]
        return {**self.card(name), "source": info.source, "rank": info.rank, "targets": list(info.targets)}

    def reserve(self, name: str) -> None:
        """Claims `name` for a hot load; 409 if a model or a load in progress has it."""
        if name == self.base or name in self.adapters or name in self._reserved:
            raise ApiError(409, f"a model named '{name}' is already served (or being loaded); delete it first "
                           "or pick another name", param="name", code="model_exists")
        self._reserved.add(name)

    def commit(self, name: str, info: AdapterInfo) -> None:
        self._reserved.discard(name)
        self.adapters[name] = info

    def release(self, name: str) -> None:
        self._reserved.discard(name)

    def remove(self, name: str) -> AdapterInfo:
        """Hides an adapter at once; 400 for the base, 404 for an unknown name."""
        if name == self.base:
            raise ApiError(400, f"'{name}' is the base model; only adapters can be deleted", code="cannot_delete_base")
        if name not in self.adapters:
            raise ApiError(404, f"no adapter named '{name[:200]}' is served", code="model_not_found")
        return self.adapters.pop(name)
