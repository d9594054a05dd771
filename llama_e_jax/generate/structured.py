"""Structured outputs: a JSON schema compiled into a *token program* that decoding follows on device.

OpenAI's `response_format={"type": "json_schema", ...}` promises a reply that parses as an object
of the schema. A 135M model asked for JSON in words rarely writes it (0 of 18 teacher prompts), so
the server constrains the sampling instead. We support one schema shape, the one the teacher
expansion needs — a flat object whose properties are all required strings:

    {"type": "object", "properties": {"a": {"type": "string"}, ...}, "required": ["a", ...],
     "additionalProperties": false}

Such an object is fixed text with free string bodies in between:

    {"a": "<free>", "b": "<free>"}

so it compiles into a short int32 program, one entry per generated token:

* an id >= 0 is a *forced* token: the tokenization of the fixed text (`{"a": "`, then `, "b": "`
  after the first string, then `}`);
* FREE_STRING (-1) is a string body: any *string-safe* token (its bytes contain no `"`, no `\\`,
  no control byte < 0x20, and it is not a special token) keeps the row there; a *close-quote*
  token ends the string and moves to the next entry. A close quote is `"` itself or string-safe
  bytes followed by one `"` (`."`, `!"`, ` it"`): with `"` alone, SmolLM2-135M, which ends a
  sentence inside quotes with `."`, closed none of 5 greedy teacher replies in 160 tokens; with
  these, 3 of 5;
* END (-2) after the last entry: the row finishes with finish_reason "stop".

A row without a constraint has NONE (-3) as its first entry and samples from the whole vocabulary.
The automaton (mask the logits by the current entry, advance a per-row program counter) is a few
elementwise ops inside generate.py's decode loop, so it costs no host round trip. The vocabulary
masks depend only on the tokenizer and are built once (`vocab_masks`).

Why not escapes: a string body may not contain `"`, `\\` or control characters (newlines) at all.
That keeps the automaton one state per string, and every reply parses with `json.loads`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

FREE_STRING, END, NONE = -1, -2, -3
PROGRAM_LENGTH = 64  # default program entries per row (a decoding session's static P)

_SCHEMA_ANNOTATIONS = frozenset({"title", "description", "$schema"})  # keywords that do not constrain


class SchemaError(ValueError):
    """A response_format that cannot be compiled; the message names the unsupported part."""


# ============================================================================= response_format -> keys


def object_keys(response_format: Mapping[str, Any] | None) -> tuple[str, ...] | None:
    """The property names, in order, of a json_schema response_format; None for text (no constraint).

    Raises SchemaError for anything but the flat all-required string-object shape.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise SchemaError("must be an object such as {\"type\": \"json_schema\", \"json_schema\": {...}}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        raise SchemaError('type "json_object" is not supported; pass {"type": "json_schema", "json_schema": '
                          '{"name": ..., "schema": {...}}} with an object of string properties instead')
    if kind != "json_schema":
        raise SchemaError(f"type={json.dumps(kind)}: expected \"text\" or \"json_schema\"")
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
        raise SchemaError("json_schema.schema: a JSON schema object is required")
    return _string_object_keys(spec["schema"], "json_schema.schema")


def _string_object_keys(schema: Mapping[str, Any], where: str) -> tuple[str, ...]:
    extra = sorted(set(schema) - {"type", "properties", "required", "additionalProperties"} - _SCHEMA_ANNOTATIONS)
    if extra:
        raise SchemaError(f"{where}: keyword(s) {extra} are not supported (only a flat object of string properties)")
    if schema.get("type") != "object":
        raise SchemaError(f"{where}.type={json.dumps(schema.get('type'))}: only \"object\" is supported")
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        raise SchemaError(f"{where}.properties: an object of properties is required")
    for name, prop in properties.items():
        if not isinstance(prop, Mapping) or prop.get("type") != "string" or set(prop) - {"type"} - _SCHEMA_ANNOTATIONS:
            raise SchemaError(f"{where}.properties.{name}: only {{\"type\": \"string\"}} properties are supported "
                              f"(got {json.dumps(prop)[:80]})")
    required = schema.get("required", [])
    if not isinstance(required, list) or set(required) != set(properties):
        raise SchemaError(f"{where}.required: must list every property ({sorted(properties)}); "
                          "optional properties are not supported")
    if schema.get("additionalProperties", False) is not False:
        raise SchemaError(f"{where}.additionalProperties: only false is supported")
    return tuple(properties)


# ============================================================================= keys -> token program


