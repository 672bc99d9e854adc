"""Every error the server returns, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Handlers map what can go wrong to a status: bad JSON or field types and bad
values (LmcError from SamplingParams) -> 400, unknown route or model -> 404,
wrong method -> 405, anything unexpected -> 500 (logged; the engine keeps running).
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmcompress.errors import LmcError
from lmcompress.turbo.server.protocol import ErrorBody, ErrorResponse

logger = logging.getLogger(__name__)

# SamplingParams' messages start with the field name: "temperature must be >= 0 ...".
_FIELD_IN_MESSAGE = re.compile(r"^(\w+) must be")
# Characters of a rejected value quoted back in the message.
_MAX_ECHO = 80

_TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class OpenAIError(Exception):
    """An error answer: HTTP status plus OpenAI's error fields; headers such as Retry-After."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorBody(message=self.message, type=_TYPE_OF_STATUS.get(self.status, "error"),
                                             param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


def bad_value(exc: LmcError) -> OpenAIError:
    """A rejected request value (400); param names the field when the message does."""
    message = str(exc)
    field = _FIELD_IN_MESSAGE.match(message)
    return OpenAIError(400, message, param=field.group(1) if field else None, code="invalid_value")


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    first = exc.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return OpenAIError(400, f"the request body is not valid JSON ({first.get('msg')}); send a JSON object",
                           code="invalid_json")
    where = ".".join(location) or "body"
    given = repr(first.get("input"))
    given = given if len(given) <= _MAX_ECHO else given[:_MAX_ECHO] + "..."
    return OpenAIError(400, f"{where}: {first.get('msg')} (got {given}); fix that field",
                       param=location[0] if location else None, code="invalid_type")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def on_openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(LmcError)
    async def on_lmc_error(request: Request, exc: LmcError) -> JSONResponse:
        return bad_value(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = HTTPStatus(exc.status_code).phrase
        message = f"{reason}: {request.method} {request.url.path}"
        if exc.status_code == 404:
            message += "; the API serves /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics"
        return OpenAIError(exc.status_code, message, code=reason.lower().replace(" ", "_")).response()

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("lmc serve: unexpected error on %s %s", request.method, request.url.path)
        return OpenAIError(500, f"internal error ({type(exc).__name__}); the server logged the details, "
                                "retry the request", code="internal_error").response()
