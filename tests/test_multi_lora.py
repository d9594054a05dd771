"""Several LoRA adapters on one unmerged base, mixed row by row (model/adapter_stack.py, Generator(adapters=)).

A tiny random 2-layer model with a character tokenizer; three adapters of different ranks and targets,
all with random A and B (so a mix-up changes tokens), are checked against merged single-adapter
Generators (greedy tokens) and the merged forward (logits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_e_jax import evaluate
from llama_e_jax.data.schema import InstructionRecord
from llama_e_jax.generate import cli, kernels, sampling, speculative
from llama_e_jax.generate.generator import Generator
from llama_e_jax.generate.session import Request
from llama_e_jax.io import adapters as io_adapters, weights
from llama_e_jax.model import adapter_stack, lora
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.model.llama import Llama

from conftest import FP32_EPS, assert_close, random_params
from test_generate import TINY_FIELDS, CharTokenizer, _save_char_tokenizer

REPO = Path(__file__).resolve().parent.parent

# Different ranks, targets and alphas: (rank, alpha, targets).
ADAPTER_SPECS = {
    "qv2": (2, 4.0, ("q_proj", "v_proj")),
    "attn8": (8, 16.0, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "o_up4": (4, 2.0, ("o_proj", "up_proj")),
}
PROMPTS = ["Hello", "A much longer prompt, to pad", "x", "quick"]


def make_adapter(config: LlamaConfig, rank: int, alpha: float, targets: tuple[str, ...], seed: int):
    """(adapter, LoraConfig) with random A and B (B non-zero: the adapter changes the output)."""
    lora_config = lora.LoraConfig(rank=rank, alpha=alpha, dropout=0.0, targets=targets)
    rng = np.random.default_rng(seed)
    flat = {path: {leaf: (0.4 * rng.standard_normal(shape)).astype(np.float32) for leaf, shape in leaves.items()}
            for path, leaves in lora.adapter_shapes(config, lora_config).items()}
    return lora.unflatten_adapter(flat), lora_config


@pytest.fixture(scope="module")
def setup():
    config = LlamaConfig(**TINY_FIELDS)
    params = random_params(config, seed=1)
    adapters = {name: make_adapter(config, *spec, seed=10 + i) for i, (name, spec) in enumerate(ADAPTER_SPECS.items())}
    # Up to 8 rows: a batch of 8 decodes through the dense all-slots path (N = 5 slots <= 8 rows),
    # a batch of 4 through the per-row gather (lora.LoraLinear._stacked_update).
    multi = Generator(config, params, CharTokenizer(), adapters=adapters, max_batch_size=8, chunk_size=8,
                      speculation=speculative.OFF)
    return config, params, adapters, multi


def merged_tokens(config, params, adapter_entry, prompts, max_new_tokens=8):
    adapter, lora_config = adapter_entry if adapter_entry is not None else (None, None)
    generator = Generator(config, params, CharTokenizer(), adapter=adapter, lora_config=lora_config,
                          max_batch_size=4, chunk_size=8, speculation=speculative.OFF)
    return [list(c.token_ids) for c in generator.generate(prompts, max_new_tokens=max_new_tokens)]


def test_stack_shape_holds_every_rank_and_target(setup):
    config, _, _, multi = setup
    shape = multi.stack_shape
    assert shape.rank == 8 and shape.slots == 4  # default: max(4, 3 adapters) slots, largest rank
    assert shape.targets == ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/up_proj")
    table = multi.weights["layers"]["0"]["attn"]["q_proj"][lora.STACK_A]
    assert table.shape == (5, config.hidden_size, 8)  # [N = slots + base, in, R]
    assert not np.any(np.asarray(table[0]))  # slot 0 = the base, zeros


def test_mixed_batch_equals_single_adapter_generators(setup):
    """Each row (3 adapters + base in one batch) generates what a merged Generator for its adapter does:
    in a batch of 4 (gathered per row) and of 8 (all slots at once, masked)."""
    config, params, adapters, multi = setup
    names = ["qv2", "attn8", None, "o_up4"]
    got = [list(c.token_ids) for c in multi.generate(PROMPTS, max_new_tokens=8, adapters=names)]
    expected = {name: merged_tokens(config, params, adapters.get(name) if name else None, PROMPTS) for name in
                ("qv2", "attn8", "o_up4", None)}
    for row, name in enumerate(names):
        assert got[row] == expected[name][row], (row, name)
    # Every row on the base: the tables are skipped (lax.cond), tokens are the base model's.
    assert [list(c.token_ids) for c in multi.generate(PROMPTS, max_new_tokens=8)] == expected[None]
    eight = [list(c.token_ids) for c in multi.generate(PROMPTS * 2, max_new_tokens=8, adapters=names[::-1] * 2)]
    for row, name in enumerate(names[::-1] * 2):
        assert eight[row] == expected[name][row % 4], (row, name)
    # The adapters matter: each changes row 0's tokens (so a swap of rows' adapters would be caught).
    assert len({tuple(expected[name][0]) for name in expected}) == 4
    swapped = [list(c.token_ids) for c in multi.generate(PROMPTS, max_new_tokens=8,
                                                         adapters=["attn8", "qv2", None, "o_up4"])]
    assert swapped[0] != got[0] and swapped[1] != got[1]


def test_scanned_layers_and_a_grown_stack_decode_the_same(setup):
    """layer_loop="scan" (tables [L, N, ...] sliced by the scan) and a stack grown by hot loads past
    its slots decode what the unrolled multi-adapter Generator does."""
    config, params, adapters, multi = setup
    names = ["qv2", "attn8", None, "o_up4"]
    expected = [list(c.token_ids) for c in multi.generate(PROMPTS, max_new_tokens=8, adapters=names)]
    scanned = Generator(config, params, CharTokenizer(), adapters={"qv2": adapters["qv2"]}, max_adapters=1,
                        max_adapter_rank=2, layer_loop="scan", max_batch_size=4, chunk_size=8,
                        speculation=speculative.OFF)
    for name in ("attn8", "o_up4"):  # no free slot, a larger rank, new targets: grows twice
        scanned.add_adapter(name, *adapters[name], source=name)
    assert scanned.stack_shape.slots >= 3 and scanned.stack_shape.rank == 8
    got = [list(c.token_ids) for c in scanned.generate(PROMPTS, max_new_tokens=8, adapters=names)]
    assert got == expected


def test_multi_adapter_logits_equal_the_merged_forward(setup):
    """Unmerged x·W + x·A·(sB) per row vs x·(W + sAB) merged, same prompt, one forward each.

    The two differ only by fp32 rounding: per projection, the merged kernel rounds W + sAB once per
    entry and the dots round in another order; each step errs by ~sqrt(K)·u relative to the size of
    its summands (K <= 48 here), carried through L layers to the logits (conftest.fp32_bound's
    model, relative to the logits' scale). The summands are |x|·(|W| + |sAB|), not |x|·|W + sAB|:
    with these deliberately strong adapters sAB outweighs W, so the bound grows by the factor
    1 + max|sAB| / max|W| (`_adapter_growth`). Computed at HIGHEST precision so no reduced-precision
    matmul hides in either.
    """
    config, params, adapters, multi = setup
    ids = jnp.asarray([CharTokenizer().encode("A much longer prompt, to pad")] * 4, jnp.int32)
    names = ["qv2", "attn8", None, "o_up4"]
    slots = jnp.asarray([multi.acquire_adapter(n) for n in names], jnp.int32)
    for slot in slots:
        multi.release_adapter(int(slot))
    with jax.default_matmul_precision("highest"):
        stacked = adapter_stack.attach(params, multi.stack_shape, config, jnp.float32)
        for name in ("qv2", "attn8", "o_up4"):
            stacked = adapter_stack.write_slot(
                stacked, multi._slot_of[name], adapter_stack.slot_values(*adapters[name], multi.stack_shape, config))
        got = Llama(config).apply({"params": stacked}, ids, adapter_ids=slots)
        bounds = []
        for row, name in enumerate(names):
            weights = params if name is None else lora.merge(params, *adapters[name])
            expected = Llama(config).apply({"params": weights}, ids[row:row + 1])[0]
            magnitude = float(jnp.abs(expected).max()) * _adapter_growth(params, adapters.get(name))
            bound = 10 * config.num_layers * np.sqrt(config.intermediate_size) * FP32_EPS * magnitude
            assert_close(got[row], expected, atol=bound, why="fp32 rounding of merged vs unmerged adapter")
            bounds.append(bound)
        # One token per row, 8 rows >= 5 slots: the decode-step (dense, masked) path.
        one = Llama(config).apply({"params": stacked}, jnp.tile(ids[:, :1], (2, 1)), adapter_ids=jnp.tile(slots, 2))
        for row, name in enumerate(names * 2):
            weights = params if name is None else lora.merge(params, *adapters[name])
            expected = Llama(config).apply({"params": weights}, ids[:1, :1])[0]
            magnitude = float(jnp.abs(expected).max()) * _adapter_growth(params, adapters.get(name))
            bound = 10 * config.num_layers * np.sqrt(config.intermediate_size) * FP32_EPS * magnitude
            assert_close(one[row], expected, atol=bound, why="fp32 rounding of merged vs unmerged adapter")
        # A mix-up is far outside that bound: row 0 with attn8's slot instead of qv2's.
        wrong = Llama(config).apply({"params": stacked}, ids[:1], adapter_ids=slots[1:2])[0]
        assert float(jnp.abs(wrong - got[0]).max()) > 100 * bounds[0]


def _adapter_growth(params: dict, entry) -> float:
    """1 + the largest max|sAB| / max|W| over the adapted projections (1 for the base)."""
    if entry is None:
        return 1.0
    adapter, lora_config = entry
    ratios = []
    for path, leaves in lora.flatten_adapter(adapter).items():
        group, name = path.split("/")
        delta = lora_config.scale * np.einsum("lir,lro->lio", leaves[lora.LORA_A], leaves[lora.LORA_B])
        ratios.append(np.abs(delta).max() / np.abs(np.asarray(params["layers"][group][name]["kernel"])).max())
    return 1.0 + float(max(ratios))


def test_base_params_without_tables_ignore_adapter_ids(setup):
    """Params without stacked tables (training, merged decoding) take the plain path, bit for bit."""
    config, params, _, _ = setup
    ids = jnp.asarray([[3, 4, 5, 6]], jnp.int32)
    plain = Llama(config).apply({"params": params}, ids)
    with_ids = Llama(config).apply({"params": params}, ids, adapter_ids=jnp.asarray([2], jnp.int32))
    assert np.array_equal(np.asarray(plain), np.asarray(with_ids))


def test_speculative_decoding_with_mixed_adapters_equals_plain(setup):
    config, params, adapters, multi = setup
    prompts = ["abcabcabcabc", "the cat the cat the", "x", "quick quick quick"]
    names = ["attn8", None, "o_up4", "qv2"]
    plain = [list(c.token_ids) for c in multi.generate(prompts, max_new_tokens=12, adapters=names)]
    spec = Generator(config, params, CharTokenizer(), adapters=adapters, max_batch_size=4, chunk_size=8,
                     speculation=speculative.Speculation(num_draft=3))
    assert spec.speculation.enabled
    got = [list(c.token_ids) for c in spec.generate(prompts, max_new_tokens=12, adapters=names)]
    assert got == plain


def _compiles(function) -> int:
    return function._cache_size()


def test_hot_add_compiles_nothing_and_remove_waits_for_running_rows(setup):
    config, params, adapters, _ = setup
    generator = Generator(config, params, CharTokenizer(), adapters={"qv2": adapters["qv2"]}, max_adapters=3,
                          max_adapter_rank=8, max_batch_size=4, chunk_size=8, speculation=speculative.OFF)
    # Targets outside the initial stack (q, v) grow it once; then everything fits.
    generator.add_adapter("attn8", *adapters["attn8"], source="attn8")
    generator.add_adapter("o_up4", *adapters["o_up4"], source="o_up4")
    generator.remove_adapter("o_up4")
    expected = merged_tokens(config, params, adapters["o_up4"], ["Hello"], max_new_tokens=20)[0]
    session = generator.session(sampling.Greedy(), 4, 64, 8)
    warm = [Request(CharTokenizer().encode("Hello"), 4, adapter="attn8")]
    session.run(warm)  # compiles prefill and decode for this stack
    compiled = (_compiles(kernels.prefill), _compiles(kernels.decode_chunk))
    generator.add_adapter("o_up4", *adapters["o_up4"], source="o_up4")  # fits: a free slot, rank, targets
    running = Request(CharTokenizer().encode("Hello"), 20, adapter="o_up4")
    session.submit(running)
    session.step()  # admitted and decoding with o_up4...
    assert (_compiles(kernels.prefill), _compiles(kernels.decode_chunk)) == compiled
    generator.remove_adapter("o_up4")  # ...removed while it decodes
    assert "o_up4" not in generator.adapter_names
    with pytest.raises(kernels.GenerationError, match="unknown adapter 'o_up4'"):
        session.submit(Request([5, 6], 4, adapter="o_up4"))
    # A new adapter cannot take the slot still in use by the running row.
    generator.add_adapter("qv2_again", *adapters["qv2"], source="qv2")
    assert generator._slot_of["qv2_again"] != running.adapter_slot
    while session.busy:
        session.step()
    assert running.token_ids == expected  # finished with its adapter
    assert running.adapter_slot not in generator._contents  # and its slot is free now
    with pytest.raises(kernels.GenerationError, match="unknown adapter"):
        generator.remove_adapter("o_up4")
    with pytest.raises(kernels.GenerationError, match="already loaded"):
        generator.add_adapter("attn8", *adapters["attn8"], source="attn8")


@pytest.mark.parametrize("change, message", [
    (dict(hidden_size=40, intermediate_size=48), r"attn/q_proj/lora_a: shape \[2, 40, 2\], expected \[2, 32, 2\]"),
    (dict(num_layers=3), r"attn/q_proj/lora_a: shape \[3, 32, 2\], expected \[2, 32, 2\]"),
])
def test_bad_adapter_is_refused_naming_the_tensor_and_changes_nothing(setup, change, message):
    config, params, adapters, _ = setup
    generator = Generator(config, params, CharTokenizer(), adapters={"attn8": adapters["attn8"]},
                          max_batch_size=4, chunk_size=8)
    before = jax.tree.map(np.asarray, adapter_stack.tables(generator.weights))
    other = LlamaConfig(**{**TINY_FIELDS, **change})
    bad, bad_config = make_adapter(other, 2, 4.0, ("q_proj", "v_proj"), seed=1)
    with pytest.raises(lora.AdapterError, match=message):
        generator.add_adapter("bad", bad, bad_config, source="bad.safetensors")
    assert generator.adapter_names == ("attn8",)
    after = jax.tree.map(np.asarray, adapter_stack.tables(generator.weights))
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))


def test_unknown_target_is_refused(setup):
    config, params, adapters, _ = setup
    generator = Generator(config, params, CharTokenizer(), adapters={}, max_batch_size=4)
    adapter, lora_config = make_adapter(config, 2, 4.0, ("q_proj",), seed=1)
    adapter["layers"]["attn"]["x_proj"] = adapter["layers"]["attn"]["q_proj"]
    with pytest.raises(lora.AdapterError, match=r"attn/x_proj: not a projection of this model .*\[2, 32, 2\]"):
        generator.add_adapter("x", adapter, lora_config, source="x")
    with pytest.raises(lora.AdapterError, match="'w_proj' matches no projection"):
        generator.add_adapter("w", *make_adapter(config, 2, 4.0, ("q_proj", "w_proj"), seed=1), source="w")
    assert generator.adapter_names == ()


def test_requests_naming_unknown_adapters_fail_in_both_modes(setup):
    config, params, adapters, multi = setup
    with pytest.raises(kernels.GenerationError, match="unknown adapter 'nope'"):
        multi.generate(["hi"], max_new_tokens=2, adapters=["nope"])
    merged = Generator(config, params, CharTokenizer(), adapter=adapters["qv2"][0], lora_config=adapters["qv2"][1],
                       max_batch_size=4)
    assert not merged.multi_adapter and merged.adapter_names == ()
    with pytest.raises(kernels.GenerationError, match="unknown adapter 'qv2'"):
        merged.generate(["hi"], max_new_tokens=2, adapters=["qv2"])


SHARDED_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
from conftest import random_params
from test_generate import CharTokenizer, TINY_FIELDS
from test_multi_lora import ADAPTER_SPECS, PROMPTS, make_adapter
from llama_e_jax.generate import speculative
from llama_e_jax.generate.generator import Generator
from llama_e_jax.model import sharding
from llama_e_jax.model.config import LlamaConfig
config = LlamaConfig(**TINY_FIELDS)
mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
params = sharding.place(random_params(config, seed=1), mesh)
adapters = {{name: make_adapter(config, *spec, seed=10 + i) for i, (name, spec) in enumerate(ADAPTER_SPECS.items())}}
generator = Generator(config, params, CharTokenizer(), adapters=adapters, max_batch_size=8, chunk_size=8,
                      speculation=speculative.OFF)
out = generator.generate(PROMPTS * 2, max_new_tokens=8, adapters=["qv2", "attn8", None, "o_up4"] * 2)
layer = generator.weights["layers"]["0"]
print(json.dumps({{"tokens": [list(c.token_ids) for c in out],
                   "o_a": str(layer["attn"]["o_proj"]["lora_stack_a"].sharding.spec),
                   "q_b": str(layer["attn"]["q_proj"]["lora_stack_b"].sharding.spec)}}))
"""


def test_sharded_multi_adapter_decode_equals_unsharded(setup):
    _, _, _, multi = setup
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    script = SHARDED_SCRIPT.format(tests=str(REPO / "tests"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["o_a"] == "P(None, 'tensor')"  # [N, in, R]: row-parallel o_proj split on `in`
    assert result["q_b"] == "P(None, None, 'tensor')"  # [N, R, out]: column-parallel q_proj split on `out`
    expected = [list(c.token_ids) for c in multi.generate(PROMPTS * 2, max_new_tokens=8,
                                                          adapters=["qv2", "attn8", None, "o_up4"] * 2)]
    assert result["tokens"] == expected


def test_cli_answers_every_prompt_with_the_base_and_each_adapter(tmp_path, setup, monkeypatch):
    config, params, adapters, multi = setup
    model_dir, tokenizer_dir = tmp_path / "model", tmp_path / "tok"
    weights.save_hf_checkpoint(params, config, model_dir)
    _save_char_tokenizer(tokenizer_dir)
    for name in ("qv2", "o_up4"):
        io_adapters.save_adapter(tmp_path / name, *adapters[name], config)
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: None)  # no writes to the user cache
    out = tmp_path / "out.jsonl"
    code = cli.main(["--model", str(model_dir), "--tokenizer", str(tokenizer_dir), "--raw", "Hello", "quick",
                     "--adapter", f"qv2={tmp_path / 'qv2'}", "--adapter", f"o={tmp_path / 'o_up4'}",
                     "--max-new-tokens", "6", "--output", str(out), "--no-speculative"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["system"]) for r in rows] == [(i, s) for i in ("0", "1") for s in ("base", "qv2", "o")]
    names = {"base": None, "qv2": "qv2", "o": "o_up4"}
    expected = multi.generate([p for p in ("Hello", "quick") for _ in names], max_new_tokens=6,
                              adapters=[names[s] for _ in range(2) for s in names])
    assert [r["text"] for r in rows] == [c.text for c in expected]


def test_evaluate_decodes_every_system_in_one_pass_like_separate_generators(setup):
    """evaluate's one-pass decoding (all systems in the same batches) gives each system the replies a
    Generator of its own (merged adapter, or the base) gives."""
    config, params, adapters, _ = setup
    records = [InstructionRecord(id=f"r{i}", task="general_qa", instruction=text, input="", output="x",
                                 aspects=("customer",), source="seed")
               for i, text in enumerate(["Say hi", "Name a colour", "Count"])]
    systems = [evaluate.System("base"), evaluate.System("a", *adapters["attn8"]),
               evaluate.System("b", *adapters["qv2"])]
    options = evaluate.EvalOptions(generation=evaluate.GenerationSettings(max_new_tokens=6, batch_size=4,
                                                                          speculation=speculative.OFF))
    multi = Generator(config, params, CharTokenizer(), max_batch_size=4, speculation=speculative.OFF,
                      adapters={"a": adapters["attn8"], "b": adapters["qv2"]})
    decoded = evaluate._decode_all_systems(multi, systems, records, options)
    for system in systems:
        alone = Generator(config, params, CharTokenizer(), adapter=system.adapter, lora_config=system.lora_config,
                          max_batch_size=4, speculation=speculative.OFF)
        expected = evaluate.generate_replies(alone, records, options.generation)
        assert [r.text for r in decoded[system.name][0]] == [r.text for r in expected], system.name
    assert decoded["a"][0] != decoded["base"][0]
