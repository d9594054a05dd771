"""Training metrics to three places: a progress display, TensorBoard event files and a JSONL log.

* Progress: on a terminal, a tqdm bar with step, loss, tokens/s and ETA; when output goes to a file
  or CI log (no TTY), one plain line every `log_every` steps with the same fields, since a
  carriage-return bar turns into noise there.
* TensorBoard: tensorboardX writes the event files (`<run_dir>/tensorboard/`); no TensorFlow needed.
  `tensorboard --logdir runs/` shows train/eval loss, perplexity, learning rate and samples.
* JSONL (`<run_dir>/metrics.jsonl`): one object per event, `{"step", "kind", "time", ...metrics}`,
  appended across resumes — the machine-readable record tests and reports read.

Only process 0 of a multi-host run writes (`enabled=False` elsewhere).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """The installed version of each distribution in `names` ("absent" if missing), plus Python's:
    the environment a logged run or benchmark result was produced in."""
    import platform
    from importlib import metadata

    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def format_duration(seconds: float) -> str:
    """"1h02m", "3m07s", "42s"."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX's writer module does `try: import torch` at import time when torch is installed
    (seconds of import, and torch must stay out of the training process). A `None` entry in
    sys.modules makes that import fail fast, so tensorboardX takes its numpy-only path; scalars and
    text never need torch.
    """
    if "torch" in sys.modules or "tensorboardX.writer" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsLogger:
    """Writes train/eval metrics and text samples of one run.

    Args:
      run_dir: the run directory (JSONL and tensorboard/ go inside).
      total_steps: the run's last step (for the bar and ETA).
      start_step: the step training starts (or resumes) from.
      log_every: steps between plain-text lines when not on a terminal.
      enabled: False on non-primary hosts (everything becomes a no-op).
    """

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, log_every: int = 10,
                 enabled: bool = True, stream: TextIO | None = None):
        self.enabled, self.total_steps, self.log_every = enabled, total_steps, max(1, log_every)
        self.stream = stream or sys.stderr
        self._window_start, self._window_tokens = time.perf_counter(), 0.0
        self._steps_done, self._train_seconds, self._first_step_seconds = 0, 0.0, 0.0
        self._last_rate = float("nan")
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / JSONL_NAME, "a", buffering=1)
        self._tensorboard = _summary_writer_class()(str(run_dir / TENSORBOARD_DIR))
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, file=self.stream, unit="step",
                             dynamic_ncols=True)

    # ------------------------------------------------------------------------------ events

    def train_step(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        """Records one finished train step (`metrics` must include `loss` and `tokens`)."""
        if not self.enabled:
            return
        self._steps_done += 1
        self._train_seconds += seconds
        if self._steps_done == 1:
            self._first_step_seconds = seconds  # includes compilation; left out of the ETA
        self._window_tokens += metrics.get("tokens", 0.0)
        self._write("train", step, metrics)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{self._tokens_per_second():.0f}",
                                  refresh=False)
        elif step % self.log_every == 0 or step == self.total_steps:
            self._print(f"step {step}/{self.total_steps}  loss {metrics['loss']:.4f}  "
                        f"tokens/s {self._tokens_per_second():.0f}  eta {format_duration(self._eta(step))}")

    def eval(self, step: int, metrics: dict[str, float], label: str = "") -> None:
        """Records a validation result (`loss`, `perplexity`, ...)."""
        if not self.enabled:
            return
        self._write("eval", step, metrics)
        text = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        self._print(f"eval{f' ({label})' if label else ''} at step {step}: {text}")

    def text(self, step: int, tag: str, text: str) -> None:
        """A text sample (e.g. a generation), to TensorBoard and JSONL."""
        if not self.enabled:
            return
        self._tensorboard.add_text(tag, text, step)
        self._jsonl.write(json.dumps({"step": step, "kind": "text", "time": time.time(), "tag": tag, "text": text}) + "\n")

    def message(self, text: str) -> None:
        """A line for the human watching (kept clear of the progress bar)."""
        if self.enabled:
            self._print(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._tensorboard.close()
        self._jsonl.close()
        self.enabled = False

    # ------------------------------------------------------------------------------ helpers

    def _write(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self._tensorboard.add_scalar(f"{kind}/{name}", value, step)
        self._jsonl.write(json.dumps({"step": step, "kind": kind, "time": time.time(), **metrics}) + "\n")

    def _tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self._window_start
        if elapsed >= 1.0:  # a rolling rate over at least a second of wall time
            self._last_rate = self._window_tokens / elapsed
            self._window_start, self._window_tokens = time.perf_counter(), 0.0
        return self._last_rate

    def _eta(self, step: int) -> float:
        if self._steps_done < 2:
            return float("nan")
        per_step = (self._train_seconds - self._first_step_seconds) / (self._steps_done - 1)
        return (self.total_steps - step) * per_step

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)
