"""`python -m llama_e_jax.evaluate`: per-task scores of a base model and its adapters, side by side.

    python -m llama_e_jax.evaluate                              # SmolLM2 base vs runs/default/adapter, seed test split
    python -m llama_e_jax.evaluate --adapter ads=runs/ads/adapter --adapter runs/all/adapter --limit-per-task 20
    python -m llama_e_jax.evaluate --jsonl my_test.jsonl --model /ckpt/llama-2-7b-hf --adapter peft_dir/

What a run does, and why:

* **Systems.** The base model and every adapter (ours or PEFT) are evaluated on the same records
  with the same settings in one run, so the table compares like with like. All systems decode in the
  same batches through one multi-adapter Generator (the base unmerged, each adapter in a slot of the
  stacked tables, model/adapter_stack.py): each record is prompted once per system, rows of
  different systems side by side, so the data is passed over once. Teacher-forced scoring
  (perplexity, option ranking) runs per system on a merged copy of the base, made one at a time.
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
scores, one panel per task and view), `outputs.jsonl` (one line per record, view and system:
prompt, reference, reply, matched label, per-record scores), and `report.html` (the same as one
self-contained page, with the 20 worst and best examples per task). eval_report.py and report_html.py
write them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llama_e_jax import metrics
from llama_e_jax import eval_report
from llama_e_jax import scoring
from llama_e_jax.data.labels import LABEL_SETS
from llama_e_jax.data.prompt import build_prompt
from llama_e_jax.data.schema import TASKS, InstructionRecord, read_jsonl_files
from llama_e_jax.data.tfds_builder import build_dataset, expand_paths, load_split
from llama_e_jax.generate import sampling, speculative
from llama_e_jax.generate.guided import Guide
from llama_e_jax.generate.generator import Generator
from llama_e_jax.io.adapters import load_any_adapter
from llama_e_jax.io.load import load_model
from llama_e_jax.model import lora, quant
from llama_e_jax.train.metrics_log import package_versions

log = logging.getLogger(__name__)

GENERATION_TASKS = ("ads_generation", "title_rewriting", "general_qa")
LABEL_TASKS = tuple(LABEL_SETS)  # product_classification, intent_speculation
VIEWS = ("standard", "zero_shot")
DEFAULT_ADAPTER = Path("runs/default/adapter")  # where `python -m llama_e_jax.train` run from here writes it
DEFAULT_STOP = ("\n###",)  # an Alpaca-style model that keeps going starts a new "### Instruction:"

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


def id_hash(record: InstructionRecord) -> int:
    """The first 4 bytes of sha256(record id), big-endian: a per-record number no file order changes."""
    return int.from_bytes(hashlib.sha256(record.id.encode("utf-8")).digest()[:4], "big")


def zero_shot_record(record: InstructionRecord) -> InstructionRecord:
    """The record with its instruction replaced by a paraphrase of its task (deterministic by id)."""
    choices = ZERO_SHOT_INSTRUCTIONS[record.task]
    index = id_hash(record) % len(choices)
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
    """`limit` records of each task (all when limit is None): those whose ids hash lowest, in input order.

    A hash sample rather than the first N: imported test files are grouped by source (all of ePQA
    before hetPQA, IntentionQA task 1 before task 2), so the first N would measure one source only.
    The hash is the zero-shot paraphrase's (`id_hash`), so a sample does not depend on the file order.
    """
    if limit is None:
        return list(records)
    if limit < 1:
        raise ValueError(f"--limit-per-task must be >= 1, got {limit}")
    by_task: dict[str, list[InstructionRecord]] = {}
    for record in records:
        by_task.setdefault(record.task, []).append(record)
    kept = {id(r) for task_records in by_task.values() for r in sorted(task_records, key=id_hash)[:limit]}
    return [record for record in records if id(record) in kept]


def candidate_labels(record: InstructionRecord) -> tuple[str, ...]:
    """The labels a reply is matched against: the record's options (any labels: fixed, declared by
    the dataset, or free text), else the task's fixed label set."""
    return record.options or LABEL_SETS[record.task]