def skeleton(keys: Sequence[str]) -> list[str]:
    """The fixed text around the string bodies: len(keys) + 1 pieces (each body is followed by `"`).

    skeleton(["a", "b"]) == ['{"a": "', ', "b": "', '}'], and joining the pieces with `"` gives
    json.dumps({"a": "", "b": ""}).
    """
    if not keys:
        return ["{}"]
    pieces = ["{" + json.dumps(keys[0], ensure_ascii=False) + ": \""]
    pieces += [", " + json.dumps(key, ensure_ascii=False) + ": \"" for key in keys[1:]]
    return pieces + ["}"]


def compile_keys(keys: Sequence[str], encode: Callable[[str], list[int]]) -> np.ndarray:
    """The token program [n] int32 of an object with string properties `keys` (see the module doc)."""
    pieces = skeleton(keys)
    program: list[int] = []
    for i, piece in enumerate(pieces):
        program += encode(piece)
        if i < len(keys):
            program.append(FREE_STRING)
    program.append(END)
    return np.asarray(program, np.int32)


def compile_response_format(response_format: Mapping[str, Any] | None,
                            encode: Callable[[str], list[int]]) -> np.ndarray | None:
    """The token program of an OpenAI response_format, or None when it asks for plain text."""
    keys = object_keys(response_format)
    return None if keys is None else compile_keys(keys, encode)


def pad_program(program: Sequence[int] | None, length: int) -> np.ndarray:  # -> [length] int32
    """A row of the [B, P] program table: the program, then END; [NONE, ...] for no program."""
    row = np.full((length,), END, np.int32)
    if program is None:
        row[0] = NONE
        return row
    if len(program) > length:
        raise SchemaError(f"the schema compiles to {len(program)} tokens; at most {length} are supported")
    row[:len(program)] = program
    return row


# ============================================================================= vocabulary masks


@dataclasses.dataclass(frozen=True)
class VocabMasks:
    """string_safe: [V] bool, tokens allowed inside a string body; close_quote: [V] bool, tokens
    that end one (see the module doc)."""

    string_safe: np.ndarray
    close_quote: np.ndarray


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted: how byte-level BPE spells raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """Each token's raw bytes (index = id); None for special tokens and unspellable entries.

    Works for our `Tokenizer` over a byte-level BPE (HF tokenizer.json or GGUF): regular tokens are
    spelled in GPT-2's byte alphabet, non-special added tokens are literal text.
    """
    backend = getattr(tokenizer, "backend", None)
    if backend is None or "ByteLevel" not in repr(backend.decoder):
        raise SchemaError("structured outputs need a byte-level BPE tokenizer (GPT-2 / Llama-3 / SmolLM style)")
    alphabet = _byte_level_alphabet()
    added = backend.get_added_tokens_decoder()
    spelled: list[bytes | None] = []
    for token_id in range(tokenizer.vocab_size):
        if token_id in added:
            spelled.append(None if added[token_id].special else added[token_id].content.encode("utf-8"))
            continue
        text = backend.id_to_token(token_id)
        if text is None or any(c not in alphabet for c in text):
            spelled.append(None)
        else:
            spelled.append(bytes(alphabet[c] for c in text))
    return spelled


def _string_safe(data: bytes | None) -> bool:
    return bool(data) and b'"' not in data and b"\\" not in data and min(data) >= 0x20


def _closes_string(data: bytes | None) -> bool:
    return bool(data) and data.endswith(b'"') and (len(data) == 1 or _string_safe(data[:-1]))


@functools.lru_cache(maxsize=8)
def vocab_masks(tokenizer: Any, vocab_size: int, excluded: Iterable[int] = ()) -> VocabMasks:
    """The [vocab_size] masks for `tokenizer` (ids past its vocabulary and `excluded`, e.g. EOS, are
    neither). Cached: call it with hashable arguments (a tuple for `excluded`)."""
    spelled = token_bytes(tokenizer)[:vocab_size]
    string_safe = np.zeros((vocab_size,), bool)
    close_quote = np.zeros((vocab_size,), bool)
    string_safe[:len(spelled)] = [_string_safe(data) for data in spelled]
    close_quote[:len(spelled)] = [_closes_string(data) for data in spelled]
    dropped = [i for i in excluded if 0 <= i < vocab_size]
    string_safe[dropped] = close_quote[dropped] = False
    if not close_quote.any():
        raise SchemaError('the tokenizer has no token that ends with `"`; cannot end a JSON string')
    return VocabMasks(string_safe, close_quote)
