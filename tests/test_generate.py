"""Generation: samplers, cached decoding vs the full forward, transformers parity, stopping, batching.

Tiny random models (conftest's tiny_config / tiny_params) with a character-level tokenizer check the
mechanics exactly; SmolLM2-135M-Instruct checks greedy parity with transformers' `generate`.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_e_jax.data.prompt import build_prompt
from llama_e_jax.generate import cli, kernels, sampling, session
from llama_e_jax.generate.generator import Generator
from llama_e_jax.io import adapters, weights
from llama_e_jax.io.tokenizer import load_tokenizer
from llama_e_jax.model import llama, lora
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.model.llama import Llama

from conftest import assert_close, logits_bound, random_params

REPO = Path(__file__).resolve().parent.parent


class CharTokenizer:
    """id i <-> chr(32 + i): tokenization of any string is exact and predictable."""

    bos_id, eos_id, pad_id, add_bos, chat_template = 1, 2, None, False, None

    def __init__(self, vocab_size: int = 96) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [(ord(c) - 32) % self.vocab_size for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + int(i)) for i in ids)


@functools.partial(jax.jit, static_argnames=("config", "lora"))
def _last_logits(config, lora, variables, ids, last):  # ids [1, W] -> [V] logits at position `last`
    return Llama(config, lora).apply(variables, ids)[0, last]


def full_forward_greedy(config: LlamaConfig, params: dict, prompt: list[int], steps: int, lora=None, adapter=None,
                        width: int = 64):
    """Reference: greedy continuation recomputing the whole sequence each step (no cache).

    The sequence is right-padded to `width` (causal attention: padding after a position does not
    change its logits), so the forward compiles once.
    """
    variables = {"params": params} if adapter is None else {"params": params, "lora": adapter}
    ids = list(prompt)
    for _ in range(steps):
        padded = jnp.asarray([ids + [0] * (width - len(ids))], jnp.int32)
        ids.append(int(jnp.argmax(_last_logits(config, lora, variables, padded, len(ids) - 1))))
    return ids[len(prompt):]


TINY_FIELDS = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=256, eos_token_ids=(2,))


@pytest.fixture(scope="module")
def tiny():
    """(config, params, generator) of a 2-layer GQA model with a char tokenizer.

    Most tests decode PROMPTS (or PROMPTS7) with it so that they share compiled functions: 4 rows,
    prompts bucketed to 32 tokens, a 64-slot cache, chunks of 8 steps.
    """
    config = LlamaConfig(**TINY_FIELDS)
    params = random_params(config, seed=1)
    return config, params, Generator(config, params, CharTokenizer(), max_batch_size=4, chunk_size=8)


PROMPTS = ["Hello", "A much longer prompt, to pad", "x"]
PROMPTS7 = ["one", "two two", "three three three", "four", "five five fi", "six", "seven seven seven"]


# ----------------------------------------------------------------------------- samplers


def test_samplers_return_one_token_per_row_and_respect_their_support():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05, 0.0]] * 4 + [[0.05, 0.05, 0.1, 0.2, 0.6]] * 4) + 1e-9)
    greedy_like = {"greedy": sampling.Greedy(), "temperature 0": sampling.Temperature(temperature=0.0),
                   "top-k 1": sampling.TopK(k=1), "top-p 0.01": sampling.TopP(p=0.01)}
    sampled = {"top-k 2": sampling.TopK(k=2), "top-p 0.7": sampling.TopP(p=0.7),
               "temperature 1": sampling.Temperature(temperature=1.0),
               "per-row": sampling.TopP(p=jnp.ones((8,)), temperature=jnp.asarray([0.0] * 4 + [1.0] * 4))}

    @jax.jit
    def draws(samplers):  # name -> [100, 8]: 100 draws per row, with per-row keys
        keys = jax.random.split(jax.random.key(1), (100, 8))
        return {name: jax.vmap(lambda k: s.get_next_tokens(logits, k))(keys) for name, s in samplers.items()}

    results = jax.device_get(draws({**greedy_like, **sampled}))
    for name in greedy_like:
        assert results[name].shape == (100, 8) and results[name].dtype == np.int32
        assert (results[name] == np.asarray([0] * 4 + [4] * 4)).all(), name
    support = lambda name, rows: set(np.unique(results[name][:, rows]).tolist())
    assert support("top-k 2", slice(0, 4)) == {0, 1} and support("top-k 2", slice(4, 8)) == {3, 4}
    # nucleus: row 0 needs 0.5 + 0.3 to reach 0.7; row 4 needs 0.6 + 0.2
    assert support("top-p 0.7", slice(0, 4)) == {0, 1} and support("top-p 0.7", slice(4, 8)) == {3, 4}
    assert support("temperature 1", slice(0, 4)) == {0, 1, 2, 3}  # every token with mass shows up
    assert support("per-row", slice(0, 4)) == {0} and len(support("per-row", slice(4, 8))) > 1  # t=0 rows greedy


def test_sampler_arguments_are_checked():
    with pytest.raises(ValueError, match="p=0"):
        sampling.TopP(p=0)
    with pytest.raises(ValueError, match="temperature=-1"):
        sampling.Temperature(temperature=-1)
    with pytest.raises(ValueError, match="k=0"):
        sampling.TopK(k=0)
    with pytest.raises(TypeError):
        sampling.TopP(0.5)  # keyword-only


# ----------------------------------------------------------------------------- cached decoding


@pytest.mark.parametrize("variant,layer_loop", [("gqa", "unroll"), ("mha_tied", "scan")])
def test_cached_decoding_equals_full_forward_logits_at_each_step(tiny_config, tiny_params, variant, layer_loop):
    config = tiny_config(variant, max_position_embeddings=256)
    params = tiny_params(config, seed=2)
    weights = Generator(config, params, CharTokenizer(), layer_loop=layer_loop).weights
    prompts = [[5, 9, 14], list(range(3, 29)), [40]]  # lengths 3, 26, 1: the shapes of the `tiny` tests
    continuation = np.asarray([[11, 12, 13, 14, 15], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34]], np.int32)
    state = kernels.new_state(config, weights, 4, 64, sampling.Greedy(), (2,))
    admission = session.make_admission([session.Request(p, 8) for p in prompts], [0, 1, 2], 4, 64, CharTokenizer().encode)
    state = kernels.prefill(config, weights, state, admission)  # caches all but each prompt's last token

    width = max(len(p) for p in prompts) + continuation.shape[1]
    rows = [p + list(c) + [0] * (width - len(p) - len(c)) for p, c in zip(prompts, continuation)]
    full = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(rows, jnp.int32)))  # [3, width, V]
    fed = np.concatenate([[[p[-1]] for p in prompts], continuation], axis=1)  # [3, 1 + steps]
    tolerance = logits_bound(config, full)  # the same fp32 sums, blocked differently for a 1-token step
    for step in range(fed.shape[1]):
        tokens = np.zeros((4,), np.int32)  # row 3 is empty: inactive, its token is ignored
        tokens[:3] = fed[:, step]
        state, logits = kernels.feed_tokens(config, weights, state, tokens)
        for row, prompt in enumerate(prompts):
            assert_close(logits[row], full[row, len(prompt) - 1 + step], atol=tolerance,
                         why=f"fp32, cached step vs full forward; row {row}, step {step}")


@pytest.mark.parametrize("layer_loop", ["unroll", "scan"])
def test_model_cache_api_fills_in_pieces_like_one_full_forward(tiny_config, tiny_params, layer_loop):
    """Llama.apply with its KVCache: a prompt fed in two pieces (the second with a padded row that
    must write nowhere) gives the full forward's logits at `logits_at`, and the lengths it wrote."""
    config = tiny_config("gqa", max_position_embeddings=256)
    params = tiny_params(config, seed=3)
    ids = np.random.default_rng(0).integers(3, config.vocab_size, size=(2, 12)).astype(np.int32)
    full = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(ids)))  # [2, 12, V]
    weights = llama.split_layers(params) if layer_loop == "unroll" else params
    model = Llama(config, layer_loop=layer_loop)
    cache = llama.KVCache.zeros(config, 2, 32, layer_loop=layer_loop)
    _, cache = model.apply({"params": weights}, jnp.asarray(ids[:, :5]), cache=cache)
    segments = np.ones((2, 7), np.int32)
    segments[1, 4:] = 0  # row 1 stops after 9 tokens: its padding writes nowhere
    logits, cache = model.apply({"params": weights}, jnp.asarray(ids[:, 5:]), segment_ids=jnp.asarray(segments),
                                cache=cache, logits_at=jnp.asarray([[6], [3]]))
    assert logits.shape == (2, 1, config.vocab_size) and list(cache.lengths) == [12, 9]
    tolerance = logits_bound(config, full)  # the same fp32 sums, blocked differently
    assert_close(logits[0, 0], full[0, 11], atol=tolerance, why="fp32, cached pieces vs full forward, row 0")
    assert_close(logits[1, 0], full[1, 8], atol=tolerance, why="fp32, cached pieces vs full forward, row 1")


