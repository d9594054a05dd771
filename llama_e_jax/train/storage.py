"""Run directories that live in a bucket: `gs://` URLs end to end, with a local mirror for small files.

A spot TPU loses its boot disk on preemption ("must recreate"), and the hosts of a pod slice do not
share one, so a run that must survive either keeps its run directory in a bucket
(`--config.run_dir=gs://bucket/run1`). Paths are therefore URLs: `etils.epath.Path` keeps
`gs://b/run1/checkpoints` a bucket path, where `pathlib.Path` silently made it `./gs:/b/run1/...`.

Design, and why:

* **Checkpoints go straight to the bucket** (`RunDir.checkpoints`): orbax and tensorstore write
  `gs://` themselves, each host its own shards.
* **Everything else is written locally, then mirrored** (`RunDir.local`, `push`): metrics.jsonl is
  appended line by line and TensorBoard's event files grow — appends a bucket does not offer — and
  the exporters (adapter, PEFT, merged HF files) write plain files. For a bucket run these go to a
  staging directory on local disk and `push` uploads what changed since the last push: the loop
  pushes after every checkpoint and at the end, so the bucket always holds the metrics up to the
  newest checkpoint. `pull` at start brings the bucket's metrics.jsonl back, so a resumed run on a
  recreated VM appends to it. Only process 0 writes these files, so only it pushes.
* **Inputs are fetched** (`localize`): a `gs://` data file, directory or model directory is copied
  once to a local cache and read from there by the loaders, which read local files.
* **A run that cannot survive is refused** (`check_durable`): a multi-host run (no shared disk) or a
  spot run (`LLAMA_E_SPOT=1`, set by tpu_scripts for spot capacity) with a local run directory fails
  at start with one line, unless `LLAMA_E_SHARED_RUN_DIR=1` says that the local path is a shared
  filesystem (NFS, Filestore).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from etils import epath

from llama_e_jax.train.recipe import ConfigError

log = logging.getLogger(__name__)

SPOT_ENV = "LLAMA_E_SPOT"  # "1": this host is spot/preemptible capacity (its disk disappears)
SHARED_ENV = "LLAMA_E_SHARED_RUN_DIR"  # "1": a local run_dir is on a filesystem every host shares
STAGING_ENV = "LLAMA_E_STAGING_DIR"  # where bucket runs stage their small files (default: the temp dir)
PULLED_FILES = ("metrics.jsonl",)  # files a resumed bucket run continues appending to
_COPY_CHUNK = 16 << 20  # bytes per read when copying between disk and bucket


def is_url(path: str | os.PathLike) -> bool:
    """True for gs://..., s3://... and other URLs; False for local paths."""
    return "://" in os.fspath(path)


def check_durable(run_dir: str, process_count: int, environ: Mapping[str, str] | None = None) -> None:
    """Raises ConfigError (one line) for a multi-host or spot run whose run_dir is a local path."""
    env = os.environ if environ is None else environ
    if is_url(run_dir) or env.get(SHARED_ENV) == "1":
        return
    if process_count > 1:
        why = f"this run spans {process_count} hosts, which share no disk"
    elif env.get(SPOT_ENV) == "1":
        why = f"this is a spot run ({SPOT_ENV}=1), and a preempted spot TPU is deleted with its disk"
    else:
        return
    raise ConfigError(f"run_dir={run_dir!r} is a local path, but {why}: use --config.run_dir=gs://BUCKET/RUN "
                      f"(or set {SHARED_ENV}=1 if it is a shared filesystem)")


class RunDir:
    """Where a run's files go.

    Attributes:
      url: the run directory as configured (a local path or a URL).
      checkpoints: `<url>/checkpoints` (an epath: local or in the bucket).
      local: where the other files are written: the run directory itself when it is local, else a
        staging directory mirrored to the bucket by `push`.
    """

    def __init__(self, run_dir: str | os.PathLike, staging_root: str | os.PathLike | None = None):
        self.url = os.fspath(run_dir)
        self.remote = is_url(self.url)
        self.checkpoints = epath.Path(self.url) / "checkpoints" if self.remote else \
            epath.Path(Path(self.url).absolute() / "checkpoints")
        self.local = _staging_dir(self.url, staging_root) if self.remote else Path(self.url)
        self._pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) at its last upload

    @property
    def location(self) -> Path | epath.Path:
        """The run directory as a path object (pathlib when local, epath for a URL): what reports name."""
        return epath.Path(self.url) if self.remote else Path(self.url)

    def pull(self) -> None:
        """Copies the bucket's PULLED_FILES (when present) over the local mirror; nothing for a local run."""
        if not self.remote:
            return
        self.local.mkdir(parents=True, exist_ok=True)
        for name in PULLED_FILES:
            source = epath.Path(self.url) / name
            if source.exists():
                _copy(source, epath.Path(self.local / name))
                self._pushed[name] = _signature(self.local / name)

    def push(self) -> list[str]:
        """Uploads the local files that changed since the last push; returns their relative paths."""
        if not self.remote or not self.local.is_dir():
            return []
        uploaded = []
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            relative = path.relative_to(self.local).as_posix()
            if self._pushed.get(relative) == _signature(path):
                continue
            _copy(epath.Path(path), epath.Path(self.url) / relative)
            self._pushed[relative] = _signature(path)
            uploaded.append(relative)
        if uploaded:
            log.info("mirrored %d file(s) to %s", len(uploaded), self.url)
        return uploaded

    def __str__(self) -> str:
        return self.url


def localize(path: str, cache_root: str | os.PathLike | None = None) -> str:
    """A local path holding `path`: unchanged when local, else a cached copy of the URL's file or directory.

    Raises FileNotFoundError (naming the URL) when nothing is there.
    """
    if not path or not is_url(path):
        return path
    source = epath.Path(path)
    target = _staging_dir(path, cache_root, kind="inputs")
    if source.is_dir():
        for file in _walk(source):
            destination = target / file.relative_to(source).as_posix()
            if not destination.exists():
                _copy(file, epath.Path(destination))
        return str(target)
    if not source.exists():
        raise FileNotFoundError(f"{path}: no such file or directory in the bucket")
    destination = target / source.name
    if not destination.exists():
        _copy(source, epath.Path(destination))
    return str(destination)


def _walk(directory: epath.Path) -> list[epath.Path]:
    files = []
    for child in directory.iterdir():
        files += _walk(child) if child.is_dir() else [child]
    return files


def _staging_dir(url: str, root: str | os.PathLike | None, kind: str = "runs") -> Path:
    """<root>/llama_e_jax/<kind>/<readable name>-<hash of the URL>: one per URL, stable across restarts."""
    root = Path(root or os.environ.get(STAGING_ENV) or tempfile.gettempdir())
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in url.split("://", 1)[-1])[-80:]
    return root / "llama_e_jax" / kind / f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def _copy(source: epath.Path, destination: epath.Path) -> None:
    """One file, streamed, between any two of local disk and a bucket (parents created)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with source.open("rb") as reader, destination.open("wb") as writer:
        shutil.copyfileobj(reader, writer, _COPY_CHUNK)


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
