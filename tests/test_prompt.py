"""The Alpaca prompt must be byte-for-byte the template LLaMA-E was tuned with."""

from __future__ import annotations

from llama_e_jax.data.prompt import build_prompt, prompt_and_response
from llama_e_jax.data.schema import InstructionRecord

WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nRewrite the title.\n\n### Input:\nnike shoe RED sz 10\n\n### Response:\n"
)
WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nWhat is a SKU?\n\n### Response:\n"
)


def test_prompt_with_input():
    assert build_prompt("Rewrite the title.", "nike shoe RED sz 10") == WITH_INPUT


def test_prompt_without_input_for_empty_or_blank_input():
    assert build_prompt("What is a SKU?") == WITHOUT_INPUT
    assert build_prompt("What is a SKU?", "") == WITHOUT_INPUT
    assert build_prompt("What is a SKU?", " \n\t") == WITHOUT_INPUT


def test_text_is_inserted_verbatim():
    # Braces and surrounding whitespace in user text must survive (no second .format pass, no strip).
    prompt = build_prompt("  Say {x} ", "{input} \n")
    assert "### Instruction:\n  Say {x} \n\n### Input:\n{input} \n\n\n### Response:\n" in prompt


def test_prompt_and_response_uses_the_record_output():
    record = InstructionRecord(
        id="t-1", task="title_rewriting", instruction="Rewrite the title.", input="nike shoe RED sz 10",
        output="Nike Running Shoe, Red, Size 10", aspects=("seller",), source="seed",
    )
    assert prompt_and_response(record) == (WITH_INPUT, "Nike Running Shoe, Red, Size 10")
