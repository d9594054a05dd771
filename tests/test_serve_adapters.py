"""Several adapters served from one base (`serve --adapter NAME=DIR`), and hot loading them (/v1/adapters).

A tiny random LLaMA with the byte tokenizer; adapters are random (B non-zero, so each changes the
greedy tokens) with different ranks and targets, saved to disk with io.adapters and loaded the way
the server loads them. What a row of adapter X must produce is what a Generator with X merged into
its weights produces (greedy), computed once per prompt. Merged and unmerged LoRA differ by fp32
rounding only (~1e-6 relative on logits of order 1), far below the gap between a random model's top
two logits, so greedy tokens must agree exactly.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import jax
import jax.monitoring
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import random_params
from llama_e_jax import serve as S
from llama_e_jax.generate import sampling
from llama_e_jax.generate.generator import Generator
from llama_e_jax.generate.session import GenerationError, Request
from llama_e_jax.io.adapters import NATIVE_WEIGHTS, export_peft, save_adapter
from llama_e_jax.io.tokenizer import ByteTokenizer
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.model.lora import LORA_B, LoraConfig, flatten_adapter, init_adapter, unflatten_adapter
from llama_e_jax.serve.adapters import ModelRegistry, check_admin_key, parse_adapter_args, resolve_inside
from llama_e_jax.serve.protocol import ApiError

openai = pytest.importorskip("openai")

API_KEY, ADMIN_KEY = "client-key", "admin-key"
BASE = "tiny-base"
MAX_CONTEXT, BATCH, CHUNK = 96, 8, 4
MAX_TOKENS = 32
PROMPTS = ["Write an ad for a mug.", "Title: linen dress", "Q: who buys earbuds?", "Pan, cast iron:"]
CONFIG = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=MAX_CONTEXT,
                     bos_token_id=1, eos_token_ids=(2,))
# name -> (rank, targets, seed): different ranks and targets; "hot" is loaded while serving (PEFT format)
ADAPTERS = {
    "ads": (4, ("q_proj", "v_proj"), 1),
    "titles": (8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 2),
    "qa": (2, ("gate_proj", "up_proj", "down_proj"), 3),
    "hot": (4, ("o_proj", "up_proj"), 4),
    "big": (16, ("q_proj", "v_proj"), 5),  # rank 16 > the stack's 8: loading it grows the stack
}
STARTUP = ("ads", "titles", "qa")


def random_adapter(rank: int, targets: tuple[str, ...], seed: int) -> tuple[dict, LoraConfig]:
    """An adapter whose B is random (a fresh one has B = 0 and changes nothing)."""
    lora_config = LoraConfig(rank=rank, alpha=2.0 * rank, dropout=0.0, targets=targets)
    flat = flatten_adapter(init_adapter(CONFIG, lora_config, jax.random.PRNGKey(seed)))
    rng = np.random.default_rng(seed)
    for leaves in flat.values():  # B ~ N(0, 0.3²): deltas comparable to the base weights' 1/sqrt(fan_in)
        leaves[LORA_B] = (0.3 * rng.standard_normal(np.shape(leaves[LORA_B]))).astype(np.float32)
    flat = {path: {leaf: np.asarray(value, np.float32) for leaf, value in leaves.items()}
            for path, leaves in flat.items()}
    return unflatten_adapter(flat), lora_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The base params, the adapters (trees and directories under an adapter root), and what each
    model must answer: {model: [greedy Completion per prompt]} from merged single-adapter Generators."""
    params = random_params(CONFIG, seed=11)
    root = tmp_path_factory.mktemp("adapter-root")
    trees, dirs = {}, {}
    for name, (rank, targets, seed) in ADAPTERS.items():
        trees[name] = random_adapter(rank, targets, seed)
        save = export_peft if name == "hot" else save_adapter  # the PEFT format is accepted too
        dirs[name] = save(root / name, *trees[name], CONFIG)
    expected = {BASE: _greedy(Generator(CONFIG, params, ByteTokenizer(), max_batch_size=BATCH,
                                        max_length=MAX_CONTEXT, chunk_size=CHUNK))}
    for name, (tree, lora_config) in trees.items():
        expected[name] = _greedy(Generator(CONFIG, params, ByteTokenizer(), adapter=tree, lora_config=lora_config,
                                           max_batch_size=BATCH, max_length=MAX_CONTEXT, chunk_size=CHUNK))
    for name in ADAPTERS:  # each adapter changes the answer, so routing to the wrong one is seen
        assert [c.text for c in expected[name]] != [c.text for c in expected[BASE]], name
    return params, root, trees, dirs, expected


