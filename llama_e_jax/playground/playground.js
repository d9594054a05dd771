// The LLaMA-E playground: forms for the five e-commerce tasks, free-form and chat modes, streaming replies,
// side-by-side compare, and a history exportable as training/evaluation records.
//
// Rules this file keeps (see llama_e_jax/playground/__init__.py for why):
// * it talks to the server only through /v1/* (plus the static /playground/meta.json);
// * model text goes into the page with textContent, never innerHTML;
// * the API key lives in sessionStorage only; the history lives in localStorage.
"use strict";

const KEY_STORAGE = "llama-e-playground.api-key";
const HISTORY_STORAGE = "llama-e-playground.history";
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------------------------------- task forms
// Each field: [name, label, aspect, placeholder, where]. `where` is "input" (a "Label: value" line of the
// record's input, the default) or "instruction" (the field only shapes the instruction, e.g. a length rule).
// The aspects of a record are those whose fields were filled in: whom the answer serves (data/schema.py).
const rule = (text) => (text ? ` ${text.replace(/[.\s]*$/, "")}.` : "");
const TASK_FORMS = {
  ads_generation: {
    fields: [
      ["product", "Product", "seller", "Lumora Barrier Repair Serum, 30 ml, fragrance-free"],
      ["brand", "Brand", "seller", "Lumora"],
      ["price", "Price", "seller", "$24"],
      ["promotion", "Promotion", "seller", "free travel-size cleanser on orders over $35"],
      ["query", "Customer query", "customer", "serum for sensitive skin"],
      ["history", "Customer history", "customer", "bought a fragrance-free moisturiser last month"],
      ["profile", "Customer profile", "customer", "25-40, dry and sensitive skin"],
      ["channel", "Channel", "platform", "Instagram feed post", "instruction"],
      ["length", "Length rule", "platform", "Keep it under 60 words", "instruction"],
    ],
    instruction: (f) => `Write ${f.channel ? `an ad for ${f.channel}` : "an ad"} for the product below.${rule(f.length)}`,
  },
  title_rewriting: {
    fields: [
      ["title", "Original title", "seller", "NESCO PIC-14, Electric Portable Induction Cooktop, Black, 1500 watts"],
      ["brand", "Brand", "seller", "NESCO"],
      ["query", "Customer query", "customer", "1500w portable induction cooktop"],
      ["channel", "Marketplace", "platform", "Amazon", "instruction"],
      ["length", "Title rules", "platform", "Brand + Model + Product type + Key features; under 200 characters",
       "instruction"],
    ],
    instruction: (f) => `Rewrite the product title${f.channel ? ` for ${f.channel}` : ""} so that shoppers searching `
      + `for it find it, keeping every fact accurate.${rule(f.length)}`,
  },
  product_classification: {
    fields: [
      ["title", "Title", "seller", "OtterBox Commuter Series Case for iPhone 15 - Black"],
      ["brand", "Brand", "seller", "OtterBox"],
      ["attributes", "Attributes", "seller", "two-layer polycarbonate shell; port covers"],
      ["price", "Price", "seller", "$39.95"],
      ["query", "Customer query", "customer", "iphone 15 case"],
    ],
    candidates: {label: "Candidate categories", aspect: "platform", separator: " | ",
                 preset: ["Apparel & Accessories", "Electronics", "Hardware", "Luggage & Bags", "Toys & Games"]},
    instruction: () => "Assign this listing to one product category from the candidates. Reply with the category name only.",
  },
  intent_speculation: {
    fields: [
      ["order", "Order", "seller", "Sterling silver turtle stud earrings, gift-wrapped"],
      ["history", "Customer history", "customer", "no jewelry bought in five years"],
      ["profile", "Customer profile", "customer", "man, 41"],
      ["context", "Platform context", "platform", "delivered three days before a saved anniversary date"],
    ],
    candidates: {label: "Intents", aspect: null, separator: "; ",
                 preset: ["buying a gift", "completing a set with a complementary item",
                          "replacing a worn-out or broken item", "preparing for an event or trip",
                          "researching before buying"]},
    instruction: () => "Infer why this customer is making the purchase. Answer with exactly one of the listed intents.",
  },
  general_qa: {
    fields: [
      ["product", "Product", "seller", "Bosch 1250DEVS random orbit sander, 6.5 A"],
      ["listing", "Listing details", "seller", "dust port accepts Bosch hoses; VAC002 adapter for 1-1/4 in hoses"],
      ["question", "Question", "customer", "Does a Festool vacuum hose fit this dust port?"],
      ["reviews", "Reviews", "customer", "\"needs an adapter to fit my Festool hose\""],
      ["channel", "Channel", "platform", "product page Q&A", "instruction"],
      ["length", "Length rule", "platform", "Answer in at most three sentences", "instruction"],
    ],
    instruction: (f) => `Answer the customer's question${f.channel ? ` on the ${f.channel}` : ""} using only the `
      + `information provided.${rule(f.length)}`,
  },
};

