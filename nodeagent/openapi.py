"""The OpenAPI 3.1 document of the admin API, generated from the route table.

The HTTP layer registers its routes from a list of `Route` records, and `build_document` turns the
same list into the document served at GET /v1/openapi.json. A route therefore cannot exist without
being documented, and a test compares the document with the application's router to catch a route
added around the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

API_VERSION = "1"

_PATH_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Route:
    """One route: method, path template, handler name, token scope and documentation.

    `scope` is "public", "infer" or "admin"; `forward` marks write routes that a non-coordinator
    agent forwards to the coordinator. `request_schema` and `response_schema` are JSON Schema
    fragments or `$ref`s into the components below; `content_types` lists accepted request types.
    """

    method: str
    path: str
    handler: str
    scope: str
    summary: str
    forward: bool = False
    request_schema: dict[str, Any] | None = None
    content_types: tuple[str, ...] = ("application/json",)
    response_status: int = 200
    response_schema: dict[str, Any] | None = None
    response_type: str = "application/json"
    errors: tuple[int, ...] = ()
    tags: tuple[str, ...] = field(default=())


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

COMPONENTS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "field": {"type": ["string", "null"], "description": "dotted path of the field at fault"},
                    "value": {"description": "value received, shortened when long"},
                    "expected": {"description": "what would have been accepted"},
                },
            }
        },
    },
    "Tensor": {
        "type": "object",
        "required": ["dtype", "shape", "data"],
        "properties": {
            "dtype": {"type": "string", "examples": ["float32", "int64"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "data": {"description": "nested lists matching shape; complex elements as [real, imag]"},
        },
    },
    "InferOptions": {
        "type": "object",
        "properties": {
            "version": {"type": "string", "description": "pin a version instead of the traffic split"},
            "priority": {"enum": ["high", "normal", "low"], "default": "normal"},
            "deadline_ms": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600000,
                            "description": "time budget in milliseconds from arrival"},
            "task": {"type": "string"},
            "request_key": {"type": "string", "maxLength": 256,
                            "description": "requests with the same key get the same version"},
        },
    },
    "InferRequest": {
        "allOf": [
            _ref("InferOptions"),
            {
                "oneOf": [
                    {"type": "object", "required": ["inputs"],
                     "properties": {"inputs": {"type": "object", "additionalProperties": _ref("Tensor")}}},
                    {"type": "object", "required": ["text"],
                     "properties": {"text": {"type": "array", "items": {"type": "string"}, "minItems": 1}}},
                ]
            },
        ],
        "description": "JSON form. The msgpack form (application/msgpack) is a map with the same "
        "options plus inputs = protocol.tensors metadata list and payload = the joined buffers.",
    },
    "InferResponse": {
        "type": "object",
        "properties": {
            "model": {"type": "string"},
            "version": {"type": "string"},
            "request_id": {"type": "string"},
            "route": {"type": "array", "items": {"type": "string"}, "description": "agent per segment"},
            "timings_ms": {"type": "object", "additionalProperties": {"type": "number"}},
            "failovers": {"type": "integer", "description": "times the request resumed on another route"},
            "outputs": {"type": "object", "additionalProperties": _ref("Tensor")},
        },
    },
    "DeployRequest": {
        "type": "object",
        "required": ["name", "version", "source"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": NAME_PATTERN},
            "version": {"type": "string", "pattern": NAME_PATTERN},
            "source": {"type": "string", "description": "packaged model name or a path on the coordinator"},
            "strategy": {"enum": ["replace", "canary"], "default": "replace"},
            "replicas": {"type": "integer", "minimum": 1, "maximum": 64, "default": 1,
                         "description": "1: no copies. Above 1 (any value): every agent the pipeline "
                                        "leaves free copies the segment with the most work per holder"},
            "options": {"type": "object"},
        },
    },
    "DeployProgress": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "model": {"type": "string"},
            "version": {"type": "string"},
            "state": {"enum": ["pending", "distributing", "loading", "ready", "failed"]},
            "percent": {"type": "number", "minimum": 0, "maximum": 100},
            "message": {"type": "string"},
        },
    },
    "TrafficWeights": {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": {"type": "number", "minimum": 0},
        "description": "version name to relative weight; versions left out get 0",
    },
    "Model": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "weights": {"type": "object", "additionalProperties": {"type": "number"}},
            "previous_version": {"type": ["string", "null"]},
            "text_input": {"type": "boolean"},
            "versions": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Cluster": {
        "type": "object",
        "properties": {
            "cluster": {"type": "string"},
            "node_id": {"type": "string"},
            "coordinator": {"type": ["object", "null"]},
            "epoch": {"type": "integer"},
            "plan_version": {"type": "integer"},
            "members": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Alert": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "metric": {"type": "string"},
            "value": {"type": "number"},
            "threshold": {"type": "number"},
            "comparison": {"type": "string"},
            "window_s": {"type": "number"},
            "since": {"type": "number"},
            "message": {"type": "string"},
        },
    },
}

_STATUS_TEXT = {
    400: "Invalid request; the error names the field, the value and what was expected",
    401: "Missing or invalid bearer token",
    404: "Unknown model, version or deployment; the error lists the known ones",
    409: "Conflicts with the current state",
    413: "Body larger than limits.max_request_bytes",
    415: "Unsupported Content-Type",
    422: "Inputs do not fit the model's input spec",
    503: "Unavailable: no coordinator, no replica, or the deadline cannot be met",
    504: "The deadline passed while the request ran",
}


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.handler,
        "summary": route.summary,
        "tags": list(route.tags),
        "x-shardmesh-scope": route.scope,
    }
    params = _PATH_PARAM.findall(route.path)
    if params:
        op["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string", "pattern": NAME_PATTERN}}
            for p in params
        ]

    if route.request_schema is not None:
        op["requestBody"] = {
            "required": True,
            "content": {ct: {"schema": route.request_schema} for ct in route.content_types},
        }
    ok: dict[str, Any] = {"description": "Success"}
    if route.response_schema is not None:
        ok["content"] = {route.response_type: {"schema": route.response_schema}}
    else:
        ok["content"] = {route.response_type: {}}
    responses: dict[str, Any] = {str(route.response_status): ok}
    codes = set(route.errors)
    if route.scope != "public":
        codes.add(401)
    for code in sorted(codes):
        responses[str(code)] = {
            "description": _STATUS_TEXT.get(code, "Error"),
            "content": {"application/json": {"schema": _ref("Error")}},
        }
    op["responses"] = responses

    if route.scope == "public":
        op["security"] = []
    elif route.scope == "infer":
        op["security"] = [{"inferenceToken": []}, {"adminToken": []}]
    else:
        op["security"] = [{"adminToken": []}]
    if route.forward:
        op["description"] = "Write operation: an agent that is not the coordinator forwards it."
    return op


def build_document(routes: Sequence[Route], *, title: str = "shardmesh admin API", auth_on: bool = True) -> dict[str, Any]:
    """Build the OpenAPI document for `routes`."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": API_VERSION,
            "description": "Admin and inference endpoint of a shardmesh node agent. Tokens are "
            "required when the endpoint is bound to a non-loopback address or admin.require_token "
            f"is true; they are {'required' if auth_on else 'not required'} on this agent.",
        },
        "paths": paths,
        "components": {
            "schemas": COMPONENTS,
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer", "description": "admin token: every route"},
                "inferenceToken": {"type": "http", "scheme": "bearer", "description": "inference token: the infer route only"},
            },
        },
    }
