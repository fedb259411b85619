"""The OpenAPI 3.1 document the gateway serves on ``/openapi.json``.

It describes what the validation in :mod:`services.gateway.schemas` accepts, so a fuzzer
generating "valid" bodies from it gets 200s, and anything else gets a 4xx.
"""

from __future__ import annotations

from typing import Any

_REF = "#/components/schemas/"
_INT32 = 2**31 - 1  # the integer bounds of services.gateway.schemas


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


def _sampling_properties(model: str) -> dict[str, Any]:
    return {
        "model": {"type": "string", "enum": [model]},
        "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": _INT32},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": ["integer", "null"], "minimum": -1, "maximum": _INT32},
        "seed": {"type": ["integer", "null"], "minimum": -(2**63), "maximum": 2**63 - 1},
        "stop": {"oneOf": [{"type": "string", "minLength": 1},
                           {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}, {"type": "null"}]},
        "n": {"type": ["integer", "null"], "enum": [1, None]},
        "stream": {"type": ["boolean", "null"]},
        "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
        "presence_penalty": {"type": ["number", "null"], "enum": [0, None]},
        "frequency_penalty": {"type": ["number", "null"], "enum": [0, None]},
        "ignore_eos": {"type": ["boolean", "null"]},
        "flowkv_timing": {"type": ["boolean", "null"],
                          "description": "add `flowkv: {ttft_s, prefill_s, queued_s, control_plane_s}` to the response (last chunk when streaming)"},
        "min_tokens": {"type": ["integer", "null"], "minimum": 0, "maximum": _INT32},
        "user": {"type": "string"},
    }


def _schemas(model: str) -> dict[str, Any]:
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
    usage = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
             "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
    return {
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
        },
        "CompletionRequest": {
            "type": "object", "required": ["model", "prompt"],
            "properties": {
                **_sampling_properties(model),
                "prompt": {"oneOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
                    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 49151}, "minItems": 1},
                ]},
                "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 5},
            },
        },
        "ChatMessage": {
            "type": "object", "required": ["role", "content"],
            "properties": {
                "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
                "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": text_part}, {"type": "null"}],
                            "description": "null only for an assistant message (read as empty)"},
                "name": {"type": "string"},
            },
        },
        "ChatCompletionRequest": {
            "type": "object", "required": ["model", "messages"],
            "properties": {
                **_sampling_properties(model),
                "messages": {"type": "array", "items": _ref("ChatMessage"), "minItems": 1},
                "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": _INT32},
                "logprobs": {"type": ["boolean", "null"]},
                "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
            },
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
                "message": {"type": "object", "properties": {"role": {"type": "string"}, "content": {"type": "string"}}},
                "finish_reason": {"type": ["string", "null"]}, "logprobs": {"type": ["object", "null"]}}}}}},
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


def openapi_document(model: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a gateway serving ``model``."""
    plain = {"200": {"description": "ok"}, "503": {"description": "not ready"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "FlowKV gateway", "version": "1.0.0",
                 "description": "OpenAI-compatible API of a disaggregated (prefill/decode) LLM server"},
        "components": {
            "schemas": _schemas(model),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/models": {"get": {"summary": "list the served model", "security": [{"bearer": []}, {}],
                                   "responses": {"200": _json(_ref("ModelList"), "the models"), "401": _ERRORS["401"]}}},
            "/v1/completions": {"post": _generation_op("text completion", "CompletionRequest", "Completion")},
            "/v1/chat/completions": {"post": _generation_op("chat completion", "ChatCompletionRequest", "ChatCompletion")},
            "/health": {"get": {"summary": "the process is up", "responses": {"200": {"description": "ok"}}}},
            "/ready": {"get": {"summary": "the scheduler answers and a node serves", "responses": plain}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "this document", "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        },
    }