def _greedy(generator: Generator, max_tokens: int = MAX_TOKENS) -> list:
    sampler = sampling.TopP(p=1.0, temperature=0.0)
    session = generator.session(sampler, BATCH, MAX_CONTEXT, CHUNK)
    requests = [Request(generator.encode_prompt(p), max_tokens, sampler) for p in PROMPTS]
    session.run(requests)
    return [r.completion() for r in requests]


class GatedEngine(S.BatchingEngine):
    """The engine with a gate before each decode step. Closed (`hold`), it stops the engine thread
    there, mid-decode, so the test acts while requests are certainly in flight; `release_after_command`
    opens it once an adapter change is queued (the engine runs it before its next step)."""

    def __init__(self, *args, **kwargs) -> None:
        self.gate, self.held = threading.Event(), threading.Event()
        self.gate.set()
        super().__init__(*args, **kwargs)

    def _new_session(self):
        session = super()._new_session()
        step = session.step

        def gated_step() -> None:
            if not self.gate.is_set():
                self.held.set()
                self.gate.wait(60)
            step()

        session.step = gated_step
        return session

    def hold(self) -> list[str | None]:
        """Closes the gate; once the engine waits at it, the adapters of the requests it holds."""
        self.held.clear()
        self.gate.clear()
        assert self.held.wait(60), "the engine did not reach a decode step: nothing was in flight"
        with self._lock:
            requests = [r for r in self._session.rows if r is not None] + [*self._session.queue, *self._waiting]
        return [r.adapter for r in requests]

    def release_after_command(self) -> None:
        deadline = time.monotonic() + 60
        while not self._commands:
            assert time.monotonic() < deadline, "no adapter command was queued"
            time.sleep(0.005)
        self.gate.set()


@pytest.fixture(scope="module")
def server(setup):
    """(ServerThread, BatchingEngine) serving the base and the STARTUP adapters, hot loading enabled."""
    params, root, trees, dirs, _ = setup
    generator = Generator(CONFIG, params, ByteTokenizer(), adapters={n: trees[n] for n in STARTUP},
                          max_adapters=6, max_adapter_rank=8, max_batch_size=BATCH, max_length=MAX_CONTEXT,
                          chunk_size=CHUNK)
    engine = GatedEngine(generator, max_batch_size=BATCH, chunk_size=CHUNK, batch_wait_s=0.01)
    app = S.create_app(engine, model_name=BASE, api_key=API_KEY, template="instruction", admin_key=ADMIN_KEY,
                       adapter_root=root)
    with S.ServerThread(app) as thread:
        yield thread, engine


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0].base_url, api_key=API_KEY, max_retries=0, timeout=120)


def admin(server, method: str, path: str = "", key: str | None = ADMIN_KEY, **kwargs) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.request(method, server[0].base_url + "/adapters" + path, headers=headers, timeout=60, **kwargs)


def model_ids(server) -> list[str]:
    return [m.id for m in client(server).models.list().data]


def complete(server, model: str, prompt: str, *, stream: bool = False, max_tokens: int = MAX_TOKENS) -> str:
    c = client(server)
    if not stream:
        return c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text
    pieces = c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
    return "".join(chunk.choices[0].text for chunk in pieces if chunk.choices)


# ---------------------------------------------------------------------------------------- routing


def test_models_lists_the_base_and_each_adapter(server):
    listing = client(server).models.list().data
    assert [m.id for m in listing] == [BASE, *STARTUP]
    assert all(getattr(m, "parent", None) == BASE for m in listing[1:])


def test_each_model_answers_with_its_own_adapter(server, setup):
    expected = setup[4]
    jobs = [(model, i) for model in (BASE, *STARTUP) for i in range(len(PROMPTS))]  # one batch, mixed rows
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda job: complete(server, job[0], PROMPTS[job[1]], stream=job[1] % 2 == 1), jobs))
    for (model, i), text in zip(jobs, texts):
        assert text == expected[model][i].text, (model, PROMPTS[i])


