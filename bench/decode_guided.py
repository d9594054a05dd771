"""What guided decoding costs the decode loop: batch 16, half the rows under the product schema, vs none.

    python bench/decode_guided.py                     # markdown line for docs/benchmarks.md
    python bench/decode_guided.py --rows 16 --steps 32 --repeats 5

Workload: SmolLM2-135M-Instruct (the embedded default model, fp32), greedy, one session of `rows`
rows. Both modes run in the same process, alternating, on the same prompts:

* `free`: no row constrained (the masking and the automaton step are skipped by `lax.cond`);
* `guided`: every other row follows the issue's product schema (~940-state automaton: an enum, a
  number, a maxLength-80 string and an array of up to 3 strings), the others decode freely.

Measured: decode steps only, one token per step (speculative decoding off, so that a step is a
step in both modes). Each repeat admits the rows (prefill, not timed), then times one chunk of
`steps` decode steps. A chunk's cost does not depend on how many rows are still active (finished
rows still go through the model), so tokens/s = rows x steps / wall time of that chunk; the
constrained rows still running at the end of the chunk are reported, since a row that ended drops
its masking (the figure is meaningful only if they ran the whole chunk). The median over repeats is
reported, with the 1-minute load average (the machine may be shared: read ratios, not absolutes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.decode_cpu import prompts  # noqa: E402  (sys.path first; sets XLA_FLAGS before JAX starts)
import jax  # noqa: E402
from llama_e_jax.generate import sampling, speculative  # noqa: E402
from llama_e_jax.generate.generator import Generator, load_generator  # noqa: E402
from llama_e_jax.generate.guided import Guide  # noqa: E402
from llama_e_jax.generate.session import Request  # noqa: E402

PRODUCT_SCHEMA = {  # the measured schema (tests/test_constraints.py PRODUCT_SCHEMA)
    "type": "object",
    "properties": {
        "category": {"enum": ["Electronics", "Home & Kitchen", "Toys", "Beauty"]},
        "price": {"type": "number"},
        "title": {"type": "string", "maxLength": 80},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["category", "price", "title", "tags"],
}


def timed_chunk(generator: Generator, rows: int, steps: int, constraint) -> tuple[float, int]:
    """(seconds of the first decode chunk after prefill, constrained rows still active after it)."""
    session = generator.session(sampling.Greedy(), rows, 512, steps)
    texts = prompts(rows)
    requests = [Request(generator.encode_prompt(text), 2 * steps, sampling.Greedy(),
                        constraint=constraint if constraint is not None and i % 2 == 0 else None)
                for i, text in enumerate(texts)]
    for request in requests:
        session.submit(request)
    session._admit()  # admission and prefill (not timed); step() then finds nothing to admit
    jax.block_until_ready(session.state)
    started = time.perf_counter()
    session.step()
    elapsed = time.perf_counter() - started  # step() fetches the tokens: the chunk has finished
    running = sum(1 for r in requests if r.constraint is not None and not r.done)
    return elapsed, running


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    generator = load_generator(None, max_batch_size=args.rows, max_length=512, chunk_size=args.steps,
                               speculation=speculative.OFF)
    started = time.perf_counter()
    automaton = generator.guide(Guide.json_schema(PRODUCT_SCHEMA))
    print(f"product schema: {automaton.num_states} states, {automaton.num_classes} token classes, "
          f"{automaton.nbytes / 2**20:.1f} MiB, compiled in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    modes = {"free": None, "guided": automaton}
    for constraint in modes.values():  # compile both
        timed_chunk(generator, args.rows, args.steps, constraint)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    still_running = []
    for _ in range(args.repeats):
        for mode, constraint in modes.items():
            elapsed, running = timed_chunk(generator, args.rows, args.steps, constraint)
            times[mode].append(elapsed)
            if constraint is not None:
                still_running.append(running)
    rate = {mode: args.rows * args.steps / statistics.median(t) for mode, t in times.items()}
    load = os.getloadavg()[0]
    print(f"| batch {args.rows}, {args.rows // 2} rows under the {automaton.num_states}-state product schema | "
          f"{rate['free']:.0f} | {rate['guided']:.0f} | {rate['guided'] / rate['free']:.2f}x | "
          f"{min(still_running)}-{max(still_running)} of {args.rows // 2} | {load:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
