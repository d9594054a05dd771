"""Decoding: sampling, constraints, compiled prefill/decode kernels, the batching session and the CLI."""