def test_unknown_model_is_a_404_model_not_found(server):
    with pytest.raises(openai.NotFoundError) as caught:
        client(server).completions.create(model="nope", prompt="hi", max_tokens=2)
    assert caught.value.status_code == 404 and caught.value.code == "model_not_found"
    body = httpx.get(server[0].base_url + "/models/nope", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert body["error"]["code"] == "model_not_found" and body["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------------------------------- admin guards


@pytest.mark.parametrize("key, status", [(None, 401), ("wrong", 401), (API_KEY, 401)])
def test_admin_endpoints_need_the_admin_key(server, key, status):
    before = model_ids(server)
    for method, path, body in (("POST", "", {"name": "x", "path": "hot"}), ("DELETE", "/ads", None), ("GET", "", None)):
        response = admin(server, method, path, key=key, json=body)
        assert response.status_code == status and response.json()["error"]["code"] == "invalid_api_key", response.text
    assert model_ids(server) == before


def test_paths_outside_the_adapter_root_are_refused(server, setup, tmp_path):
    root, dirs = setup[1], setup[3]
    outside = tmp_path / "outside"
    save_adapter(outside, *random_adapter(4, ("q_proj",), 9), CONFIG)  # a valid adapter, but not under root
    link = root / "link-out"
    link.symlink_to(outside, target_is_directory=True)
    before = model_ids(server)
    try:
        for path in (f"../{outside.parent.name}/outside", str(outside), "link-out", "ads/../../x"):
            response = admin(server, "POST", json={"name": "evil", "path": path})
            assert response.status_code == 403, (path, response.text)
            assert response.json()["error"]["code"] == "path_not_allowed"
        for path in (str(dirs["ads"]) + "/..", "missing"):  # inside, but not an adapter directory
            response = admin(server, "POST", json={"name": "evil", "path": path})
            assert response.status_code == 400 and response.json()["error"]["param"] == "path", (path, response.text)
        assert model_ids(server) == before and "evil" not in server[1].generator.adapter_names
    finally:
        link.unlink()


def test_an_adapter_that_does_not_fit_is_a_400_naming_the_tensor(server, setup):
    root = setup[1]
    tree, lora_config = random_adapter(4, ("q_proj", "v_proj"), 7)
    bad = save_adapter(root / "bad", tree, lora_config, CONFIG)
    tensors = load_file(str(bad / NATIVE_WEIGHTS))
    tensors["attn/v_proj/lora_b"] = np.zeros((CONFIG.num_layers, 4, 24), np.float32)  # out is 16 (2 kv heads × 8)
    save_file(tensors, str(bad / NATIVE_WEIGHTS))
    before = model_ids(server)
    response = admin(server, "POST", json={"name": "bad", "path": "bad"})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "attn/v_proj/lora_b" in message and "[2, 4, 24]" in message and "[2, 4, 16]" in message, message
    assert model_ids(server) == before and "bad" not in server[1].generator.adapter_names


def test_name_clashes_bad_names_and_the_base_are_refused(server):
    assert admin(server, "POST", json={"name": "ads", "path": "hot"}).status_code == 409
    assert admin(server, "POST", json={"name": BASE, "path": "hot"}).status_code == 409
    assert admin(server, "POST", json={"name": "a/b", "path": "hot"}).status_code == 400
    assert admin(server, "POST", json={"name": "x", "path": 3}).status_code == 400
    response = admin(server, "DELETE", "/" + BASE)
    assert response.status_code == 400 and response.json()["error"]["code"] == "cannot_delete_base"
    assert admin(server, "DELETE", "/never-loaded").status_code == 404
    assert model_ids(server) == [BASE, *STARTUP]


def test_hot_loading_is_off_without_an_admin_key(setup):
    params, root, trees, _, _ = setup
    generator = Generator(CONFIG, params, ByteTokenizer(), adapters={"ads": trees["ads"]}, max_batch_size=BATCH,
                          max_length=MAX_CONTEXT, chunk_size=CHUNK)
    app = S.create_app(S.BatchingEngine(generator, max_batch_size=BATCH), model_name=BASE, adapter_root=root)
    with S.ServerThread(app) as thread:
        response = httpx.post(thread.base_url + "/adapters", json={"name": "x", "path": "hot"},
                              headers={"Authorization": "Bearer anything"})
        assert response.status_code == 403 and response.json()["error"]["code"] == "hot_loading_disabled"
        assert "x" not in generator.adapter_names


# ---------------------------------------------------------------------------------------- hot loading


def test_hot_load_compiles_nothing_and_delete_hides_the_adapter(server, setup):
    expected = setup[4]
    for model in (BASE, "ads"):  # everything this test runs has been compiled once
        complete(server, model, PROMPTS[0])
    compiled: list[str] = []

    def on_event(event: str, _duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        response = admin(server, "POST", json={"name": "hot", "path": "hot"})
        assert response.status_code == 200, response.text
        assert complete(server, "hot", PROMPTS[1]) == expected["hot"][1].text
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert compiled == [], f"a hot load that fits the stack compiled {compiled}"
    card = response.json()
    assert card["id"] == "hot" and card["rank"] == 4 and card["targets"] == ["attn/o_proj", "mlp/up_proj"]
    assert model_ids(server) == [BASE, *STARTUP, "hot"]
    assert [a["id"] for a in admin(server, "GET").json()["data"]] == [*STARTUP, "hot"]

    assert admin(server, "DELETE", "/hot").json() == {"id": "hot", "object": "model", "deleted": True}
    assert model_ids(server) == [BASE, *STARTUP] and "hot" not in server[1].generator.adapter_names
    with pytest.raises(openai.NotFoundError):
        complete(server, "hot", PROMPTS[1])
    assert complete(server, "ads", PROMPTS[2]) == expected["ads"][2].text  # the others are untouched


def test_32_concurrent_requests_across_a_hot_load_and_a_delete(server, setup):
    """The issue's acceptance: 4 adapters and the base, streaming and not, one load and one delete
    in the middle; the only errors are 404s for the deleted adapter, on requests sent after it went."""
    expected = setup[4]
    accepted = {i: threading.Event() for i in range(32)}  # set once the server answers a stream's headers
    any_accepted = threading.Event()

    def one(job: tuple[int, str]) -> str | Exception:
        index, model = job
        prompt = PROMPTS[index % len(PROMPTS)]
        try:
            if index % 2 and model != "qa":  # every "qa" request streams, so we know when it was accepted
                return complete(server, model, prompt)
            stream = client(server).completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                                       temperature=0, stream=True)
            accepted[index].set()
            any_accepted.set()
            return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        except Exception as error:  # noqa: BLE001 - classified below
            return error
        finally:
            accepted[index].set()

    first = [(i, [BASE, "ads", "titles", "qa"][i % 4]) for i in range(12)]
    second = [(i, [BASE, "ads", "titles", "qa", "hot"][i % 5]) for i in range(12, 32)]
    before_delete, after_delete = first + second[:8], second[8:]
    engine: GatedEngine = server[1]
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        try:
            futures = {job: pool.submit(one, job) for job in first}
            assert any_accepted.wait(60)  # a request reached the engine; it has 8 chunks to decode
            assert engine.hold()  # the engine stopped mid-decode, requests in flight
            loading = pool.submit(admin, server, "POST", json={"name": "hot", "path": "hot"})
            engine.release_after_command()
            assert loading.result(timeout=60).status_code == 200, loading.result().text
            futures.update({job: pool.submit(one, job) for job in second[:8]})
            for index, model in before_delete:
                if model == "qa":  # accepted by the server, not merely queued in the client's thread
                    assert accepted[index].wait(60)
            assert "qa" in engine.hold()  # "qa" requests in flight (decoding or waiting for a row)
            deleting = pool.submit(admin, server, "DELETE", "/qa")
            engine.release_after_command()
            assert deleting.result(timeout=60).status_code == 200
            futures.update({job: pool.submit(one, job) for job in after_delete})
        finally:
            engine.gate.set()  # never leave the engine held, even when an assertion failed
        results = {job: future.result(timeout=120) for job, future in futures.items()}

    for (index, model), outcome in results.items():
        if (index, model) in after_delete and model == "qa":  # sent after the delete: the expected 404s
            assert isinstance(outcome, openai.NotFoundError) and outcome.code == "model_not_found", repr(outcome)
            continue
        assert not isinstance(outcome, Exception), (index, model, repr(outcome))
        assert outcome == expected[model][index % len(PROMPTS)].text, (index, model)
    assert sum(model == "qa" for _, model in after_delete) > 0 and sum(m == "qa" for _, m in before_delete) > 0
    assert model_ids(server) == [BASE, "ads", "titles", "hot"]
    assert complete(server, "titles", PROMPTS[3]) == expected["titles"][3].text  # the server answers afterwards


def test_an_adapter_beyond_the_stack_grows_it_and_is_served(server, setup):
    """Rank 16 does not fit the rank-8 stack: the load grows it (the next step recompiles, once) and
    every model still answers with its own tokens."""
    expected = setup[4]
    response = admin(server, "POST", json={"name": "big", "path": "big"})
    assert response.status_code == 200 and response.json()["rank"] == 16, response.text
    jobs = [("big", 0), ("ads", 1), (BASE, 2), ("big", 3)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda job: complete(server, job[0], PROMPTS[job[1]]), jobs))
    assert texts == [expected[model][i].text for model, i in jobs]
    assert admin(server, "DELETE", "/big").status_code == 200


def test_a_removal_waits_for_the_requests_accepted_before_it(setup):
    """A request accepted while its adapter existed, still waiting for a row when the adapter is
    deleted, runs with it; the removal happens between steps after it got its row."""
    params, _, trees, _, expected = setup
    generator = Generator(CONFIG, params, ByteTokenizer(), adapters={n: trees[n] for n in STARTUP}, max_adapters=6,
                          max_adapter_rank=8, max_batch_size=BATCH, max_length=MAX_CONTEXT, chunk_size=CHUNK)
    engine = S.BatchingEngine(generator, max_batch_size=BATCH, chunk_size=CHUNK)
    sampler = sampling.TopP(p=1.0, temperature=0.0)
    request = Request(generator.encode_prompt(PROMPTS[2]), MAX_TOKENS, sampler, adapter="qa")
    engine.submit([request])  # waiting: the engine thread has not started
    removed = engine.remove_adapter("qa")
    assert not removed.done() and "qa" in generator.adapter_names  # blocked by the waiting request
    engine.start()
    try:
        removed.result(timeout=60)
        deadline = time.monotonic() + 60
        while not request.done and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(GenerationError):  # twice: the name is gone
            engine.remove_adapter("qa").result(timeout=5)
    finally:
        engine.stop()
    assert request.completion().text == expected["qa"][2].text
    assert "qa" not in generator.adapter_names
    with pytest.raises(GenerationError, match="unknown adapter"):
        engine.check(Request(generator.encode_prompt("x"), 2, sampler, adapter="qa"))


# ---------------------------------------------------------------------------------------- pieces


def test_resolve_inside_follows_symlinks(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "out").symlink_to(tmp_path / "elsewhere")
    (root / "in").symlink_to(root / "a")
    assert resolve_inside(root, "a") == (root / "a").resolve()
    assert resolve_inside(root, "in") == (root / "a").resolve()  # a link that stays inside is fine
    for path in ("out", "../elsewhere", str(tmp_path / "elsewhere"), "a/../../elsewhere"):
        with pytest.raises(ApiError) as caught:
            resolve_inside(root, path)
        assert caught.value.status == 403, path
    with pytest.raises(ApiError) as caught:
        resolve_inside(None, "a")
    assert caught.value.status == 403


def test_admin_key_check():
    check_admin_key(f"Bearer {ADMIN_KEY}", ADMIN_KEY)
    for header, status in (("", 401), ("Bearer no", 401), (f"Basic {ADMIN_KEY}", 401)):
        with pytest.raises(ApiError) as caught:
            check_admin_key(header, ADMIN_KEY)
        assert caught.value.status == status
    with pytest.raises(ApiError) as caught:
        check_admin_key(f"Bearer {ADMIN_KEY}", None)
    assert caught.value.status == 403


def test_registry_hides_a_reserved_name_until_committed():
    registry = ModelRegistry("base")
    registry.reserve("x")
    assert registry.ids() == ["base"]
    with pytest.raises(ApiError) as caught:
        registry.reserve("x")
    assert caught.value.status == 409
    with pytest.raises(ApiError) as caught:
        registry.adapter_for("x")
    assert caught.value.status == 404


def test_cli_parses_named_adapters_and_refuses_mixing():
    args = S.build_parser().parse_args(["--adapter", "a=runs/a", "--adapter", "b=runs/b", "--admin-key", "k",
                                        "--adapter-root", "runs", "--max-adapters", "8", "--max-lora-rank", "16"])
    assert parse_adapter_args(args.adapter) == (None, {"a": "runs/a", "b": "runs/b"})
    assert (args.admin_key, args.adapter_root, args.max_adapters, args.max_lora_rank) == ("k", "runs", 8, 16)
    assert parse_adapter_args(["runs/ads"]) == ("runs/ads", {})  # today's merged single adapter
    for values in (["runs/a", "b=runs/b"], ["runs/a", "runs/b"], ["a=x", "a=y"]):
        with pytest.raises(ValueError):
            parse_adapter_args(values)


def test_cli_refuses_an_admin_key_equal_to_the_api_key(capsys):
    assert S.main(["--model", "tiny", "--api-key", "k", "--admin-key", "k", "--no-warmup"]) == 2
    assert "--admin-key" in capsys.readouterr().err


def test_cli_prints_one_line_for_a_named_adapter_that_does_not_fit(tmp_path, capsys):
    directory = export_peft(tmp_path / "narrow", *random_adapter(4, ("q_proj",), 5), CONFIG)  # hidden 32, not 64
    status = S.main(["--model", "tiny", "--adapter", f"narrow={directory}", "--no-warmup"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: ") and str(directory) in err, err
    assert "q_proj" in err and "[4, 32]" in err and "[4, 64]" in err, err  # the tensor and both shapes