const state = {meta: null, models: [], mode: "task", controller: null, chat: [], key: sessionStorage.getItem(KEY_STORAGE)};

// ------------------------------------------------------------------------------------------- the prompt
// Python's str.isspace() set, so that "whitespace-only input" means what it means in build_prompt
// (JS's \s differs: it includes U+FEFF and lacks U+001C-U+001F and U+0085).
const PY_BLANK = /^[\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$/;

function buildPrompt(instruction, input) {
  const template = PY_BLANK.test(input) ? state.meta.prompt_without_input : state.meta.prompt_with_input;
  // One pass over the template, as str.format: braces inside the values are not expanded again.
  return template.replace(/\{(instruction|input)\}/g, (_, name) => (name === "instruction" ? instruction : input));
}

function taskRequest() {
  const task = $("task").value;
  const form = TASK_FORMS[task];
  const values = {};
  const aspects = new Set();
  const lines = [];
  for (const [name, label, aspect, , where] of form.fields) {
    const value = $(`field-${task}-${name}`).value.trim();
    values[name] = value;
    if (!value) continue;
    aspects.add(aspect);
    if (where !== "instruction") lines.push(`${label}: ${value}`);
  }
  let options;
  if (form.candidates) {
    options = [...document.querySelectorAll(`#task-fields input[data-candidate="${task}"]:checked`)].map((b) => b.value);
    if (options.length < 2) throw new Error("Pick at least two candidates.");
    lines.push(`${form.candidates.label}: ${options.join(form.candidates.separator)}`);
    if (form.candidates.aspect) aspects.add(form.candidates.aspect);
  }
  if (!lines.length) throw new Error("Fill in at least one field of the form.");
  if (!aspects.size) aspects.add("seller");
  const ordered = state.meta.aspects.filter((a) => aspects.has(a));
  return {task, instruction: form.instruction(values), input: lines.join("\n"), aspects: ordered, options};
}

function instructionRequest() {
  const instruction = $("instruction-text").value.trim();
  if (!instruction) throw new Error("Write an instruction first.");
  return {task: $("export-task").value, instruction, input: $("input-text").value, aspects: chosenAspects()};
}

function chosenAspects() {
  const aspects = state.meta.aspects.filter((a) => $(`aspect-${a}`).checked);
  return aspects.length ? aspects : ["seller"];
}

// ------------------------------------------------------------------------------------------- settings
function unescapeStop(line) {
  return line.replace(/\\(n|t|\\)/g, (_, c) => ({n: "\n", t: "\t", "\\": "\\"})[c]);
}

function number(id, parse) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = parse(raw);
  if (!Number.isFinite(value)) throw new Error(`${$(id).closest("label").firstChild.textContent.trim()}: not a number`);
  return value;
}

