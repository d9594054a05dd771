"""Tiny: a random 2-layer model with a byte tokenizer on the seed JSONL — tests and smoke runs.

Trains in seconds on a CPU; the loss falls because the byte-level Alpaca template is easy to learn.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.run_dir = "runs/tiny"
    config.model.source = "random"
    config.model.preset = "tiny"
    config.data.source = "jsonl"
    config.data.files = ("data_prep/seeds",)
    config.data.seq_len = 512  # bytes: the template alone is ~200; longer prompts (classification) are left out
    config.train.steps = 8
    config.train.batch_size = 2
    config.train.eval_batch_size = 4
    config.train.max_eval_batches = 2
    config.train.log_every = 1
    config.train.checkpoint_every = 4
    config.train.time_limit_s = 0.0
    config.optim.learning_rate = 1e-2
    config.optim.warmup_steps = 1
    config.samples.count = 0
    config.export.peft = False
    return config
