"""`Generator`: a model, its tokenizer and compiled decoding, reusable across calls.

Evaluation, training's sample generations, the server and the CLI all decode through a Generator:
it merges an adapter into the base weights (`lora.merge`: no extra matmuls while decoding), splits
the layers for the fast unrolled decode (`llama.split_layers`), and opens `DecodeSession`s
(session.py) on those weights. `load_generator` builds one from any source `io.load.load_model`
accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_e_jax.generate import sampling, speculative
from llama_e_jax.generate.constraints import Automaton, Budget
from llama_e_jax.generate.guided import Guide
from llama_e_jax.generate.kernels import GenerationError, bucket, length_bucket
from llama_e_jax.generate.session import Completion, DecodeSession, Request
from llama_e_jax.io.load import load_model
from llama_e_jax.model import lora
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.model.llama import LAYER_LOOPS, split_layers


class Generator:
    """Params, tokenizer and compiled decoding, reusable across calls (evaluation, the server).

    Args:
      config: the model config (its dtype is the compute and cache dtype).
      params: base params (stacked layers, as model.py); with `adapter`, the adapter is merged in.
      tokenizer: a llama_e_jax.io.tokenizer.Tokenizer.
      adapter / lora_config: optional LoRA adapter tree and its settings.
      max_batch_size: rows decoded together (the server's batch; `generate` uses up to this).
      max_length: cache slots per row = prompt + generated tokens (default: the model's context,
        capped at 4096).
      chunk_size: decode steps per device call (the host checks stop strings and streams text in
        between).
      layer_loop: "unroll" (fast decode, default) or "scan" (faster compile for deep models on CPU).
      eos_ids: tokens that end a sequence (default: the config's EOS ids and the tokenizer's EOS).
      speculation: prompt-lookup speculative decoding settings (speculative.py); default
        speculative.DEFAULT, `speculative.OFF` (or num_draft 0) decodes one token per step.
    """

    def __init__(
        self,
        config: LlamaConfig,
        params: dict,
        tokenizer: Any,
        *,
        adapter: dict | None = None,
        lora_config: Any = None,
        max_batch_size: int = 16,
        max_length: int | None = None,
        chunk_size: int = 32,
        layer_loop: str = "unroll",
        eos_ids: Sequence[int] | None = None,
        speculation: speculative.Speculation | None = None,
    ) -> None:
        if layer_loop not in LAYER_LOOPS:
            raise GenerationError(f"layer_loop={layer_loop!r}, expected one of {LAYER_LOOPS}")
        if adapter is not None:
            if lora_config is None:
                raise GenerationError("an adapter needs its lora_config")
            params = lora.merge(params, adapter, lora_config)
        self.config = config
        self.tokenizer = tokenizer
        weights = split_layers(params) if layer_loop == "unroll" else params
        # Host (numpy) leaves go to the device once here, not with every call.
        self.weights = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, weights)
        self.max_batch_size = max_batch_size
        self.max_length = max_length or min(config.max_position_embeddings, 4096)
        self.chunk_size = chunk_size
        if eos_ids is None:
            eos_ids = set(config.eos_token_ids) | {getattr(tokenizer, "eos_id", None)} - {None}
        self.eos_ids = tuple(sorted(eos_ids))
        self.speculation = speculative.DEFAULT if speculation is None else speculation

    def guide(self, guide: Guide, budget: Budget = Budget()) -> Automaton:
        """The automaton of `guide` over this model's tokenizer, for `Request.constraint` / `constraints=`
        (compiled here, cached per tokenizer; the server compiles off its engine thread instead,
        guided.GuideCompiler). Raises constraints.ConstraintError naming what cannot be compiled."""
        return guide.compile(self.tokenizer, eos_ids=self.eos_ids, vocab_size=self.config.vocab_size, budget=budget)

    # ---------------------------------------------------------------- text

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.eos_ids], skip_special_tokens=True)

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt ids, with BOS prepended when the tokenizer wants one and the text lacks it."""
        ids = self.tokenizer.encode(text)
        bos = self.tokenizer.bos_id
        if self.tokenizer.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    # ---------------------------------------------------------------- generation

    def session(self, sampler: Any, batch_size: int | None = None, max_length: int | None = None,
                chunk_size: int | None = None) -> DecodeSession:
        """A decoding session (the server keeps one open)."""
        return DecodeSession(self, batch_size or self.max_batch_size, max_length or self.max_length, sampler,
                             chunk_size or self.chunk_size)

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 128,
        sampler: Any = sampling.Greedy(),
        stop: Sequence[str] = (),
        seed: int = 0,
        constraints: Sequence[Automaton | None] | None = None,
    ) -> list[Completion]:
        """Generates a continuation of each prompt (raw text: apply templates before).

        Prompts are decoded together, up to `max_batch_size` at a time, in order of submission;
        prompt i samples with key (seed, i), so results do not depend on the batch size.
        `constraints` (optional): one automaton (`guide`) or None per prompt.
        """
        return self.generate_ids([self.encode_prompt(p) for p in prompts], max_new_tokens, sampler, stop, seed,
                                 constraints)

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        max_new_tokens: int = 128,
        sampler: Any = sampling.Greedy(),
        stop: Sequence[str] = (),
        seed: int = 0,
        constraints: Sequence[Automaton | None] | None = None,
    ) -> list[Completion]:
        """`generate` for prompts given as token ids."""
        if not prompt_ids:
            return []
        if constraints is None:
            constraints = [None] * len(prompt_ids)
        if len(constraints) != len(prompt_ids):
            raise GenerationError(f"constraints: {len(constraints)} given for {len(prompt_ids)} prompts")
        longest = max(len(ids) for ids in prompt_ids)
        max_length = length_bucket(longest + max_new_tokens, self.max_length, minimum=64)
        batch_size = bucket(len(prompt_ids), maximum=self.max_batch_size)
        sequences = [
            Request(list(ids), max_new_tokens, sampler, tuple(stop), seed=seed, stream=i, constraint=constraint)
            for i, (ids, constraint) in enumerate(zip(prompt_ids, constraints))
        ]
        session = self.session(sampler, batch_size, max_length, bucket(max_new_tokens, 8, maximum=self.chunk_size))
        for i, seq in enumerate(sequences):
            try:
                session.check(seq)
            except GenerationError as error:
                raise GenerationError(f"prompt {i}: {error}") from None
        session.run(sequences)
        return [seq.completion() for seq in sequences]



def load_generator(
    model: str | None = None,
    adapter: str | None = None,
    *,
    dtype: str = "float32",
    tokenizer: str | None = None,
    **generator_options: Any,
) -> Generator:
    """A Generator for any source `io.load.load_model` accepts (None: the embedded SmolLM2).

    `adapter` is a directory saved by `lora.save_adapter` or a PEFT adapter directory. `tokenizer`
    overrides where the tokenizer is read from (default: the model file/directory). Bad paths raise
    `io.load.ModelLoadError` (a ValueError) naming the path.
    """
    loaded = load_model(model, adapter=adapter, tokenizer=tokenizer, dtype=dtype)
    return Generator(loaded.config, loaded.params, loaded.tokenizer, adapter=loaded.adapter,
                     lora_config=loaded.lora_config, **generator_options)
