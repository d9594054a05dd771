"""`python -m llama_e_jax.generate`: text generation (see llama_e_jax/generate/engine.py)."""

import sys

from llama_e_jax.generate.engine import main

sys.exit(main())
