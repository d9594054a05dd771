"""`python -m llama_e_jax.generate`: text generation (see llama_e_jax/generate/cli.py)."""

import sys

from llama_e_jax.generate.cli import main

sys.exit(main())
