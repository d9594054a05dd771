"""Tokenizer: SmolLM2 from GGUF metadata and from the converted HF dir agree with transformers on every id.

References, from strongest to weakest:
* the vocabulary itself: SmolLM2 has no token with two numerals, so its pre-tokenizer isolated
  digits (llama.cpp's `smollm` regex) — transformers' GGUF converter ignores `tokenizer.ggml.pre` and
  differs from us only on non-ASCII numerals, which we check separately;
* transformers' AutoTokenizer on the converted HF directory (what the parity tests and users load).
"""

from __future__ import annotations

import json

import gguf
import pytest
import tokenizers

from llama_e_jax.io.tokenizer import Tokenizer, TokenizerError, load_tokenizer

TEXTS = [
    "Hello world! This stainless steel bottle keeps drinks cold for 24 hours.",
    "Price: $1,299.99 (was 1499) — save 13% on order #20240517",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   trailing   ",
    "def add(a, b):\n    return a + b  # TODO: types\n\nprint(add(1, 22))",
    "emoji 😀👍🏽 and CJK 日本語のテキスト, 中文, 한국어",
    "naïve café — “curly quotes” ‘and’ «guillemets» ½ x² Ⅻ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "{\"title\": \"USB-C cable\", \"tags\": [\"fast-charge\", \"2m\"]}",
    "",
]
ASCII_DIGIT_TEXTS = [t for t in TEXTS if not any(ch in t for ch in "½²Ⅻ")]
CONVERSATIONS = [
    [{"role": "user", "content": "Write a title for a bamboo cutting board."}],
    [{"role": "system", "content": "You are a shop assistant."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Refunds?"}],
]


@pytest.fixture(scope="module")
def gguf_tokenizer(smollm2_gguf) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_dir_tokenizer(smollm2_hf_dir) -> Tokenizer:
    return load_tokenizer(smollm2_hf_dir)


@pytest.fixture(scope="module")
def transformers_tokenizer(smollm2_hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_hf_dir)


def test_smollm2_special_tokens(gguf_tokenizer):
    tok = gguf_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
    assert tok.id_to_token(1) == "<|im_start|>" and tok.id_to_token(2) == "<|im_end|>"
    assert tok.add_bos is False
    assert tok.vocab_size == 49152
    assert tok.special_ids == frozenset(range(17))


def test_gguf_and_hf_dir_tokenizers_agree(gguf_tokenizer, hf_dir_tokenizer):
    for text in TEXTS:
        assert gguf_tokenizer.encode(text) == hf_dir_tokenizer.encode(text), text
    for field in ("bos_id", "eos_id", "pad_id", "unk_id", "add_bos", "vocab_size", "chat_template", "special_ids"):
        assert getattr(gguf_tokenizer, field) == getattr(hf_dir_tokenizer, field), field


def test_matches_transformers_on_converted_dir(hf_dir_tokenizer, transformers_tokenizer):
    tok, reference = hf_dir_tokenizer, transformers_tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ids == reference.encode(text, add_special_tokens=True), "transformers must add no BOS either"
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == reference.decode(ids), text
    assert tok.encode_batch(TEXTS) == [reference.encode(t, add_special_tokens=False) for t in TEXTS]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)


def test_chat_template_matches_transformers(hf_dir_tokenizer, transformers_tokenizer):
    for messages in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            ours = hf_dir_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            reference = transformers_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert ours == reference
    prompt = hf_dir_tokenizer.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_digits_are_isolated_like_llama_cpp_smollm_regex(gguf_tokenizer, smollm2_gguf):
    tok = gguf_tokenizer
    # The vocabulary proves the training pre-tokenizer split numerals: no token holds two of them.
    vocab = tok.backend.get_vocab()
    assert not [t for t, i in vocab.items() if sum(ch.isdigit() for ch in tok.decode([i], False)) > 1]
    assert [tok.decode([i]) for i in tok.encode("in 2024")] == ["in", " ", "2", "0", "2", "4"]
    roman = tok.encode(" Ⅻ")  # \p{N} beyond ASCII digits is isolated too (its 3 bytes have no merge)
    assert tok.decode(roman[:1]) == " " and tok.decode(roman[1:]) == "Ⅻ"


def test_agrees_with_transformers_gguf_converter_on_ascii_digits(gguf_tokenizer, smollm2_gguf):
    """transformers' own GGUF → tokenizer conversion, an independent build from the same metadata."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for text in ASCII_DIGIT_TEXTS:
        assert gguf_tokenizer.encode(text) == reference.encode(text, add_special_tokens=False), text


def test_special_tokens_in_text_are_matched_whole_and_round_trip(gguf_tokenizer):
    tok = gguf_tokenizer
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "user\nHi"
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


# ---------------------------------------------------------------------------- small synthetic files


def word_level_dir(tmp_path, *, post_processor_adds_bos: bool, config: dict | None):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "</s>"])
    if post_processor_adds_bos:
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_add_bos_from_config_or_from_post_processor(tmp_path):
    # Llama-3 style: no add_bos_token in the config, the post-processor prepends BOS.
    tok = load_tokenizer(word_level_dir(tmp_path, post_processor_adds_bos=True,
                                        config={"bos_token": "<s>", "eos_token": "</s>"}))
    assert tok.add_bos and tok.bos_id == 1
    assert tok.encode("hello world") == [3, 4]  # encode itself never adds it
    explicit = load_tokenizer(word_level_dir(tmp_path, post_processor_adds_bos=True,
                                             config={"bos_token": {"content": "<s>"}, "add_bos_token": False}))
    assert not explicit.add_bos and explicit.bos_id == 1 and explicit.eos_id is None
    with pytest.raises(TokenizerError, match="no chat_template"):
        explicit.apply_chat_template([{"role": "user", "content": "hi"}])


def test_save_then_load_round_trip(tmp_path, gguf_tokenizer):
    gguf_tokenizer.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(TEXTS[3]) == gguf_tokenizer.encode(TEXTS[3])
    assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos) == (1, 2, 2, False)
    assert again.chat_template == gguf_tokenizer.chat_template


def test_bad_inputs_name_the_file_or_field(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: missing"):
        load_tokenizer(tmp_path)
    word_level_dir(tmp_path, post_processor_adds_bos=False, config={"bos_token": "<bos>"})
    with pytest.raises(TokenizerError, match=r"bos_token='<bos>' is not in the vocabulary"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="expected an HF tokenizer directory"):
        load_tokenizer(tmp_path / "nothing.bin")


@pytest.mark.parametrize("model, pre, message", [
    ("gpt2", "mystery-bpe", r"tokenizer\.ggml\.pre='mystery-bpe' is not supported"),
    ("llama", "default", r"tokenizer\.ggml\.model='llama' is not supported"),
])
def test_unsupported_gguf_tokenizer_names_field(tmp_path, model, pre, message):
    path = tmp_path / "tok.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(path)