function settings() {
  const body = {temperature: number("temperature", parseFloat), top_p: number("top-p", parseFloat),
                max_tokens: number("max-tokens", (v) => parseInt(v, 10)), seed: number("seed", (v) => parseInt(v, 10)),
                stop: $("stop").value.split("\n").filter((l) => l.length).map(unescapeStop)};
  for (const key of Object.keys(body)) if (body[key] === undefined) delete body[key];
  const constraint = $("constraint").value;
  let choices = null;
  if (constraint === "json_schema") {
    let schema;
    try {
      schema = JSON.parse($("schema").value);
    } catch (error) {
      throw new Error(`The JSON schema is not valid JSON: ${error.message}`);
    }
    body.response_format = {type: "json_schema", json_schema: {name: "reply", schema}};
  } else if (constraint === "choice") {
    choices = $("choices").value.split("\n").map((l) => l.trim()).filter((l) => l);
    if (!choices.length) throw new Error("List at least one choice, one per line.");
    body.guided_choice = choices;
  }
  return {body, choices};
}

// One request, before a model is chosen: the endpoint, the body, the prompt shown and the record fields.
function plan() {
  const {body, choices} = settings();
  Object.assign(body, {stream: true, stream_options: {include_usage: true}});
  if (state.mode === "chat") {
    const content = $("chat-message").value.trim();
    if (!content) throw new Error("Write a message first.");
    const messages = [...state.chat, {role: "user", content}];
    return {path: "/v1/chat/completions", body: {...body, messages, template: "chat"}, choices,
            shown: JSON.stringify(messages, null, 2), record: {task: $("export-task").value, instruction: content,
            input: "", aspects: chosenAspects()}, chatMessage: content};
  }
  const record = state.mode === "task" ? taskRequest() : instructionRequest();
  const shown = buildPrompt(record.instruction, record.input);
  if (body.response_format) {  // chat endpoint, server-side Alpaca template (the same build_prompt)
    return {path: "/v1/chat/completions", body: {...body, messages: [{role: "user", content: record.instruction}],
            template: "instruction", input: record.input}, choices, shown, record};
  }
  return {path: "/v1/completions", body: {...body, prompt: shown}, choices, shown, record};
}

// ------------------------------------------------------------------------------------------- the API
class ApiFailure extends Error {
  constructor(status, error) {
    super(plainWords(status, error));
    this.status = status;
  }
}

function plainWords(status, error) {
  const detail = (error && error.message) || "no details given";
  if (error && error.code === "context_length_exceeded") return `The prompt is too long for this model: ${detail}`;
  if (status === 400) return `The server refused the request: ${detail}`;
  if (status === 401) return `The API key is missing or wrong (${detail}).`;
  if (status === 404) return `Not found on the server: ${detail}`;
  if (status === 429) return `The server is busy; try again in a moment (${detail}).`;
  if (status >= 500) return `The server failed while answering: ${detail}. Trying again may help.`;
  return `Unexpected answer from the server (HTTP ${status}): ${detail}`;
}

async function api(path, options = {}) {
  const headers = {"Content-Type": "application/json"};
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  let response;
  try {
    response = await fetch(path, {...options, headers});
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new Error(`Cannot reach the server (${error.message}). Is python -m llama_e_jax.serve still running?`);
  }
  if (response.ok) return response;
  let body = null;
  try {
    body = await response.json();
  } catch (_) { /* not JSON: keep the status alone */ }
  const failure = new ApiFailure(response.status, body && body.error);
  if (response.status === 401) askForKey(failure.message);
  throw failure;
}

// Reads an SSE stream of completion or chat-completion chunks into `pane` and `result` (which keeps the
// text that arrived if the stream is stopped or fails half-way).
async function streamInto(pane, path, body, signal, result) {
  const response = await api(path, {method: "POST", body: JSON.stringify(body), signal});
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") {
          result.ended = performance.now();
          return;
        }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiFailure(500, chunk.error);
        if (chunk.usage) result.usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const piece = choice.text ?? (choice.delta && choice.delta.content) ?? "";
          if (piece) {
            if (result.first === null) result.first = performance.now();
            result.text += piece;
            pane.reply.textContent = result.text;  // text, never HTML
          }
          if (choice.finish_reason) result.finish = choice.finish_reason;
        }
        showStats(pane, result);
      }
    }
  }
  throw new Error("The stream ended before the server said it was done.");
}

