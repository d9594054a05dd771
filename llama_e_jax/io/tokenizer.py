"""The tokenizer every stage uses: one small wrapper over a `tokenizers.Tokenizer`, no torch.

Why a wrapper and not transformers' `AutoTokenizer`: the data pipeline, generation and the server
need five things — ids without surprise specials, decoding, the special ids, whether a BOS must be
prepended, and the chat template — and they must not pull in torch or transformers' import time.
The Rust `tokenizers` library does the actual work; this module only decides, once, which special
tokens mean what, so callers never guess.

`encode(text)` never adds special tokens. Whoever builds a sequence (the prompt builder, the packer,
the chat endpoint) prepends `bos_id` when `add_bos` is true, so "did BOS get added twice?" has one
answer. Special tokens written literally in the text (`<|im_start|>` from a chat template) are
matched whole and become their ids, as in transformers.

Two sources:

* an HF directory (`tokenizer.json` + `tokenizer_config.json`, optionally `chat_template.jinja`),
* a GGUF file's metadata. llama.cpp stores a byte-level BPE as its token strings, merges and token
  types plus a `tokenizer.ggml.pre` name for the pre-tokenizer regex. We rebuild the HF pipeline
  from those: BPE over the byte alphabet, control tokens as special added tokens, and the
  pre-tokenizer that name stands for (for SmolLM: every digit split off, then GPT-2's regex — the
  vocabulary has no multi-digit token, which is how one can tell).

`ByteTokenizer` (UTF-8 bytes as ids) is the tokenizer of random test models (configs/tiny.py).

`Tokenizer.save(dir)` writes the HF files, so a GGUF-born tokenizer can be loaded by transformers'
`AutoTokenizer` too (tests check both agree on every id).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from llama_e_jax.io.gguf_file import open_gguf

# llama.cpp's token types (gguf.TokenType): only these two change how text is split.
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4

# GPT-2's split regex is what tokenizers' ByteLevel(use_regex=True) applies; the names below are the
# `tokenizer.ggml.pre` values whose llama.cpp regex is "each digit alone, then GPT-2's regex".
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b")
_GPT2_ONLY = ("gpt-2", "gpt2", "default", "olmo", "jais", "phi-2", "poro-chat")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_NAMES = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")

CHAT_TEMPLATE_FILE = "chat_template.jinja"


class TokenizerError(ValueError):
    """A tokenizer file or directory that cannot be loaded faithfully."""


class Tokenizer:
    """Text ⇄ token ids, the special ids, and the chat template.

    Attributes:
      backend: the underlying `tokenizers.Tokenizer`.
      bos_id / eos_id / pad_id / unk_id: special ids, or None when the tokenizer has none.
      add_bos: whether sequences fed to the model should start with `bos_id` (LLaMA-1/2/3 yes,
        SmolLM2 no). `encode` never adds it; the sequence builder does.
      chat_template: the Jinja chat template, or None.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        source: str = "<memory>",
    ) -> None:
        self.backend = backend
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.bos_id = self._special_id(bos_token, "bos_token")
        self.eos_id = self._special_id(eos_token, "eos_token")
        self.pad_id = self._special_id(pad_token, "pad_token")
        self.unk_id = self._special_id(unk_token, "unk_token")
        self.add_bos = bool(add_bos)
        if self.add_bos and self.bos_id is None:
            raise TokenizerError(f"{source}: add_bos_token is true but there is no bos_token")
        self.chat_template = chat_template

    def _special_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.source}: {field}={token!r} is not in the vocabulary")
        return token_id

    # ------------------------------------------------------------------ text <-> ids

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added (see `add_bos`)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, in parallel in Rust."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of all special (control) tokens, e.g. to stop generation or mask them out."""
        return frozenset(
            token_id for token_id, added in self.backend.get_added_tokens_decoder().items() if added.special
        )

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool = False,
        **template_vars: Any,
    ) -> str:
        """Renders `messages` ([{"role": ..., "content": ...}]) with the chat template, as transformers does.

        Returns the prompt text; `encode` it to get ids (its special tokens are matched whole).
        """
        if self.chat_template is None:
            raise TokenizerError(f"{self.source}: this tokenizer has no chat_template")
        return _compile_template(self.chat_template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **template_vars,
        )

    # ------------------------------------------------------------------ HF files

    def save(self, out_dir: str | Path) -> None:
        """Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json (+ chat_template.jinja).

        transformers' AutoTokenizer loads the result as a `PreTrainedTokenizerFast`; `load_tokenizer`
        loads it back unchanged.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        specials = {
            name: token
            for name, token in (
                ("bos_token", self.bos_token),
                ("eos_token", self.eos_token),
                ("pad_token", self.pad_token),
                ("unk_token", self.unk_token),
            )
            if token is not None
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
            (out / CHAT_TEMPLATE_FILE).write_text(self.chat_template)
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")


def _compile_template(template: str):
    """Jinja environment configured like transformers' chat templating (trim/lstrip blocks, sandboxed)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt: str) -> str:
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(template)


