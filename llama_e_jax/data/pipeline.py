"""Training and evaluation input pipeline: records -> prompt -> tokens -> packed, host-sharded batches.

Steps, and why they are done this way:

1. **Tokenize once.** Each record becomes `[bos?] + encode(build_prompt(...)) + encode(output) + [eos]`.
   Prompt and response are encoded separately, as at inference time (where the prompt is encoded
   alone and the model continues it), so the loss mask boundary is exact. The whole split is
   tokenized up front (with `encode_batch` when the tokenizer has it) into one flat int32 array;
   LLaMA-E-sized data (~10^5 records) takes seconds and a few hundred MB at most.
2. **Truncate.** Examples longer than `seq_len` keep their first `seq_len` tokens (`stats.truncated`);
   an example whose response is cut off entirely would train nothing and is left out, counted in
   `stats.dropped_no_response` and logged.
3. **Plan an epoch.** The example order is a permutation drawn from `(seed, epoch)` (identity when
   not shuffling); examples are packed in that order into rows of `seq_len` tokens, first-fit over
   the last `PACK_WINDOW` open rows. The plan is a pure function of `(seed, epoch)`, so the iterator
   state is just `(epoch, row)`: `set_state` recomputes the plan and resumes exactly. (grain's
   packing transforms are experimental in 0.2.x and checkpoint their packing buffers; this
   design needs neither, and batch assembly is a few numpy slices, so no worker processes.)
4. **Shard across hosts.** Every host plans the *whole* split identically, takes global batches of
   `batch_size * process_count` rows and keeps rows `[process_index * batch_size, ...)`. Hosts thus
   see disjoint examples whose union is the split, and always the same number of batches (a host
   that ran out first would hang a collective). The last global batch of a finite run is padded with
   empty rows (segment 0, loss mask 0), so no example is ever dropped.

Batch layout (`dict[str, np.ndarray]`, B = `batch_size` rows per host, T = `seq_len`):
    input_ids   [B, T] int32    tokens; `pad_id` in padding
    targets     [B, T] int32    next token of the same segment; `pad_id` where there is none
    loss_mask   [B, T] float32  1 where the target is a response token (incl. its eos), else 0
    segment_ids [B, T] int32    1..n per packed example within the row; 0 = padding
    positions   [B, T] int32    0.. within each segment; 0 in padding
Rows only hold whole examples, consecutive segments never attend to each other when the model
masks attention by `segment_ids`, and the last token of a segment has loss mask 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from llama_e_jax.data.prompt import prompt_and_response
from llama_e_jax.data.schema import InstructionRecord

log = logging.getLogger(__name__)

PACK_WINDOW = 8  # open rows first-fit considers; more packs tighter but plans slower
STATE_VERSION = 1
Batch = dict[str, np.ndarray]


class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer (llama_e_jax.io.tokenizer provides it).

    `encode` adds no special tokens; the pipeline prepends `bos_id` when `add_bos` and appends
    `eos_id`. An optional `encode_batch(list[str]) -> list[list[int]]` is used when present.
    """

    bos_id: int | None
    eos_id: int
    pad_id: int | None  # None: padding uses eos_id (padding is masked out anyway)
    add_bos: bool

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    seq_len: int = 2048  # tokens per packed row
    batch_size: int = 8  # rows per batch, per host
    seed: int = 0  # shuffle seed; epoch e uses the permutation drawn from (seed, e)
    shuffle: bool = True  # shuffle example order every epoch
    num_epochs: int | None = 1  # None repeats forever

    def __post_init__(self):
        if self.seq_len < 2 or self.batch_size < 1:
            raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {self}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")


@dataclasses.dataclass
class TokenizeStats:
    examples: int = 0  # records tokenized
    truncated: int = 0  # longer than seq_len, cut to seq_len
    dropped_no_response: int = 0  # prompt alone fills seq_len: left out (nothing to learn)
    tokens: int = 0  # tokens kept, after truncation


# ------------------------------------------------------------------------------------ tokenize


def _read_all(records: Sequence[InstructionRecord], chunk: int = 4096) -> list[InstructionRecord]:
    """All records; in chunks through `__getitems__` when the source has it (array_record reads
    a batch of keys far faster than one key at a time)."""
    get_many = getattr(records, "__getitems__", None)
    if get_many is None:
        return list(records)
    n = len(records)
    return [r for start in range(0, n, chunk) for r in get_many(range(start, min(start + chunk, n)))]