function showStats(pane, result) {
  const now = result.ended ?? performance.now();
  const parts = [];
  if (result.first !== null) parts.push(`first token after ${((result.first - result.started) / 1000).toFixed(2)} s`);
  if (result.usage) {
    const tokens = result.usage.completion_tokens;
    parts.push(`${tokens} tokens`, `${(tokens / ((now - result.started) / 1000)).toFixed(1)} tokens/s`);
  } else {
    parts.push(`${result.text.length} characters`, `${((now - result.started) / 1000).toFixed(1)} s`);
  }
  if (result.finish) parts.push(`finished: ${result.finish === "length" ? "max tokens reached" : result.finish}`);
  pane.stats.textContent = parts.join(" · ");
}

// ------------------------------------------------------------------------------------------- running
function makePane(model) {
  const node = $("pane-template").content.firstElementChild.cloneNode(true);
  node.dataset.model = model;
  node.querySelector(".pane-model").textContent = model;
  $("outputs").append(node);
  return {node, reply: node.querySelector(".reply"), stats: node.querySelector(".stats"),
          error: node.querySelector(".error")};
}

async function runOne(request, model, signal) {
  const pane = makePane(model);
  const result = {text: "", finish: null, usage: null, started: performance.now(), first: null, ended: null};
  try {
    await streamInto(pane, request.path, {...request.body, model}, signal, result);
    pane.node.dataset.state = "done";
    if (request.choices && !request.choices.includes(result.text.trim())) {
      showError(pane, "The reply is not one of the choices: this server does not apply guided_choice yet.");
    }
  } catch (error) {
    result.finish = error.name === "AbortError" ? "stopped" : "error";
    pane.node.dataset.state = result.finish;
    showError(pane, result.finish === "stopped" ? "Stopped." : error.message);
    result.ended = performance.now();
  }
  showStats(pane, result);
  return {model, result};
}

function showError(pane, message) {
  pane.error.hidden = false;
  pane.error.textContent = message;
}

async function run() {
  let request;
  try {
    request = plan();
  } catch (error) {
    setStatus(error.message, true);
    return;
  }
  setStatus("");
  $("prompt").textContent = request.shown;
  $("outputs").replaceChildren();
  const models = [$("model").value];
  if ($("compare").checked) models.push($("model-b").value);
  state.controller = new AbortController();
  setRunning(true);
  const runs = await Promise.all(models.map((m) => runOne(request, m, state.controller.signal)));
  setRunning(false);
  for (const {model, result} of runs) {
    if (result.text || result.finish === "stopped") remember(request, model, result);
  }
  if (request.chatMessage && runs[0].result.finish !== "error") {
    state.chat.push({role: "user", content: request.chatMessage}, {role: "assistant", content: runs[0].result.text});
    $("chat-message").value = "";
    renderChat();
  }
}

function setRunning(running) {
  $("run").disabled = running;
  $("stop-button").disabled = !running;
  document.body.dataset.running = running ? "yes" : "no";
}

function setStatus(message, isError = false) {
  $("status").textContent = message;
  $("status").className = isError ? "error" : "";
}

function renderChat() {
  $("chat-log").replaceChildren(...state.chat.map((m) => {
    const item = document.createElement("li");
    item.className = m.role;
    item.textContent = m.content;
    return item;
  }));
}

// ------------------------------------------------------------------------------------------- history
function loadHistory() {
  try {
    return JSON.parse(localStorage.getItem(HISTORY_STORAGE) || "[]");
  } catch (_) {
    return [];
  }
}

