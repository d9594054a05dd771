"""tfds dataset round trip and splits; packed batches: exact text, loss mask, host shards, exact resume."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llama_e_jax.data import tfds_builder
from llama_e_jax.data.labels import LABEL_SETS
from llama_e_jax.data.pipeline import (
    PipelineConfig,
    epoch_order,
    make_eval_iterator,
    make_train_iterator,
    tokenize_split,
)
from llama_e_jax.data.prompt import build_prompt, prompt_and_response
from llama_e_jax.train import recipe
from llama_e_jax.data.schema import TASKS, InstructionRecord, RecordError, read_jsonl, write_jsonl

WORDS = "trail boots leather ünï waterproof ✓ gift sale fast 42 ounce red blue, new!".split()


def make_records(task: str, count: int, *, source: str = "seed", start: int = 0) -> list[InstructionRecord]:
    rng = random.Random(f"{task}-{source}-{start}")
    records = []
    for i in range(start, start + count):
        text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
        options = output = None
        if task in LABEL_SETS:
            options = tuple(rng.sample(LABEL_SETS[task], 4))
            output = options[i % 4]
        records.append(
            InstructionRecord(
                id=f"{task}-{source}-{i}", task=task, instruction=f"Task {task}: {text(3)}",
                input="" if i % 3 == 0 else f"{text(rng.randint(1, 25))}\nline two",
                output=output or text(rng.randint(1, 30)), aspects=("seller", "customer")[: 1 + i % 2],
                source=source, options=options,
            )
        )
    return records


class ByteBpeTokenizer:
    """A tiny byte-level BPE behind the pipeline's tokenizer interface (decode is exact)."""

    def __init__(self, corpus: list[str], *, add_bos: bool = True):
        self._tok = Tokenizer(models.BPE())
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        self._tok.train_from_iterator(corpus, trainer)
        self.pad_id, self.bos_id, self.eos_id, self.add_bos = 0, 1, 2, add_bos

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


@pytest.fixture(scope="module")
def seed_records() -> list[InstructionRecord]:
    return [r for task in TASKS for r in make_records(task, 12)]


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory, seed_records):
    directory = tmp_path_factory.mktemp("seeds")
    for task in TASKS:
        write_jsonl(directory / f"{task}.jsonl", [r for r in seed_records if r.task == task])
    return directory


@pytest.fixture(scope="module")
def built(tmp_path_factory, seed_dir):
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds_builder.build_dataset("seed", data_dir, seed_dir=seed_dir)
    return data_dir


@pytest.fixture(scope="module")
def tokenizer(seed_records) -> ByteBpeTokenizer:
    return ByteBpeTokenizer(["".join(prompt_and_response(r)) for r in seed_records])


def split_ids(data_dir, config="seed") -> dict[str, list[str]]:
    return {s: [r.id for r in tfds_builder.load_split(s, config, data_dir)] for s in tfds_builder.SPLITS}


# ------------------------------------------------------------------------------------------ tfds


def test_tfds_round_trips_records_exactly(built, seed_records):
    loaded = [r for s in tfds_builder.SPLITS for r in tfds_builder.load_split(s, "seed", built)]
    assert sorted(loaded, key=lambda r: r.id) == sorted(seed_records, key=lambda r: r.id)
    assert any(r.options for r in loaded) and any(r.options is None for r in loaded)


def test_splits_are_disjoint_deterministic_and_hold_every_task(built, seed_dir, tmp_path):
    ids = split_ids(built)
    assert sum(len(v) for v in ids.values()) == 60
    assert not set(ids["train"]) & set(ids["validation"]) and not set(ids["train"]) & set(ids["test"])
    assert not set(ids["validation"]) & set(ids["test"])
    for split in ("validation", "test"):
        assert {i.rsplit("-seed-", 1)[0] for i in ids[split]} == set(TASKS), split
    tfds_builder.build_dataset("seed", tmp_path, seed_dir=seed_dir)
    assert split_ids(tmp_path) == ids  # same records -> same splits, same order