def _encode_all(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    encode_batch = getattr(tokenizer, "encode_batch", None)
    if encode_batch is not None:
        return list(encode_batch(texts))
    return [tokenizer.encode(t) for t in texts]


@dataclasses.dataclass
class TokenizedSplit:
    """All examples of a split as one flat token array (CSR layout).

    Example i is `tokens[offsets[i]:offsets[i + 1]]`; its first `prompt_lens[i]` tokens (bos +
    prompt) are not trained on. `record_index[i]` is the example's index in the source split.
    """

    tokens: np.ndarray  # [total] int32
    offsets: np.ndarray  # [N + 1] int64
    prompt_lens: np.ndarray  # [N] int32
    record_index: np.ndarray  # [N] int64
    seq_len: int
    pad_id: int
    stats: TokenizeStats

    @property
    def lengths(self) -> np.ndarray:  # [N]
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def fingerprint(self) -> str:
        """Changes when the data, the tokenizer or seq_len change (guards `set_state`)."""
        h = hashlib.sha256(self.tokens.tobytes())
        h.update(self.offsets.tobytes() + self.prompt_lens.tobytes())
        return h.hexdigest()[:16]


def tokenize_split(
    records: Sequence[InstructionRecord], tokenizer: Tokenizer, seq_len: int
) -> TokenizedSplit:
    """Template, tokenize and truncate every record (see the module docstring, steps 1-2)."""
    pairs = [prompt_and_response(r) for r in _read_all(records)]
    prompts = _encode_all(tokenizer, [p for p, _ in pairs])
    responses = _encode_all(tokenizer, [r for _, r in pairs])
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    stats = TokenizeStats(examples=len(pairs))
    pieces, prompt_lens, kept = [], [], []
    for i, (prompt_ids, response_ids) in enumerate(zip(prompts, responses)):
        prompt_ids = bos + list(prompt_ids)
        ids = prompt_ids + list(response_ids) + [tokenizer.eos_id]
        if len(prompt_ids) >= seq_len:
            stats.dropped_no_response += 1
            continue
        if len(ids) > seq_len:
            stats.truncated += 1
            ids = ids[:seq_len]
        pieces.append(np.asarray(ids, np.int32))
        prompt_lens.append(len(prompt_ids))
        kept.append(i)
    if stats.truncated or stats.dropped_no_response:
        log.warning(
            "tokenize_split: %d of %d examples truncated to %d tokens, %d left out (prompt alone "
            "fills seq_len)", stats.truncated, stats.examples, seq_len, stats.dropped_no_response,
        )
    if not pieces:
        raise ValueError(f"no trainable examples among {len(pairs)} records at seq_len={seq_len}")
    offsets = np.zeros(len(pieces) + 1, np.int64)
    np.cumsum([len(p) for p in pieces], out=offsets[1:])
    tokens = np.concatenate(pieces)
    stats.tokens = len(tokens)
    return TokenizedSplit(
        tokens=tokens,
        offsets=offsets,
        prompt_lens=np.asarray(prompt_lens, np.int32),
        record_index=np.asarray(kept, np.int64),
        seq_len=seq_len,
        pad_id=tokenizer.eos_id if tokenizer.pad_id is None else tokenizer.pad_id,
        stats=stats,
    )


# ----------------------------------------------------------------------------------------- pack


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Example order of one epoch: a permutation drawn from (seed, epoch), or identity."""
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def pack_rows(order: np.ndarray, lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """Pack examples (in `order`) into rows of <= seq_len tokens; rows in creation order.

    First fit over the last PACK_WINDOW rows keeps the shuffled order roughly intact while
    filling rows better than next-fit.
    """
    rows: list[list[int]] = []
    free: list[int] = []  # free tokens per row
    for example in order.tolist():
        need = int(lengths[example])
        first_open = max(0, len(rows) - PACK_WINDOW)
        for r in range(first_open, len(rows)):
            if free[r] >= need:
                rows[r].append(example)
                free[r] -= need
                break
        else:
            rows.append([example])
            free.append(seq_len - need)
    return rows


def assemble_batch(split: TokenizedSplit, rows: Sequence[Sequence[int]], batch_size: int) -> Batch:
    """Fill `batch_size` rows (missing rows stay empty padding); layout in the module docstring."""
    shape = (batch_size, split.seq_len)
    input_ids = np.full(shape, split.pad_id, np.int32)
    targets = np.full(shape, split.pad_id, np.int32)
    loss_mask = np.zeros(shape, np.float32)
    segment_ids = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    for b, row in enumerate(rows):
        start = 0
        for segment, example in enumerate(row, start=1):
            ids = split.tokens[split.offsets[example] : split.offsets[example + 1]]
            end = start + len(ids)
            input_ids[b, start:end] = ids
            targets[b, start : end - 1] = ids[1:]
            loss_mask[b, start + split.prompt_lens[example] - 1 : end - 1] = 1.0
            segment_ids[b, start:end] = segment
            positions[b, start:end] = np.arange(len(ids))
            start = end
    return dict(
        input_ids=input_ids,
        targets=targets,
        loss_mask=loss_mask,
        segment_ids=segment_ids,
        positions=positions,
    )


# ------------------------------------------------------------------------------------- iterate


class PackedBatchIterator(Iterator[Batch]):
    """Packed, host-sharded batches over a tokenized split; checkpointable with get/set_state.

    The position is `(epoch, row)`: the next global batch starts at row `row` of epoch `epoch`'s
    plan and may continue into the next epoch's plan (rows are never wasted at epoch ends).
    """

    def __init__(
        self,
        split: TokenizedSplit,
        config: PipelineConfig,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if split.seq_len != config.seq_len:
            raise ValueError(f"split tokenized for seq_len={split.seq_len}, config has {config.seq_len}")
        if process_index is None or process_count is None:
            import jax  # deferred: only the multi-host default needs it

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.split, self.config = split, config
        self.process_index, self.process_count = process_index, process_count
        self._epoch, self._row, self._batches = 0, 0, 0
        self._plans: dict[int, list[list[int]]] = {}

    # -- planning
    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            order = epoch_order(len(self.split), self.config.seed, epoch, self.config.shuffle)
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = pack_rows(order, self.split.lengths, self.config.seq_len)
        return self._plans[epoch]

    def _finished(self, epoch: int) -> bool:
        return self.config.num_epochs is not None and epoch >= self.config.num_epochs

    def _take_global_rows(self) -> list[list[int]]:
        """Up to batch_size * process_count rows from the current position; advances it."""
        wanted = self.config.batch_size * self.process_count
        taken: list[list[int]] = []
        while len(taken) < wanted and not self._finished(self._epoch):
            plan = self._plan(self._epoch)
            chunk = plan[self._row : self._row + wanted - len(taken)]
            taken += chunk
            self._row += len(chunk)
            if self._row >= len(plan):
                self._epoch, self._row = self._epoch + 1, 0
        return taken

    # -- iteration
    def __next__(self) -> Batch:
        global_rows = self._take_global_rows()
        if not global_rows:
            raise StopIteration
        self._batches += 1
        first = self.process_index * self.config.batch_size
        host_rows = global_rows[first : first + self.config.batch_size]
        return assemble_batch(self.split, host_rows, self.config.batch_size)

    # -- checkpointing
    def _identity(self) -> dict[str, Any]:
        c = self.config
        return dict(
            version=STATE_VERSION,
            data=self.split.fingerprint(),
            seq_len=c.seq_len,
            batch_size=c.batch_size,
            seed=c.seed,
            shuffle=c.shuffle,
            process_count=self.process_count,
        )

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position; `set_state` on an equal pipeline continues exactly here."""
        return dict(self._identity(), epoch=self._epoch, row=self._row, batches=self._batches)

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume from `get_state()`; the data, tokenizer and batch layout must be unchanged."""
        mismatched = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if mismatched:
            raise ValueError(f"pipeline state does not match this pipeline (saved, current): {mismatched}")
        self._epoch, self._row, self._batches = int(state["epoch"]), int(state["row"]), int(state["batches"])

    def batches_per_epoch(self) -> int:
        """Batches in one epoch (from epoch 0's plan; other epochs differ by a row or two at most
        because packing depends on the order). For sizing learning-rate schedules."""
        rows = len(self._plan(0))
        return -(-rows // (self.config.batch_size * self.process_count))

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_emitted(self) -> int:
        return self._batches


# ----------------------------------------------------------------------------------- factories


def make_train_iterator(
    records: Sequence[InstructionRecord] | TokenizedSplit,
    tokenizer: Tokenizer | None,
    config: PipelineConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> PackedBatchIterator:
    """Training batches: shuffled per epoch, repeated `config.num_epochs` times (None = forever)."""
    if isinstance(records, TokenizedSplit):
        split = records
    elif tokenizer is None:
        raise ValueError("a tokenizer is needed unless records is an already TokenizedSplit")
    else:
        split = tokenize_split(records, tokenizer, config.seq_len)
    return PackedBatchIterator(split, config, process_index=process_index, process_count=process_count)


def make_eval_iterator(
    records: Sequence[InstructionRecord] | TokenizedSplit,
    tokenizer: Tokenizer | None,
    *,
    seq_len: int,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> PackedBatchIterator:
    """Evaluation batches: one pass, every example exactly once across hosts, unshuffled (packing
    may still place a later example into an earlier row).

    The last batch is padded with empty rows; their `segment_ids` and `loss_mask` are all 0.
    """
    config = PipelineConfig(seq_len=seq_len, batch_size=batch_size, shuffle=False, num_epochs=1)
    return make_train_iterator(
        records, tokenizer, config, process_index=process_index, process_count=process_count
    )


def packing_efficiency(batch: Batch) -> float:
    """Fraction of the batch's token slots that hold example tokens (not padding)."""
    return float(np.mean(batch["segment_ids"] > 0))
