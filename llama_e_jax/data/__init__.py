"""Instruction data: the record schema, the prompt template, the tfds dataset and the input pipeline.

`schema` and `prompt` are imported here because every stage needs them and they are cheap. The tfds
builder (`llama_e_jax.data.tfds_builder`) and the training pipeline (`llama_e_jax.data.pipeline`) are
imported explicitly by their users, since importing tensorflow_datasets takes seconds.
"""

from llama_e_jax.data.prompt import build_prompt, prompt_and_response
from llama_e_jax.data.schema import (
    ASPECTS,
    TASKS,
    InstructionRecord,
    InvalidRecordsError,
    ReadReport,
    RecordError,
    parse_record,
    read_jsonl,
    read_jsonl_files,
    write_jsonl,
)

__all__ = [
    "ASPECTS",
    "TASKS",
    "InstructionRecord",
    "InvalidRecordsError",
    "ReadReport",
    "RecordError",
    "build_prompt",
    "parse_record",
    "prompt_and_response",
    "read_jsonl",
    "read_jsonl_files",
    "write_jsonl",
]