function remember(request, model, result) {
  const history = loadHistory();
  const id = `playground-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
  history.push({id, time: new Date().toISOString(), mode: state.mode, model, ...request.record,
                prompt: request.shown, output: result.text, finish: result.finish,
                settings: request.body, tokens: result.usage ? result.usage.completion_tokens : null});
  localStorage.setItem(HISTORY_STORAGE, JSON.stringify(history));
  renderHistory();
}

function renderHistory() {
  const items = loadHistory().reverse().map((entry) => {
    const item = document.createElement("li");
    item.dataset.id = entry.id;
    const head = document.createElement("p");
    head.className = "entry-head";
    head.textContent = `${entry.time.slice(0, 19).replace("T", " ")} · ${entry.model} · ${entry.task} (${entry.mode})`
      + ` · ${entry.finish}`;
    const output = document.createElement("pre");
    output.textContent = entry.output;
    item.append(head, output);
    return item;
  });
  $("history").replaceChildren(...items);
}

// The label a reply names, as evaluation matches it (case, spacing and a trailing full stop aside), or null.
function matchLabel(text, options) {
  const norm = (s) => s.trim().replace(/\s+/g, " ").replace(/\.$/, "").toLowerCase();
  return options.find((o) => norm(o) === norm(text)) ?? null;
}

// History entries as records of data/schema.py; stopped, failed or empty replies (and label replies that
// name no candidate) are not records and are counted instead.
function exportRecords() {
  const records = [];
  const skipped = [];
  for (const entry of loadHistory()) {
    let output = entry.output.trim();
    if (entry.finish === "stopped" || entry.finish === "error" || !output) {
      skipped.push(`${entry.id}: ${entry.finish === "stopped" ? "stopped before the end" : "no reply"}`);
      continue;
    }
    const labels = state.meta.label_sets[entry.task];
    const record = {id: entry.id, task: entry.task, instruction: entry.instruction, input: entry.input,
                    output, aspects: entry.aspects, source: `playground:${entry.model}`};
    if (labels) {
      const options = entry.options || labels;
      output = matchLabel(output, options);
      if (output === null) {
        skipped.push(`${entry.id}: the reply is not one of the candidate labels`);
        continue;
      }
      Object.assign(record, {output, options});
    }
    records.push(record);
  }
  return {records, skipped};
}

function exportHistory() {
  const {records, skipped} = exportRecords();
  const text = records.map((r) => JSON.stringify(r)).join("\n") + (records.length ? "\n" : "");
  $("export-preview").hidden = false;
  $("export-preview").value = text;
  const link = $("export-link");
  if (link.href) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([text], {type: "application/x-ndjson"}));
  link.hidden = false;
  $("export-note").textContent = `${records.length} record(s) exported` + (skipped.length
    ? `; ${skipped.length} left out (${skipped.join("; ")})` : "") + ".";
  if (records.length) link.click();
}

// ------------------------------------------------------------------------------------------- set-up
function askForKey(message) {
  $("key-panel").hidden = false;
  $("key-message").textContent = state.key ? message : "This server needs an API key.";
  $("key-input").focus();
}

async function loadModels() {
  try {
    const response = await api("/v1/models");
    state.models = (await response.json()).data.map((m) => m.id);
  } catch (error) {
    setStatus(error.message, true);
    return;
  }
  $("key-panel").hidden = true;
  $("forget-key").hidden = !state.key;
  for (const [id, preferred] of [["model", 0], ["model-b", 1]]) {
    const select = $(id);
    select.replaceChildren(...state.models.map((name) => new Option(name, name)));
    select.selectedIndex = Math.min(preferred, state.models.length - 1);
  }
  setStatus(`${state.models.length} model(s) served: ${state.models.join(", ")}`);
  document.body.dataset.ready = "yes";
}

function buildTaskForms() {
  const tasks = $("task");
  tasks.replaceChildren(...state.meta.tasks.map((t) => new Option(t.replace(/_/g, " "), t)));
  $("export-task").replaceChildren(...state.meta.tasks.map((t) => new Option(t.replace(/_/g, " "), t)));
  const container = $("task-fields");
  for (const task of state.meta.tasks) {
    const form = TASK_FORMS[task];
    const box = document.createElement("div");
    box.dataset.task = task;
    for (const aspect of state.meta.aspects) {
      const fields = form.fields.filter((f) => f[2] === aspect);
      const withCandidates = form.candidates && (form.candidates.aspect ?? "customer") === aspect;
      if (!fields.length && !withCandidates) continue;
      const set = document.createElement("fieldset");
      const legend = document.createElement("legend");
      legend.textContent = aspect;
      set.append(legend);
      for (const [name, label, , placeholder] of fields) {
        const wrap = document.createElement("label");
        const input = document.createElement("input");
        input.id = `field-${task}-${name}`;
        input.placeholder = placeholder;
        input.addEventListener("input", showPromptPreview);
        wrap.append(label, input);
        set.append(wrap);
      }
      if (withCandidates) set.append(candidateList(task, form.candidates));
      box.append(set);
    }
    container.append(box);
  }
  tasks.addEventListener("change", showTask);
  showTask();
}

function candidateList(task, candidates) {
  const list = document.createElement("div");
  list.className = "candidates";
  const title = document.createElement("span");
  title.textContent = `${candidates.label}:`;
  list.append(title);
  for (const label of state.meta.label_sets[task]) {
    const wrap = document.createElement("label");
    wrap.className = "inline";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = label;
    box.dataset.candidate = task;
    box.checked = candidates.preset.includes(label);
    box.addEventListener("change", showPromptPreview);
    wrap.append(box, label);
    list.append(wrap);
  }
  return list;
}

function showTask() {
  for (const box of $("task-fields").children) box.hidden = box.dataset.task !== $("task").value;
  showPromptPreview();
}

function showPromptPreview() {
  if (state.mode === "chat") return;
  try {
    const record = state.mode === "task" ? taskRequest() : instructionRequest();
    $("prompt").textContent = buildPrompt(record.instruction, record.input);
  } catch (_) {
    $("prompt").textContent = "";
  }
}

function setMode(mode) {
  state.mode = mode;
  for (const tab of document.querySelectorAll("#modes [data-mode]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
  }
  for (const panel of document.querySelectorAll("[data-panel]")) panel.hidden = panel.dataset.panel !== mode;
  $("record-fields").hidden = mode === "task";
  $("prompt").textContent = "";
  showPromptPreview();
}

async function start() {
  const response = await fetch("/playground/meta.json");
  state.meta = await response.json();
  buildTaskForms();
  $("export-aspects").replaceChildren(...state.meta.aspects.map((a) => {
    const wrap = document.createElement("label");
    wrap.className = "inline";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.id = `aspect-${a}`;
    box.checked = a === "seller";
    wrap.append(box, a);
    return wrap;
  }));
  for (const tab of document.querySelectorAll("#modes [data-mode]")) {
    tab.addEventListener("click", () => setMode(tab.dataset.mode));
  }
  for (const id of ["instruction-text", "input-text"]) $(id).addEventListener("input", showPromptPreview);
  $("compare").addEventListener("change", () => { $("model-b").disabled = !$("compare").checked; });
  $("constraint").addEventListener("change", () => {
    $("schema-label").hidden = $("constraint").value !== "json_schema";
    $("choices-label").hidden = $("constraint").value !== "choice";
  });
  $("run").addEventListener("click", run);
  $("stop-button").addEventListener("click", () => state.controller && state.controller.abort());
  $("export").addEventListener("click", exportHistory);
  $("clear-history").addEventListener("click", () => {
    localStorage.removeItem(HISTORY_STORAGE);
    renderHistory();
  });
  $("chat-clear").addEventListener("click", () => {
    state.chat = [];
    renderChat();
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key-input").value.trim();
    sessionStorage.setItem(KEY_STORAGE, state.key);
    $("key-input").value = "";
    loadModels();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    state.key = null;
    loadModels();
  });
  renderHistory();
  await loadModels();
}

window.playground = {buildPrompt, exportRecords, matchLabel};  // for the browser test
document.addEventListener("DOMContentLoaded", start);
