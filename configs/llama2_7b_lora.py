"""The LLaMA-E authors' released recipe: LoRA on Llama-2-7B (their adapter_model.bin was trained so).

Adapter settings are the released ones (r=8, alpha=16, dropout 0.05 on q/k/v/o). The optimiser
and batch values are not published with the adapter; they follow alpaca-lora, which the authors'
training code builds on (AdamW 3e-4, 100 warmup steps, 3 epochs, ~128 examples per step, no weight
decay) — an assumption, marked as such. Rows are packed, so 64 rows of 512 tokens (~2-3 examples
each) give about 128 examples per optimiser step.

    python -m llama_e_jax.train --config configs/llama2_7b_lora.py \
        --config.model.path=/path/to/Llama-2-7b-hf --config.data.tfds_config=seed_expanded \
        --config.data.files=data/expanded
"""

from configs import default


def get_config():
    config = default.get_config()
    config.run_dir = "runs/llama2_7b_lora"
    config.model.source = "hf"
    config.model.path = ""  # required: an HF Llama-2-7B checkpoint directory (safetensors)
    config.model.preset = "llama2_7b"  # the checkpoint must have this shape
    config.model.param_dtype = "bfloat16"
    config.model.dtype = "bfloat16"
    config.model.remat_policy = "full"

    config.data.seq_len = 512
    config.train.steps = 0
    config.train.epochs = 3.0
    config.train.batch_size = 32
    config.train.grad_accum_steps = 2
    config.train.eval_batch_size = 32
    config.train.eval_every = 200
    config.train.log_every = 10
    config.train.checkpoint_every = 200
    config.train.keep_checkpoints = 3
    config.train.time_limit_s = 0.0  # no wall-clock limit (the default recipe has one for its 10-minute budget)

    config.optim.learning_rate = 3e-4
    config.optim.warmup_steps = 100
    config.optim.end_learning_rate_ratio = 0.0
    config.optim.weight_decay = 0.0

    config.mesh.data = 1
    config.mesh.fsdp = -1  # shard the bf16 base (13.5 GB) over all chips: fits 16 GB-HBM TPU chips
    config.samples.count = 5
    config.samples.max_new_tokens = 128
    return config
