"""The evaluation report as files: report.json, report.md (one table per view), chart.png and report.html.

Why a module of its own: `evaluate.py` computes scores; this turns one finished report dict (plus the
per-record rows) into what people read. The tables and the chart choose their columns from one list,
`METRIC_COLUMNS`, and the chart and the HTML page share `CHART_METRICS` (report_html.py), so a metric
added to the report appears everywhere or nowhere. report.json stays strict JSON: NaN (not applicable)
becomes null.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from llama_e_jax import report_html
from llama_e_jax.data.labels import LABEL_SETS
from llama_e_jax.report_html import CHART_METRICS, missing

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

METRIC_COLUMNS = (  # (key, header, format)
    ("num_generated", "n", "{:.0f}"),
    ("bleu4", "BLEU-4", "{:.1f}"),
    ("rouge_l_f", "ROUGE-L F", "{:.1f}"),
    ("accuracy", "Acc", "{:.1f}"),
    ("macro_f1", "Macro-F1", "{:.1f}"),
    ("out_of_set_rate", "Out-of-set %", "{:.1f}"),
    ("constrained_accuracy", "Constr. Acc", "{:.1f}"),
    ("loglik_accuracy", "LL-rank Acc", "{:.1f}"),
    ("perplexity", "Ref. PPL", "{:.2f}"),
    ("mean_response_words", "Words (ref.)", None),
)


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
              "out-of-set replies are wrong. Constr. Acc: replies decoded under a constraint that admits only the "
              "candidates (the Acc column itself unless the run used --unconstrained); LL-rank Acc: the candidate "
              "with the highest log-likelihood given the prompt (scoring.py). "
              "Ref. PPL: perplexity of the reference responses (teacher-forced). "
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
        return "–" if missing(words) else f"{words:.0f} ({reference:.0f})"
    value = scores.get(key)
    return "–" if missing(value) else fmt.format(value)


def render_chart(report: dict, path: Path) -> None:
    """PNG: one panel per (view, task), grouped bars of the task's scores per system."""
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
            chosen = CHART_METRICS["label" if task in LABEL_SETS else "generation"]
            for s, system in enumerate(systems):
                values = [results[view][system][task].get(key) for key, _ in chosen]
                heights = [0.0 if missing(v) else v for v in values]
                bars = axis.bar(np.arange(len(chosen)) + s * width, heights, width, label=system)
                axis.bar_label(bars, labels=["–" if missing(v) else f"{v:.0f}" for v in values], fontsize=6)
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
    """Writes report.json, report.md, chart.png, report.html and outputs.jsonl; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("report.json", "report.md", "chart.png", "outputs.jsonl")}
    paths["report.json"].write_text(json.dumps(_finite_or_null(report), indent=2, allow_nan=False) + "\n")
    paths["report.md"].write_text(render_markdown(report))
    render_chart(report, paths["chart.png"])
    paths["report.html"] = out_dir / "report.html"  # self-contained page (report_html.py)
    paths["report.html"].write_text(report_html.render(report, rows), encoding="utf-8")
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
