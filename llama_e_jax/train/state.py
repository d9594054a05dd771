"""The pure parts of LoRA training: train state, optimiser, loss, and the jit-compiled steps.

`train/loop.py` owns everything with side effects (files, signals, logging); this module is what a test
or a sharding experiment needs to run a step: `Trainer(model_config, lora_config, optimizer,
schedule, mesh)` gives `init(rng) -> TrainState`, `step(state, base, batch) -> (state, metrics)` and
`eval(adapter, base, batch) -> (loss_sum, tokens)`; `lower_step(...)` gives the same compiled step
for abstract arguments (the TPU fit check in aot.py compiles it for a pod it does not have).

Design choices, and why:

* **Only the adapter trains.** The state holds the fp32 adapter, its optimizer moments, the step
  and the PRNG key; the frozen base params are a separate argument of every step, never donated and
  never differentiated, so they need neither gradient nor optimizer memory and stay in bf16 on big
  models.
* **Loss per response token over the whole optimiser step.** A batch row packs several examples;
  the loss is summed over response tokens (the pipeline's `loss_mask`) of all rows of all
  micro-batches and divided once by their count. Averaging per row or per micro-batch instead would
  weight a token by how full its row happened to be.
* **Gradient accumulation is a `lax.scan` over micro-batches inside the one compiled step**: summed
  gradients, one division, one optimiser update. It is exact (unlike averaging micro-batch means)
  and needs no optimizer wrapper state. The host batch is laid out [B, A, T] (rows first, so the
  mesh splits rows) and transposed to [A, B, T] inside the step.
* **Weight decay** (AdamW's decoupled decay, default 0 as in the authors' recipe) applies to the
  LoRA matrices A and B — what HF Trainer + PEFT do, so a ported recipe behaves the same. Decay on B
  pulls the update s·A·B toward zero, i.e. toward the base model; decay on A with B = 0 at the start
  only shrinks the random projection a little. Any other adapter leaf (a vector: norm scale, bias)
  is never decayed.
* **The learning rate is an argument of the step.** The optimizer transform gives the update
  direction (clipped gradients → Adam → decoupled weight decay, i.e. optax.adamw without its final
  scaling); the step multiplies it by -learning_rate, which the host evaluates from the schedule.
  So the schedule (peak, warmup, length) is not compiled into the step: changing it, or resuming
  with another one, reuses the compiled program (also across processes, via the persistent cache).
* **Donation.** `step` donates the old train state, so the adapter and the two Adam moments are
  updated in place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from llama_e_jax.model import sharding
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.model.lora import LORA_A, LORA_B, Adapter, LoraConfig, init_adapter
from llama_e_jax.model.llama import Llama

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

# The train state's own leaves: the PRNG key and counters are replicated; adapters and Adam moments
# follow the model's rules (a moment's path ends like the adapter leaf it tracks).
STATE_RULES: sharding.Rules = sharding.PARAM_RULES + ((r"^rng$", P()),)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed), except the data position.

    Attributes:
      step: [] int32, optimiser updates applied so far.
      adapter: the fp32 LoRA tree (lora.py).
      opt_state: optax state of `adapter` (Adam moments, schedule count).
      rng: [2] uint32 raw PRNG key; split once per step for LoRA dropout.
    """

    step: jax.Array
    adapter: Adapter
    opt_state: optax.OptState
    rng: jax.Array


# ------------------------------------------------------------------------------------ optimiser


