"""Model names, their tokenizers and the FlowKV cache dir, without torch.

The engine (``libs.engine.loader``) and the gateway both use these; the gateway, which
needs a model's tokenizer and context length but never its weights, imports nothing else
of the engine's loading code and so never imports torch.

- :mod:`libs.models.cache`: the cache dir and how a directory in it is published.
- :mod:`libs.models.names`: which model name maps to which tokenizer and context length.
- :mod:`libs.models.gguf_tokenizer`: a GGUF file's tokenizer as a tokenizer directory.
- :mod:`libs.models.tokenizer`: a tokenizer directory loaded through ``tokenizers`` and
  ``jinja2`` (encode, decode, chat template), not through transformers.
"""
