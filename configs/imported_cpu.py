"""The longer CPU recipe: SmolLM2-135M + LoRA on the seeds and the whole import, inside 60 minutes on 2 cores.

Needs the imported data in the cache first (`python -m data_prep.importers`, seconds). The
`imported` train split (~14.6k records, ~3M tokens) is far more than 2 CPU cores get through in an
hour (~16 s per step of 4 x 384 tokens), so this recipe samples it: 160 steps of 4 packed rows
(~250k tokens, about a twelfth of an epoch, every record drawn from a shuffled epoch order), with
`train.time_limit_s` stopping earlier on a busier machine so that evaluation, samples and export
still fit in the hour. For whole epochs use configs/imported_accel.py on a GPU/TPU. Measured
2026-12-01 on a 2-core CPU at load average 7-12: steps took a median 54 s, so the limit stopped it
after 47 of 160 steps (49.9 min end to end); quality in docs/evaluation.md.

    python -m data_prep.importers && python -m llama_e_jax.train --config configs/imported_cpu.py
"""

from configs import default


def get_config():
    config = default.get_config()
    config.run_dir = "runs/imported_cpu"
    config.data.tfds_config = "imported"
    config.train.steps = 160
    config.train.max_eval_batches = 6  # 48 packed rows of the 853-record validation split, before and after
    config.train.checkpoint_every = 40
    config.train.time_limit_s = 2700.0  # 45 minutes of stepping; the rest of the hour is load, eval, export
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 10
    return config
