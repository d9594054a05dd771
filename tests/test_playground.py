"""The playground page (llama_e_jax/playground/) and the evaluation report.html, in a real browser.

The browser is Debian's headless Chromium driven by Selenium through Debian's chromedriver (`make test`
installs both when missing; nothing is downloaded at run time). The server is the real one
(`serve.create_app`) on the real default model, SmolLM2-135M-Instruct, with an API key. It serves the
base and one real adapter next to it (random, saved and read back like any adapter directory), so the
model picker and the compare switch between two different models; each compared reply must be what
the API answers for its model.

Screenshots go to $LLAMA_E_TEST_ARTIFACTS (default: <tmp>/llama_e_jax-test-artifacts/); with
UPDATE_DOCS_SCREENSHOTS=1 the README's two images in docs/img/ are rewritten from them.

The check that model text is rendered as text stubs the reply: it replaces `window.fetch` in the page
(execute_script) with one that streams a reply containing `<script>` and an `<img onerror>`, because
no prompt makes a 135M model echo markup reliably.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from llama_e_jax import playground, report_html
from llama_e_jax.data.labels import LABEL_SETS
from llama_e_jax.data.prompt import build_prompt
from llama_e_jax.data.schema import TASKS, read_jsonl
from llama_e_jax.eval_report import write_reports
from llama_e_jax.generate.generator import Generator
from llama_e_jax.io.adapters import load_any_adapter, save_adapter
from llama_e_jax.io.load import load_model
from llama_e_jax.model.lora import LORA_B, LoraConfig, flatten_adapter, init_adapter, unflatten_adapter
from llama_e_jax.serve import BatchingEngine, ServerThread, create_app

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (the test extra)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

API_KEY = "playground-key"
MODEL, ALIAS = "llama-e", "ads-random"  # the base and an adapter served next to it
MAX_CONTEXT = 512  # the ads prompt is ~130 tokens; replies here are at most a few hundred
REPLY_TIMEOUT_S = 300  # the first request compiles the model's prefill and decode on a shared 2-core CPU
REPO = Path(__file__).resolve().parent.parent
XSS_REPLY = '<script>window.__pwned = 1</script><img src="x" onerror="window.__pwned = 2"> & done'


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory):
    """(ServerThread, BatchingEngine): the real server on the default model and the adapter ALIAS, behind API_KEY."""
    loaded = load_model(str(smollm2_gguf))
    directory = save_adapter(tmp_path_factory.mktemp("adapter"), *random_adapter(loaded.config), loaded.config)
    generator = Generator(loaded.config, loaded.params, loaded.tokenizer, max_batch_size=4, max_length=MAX_CONTEXT,
                          chunk_size=4, adapters={ALIAS: load_any_adapter(directory, loaded.config)})
    engine = BatchingEngine(generator, max_batch_size=4, chunk_size=4)
    app = create_app(engine, model_name=MODEL, api_key=API_KEY)
    with ServerThread(app) as thread:
        yield thread, engine


def random_adapter(config) -> tuple[dict, LoraConfig]:
    """r=8 on q and v with a random B (a fresh adapter has B = 0 and changes nothing); B's scale makes
    the change to the attention outputs comparable to the base's, so greedy replies differ."""
    lora_config = LoraConfig(rank=8, alpha=16.0, dropout=0.0, targets=("q_proj", "v_proj"))
    flat = flatten_adapter(init_adapter(config, lora_config, jax.random.PRNGKey(3)))
    rng = np.random.default_rng(3)
    for leaves in flat.values():
        leaves[LORA_B] = (0.05 * rng.standard_normal(np.shape(leaves[LORA_B]))).astype(np.float32)
    return unflatten_adapter(flat), lora_config


@pytest.fixture(scope="module")
def page_only():
    """The page's URL on a server with the playground and no model (for checks of the page's own code)."""
    app = FastAPI()
    playground.mount(app)
    with ServerThread(app) as thread:
        yield f"http://{thread.host}:{thread.port}/"


