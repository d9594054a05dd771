"""Helper of tests/test_aot.py, run with the libtpu interpreter (compiles for a v5e:2x2 topology on this CPU).

For a narrow LLaMA-2-shaped model (width 256, 2 heads of 128, vocab 4096: matmuls still dominate, and it
compiles in seconds) and each (rows per chip, sequence length), prints one JSON line of per-device train-step
FLOPs: the fit check's count (`aot.straight_line_cost`, from the step compiled with 2 and 3 layers unrolled)
for 2, 3 and 8 layers and the hand count (roofline); the first line also has the scanned (real) 2-layer
step's own count. Two shapes that differ in both rows and length: each TPU compile takes ~15 s on 2 cores,
and the hand count is checked against the compile at both.
"""

import json
import time

from llama_e_jax import aot, roofline
from llama_e_jax.model import sharding
from llama_e_jax.train import recipe

CASES = ((1, 128), (4, 256))  # (rows per chip, sequence length)

aot.use_cpu_host()
devices = aot.topology_devices("v5e:2x2")
for rows, seq in CASES:
    started = time.time()
    config = aot.parse_recipe(["--config", "configs/llama2_7b_lora.py", f"--config.data.seq_len={seq}",
                               f"--config.train.batch_size={4 * rows}", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                               "--config.mesh.tensor=1", "--config.train.grad_accum_steps=1"])
    mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh), devices)
    narrow = aot.model_config_of(config).replace(hidden_size=256, intermediate_size=688, num_heads=2, num_kv_heads=2,
                                                 vocab_size=4096, remat_policy="full")
    compiled = {}  # LlamaConfig -> executable: the 2- and 3-layer probes are shared by every layer count

    def compile_for(model):
        if model not in compiled:
            compiled[model] = aot.compile_train_step(config, model, mesh)
        return compiled[model]

    lora = recipe.lora_config_of(config)
    out = dict(rows=rows, seq=seq)
    for layers in (2, 3, 8):
        model = narrow.replace(num_layers=layers)
        out[f"counted_{layers}"] = float(aot.straight_line_cost(compile_for, model)[0])
        out[f"analytic_{layers}"] = roofline.train_flops(model, lora, 4 * rows * seq, seq, 4)
    if (rows, seq) == CASES[0]:
        scanned = aot.compile_train_step(config, narrow.replace(num_layers=2), mesh)
        out["scanned_2"] = float(aot._cost(scanned)[0])
    out["seconds"] = round(time.time() - started)
    print(json.dumps(out), flush=True)