def test_split_of_a_record_does_not_depend_on_other_records():
    many = [r for task in TASKS for r in make_records(task, 400)]
    splits = tfds_builder.assign_splits(many)
    fractions = {s: len(v) / len(many) for s, v in splits.items()}
    # Hashed ids split like coin flips: over 2000 records sd(train) = sqrt(.9 x .1 / 2000) = 0.0067 and
    # sd(test) = 0.0049, so +-0.04 and +-0.02 are 6 and 4 sd (and the hash is the same on every machine).
    assert 0.86 < fractions["train"] < 0.94 and 0.03 < fractions["test"] < 0.07
    subset = many[::2]
    sub_splits = tfds_builder.assign_splits(subset)
    for split, records in sub_splits.items():  # big tasks: the hash alone decides
        assert set(r.id for r in records) <= set(r.id for r in splits[split])


def test_seed_expanded_adds_extra_files(tmp_path, seed_dir, seed_records):
    extra = tmp_path / "expanded" / "ads.jsonl"
    write_jsonl(extra, make_records("ads_generation", 5, source="expanded:teacher"))
    data_dir = tmp_path / "tfds"
    builder = tfds_builder.build_dataset(
        "seed_expanded", data_dir, seed_dir=seed_dir, extra_files=[extra.parent]
    )
    assert builder.info.metadata["input_files"][-1] == "ads.jsonl"
    ids = [i for v in split_ids(data_dir, "seed_expanded").values() for i in v]
    assert len(ids) == 65 and sum("expanded" in i for i in ids) == 5
    with pytest.raises(ValueError, match="needs extra_files"):
        tfds_builder.build_dataset("seed_expanded", data_dir, seed_dir=seed_dir)
    with pytest.raises(ValueError, match="takes no extra_files"):
        tfds_builder.build_dataset("seed", data_dir, seed_dir=seed_dir, extra_files=[extra])


def test_changed_inputs_rebuild_and_invalid_lines_name_file_and_line(tmp_path, seed_records):
    seeds = tmp_path / "seeds"
    for task in TASKS:
        write_jsonl(seeds / f"{task}.jsonl", [r for r in seed_records if r.task == task])
    data_dir = tmp_path / "tfds"
    tfds_builder.build_dataset("seed", data_dir, seed_dir=seeds)
    qa = seeds / "general_qa.jsonl"
    with qa.open("a") as f:
        f.write(json.dumps({**seed_records[0].to_json(), "id": "new-1", "task": "haiku"}) + "\n")
    with pytest.raises(RecordError, match=rf"{qa}:13: task: unknown task"):
        tfds_builder.build_dataset("seed", data_dir, seed_dir=seeds)
    builder = tfds_builder.build_dataset("seed", data_dir, seed_dir=seeds, skip_invalid=True)
    assert builder.info.metadata["invalid_skipped"] == {str(qa): {"task: unknown task": 1}}
    write_jsonl(qa, make_records("general_qa", 13))  # a valid change is picked up, not the stale data
    tfds_builder.build_dataset("seed", data_dir, seed_dir=seeds)
    assert sum(len(v) for v in split_ids(data_dir).values()) == 61


def test_load_split_before_build_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_dataset"):
        tfds_builder.load_split("train", "seed", tmp_path)


# -------------------------------------------------------------------------------------- pipeline


def segments(batch, row):
    """(start, end) of each segment of one row."""
    seg = batch["segment_ids"][row]
    starts = [int(np.argmax(seg == s)) for s in range(1, seg.max() + 1)]
    return [(start, start + int(np.sum(seg == s))) for s, start in enumerate(starts, start=1)]


def decoded_examples(batches, tokenizer) -> list[tuple[str, str]]:
    """(full text, response text) of every packed segment, checking the layout along the way."""
    out = []
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            for start, end in segments(batch, row):
                ids = batch["input_ids"][row, start:end]
                assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
                assert list(batch["positions"][row, start:end]) == list(range(end - start))
                assert list(batch["targets"][row, start : end - 1]) == list(ids[1:])
                mask = batch["loss_mask"][row, start:end]
                assert mask[-1] == 0  # the last token of a segment predicts nothing
                response = batch["targets"][row, start:end][mask == 1]
                assert response[-1] == tokenizer.eos_id
                out.append((tokenizer.decode(ids[1:-1]), tokenizer.decode(response[:-1])))
            tail = batch["segment_ids"][row] == 0
            assert not batch["loss_mask"][row][tail].any()
            assert (batch["input_ids"][row][tail] == tokenizer.pad_id).all()
    return out


