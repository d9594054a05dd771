"""python -m llama_e_jax.serve (see llama_e_jax.serve.cli)."""

from llama_e_jax.serve.cli import main

raise SystemExit(main())
