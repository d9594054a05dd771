"""How long should a LoRA train step take? Analytic FLOPs and a three-roofline step time.

The fit check (aot.py) gets memory and FLOPs from the TPU compiler. Those FLOPs are only as good as
the loop correction around them (XLA's cost analysis counts a `while` body once), so this module
computes the same number by hand, and the fit table prints both side by side and refuses to be
generated when they differ by more than 10 % (`check_flops`).

Counting (per token, one forward of a weight matrix with n parameters = 2n FLOPs):

* base matmuls: forward 2N + backward 2N (activation gradients only: the base is frozen, so no
  weight gradients) + the recomputation the remat policy asks for: all of it under "full" (so 6N,
  the issue's "≈ 6·N per token"), none under "dots_saveable" (4N), the attention projections and
  the down projection under "mlp_dots_saveable". A full fine-tune would add 2N of weight gradients
  (8N with full remat); LoRA recipes never do.
* attention scores: QKᵀ and AV, 4·T·H·Dh forward per token and layer over the full T×T square (the
  XLA attention computes masked entries too), twice that backward, plus a forward again when the
  policy recomputes it (every policy but "none" and "dots_saveable": they are dots with batch dims).
* LoRA: A and B of each adapted projection, forward + activation gradient + weight gradient, plus
  recomputation like their base matmul.
* the LM head, outside the remat'd layers: forward + activation gradient.

Step time: the largest of three rooflines, each a lower bound —

* compute: FLOPs / (peak × achievable MFU). The MFU is MaxText's published figure for LLaMA-2 on
  that chip (`MAXTEXT_MFU`): what a well-tuned JAX LLaMA reaches, so a prediction at it is what
  this code could reach once tuned, not what it reaches today (calibrated below against our own
  H200 measurement).
* HBM: the frozen weights streamed once per pass (forward, recompute, backward) plus the
  activations every layer writes and reads back, at full bandwidth.
* ICI: under fsdp every chip all-gathers each layer's weights before using them, once forward
  and once backward (the recomputation reuses the backward's gather), (n-1)/n of the weights each
  time, at the chip's ICI bandwidth. At 512 tokens per chip on 8 v5e chips this, not compute, is
  the bound — and XLA overlaps the gathers with compute only partly, hence max(), not sum().
"""

from __future__ import annotations

import dataclasses

from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.model.lora import LoraConfig

