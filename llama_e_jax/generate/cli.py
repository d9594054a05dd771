"""The generate command line: flags -> prompts -> completions (printed, or JSONL with --output).

    python -m llama_e_jax.generate "Write an ad for a steel water bottle"
    python -m llama_e_jax.generate --jsonl data/test.jsonl --adapter runs/ads/adapter --max-new-tokens 128
    python -m llama_e_jax.generate --choices "Electronics|Home & Kitchen|Toys" "Which category is a toaster in?"
    python -m llama_e_jax.generate --adapter ads=runs/ads/adapter --adapter qa=runs/qa/adapter "Write an ad"

One `--adapter DIR` is merged into the weights. Several (or any `NAME=DIR`) are loaded unmerged side by
side (Generator(adapters=...)): every prompt is answered by the base and by each adapter, all in the
same batches, and each result says which system (`base` or the adapter's name) wrote it.

Only parsing and printing live here; the model comes from `load_generator` (io.load.load_model),
the sampler from `sampling.from_settings`, and the decoding from `Generator.generate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from llama_e_jax.data.prompt import build_prompt
from llama_e_jax.data.schema import read_jsonl
from llama_e_jax.generate import sampling, speculative
from llama_e_jax.generate.constraints import ConstraintError
from llama_e_jax.generate.generator import load_generator
from llama_e_jax.generate.guided import Guide
from llama_e_jax.generate.kernels import GenerationError
from llama_e_jax.io.default_model import enable_compilation_cache
from llama_e_jax.model import quant

log = logging.getLogger(__name__)


def _prompts_from_args(args: argparse.Namespace, tokenizer: Any) -> list[tuple[str, str]]:
    """(id, prompt text) pairs: JSONL records or argument instructions through the Alpaca template,
    `--raw` prompts as given, `--chat` through the tokenizer's chat template."""
    if args.jsonl:
        # Any label set and no `aspects` needed: generation reads a shop's own files, not training data.
        records = read_jsonl(args.jsonl, label_sets={}, require_aspects=False)
        return [(record.id, build_prompt(record.instruction, record.input)) for record in records]
    if not args.prompts:
        raise GenerationError("give prompt(s) as arguments or --jsonl FILE")
    out = []
    for i, text in enumerate(args.prompts):
        if args.raw:
            prompt = text
        elif args.chat:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        else:
            prompt = build_prompt(text, args.input)
        out.append((str(i), prompt))
    return out


def _guide_from_args(args: argparse.Namespace) -> Guide | None:
    """The constraint of --choices / --regex (at most one), or None."""
    if args.choices is not None and args.regex is not None:
        raise GenerationError("give --choices or --regex, not both")
    if args.regex is not None:
        return Guide.regex(args.regex)
    if args.choices is None:
        return None
    if args.choices.lstrip().startswith("["):
        try:
            choices = json.loads(args.choices)
        except json.JSONDecodeError as error:
            raise GenerationError(f"--choices: not a JSON list: {error}") from None
    else:
        choices = args.choices.split("|")
    return Guide.choices(choices)


def _adapters_from_args(specs: Sequence[str]) -> tuple[str | None, dict[str, str] | None]:
    """(one adapter dir to merge, or None; name -> dir of several, or None) from the --adapter values."""
    if not specs:
        return None, None
    if len(specs) == 1 and "=" not in specs[0]:
        return specs[0], None
    several: dict[str, str] = {}
    for spec in specs:
        name, _, directory = spec.rpartition("=")
        name = name or directory.rstrip("/").split("/")[-1]
        if name in several or name == "base":
            raise GenerationError(f"--adapter {spec}: the name {name!r} is taken; give NAME=DIR")
        several[name] = directory
    return None, several


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama_e_jax.generate",
                                     description="KV-cache text generation with a LLaMA model (and LoRA adapter).")
    parser.add_argument("prompts", nargs="*", help="instructions (Alpaca template applied unless --raw / --chat)")
    parser.add_argument("--input", default="", help="the ### Input: text for argument instructions")
    parser.add_argument("--jsonl", help="instruction-schema JSONL file; each record's instruction+input is a prompt")
    parser.add_argument("--raw", action="store_true", help="use the prompts exactly as given")
    parser.add_argument("--chat", action="store_true", help="wrap the prompts in the model's chat template")
    parser.add_argument("--model", help="GGUF file or HF checkpoint dir (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="LoRA adapter directory (ours or PEFT); one plain DIR is merged into the weights; "
                             "repeat (NAME=DIR) to answer every prompt with the base and each adapter in one pass")
    parser.add_argument("--tokenizer", help="tokenizer dir or GGUF (default: from --model)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layer-loop", default="unroll", choices=("unroll", "scan"),
                        help="unroll: fastest decoding; scan: compiles faster (one-off runs of deep models)")
    parser.add_argument("--choices", help='every reply is exactly one of these: "A|B|C", or a JSON list '
                        '(\'["A", "B|C"]\') when a choice contains "|"')
    parser.add_argument("--regex", help="every reply matches this regex in full")
    parser.add_argument("--output", help="write JSONL results here instead of printing")
    speculative.add_arguments(parser)
    quant.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    enable_compilation_cache()
    try:
        sampler = sampling.from_settings(args.temperature, args.top_p, args.top_k)
        merged, several = _adapters_from_args(args.adapter)
        generator = load_generator(args.model, merged, adapters=several, dtype=args.dtype, tokenizer=args.tokenizer,
                                   max_batch_size=args.batch_size, layer_loop=args.layer_loop,
                                   speculation=speculative.from_arguments(args), weights=quant.from_arguments(args))
        systems = [None, *several] if several else [None]  # adapter name per system; None = base
        prompts = [(record_id, prompt, system) for record_id, prompt in _prompts_from_args(args, generator.tokenizer)
                   for system in systems]
        guide = _guide_from_args(args)
        constraint = None if guide is None else generator.guide(guide)
    except (GenerationError, ConstraintError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    completions = generator.generate([p for _, p, _ in prompts], args.max_new_tokens, sampler, args.stop, args.seed,
                                     constraints=[constraint] * len(prompts),
                                     **({"adapters": [a for _, _, a in prompts]} if several else {}))
    elapsed = time.perf_counter() - started
    total = sum(c.completion_tokens for c in completions)
    out = open(args.output, "w", encoding="utf-8") if args.output else None
    for (record_id, _, system), completion in zip(prompts, completions):
        label = {"system": system or "base"} if several else {}
        if out is not None:
            row = {"id": record_id, **label, **dataclasses.asdict(completion)}
            row.pop("token_ids")
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            by = f" [{label['system']}]" if several else ""
            print(f"--- {record_id}{by} ({completion.completion_tokens} tokens, {completion.finish_reason})")
            print(completion.text)
    if out is not None:
        out.close()
    log.info("%d sequences, %d tokens in %.1f s (%.1f tokens/s, compile included)", len(completions), total,
             elapsed, total / max(elapsed, 1e-9))
    return 0


if __name__ == "__main__":
    sys.exit(main())
