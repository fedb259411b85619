"""Tokenizer directories: ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja``.

A GGUF file has no ``tokenizer.json``: its vocabulary, merges, special token ids and chat
template are metadata. :func:`gguf_tokenizer_dir` writes them out as the directory that
transformers' ``AutoTokenizer.from_pretrained(folder, gguf_file=...)`` followed by
``save_pretrained`` writes, once, into the cache dir.

Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) split the GPT-2 way, as
SmolLM2's is, are built here from the metadata with ``gguf`` and ``tokenizers`` alone: no
torch, and ``tokenizer.json`` byte for byte the one transformers writes (the tests compare
them). Any other vocabulary is converted by transformers, whose GGUF reader imports torch,
in a child process (:func:`save_with_transformers`), so this process still never imports
torch. The same child process gives Hugging Face directories that ship only a slow
tokenizer their ``tokenizer.json``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

from libs.models.cache import publish_dir

log = logging.getLogger(__name__)

# GGUF pre-tokenizer names whose text splitting is GPT-2's own (the ByteLevel regex); other
# names (llama3, qwen2, ...) need their own split and go through transformers.
_GPT2_SPLIT_PRE = frozenset({"smollm", "gpt-2", "default"})
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
_SPECIAL_TOKEN_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
_VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length for "no limit"


def read_gguf_metadata(path: str) -> dict[str, Any]:
    """Every metadata key of a GGUF file with its value (strings decoded, arrays as lists)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {name: _field_value(field, gguf.GGUFValueType) for name, field in reader.fields.items()}


def _field_value(field: Any, types: Any) -> Any:
    if not field.types:
        return None
    main = field.types[0]
    if main == types.ARRAY:
        if field.types[-1] == types.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if main == types.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    return field.parts[-1].tolist()[0]


def gguf_context_length(path: str) -> int:
    """The ``<architecture>.context_length`` of a GGUF file."""
    meta = read_gguf_metadata(path)
    return int(meta[f"{meta['general.architecture']}.context_length"])


def gguf_tokenizer_dir(gguf_path: str, target: str) -> str:
    """The tokenizer directory of a GGUF file, written to ``target`` once (atomic rename).

    Args:
        gguf_path: the ``.gguf`` file.
        target: the directory to create; if it already holds a tokenizer it is returned as is.

    Returns:
        ``target``.
    """
    if os.path.isfile(os.path.join(target, "tokenizer_config.json")):
        return target
    log.info("extracting the tokenizer of %s to %s (once)", gguf_path, target)
    meta = read_gguf_metadata(gguf_path)
    if _byte_level_bpe(meta):
        return publish_dir(target, lambda tmp: write_byte_level_bpe(meta, tmp))
    folder, fname = os.path.split(os.path.abspath(gguf_path))
    return publish_dir(target, lambda tmp: save_with_transformers(folder, tmp, gguf_file=fname))


def _byte_level_bpe(meta: dict[str, Any]) -> bool:
    """Whether :func:`write_byte_level_bpe` builds this file's tokenizer exactly: GPT-2's
    split, merges in the file, nothing added on encoding, and every special token the
    tokenizer names (GPT2Tokenizer's default ``<|endoftext|>`` included) one of the file's
    control tokens (transformers would add any other as a new special token)."""
    if not (
        meta.get("tokenizer.ggml.model") == "gpt2"
        and meta.get("tokenizer.ggml.pre", "default") in _GPT2_SPLIT_PRE
        and "tokenizer.ggml.merges" in meta
        and not meta.get("tokenizer.ggml.add_bos_token", False)
        and not meta.get("tokenizer.ggml.add_eos_token", False)
    ):
        return False
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    alphabet = set(_bytes_to_unicode().values())
    control = {t for t, ty in zip(tokens, meta.get("tokenizer.ggml.token_type") or [])
               if ty == _CONTROL and set(t) <= alphabet}
    named = {tokens[int(meta[key])] for key in _SPECIAL_TOKEN_IDS.values() if meta.get(key) is not None}
    return "<|endoftext|>" in control and named <= control


def write_byte_level_bpe(meta: dict[str, Any], out: str) -> None:
    """Write the tokenizer files of a byte-level BPE GGUF vocabulary into ``out``.

    The same construction as transformers' GGUF path (``GPT2Tokenizer`` from the vocabulary
    and merges, the file's control tokens added as special tokens, its user-defined ones as
    plain added tokens, no BOS/EOS added on encoding).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    token_types: list[int] = meta.get("tokenizer.ggml.token_type") or []
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tk = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                       end_of_word_suffix="", fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    # A control token spelled outside the byte alphabet is a mislabel in the file; adding it
    # would grow the vocabulary past the model's (transformers skips it too).
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, token_types) if ty == _CONTROL and set(t) <= alphabet]
    if control:
        tk.add_special_tokens(control)
    known = tk.get_vocab(with_added_tokens=True)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, token_types) if ty == _USER_DEFINED and t in known]
    if user:
        tk.add_tokens(user)
    tk.save(os.path.join(out, "tokenizer.json"))

    config: dict[str, Any] = {"model_max_length": _VERY_LARGE_INTEGER, "tokenizer_class": "PreTrainedTokenizerFast"}
    for name, key in _SPECIAL_TOKEN_IDS.items():
        if meta.get(key) is not None:
            config[name] = tokens[int(meta[key])]
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    template = meta.get("tokenizer.chat_template")
    if template:
        with open(os.path.join(out, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(template)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE vocabularies use)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_SAVE_SCRIPT = """
import sys
from transformers import AutoTokenizer
folder, out, gguf_file = sys.argv[1], sys.argv[2], sys.argv[3] or None
AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(out)
"""


def save_with_transformers(folder: str, out: str, gguf_file: str | None = None) -> None:
    """``AutoTokenizer.from_pretrained(folder, gguf_file=...).save_pretrained(out)``, run in a
    child process: transformers imports torch whenever it is installed, and the caller's
    process (the gateway's) is to stay without it."""
    subprocess.run([sys.executable, "-c", _SAVE_SCRIPT, folder, out, gguf_file or ""], check=True)