def test_batched_generation_equals_unbatched_full_forward(tiny):
    """7 prompts on 4 rows: rows are refilled as sequences finish (continuous batching)."""
    config, params, generator = tiny
    completions = generator.generate(PROMPTS7, max_new_tokens=10)
    for prompt, completion in zip(PROMPTS7, completions):
        expected = full_forward_greedy(config, params, CharTokenizer().encode(prompt), 10)
        stop_at = expected.index(2) + 1 if 2 in expected else 10
        assert completion.token_ids == tuple(expected[:stop_at])
        assert completion.prompt_tokens == len(prompt)
        assert completion.completion_tokens == len(completion.token_ids)
        assert completion.text == CharTokenizer().decode([t for t in completion.token_ids if t != 2])


# ----------------------------------------------------------------------------- transformers parity


def test_greedy_equals_transformers_generate_on_smollm2(smollm2_params, smollm2_hf_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    config, params = smollm2_params
    tokenizer = load_tokenizer(smollm2_hf_dir)
    prompts = [
        "The capital of France is",
        build_prompt("Write a short ad for a steel water bottle."),
        tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}], add_generation_prompt=True),
    ]
    new_tokens = 12
    ours = Generator(config, params, tokenizer, max_batch_size=4).generate(prompts, max_new_tokens=new_tokens)

    torch.set_num_threads(1)  # 2 shared cores: OpenMP spinning makes more threads 10x slower
    model = transformers.LlamaForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    ids = [tokenizer.encode(p) for p in prompts]
    width = max(map(len, ids))
    eos = tokenizer.eos_id
    inputs = torch.tensor([[eos] * (width - len(i)) + i for i in ids])  # left-padded batch
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    with torch.no_grad():
        generated = model.generate(inputs, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                   eos_token_id=eos, pad_token_id=eos, output_logits=True, return_dict_in_generate=True)
    reference = generated.sequences[:, width:].tolist()
    assert len({len(i) for i in ids}) == 3  # different prompt lengths in one batch
    # Equal tokens are a fair demand only where no step is a near tie: two fp32 implementations (logits_bound
    # apart) may order logits closer than 2 bounds (~0.05) either way. Hence these prompts: their closest
    # top-2 gaps are 0.22, 0.27 and 0.105 ("Name three colors." had one of 0.039).
    logits = torch.stack(generated.logits, 1).float().numpy()  # [B, steps, V]
    top2 = np.sort(logits, -1)[..., -2:]
    live = np.array([[step <= (row.index(eos) if eos in row else new_tokens) for step in range(new_tokens)]
                     for row in reference])  # steps up to each row's EOS
    assert ((top2[..., 1] - top2[..., 0])[live] > 2 * logits_bound(config, logits)).all(), "pick prompts without near ties"
    for completion, expected in zip(ours, reference):
        expected = expected[:expected.index(eos) + 1] if eos in expected else expected
        assert list(completion.token_ids) == expected
    assert [c.finish_reason for c in ours] == ["length", "length", "stop"]  # the chat answer ends at EOS
    assert ours[2].text == tokenizer.decode(reference[2], skip_special_tokens=True)


