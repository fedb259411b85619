"""A tokenizer directory loaded with ``tokenizers`` and ``jinja2``, without transformers.

transformers imports torch as soon as its tokenizer classes are imported (when torch is
installed), so a process that must stay without torch (the gateway) reads the directory
that transformers' ``save_pretrained`` writes (``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``) itself. :class:`Tokenizer` answers the calls the gateway and the
detokenizer make, as transformers' fast tokenizer (``TokenizersBackend``) answers them:
``len``, ``encode``, ``decode`` and ``apply_chat_template`` (rendered in the same jinja2
sandbox, with the same globals and the special tokens as variables).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from typing import Any

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """A fast tokenizer (``tokenizers.Tokenizer``), its special tokens and its chat template.

    Args:
        backend: the ``tokenizers.Tokenizer`` of ``tokenizer.json``.
        special_tokens: ``bos_token``/``eos_token``/``unk_token``/``pad_token`` (those set).
        chat_template: the jinja2 chat template, if the model has one.
        clean_up_tokenization_spaces: the default of :meth:`decode`'s argument of that name.
    """

    def __init__(self, backend: Any, special_tokens: dict[str, str], chat_template: str | None = None,
                 clean_up_tokenization_spaces: bool = False) -> None:
        self.backend_tokenizer = backend
        self.special_tokens_map = dict(special_tokens)
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        backend.encode_special_tokens = False  # special tokens in text stay whole (transformers' default)

    @classmethod
    def from_dir(cls, path: str) -> Tokenizer:
        """Load ``path/tokenizer.json`` with the special tokens and chat template beside it."""
        from tokenizers import Tokenizer as Backend

        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        config: dict[str, Any] = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file, encoding="utf-8") as f:
                config = json.load(f)
        special = {}
        for name in _SPECIAL_NAMES:
            value = config.get(name)
            if isinstance(value, dict):  # a serialized AddedToken
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
        return cls(Backend.from_file(tok_file), special, _chat_template(path, config),
                   bool(config.get("clean_up_tokenization_spaces", False)))

    def __len__(self) -> int:
        """The vocabulary with the added tokens (what token ids must stay below)."""
        return int(self.backend_tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens_map.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    @property
    def unk_token(self) -> str | None:
        return self.special_tokens_map.get("unk_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens_map.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id(self.eos_token)

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (special tokens written in it are matched whole)."""
        return list(self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: int | Iterable[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of ``token_ids``.

        ``clean_up_tokenization_spaces`` (default: the tokenizer's setting) removes the space
        before punctuation and contractions, except for BPE vocabularies, where transformers
        skips it too (it would remove spaces the text has).
        """
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        text = self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        if clean and type(self.backend_tokenizer.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text

    def apply_chat_template(self, conversation: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, chat_template: str | None = None,
                            tools: list[dict[str, Any]] | None = None, documents: list[dict[str, Any]] | None = None,
                            **kwargs: Any) -> str | list[int]:
        """Render ``conversation`` with the chat template; token ids unless ``tokenize=False``.

        Args:
            conversation: the messages (``{"role": ..., "content": ...}`` dicts).
            add_generation_prompt: end with the prompt of an assistant turn.
            tokenize: encode the text (without adding special tokens, as transformers does).
            chat_template: a template other than the model's.
            tools: the tools (OpenAI ``{"type": "function", "function": {...}}`` objects) the
                template may show the model; a template that does not read ``tools`` ignores them.
            documents: retrieval documents, for templates that read them.
            **kwargs: further variables for the template (they win over the special tokens).
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template")
        messages = _alias_reasoning_fields(json.loads(json.dumps(conversation)))  # a plain copy
        tools = json.loads(json.dumps(tools)) if tools is not None else None
        text = _compile(template).render(messages=messages, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens_map, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _chat_template(path: str, config: dict[str, Any]) -> str | None:
    """``chat_template.jinja``, else ``chat_template.json``, else the config's ``chat_template``."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    template: Any = config.get("chat_template")
    legacy = os.path.join(path, "chat_template.json")
    if os.path.isfile(legacy):
        with open(legacy, encoding="utf-8") as f:
            template = json.load(f).get("chat_template", template)
    if isinstance(template, list):  # named templates: the default one
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    return template if isinstance(template, str) else None


def _alias_reasoning_fields(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _clean_up_tokenization(text: str) -> str:
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    """The template in transformers' chat-template sandbox (same options, filters and globals)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (marks assistant text): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    class Namespace(jinja2.utils.Namespace):
        """``namespace()`` without underscore-prefixed attributes."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    class Dict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = Dict()
    env.globals["namespace"] = Namespace
    return env.from_string(template)
