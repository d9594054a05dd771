"""The prompts sent to the teacher model, and the parsing of its JSON replies.

LLaMA-E expanded a small, hand-written seed set with a teacher (GPT-3.5) in two ways, and this module
keeps that split explicit:

* **rewrite-only tasks** (`product_classification`, `intent_speculation`): the teacher only rephrases
  the instruction. Input, label and options stay the seed's, so a teacher can never invent a label
  outside the closed set, and the expanded data teaches robustness to how the question is asked.
* **generative tasks** (`ads_generation`, `title_rewriting`, `general_qa`): the teacher writes a new
  example of the same task (a rephrased instruction, a new input) together with the response.

Every prompt asks for one JSON object with a fixed set of keys and shows that object's shape on one
line (`{"instruction": "...", ...}`), so that a reply can be checked mechanically and a test server
can tell which keys to produce. The seed's fields sit between `<instruction>`-style tags: that keeps
multi-line inputs unambiguous for the teacher (and for the fake server in the tests).

The variant index `k` picks a style hint from `STYLE_HINTS`, so the variants of one seed differ even
with a low sampling temperature or a teacher that is deterministic for a given prompt.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llama_e_jax.data.labels import LABEL_SETS
from llama_e_jax.data.schema import InstructionRecord

REWRITE_ONLY_TASKS: tuple[str, ...] = tuple(LABEL_SETS)  # product_classification, intent_speculation

TASK_DESCRIPTIONS: dict[str, str] = {
    "ads_generation": "write a short, persuasive advertisement for a product from its details",
    "title_rewriting": "rewrite a product title so that it is clear, accurate and easy to search for",
    "product_classification": "assign a product to exactly one category from a fixed list",
    "intent_speculation": "infer from a customer's purchases the most likely reason they bought them, "
    "choosing one intent from a fixed list",
    "general_qa": "answer a question about online shopping or running an online shop",
}

STYLE_HINTS: tuple[str, ...] = (
    "Use plain, direct wording.",
    "Phrase it as a question.",
    "Make it noticeably shorter than the original.",
    "Add one sentence of context about who is asking and why.",
    "Use a polite, formal tone.",
    "Use a casual, friendly tone.",
    "Start with a verb in the imperative.",
    "Mention the format the answer should take.",
)

SYSTEM_PROMPT = (
    "You are an expert e-commerce copywriter and data annotator who writes training examples for an "
    "instruction-following model. You always answer with a single JSON object and nothing else."
)

_FULL_KEYS = ("instruction", "input", "output")
_REWRITE_KEYS = ("instruction",)


class TeacherReplyError(ValueError):
    """The teacher's reply is not the JSON object that was asked for; `cause` names the kind."""

    def __init__(self, cause: str, message: str):
        self.cause = cause
        super().__init__(message)


def reply_keys(task: str) -> tuple[str, ...]:
    """The keys the teacher's JSON object must have for `task`."""
    return _REWRITE_KEYS if task in REWRITE_ONLY_TASKS else _FULL_KEYS


def _json_shape(keys: tuple[str, ...]) -> str:
    return "{" + ", ".join(f'"{k}": "..."' for k in keys) + "}"


def _tagged(name: str, text: str) -> str:
    return f"<{name}>\n{text}\n</{name}>"


def build_messages(seed: InstructionRecord, variant: int) -> list[dict[str, str]]:
    """The chat messages asking for variant `variant` (0-based) of `seed`."""
    task = seed.task
    keys = reply_keys(task)
    style = STYLE_HINTS[variant % len(STYLE_HINTS)]
    header = f"Task: {TASK_DESCRIPTIONS[task]}.\nThis request is for variant {variant + 1} of this example."
    if task in REWRITE_ONLY_TASKS:
        body = [
            "Here is an instruction for this task, with the input and answer options it is used with:",
            _tagged("instruction", seed.instruction),
            _tagged("input", seed.input),
            _tagged("options", "\n".join(seed.options or ())),
            "Rewrite only the instruction, in different words, so that it asks for exactly the same "
            f"thing. {style} Do not answer it and do not copy the input into it. If the instruction "
            "lists the answer options, keep every option spelled exactly as it is.",
        ]
    else:
        input_rule = (
            "Write a new input about a different product or situation."
            if seed.input.strip()
            else 'The example has no input; set "input" to an empty string.'
        )
        body = [
            "Here is an example of this task:",
            _tagged("instruction", seed.instruction),
            _tagged("input", seed.input),
            _tagged("response", seed.output),
            f"Write a new example of the same task. Rephrase the instruction. {style} {input_rule} "
            "Then write a high-quality response to your new instruction and input.",
        ]
    footer = f"Return only a JSON object of the form {_json_shape(keys)} with string values."
    user = "\n\n".join([header, *body, footer])
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_reply(text: str | None, keys: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object in the teacher's reply, restricted to `keys`.

    Tolerates a Markdown code fence or prose around the object (common with chat models); anything
    else — no object, a missing key — raises `TeacherReplyError` so that the caller retries.
    """
    if not text or not text.strip():
        raise TeacherReplyError("invalid_json", "empty reply")
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    if not body.startswith("{"):
        start, end = body.find("{"), body.rfind("}")
        if start < 0 or end < start:
            raise TeacherReplyError("invalid_json", f"no JSON object in reply: {text[:80]!r}")
        body = body[start : end + 1]
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise TeacherReplyError("invalid_json", f"reply is not valid JSON ({e}): {text[:80]!r}") from None
    if not isinstance(obj, dict):
        raise TeacherReplyError("invalid_json", f"reply is JSON but not an object: {text[:80]!r}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise TeacherReplyError("invalid_record", f"reply lacks key(s) {missing}: {text[:80]!r}")
    return {k: obj[k] for k in keys}