# ----------------------------------------------------------------------------- stopping


def test_eos_and_stop_sequences_end_each_row_independently(tiny):
    config, params, generator = tiny
    steps = kernels.STOP_WINDOW + 6
    free = generator.generate(PROMPTS, max_new_tokens=steps)
    tokens = [list(c.token_ids) for c in free]
    assert all(len(t) == steps for t in tokens), "pick prompts whose greedy output has no EOS"

    # EOS: declare a token of row 0 (not its first two) the end-of-sequence token. Each row ends at its own first
    # occurrence of it, or runs to its budget.
    eos_at = next(i for i in range(2, steps) if tokens[0][i] not in tokens[0][:i])
    eos = tokens[0][eos_at]
    with_eos = Generator(config, params, CharTokenizer(), eos_ids=(eos,), max_batch_size=4,
                           chunk_size=8).generate(PROMPTS, max_new_tokens=steps)
    for row, completion in enumerate(with_eos):
        end = tokens[row].index(eos) + 1 if eos in tokens[row] else steps
        assert list(completion.token_ids) == tokens[row][:end]
        assert completion.finish_reason == ("stop" if eos in tokens[row] else "length")
    assert with_eos[0].completion_tokens == eos_at + 1 and with_eos[0].text == free[0].text[:eos_at]
    assert any(c.finish_reason == "length" for c in with_eos)  # the others did not stop with row 0

    # Stop strings: a short one (matched on device, token by token) and one longer than the device
    # window (found only by the host's text check).
    short = free[1].text[5:7]
    long_text = free[2].text[:kernels.STOP_WINDOW + 2]
    stopped = generator.generate(PROMPTS, max_new_tokens=steps, stop=[short, long_text])
    for row, completion in enumerate(stopped):
        found = [i for i in (free[row].text.find(short), free[row].text.find(long_text)) if i >= 0]
        cut = min(found) if found else None
        assert completion.text == free[row].text[:cut]
        assert completion.finish_reason == ("stop" if found else "length")
    assert stopped[1].text == free[1].text[:5] and stopped[1].completion_tokens == 7
    assert stopped[2].text == "" and stopped[2].completion_tokens == kernels.STOP_WINDOW + 2