@pytest.fixture(scope="module")
def artifacts() -> Path:
    path = Path(os.environ.get("LLAMA_E_TEST_ARTIFACTS", Path(tempfile.gettempdir()) / "llama_e_jax-test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    print(f"browser screenshots in {path}")
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium (Debian's), with its console log and a download folder (`browser.downloads`)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them as root: "
                    "apt-get install -y chromium chromium-driver)")
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def page_url(server) -> str:
    return f"http://{server[0].host}:{server[0].port}/"


def wait(driver, condition, timeout: float = 20, message: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d), message)


def element(driver, element_id: str):
    return driver.find_element(By.ID, element_id)


def fill(driver, element_id: str, text: str) -> None:
    field = element(driver, element_id)
    field.clear()
    field.send_keys(text)


def panes(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#outputs .pane")


def run_and_wait(driver, states: tuple[str, ...] = ("done",), count: int = 1) -> list:
    element(driver, "run").click()
    wait(driver, lambda d: len(panes(d)) == count and all(p.get_attribute("data-state") for p in panes(d)),
         REPLY_TIMEOUT_S, "the replies did not finish")
    found = [p.get_attribute("data-state") for p in panes(driver)]
    errors = [p.find_element(By.CLASS_NAME, "error").text for p in panes(driver)]
    assert all(state in states for state in found), (found, errors)
    return panes(driver)


def history(driver) -> list[dict]:
    return driver.execute_script("return JSON.parse(localStorage.getItem('llama-e-playground.history') || '[]')")


def screenshot(driver, artifacts: Path, name: str, docs_name: str | None = None) -> None:
    path = artifacts / name
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    if docs_name and os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1":
        from PIL import Image  # matplotlib's dependency; only for the README images

        image = Image.open(path).convert("RGB").quantize(colors=64)  # text and flat colours: small PNG
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        image.save(REPO / "docs" / "img" / docs_name, optimize=True)


def open_with_key(driver, server) -> None:
    """Loads the page; the server needs a key, so the page asks for it before listing models."""
    driver.get(page_url(server))
    driver.execute_script("localStorage.clear(); sessionStorage.clear();")
    driver.get(page_url(server))
    wait(driver, lambda d: element(d, "key-panel").is_displayed(), message="the page did not ask for the key")
    assert Select(element(driver, "model")).options == []
    fill(driver, "key-input", API_KEY)
    element(driver, "key-save").click()
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "yes")
    assert not element(driver, "key-panel").is_displayed()


def severe_console_messages(driver, allowed: tuple[str, ...] = ()) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and not any(a in entry["message"] for a in allowed)]


# ---------------------------------------------------------------------------------------- the page


def test_page_and_assets_carry_a_strict_content_security_policy():
    app = FastAPI()
    playground.mount(app)
    client = TestClient(app)
    for path, kind in (("/", "text/html"), ("/playground/playground.js", "text/javascript"),
                       ("/playground/playground.css", "text/css"), ("/playground/meta.json", "application/json")):
        response = client.get(path)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind), path
        assert response.headers["content-security-policy"] == playground.CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self';" in playground.CONTENT_SECURITY_POLICY and "unsafe" not in playground.CONTENT_SECURITY_POLICY
    page = client.get("/").text
    assert "<script>" not in page and not re.search(r"\son[a-z]+=", page)  # no inline script or handler
    assert client.get("/playground/..%2Fpyproject.toml").status_code == 404
    assert client.get("/playground/meta.json").json()["label_sets"] == {t: list(v) for t, v in LABEL_SETS.items()}


