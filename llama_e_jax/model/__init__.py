"""The model: configuration, the one LLaMA forward pass (training, prefill and decode), the LoRA layer and sharding rules."""
