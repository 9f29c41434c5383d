"""Error answers as RFC 9457 problems (``application/problem+json``).

Felix errors map to problem types through one table
(:data:`felix.control.schemas.PROBLEM_TYPES`); schema mismatches answer 422 with each
error's location, Starlette's own errors (no such route, method not allowed) keep
their status, and anything unexpected is a 500 whose detail names nothing internal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute

from felix.control.schemas import PROBLEM_TYPES, ProblemType
from felix.control.store import CursorTooOld
from felix.errors import BadRequest, FelixError, Unauthenticated

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "OnRefused",
    "errors",
    "install",
    "problem_response",
    "problem_type",
]

log = logging.getLogger("felix.control.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"

#: Called for every error answer with the error and its problem slug (the audit log).
OnRefused = Callable[[Request, BaseException, str], None]

#: The problem type for each felix error class (the nearest class in the MRO wins).
_PROBLEM_FOR = {p.error: p for p in PROBLEM_TYPES.values() if p.slug != "validation-error"}


def problem_type(exc: BaseException) -> ProblemType:
    for cls in type(exc).__mro__:
        if cls in _PROBLEM_FOR:
            return _PROBLEM_FOR[cls]
    return PROBLEM_TYPES["internal-error"]


def problem_response(
    status: int, type_: str, title: str, detail: str, **extensions: Any
) -> JSONResponse:
    body = {"type": type_, "title": title, "status": status, "detail": detail, **extensions}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE)


def felix_problem(exc: FelixError) -> JSONResponse:
    """The answer for a felix error (``WWW-Authenticate: Bearer`` with a 401)."""
    problem = problem_type(exc)
    extensions: dict[str, Any] = {}
    if isinstance(exc, CursorTooOld):
        extensions = {"since": exc.since, "oldest": exc.oldest}
    response = problem_response(problem.status, problem.uri, problem.title, str(exc), **extensions)
    if isinstance(exc, Unauthenticated):
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the problem statuses a route can answer."""
    schema = {"$ref": "#/components/schemas/Problem"}
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        titles = sorted({p.title for p in PROBLEM_TYPES.values() if p.status == status})
        responses[status] = {
            "description": " / ".join(titles),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": schema}},
        }
    return responses


def install(app: FastAPI, routes: Iterable[BaseRoute], on_refused: OnRefused) -> None:
    """Answer every error of ``app`` (serving ``routes``) with a problem, telling
    ``on_refused`` about each."""
    routes = tuple(routes)

    async def on_felix_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, FelixError)
        problem = problem_type(exc)
        if problem.status >= 500 and problem.slug not in ("overloaded", "unavailable"):
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        on_refused(request, exc, problem.slug)
        response = felix_problem(exc)
        if getattr(request.state, "close_connection", False):
            response.headers["Connection"] = "close"
        return response

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        # Without "input" and "ctx": the caller knows what it sent, and a large body
        # should not come back in the error.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:5])
        if len(errors) > 5:
            detail += f"; and {len(errors) - 5} more"
        problem = PROBLEM_TYPES["validation-error"]
        on_refused(request, BadRequest(detail), problem.slug)
        return problem_response(
            problem.status, problem.uri, problem.title, detail, errors=jsonable_encoder(errors)
        )

    async def on_http_error(request: Request, exc: Exception) -> Response:
        """Starlette's own errors (no such route, method not allowed) as problems too."""
        assert isinstance(exc, HTTPException)
        try:
            title = HTTPStatus(exc.status_code).phrase
        except ValueError:
            title = "Error"
        path = request.url.path
        detail = exc.detail if exc.detail != title else f"{request.method} {path}: {title}"
        response = problem_response(exc.status_code, "about:blank", title, detail)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route's methods; a path has one route per method.
            allowed = {
                method
                for route in routes
                if getattr(route, "path_regex", None) is not None and route.path_regex.match(path)  # type: ignore[attr-defined]
                for method in getattr(route, "methods", None) or ()
            }
            if allowed:
                response.headers["Allow"] = ", ".join(sorted(allowed))
        return response

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # Starlette still re-raises exc after this answer, so the server logs the traceback.
        problem = PROBLEM_TYPES["internal-error"]
        on_refused(request, exc, problem.slug)
        return problem_response(problem.status, problem.uri, problem.title, "internal error")

    app.add_exception_handler(FelixError, on_felix_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