# ---------------------------------------------------------------------- loading


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `Tokenizer` from an HF directory (tokenizer.json) or a `.gguf` file's metadata."""
    path = Path(path)
    if path.is_dir():
        return _load_hf_dir(path)
    if path.suffix == ".gguf" and path.is_file():
        return _load_gguf(path)
    raise TokenizerError(f"{path}: expected an HF tokenizer directory (with tokenizer.json) or a .gguf file")


def _load_hf_dir(directory: Path) -> Tokenizer:
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise TokenizerError(
            f"{tokenizer_file}: missing; only fast-tokenizer directories (tokenizer.json) are supported"
        )
    backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    special_map_file = directory / "special_tokens_map.json"
    special_map = json.loads(special_map_file.read_text()) if special_map_file.is_file() else {}
    names = {
        name: _token_text(config.get(name, special_map.get(name)))
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    template_file = directory / CHAT_TEMPLATE_FILE
    chat_template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
    if isinstance(chat_template, list):  # [{"name": ..., "template": ...}], the "default" one is the chat template
        chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        add_bos = _post_processor_adds_bos(backend, names["bos_token"])
    return Tokenizer(backend, **names, add_bos=add_bos, chat_template=chat_template, source=str(directory))


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _post_processor_adds_bos(backend: tokenizers.Tokenizer, bos_token: str | None) -> bool:
    """Whether tokenizer.json's post-processor prepends BOS (Llama-3 style files say so only there)."""
    bos_id = None if bos_token is None else backend.token_to_id(bos_token)
    if bos_id is None:
        return False
    with_specials = backend.encode("a", add_special_tokens=True).ids
    return bool(with_specials) and with_specials[0] == bos_id


def _load_gguf(path: Path) -> Tokenizer:
    metadata = _gguf_tokenizer_metadata(open_gguf(path), path)
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerError(
            f"{path}: field tokenizer.ggml.model={model!r} is not supported; only byte-level BPE ('gpt2') "
            "GGUF tokenizers are, otherwise load the tokenizer from an HF directory"
        )
    backend = _byte_level_bpe(metadata, path)
    tokens = metadata["tokenizer.ggml.tokens"]

    def token_at(field: str) -> str | None:
        token_id = metadata.get(field)
        return None if token_id is None else tokens[int(token_id)]

    return Tokenizer(
        backend,
        bos_token=token_at("tokenizer.ggml.bos_token_id"),
        eos_token=token_at("tokenizer.ggml.eos_token_id"),
        pad_token=token_at("tokenizer.ggml.padding_token_id"),
        unk_token=token_at("tokenizer.ggml.unknown_token_id"),
        add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
        source=str(path),
    )


def _gguf_tokenizer_metadata(reader: Any, path: Path) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a GGUF file as plain Python values."""
    metadata = {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}
    for required in ("tokenizer.ggml.model", "tokenizer.ggml.tokens"):
        if required not in metadata:
            raise TokenizerError(f"{path}: missing metadata field {required}")
    return metadata


def _byte_level_bpe(metadata: dict[str, Any], path: Path) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE from llama.cpp's tokens, merges, token types and pre-tokenizer name."""
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    if "tokenizer.ggml.merges" not in metadata:
        raise TokenizerError(f"{path}: missing metadata field tokenizer.ggml.merges (needed for BPE)")
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens has duplicate entries")
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _gguf_pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"), path)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)

    token_types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    control = [t for t, kind in zip(tokens, token_types) if kind == _GGUF_CONTROL]
    user_defined = [t for t, kind in zip(tokens, token_types) if kind == _GGUF_USER_DEFINED]
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in user_defined])
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise TokenizerError(f"{path}: added tokens grew the vocabulary beyond tokenizer.ggml.tokens")
    return backend


def _gguf_pre_tokenizer(name: str, path: Path) -> pre_tokenizers.PreTokenizer:
    """The HF pre-tokenizer equal to llama.cpp's regex list for `tokenizer.ggml.pre`."""
    if name in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if name in _GPT2_ONLY:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if name in _LLAMA3_NAMES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    known = sorted(_DIGITS_THEN_GPT2 + _GPT2_ONLY + _LLAMA3_NAMES)
    raise TokenizerError(f"{path}: field tokenizer.ggml.pre={name!r} is not supported (known: {', '.join(known)})")


class ByteTokenizer:
    """UTF-8 bytes as token ids (0 = pad, 1 = bos, 2 = eos): the tokenizer of random test models.

    Bytes 0-2 are control characters that never occur in instruction text, so the ids do not clash.
    """

    pad_id, bos_id, eos_id, add_bos = 0, 1, 2, True
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i > 2).decode("utf-8", errors="replace")
