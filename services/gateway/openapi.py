"""The OpenAPI 3.1 document the gateway serves on ``/openapi.json``.

The request bodies' schemas are generated from the Structs of :mod:`services.gateway.bodies`,
the same classes the gateway decodes requests into, so the document and the validation
cannot drift apart: a body that breaks the document is refused with a 4xx. (The gateway
checks more than a schema can say, so a body that follows the document may still get a 400.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from services.gateway import bodies

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": _json(_ref("Error"), "invalid request"),
    "401": _json(_ref("Error"), "missing or wrong API key"),
    "404": _json(_ref("Error"), "unknown model"),
    "413": _json(_ref("Error"), "request body too large"),
    "429": _json(_ref("Error"), "too many requests (see Retry-After)"),
    "502": _json(_ref("Error"), "the request failed on the nodes after retries"),
    "503": _json(_ref("Error"), "no node can serve the request, or the scheduler is unreachable"),
}


def _request_schemas(models: list[str]) -> dict[str, Any]:
    """The request bodies' schemas, generated from the Structs the gateway decodes them into;
    ``model`` is narrowed to the served models' names."""
    _, components = msgspec.json.schema_components(bodies.REQUEST_BODIES, ref_template=_REF + "{name}")
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        components[name]["properties"]["model"] = {"type": "string", "enum": list(models)}
    for name in ("TokenizeCompletion", "TokenizeChat", "Detokenize"):
        components[name]["properties"]["model"] = {"anyOf": [{"type": "string", "enum": list(models)}, {"type": "null"}]}
    return components


def _schemas(models: list[str]) -> dict[str, Any]:
    usage = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
             "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
    tool_call = {"type": "object", "required": ["id", "type", "function"], "properties": {
        "id": {"type": "string"}, "type": {"type": "string", "enum": ["function"]},
        "function": {"type": "object", "required": ["name", "arguments"],
                     "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}}}
    return {
        **_request_schemas(models),
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
        },
        "Usage": usage,
        "Completion": {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
            "id": {"type": "string"}, "object": {"type": "string", "enum": ["text_completion"]},
            "created": {"type": "integer"}, "model": {"type": "string"}, "usage": _ref("Usage"),
            "choices": {"type": "array", "items": {"type": "object", "properties": {
                "index": {"type": "integer"}, "text": {"type": "string"},
                "finish_reason": {"type": ["string", "null"]}, "logprobs": {"type": ["object", "null"]}}}}}},
        "ChatCompletion": {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
            "id": {"type": "string"}, "object": {"type": "string", "enum": ["chat.completion"]},
            "created": {"type": "integer"}, "model": {"type": "string"}, "usage": _ref("Usage"),
            "choices": {"type": "array", "items": {"type": "object", "properties": {
                "index": {"type": "integer"},
                "message": {"type": "object", "properties": {
                    "role": {"type": "string"}, "content": {"type": ["string", "null"]},
                    "tool_calls": {"type": "array", "items": tool_call}}},
                "finish_reason": {"type": ["string", "null"]}, "logprobs": {"type": ["object", "null"]}}}}}},
        "Tokens": {"type": "object", "required": ["count", "max_model_len", "tokens"], "properties": {
            "count": {"type": "integer"}, "max_model_len": {"type": "integer"},
            "tokens": {"type": "array", "items": {"type": "integer"}},
            "token_strs": {"type": "array", "items": {"type": "string"}}}},
        "Detokenized": {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": {"type": "object", "required": ["id", "object"], "properties": {
                "id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"},
                "owned_by": {"type": "string"}, "max_model_len": {"type": "integer"}}}}}},
    }


def _generation_op(summary: str, request_schema: str, response_schema: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": [{"bearer": []}, {}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request_schema)}}},
        "responses": {
            "200": {"description": "the completion (JSON), or server-sent events when stream is true",
                    "content": {"application/json": {"schema": _ref(response_schema)},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **_ERRORS,
        },
    }


def _op(summary: str, request_schema: dict[str, Any], response_schema: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": [{"bearer": []}, {}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}},
        "responses": {"200": _json(_ref(response_schema), "ok"),
                      **{k: _ERRORS[k] for k in ("400", "401", "404", "413")}},
    }


def openapi_document(model: str | Sequence[str]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a gateway serving ``model`` (a served name, or several)."""
    models = [model] if isinstance(model, str) else list(model)
    plain = {"200": {"description": "ok"}, "503": {"description": "not ready"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "FlowKV gateway", "version": "1.0.0",
                 "description": "OpenAI-compatible API of a disaggregated (prefill/decode) LLM server"},
        "components": {
            "schemas": _schemas(models),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/models": {"get": {"summary": "list the served models", "security": [{"bearer": []}, {}],
                                   "responses": {"200": _json(_ref("ModelList"), "the models"), "401": _ERRORS["401"]}}},
            "/v1/completions": {"post": _generation_op("text completion", "CompletionRequest", "Completion")},
            "/v1/chat/completions": {"post": _generation_op("chat completion", "ChatCompletionRequest", "ChatCompletion")},
            "/tokenize": {"post": _op("tokenize a prompt, or chat messages through the chat template",
                                      {"anyOf": [_ref("TokenizeCompletion"), _ref("TokenizeChat")]}, "Tokens")},
            "/detokenize": {"post": _op("token ids to text", _ref("Detokenize"), "Detokenized")},
            "/health": {"get": {"summary": "the process is up", "responses": {"200": {"description": "ok"}}}},
            "/ready": {"get": {"summary": "the scheduler answers and a node serves", "responses": plain}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "this document", "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        },
    }
