"""`report.html`: the evaluation report as one self-contained page for people who do not read JSON.

`evaluate.write_reports` writes it beside report.json, report.md and chart.png. It holds, per view
and task, a bar chart (inline SVG, drawn here: no script, no external file, so the page opens
anywhere, offline, and cannot run anything), the scores of the base model and every adapter, the
metric definitions, and examples: the 20 worst and 20 best records of each task (all of them, worst
first, when a task has 40 or fewer), with the prompt, the reference and every system's reply side
by side.

Design, and why:

* **Ranked by the last system.** Examples are ordered by the per-record score of the last system
  in the report (evaluate lists the base first and the adapters after it, so this is the tuned
  model when there is one): "where does the tuned model fail" is the question a reader brings.
  Per-record scores are ROUGE-L F for the generation tasks and correct / wrong for the label tasks
  (ties in id order, so the page is reproducible).
* **Everything escaped.** Prompts, references and replies are model or user text; every string
  goes through `html.escape`, so a reply containing `<script>` is shown, not run.
* **No dependency on evaluate.py** (which imports this module): the inputs are the report dict
  and the per-record rows, as `evaluate.evaluate` returns them.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from llama_e_jax.data.labels import LABEL_SETS
from llama_e_jax.data.prompt import build_prompt

EXAMPLES_EACH_WAY = 20  # worst and best records shown per task
CHART_METRICS = {"generation": (("bleu4", "BLEU-4"), ("rouge_l_f", "ROUGE-L F")),
                 "label": (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1"), ("out_of_set_rate", "Out-of-set %"))}
TABLE_METRICS = (("num_generated", "n", "{:.0f}"), ("bleu4", "BLEU-4", "{:.1f}"), ("rouge_l_f", "ROUGE-L F", "{:.1f}"),
                 ("accuracy", "Accuracy", "{:.1f}"), ("macro_f1", "Macro-F1", "{:.1f}"),
                 ("out_of_set_rate", "Out-of-set %", "{:.1f}"), ("perplexity", "Ref. PPL", "{:.2f}"),
                 ("mean_response_words", "Words", "{:.0f}"), ("mean_reference_words", "Ref. words", "{:.0f}"))
METRIC_DEFINITIONS = (
    ("BLEU-4", "Corpus BLEU with up to 4-grams (sacrebleu) of the replies against the references; 0-100. "
               "Ads, title rewriting and Q&A."),
    ("ROUGE-L F", "F-measure of the longest common subsequence of reply and reference words (with stemming), "
                  "averaged over records; 0-100. Also the per-record score that ranks the examples."),
    ("Accuracy", "Share of label replies equal to the reference label, after normalising case, spacing and a "
                 "final full stop. Product classification and intent speculation."),
    ("Macro-F1", "F1 per label, averaged over the labels of the references, so rare labels count as much as "
                 "frequent ones."),
    ("Out-of-set %", "Share of label replies that name none of the candidate labels; they count as wrong."),
    ("Ref. PPL", "Perplexity of the reference response under the model (teacher-forced, response tokens only): "
                 "whether the model knows the answer, independent of decoding. Lower is better."),
    ("Words", "Mean number of words of the replies (Ref. words: of the references)."),
)
SYSTEM_COLOURS = ("#7a8599", "#2457c5", "#d9822b", "#2e9e5b", "#b3261e", "#8e44ad")
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; color: #1d2330; margin: 1.5rem auto; max-width: 1280px; padding: 0 1rem; }
h1 { font-size: 1.4rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #d7dbe3; } h3 { margin-top: 1.5rem; }
table { border-collapse: collapse; margin: .5rem 0; } td, th { border: 1px solid #d7dbe3; padding: .25rem .5rem; vertical-align: top; }
th { background: #f3f4f7; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.charts { display: flex; flex-wrap: wrap; gap: 1rem; } figure { margin: 0; } figcaption { font-weight: 600; }
table.examples td { width: 25%; } table.examples pre { white-space: pre-wrap; word-break: break-word; margin: 0;
  font: 12px/1.35 ui-monospace, monospace; max-height: 18rem; overflow: auto; }
.score, .record-id { color: #5d6678; font-size: .85rem; } dt { font-weight: 600; } dd { margin: 0 0 .5rem 1rem; }
"""


