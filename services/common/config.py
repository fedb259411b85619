"""One dataclass per service config; every field becomes a CLI flag and an environment variable.

A field ``max_ttft_s`` of a config built with prefix ``FLOWKV_SCHEDULER`` is set by
``--max-ttft-s`` or ``FLOWKV_SCHEDULER_MAX_TTFT_S``; the flag wins over the variable,
the variable over the default. Help text comes from ``field(metadata={"help": ...})``.
Cross-field checks belong in the dataclass's ``__post_init__``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _base_type(tp: Any) -> Any:
    """``int | None`` -> ``int``; other types unchanged."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _parse(tp: Any, raw: str) -> Any:
    base = _base_type(tp)
    if raw == "" and typing.get_origin(base) is list:
        return []  # an empty variable is an empty list (compose sets FOO= for "none"), not None
    if raw == "" and base is not str and base is not bool:
        return None
    if base is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base) or (str,)
        return [_parse(item, part) for part in raw.split(",") if part.strip()]
    return base(raw)


def env_name(prefix: str, field_name: str) -> str:
    return f"{prefix}_{field_name.upper()}"


def add_arguments(parser: argparse.ArgumentParser, cls: type, env_prefix: str) -> None:
    """Add one ``--flag`` per field of dataclass ``cls`` (default: unset, so env/defaults apply)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        env = env_name(env_prefix, f.name)
        default = f.default if f.default is not dataclasses.MISSING else "(computed)"
        if f.metadata.get("secret"):
            default = "(unset)" if not default else "(set)"
        group.add_argument(
            flag,
            dest=f.name,
            type=str,
            default=None,
            metavar=_base_type(hints[f.name]).__name__.upper() if isinstance(_base_type(hints[f.name]), type) else "VALUE",
            help=f"{help_text} [env {env}; default {default}]",
        )


def build(cls: type[T], env_prefix: str, args: argparse.Namespace | None = None, **overrides: Any) -> T:
    """Build ``cls`` from overrides, then flags, then environment variables, then defaults."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None:
            raw = os.environ.get(env_name(env_prefix, f.name))
        if raw is None:
            continue
        try:
            values[f.name] = _parse(hints[f.name], raw)
        except ValueError as exc:
            raise SystemExit(f"invalid value for {f.name} ({env_name(env_prefix, f.name)}): {exc}") from None
    return cls(**values)
