"""The OpenAPI description of the portal's JSON API (/api/...): the bodies come from the routes'
pydantic models; this adds what FastAPI cannot see, the one error contract every /api route
shares (``{"error": {"type", "message", "hint"}}`` with the status from loft.core.errors' table,
see app.py) and the bearer scheme of the API tokens (``loft portal`` users' personal tokens).
Pages (HTML) and /static are left out: they are not an API.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

BEARER = "bearer"
# one server-sent event of /api/jobs/{id}/events (a text/event-stream schema describes each event)
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
ERROR = "PortalError"
# every status an /api route can answer besides its success (the fuzzer checks they are all here)
ERROR_STATUSES = {
    400: "invalid request (a bad value, named in the message)",
    401: "no valid API token or session",
    403: "the user's role may not do this, or a missing or wrong CSRF token",
    404: "no such thing",
    409: "conflicts with the current state (an integrity or gate refusal)",
    413: "upload over the portal's size limit",
    422: "a request that does not match this schema, or invalid data",
    429: "too many attempts (see Retry-After)",
}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message", "hint"],
            "properties": {
                "type": {"type": "string"},
                "message": {"type": "string"},
                "hint": {"type": ["string", "null"]},
            },
        }
    },
}


def describe(app: FastAPI) -> None:
    """Make ``app.openapi()`` the /api routes with their error responses and the bearer scheme."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        from loft import __version__

        doc = get_openapi(title=app.title, version=__version__, routes=app.routes)
        doc["paths"] = {p: ops for p, ops in doc["paths"].items() if p.startswith("/api/")}
        components = doc.setdefault("components", {})
        components.setdefault("schemas", {})[ERROR] = _ERROR_SCHEMA
        components["securitySchemes"] = {BEARER: {"type": "http", "scheme": "bearer"}}
        ref = {"$ref": f"#/components/schemas/{ERROR}"}
        for ops in doc["paths"].values():
            for op in ops.values():
                op["security"] = [{BEARER: []}]
                for status, why in ERROR_STATUSES.items():
                    op["responses"][str(status)] = {
                        "description": why,
                        "content": {"application/json": {"schema": ref}},
                    }
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