def learning_rate_schedule(optim: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `optim.learning_rate`, then cosine decay to `end_learning_rate_ratio` × peak."""
    warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(optim.learning_rate),
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=float(optim.learning_rate) * float(optim.end_learning_rate_ratio),
    )


def decay_mask(adapter: Adapter) -> Any:
    """True for the LoRA matrices (decayed), False for anything else (see the module docstring)."""

    def decays(path, leaf) -> bool:
        return sharding.path_str(path).rsplit("/", 1)[-1] in (LORA_A, LORA_B) and np.ndim(leaf) >= 2

    return jax.tree_util.tree_map_with_path(decays, adapter)


def make_optimizer(optim: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warmup + cosine and global-norm clipping, from the recipe's `optim` section.

    `optim` needs: learning_rate, warmup_steps, end_learning_rate_ratio, weight_decay, b1, b2, eps,
    max_grad_norm (0 disables clipping). Returns (direction, schedule): `direction` is optax.adamw
    up to its learning-rate scaling, which the step applies (see the module docstring).
    """
    direction = adamw_direction(float(optim.b1), float(optim.b2), float(optim.eps), float(optim.weight_decay),
                                float(optim.max_grad_norm))
    return direction, learning_rate_schedule(optim, total_steps)


def adamw_direction(b1: float, b2: float, eps: float, weight_decay: float,
                    max_grad_norm: float) -> optax.GradientTransformation:
    """Clip → Adam → decoupled weight decay."""
    clip = optax.clip_by_global_norm(max_grad_norm) if max_grad_norm else optax.identity()
    return optax.chain(clip, optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                       optax.add_decayed_weights(weight_decay, mask=decay_mask))


# ------------------------------------------------------------------------------------------ loss


def masked_token_loss(model: Llama, variables: dict, batch: Batch, dropout_rng: jax.Array | None = None) -> jax.Array:
    """[B, T] cross-entropy of each target token, 0 outside the pipeline's `loss_mask` (response tokens).

    `variables` is {"params": base} or {"params": base, "lora": adapter}; `dropout_rng=None` evaluates
    deterministically (no LoRA dropout). Training's loss and evaluation's reference perplexity
    (evaluate.py) are both sums of this, so they are the same number.
    """
    logits = model.apply(
        variables,
        batch["input_ids"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        deterministic=dropout_rng is None,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng},
    )  # [B, T, V] float32
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, T]
    return token_loss * batch["loss_mask"].astype(jnp.float32)


def summed_token_loss(
    model: Llama, adapter: Adapter, base: Any, batch: Batch, dropout_rng: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """(sum of cross-entropy over response tokens, number of response tokens) for one [B, T] batch.

    `dropout_rng=None` evaluates deterministically (no LoRA dropout).
    """
    token_loss = masked_token_loss(model, {"params": base, "lora": adapter}, batch, dropout_rng)  # [B, T]
    return jnp.sum(token_loss), jnp.sum(batch["loss_mask"].astype(jnp.float32))


# ------------------------------------------------------------------------------------------ steps


def train_step(
    model: Llama, optimizer: optax.GradientTransformation,
    state: TrainState, base: Any, batch: Batch, learning_rate: jax.Array,
) -> tuple[TrainState, Metrics]:
    """One optimiser update from a [B, A, T] batch (A micro-batches of B rows).

    `optimizer` gives the update direction, scaled here by -learning_rate ([] float32).
    Metrics: loss (mean over response tokens), response_tokens, tokens (non-padding), grad_norm
    (after averaging, before clipping), learning_rate (the one this update used).
    """
    micro_batches = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), dict(batch))  # [A, B, T]
    num_micro = micro_batches["input_ids"].shape[0]
    rng, step_rng = jax.random.split(state.rng)
    loss_and_grad = jax.value_and_grad(lambda a, b, k: summed_token_loss(model, a, base, b, k), has_aux=True)

    def accumulate(carry, inputs):
        grad_sum, loss_sum, response_tokens = carry
        index, micro = inputs
        (loss, count), grads = loss_and_grad(state.adapter, micro, jax.random.fold_in(step_rng, index))
        return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, response_tokens + count), None

    zeros = jax.tree.map(jnp.zeros_like, state.adapter)
    carry = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grad_sum, loss_sum, response_tokens), _ = jax.lax.scan(
        accumulate, carry, (jnp.arange(num_micro), micro_batches)
    )
    denominator = jnp.maximum(response_tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grad_sum)
    direction, opt_state = optimizer.update(grads, state.opt_state, state.adapter)
    adapter = jax.tree.map(lambda p, d: p - learning_rate * d, state.adapter, direction)
    metrics = {
        "loss": loss_sum / denominator,
        "response_tokens": response_tokens,
        "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
        "grad_norm": optax.global_norm(grads),
        "learning_rate": learning_rate,
    }
    return TrainState(step=state.step + 1, adapter=adapter, opt_state=opt_state, rng=rng), metrics


