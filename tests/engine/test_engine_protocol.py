"""The node's engines implement one protocol, member for member, with the same call shapes."""

from __future__ import annotations

import inspect

import pytest

from libs.engine.async_engine import AsyncEngine
from libs.engine.protocol import Engine

_MEMBERS = sorted(
    name for name, value in vars(Engine).items()
    if not name.startswith("_") and (callable(value) or isinstance(value, property))
)


def _engines() -> list[type]:
    engines: list[type] = [AsyncEngine]
    try:
        from libs.vllm_engine.engine import VllmEngine
    except ImportError:  # vLLM is an optional extra
        pass
    else:
        engines.append(VllmEngine)
    return engines


def test_protocol_names_what_the_roles_use() -> None:
    for name in ("prefill", "allocate_remote", "decode_remote", "release", "abort", "generate", "stats",
                 "layout", "pool", "vocab_size", "busy_s", "prefix_hashes"):
        assert name in _MEMBERS


@pytest.mark.parametrize("engine_cls", _engines(), ids=lambda c: c.__name__)
def test_engine_implements_every_member(engine_cls: type) -> None:
    for name in _MEMBERS:
        want = vars(Engine)[name]
        have = inspect.getattr_static(engine_cls, name, None)
        assert have is not None, f"{engine_cls.__name__} lacks {name}"
        if isinstance(want, property):
            assert isinstance(have, property), f"{engine_cls.__name__}.{name} must be a property"
            continue
        assert inspect.iscoroutinefunction(have) == inspect.iscoroutinefunction(want), name
        assert inspect.isasyncgenfunction(have) or not inspect.isasyncgenfunction(want), name
        want_params = list(inspect.signature(want).parameters.values())
        have_params = inspect.signature(have).parameters
        for p in want_params:
            assert p.name in have_params, f"{engine_cls.__name__}.{name} lacks parameter {p.name}"
            assert have_params[p.name].kind == p.kind, f"{engine_cls.__name__}.{name}({p.name}) differs in kind"
