"""From a validated request body to what the engine runs: prompt token ids, a token budget, and the
constraint (choices, regex or JSON schema, compiled by the engine's guide compiler). Runs on the app's
small worker pool, off the event loop and off the engine thread.

Design, and why. Tokenizing is the one step whose cost grows with what a client sends, so it is
bounded before it starts: a prompt longer than `MAX_CHARS_PER_TOKEN` characters per context slot
cannot fit (real text averages about 4 characters per token), and is refused without tokenizing
it. Budgets follow OpenAI: an explicit `max_tokens` that does not fit beside the prompt is a 400
naming the limit; a default budget is cut to what the context has left.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llama_e_jax.data.prompt import build_prompt
from llama_e_jax.generate.constraints import Automaton, ConstraintError
from llama_e_jax.generate.generator import Generator
from llama_e_jax.generate.guided import Guide, from_response_format
from llama_e_jax.serve.engine import BatchingEngine
from llama_e_jax.serve.protocol import (DEFAULT_CHAT_MAX_TOKENS, DEFAULT_COMPLETION_MAX_TOKENS, ApiError, ChatBody,
                                        CompletionBody, Message)

MAX_CHARS_PER_TOKEN = 16


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What a request runs: prompt_ids [prompts][tokens], the token budget of each choice, the constraint."""

    prompt_ids: list[list[int]]
    max_tokens: int
    constraint: Automaton | None = None


def prompt_count(prompt: Any) -> int:
    """How many prompts a /v1/completions `prompt` holds (known before tokenizing, for the row cap)."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def prepare_completion(generator: Generator, engine: BatchingEngine, body: CompletionBody) -> Prepared:
    constraint = _constraint(engine, body, None)
    prompt_ids = _completion_prompts(generator, engine, body.prompt)
    return Prepared(prompt_ids, _budget(engine, body.max_tokens, "max_tokens", DEFAULT_COMPLETION_MAX_TOKENS,
                                        prompt_ids), constraint)


def prepare_chat(generator: Generator, engine: BatchingEngine, body: ChatBody, template: str) -> Prepared:
    constraint = _constraint(engine, body, body.response_format)
    prompt_ids = [_encode(generator, engine, _chat_prompt(generator, body, template), "messages")]
    requested, param = ((body.max_completion_tokens, "max_completion_tokens") if body.max_completion_tokens
                        else (body.max_tokens, "max_tokens"))
    return Prepared(prompt_ids, _budget(engine, requested, param, DEFAULT_CHAT_MAX_TOKENS, prompt_ids), constraint)


def _budget(engine: BatchingEngine, requested: int | None, param: str, default: int,
            prompt_ids: list[list[int]]) -> int:
    limit = engine.max_length
    longest = max(len(ids) for ids in prompt_ids)
    if requested is None:
        return min(default, limit - longest)
    if longest + requested > limit:
        raise ApiError(400, f"{param}: this model's context is {limit} tokens; you requested {longest + requested} "
                       f"tokens ({longest} in the prompt, {requested} for the completion)", param=param,
                       code="context_length_exceeded")
    return requested


def _message_text(message: Message, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"messages.{index}.content: only text parts are supported, got {part.type!r}",
                           param="messages")
        texts.append(part.text)
    return "".join(texts)


def _chat_prompt(generator: Generator, body: ChatBody, template: str) -> str:
    """The prompt text: the chat template, or the Alpaca instruction template."""
    # OpenAI's "developer" role is the newer name of "system"; chat templates know "system".
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m, i)}
                for i, m in enumerate(body.messages)]
    if (body.template or template) == "instruction":
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise ApiError(400, "messages: the instruction template needs a user message", param="messages")
        return build_prompt(users[-1], body.input)
    tokenizer = generator.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:  # the byte tokenizer of random presets has none
        raise ApiError(400, "this model has no chat template; send \"template\": \"instruction\" or use "
                       "/v1/completions", param="messages")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as error:  # noqa: BLE001 - jinja raises many types for bad conversations
        raise ApiError(400, f"messages: the chat template refused them: {error}", param="messages") from None


def _constraint(engine: BatchingEngine, body: Any, response_format: dict[str, Any] | None) -> Automaton | None:
    """The automaton that constrains the reply (guided_choice, guided_regex or response_format: at most
    one), or None for free text. Compiling waits for the engine's compiler, bounded by its time limit."""
    try:
        asked = [(param, guide) for param, guide in (
            ("guided_choice", None if body.guided_choice is None else Guide.choices(body.guided_choice)),
            ("guided_regex", None if body.guided_regex is None else Guide.regex(body.guided_regex)),
            ("response_format", from_response_format(response_format))) if guide is not None]
    except ConstraintError as error:
        raise ApiError(400, f"{_first_set(body, response_format)}: {error}", param=_first_set(body, response_format),
                       code="unsupported_parameter") from None
    if not asked:
        return None
    if len(asked) > 1:
        raise ApiError(400, f"{' and '.join(p for p, _ in asked)}: give at most one constraint", param=asked[1][0])
    param, guide = asked[0]
    try:
        return engine.compile_guide(guide)
    except ConstraintError as error:
        raise ApiError(400, f"{param}: {error}", param=param, code="unsupported_parameter") from None


def _first_set(body: Any, response_format: dict[str, Any] | None) -> str:
    """The constraint field a parse error belongs to."""
    if body.guided_choice is not None:
        return "guided_choice"
    return "guided_regex" if body.guided_regex is not None else "response_format"


def _completion_prompts(generator: Generator, engine: BatchingEngine,
                        prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    """Token ids of each prompt; /v1/completions takes text, texts, token ids or lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt: at least one prompt is needed", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]  # one prompt given as token ids
    return [_encode(generator, engine, p, "prompt") for p in prompt]  # type: ignore[arg-type]


def _encode(generator: Generator, engine: BatchingEngine, text: str | list[int], param: str) -> list[int]:
    limit = engine.max_length
    if isinstance(text, str) and len(text) > limit * MAX_CHARS_PER_TOKEN:
        raise ApiError(400, f"{param}: {len(text)} characters cannot fit this model's context of {limit} tokens "
                       f"(this server refuses more than {MAX_CHARS_PER_TOKEN} characters per context token "
                       "without tokenizing them)", param=param, code="context_length_exceeded")
    ids = generator.encode_prompt(text) if isinstance(text, str) else list(text)
    if not ids:
        raise ApiError(400, f"{param}: the prompt is empty", param=param)
    if len(ids) >= limit:
        raise ApiError(400, f"{param}: this model's context is {limit} tokens; the prompt has {len(ids)} tokens "
                       "(at least one token must be left to generate)", param=param, code="context_length_exceeded")
    vocab = generator.config.vocab_size
    if not isinstance(text, str) and any(not 0 <= i < vocab for i in ids):
        raise ApiError(400, f"{param}: token ids must be in [0, {vocab})", param=param)
    return ids