def eval_step(model: Llama, adapter: Adapter, base: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(summed response-token loss, response tokens) of one [B, T] batch, without dropout."""
    return summed_token_loss(model, adapter, base, batch, None)


class Trainer:
    """The compiled steps of one model + optimiser on one mesh.

    Args:
      model_config / lora_config: the model being adapted.
      optimizer / schedule: from `make_optimizer` (update direction, learning rate per step).
      mesh: a ("data", "fsdp", "tensor") mesh (sharding.make_mesh); all placement happens here.
    """

    def __init__(self, model_config: LlamaConfig, lora_config: LoraConfig,
                 optimizer: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh):
        self.model_config, self.lora_config, self.mesh = model_config, lora_config, mesh
        self.model = Llama(model_config, lora_config, mesh=mesh)  # pins activation shardings on `mesh`
        self.optimizer, self.schedule = optimizer, schedule
        compiled = _build_steps(model_config, lora_config, optimizer, mesh)
        self.state_shardings, self._init, self._step, self._eval = compiled

    def init(self, rng: jax.Array) -> TrainState:
        """A fresh state (B = 0, so step 0 is the base model), born sharded. rng: raw [2] uint32 key."""
        return self._init(rng)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
        abstract = jax.eval_shape(self._init, jax.random.PRNGKey(0))
        return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                            abstract, self.state_shardings)

    def place_base(self, base: Any) -> Any:
        """Base params onto the mesh by the sharding rules (a no-op copy on one device)."""
        return jax.device_put(base, sharding.param_shardings(base, self.mesh))

    def place_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's rows ([B, ...] or [B, A, T]) → global arrays split over the batch axes."""
        return sharding.shard_batch(host_batch, self.mesh)

    def place_state(self, state: TrainState) -> TrainState:
        return jax.device_put(state, self.state_shardings)

    def step(self, state: TrainState, base: Any, batch: Batch, step: int | None = None) -> tuple[TrainState, Metrics]:
        """One optimiser update; `state` is donated (do not use it afterwards).

        `step`: the number of updates already applied (= state.step), which picks the learning rate;
        passing it saves reading state.step back from the device.
        """
        step = int(state.step) if step is None else step
        learning_rate = np.float32(self.schedule(step))
        return self._step(state, base, batch, learning_rate)

    def lower_step(self, state: Any, base: Any, batch: Any, learning_rate: Any) -> jax.stages.Lowered:
        """The program `step` runs, lowered for these arguments without running it.

        Arguments may be abstract — `jax.ShapeDtypeStruct`s carrying shardings, e.g.
        `abstract_state()` — so `.compile()` builds the real step for a mesh of devices that are only
        described (aot.py), and `.as_text()` shows its HLO. `learning_rate`: [] float32.
        """
        return self._step.lower(state, base, batch, learning_rate)

    def eval(self, adapter: Adapter, base: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
        return self._eval(adapter, base, batch)


def _build_steps(model_config: LlamaConfig, lora_config: LoraConfig, optimizer: optax.GradientTransformation,
                 mesh: Mesh) -> tuple[Any, Callable, Callable, Callable]:
    """(state shardings, jitted init, jitted train step, jitted eval step) for one model/LoRA/optimizer/mesh.

    Built once per Trainer, which owns them: nothing is cached across Trainers in the process (a second
    Trainer traces again; JAX's persistent compilation cache, enabled by the CLIs, spares the compile).
    """
    model = Llama(model_config, lora_config, mesh=mesh)

    def init(rng: jax.Array) -> TrainState:
        adapter_rng, train_rng = jax.random.split(rng)
        adapter = init_adapter(model_config, lora_config, adapter_rng)
        return TrainState(step=jnp.zeros((), jnp.int32), adapter=adapter, opt_state=optimizer.init(adapter),
                          rng=train_rng)

    state_shardings = sharding.param_shardings(jax.eval_shape(init, jax.random.PRNGKey(0)), mesh, STATE_RULES)
    step = jax.jit(
        lambda state, base, batch, learning_rate: train_step(model, optimizer, state, base, batch, learning_rate),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    evaluate = jax.jit(lambda adapter, base, batch: eval_step(model, adapter, base, batch))
    return state_shardings, jax.jit(init, out_shardings=state_shardings), step, evaluate

