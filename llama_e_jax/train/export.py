"""The end of a training run: the final adapter written in our format, as PEFT files, and merged.

Design, and why:

* **Every host gathers, one writes.** On a multi-host run the adapter is sharded across hosts;
  `gather` assembles a replicated host copy on every host (a collective: all must take part), then
  only the primary host writes files.
* **Merging happens on the mesh, donating the base.** The merged checkpoint is base + s·A·B computed
  where the base already lives, reusing its buffers (it is the run's last use of them), then
  written tensor by tensor, so the host never holds a second copy of the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from llama_e_jax.io import adapters
from llama_e_jax.io.weights import save_hf_checkpoint
from llama_e_jax.model import lora
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.train.recipe import ConfigError


def gather(tree: Any) -> Any:
    """A fully replicated host copy of a (possibly multi-host sharded) tree."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def export_adapter(run_dir: Path, adapter: Any, lora_config: lora.LoraConfig, model_config: LlamaConfig, *,
                   peft: bool, base_model_name: str, primary: bool) -> list[Path]:
    """`run_dir/adapter` (always) and `run_dir/peft_adapter` (when `peft`); [] on non-primary hosts."""
    host_adapter = gather(adapter)
    if not primary:
        return []
    paths = [adapters.save_adapter(run_dir / "adapter", host_adapter, lora_config, model_config)]
    if peft:
        paths.append(adapters.export_peft(run_dir / "peft_adapter", host_adapter, lora_config, model_config,
                                          base_model_name_or_path=base_model_name))
    return paths


def export_merged(out_dir: Path, base: Any, adapter: Any, lora_config: lora.LoraConfig, model_config: LlamaConfig,
                  tokenizer_source: Any) -> Path:
    """Base + adapter merged as an HF checkpoint in `out_dir`. `base` is donated: do not use it afterwards.

    Raises ConfigError on a multi-host run (the merged model is written from one host; merge the
    exported adapter on one machine instead: `lora.merge` + `weights.save_hf_checkpoint`).
    """
    if jax.process_count() > 1:
        raise ConfigError("export.merged_hf is written from one host; on a multi-host run export the adapter "
                         "and merge it on one machine (lora.merge + weights.save_hf_checkpoint)")
    merged = lora.merge(base, adapter, lora_config, donate_base=True)
    return save_hf_checkpoint(merged, model_config, out_dir, tokenizer_dir=tokenizer_source)