def render(report: dict, rows: Sequence[dict]) -> str:
    """The whole page, as text. `report` is evaluate's report dict; `rows` its per-record output rows."""
    meta = report.get("meta", {})
    parts = [f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>Evaluation: {_e(meta.get('model', ''))}</title><style>{STYLE}</style></head><body>",
             f"<h1>Evaluation: {_e(meta.get('model', ''))}</h1>", _summary(meta)]
    for view, by_system in report["results"].items():
        parts.append(f"<h2>View: {_e(view)}</h2>")
        parts.append(_scores_section(by_system))
    parts.append(_definitions())
    for view, by_system in report["results"].items():
        systems = list(by_system)
        view_rows = [r for r in rows if r.get("view") == view]
        for task in _tasks(by_system):
            parts.append(_examples_section(view, task, systems, [r for r in view_rows if r.get("task") == task]))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def missing(value: Any) -> bool:
    """Not applicable: absent, None (NaN in report.json), NaN or inf."""
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def _tasks(by_system: dict) -> list[str]:
    return list(next(iter(by_system.values()), {}))


def _summary(meta: dict) -> str:
    items = [("Model", meta.get("model")), ("Adapters", meta.get("adapters")), ("Data", meta.get("data")),
             ("Records", meta.get("num_records")), ("Generation", meta.get("generation"))]
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_describe(v))}</td></tr>" for k, v in items if v is not None)
    return f"<table class=\"meta\">{cells}</table>"


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


# ------------------------------------------------------------------------------------------- scores


def _scores_section(by_system: dict[str, dict[str, dict]]) -> str:
    systems = list(by_system)
    charts = [_chart(task, systems, {s: by_system[s][task] for s in systems}) for task in _tasks(by_system)]
    header = "".join(f"<th>{_e(h)}</th>" for _, h, _ in TABLE_METRICS)
    body = []
    for task in _tasks(by_system):
        for system in systems:
            scores = by_system[system][task]
            cells = "".join(f"<td class=\"num\">{_format(scores.get(k), f)}</td>" for k, _, f in TABLE_METRICS)
            body.append(f"<tr><td>{_e(task)}</td><td>{_e(system)}</td>{cells}</tr>")
    table = f"<table class=\"scores\"><tr><th>task</th><th>system</th>{header}</tr>{''.join(body)}</table>"
    return f"<div class=\"charts\">{''.join(charts)}</div>{table}"


def _format(value: Any, fmt: str) -> str:
    return "–" if missing(value) else _e(fmt.format(value))


def _chart(task: str, systems: list[str], scores: dict[str, dict]) -> str:
    """Grouped bars, one group per metric and one bar per system, on a fixed 0-100 scale (all percentages)."""
    metrics = CHART_METRICS["label" if task in LABEL_SETS else "generation"]
    width, height, left, bottom, top = 380, 220, 34, 30, 12
    plot_h = height - bottom - top
    group_w = (width - left - 10) / len(metrics)
    bar_w = group_w * 0.8 / max(len(systems), 1)
    y = lambda v: top + plot_h * (1 - min(max(v, 0.0), 100.0) / 100)  # noqa: E731 - a scale, read once
    shapes = [f'<line x1="{left}" y1="{y(t):.1f}" x2="{width - 10}" y2="{y(t):.1f}" stroke="#e3e6ec"/>'
              f'<text x="{left - 4}" y="{y(t) + 4:.1f}" text-anchor="end" font-size="10">{t}</text>'
              for t in (0, 25, 50, 75, 100)]
    for m, (key, name) in enumerate(metrics):
        x0 = left + m * group_w + group_w * 0.1
        shapes.append(f'<text x="{x0 + group_w * 0.4:.1f}" y="{height - 12}" text-anchor="middle" '
                      f'font-size="11">{_e(name)}</text>')
        for s, system in enumerate(systems):
            value = scores[system].get(key)
            x = x0 + s * bar_w
            if missing(value):
                shapes.append(f'<text x="{x + bar_w / 2:.1f}" y="{y(0) - 3:.1f}" text-anchor="middle" '
                              f'font-size="9">–</text>')
                continue
            colour = SYSTEM_COLOURS[s % len(SYSTEM_COLOURS)]
            shapes.append(f'<rect x="{x:.1f}" y="{y(value):.1f}" width="{bar_w - 1:.1f}" '
                          f'height="{y(0) - y(value):.1f}" fill="{colour}"><title>{_e(system)}: {value:.1f}</title></rect>'
                          f'<text x="{x + bar_w / 2:.1f}" y="{y(value) - 3:.1f}" text-anchor="middle" '
                          f'font-size="9">{value:.0f}</text>')
    legend = "".join(f'<rect x="{left + 8 + 110 * s}" y="{height - 8}" width="8" height="8" '
                     f'fill="{SYSTEM_COLOURS[s % len(SYSTEM_COLOURS)]}"/><text x="{left + 20 + 110 * s}" '
                     f'y="{height}" font-size="10">{_e(system[:16])}</text>' for s, system in enumerate(systems))
    svg = (f'<svg class="chart" data-task="{_e(task)}" role="img" width="{width}" height="{height + 4}" '
           f'viewBox="0 0 {width} {height + 4}" xmlns="http://www.w3.org/2000/svg" '
           f'aria-label="{_e(task)} scores">{"".join(shapes)}{legend}</svg>')
    return f"<figure><figcaption>{_e(task)}</figcaption>{svg}</figure>"


