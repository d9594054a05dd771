#!/usr/bin/env bash
# The GPU benchmarks in one go, for one lent H100 (needs only python3 with jax, flax, optax, torch,
# transformers, peft; no network, no tfds/grain/openai/ml_collections). Under 8 minutes in total:
#
#   1. bench/train_gpu.py  - LoRA step, LLaMA-7B shape, batch 8 x 512: HF transformers + peft, then ours
#                            with each remat policy (separate processes), < 4 minutes
#   2. bench/decode_gpu.py - 7B-shaped bf16 decode at batch 1 and 16 next to HF generate, plain and with
#                            prompt-lookup speculation (k=4; HF generate(prompt_lookup_num_tokens=4) at
#                            batch 1, in the same call), < 3 minutes
#
# Usage (from the repository root):   OUT=/some/dir bash bench/gpu_suite.sh
# Dry run on a CPU (tiny shapes, checks the plumbing):   TRAIN_ARGS=--tiny DECODE_ARGS=--tiny bash bench/gpu_suite.sh
# Writes to $OUT (default bench/results/gpu-<UTC time>): environment.txt, train_gpu.json,
# train_gpu.log, decode_gpu.json, decode_gpu.log. Each step has its own time limit, and a failing
# step does not stop the next one; the exit status is non-zero if any step failed.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  echo "command: OUT=$OUT TRAIN_ARGS=${TRAIN_ARGS:-} DECODE_ARGS=${DECODE_ARGS:-} bash bench/gpu_suite.sh"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$PY" - <<'EOF' 2>&1
import importlib.metadata as m, platform
print("python", platform.python_version())
for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "absent")
EOF
} > "$OUT/environment.txt"
cat "$OUT/environment.txt"

# 1. training step (the script keeps itself within --budget-s; the outer limit is a backstop)
timeout 290 "$PY" bench/train_gpu.py --out "$OUT/train_gpu.json" ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# 2. decoding
timeout 185 "$PY" bench/decode_gpu.py --out "$OUT/decode_gpu.json" --speculative-k 4 --budget-s 175 ${DECODE_ARGS:-} \
  2>&1 | tee "$OUT/decode_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "gpu_suite: results in $OUT (exit $status)"
exit $status