def load_records(jsonl: str | None, split: str, tfds_config: str, data_dir: str | None) -> tuple[list, str]:
    """(records, description of the source) from JSONL or a prepared/preparable tfds split.

    `jsonl` is a file, a directory of *.jsonl or a glob (e.g. "$LLAMA_E_CACHE/imported/*/test.jsonl").
    Any labels are accepted (a labels file beside a file still declares its set, and a line outside
    it is an error naming file:line), and `aspects` may be absent: they never reach the prompt.
    """
    if jsonl:
        records, _ = read_jsonl_files(expand_paths([jsonl]), label_sets={}, require_aspects=False)
        return records, f"jsonl:{jsonl}"
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


def load_system(spec: str, model_config: Any) -> System:
    """`NAME=DIR` or `DIR` (name: the directory's name, or its parent's when it is called "adapter")."""
    name, _, directory = spec.rpartition("=")
    path = Path(directory)
    if not name:
        name = path.parent.name if path.name in ("adapter", "peft_adapter") else path.name
    if not path.is_dir():
        raise FileNotFoundError(f"--adapter {spec}: {path} is not a directory")
    adapter, lora_config = load_any_adapter(path, model_config)  # ours or PEFT's
    return System(name, adapter, lora_config, str(path))


def system_params(params: dict, system: System) -> dict:
    """The base params, or a merged copy for an adapter."""
    if system.adapter is None:
        return params
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
    speculation: speculative.Speculation = speculative.DEFAULT  # same output, fewer decode steps
    weights: str = quant.DEFAULT_MODE  # storage of the projection kernels (model/quant.py), after any merge

    def sampler(self) -> Any:
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


def generate_replies(generator: Any, records: Sequence[InstructionRecord], settings: GenerationSettings,
                     constrained: bool = False, adapters: Sequence[str | None] | None = None) -> list[Reply]:
    """Greedy (or sampled) replies to each record's prompt; over-long prompts are skipped, not cut.

    `constrained`: label-task replies may only spell one of the record's candidate labels (choice
    decoding, generate/guided.py); other tasks decode freely. `adapters` (a multi-adapter
    generator): the adapter name (None: base) each record is decoded with."""
    adapters = [None] * len(records) if adapters is None else list(adapters)
    prompts = [generator.encode_prompt(build_prompt(r.instruction, r.input)) for r in records]
    replies = [Reply() for _ in records]
    fits = []
    for i, ids in enumerate(prompts):
        if len(ids) + settings.max_new_tokens > generator.max_length:
            replies[i].skipped = (f"prompt of {len(ids)} tokens + max_new_tokens {settings.max_new_tokens} exceeds "
                                  f"the model's {generator.max_length}-token window")
        else:
            fits.append(i)
    guides = [generator.guide(Guide.choices(candidate_labels(records[i])))
              if constrained and records[i].task in LABEL_TASKS else None for i in fits]
    completions = generator.generate_ids([prompts[i] for i in fits], settings.max_new_tokens, settings.sampler(),
                                         settings.stop, settings.seed, constraints=guides,
                                         **({"adapters": [adapters[i] for i in fits]} if any(adapters) else {}))
    eos = set(generator.eos_ids)
    for i, completion in zip(fits, completions):
        replies[i] = Reply(text=completion.text.strip(), finish_reason=completion.finish_reason,
                           tokens=sum(1 for t in completion.token_ids if t not in eos))
    return replies


# ===================================================================================== scoring