def _definitions() -> str:
    items = "".join(f"<dt>{_e(name)}</dt><dd>{_e(text)}</dd>" for name, text in METRIC_DEFINITIONS)
    return (f"<h2>Metric definitions</h2><dl>{items}</dl><p>All scores are percentages. Records whose prompt did "
            f"not fit the context were not generated; they are counted in report.json (num_skipped).</p>")


# ------------------------------------------------------------------------------------------- examples


def record_score(row: dict) -> float | None:
    """A record's score for ranking: ROUGE-L F (0-100), or 100 / 0 for a right / wrong label; None if skipped."""
    if row.get("skipped"):
        return None
    if "correct" in row:
        return 100.0 if row["correct"] else 0.0
    value = row.get("rouge_l_f")
    return None if missing(value) else float(value)


def _examples_section(view: str, task: str, systems: list[str], rows: Sequence[dict]) -> str:
    by_id: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_id.setdefault(row["id"], {})[row["system"]] = row
    ranker = systems[-1]
    scored = sorted(((record_score(r[ranker]), i) for i, r in by_id.items()
                     if ranker in r and record_score(r[ranker]) is not None), key=lambda pair: (pair[0], pair[1]))
    if len(scored) <= 2 * EXAMPLES_EACH_WAY:
        groups = [(f"All {len(scored)} examples, worst first", scored)]
    else:
        groups = [(f"{EXAMPLES_EACH_WAY} worst", scored[:EXAMPLES_EACH_WAY]),
                  (f"{EXAMPLES_EACH_WAY} best", scored[-EXAMPLES_EACH_WAY:][::-1])]
    head = "".join(f"<th>{_e(s)}</th>" for s in systems)
    parts = [f"<h3>Examples: {_e(task)} ({_e(view)} view), ranked by {_e(ranker)}</h3>"]
    for title, ranked in groups:
        lines = [_example_row(by_id[record_id], systems) for _, record_id in ranked]
        parts.append(f"<h4>{_e(title)}</h4><table class=\"examples\" data-task=\"{_e(task)}\"><tr><th>prompt</th>"
                     f"<th>reference</th>{head}</tr>{''.join(lines)}</table>")
    return "\n".join(parts)


def _example_row(by_system: dict[str, dict], systems: list[str]) -> str:
    first = next(iter(by_system.values()))
    prompt = build_prompt(first.get("instruction", ""), first.get("input", ""))
    cells = [f"<td><span class=\"record-id\">{_e(first['id'])}</span><pre>{_e(prompt)}</pre></td>",
             f"<td><pre>{_e(first.get('reference', ''))}</pre></td>"]
    for system in systems:
        row = by_system.get(system)
        if row is None:
            cells.append("<td>–</td>")
            continue
        score = record_score(row)
        note = "not generated" if score is None else f"score {score:.1f}"
        cells.append(f"<td><span class=\"score\">{_e(note)}</span><pre>{_e(row.get('reply', ''))}</pre></td>")
    return f"<tr>{''.join(cells)}</tr>"