def test_prompt_that_does_not_fit_is_refused(tiny):
    _, _, generator = tiny
    with pytest.raises(kernels.GenerationError, match="prompt 1: prompt of 256 tokens does not fit"):
        generator.generate(["ok", "y" * 256], max_new_tokens=4)


def test_submit_from_many_threads_while_the_owner_thread_steps(tiny):
    """The session's contract: `submit` from any thread, `step` from one. 4 threads submit 7
    requests each while this thread steps; every request runs exactly once, with the tokens it
    gets alone (greedy on a per-row cache: companions never change a row's output)."""
    _, _, generator = tiny
    expected = {p: list(c.token_ids) for p, c in zip(PROMPTS7, generator.generate(PROMPTS7, max_new_tokens=6))}
    decode_session = generator.session(sampling.Greedy(), 4, 64, 8)  # the `tiny` shapes: compiled already
    submitted: list[tuple[str, session.Request]] = []
    start = threading.Barrier(5)

    def submitter() -> None:
        start.wait()
        for prompt in PROMPTS7:
            request = session.Request(generator.encode_prompt(prompt), 6)
            decode_session.submit(request)
            submitted.append((prompt, request))  # list.append is atomic

    threads = [threading.Thread(target=submitter) for _ in range(4)]
    for thread in threads:
        thread.start()
    start.wait()
    while any(thread.is_alive() for thread in threads) or decode_session.busy:
        decode_session.step()
    assert len(submitted) == 28 and not decode_session.queue
    assert all(decode_session.rows[row] is None for row in range(4))
    for prompt, request in submitted:
        assert request.done and request.token_ids == expected[prompt], prompt


def test_streamable_text_holds_back_partial_characters_and_stop_prefixes():
    assert session.stable_text_end("hello wor", False, ["world"]) == 6
    assert session.stable_text_end("hello x", False, ["world"]) == 7
    assert session.stable_text_end("ab\ufffd", False, []) == 2
    assert session.stable_text_end("ab\ufffd", True, []) == 3


# ----------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible_and_independent_of_batch_companions(tiny):
    _, _, generator = tiny
    sampler = sampling.TopP(p=0.9, temperature=1.5)
    first = generator.generate(PROMPTS7, max_new_tokens=8, sampler=sampler, seed=7)
    assert generator.generate(PROMPTS7, max_new_tokens=8, sampler=sampler, seed=7) == first
    assert generator.generate(PROMPTS7, max_new_tokens=8, sampler=sampler, seed=8) != first
    greedy = generator.generate(PROMPTS7, max_new_tokens=8)
    assert [c.token_ids for c in first] != [c.token_ids for c in greedy]  # it does sample
    # Prompt i samples with key (seed, i) whatever shares its batch: 3 prompts alone = the first 3 of 7.
    assert generator.generate(PROMPTS7[:3], max_new_tokens=8, sampler=sampler, seed=7) == first[:3]


# ----------------------------------------------------------------------------- adapters


def random_adapter(config: LlamaConfig):
    """(LoraConfig, adapter) with both A and B random, so that it changes the output."""

    lora_config = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
    rng = np.random.default_rng(3)
    adapter = lora.unflatten_adapter({path: {leaf: (0.3 * rng.standard_normal(shape)).astype(np.float32)
                                             for leaf, shape in leaves.items()}
                                      for path, leaves in lora.adapter_shapes(config, lora_config).items()})
    return lora_config, adapter


def test_merged_adapter_generates_like_the_unmerged_model(tiny):
    config, params, _ = tiny
    lora_config, adapter = random_adapter(config)
    generator = Generator(config, params, CharTokenizer(), adapter=adapter, lora_config=lora_config,
                            max_batch_size=4, chunk_size=8)
    completion = generator.generate(PROMPTS, max_new_tokens=6)[0]
    expected = full_forward_greedy(config, params, CharTokenizer().encode("Hello"), 6, lora_config, adapter)
    base = full_forward_greedy(config, params, CharTokenizer().encode("Hello"), 6)
    assert expected != base  # the adapter changes the output...
    assert list(completion.token_ids) == expected[:len(completion.token_ids)]  # ...and is applied merged


