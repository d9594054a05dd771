"""`python -m llama_e_jax.train`: LoRA training (see llama_e_jax/train/loop.py)."""

import sys

from llama_e_jax.train.loop import main

sys.exit(main())
