"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from libs.protocol.messages import ErrorCode


class ApiError(Exception):
    """An error the client gets as an OpenAI error body.

    Args:
        status: HTTP status.
        message: human-readable reason.
        type: OpenAI error type (``invalid_request_error``, ``server_error``, ...).
        param: the offending request field, if any.
        code: machine-readable code (``model_not_found``, ``rate_limit_exceeded``, ...).
        retry_after_s: sent as ``Retry-After`` (rounded up to whole seconds) when > 0.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {}
        if self.retry_after_s > 0:
            headers["Retry-After"] = str(max(1, int(-(-self.retry_after_s // 1))))
        return web.json_response(self.body(), status=self.status, headers=headers)


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    """A 400 for a bad request field."""
    return ApiError(400, message, param=param, code=code)


# How the scheduler's and nodes' error codes reach the client.
_STATUS_OF_CODE: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.OVERLOADED: (429, "rate_limit_exceeded"),
    ErrorCode.NO_NODES: (503, "service_unavailable"),
    ErrorCode.INVALID: (400, "invalid_request_error"),
    ErrorCode.NODE_FAILED: (502, "server_error"),
    ErrorCode.TRANSFER_FAILED: (502, "server_error"),
    ErrorCode.CANCELLED: (499, "server_error"),
    ErrorCode.INTERNAL: (500, "server_error"),
}


def from_code(code: ErrorCode, message: str, retry_after_s: float = 0.0) -> ApiError:
    """The ApiError for a wire ``ErrorCode``."""
    status, err_type = _STATUS_OF_CODE.get(code, (500, "server_error"))
    if status == 429:
        err_type = "rate_limit_error"
    elif status == 503:
        err_type = "server_error"
    return ApiError(status, message, type=err_type, code=code.value, retry_after_s=retry_after_s)
