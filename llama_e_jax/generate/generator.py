"""`Generator`: a model, its tokenizer and compiled decoding, reusable across calls.

Evaluation, training's sample generations, the server and the CLI all decode through a Generator:
it merges an adapter into the base weights (`lora.merge`: no extra matmuls while decoding), splits
the layers for the fast unrolled decode (`llama.split_layers`), and opens `DecodeSession`s
(session.py) on those weights. `load_generator` builds one from any source `io.load.load_model`
accepts.

Several adapters (`adapters=`): the base stays unmerged and every adapter goes into one slot of the
stacked tables (model/adapter_stack.py); each Request names its adapter, and rows with different
adapters decode in the same batch. Slots are reference counted by the requests holding them, so
`remove_adapter` hides a name at once but frees its slot only when its last row has finished, and
`add_adapter` writes into a free slot without recompiling (or grows the stack when it must).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Mapping, Sequence
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
from llama_e_jax.io.adapters import load_any_adapter
from llama_e_jax.model import adapter_stack, lora, quant
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
      adapters: name -> (adapter tree, LoraConfig), possibly empty: several adapters on the unmerged
        base, picked per request by `Request.adapter` (excludes `adapter`).
      max_adapters: adapter slots of the stack (default max(4, len(adapters))); max_adapter_rank:
        its inner width (default the largest rank given, at least 8). Adapters that fit are hot
        loaded (`add_adapter`) without recompiling.
      weights: storage of the frozen projection kernels, "float32" (as given), "bfloat16" or "int8"
        (weight-only, per-channel scales; model/quant.py), applied after merging `adapter`.
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
        adapters: Mapping[str, tuple[dict, lora.LoraConfig]] | None = None,
        max_adapters: int | None = None,
        max_adapter_rank: int | None = None,
        weights: str = quant.DEFAULT_MODE,
    ) -> None:
        if layer_loop not in LAYER_LOOPS:
            raise GenerationError(f"layer_loop={layer_loop!r}, expected one of {LAYER_LOOPS}")
        if adapter is not None and adapters is not None:
            raise GenerationError("adapter= (merged) and adapters= (several, unmerged) exclude each other")
        if adapter is not None:
            if lora_config is None:
                raise GenerationError("an adapter needs its lora_config")
            params = lora.merge(params, adapter, lora_config)
        params = quant.quantize_params(params, weights)  # after the merge: merging into int8 would ignore the scales
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
        self._adapters_lock = threading.Lock()  # sessions acquire slots from submit's thread
        self._slot_of: dict[str, int] = {}  # visible name -> slot
        self._contents: dict[int, tuple[dict, lora.LoraConfig]] = {}  # occupied slot -> what it holds
        self._users: collections.Counter[int] = collections.Counter()  # slot -> requests holding it
        self._stack: adapter_stack.StackShape | None = None
        if adapters is not None:
            self._open_stack(adapters, max_adapters, max_adapter_rank)

    # ---------------------------------------------------------------- several adapters

    @property
    def multi_adapter(self) -> bool:
        return self._stack is not None

    @property
    def adapter_names(self) -> tuple[str, ...]:
        with self._adapters_lock:
            return tuple(self._slot_of)

    @property
    def stack_shape(self) -> adapter_stack.StackShape | None:
        return self._stack

    def _open_stack(self, adapters: Mapping[str, tuple[dict, lora.LoraConfig]], max_adapters: int | None,
                    max_adapter_rank: int | None) -> None:
        for name, (tree, config) in adapters.items():
            adapter_stack.validate(tree, config, self.config, f"adapter {name!r}")
        slots = max_adapters if max_adapters is not None else max(4, len(adapters))
        if slots < len(adapters):
            raise GenerationError(f"max_adapters={slots} < {len(adapters)} adapters given")
        shape = adapter_stack.initial_shape([config for _, config in adapters.values()], slots, max_adapter_rank)
        self._rebuild(shape.grown(slots, [config for _, config in adapters.values()]))
        for name, (tree, config) in adapters.items():
            self._place(name, tree, config)

    def _rebuild(self, shape: adapter_stack.StackShape) -> None:
        """New (zeroed) tables of `shape`, refilled with every occupied slot (new shapes: recompiles)."""
        self._stack = shape
        self.weights = adapter_stack.attach(self.weights, shape, self.config, jnp.dtype(self.config.dtype))
        for slot, (tree, config) in self._contents.items():
            self._write(slot, tree, config)

    def _write(self, slot: int, tree: dict, config: lora.LoraConfig) -> None:
        values = adapter_stack.slot_values(tree, config, self._stack, self.config)
        self.weights = adapter_stack.write_slot(self.weights, slot, values)

    def _place(self, name: str, tree: dict, config: lora.LoraConfig) -> None:
        """Writes a validated adapter into a free slot, growing the stack if it must."""
        free = [s for s in range(1, self._stack.num_slots) if s not in self._contents]
        if not free or not self._stack.fits(config):
            # Out of slots: double them, so that a run of hot loads recompiles once, not every time.
            slots = len(self._contents) + 1 if free else max(len(self._contents) + 1, 2 * self._stack.slots)
            self._rebuild(self._stack.grown(slots, [config]))
            free = [s for s in range(1, self._stack.num_slots) if s not in self._contents]
        slot = free[0]
        self._write(slot, tree, config)
        with self._adapters_lock:
            self._contents[slot] = (tree, config)
            self._slot_of[name] = slot

    def add_adapter(self, name: str, adapter: dict, lora_config: lora.LoraConfig, *, source: str) -> None:
        """Loads `adapter` under `name` for new requests (multi-adapter Generators only).

        Validates first (lora.AdapterError naming the tensor and both shapes; nothing changes on
        error). An adapter that fits the stack (a free slot, rank and targets within it) is written
        into it without recompiling anything; otherwise the stack grows: new table shapes, so the
        next prefill/decode step recompiles. Call it from the thread that runs the sessions, between
        steps. A name already present raises GenerationError.
        """
        if self._stack is None:
            raise GenerationError("add_adapter needs a Generator built with adapters= (several adapters)")
        adapter_stack.validate(adapter, lora_config, self.config, source)
        if name in self.adapter_names:
            raise GenerationError(f"adapter {name!r} is already loaded")
        self._place(name, adapter, lora_config)

    def remove_adapter(self, name: str) -> None:
        """Hides `name` at once (new requests naming it fail); rows decoding with it finish with it,
        and its slot is reused once none uses it. Unknown name: GenerationError."""
        with self._adapters_lock:
            if name not in self._slot_of:
                raise GenerationError(f"unknown adapter {name!r}")
            slot = self._slot_of.pop(name)
            if not self._users[slot]:
                del self._contents[slot]

    def acquire_adapter(self, name: str | None) -> int:
        """The slot of adapter `name` (0 = base), held by a request until `release_adapter` (sessions)."""
        if name is None:
            return 0
        with self._adapters_lock:
            if name not in self._slot_of:
                raise GenerationError(f"unknown adapter {name!r}")
            slot = self._slot_of[name]
            self._users[slot] += 1
            return slot

    def release_adapter(self, slot: int) -> None:
        if slot == 0:
            return
        with self._adapters_lock:
            self._users[slot] -= 1
            if not self._users[slot] and slot not in self._slot_of.values():
                del self._users[slot]
                self._contents.pop(slot, None)

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
        adapters: Sequence[str | None] | None = None,
    ) -> list[Completion]:
        """Generates a continuation of each prompt (raw text: apply templates before).

        Prompts are decoded together, up to `max_batch_size` at a time, in order of submission;
        prompt i samples with key (seed, i), so results do not depend on the batch size.
        `constraints` (optional): one automaton (`guide`) or None per prompt. `adapters` (optional,
        multi-adapter Generators): one adapter name or None (the base) per prompt.
        """
        return self.generate_ids([self.encode_prompt(p) for p in prompts], max_new_tokens, sampler, stop, seed,
                                 constraints, adapters)

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        max_new_tokens: int = 128,
        sampler: Any = sampling.Greedy(),
        stop: Sequence[str] = (),
        seed: int = 0,
        constraints: Sequence[Automaton | None] | None = None,
        adapters: Sequence[str | None] | None = None,
    ) -> list[Completion]:
        """`generate` for prompts given as token ids.

        The prompts enter the batch shortest first: rows admitted together are padded to their longest
        prompt, and similar lengths pad least. Results keep the given order, and prompt i samples with
        its own key (seed, i) whatever its place in the batch.
        """
        if not prompt_ids:
            return []
        constraints = [None] * len(prompt_ids) if constraints is None else constraints
        adapters = [None] * len(prompt_ids) if adapters is None else adapters
        for what, given in (("constraints", constraints), ("adapters", adapters)):
            if len(given) != len(prompt_ids):
                raise GenerationError(f"{what}: {len(given)} given for {len(prompt_ids)} prompts")
        longest = max(len(ids) for ids in prompt_ids)
        max_length = length_bucket(longest + max_new_tokens, self.max_length, minimum=64)
        batch_size = bucket(len(prompt_ids), maximum=self.max_batch_size)
        sequences = [
            Request(list(ids), max_new_tokens, sampler, tuple(stop), seed=seed, stream=i, constraint=constraint,
                    adapter=adapter)
            for i, (ids, constraint, adapter) in enumerate(zip(prompt_ids, constraints, adapters))
        ]
        session = self.session(sampler, batch_size, max_length, bucket(max_new_tokens, 8, maximum=self.chunk_size))
        for i, seq in enumerate(sequences):
            try:
                session.check(seq)
            except GenerationError as error:
                raise GenerationError(f"prompt {i}: {error}") from None
        session.run(sorted(sequences, key=lambda seq: len(seq.prompt_ids)))
        return [seq.completion() for seq in sequences]



def load_generator(
    model: str | None = None,
    adapter: str | None = None,
    *,
    adapters: Mapping[str, str] | None = None,
    dtype: str = "float32",
    tokenizer: str | None = None,
    **generator_options: Any,
) -> Generator:
    """A Generator for any source `io.load.load_model` accepts (None: the embedded SmolLM2).

    `adapter` is a directory saved by `lora.save_adapter` or a PEFT adapter directory, merged into
    the weights; `adapters` (name -> such a directory, excludes `adapter`) loads several, unmerged,
    picked per request. `tokenizer` overrides where the tokenizer is read from (default: the model
    file/directory). Bad paths raise `io.load.ModelLoadError` (a ValueError) or lora.AdapterError
    naming the path.
    """
    if adapter is not None and adapters is not None:
        raise GenerationError("adapter= (merged) and adapters= (several, unmerged) exclude each other")
    loaded = load_model(model, adapter=adapter, tokenizer=tokenizer, dtype=dtype)
    if adapters is not None:
        trees = {name: load_any_adapter(directory, loaded.config) for name, directory in adapters.items()}
        return Generator(loaded.config, loaded.params, loaded.tokenizer, adapters=trees, **generator_options)
    return Generator(loaded.config, loaded.params, loaded.tokenizer, adapter=loaded.adapter,
                     lora_config=loaded.lora_config, **generator_options)
