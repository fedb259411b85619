"""FlowKV's paged inference engine (Llama family) with the prefill/decode hand-off API.

See :mod:`libs.engine.engine` for the request life cycle. Public names are re-exported
here lazily so that ``import libs.engine.sampling`` stays light.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "EngineConfig": "libs.engine.config",
    "LLMEngine": "libs.engine.engine",
    "AsyncEngine": "libs.engine.async_engine",
    "PrefillResult": "libs.engine.outputs",
    "Engine": "libs.engine.protocol",
    "SamplingParams": "libs.engine.sampling",
    "TokenOutput": "libs.engine.outputs",
    "TokenLogprob": "libs.engine.outputs",
    "EngineStats": "libs.engine.outputs",
    "FinishReason": "libs.engine.outputs",
    "RemoteAllocation": "libs.engine.outputs",
    "NoFreeBlocks": "libs.kvtransfer.allocator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'libs.engine' has no attribute {name!r}")
