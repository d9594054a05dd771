"""`python -m llama_e_jax.evaluate`: per-task scores of a base model and its adapters, side by side.

    python -m llama_e_jax.evaluate                              # SmolLM2 base vs runs/default/adapter, seed test split
    python -m llama_e_jax.evaluate --adapter ads=runs/ads/adapter --adapter runs/all/adapter --limit-per-task 20
    python -m llama_e_jax.evaluate --jsonl my_test.jsonl --model /ckpt/llama-2-7b-hf --adapter peft_dir/

What a run does, and why:

* **Systems.** The base model and every adapter (ours or PEFT) are evaluated on the same records
  with the same settings in one run, so the table compares like with like. Adapters are merged into
  a copy of the base for decoding and scoring (no extra matmuls); the base is loaded once.
* **Two views.** `standard` prompts each record exactly as training does (`build_prompt`).
  `zero_shot` replaces each record's instruction with one of a fixed set of paraphrases of its task
  (chosen by a hash of the record id, so runs are reproducible; label tasks get their candidate
  labels appended when the input does not already list them). It asks whether the model learned the
  task or the wording. The paraphrases are generic, so instruction-specific constraints (a word
  limit, "end with 3 hashtags") are not restated: compare systems within a view, not across views.
* **Metrics** (definitions in metrics.py and docs/evaluation.md): BLEU-4 and ROUGE-L F for ads,
  title rewriting and Q&A; accuracy, macro-F1 and the out-of-set rate for classification and intent,
  where a reply is a label only if it equals a candidate after normalisation; mean response length;
  and the perplexity of the reference outputs (teacher-forced, response tokens only), which needs no
  generation and so separates "knows the answer" from "decodes it well".
* **Nothing is dropped silently.** A record whose prompt does not fit the cache next to
  `max_new_tokens` is not generated: it is listed in outputs.jsonl with `skipped` and counted in the
  report. Records whose prompt fills the perplexity window are counted the same way.

Outputs (`--out-dir`, default `runs/eval/<UTC time>/`): `report.json` (every number, the settings,
model, adapters, data source and versions), `report.md` (one table per view), `chart.png` (per-task
scores, one panel per task and view) and `outputs.jsonl` (one line per record, view and system:
prompt, reference, reply, matched label, per-record scores).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llama_e_jax import metrics
from llama_e_jax.data.labels import LABEL_SETS
from llama_e_jax.data.prompt import build_prompt
from llama_e_jax.data.schema import TASKS, InstructionRecord
from llama_e_jax.train.metrics_log import package_versions

log = logging.getLogger(__name__)

GENERATION_TASKS = ("ads_generation", "title_rewriting", "general_qa")
LABEL_TASKS = tuple(LABEL_SETS)  # product_classification, intent_speculation
VIEWS = ("standard", "zero_shot")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADAPTER = REPO_ROOT / "runs" / "default" / "adapter"
DEFAULT_STOP = ("\n###",)  # an Alpaca-style model that keeps going starts a new "### Instruction:"
PERPLEXITY_BATCH = 8  # packed rows per teacher-forced forward pass

# Zero-shot view: three paraphrases per task, none of them a training instruction (tests check the
# seeds). `{options}` is filled for label tasks whose input does not list the candidates.
ZERO_SHOT_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "ads_generation": (
        "Draft marketing copy that would make people want to buy the item described here.",
        "You are a copywriter for an online shop. Produce the advertisement this situation calls for.",
        "Come up with persuasive promotional text based on the product details provided.",
    ),
    "title_rewriting": (
        "Improve the product listing name shown here so that shoppers searching for it find it.",
        "Give this item a better storefront headline, keeping the facts unchanged.",
        "Reword the product name below into a clearer, search-friendly listing title.",
    ),
    "product_classification": (
        "Which one of the candidate categories does this item belong to? Reply with that category only.",
        "Sort the product below into the single most fitting category from the candidates given.",
        "Name the correct category for this item, choosing from the candidates and nothing else.",
    ),
    "intent_speculation": (
        "What is the shopper most probably trying to achieve with this purchase? Pick one candidate reason.",
        "Work out the motivation behind this order and reply with the single best-fitting candidate.",
        "From the candidates, select the reason that best explains why this customer is buying.",
    ),
    "general_qa": (
        "Reply to the shopper's question below, relying only on the information supplied.",
        "Help this customer: answer what they asked, based on the product details and feedback provided.",
        "Using just the facts given, write a helpful response to the buyer's question.",
    ),
}
ZERO_SHOT_OPTIONS_LINE = "\nCandidates: {options}"


# ===================================================================================== records


def zero_shot_record(record: InstructionRecord) -> InstructionRecord:
    """The record with its instruction replaced by a paraphrase of its task (deterministic by id)."""
    choices = ZERO_SHOT_INSTRUCTIONS[record.task]
    index = int.from_bytes(hashlib.sha256(record.id.encode("utf-8")).digest()[:4], "big") % len(choices)
    instruction = choices[index]
    if record.options and not all(option in record.input for option in record.options):
        instruction += ZERO_SHOT_OPTIONS_LINE.format(options=" | ".join(record.options))
    return dataclasses.replace(record, instruction=instruction)


def view_records(records: Sequence[InstructionRecord], view: str) -> list[InstructionRecord]:
    if view == "standard":
        return list(records)
    if view == "zero_shot":
        return [zero_shot_record(r) for r in records]
    raise ValueError(f"unknown view {view!r}; known: {VIEWS}")


def limit_per_task(records: Sequence[InstructionRecord], limit: int | None) -> list[InstructionRecord]:
    """The first `limit` records of each task, in input order (all when limit is None)."""
    if limit is None:
        return list(records)
    if limit < 1:
        raise ValueError(f"--limit-per-task must be >= 1, got {limit}")
    taken: dict[str, int] = {}
    kept = []
    for record in records:
        if taken.get(record.task, 0) < limit:
            taken[record.task] = taken.get(record.task, 0) + 1
            kept.append(record)
    return kept


def candidate_labels(record: InstructionRecord) -> tuple[str, ...]:
    """The labels a reply is matched against: the record's options, else the task's label set."""
    return record.options or LABEL_SETS[record.task]


def load_records(jsonl: str | None, split: str, tfds_config: str, data_dir: str | None) -> tuple[list, str]:
    """(records, description of the source) from a JSONL file or a prepared/preparable tfds split."""
    if jsonl:
        from llama_e_jax.data.schema import read_jsonl

        return read_jsonl(jsonl), f"jsonl:{jsonl}"
    from llama_e_jax.data.tfds_builder import build_dataset, load_split

    builder = build_dataset(tfds_config, data_dir)  # reuses a prepared dataset whose inputs are unchanged
    records = load_split(split, tfds_config, data_dir).read_all()
    return records, f"tfds:llama_e_instructions/{tfds_config}:{split} ({builder.data_dir})"


# ===================================================================================== model


@dataclasses.dataclass
class System:
    """One thing being evaluated: the base model (adapter None) or base + an adapter."""

    name: str
    adapter: Any = None  # adapter tree (numpy leaves) or None
    lora_config: Any = None
    source: str = ""


def load_base(model: str | None, tokenizer: str | None, dtype: str) -> tuple[Any, dict, Any, str]:
    """(config, params, tokenizer, description) for a GGUF file, an HF dir, or a preset (random weights).

    None means the embedded SmolLM2-135M-Instruct. A preset needs a tokenizer; "bytes" (the default
    for presets) is UTF-8 bytes as ids, the tokenizer of random test models.
    """
    from llama_e_jax.io import weights
    from llama_e_jax.model.config import PRESETS_DIR, LlamaConfig
    from llama_e_jax.io.tokenizer import load_tokenizer

    if model is None:
        from llama_e_jax.io.default_model import ensure_default_gguf

        model, description = str(ensure_default_gguf()), "SmolLM2-135M-Instruct (embedded default)"
    else:
        description = model
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        config, params = weights.load_gguf(path, dtype=dtype)
    elif path.is_dir() and (path / "config.json").is_file():
        config, params = weights.load_hf_checkpoint(path, dtype=dtype)
    elif (PRESETS_DIR / f"{model}.json").is_file():
        import jax

        from llama_e_jax.model.llama import Llama

        config = LlamaConfig.from_preset(model, param_dtype=dtype)
        params = jax.jit(lambda key: Llama(config).init(key, np.zeros((1, 2), np.int32))["params"])(jax.random.key(0))
        description, tokenizer = f"preset {model} (random weights, seed 0)", tokenizer or "bytes"
    else:
        raise ValueError(f"--model {model}: not a .gguf file, an HF checkpoint directory (config.json) or a "
                         f"preset in {PRESETS_DIR}")
    tokenizer_source = tokenizer or model
    if tokenizer_source == "bytes":
        from llama_e_jax.io.tokenizer import ByteTokenizer

        loaded_tokenizer = ByteTokenizer()
    else:
        loaded_tokenizer = load_tokenizer(tokenizer_source)
    return config.replace(dtype=dtype), params, loaded_tokenizer, description


def load_system(spec: str, model_config: Any) -> System:
    """`NAME=DIR` or `DIR` (name: the directory's name, or its parent's when it is called "adapter")."""
    from llama_e_jax.model import lora

    name, _, directory = spec.rpartition("=")
    path = Path(directory)
    if not name:
        name = path.parent.name if path.name in ("adapter", "peft_adapter") else path.name
    if not path.is_dir():
        raise FileNotFoundError(f"--adapter {spec}: {path} is not a directory")
    if (path / lora.NATIVE_WEIGHTS).is_file():
        adapter, lora_config = lora.load_adapter(path, model_config)
    else:
        adapter, lora_config = lora.import_peft(path, model_config)
    return System(name, adapter, lora_config, str(path))


def system_params(params: dict, system: System) -> dict:
    """The base params, or a merged copy for an adapter."""
    if system.adapter is None:
        return params
    from llama_e_jax.model import lora

    return lora.merge(params, system.adapter, system.lora_config)


# ===================================================================================== generation


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = DEFAULT_STOP
    batch_size: int = 16

    def sampler(self) -> Any:
        from llama_e_jax.generate import sampling

        if self.temperature == 0:
            return sampling.Greedy()
        return sampling.TopP(p=self.top_p, temperature=self.temperature)


@dataclasses.dataclass
class Reply:
    """A generated reply (or why there is none)."""

    text: str = ""
    tokens: int = 0  # generated tokens, without an ending EOS
    finish_reason: str = ""
    skipped: str = ""  # non-empty: not generated, and why


def generate_replies(generator: Any, records: Sequence[InstructionRecord], settings: GenerationSettings) -> list[Reply]:
    """Greedy (or sampled) replies to each record's prompt; over-long prompts are skipped, not cut."""
    prompts = [generator.encode_prompt(build_prompt(r.instruction, r.input)) for r in records]
    replies = [Reply() for _ in records]
    fits = []
    for i, ids in enumerate(prompts):
        if len(ids) + settings.max_new_tokens > generator.max_length:
            replies[i].skipped = (f"prompt of {len(ids)} tokens + max_new_tokens {settings.max_new_tokens} exceeds "
                                  f"the model's {generator.max_length}-token window")
        else:
            fits.append(i)
    completions = generator.generate_ids([prompts[i] for i in fits], settings.max_new_tokens, settings.sampler(),
                                         settings.stop, settings.seed)
    eos = set(generator.eos_ids)
    for i, completion in zip(fits, completions):
        replies[i] = Reply(text=completion.text.strip(), finish_reason=completion.finish_reason,
                           tokens=sum(1 for t in completion.token_ids if t not in eos))
    return replies


