"""Joining a multi-host JAX job: one call at program start, configured by flags or the environment.

A TPU pod slice (v5e-16 = 4 hosts × 4 chips, v4-32 = 4 hosts, ...) runs one copy of the training
program per host; the copies must agree on a coordinator before any JAX computation so that
`jax.devices()` lists the chips of *all* hosts and a mesh can span them. Afterwards nothing else in
this package is multi-host specific: sharding.py builds global arrays from each host's local rows
(`shard_batch`) or slices (`load_sharded`), and orbax writes each host's shards of a checkpoint.

Where the settings come from, first match wins:

1. explicit arguments (a launcher's flags): coordinator address, number of processes, process id;
2. JAX's own variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (any cluster,
   also the loopback test in tests/test_multihost.py);
3. `LLAMA_E_DISTRIBUTED=auto`: JAX's cluster auto-detection (TPU VM metadata on a pod slice, SLURM,
   ...). tpu_scripts/launch.sh sets it on every worker of a multi-host slice;
4. nothing set: a single-process run, and `initialize` does nothing.
"""

from __future__ import annotations

import dataclasses
import os

import jax

AUTO_ENV = "LLAMA_E_DISTRIBUTED"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins the job; `auto` defers everything to JAX's cluster detection."""

    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    @property
    def enabled(self) -> bool:
        return self.auto or self.coordinator_address is not None


def config_from_env(environ: dict[str, str] | None = None) -> DistributedConfig:
    """The job settings the environment describes (see the module docstring for the variables)."""
    env = os.environ if environ is None else environ
    address = env.get("JAX_COORDINATOR_ADDRESS")
    if address:
        missing = [name for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(name)]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS={address} is set but {', '.join(missing)} is not")
        return DistributedConfig(address, _int_env(env, "JAX_NUM_PROCESSES"), _int_env(env, "JAX_PROCESS_ID"))
    mode = env.get(AUTO_ENV, "").strip().lower()
    if mode not in ("", "auto", "off"):
        raise ValueError(f"{AUTO_ENV}={env[AUTO_ENV]!r}: expected 'auto' or 'off'")
    return DistributedConfig(auto=mode == "auto")


def _int_env(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer") from None


def initialize(config: DistributedConfig | None = None) -> bool:
    """Joins the multi-host job described by `config` (default: the environment); True if it did.

    Must run before anything touches a JAX device. Idempotent: a second call is a no-op.
    """
    config = config_from_env() if config is None else config
    if not config.enabled or _already_initialized():
        return _already_initialized()
    if config.auto:
        jax.distributed.initialize()
    else:
        if config.num_processes is None or config.process_id is None:
            raise ValueError(f"coordinator {config.coordinator_address}: num_processes and process_id are required")
        if not 0 <= config.process_id < config.num_processes:
            raise ValueError(f"process_id={config.process_id} not in [0, {config.num_processes})")
        jax.distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
    return True


def _already_initialized() -> bool:
    from jax._src import distributed as jax_distributed  # the public API has no "is initialized" query

    return jax_distributed.global_state.client is not None


def is_primary() -> bool:
    """Process 0: the one that writes logs, exports and summaries."""
    return jax.process_index() == 0