# ----------------------------------------------------------------------------- sharded params


SHARDED_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
from conftest import random_params
from test_generate import CharTokenizer
from llama_e_jax.generate import kernels, sampling
from llama_e_jax.generate.generator import Generator
from llama_e_jax.model import sharding
from llama_e_jax.model.config import LlamaConfig
config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=256, eos_token_ids=(2,))
params = random_params(config, seed=1)
mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
placed = sharding.place(params, mesh)
generator = Generator(config, placed, CharTokenizer(), max_batch_size=4, chunk_size=8)
state = kernels.new_state(config, generator.weights, 4, 64, sampling.Greedy(), (2,))
out = generator.generate({prompts!r}, max_new_tokens=10)
print(json.dumps({{"tokens": [list(c.token_ids) for c in out],
                   "q_spec": str(generator.weights["layers"]["0"]["attn"]["q_proj"]["kernel"].sharding.spec),
                   "cache_spec": str(state.cache.keys[0].sharding.spec), "devices": len(jax.devices())}}))
"""


def test_generation_with_sharded_params_matches_single_device(tiny):
    _, _, generator = tiny
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    script = SHARDED_SCRIPT.format(tests=str(REPO / "tests"), prompts=PROMPTS)
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["q_spec"] == "P('fsdp', 'tensor')"  # the rule minus the layer axis
    assert result["cache_spec"] == "P(('data', 'fsdp'), 'tensor')"  # [B, K, S, Dh]: rows and kv heads split
    expected = [list(c.token_ids) for c in generator.generate(PROMPTS, max_new_tokens=10)]
    assert result["tokens"] == expected


# ----------------------------------------------------------------------------- CLI


def test_cli_generates_for_a_jsonl_file_with_the_instruction_template(tmp_path, tiny, capsys, monkeypatch):

    config, params, _ = tiny
    model_dir, tokenizer_dir, adapter_dir = tmp_path / "model", tmp_path / "tok", tmp_path / "adapter"
    weights.save_hf_checkpoint(params, config, model_dir)
    _save_char_tokenizer(tokenizer_dir)
    lora_config, adapter = random_adapter(config)
    adapters.save_adapter(adapter_dir, adapter, lora_config, config)
    records = [{"id": f"r{i}", "task": "general_qa", "instruction": f"Say {word}", "input": inp,
                "output": "x", "aspects": ["customer"], "source": "seed"}
               for i, (word, inp) in enumerate([("hi", ""), ("bye", "now")])]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts = [build_prompt(r["instruction"], r["input"]) for r in records]
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: None)  # no writes to the user cache

    for extra, adapter_args in (([], {}), (["--adapter", str(adapter_dir)], dict(adapter=adapter, lora_config=lora_config))):
        out = tmp_path / f"out{len(extra)}.jsonl"
        code = cli.main(["--model", str(model_dir), "--tokenizer", str(tokenizer_dir), "--jsonl", str(jsonl),
                       "--max-new-tokens", "5", "--output", str(out), *extra])
        assert code == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        reference = Generator(config, params, load_tokenizer(tokenizer_dir), max_batch_size=4, chunk_size=8,
                                **adapter_args)
        expected = reference.generate(prompts, max_new_tokens=5)
        assert [r["id"] for r in rows] == ["r0", "r1"]
        assert [(r["text"], r["completion_tokens"]) for r in rows] == [(c.text, c.completion_tokens) for c in expected]
    assert rows[0]["text"] != json.loads((tmp_path / "out0.jsonl").read_text().splitlines()[0])["text"]

    assert cli.main(["--model", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err
    assert "missing: no such file or directory" in error and "error:" in error  # io.load's message, path first


def _save_char_tokenizer(directory: Path) -> None:
    """A 96-token character-level tokenizer.json (same ids as CharTokenizer) for the CLI."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {chr(32 + i): i for i in range(96)}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="~"))
    backend.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(".|\n"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    directory.mkdir(parents=True)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": '"', "add_bos_token": False}))


def test_an_admission_is_prefilled_in_power_of_two_parts_without_padding_rows():
    assert session.power_of_two_parts(7) == [4, 2, 1]
    assert session.power_of_two_parts(16) == [16]
    for count in range(1, 40):
        parts = session.power_of_two_parts(count)
        assert sum(parts) == count and parts == sorted(set(parts), reverse=True)
        assert all(kernels.bucket(part) == part for part in parts)  # each part is its own prefill shape
