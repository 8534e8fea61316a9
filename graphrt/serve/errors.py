"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with a matching HTTP
status."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    499: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
}

# graphrt_request_failure_total's reason for each status.
FAILURE_REASON_BY_STATUS = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "not_found",
    413: "too_large",
    499: "client_disconnect",
    503: "overloaded",
}


class APIError(Exception):
    """An error returned to the client as an OpenAI error body.

    ``reason`` overrides the failure-metric label implied by ``status``.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.reason = reason or failure_reason(status)

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPE_BY_STATUS.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_bytes(status: int, message: str, **kw: Any) -> bytes:
    return json.dumps(error_body(status, message, **kw)).encode()


def failure_reason(status: int) -> str:
    if status >= 500 and status != 503:
        return "internal_error"
    return FAILURE_REASON_BY_STATUS.get(status, "invalid_request")
