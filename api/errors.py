"""Errors as the API answers them: ``{"error": <code>, "detail": <text>}``, as the receiver does.

A provider's failures become answers the application can act on, named after the provider
(``bridge_…``, ``powens_…``): a budget spent or the provider unreachable is a 503 with ``Retry-After``
(try again later), a user it no longer knows a 404, our credentials or a request refused a 502 (ours
to fix, not the application's). A stored value that cannot be
decrypted is a 500 naming it.
"""

from __future__ import annotations

import math

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.logs import get_logger
from workers.codec import CodecError
from workers.errors import AuthError, NotFound, ProviderError, TransientError

log = get_logger("bridgehook.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.detail)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


async def bridge_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProviderError)
    who, name = exc.provider, exc.provider.lower()
    log.warning(
        "api.provider_error", provider=name, error=type(exc).__name__, status=exc.status, code=exc.code
    )
    if isinstance(exc, TransientError):
        wait = str(max(1, math.ceil(exc.retry_after or 1)))
        return error_response(503, f"{name}_unavailable", f"{who} is busy or unreachable: retry later",
                              {"Retry-After": wait})  # fmt: skip
    if isinstance(exc, NotFound):  # the user (or item) is gone there; its webhook will follow
        return error_response(404, f"not_found_at_{name}", f"{who} no longer knows this user or item")
    if isinstance(exc, AuthError):
        return error_response(
            502, f"{name}_refused", f"{who} refused our credentials: check {name.upper()}_CLIENT_*"
        )
    return error_response(502, f"{name}_error", f"{who} refused the request ({exc.status} {exc.code or ''})")


async def codec_error(request: Request, exc: Exception) -> Response:
    log.error("api.undecryptable", error=str(exc))
    return error_response(500, "undecryptable", "a stored value cannot be decrypted: check ENCRYPTION_KEYS")


async def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("api.error", error=type(exc).__name__)
    return error_response(500, "internal", "an unexpected error; the API's log has the details")


HANDLERS = {
    ApiError: api_error,
    HTTPException: http_error,
    ProviderError: bridge_error,
    CodecError: codec_error,
    Exception: internal_error,
}