FLOP_TOLERANCE = 0.10  # compiler vs analytic FLOPs: beyond this the table generator refuses


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """Public per-chip figures (TPU: cloud.google.com/tpu/docs/<version>; GPU: NVIDIA's datasheet)."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s per chip, all links together (an optimistic bound for one collective)
    mfu: float  # achievable fraction of peak: MaxText's published LLaMA-2 MFU on this chip (see MAXTEXT_MFU)


# MaxText's published model-FLOP utilisation for LLaMA-2 training (github.com/AI-Hypercomputer/maxtext:
# getting_started/Run_Llama2.md, "Model Flop utilization for training on v5e and v5p and v4 TPUs with
# MaxText": Llama2-70b on v4-128 57 %, v5p-128 65 %, v5e-256 57 %; docs/reference/models/tiering.md:
# Llama 2 70B on v6e-256 43.8 %). MaxText publishes no 7B row in these tables; its 70B runs are the
# closest LLaMA-2 figures. MaxText counts model FLOPs (no recomputation) while running with remat, so
# applying its MFU to the FLOPs we execute (recomputation included) is conservative.
MAXTEXT_MFU = {"v4": 0.57, "v5e": 0.57, "v5p": 0.65, "v6e": 0.438}

ACCELERATORS = {
    # v4: 275 TFLOP/s, 32 GiB at 1228 GB/s, ICI 2400 Gbps per chip (cloud.google.com/tpu/docs/v4)
    "v4": Accelerator("TPU v4", 275e12, 1228e9, 300e9, MAXTEXT_MFU["v4"]),
    # v5e: 197 TFLOP/s, 16 GB at 819 GB/s, ICI 1600 Gbps per chip (cloud.google.com/tpu/docs/v5e)
    "v5e": Accelerator("TPU v5e", 197e12, 819e9, 200e9, MAXTEXT_MFU["v5e"]),
    # v5p: 459 TFLOP/s, 95 GB at 2765 GB/s, ICI 4800 Gbps per chip (cloud.google.com/tpu/docs/v5p)
    "v5p": Accelerator("TPU v5p", 459e12, 2765e9, 600e9, MAXTEXT_MFU["v5p"]),
    # v6e: 918 TFLOP/s, 32 GB at 1640 GB/s, ICI 800 GB/s bidirectional per chip (cloud.google.com/tpu/docs/v6e)
    "v6e": Accelerator("TPU v6e", 918e12, 1640e9, 800e9, MAXTEXT_MFU["v6e"]),
    # H200 SXM: 989 TFLOP/s dense bf16, 4.8 TB/s HBM3e (nvidia.com/h200 datasheet); one GPU, no ICI.
    # No MaxText H200 LLaMA-2 figure: the v5e/v4 57 % is used, and calibrate_gpu() checks it.
    "h200": Accelerator("NVIDIA H200", 989e12, 4.8e12, float("inf"), 0.57),
}


_PROJECTIONS = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                "mlp/down_proj")


def _recomputed(policy: str) -> tuple[frozenset[str], bool]:
    """(the projections whose matmuls the backward pass recomputes, whether it recomputes the
    attention scores) under a remat policy (model/llama.py `_remat_policy`)."""
    every = frozenset(_PROJECTIONS)
    return {"none": (frozenset(), False), "full": (every, True), "dots_saveable": (frozenset(), False),
            "dots_with_no_batch_dims_saveable": (frozenset(), True),
            "mlp_dots_saveable": (every - {"mlp/gate_proj", "mlp/up_proj"}, True)}[policy]


def _projections(c: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every projection of one layer, by its path in model/llama.py."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    d, f = c.hidden_size, c.intermediate_size
    return {"attn/q_proj": (d, q), "attn/k_proj": (d, kv), "attn/v_proj": (d, kv), "attn/o_proj": (q, d),
            "mlp/gate_proj": (d, f), "mlp/up_proj": (d, f), "mlp/down_proj": (f, d)}


def train_flops_per_token(c: LlamaConfig, lora: LoraConfig | None, seq_len: int) -> float:
    """Matmul FLOPs one token costs in a LoRA train step (forward, backward, recomputation)."""
    recomputed, scores_recomputed = _recomputed(c.remat_policy)
    per_layer = 0.0
    for path, (n_in, n_out) in _projections(c).items():
        again = 1 if path in recomputed else 0
        per_layer += 2 * n_in * n_out * (2 + again)
        if lora is not None and lora.targets_path(path):
            per_layer += 2 * lora.rank * (n_in + n_out) * (3 + again)
    scores = 4 * seq_len * c.num_heads * c.head_dim  # QKᵀ and AV, forward
    per_layer += scores * (3 + int(scores_recomputed))
    head = 2 * c.hidden_size * c.vocab_size * 2  # forward + activation gradient
    return c.num_layers * per_layer + head


def train_flops(c: LlamaConfig, lora: LoraConfig | None, tokens: int, seq_len: int, chips: int) -> float:
    """Analytic FLOPs of one train step per chip (the batch split evenly over the chips)."""
    return train_flops_per_token(c, lora, seq_len) * tokens / chips


def check_flops(compiler: float, analytic: float, what: str) -> None:
    """Raises when the compiler's (loop-corrected) FLOPs and the hand count disagree by > 10 %."""
    if abs(compiler - analytic) > FLOP_TOLERANCE * analytic:
        raise ValueError(f"{what}: compiler FLOPs {compiler:.4g} vs analytic {analytic:.4g} differ by "
                         f"{abs(compiler / analytic - 1):.0%} (> {FLOP_TOLERANCE:.0%}): the loop correction "
                         "or the hand count is wrong")


def _weight_bytes(c: LlamaConfig) -> float:
    per_layer = sum(n_in * n_out for n_in, n_out in _projections(c).values())
    itemsize = 2 if c.param_dtype in ("bfloat16", "float16") else 4
    return (c.num_layers * per_layer + 2 * c.hidden_size * c.vocab_size) * itemsize


