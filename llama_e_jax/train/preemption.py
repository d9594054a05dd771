"""Stopping a training run early — SIGTERM or the time limit — at the same step on every host.

A spot or preemptible TPU VM gets SIGTERM shortly before it is taken away; `train.time_limit_s`
bounds a run's wall-clock time. Either way the run finishes the step in flight, writes a checkpoint
and exits cleanly, so the same command resumes it.

Design, and why:

* **The decision is agreed, not local.** On a multi-host run every host steps the same compiled
  program and the checkpoint save is a collective. If each host acted on what it saw itself — the
  signal reaches hosts at different moments, clocks and start times differ — one host would enter
  the save while another starts the next step, and the job would hang. So after every step each host
  contributes its local flags and all hosts act on their OR: one host's SIGTERM stops them all after
  the same step.
* **An all-gather, every step.** `process_allgather` of two int32 flags per host: one tiny
  cross-host collective per step (tens to hundreds of microseconds over the data-centre network,
  against steps of 0.1 s and more), and nothing at all on a single-process run. JAX's preemption
  service (`multihost_utils.reached_preemption_sync_point`) agrees only on SIGTERM, needs a flag set
  before `jax.distributed.initialize` and replaces the Python signal handler; the time limit needs
  agreeing too, so one mechanism does both.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

SIGTERM_REASON = "SIGTERM"
TIME_LIMIT_REASON = "train.time_limit_s reached"


class PreemptionFlag:
    """Set by SIGTERM on this host; checked between steps so the step in flight finishes first."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "PreemptionFlag":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no preemption handling
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        log.warning("SIGTERM received: finishing this step, then checkpointing and exiting")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass(frozen=True)
class StopFlags:
    """Why this host (or, once agreed, any host) wants to stop."""

    sigterm: bool = False
    time_limit: bool = False

    @property
    def reason(self) -> str | None:
        """SIGTERM first: it decides how the run reports (preempted, no final evaluation)."""
        return SIGTERM_REASON if self.sigterm else TIME_LIMIT_REASON if self.time_limit else None


def local_flags(preemption: PreemptionFlag, deadline: float | None) -> StopFlags:
    """This host's view: SIGTERM seen here, or its own clock past `deadline` (time.monotonic())."""
    return StopFlags(sigterm=preemption.requested, time_limit=deadline is not None and time.monotonic() > deadline)


def agree(flags: StopFlags) -> StopFlags:
    """The OR of every host's flags, the same on all hosts. A collective: every host must call it
    at the same step. A no-op on a single-process run."""
    if jax.process_count() == 1:
        return flags
    local = np.array([flags.sigterm, flags.time_limit], np.int32)  # [2]
    everyone = np.asarray(multihost_utils.process_allgather(local))  # [processes, 2]
    sigterm, time_limit = everyone.max(axis=0)
    return StopFlags(sigterm=bool(sigterm), time_limit=bool(time_limit))