def test_playground_in_a_browser(browser, server, artifacts, tmp_path):
    driver, (thread, engine) = browser, server
    open_with_key(driver, server)
    assert [o.text for o in Select(element(driver, "model")).options] == [MODEL, ALIAS]
    assert driver.execute_script("return sessionStorage.getItem('llama-e-playground.api-key')") == API_KEY
    assert API_KEY not in json.dumps(driver.execute_script("return Object.assign({}, localStorage)"))

    # The ads-generation form: the page builds the instruction and input and shows the exact prompt.
    Select(element(driver, "task")).select_by_value("ads_generation")
    for name, value in (("product", "Lumora Barrier Repair Serum, 30 ml, fragrance-free"), ("brand", "Lumora"),
                        ("price", "$24"), ("promotion", "free cleanser on orders over $35"),
                        ("profile", "25-40, dry and sensitive skin"), ("channel", "Instagram"),
                        ("length", "Keep it under 40 words")):
        fill(driver, f"field-ads_generation-{name}", value)
    fill(driver, "max-tokens", "24")
    fill(driver, "seed", "7")
    (pane,) = run_and_wait(driver)
    reply = pane.find_element(By.CLASS_NAME, "reply").text
    stats = pane.find_element(By.CLASS_NAME, "stats").text
    assert reply.strip() and "first token after" in stats and "tokens/s" in stats, stats
    (entry,) = history(driver)
    assert entry["instruction"] == "Write an ad for Instagram for the product below. Keep it under 40 words."
    assert entry["input"].splitlines() == ["Product: Lumora Barrier Repair Serum, 30 ml, fragrance-free",
                                           "Brand: Lumora", "Price: $24", "Promotion: free cleanser on orders over $35",
                                           "Customer profile: 25-40, dry and sensitive skin"]
    assert entry["aspects"] == ["seller", "customer", "platform"]
    prompt = build_prompt(entry["instruction"], entry["input"])
    assert element(driver, "prompt").get_attribute("textContent") == prompt
    # The page sent exactly that prompt: the API answers it with the same greedy text.
    direct = httpx.post(thread.base_url + "/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": ["\n###"]},
                        timeout=REPLY_TIMEOUT_S).json()
    assert entry["output"] == direct["choices"][0]["text"] and entry["tokens"] == direct["usage"]["completion_tokens"]
    screenshot(driver, artifacts, "playground-ads.png")

    # Stop cancels the stream: the text stops growing and the server frees the row.
    fill(driver, "max-tokens", str(MAX_CONTEXT - 200))  # the prompt is ~130 tokens; prompt + reply must fit
    element(driver, "run").click()
    wait(driver, lambda d: panes(d) and (d.find_element(By.CSS_SELECTOR, "#outputs .reply").text.strip()
                                         or panes(d)[0].get_attribute("data-state")),
         REPLY_TIMEOUT_S, "no streamed text appeared")
    assert panes(driver)[0].get_attribute("data-state") is None, panes(driver)[0].text  # still streaming
    element(driver, "stop-button").click()
    wait(driver, lambda d: panes(d)[0].get_attribute("data-state") == "stopped", message="stop did not cancel")
    stopped_text = panes(driver)[0].find_element(By.CLASS_NAME, "reply").get_attribute("textContent")
    assert panes(driver)[0].find_element(By.CLASS_NAME, "error").text == "Stopped."
    wait(driver, lambda d: engine.idle, 30, "the server kept decoding the cancelled request")
    time.sleep(1.0)
    assert panes(driver)[0].find_element(By.CLASS_NAME, "reply").get_attribute("textContent") == stopped_text
    assert element(driver, "run").is_enabled() and not element(driver, "stop-button").is_enabled()
    stopped = history(driver)[-1]
    assert stopped["finish"] == "stopped" and stopped["output"] == stopped_text  # the partial reply is kept

    # The server's errors in plain words (temperature is limited to [0, 2]).
    fill(driver, "temperature", "5")
    (pane,) = run_and_wait(driver, states=("error",))
    message = pane.find_element(By.CLASS_NAME, "error").text
    assert message.startswith("The server refused the request: ") and "temperature" in message, message
    fill(driver, "temperature", "0")

    # Switch models and compare the adapter with the base: each reply is what the API answers for its
    # model (greedy, the same body), and the adapter changes the reply.
    Select(element(driver, "model")).select_by_value(ALIAS)
    element(driver, "compare").click()
    Select(element(driver, "model-b")).select_by_value(MODEL)
    fill(driver, "max-tokens", "16")
    left, right = run_and_wait(driver, count=2)
    assert [left.get_attribute("data-model"), right.get_attribute("data-model")] == [ALIAS, MODEL]
    compared = {item["model"]: item for item in history(driver)[-2:]}
    for model, item in compared.items():
        body = {**item["settings"], "model": model, "prompt": item["prompt"], "stream": False}
        body.pop("stream_options", None)
        direct = httpx.post(thread.base_url + "/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                            json=body, timeout=REPLY_TIMEOUT_S).json()
        assert item["output"] == direct["choices"][0]["text"], model
    assert sorted(compared) == sorted([ALIAS, MODEL]) and compared[ALIAS]["output"].strip()
    assert compared[ALIAS]["output"] != compared[MODEL]["output"]
    screenshot(driver, artifacts, "playground-compare.png", docs_name="playground.png")

    # Export: one record per finished reply (3), the stopped one left out; valid against the schema.
    element(driver, "export").click()
    wait(driver, lambda d: list(d.downloads.glob("*.jsonl")), message="no JSONL was downloaded")
    (downloaded,) = driver.downloads.glob("*.jsonl")
    wait(driver, lambda d: downloaded.read_text(encoding="utf-8").endswith("\n"))
    assert downloaded.read_text(encoding="utf-8") == element(driver, "export-preview").get_attribute("value")
    records = read_jsonl(downloaded)
    assert len(records) == 3 and {r.task for r in records} == {"ads_generation"}
    assert sorted(r.source for r in records) == sorted(f"playground:{m}" for m in (MODEL, ALIAS, MODEL))
    assert records[0].output == entry["output"].strip() and records[0].input == entry["input"]
    assert "3 record(s) exported; 1 left out" in element(driver, "export-note").text
    assert severe_console_messages(driver, allowed=("status of 401", "status of 400")) == []


def test_model_text_is_rendered_as_text(browser, page_only, artifacts):
    driver = browser
    driver.get(page_only)
    driver.execute_script("localStorage.clear()")
    driver.get(page_only)
    wait(driver, lambda d: d.execute_script("return document.getElementById('task').options.length > 0"))
    driver.execute_script("""
        const reply = arguments[0];
        const original = window.fetch;
        window.fetch = (url, options) => {
          if (!String(url).startsWith("/v1/completions")) return original(url, options);
          const chunk = {id: "cmpl-stub", object: "text_completion", choices: [{index: 0, text: reply, finish_reason: "stop"}]};
          const body = `data: ${JSON.stringify(chunk)}\\n\\ndata: [DONE]\\n\\n`;
          return Promise.resolve(new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}}));
        };""", XSS_REPLY)
    element(driver, "mode-instruction").click()
    fill(driver, "instruction-text", "Repeat the markup.")
    (pane,) = run_and_wait(driver)
    assert pane.find_element(By.CLASS_NAME, "reply").get_attribute("textContent") == XSS_REPLY
    assert driver.find_element(By.CSS_SELECTOR, "#history pre").get_attribute("textContent") == XSS_REPLY
    assert driver.find_elements(By.CSS_SELECTOR, "#outputs *:not(article):not(h3):not(pre):not(p)") == []
    assert driver.find_elements(By.CSS_SELECTOR, "#history img, #history script, #outputs img, #outputs script") == []
    time.sleep(0.3)  # an injected <img onerror> would have fired by now
    assert driver.execute_script("return window.__pwned === undefined")
    screenshot(driver, artifacts, "playground-markup-as-text.png")


STUB_FETCH = """
    // Records each /v1 POST and answers it with arguments[0] as one streamed chunk (or an error status).
    window.sent = [];
    window.stubStatus = 200;
    window.stubReply = arguments[0];
    window.fetch = async (url, options) => {
      if (!String(url).startsWith("/v1/") || !options || options.method !== "POST") {
        return new Response(JSON.stringify({object: "list", data: [{id: "stub-model"}]}), {status: 200});
      }
      window.sent.push({url: String(url), body: JSON.parse(options.body)});
      if (window.stubStatus !== 200) {
        const error = {message: "The model `x` does not exist", type: "invalid_request_error", param: "model", code: "not_found"};
        return new Response(JSON.stringify({error}), {status: window.stubStatus});
      }
      const chat = String(url).includes("chat");
      const reply = window.stubReply;
      const choice = chat ? {index: 0, delta: {content: reply}, finish_reason: "stop"} : {index: 0, text: reply, finish_reason: "stop"};
      const usage = {prompt_tokens: 5, completion_tokens: 3, total_tokens: 8};
      const body = `data: ${JSON.stringify({choices: [choice]})}\n\ndata: ${JSON.stringify({choices: [], usage})}\n\ndata: [DONE]\n\n`;
      return new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}});
    };"""


def test_request_bodies_follow_the_api(browser, page_only):
    """What the page sends for each mode and constraint (fetch stubbed: no model needed)."""
    driver = browser
    driver.get(page_only)
    driver.execute_script("localStorage.clear()")
    driver.get(page_only)
    wait(driver, lambda d: d.execute_script("return document.getElementById('task').options.length > 0"))
    driver.execute_script(STUB_FETCH, "Electronics")
    Select(element(driver, "task")).select_by_value("product_classification")
    fill(driver, "field-product_classification-title", "OtterBox case for iPhone 15")
    fill(driver, "seed", "3")
    run_and_wait(driver)
    (sent,) = driver.execute_script("return window.sent")
    entry = history(driver)[-1]
    assert entry["options"] == ["Apparel & Accessories", "Electronics", "Hardware", "Luggage & Bags", "Toys & Games"]
    assert entry["input"].endswith("\nCandidate categories: " + " | ".join(entry["options"]))
    assert sent["url"] == "/v1/completions" and sent["body"]["prompt"] == build_prompt(entry["instruction"], entry["input"])
    assert {k: sent["body"][k] for k in ("temperature", "top_p", "max_tokens", "seed", "stop", "stream")} == {
        "temperature": 0, "top_p": 1, "max_tokens": 128, "seed": 3, "stop": ["\n###"], "stream": True}
    assert sent["body"]["stream_options"] == {"include_usage": True}
    assert "3 tokens" in panes(driver)[0].find_element(By.CLASS_NAME, "stats").text

    Select(element(driver, "constraint")).select_by_value("json_schema")
    run_and_wait(driver)
    body = driver.execute_script("return window.sent")[-1]["body"]
    assert driver.execute_script("return window.sent")[-1]["url"] == "/v1/chat/completions"
    assert body["template"] == "instruction" and body["input"] == entry["input"]
    assert body["messages"] == [{"role": "user", "content": entry["instruction"]}]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["required"] == ["headline", "body"]

    Select(element(driver, "constraint")).select_by_value("choice")
    fill(driver, "choices", "Hardware\nToys & Games")
    driver.execute_script("window.stubReply = 'a camera'")  # a server that ignores guided_choice
    (pane,) = run_and_wait(driver)
    assert driver.execute_script("return window.sent")[-1]["body"]["guided_choice"] == ["Hardware", "Toys & Games"]
    assert "not one of the choices" in pane.find_element(By.CLASS_NAME, "error").text
    Select(element(driver, "constraint")).select_by_value("none")
    driver.execute_script("window.stubReply = 'Electronics'")

    element(driver, "mode-chat").click()
    for message in ("Hello", "And then?"):
        fill(driver, "chat-message", message)
        run_and_wait(driver)
    body = driver.execute_script("return window.sent")[-1]["body"]
    assert body["template"] == "chat" and body["messages"] == [
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Electronics"},
        {"role": "user", "content": "And then?"}]
    assert [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#chat-log li")] == [
        "Hello", "Electronics", "And then?", "Electronics"]

    driver.execute_script("window.stubStatus = 404")
    fill(driver, "chat-message", "Once more")
    (pane,) = run_and_wait(driver, states=("error",))
    assert pane.find_element(By.CLASS_NAME, "error").text == "Not found on the server: The model `x` does not exist"
    # Export: label replies become records only as a candidate label; chat turns use the chosen task.
    element(driver, "export").click()
    lines = element(driver, "export-preview").get_attribute("value").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["task"] for r in records] == ["product_classification"] * 2 + ["ads_generation"] * 2
    assert records[0]["output"] == "Electronics" and records[0]["options"] == entry["options"]
    assert "the reply is not one of the candidate labels" in element(driver, "export-note").text  # the choice run