# ===================================================================================== perplexity


@dataclasses.dataclass
class ReferenceNll:
    """Teacher-forced negative log-likelihood of one reference response (None fields: not scored)."""

    nll: float | None = None
    tokens: int = 0
    truncated: bool = False


def reference_nll(config: Any, params: dict, tokenizer: Any, records: Sequence[InstructionRecord],
                  seq_len: int) -> list[ReferenceNll]:
    """Summed NLL of each record's response tokens (and EOS) given its prompt, one entry per record.

    Tokenisation and loss masks are the training pipeline's (`tokenize_split`, `assemble_batch`), so
    the numbers are exactly the training loss's. Examples are packed into rows (segment ids keep them
    apart) and each segment's sum is attributed back to its record.
    """
    from llama_e_jax.data import pipeline

    results = [ReferenceNll() for _ in records]
    try:
        split = pipeline.tokenize_split(list(records), tokenizer, seq_len)
    except ValueError as error:  # every prompt fills the window: nothing to score, counted as unscored
        log.warning("reference perplexity: %s", error)
        return results
    lengths = split.lengths
    rows = pipeline.pack_rows(np.arange(len(split)), lengths, seq_len)
    row_nll = _row_nll_function(config)
    for start in range(0, len(rows), PERPLEXITY_BATCH):
        chunk = rows[start:start + PERPLEXITY_BATCH]
        batch = pipeline.assemble_batch(split, chunk, PERPLEXITY_BATCH)
        token_nll = np.asarray(row_nll(params, batch))  # [B, T], already masked to response tokens
        for b, row in enumerate(chunk):
            for segment, example in enumerate(row, start=1):
                in_segment = batch["segment_ids"][b] == segment
                record = int(split.record_index[example])
                tokens = int(batch["loss_mask"][b][in_segment].sum())
                full = len(tokenizer.encode(records[record].output)) + 1  # + EOS
                results[record] = ReferenceNll(float(token_nll[b][in_segment].sum()), tokens, tokens < full)
    return results


