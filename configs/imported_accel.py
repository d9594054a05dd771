"""The GPU/TPU recipe: SmolLM2-135M + LoRA through the seeds and the whole import, for whole epochs.

Needs the imported data in the cache first (`python -m data_prep.importers`). Two epochs of the
`imported` train split (~14.6k records) in packed rows of 512 tokens, 32 rows per step (~16k
tokens), with validation every 100 steps. On one accelerator this is minutes; on a CPU it is a day
(use configs/imported_cpu.py there).

    python -m data_prep.importers && python -m llama_e_jax.train --config configs/imported_accel.py
"""

from configs import default


def get_config():
    config = default.get_config()
    config.run_dir = "runs/imported_accel"
    config.data.tfds_config = "imported"
    config.data.seq_len = 512
    config.train.steps = 0
    config.train.epochs = 2.0
    config.train.batch_size = 32
    config.train.eval_batch_size = 32
    config.train.eval_every = 100
    config.train.log_every = 10
    config.train.checkpoint_every = 100
    config.train.keep_checkpoints = 3
    config.train.time_limit_s = 0.0
    config.optim.learning_rate = 5e-4
    config.optim.warmup_steps = 30
    config.samples.count = 5
    return config
