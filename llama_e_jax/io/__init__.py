"""Getting models in and out: HF/GGUF weights, adapters (ours and PEFT), tokenizers, the default model."""