_ROW_NLL_CACHE: dict[Any, Any] = {}


def _row_nll_function(config: Any):
    """jit(params, batch) -> per-token NLL [B, T] (0 outside the loss mask), cached per config."""
    if config not in _ROW_NLL_CACHE:
        import jax
        import optax

        from llama_e_jax.model.llama import Llama

        model = Llama(config)

        @jax.jit
        def row_nll(params, batch):
            logits = model.apply({"params": params}, batch["input_ids"], positions=batch["positions"],
                                 segment_ids=batch["segment_ids"])  # [B, T, V] float32
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, T]
            return nll * batch["loss_mask"]

        _ROW_NLL_CACHE[config] = row_nll
    return _ROW_NLL_CACHE[config]


def perplexity_window(tokenizer: Any, records: Sequence[InstructionRecord], max_positions: int) -> int:
    """Tokens per packed row: the longest example rounded up to 64, capped at the model's context."""
    from llama_e_jax.data.prompt import prompt_and_response

    longest = 2
    for record in records:
        prompt, response = prompt_and_response(record)
        longest = max(longest, len(tokenizer.encode(prompt)) + len(tokenizer.encode(response)) + 2)
    return min(-(-longest // 64) * 64, max_positions)


# ===================================================================================== scoring


def score_task(task: str, records: Sequence[InstructionRecord], replies: Sequence[Reply],
               nlls: Sequence[ReferenceNll]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the task's metrics, per-record details) for one view and system."""
    done = [i for i, reply in enumerate(replies) if not reply.skipped]
    texts = [replies[i].text for i in done]
    references = [records[i].output for i in done]
    scores: dict[str, Any] = {"num_records": len(records), "num_generated": len(done),
                              "num_skipped": len(records) - len(done)}
    details = [{} for _ in records]
    if task in LABEL_TASKS:
        predictions = [metrics.match_label(replies[i].text, candidate_labels(records[i])) for i in done]
        label = metrics.label_scores(predictions, references)
        scores.update(accuracy=label.accuracy, macro_f1=label.macro_f1, out_of_set_rate=label.out_of_set_rate,
                      num_out_of_set=label.num_out_of_set)
        for i, prediction in zip(done, predictions):
            details[i] = {"matched_label": prediction, "in_set": prediction is not None,
                          "correct": prediction == records[i].output}
    else:
        scores.update(bleu4=metrics.bleu4(texts, references), rouge_l_f=metrics.rouge_l_f(texts, references))
        for i, rouge in zip(done, metrics.rouge_l_f_per_example(texts, references)):
            details[i] = {"rouge_l_f": 100.0 * rouge}
    scores["mean_response_tokens"] = _mean([replies[i].tokens for i in done])
    scores["mean_response_words"] = _mean([len(t.split()) for t in texts])
    scores["mean_reference_words"] = _mean([len(r.split()) for r in references])
    scores["length_capped_rate"] = 100.0 * _mean([replies[i].finish_reason == "length" for i in done])
    scored = [n for n in nlls if n.nll is not None]
    nll_sum, nll_tokens = sum(n.nll for n in scored), sum(n.tokens for n in scored)
    scores.update(perplexity=metrics.perplexity_from_loss(nll_sum, nll_tokens) if scored else float("nan"),
                  perplexity_records=len(scored), perplexity_truncated=sum(n.truncated for n in scored))
    for i, n in enumerate(nlls):
        if n.nll is not None and n.tokens:
            details[i]["reference_perplexity"] = metrics.perplexity_from_loss(n.nll, n.tokens)
    return scores, details


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


# ===================================================================================== the run


@dataclasses.dataclass
class EvalOptions:
    views: tuple[str, ...] = VIEWS
    perplexity: bool = True
    generation: GenerationSettings = dataclasses.field(default_factory=GenerationSettings)


def evaluate(config: Any, params: dict, tokenizer: Any, systems: Sequence[System],
             records: Sequence[InstructionRecord], options: EvalOptions) -> tuple[dict, list[dict]]:
    """Scores every system on every view. Returns (results[view][system][task], per-record rows)."""
    from llama_e_jax.generate.engine import Generator

    if not records:
        raise ValueError("no records to evaluate")
    views = {view: view_records(records, view) for view in options.views}
    window = perplexity_window(tokenizer, [r for rs in views.values() for r in rs], config.max_position_embeddings)
    tasks = [t for t in TASKS if any(r.task == t for r in records)]
    results: dict[str, dict[str, dict[str, Any]]] = {view: {} for view in views}
    rows: list[dict] = []
    for system in systems:
        started = time.perf_counter()
        weights = system_params(params, system)
        generator = Generator(config, weights, tokenizer, max_batch_size=options.generation.batch_size)
        for view, view_recs in views.items():
            replies = generate_replies(generator, view_recs, options.generation)
            nlls = (reference_nll(config, weights, tokenizer, view_recs, window) if options.perplexity
                    else [ReferenceNll() for _ in view_recs])
            results[view][system.name] = {}
            for task in tasks:
                index = [i for i, r in enumerate(view_recs) if r.task == task]
                task_records = [view_recs[i] for i in index]
                scores, details = score_task(task, task_records, [replies[i] for i in index], [nlls[i] for i in index])
                results[view][system.name][task] = scores
                rows += [_output_row(view, system.name, view_recs[i], replies[i], detail)
                         for i, detail in zip(index, details)]
        log.info("evaluated %s in %.0f s", system.name, time.perf_counter() - started)
        del generator, weights
    return results, rows


def _output_row(view: str, system: str, record: InstructionRecord, reply: Reply, detail: dict) -> dict:
    row = {"view": view, "system": system, "id": record.id, "task": record.task,
           "instruction": record.instruction, "input": record.input, "reference": record.output,
           "reply": reply.text, "reply_tokens": reply.tokens, "finish_reason": reply.finish_reason}
    if record.options:
        row["options"] = list(record.options)
    if reply.skipped:
        row["skipped"] = reply.skipped
    row.update(detail)
    return row


# ===================================================================================== reports


METRIC_COLUMNS = (  # (key, header, format)
    ("num_generated", "n", "{:.0f}"),
    ("bleu4", "BLEU-4", "{:.1f}"),
    ("rouge_l_f", "ROUGE-L F", "{:.1f}"),
    ("accuracy", "Acc", "{:.1f}"),
    ("macro_f1", "Macro-F1", "{:.1f}"),
    ("out_of_set_rate", "Out-of-set %", "{:.1f}"),
    ("perplexity", "Ref. PPL", "{:.2f}"),
    ("mean_response_words", "Words (ref.)", None),
)
CHART_METRICS = {"generation": (("bleu4", "BLEU-4"), ("rouge_l_f", "ROUGE-L F")),
                 "label": (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1"), ("out_of_set_rate", "Out-of-set %"))}


def render_markdown(report: dict) -> str:
    """One table per view: rows (task, system), columns the metrics; "–" where not applicable."""
    lines = [f"# Evaluation: {report['meta']['model']}", "",
             f"Data: {report['meta']['data']}; {report['meta']['num_records']} records. "
             f"Generation: {_describe_generation(report['meta']['generation'])}.", ""]
    header = "| task | system | " + " | ".join(h for _, h, _ in METRIC_COLUMNS) + " |"
    for view, by_system in report["results"].items():
        lines += [f"## View: {view}", "", header, "|" + "---|" * (2 + len(METRIC_COLUMNS))]
        tasks = next(iter(by_system.values())).keys() if by_system else []
        for task in tasks:
            for system, by_task in by_system.items():
                cells = [_cell(by_task[task], key, fmt) for key, _, fmt in METRIC_COLUMNS]
                lines.append(f"| {task} | {system} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Scores are percentages. A label reply counts only if it equals a candidate after normalisation; "
              "out-of-set replies are wrong. Ref. PPL: perplexity of the reference responses (teacher-forced). "
              "Records not generated (prompt too long): see `num_skipped` in report.json.", ""]
    return "\n".join(lines)


def _describe_generation(settings: Any) -> str:
    if not isinstance(settings, dict):
        return str(settings)
    sampler = ("greedy" if not settings.get("temperature") else
               f"temperature {settings['temperature']}, top-p {settings.get('top_p')}, seed {settings.get('seed')}")
    return f"{sampler}, max {settings.get('max_new_tokens')} new tokens, stop {list(settings.get('stop', ()))!r}"


def _cell(scores: dict, key: str, fmt: str | None) -> str:
    if key == "mean_response_words":
        words, reference = scores.get("mean_response_words"), scores.get("mean_reference_words")
        return "–" if _missing(words) else f"{words:.0f} ({reference:.0f})"
    value = scores.get(key)
    return "–" if _missing(value) else fmt.format(value)


def _missing(value: Any) -> bool:
    """Not applicable: absent, None (NaN in report.json) or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def render_chart(report: dict, path: Path) -> None:
    """PNG: one panel per (view, task), grouped bars of the task's scores per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    views = list(results)
    systems = list(next(iter(results.values())))
    tasks = list(next(iter(next(iter(results.values())).values())))
    figure, axes = plt.subplots(len(views), len(tasks), figsize=(3.2 * len(tasks), 3.0 * len(views)),
                                squeeze=False, sharey=True)
    width = 0.8 / max(len(systems), 1)
    for row, view in enumerate(views):
        for col, task in enumerate(tasks):
            axis = axes[row][col]
            chosen = CHART_METRICS["label" if task in LABEL_TASKS else "generation"]
            for s, system in enumerate(systems):
                values = [results[view][system][task].get(key) for key, _ in chosen]
                heights = [0.0 if _missing(v) else v for v in values]
                bars = axis.bar(np.arange(len(chosen)) + s * width, heights, width, label=system)
                axis.bar_label(bars, labels=["–" if _missing(v) else f"{v:.0f}" for v in values], fontsize=6)
            axis.set_xticks(np.arange(len(chosen)) + width * (len(systems) - 1) / 2)
            axis.set_xticklabels([name for _, name in chosen], fontsize=7)
            axis.set_ylim(0, 110)  # room for the value labels above 100 % bars
            axis.set_title(f"{task}\n({view})", fontsize=8)
    axes[0][0].set_ylabel("score (%)")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_reports(out_dir: Path, report: dict, rows: Sequence[dict]) -> dict[str, Path]:
    """Writes report.json, report.md, chart.png and outputs.jsonl; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("report.json", "report.md", "chart.png", "outputs.jsonl")}
    paths["report.json"].write_text(json.dumps(_finite_or_null(report), indent=2, allow_nan=False) + "\n")
    paths["report.md"].write_text(render_markdown(report))
    render_chart(report, paths["chart.png"])
    with open(paths["outputs.jsonl"], "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return paths


def _finite_or_null(value: Any) -> Any:
    """NaN / inf -> None, recursively: report.json stays strict JSON (null = not applicable)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


# ===================================================================================== CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama_e_jax.evaluate", description=__doc__.split("\n")[0])
    data = parser.add_argument_group("data (default: the seed test split)")
    data.add_argument("--jsonl", help="instruction-schema JSONL file to evaluate instead of a tfds split")
    data.add_argument("--split", default="test", help="tfds split (train, validation, test)")
    data.add_argument("--tfds-config", default="seed", help="llama_e_instructions config: seed or seed_expanded")
    data.add_argument("--data-dir", default=None, help="tfds data dir (default $LLAMA_E_CACHE/tensorflow_datasets)")
    data.add_argument("--limit-per-task", type=int, default=None, help="evaluate the first N records of each task")
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="GGUF file, HF checkpoint dir, or preset name (random weights); "
                                       "default: the embedded SmolLM2-135M-Instruct")
    model.add_argument("--tokenizer", help="tokenizer dir/GGUF, or 'bytes' (default: the model's; presets: bytes)")
    model.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    model.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                       help="adapter dir (ours or PEFT), repeatable; default: runs/default/adapter if it exists")
    model.add_argument("--no-base", action="store_true", help="do not evaluate the base model itself")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=None, help=f"stop string, repeatable (default {DEFAULT_STOP})")
    gen.add_argument("--batch-size", type=int, default=16, help="sequences decoded together")
    parser.add_argument("--views", default=",".join(VIEWS), help="comma-separated: standard, zero_shot")
    parser.add_argument("--no-perplexity", action="store_true", help="skip the reference perplexity pass")
    parser.add_argument("--out-dir", help="default: runs/eval/<UTC time>")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    views = tuple(v.strip() for v in args.views.split(",") if v.strip())
    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        print(f"error: --views {args.views}: unknown {unknown}; known: {', '.join(VIEWS)}", file=sys.stderr)
        return 2
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  seed=args.seed, stop=tuple(args.stop) if args.stop is not None else DEFAULT_STOP,
                                  batch_size=args.batch_size)
    try:
        records, data_source = load_records(args.jsonl, args.split, args.tfds_config, args.data_dir)
        records = limit_per_task(records, args.limit_per_task)
        config, params, tokenizer, model_name = load_base(args.model, args.tokenizer, args.dtype)
        adapter_specs = list(args.adapter)
        if not adapter_specs and DEFAULT_ADAPTER.is_dir() and args.model is None:
            log.info("no --adapter given: evaluating the default training run's %s", DEFAULT_ADAPTER)
            adapter_specs = [f"default={DEFAULT_ADAPTER}"]
        systems = ([] if args.no_base else [System("base", source=model_name)])
        systems += [load_system(spec, config) for spec in adapter_specs]
        if not systems:
            raise ValueError("nothing to evaluate: --no-base without --adapter")
        names = [s.name for s in systems]
        if len(set(names)) != len(names):
            raise ValueError(f"system names must differ, got {names}; name adapters with NAME=DIR")
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    options = EvalOptions(views=views, perplexity=not args.no_perplexity, generation=settings)
    results, rows = evaluate(config, params, tokenizer, systems, records, options)
    out_dir = Path(args.out_dir or REPO_ROOT / "runs" / "eval" /
                   datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    report = {
        "meta": {
            "command": " ".join(["python -m llama_e_jax.evaluate", *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": model_name,
            "dtype": args.dtype,
            "systems": {s.name: s.source or "base model" for s in systems},
            "data": data_source,
            "num_records": len(records),
            "records_per_task": {t: sum(r.task == t for r in records) for t in TASKS},
            "limit_per_task": args.limit_per_task,
            "views": list(views),
            "generation": dataclasses.asdict(settings) | {"sampler": "greedy" if settings.temperature == 0 else "top-p"},
            "perplexity": not args.no_perplexity,
            "versions": package_versions(("jax", "flax", "sacrebleu", "rouge-score", "tokenizers")),
            "wall_s": round(time.perf_counter() - started, 1),
        },
        "results": results,
    }
    paths = write_reports(out_dir, report, rows)
    print(render_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
