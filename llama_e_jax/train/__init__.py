"""LoRA training: state and step, checkpoints, the loop, metrics logging and multi-host start-up."""
