"""Error responses of the admin API.

Every response with status 4xx or 5xx has the JSON body

    {"error": {"code": ..., "message": ..., "field": ..., "value": ..., "expected": ...}}

where `field` is a dotted path into the request (`inputs.x.shape`, `deadline_ms`, `body`), `value`
is what was received (shortened when long) and `expected` what would have been accepted. One
middleware turns the facade's exceptions, aiohttp's own HTTP exceptions (unknown route, wrong
method, body too large) and unexpected errors into that shape, so no handler builds error bodies
by hand and no exception reaches aiohttp's default text page. An unexpected error is logged with
its traceback and answered with 500; the server keeps running.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from typing import Any, Awaitable, Callable

from aiohttp import web

from nodeagent.facade import (
    BadRequest,
    Conflict,
    DeadlineExceeded,
    FacadeError,
    NotCoordinator,
    NotFound,
    Unavailable,
)

logger = logging.getLogger(__name__)

# Request values echoed in an error are cut to this many characters, so a 60 MiB body that
# fails to parse does not come back in the error.
MAX_ECHO_CHARS = 200
MAX_ECHO_ITEMS = 100

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error response with its HTTP status, raised by handlers and helpers of the HTTP layer."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        value: Any = None,
        expected: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.value = value
        self.expected = expected
        self.headers = headers or {}


def _echo(value: Any) -> Any:
    """Return a JSON-safe, bounded copy of a request value for an error body."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return value if len(value) <= MAX_ECHO_CHARS else value[: MAX_ECHO_CHARS - 3] + "..."
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
        # Lists of names (available models, versions) stay lists, cut to MAX_ECHO_ITEMS.
        items = [_echo(v) for v in value[:MAX_ECHO_ITEMS]]
        return items + ["..."] if len(value) > MAX_ECHO_ITEMS else items
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return _echo(repr(value))
    return value if len(text) <= MAX_ECHO_CHARS else text[: MAX_ECHO_CHARS - 3] + "..."


def error_response(error: ApiError) -> web.Response:
    body = {
        "error": {
            "code": error.code,
            "message": error.message,
            "field": error.field,
            "value": _echo(error.value),
            "expected": _echo(error.expected),
        }
    }
    return web.json_response(body, status=error.status, headers=error.headers)


def from_facade_error(exc: FacadeError) -> ApiError:
    """Map a facade exception to its HTTP status."""
    kwargs = {"field": exc.field, "value": exc.value, "expected": exc.expected}
    if isinstance(exc, NotFound):
        return ApiError(404, exc.code, exc.message, **kwargs)
    if isinstance(exc, BadRequest):
        return ApiError(exc.status, exc.code, exc.message, **kwargs)
    if isinstance(exc, Conflict):
        return ApiError(409, exc.code, exc.message, **kwargs)
    if isinstance(exc, Unavailable):
        headers = {}
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        return ApiError(503, exc.reason, exc.message, headers=headers, **kwargs)
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, exc.code, exc.message, **kwargs)
    if isinstance(exc, NotCoordinator):
        # Reached only for routes that are not forwarded (reads served only by the coordinator).
        return ApiError(503, "not_coordinator", exc.message, headers={"Retry-After": "1"})
    return ApiError(500, exc.code, exc.message, **kwargs)


def _from_http_exception(exc: web.HTTPException, request: web.Request, max_body_bytes: int) -> ApiError:
    if exc.status == 404:
        return ApiError(
            404,
            "route_not_found",
            f"no route matches {request.method} {request.path}; GET /v1/openapi.json lists the routes",
            field="path",
            value=request.path,
        )
    if exc.status == 405:
        allowed = sorted(getattr(exc, "allowed_methods", ()) or ())
        return ApiError(
            405,
            "method_not_allowed",
            f"method {request.method} is not allowed on {request.path}",
            field="method",
            value=request.method,
            expected=allowed,
            headers={"Allow": ", ".join(allowed)},
        )
    if exc.status == 413:
        return body_too_large(max_body_bytes, request.content_length)
    return ApiError(exc.status, f"http_{exc.status}", exc.reason or str(exc))


def body_too_large(limit: int, received: int | None) -> ApiError:
    return ApiError(
        413,
        "body_too_large",
        f"request body is larger than the limit of {limit} bytes; send a smaller body, or raise "
        "limits.max_request_bytes in the agent config",
        field="body",
        value=received,
        expected=f"at most {limit} bytes (limits.max_request_bytes)",
    )


def make_error_middleware(
    max_body_bytes: int, on_response: Callable[[web.Request, int], None] | None = None
) -> Any:
    """Build the outermost middleware that turns every failure into the JSON error body."""

    @web.middleware
    async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except ApiError as exc:
            response = error_response(exc)
        except FacadeError as exc:
            response = error_response(from_facade_error(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise  # redirects and other non-error responses pass through
            response = error_response(_from_http_exception(exc, request, max_body_bytes))
        except Exception:
            incident = uuid.uuid4().hex[:12]
            logger.exception(
                "unexpected error in %s %s (incident %s)", request.method, request.path, incident
            )
            response = error_response(
                ApiError(
                    500,
                    "internal_error",
                    f"the agent failed to handle this request (incident {incident}); the agent log "
                    "has the traceback under this incident id",
                )
            )
        if on_response is not None:
            on_response(request, response.status)
        return response

    return error_middleware


def bad_request(message: str, *, field: str, value: Any, expected: Any, status: int = 400) -> ApiError:
    return ApiError(status, "bad_request", message, field=field, value=value, expected=expected)