def expected_examples(records) -> list[tuple[str, str]]:
    return [(p + r, r) for p, r in map(prompt_and_response, records)]


def test_batches_decode_to_prompt_plus_response_with_mask_on_response(seed_records, tokenizer):
    config = PipelineConfig(seq_len=256, batch_size=4, seed=3, num_epochs=1)
    batches = list(make_train_iterator(seed_records, tokenizer, config, process_index=0, process_count=1))
    for batch in batches:
        assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
            "input_ids": ((4, 256), "int32"), "targets": ((4, 256), "int32"),
            "loss_mask": ((4, 256), "float32"), "segment_ids": ((4, 256), "int32"),
            "positions": ((4, 256), "int32"),
        }
    assert sorted(decoded_examples(batches, tokenizer)) == sorted(expected_examples(seed_records))
    assert max(b["segment_ids"].max() for b in batches) > 1  # rows really are packed


def test_over_long_examples_are_truncated_and_counted(seed_records, tokenizer):
    long = InstructionRecord(
        id="long", task="general_qa", instruction="Explain.", input="", output="word " * 300,
        aspects=("customer",), source="seed",
    )
    split = tokenize_split([*seed_records[:5], long], tokenizer, seq_len=256)
    assert (split.stats.examples, split.stats.truncated, split.stats.dropped_no_response) == (6, 1, 0)
    assert split.lengths.max() == 256
    hopeless = InstructionRecord(**{**long.__dict__, "instruction": "Explain " * 400, "output": "ok"})
    split = tokenize_split([*seed_records[:5], hopeless], tokenizer, seq_len=256)
    assert split.stats.dropped_no_response == 1 and len(split) == 5


def test_two_hosts_see_disjoint_shards_covering_the_split(seed_records, tokenizer):
    config = PipelineConfig(seq_len=192, batch_size=2, seed=0, num_epochs=1)
    iterators = [
        make_train_iterator(seed_records, tokenizer, config, process_index=i, process_count=2)
        for i in range(2)
    ]
    expected_batches = iterators[0].batches_per_epoch()
    per_host = [list(it) for it in iterators]
    assert len(per_host[0]) == len(per_host[1]) == expected_batches  # unequal counts would hang a collective
    host_examples = [decoded_examples(b, tokenizer) for b in per_host]
    assert not set(host_examples[0]) & set(host_examples[1])
    assert sorted(host_examples[0] + host_examples[1]) == sorted(expected_examples(seed_records))


def test_get_state_set_state_resumes_exactly(seed_records, tokenizer):
    config = PipelineConfig(seq_len=256, batch_size=3, seed=7, num_epochs=None)
    reference = make_train_iterator(seed_records, tokenizer, config, process_index=1, process_count=2)
    batches = [next(reference) for _ in range(14)]  # ~4 batches per epoch: crosses epoch ends
    assert reference.epoch >= 2

    interrupted = make_train_iterator(seed_records, tokenizer, config, process_index=1, process_count=2)
    for _ in range(4):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.get_state()))
    resumed = make_train_iterator(seed_records, tokenizer, config, process_index=1, process_count=2)
    resumed.set_state(state)
    for expected in batches[4:]:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_epochs_are_reshuffled_and_seeded(seed_records, tokenizer):
    def first_rows(seed, n):
        config = PipelineConfig(seq_len=128, batch_size=12, seed=seed, num_epochs=None)
        it = make_train_iterator(seed_records, tokenizer, config, process_index=0, process_count=1)
        return [next(it)["input_ids"] for _ in range(n)]

    a, b = first_rows(0, 6), first_rows(0, 6)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not (first_rows(1, 1)[0] == a[0]).all()
    orders = [epoch_order(60, seed=0, epoch=e, shuffle=True) for e in range(3)]
    assert all(sorted(o) == list(range(60)) for o in orders)
    assert len({tuple(o) for o in orders}) == 3  # a new order every epoch
    assert list(epoch_order(60, seed=0, epoch=2, shuffle=False)) == list(range(60))