@pytest.mark.parametrize("instruction, input_text", [
    ("Write an ad.", ""),
    ("Write an ad.", " \n\t"),  # whitespace only: the no-input template
    ("Classify.", "\x1c\x85"),  # blank to Python's str.strip, not to JavaScript's trim
    ("Classify.", "\ufeff"),  # blank to JavaScript's trim, not to Python's str.strip
    ("Use {input} and {instruction}", "a {instruction} b $& $1"),  # no second expansion, no regex specials
    ("Ünïcode ✓", "line 1\nline 2\n"),
])
def test_page_prompt_matches_build_prompt(browser, page_only, instruction, input_text):
    driver = browser
    if not driver.current_url.startswith(page_only):
        driver.get(page_only)
    wait(driver, lambda d: d.execute_script("return document.getElementById('task').options.length > 0"))
    shown = driver.execute_script("return window.playground.buildPrompt(arguments[0], arguments[1])",
                                  instruction, input_text)
    assert shown == build_prompt(instruction, input_text)


# ---------------------------------------------------------------------------------------- report.html


def synthetic_report() -> tuple[dict, list[dict]]:
    """Two systems, two views, every task; 45 records per task so that worst and best are both shown."""
    systems = ("base", "ads-adapter")
    results: dict = {}
    rows: list[dict] = []
    for view in ("standard", "zero_shot"):
        results[view] = {}
        for s, system in enumerate(systems):
            results[view][system] = {}
            for t, task in enumerate(TASKS):
                labels = task in LABEL_SETS
                score = 20.0 + 10 * s + 5 * t
                results[view][system][task] = (
                    {"num_generated": 45, "accuracy": score, "macro_f1": score - 5, "out_of_set_rate": 10.0 - s,
                     "perplexity": float("nan"), "mean_response_words": 2.0, "mean_reference_words": 2.0}
                    if labels else {"num_generated": 45, "bleu4": score / 2, "rouge_l_f": score, "perplexity": 4.5,
                                    "mean_response_words": 30.0, "mean_reference_words": 28.0})
                for i in range(45):
                    row = {"view": view, "system": system, "id": f"{task}-{i:02d}", "task": task,
                           "instruction": f"Do {task} <b>now</b>", "input": f"item {i}",
                           "reference": f"reference {i}", "reply": f"reply {i} <script>window.__pwned=1</script>"}
                    if labels:
                        row.update(correct=(i + s) % 3 == 0, matched_label=None)
                    else:
                        row["rouge_l_f"] = float((i * 37 + s) % 100)
                    rows.append(row)
    meta = {"model": "SmolLM2-135M-Instruct <test>", "data": "synthetic", "num_records": 225,
            "generation": {"temperature": 0.0, "max_new_tokens": 64}}
    return {"meta": meta, "results": results}, rows


