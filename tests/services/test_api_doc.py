"""docs/api.md names every field of every request body the gateway accepts."""

from __future__ import annotations

from pathlib import Path

import msgspec

from services.gateway import bodies

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def _fields(struct: type[msgspec.Struct]) -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(struct)}


def test_every_request_field_is_documented():
    text = DOC.read_text()
    structs = [*bodies.REQUEST_BODIES, bodies.ChatMessage, bodies.Tool, bodies.FunctionDef, bodies.ResponseFormat,
               bodies.JsonSchemaFormat, bodies.StreamOptions, bodies.StructuredOutputs]
    missing = sorted({f"{s.__name__}.{name}" for s in structs for name in _fields(s) if f"`{name}`" not in text
                      and f'"{name}"' not in text})
    assert not missing, f"docs/api.md does not mention: {missing}"
