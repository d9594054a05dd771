"""The paper's LLaMA-30B model (LLaMA-1) with the authors' LoRA recipe (configs/llama2_7b_lora.py).

The LLaMA-E paper tunes LLaMA-1 7B, 13B and 30B; settings it does not state are taken from the
released Llama-2-7B recipe.

    python -m llama_e_jax.train --config configs/llama_30b_lora.py --config.model.path=/path/to/llama-30b-hf
"""

from configs import llama2_7b_lora


def get_config():
    config = llama2_7b_lora.get_config()
    config.run_dir = "runs/llama_30b_lora"
    config.model.preset = "llama_30b"
    config.train.batch_size = 8  # 60 GB of bf16 weights: smaller micro-batches, same ~128 examples per step
    config.train.grad_accum_steps = 8
    config.train.eval_batch_size = 16
    return config
