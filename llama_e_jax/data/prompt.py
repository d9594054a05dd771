"""The Alpaca prompt template LLaMA-E was tuned with, in one function.

Training, evaluation, generation and serving must build exactly the same prompt: a one-character
difference between the text the adapter was tuned on and the text it is asked at inference shows
up as a quiet drop in quality, not as an error. So every caller goes through `build_prompt`.

The model is trained to continue the prompt with the response (the record's `output`) followed by
the tokenizer's end-of-sequence token; the prompt itself ends with "### Response:\\n".
"""

from __future__ import annotations

from llama_e_jax.data.schema import InstructionRecord

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def build_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 (the record's field name)
    """The Alpaca prompt; an empty or whitespace-only `input` selects the no-input variant."""
    if input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_WITHOUT_INPUT.format(instruction=instruction)


def prompt_and_response(record: InstructionRecord) -> tuple[str, str]:
    """(prompt, response) for training: the response is the record's `output`, without eos."""
    return build_prompt(record.instruction, record.input), record.output
