"""Training recipes: one file per recipe, each with `get_config() -> ml_collections.ConfigDict`.

`default.py` is the embedded default (`python -m llama_e_jax.train` with no arguments) and documents
every field; the other recipes start from it and change what differs:

  tiny.py            random 2-layer model, byte tokenizer, seed JSONL: tests and smoke runs (seconds)
  llama2_7b_lora.py  the LLaMA-E authors' released recipe on Llama-2-7B (TPU/GPU)
  llama_7b_lora.py, llama_13b_lora.py, llama_30b_lora.py   the paper's LLaMA-1 models

Pick one with `--config configs/<name>.py` and override fields with `--config.<section>.<field>=value`.
`models/*.json` are model presets (HF config.json format) used by `model.preset`.
"""
