"""The paper's LLaMA-13B model (LLaMA-1) with the authors' LoRA recipe (configs/llama2_7b_lora.py).

The LLaMA-E paper tunes LLaMA-1 7B, 13B and 30B; settings it does not state are taken from the
released Llama-2-7B recipe.

    python -m llama_e_jax.train --config configs/llama_13b_lora.py --config.model.path=/path/to/llama-13b-hf
"""

from configs import llama2_7b_lora


def get_config():
    config = llama2_7b_lora.get_config()
    config.run_dir = "runs/llama_13b_lora"
    config.model.preset = "llama_13b"
    config.train.batch_size = 16  # rows per micro-batch; 4 micro-batches keep ~128 examples per step
    config.train.grad_accum_steps = 4
    return config