def _passes(c: LlamaConfig) -> int:
    """Times the layers' weights are read in one step: forward, backward, and a recomputation."""
    return 3 if c.remat_policy != "none" else 2


def hbm_bytes(c: LlamaConfig, tokens_per_chip: int, seq_len: int, chips: int) -> float:
    """HBM traffic of one step per chip: every pass reads the (gathered) weights once and writes
    and reads back each layer's activations; attention's T×T scores go through HBM in fp32."""
    act_itemsize = 2 if c.dtype in ("bfloat16", "float16") else 4
    d, f, h = c.hidden_size, c.intermediate_size, c.num_heads
    # per token and layer: residual, 2 norms, q, k, v, attention out, o (≈ 8·d) and gate, up, act (3·f),
    # each written once and read once; scores: T per head, written and read, fp32.
    activations = (8 * d + 3 * f) * 2 * act_itemsize + seq_len * h * 2 * 4
    weights = _weight_bytes(c) * _passes(c) * (1 if chips == 1 else 2)  # gathered copies are written, then read
    return weights + _passes(c) * c.num_layers * activations * tokens_per_chip


def ici_bytes(c: LlamaConfig, fsdp: int) -> float:
    """Bytes each chip receives per step from the fsdp all-gathers (forward and backward)."""
    if fsdp <= 1:
        return 0.0
    return 2 * _weight_bytes(c) * (fsdp - 1) / fsdp


@dataclasses.dataclass(frozen=True)
class StepPrediction:
    """The three rooflines of one step (seconds) and the step time and MFU they imply."""

    flops: float  # per chip
    compute_s: float  # at peak × the chip's achievable MFU
    hbm_s: float
    ici_s: float
    peak: float  # the chip's peak FLOP/s

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.hbm_s, self.ici_s)

    @property
    def bound(self) -> str:
        return max((self.compute_s, "compute"), (self.hbm_s, "HBM"), (self.ici_s, "ICI"))[1]

    @property
    def mfu(self) -> float:
        """FLOPs executed / (step time × peak): at most the chip's achievable MFU, never above 1."""
        return self.flops / (self.step_s * self.peak)


def predict_step(c: LlamaConfig, lora: LoraConfig | None, chip: Accelerator, tokens: int, seq_len: int,
                 chips: int, fsdp: int) -> StepPrediction:
    """Predicted time of one train step of `tokens` tokens spread over `chips` chips."""
    flops = train_flops(c, lora, tokens, seq_len, chips)
    return StepPrediction(flops=flops, compute_s=flops / (chip.peak_flops * chip.mfu),
                          hbm_s=hbm_bytes(c, tokens // chips, seq_len, chips) / chip.hbm_bandwidth,
                          ici_s=ici_bytes(c, fsdp) / chip.ici_bandwidth, peak=chip.peak_flops)


# The H200 step bench/train_gpu.py measured (docs/benchmarks.md, 2026-11-27): LLaMA-2-7B shape, bf16,
# LoRA r=8 on q/k/v/o, batch 8 × 512, remat mlp_dots_saveable, one GPU: 0.266 s.
GPU_MEASUREMENT = dict(preset="llama2_7b", batch=8, seq_len=512, remat_policy="mlp_dots_saveable", step_s=0.266)


def calibrate_gpu() -> tuple[StepPrediction, float]:
    """(the method's prediction of the measured H200 step, the measured step time in seconds).

    Caveat: the H200 run used cuDNN flash attention, which skips the masked half of the causal
    scores; the count here is the XLA attention's full square, ≈ 1.5 % more FLOPs at T = 512.
    """
    m = GPU_MEASUREMENT
    config = LlamaConfig.from_preset(m["preset"], param_dtype="bfloat16", dtype="bfloat16",
                                     remat_policy=m["remat_policy"])
    tokens = m["batch"] * m["seq_len"]
    return predict_step(config, LoraConfig(), ACCELERATORS["h200"], tokens, m["seq_len"], 1, 1), m["step_s"]