def test_set_state_rejects_a_different_pipeline(seed_records, tokenizer):
    config = PipelineConfig(seq_len=128, batch_size=2, seed=0)
    state = make_train_iterator(seed_records, tokenizer, config, process_index=0, process_count=1).get_state()
    other = make_train_iterator(seed_records[1:], tokenizer, config, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="does not match"):
        other.set_state(state)


def test_eval_iterator_is_one_ordered_pass_with_padded_last_batch(seed_records, tokenizer):
    records = seed_records[:23]
    it = make_eval_iterator(records, tokenizer, seq_len=256, batch_size=4, process_index=0, process_count=1)
    batches = list(it)
    assert sorted(decoded_examples(batches, tokenizer)) == sorted(expected_examples(records))  # each once
    last = batches[-1]
    empty_rows = ~(last["segment_ids"] > 0).any(axis=1)
    assert empty_rows.any() and not last["loss_mask"][empty_rows].any()
    assert next(it, None) is None


def test_pipeline_reads_the_tfds_source(built, tokenizer):
    source = tfds_builder.load_split("validation", "seed", built)
    it = make_eval_iterator(source, tokenizer, seq_len=256, batch_size=2, process_index=0, process_count=1)
    batches = list(it)
    texts = decoded_examples(batches, tokenizer)
    assert sorted(texts) == sorted(expected_examples([source[i] for i in range(len(source))]))
    assert texts[0][0].startswith(build_prompt(source[0].instruction, source[0].input))


# ------------------------------------------------------------------ the default mix and the import recipes


def test_default_recipe_builds_the_seed_mix_with_the_mix_only_in_train(tmp_path):
    """configs/default.py trains on `seed_mix`: seeds + data_prep/mix, whose records are all train."""
    config = recipe.load_config_file("default")
    assert config.data.tfds_config == "seed_mix" and not config.data.files
    builder = tfds_builder.build_dataset(config.data.tfds_config, tmp_path)
    mix_files = sorted(tfds_builder.DEFAULT_MIX_DIR.glob("*.jsonl"))
    mix = {r.id for path in mix_files for r in read_jsonl(path)}
    assert mix and all(tfds_builder.fixed_split_of(p) == "train" for p in mix_files)
    splits = {s: {r.id for r in tfds_builder.load_split(s, "seed_mix", tmp_path).read_all()} for s in tfds_builder.SPLITS}
    assert mix <= splits["train"] and not mix & (splits["validation"] | splits["test"])
    label_sets = builder.info.metadata["label_sets"]
    intent_file = next(f for f in label_sets if f.endswith("intentionqa.train.jsonl"))
    assert label_sets[intent_file]["intent_speculation"] is None  # declared open beside the file
    seed_file = next(f for f in label_sets if f.endswith("product_classification.jsonl"))
    assert label_sets[seed_file]["product_classification"] == list(LABEL_SETS["product_classification"])
    intents = [r for r in tfds_builder.load_split("train", "seed_mix", tmp_path).read_all()
               if r.id.startswith("intentionqa-")]
    assert len({r.options for r in intents}) > 0.9 * len(intents)  # a different label set per record
    positions = [r.options.index(r.output) for r in intents]
    assert max(positions.count(k) for k in set(positions)) < 0.4 * len(positions)  # gold position shuffled


@pytest.mark.parametrize("name", ["imported_cpu", "imported_accel"])
def test_import_recipes_only_change_values_of_the_default_schema(name):
    config, schema = recipe.load_config_file(name), recipe.load_config_file("default")

    def leaves(node, prefix=""):
        return {k for key, value in node.items()
                for k in (leaves(value, f"{prefix}{key}.") if hasattr(value, "items") else {prefix + key})}

    assert leaves(config) == leaves(schema) and config.data.tfds_config == "imported"


def test_imported_config_without_the_import_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_E_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match="python -m data_prep.importers"):
        tfds_builder.build_dataset("imported", tmp_path)
