"""`python -m llama_e_jax.train`: LoRA instruction tuning of a frozen LLaMA (see train/loop.py).

    python -m llama_e_jax.train                                  # the embedded default, configs/default.py
    python -m llama_e_jax.train --config configs/llama2_7b_lora.py --config.model.path=/ckpt/llama-2-7b-hf
    python -m llama_e_jax.train --config configs/tiny.py --config.train.steps=20 --config.run_dir=/tmp/run

A thin entry point: an absl app whose flags are one ml_collections config-file flag (`--config FILE`,
a recipe name such as `tiny` also works) with `--config.<section>.<field>=value` overrides, parsed
by `train/recipe.py`; then the training loop runs. Exit status: 0 completed or preempted, 1 diverged,
2 a bad config or input (one line naming it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app

from llama_e_jax.train import loop, recipe


def main(argv: Sequence[str] | None = None) -> int:
    """Parses `argv` (default: the command line, without the program name) and trains."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in argv):
        print(__doc__)
        return 0
    try:
        config = recipe.parse_config(argv)
    except recipe.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return loop.run(config)


def _absl_flags(argv: list[str]) -> list[str]:
    """absl's own flags get their defaults; the recipe flags are parsed by `recipe.parse_config`."""
    app.parse_flags_with_usage(argv[:1])
    return argv


if __name__ == "__main__":
    app.run(lambda argv: main(argv[1:]), flags_parser=_absl_flags)