def score_task(task: str, records: Sequence[InstructionRecord], replies: Sequence[Reply],
               nlls: Sequence[scoring.ReferenceNll]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
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
    option_scoring: bool = True  # label tasks: also rank the candidates by log-likelihood (scoring.py)
    # Label tasks decode constrained to their candidates; False: decode freely and report the
    # constrained accuracy beside it (an extra pass over the label records).
    constrained: bool = True
    generation: GenerationSettings = dataclasses.field(default_factory=GenerationSettings)


def evaluate(config: Any, params: dict, tokenizer: Any, systems: Sequence[System],
             records: Sequence[InstructionRecord], options: EvalOptions) -> tuple[dict, list[dict]]:
    """Scores every system on every view. Returns (results[view][system][task], per-record rows)."""
    if not records:
        raise ValueError("no records to evaluate")
    views = {view: view_records(records, view) for view in options.views}
    window = scoring.perplexity_window(tokenizer, [r for rs in views.values() for r in rs], config.max_position_embeddings)
    row_nll = scoring.row_nll_function(config) if options.perplexity or options.option_scoring else None
    tasks = [t for t in TASKS if any(r.task == t for r in records)]
    results: dict[str, dict[str, dict[str, Any]]] = {view: {} for view in views}
    rows: list[dict] = []
    started = time.perf_counter()
    adapters = {s.name: (s.adapter, s.lora_config) for s in systems if s.adapter is not None}
    generator = Generator(config, params, tokenizer, max_batch_size=options.generation.batch_size,
                          speculation=options.generation.speculation, adapters=adapters or None,
                          weights=options.generation.weights)
    decoded = {view: _decode_all_systems(generator, systems, view_recs, options) for view, view_recs in views.items()}
    log.info("decoded %d systems in one pass in %.0f s", len(systems), time.perf_counter() - started)
    del generator
    for system in systems:
        started = time.perf_counter()
        weights = quant.quantize_params(system_params(params, system), options.generation.weights)
        for view, view_recs in views.items():
            replies, constrained = decoded[view][system.name]
            nlls = (scoring.reference_nll(config, weights, tokenizer, view_recs, window, row_nll) if options.perplexity
                    else [scoring.ReferenceNll() for _ in view_recs])
            results[view][system.name] = {}
            for task in tasks:
                index = [i for i, r in enumerate(view_recs) if r.task == task]
                task_records = [view_recs[i] for i in index]
                scores, details = score_task(task, task_records, [replies[i] for i in index], [nlls[i] for i in index])
                if task in LABEL_TASKS:
                    scores["constrained_accuracy"] = _label_accuracy(task_records, [constrained[i] for i in index])
                if options.option_scoring and task in LABEL_TASKS:
                    ranked = scoring.score_options(config, weights, tokenizer, task_records,
                                                   options_of=candidate_labels, row_nll=row_nll)
                    scores.update(scoring.ranking_scores(ranked, [r.output for r in task_records]))
                    for detail, result in zip(details, ranked):
                        detail["loglik_choice"] = result.best
                results[view][system.name][task] = scores
                rows += [_output_row(view, system.name, view_recs[i], replies[i], detail)
                         for i, detail in zip(index, details)]
        log.info("scored %s in %.0f s", system.name, time.perf_counter() - started)
        del weights
    return results, rows


def _decode_all_systems(generator: Any, systems: Sequence[System], records: Sequence[InstructionRecord],
                        options: EvalOptions) -> dict[str, tuple[list[Reply], list[Reply]]]:
    """system name -> (replies, constrained label replies) for `records`, every system decoded in the
    same batches: each record once per system, consecutively (similar prompt lengths share a batch)."""
    pairs = [(record, system) for record in records for system in systems]
    pair_records = [record for record, _ in pairs]
    adapters = [system.name if system.adapter is not None else None for _, system in pairs]
    replies = generate_replies(generator, pair_records, options.generation, options.constrained, adapters)
    constrained = replies if options.constrained else _constrained_label_replies(
        generator, pair_records, options.generation, adapters)
    width = len(systems)
    return {system.name: (replies[j::width], constrained[j::width]) for j, system in enumerate(systems)}


def _constrained_label_replies(generator: Any, records: Sequence[InstructionRecord],
                               settings: GenerationSettings, adapters: Sequence[str | None]) -> list[Reply]:
    """Constrained replies for the label-task records (placeholders elsewhere), for --unconstrained runs."""
    index = [i for i, r in enumerate(records) if r.task in LABEL_TASKS]
    replies = [Reply(skipped="not a label task") for _ in records]
    for i, reply in zip(index, generate_replies(generator, [records[i] for i in index], settings, constrained=True,
                                                adapters=[adapters[i] for i in index])):
        replies[i] = reply
    return replies


def _label_accuracy(records: Sequence[InstructionRecord], replies: Sequence[Reply]) -> float:
    """Accuracy (%) of the generated replies' labels (NaN when none was generated)."""
    done = [i for i, reply in enumerate(replies) if not reply.skipped]
    predictions = [metrics.match_label(replies[i].text, candidate_labels(records[i])) for i in done]
    return metrics.label_scores(predictions, [records[i].output for i in done]).accuracy if done else float("nan")


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


# ===================================================================================== CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama_e_jax.evaluate", description=__doc__.split("\n")[0])
    data = parser.add_argument_group("data (default: the seed test split)")
    data.add_argument("--jsonl", help="instruction-schema JSONL file to evaluate instead of a tfds split")
    data.add_argument("--split", default="test", help="tfds split (train, validation, test)")
    data.add_argument("--tfds-config", default="seed", help="llama_e_instructions config: seed or seed_expanded")
    data.add_argument("--data-dir", default=None, help="tfds data dir (default $LLAMA_E_CACHE/tensorflow_datasets)")
    data.add_argument("--limit-per-task", type=int, default=None, help="evaluate N records of each task, sampled by id hash")
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="GGUF file, HF checkpoint dir, or preset name (random weights); "
                                       "default: the embedded SmolLM2-135M-Instruct")
    model.add_argument("--tokenizer", help="tokenizer dir/GGUF, or 'bytes' (default: the model's; presets: bytes)")
    model.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    quant.add_arguments(model)
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
    speculative.add_arguments(gen)
    parser.add_argument("--views", default=",".join(VIEWS), help="comma-separated: standard, zero_shot")
    parser.add_argument("--no-perplexity", action="store_true", help="skip the reference perplexity pass")
    parser.add_argument("--no-ranking", action="store_true",
                        help="label tasks: skip ranking the candidates by log-likelihood (one forward pass per "
                             "candidate, the slowest part on a CPU)")
    parser.add_argument("--unconstrained", action="store_true",
                        help="label tasks: decode freely (Acc) and report choice-constrained decoding beside it "
                             "(Constr. Acc); default: constrained to the candidates (Acc = Constr. Acc)")
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
                                  batch_size=args.batch_size, speculation=speculative.from_arguments(args),
                                  weights=quant.from_arguments(args))
    try:
        records, data_source = load_records(args.jsonl, args.split, args.tfds_config, args.data_dir)
        records = limit_per_task(records, args.limit_per_task)
        loaded = load_model(args.model, tokenizer=args.tokenizer, dtype=args.dtype)
        config, params, tokenizer, model_name = loaded.config, loaded.params, loaded.tokenizer, loaded.description
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
    options = EvalOptions(views=views, perplexity=not args.no_perplexity, option_scoring=not args.no_ranking,
                          generation=settings, constrained=not args.unconstrained)
    results, rows = evaluate(config, params, tokenizer, systems, records, options)
    out_dir = Path(args.out_dir or Path("runs", "eval", datetime.datetime.now(datetime.timezone.utc)
                                        .strftime("%Y%m%dT%H%M%SZ")))  # relative to the working directory
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
            "label_decoding": "free (constrained beside it)" if args.unconstrained else "constrained to the candidates",
            "system_decoding": "one pass: every system in the same batches (adapters unmerged, stacked)",
            "versions": package_versions(("jax", "flax", "sacrebleu", "rouge-score", "tokenizers")),
            "wall_s": round(time.perf_counter() - started, 1),
        },
        "results": results,
    }
    paths = eval_report.write_reports(out_dir, report, rows)
    print(eval_report.render_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