def test_report_ranks_examples_and_escapes_everything():
    report, rows = synthetic_report()
    page = report_html.render(report, rows)
    assert "<script>" not in page and "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page
    assert "SmolLM2-135M-Instruct &lt;test&gt;" in page
    section = page.split("Examples: ads_generation (standard view)")[1].split("<h3>")[0]
    worst, best = section.split("<h4>20 best</h4>")
    ads = [r for r in rows if r["view"] == "standard" and r["task"] == "ads_generation" and r["system"] == "ads-adapter"]
    ranked = [r["id"] for r in sorted(ads, key=lambda r: (r["rouge_l_f"], r["id"]))]  # by the last system
    shown = lambda html: re.findall(r'<td><span class="record-id">([^<]+)</span>', html)  # noqa: E731
    assert shown(worst) == ranked[:20] and shown(best) == ranked[-20:][::-1]


def test_report_html_opens_in_the_browser_with_every_chart(browser, artifacts, tmp_path):
    driver = browser
    report, rows = synthetic_report()
    paths = write_reports(tmp_path / "eval", report, rows)
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(paths["report.html"].as_uri())
    for view in report["results"]:
        for task in TASKS:
            charts = driver.find_elements(By.CSS_SELECTOR, f'svg.chart[data-task="{task}"]')
            assert len(charts) == len(report["results"]), task  # one per view
            assert all(c.is_displayed() and c.size["width"] > 100 for c in charts)
            assert len(charts[0].find_elements(By.TAG_NAME, "rect")) >= 2 * 2 + 2  # 2 systems x >= 2 metrics + legend
            tables = driver.find_elements(By.CSS_SELECTOR, f'table.examples[data-task="{task}"]')
            assert len(tables) == 2 * len(report["results"])  # worst and best, per view
            assert len(tables[0].find_elements(By.TAG_NAME, "tr")) == 1 + report_html.EXAMPLES_EACH_WAY
    assert driver.find_elements(By.TAG_NAME, "script") == []
    assert driver.execute_script("return window.__pwned === undefined")
    assert "Metric definitions" in driver.find_element(By.TAG_NAME, "body").text
    screenshot(driver, artifacts, "report.png", docs_name="report.png")
    assert severe_console_messages(driver) == []
