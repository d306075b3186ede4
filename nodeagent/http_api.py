"""The admin and inference HTTP endpoint of a node agent (aiohttp).

Every agent serves the same routes, so any agent can be an inference gateway and any agent can
take admin commands. Reads are served locally from the agent's view of the cluster. Writes
(deploy, traffic, rollback, delete) only take effect on the coordinator: the agent raises
`NotCoordinator` with the coordinator's admin URL, and this layer forwards the request there with
the cluster's admin token, marking it with the `X-Shardmesh-Forwarded` header. A forwarded request
that meets `NotCoordinator` again (the coordinator changed meanwhile) gets 503 with
Retry-After instead of being forwarded a second time, so two agents with stale views cannot
bounce a request between them.

Layout: the route table below is the single list of routes. `create_app` registers it, the
OpenAPI document is generated from it (nodeagent.openapi), and the auth middleware reads each
route's token scope from it. Request bodies of the inference route are parsed and checked in
nodeagent.http_infer, errors are shaped in nodeagent.http_errors and tokens are checked in
nodeagent.http_auth.

No route builds a filesystem path from request data. The status page and its two assets are read
from the package once, at startup, under constant names.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from nodeagent.facade import (
    AgentFacade,
    DeadlineExceeded,
    DeployRequest,
    FacadeError,
    InferRequest,
    InferResult,
    NotCoordinator,
    Unavailable,
)
from nodeagent.http_auth import Scope, Tokens, make_auth_middleware, token_required
from nodeagent.http_errors import ApiError, bad_request, body_too_large, make_error_middleware
from nodeagent.http_infer import (
    JSON_TYPE,
    MSGPACK_TYPE,
    build_request,
    encode_result,
    parse_body,
    parse_options,
    wants_msgpack,
)
from nodeagent.metrics import GATEWAY_WINDOW_S, AgentMetrics
from nodeagent.openapi import COMPONENTS, NAME_PATTERN, Route, build_document
from protocol.limits import Limits

logger = logging.getLogger(__name__)

FORWARDED_HEADER = "X-Shardmesh-Forwarded"
# Seconds a forwarded write may take at the coordinator. Deploy returns 202 at once and the
# others change registry entries, so 30 s only trips when the coordinator is stuck.
FORWARD_TIMEOUT_S = 30.0
# Extra time the gateway waits past a request's deadline for the agent to report the miss
# itself, before returning 504 on its own.
DEADLINE_GRACE_S = 1.0

_NAME_RE = re.compile(NAME_PATTERN)
_JSON_BODY_MAX_FOR_ADMIN = 1 << 20  # deploy and traffic bodies are tiny; 1 MiB is generous


def _json_ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", "healthz", "public", "Liveness check (no token needed)", tags=("ops",)),
    Route("GET", "/", "status_page", "public", "Status page (HTML; asks for the token in the browser)",
          response_type="text/html", tags=("ops",)),
    Route("GET", "/static/app.js", "status_script", "public", "Status page script",
          response_type="text/javascript", tags=("ops",)),
    Route("GET", "/static/style.css", "status_style", "public", "Status page stylesheet",
          response_type="text/css", tags=("ops",)),
    Route("GET", "/v1/cluster", "get_cluster", "admin",
          "Members, roles, coordinator, epoch, capabilities and health",
          response_schema=_json_ref("Cluster"), tags=("cluster",)),
    Route("GET", "/v1/discovery", "get_discovery", "admin", "Peer discovery state (mDNS and static peers)",
          tags=("cluster",)),
    Route("GET", "/v1/models", "list_models", "admin", "Models with versions, weights, placement and gateway stats",
          response_schema={"type": "array", "items": _json_ref("Model")}, tags=("models",)),
    Route("POST", "/v1/models", "deploy", "admin", "Deploy a model version; answers 202 with a progress resource",
          forward=True, request_schema=_json_ref("DeployRequest"), response_status=202,
          response_schema=_json_ref("DeployProgress"), errors=(400, 404, 409, 413, 503), tags=("models",)),
    Route("GET", "/v1/models/{name}", "get_model", "admin", "One model", response_schema=_json_ref("Model"),
          errors=(400, 404), tags=("models",)),
    Route("PUT", "/v1/models/{name}/traffic", "set_traffic", "admin", "Set the traffic split between versions",
          forward=True, request_schema=_json_ref("TrafficWeights"), response_schema=_json_ref("Model"),
          errors=(400, 404, 409, 413, 503), tags=("models",)),
    Route("POST", "/v1/models/{name}/rollback", "rollback", "admin",
          "Give the previous version all traffic (instant: it is still loaded)", forward=True,
          response_schema=_json_ref("Model"), errors=(400, 404, 409, 503), tags=("models",)),
    Route("DELETE", "/v1/models/{name}/versions/{version}", "delete_version", "admin",
          "Unload a version that has no traffic", forward=True, response_schema=_json_ref("Model"),
          errors=(400, 404, 409, 503), tags=("models",)),
    Route("POST", "/v1/models/{name}/infer", "infer", "infer",
          "Run an inference (JSON tensors, msgpack tensors, or text)",
          request_schema=_json_ref("InferRequest"), content_types=(JSON_TYPE, MSGPACK_TYPE),
          response_schema=_json_ref("InferResponse"), errors=(400, 404, 413, 415, 422, 503, 504),
          tags=("inference",)),
    Route("GET", "/v1/deployments/{id}", "get_deployment", "admin", "Progress of one deployment",
          forward=True, response_schema=_json_ref("DeployProgress"), errors=(400, 404, 503), tags=("models",)),
    Route("GET", "/v1/alerts", "get_alerts", "admin", "Firing alarms",
          response_schema={"type": "array", "items": _json_ref("Alert")}, tags=("ops",)),
    Route("GET", "/metrics", "get_metrics", "admin", "Prometheus metrics (text exposition format)",
          response_type="text/plain", tags=("ops",)),
    Route("GET", "/v1/openapi.json", "get_openapi", "admin", "This document", tags=("ops",)),
)

_STATIC_FILES = {
    "status_page": ("index.html", "text/html"),
    "status_script": ("app.js", "text/javascript"),
    "status_style": ("style.css", "text/css"),
}

# The page loads only its own script and stylesheet and talks only to this origin.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class HttpSettings:
    """The config values the HTTP layer reads, taken from `AgentConfig`."""

    admin_host: str = "127.0.0.1"
    require_token: bool | None = None
    max_request_bytes: int = 64 * 1024 * 1024
    node_id: str = ""

    @classmethod
    def from_config(cls, config: Any, *, node_id: str = "") -> HttpSettings:
        if isinstance(config, HttpSettings):
            return config
        return cls(
            admin_host=config.network.admin_host,
            require_token=config.admin.require_token,
            max_request_bytes=config.limits.max_request_bytes,
            node_id=node_id,
        )

    @property
    def auth_on(self) -> bool:
        return token_required(self.admin_host, self.require_token)


def _check_name(value: str, field: str) -> str:
    if not _NAME_RE.match(value):
        raise bad_request(
            f"{field} {value!r} is not a valid name",
            field=field,
            value=value,
            expected=f"1 to 64 characters matching {NAME_PATTERN}",
        )
    return value


APP_KEY_API: web.AppKey["_Api"] = web.AppKey("shardmesh_api")


class _Api:
    """Handlers bound to one facade."""

    def __init__(
        self,
        facade: AgentFacade,
        settings: HttpSettings,
        tokens: Tokens | None,
        metrics: AgentMetrics | None,
    ) -> None:
        self.facade = facade
        self.settings = settings
        self.tokens = tokens
        self.metrics = metrics
        self.limits = Limits(max_payload_bytes=settings.max_request_bytes)
        self.session: aiohttp.ClientSession | None = None
        self.static = self._load_static()
        self.openapi = build_document(ROUTES, auth_on=settings.auth_on)

    @staticmethod
    def _load_static() -> dict[str, bytes]:
        base = importlib.resources.files("nodeagent") / "static"
        return {handler: (base / filename).read_bytes() for handler, (filename, _) in _STATIC_FILES.items()}

    # ---- shared helpers ----

    async def _read_body(self, request: web.Request, limit: int) -> bytes:
        declared = request.content_length
        if declared is not None and declared > limit:
            raise body_too_large(limit, declared)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise body_too_large(limit, declared) from None

    async def _read_json(self, request: web.Request) -> Any:
        limit = min(_JSON_BODY_MAX_FOR_ADMIN, self.settings.max_request_bytes)
        body = await self._read_body(request, limit)
        if request.content_type not in ("", JSON_TYPE, "application/octet-stream"):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Type {request.content_type!r} is not accepted here",
                field="Content-Type",
                value=request.content_type,
                expected=JSON_TYPE,
            )
        try:
            return json.loads(body) if body else None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise bad_request(
                f"body is not valid JSON: {exc}",
                field="body",
                value=body[:80].decode("utf-8", "replace"),
                expected="a JSON object",
            ) from None

    # ---- routes ----

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        # A draining agent returns 503 so that load balancers stop sending it new requests.
        health = getattr(self.facade, "health", None)
        state = health() if callable(health) else "ok"
        return web.json_response({"status": state, "node_id": self.settings.node_id},
                                 status=200 if state == "ok" else 503)

    def _static(self, handler: str) -> web.StreamResponse:
        _, content_type = _STATIC_FILES[handler]
        return web.Response(body=self.static[handler], content_type=content_type, charset="utf-8",
                            headers=_PAGE_HEADERS)

    async def status_page(self, request: web.Request) -> web.StreamResponse:
        return self._static("status_page")

    async def status_script(self, request: web.Request) -> web.StreamResponse:
        return self._static("status_script")

    async def status_style(self, request: web.Request) -> web.StreamResponse:
        return self._static("status_style")

    async def get_cluster(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await self.facade.cluster_status())

    async def get_discovery(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await self.facade.discovery_status())

    def _with_stats(self, model: dict[str, Any]) -> dict[str, Any]:
        if self.metrics is None:
            return model
        now = time.monotonic()
        versions = []
        for info in model.get("versions", []):
            stats = self.metrics.version_stats(model["name"], info["version"], now=now)
            versions.append({
                **info,
                "stats": {
                    "window_s": GATEWAY_WINDOW_S,
                    "requests": stats.requests,
                    "rate_per_s": stats.rate_per_s,
                    "error_rate": stats.error_rate,
                    "p50_ms": None if stats.p50_s is None else stats.p50_s * 1000.0,
                    "p99_ms": None if stats.p99_s is None else stats.p99_s * 1000.0,
                },
            })
        return {**model, "versions": versions}

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        models = await self.facade.list_models()
        return web.json_response([self._with_stats(dict(m)) for m in models])

    async def get_model(self, request: web.Request) -> web.StreamResponse:
        name = _check_name(request.match_info["name"], "name")
        return web.json_response(self._with_stats(dict(await self.facade.get_model(name))))

    async def deploy(self, request: web.Request) -> web.StreamResponse:
        data = await self._read_json(request)
        deploy_request = parse_deploy(data)
        progress = await self.facade.deploy(deploy_request)
        logger.info(
            "node %s: deploy %s version %s accepted as deployment %s",
            self.settings.node_id, deploy_request.name, deploy_request.version, progress.id,
        )
        return web.json_response(
            progress.to_dict(), status=202, headers={"Location": f"/v1/deployments/{progress.id}"}
        )

    async def get_deployment(self, request: web.Request) -> web.StreamResponse:
        deployment_id = _check_name(request.match_info["id"], "id")
        return web.json_response(await self.facade.deploy_progress(deployment_id))

    async def set_traffic(self, request: web.Request) -> web.StreamResponse:
        name = _check_name(request.match_info["name"], "name")
        weights = await self._read_json(request)
        if not isinstance(weights, dict) or not weights:
            raise bad_request(
                "traffic body must be a non-empty JSON object of version to weight",
                field="body",
                value=weights,
                expected={"v1": 0.9, "v2": 0.1},
            )
        for version, weight in weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise bad_request(
                    f"weight of version {version!r} must be a number",
                    field=f"weights.{version}",
                    value=weight,
                    expected="number >= 0",
                )
        result = await self.facade.set_traffic(name, {str(k): float(v) for k, v in weights.items()})
        logger.info("node %s: traffic of model %s set to %s", self.settings.node_id, name, weights)
        return web.json_response(result)

    async def rollback(self, request: web.Request) -> web.StreamResponse:
        name = _check_name(request.match_info["name"], "name")
        result = await self.facade.rollback(name)
        logger.info("node %s: model %s rolled back", self.settings.node_id, name)
        return web.json_response(result)

    async def delete_version(self, request: web.Request) -> web.StreamResponse:
        name = _check_name(request.match_info["name"], "name")
        version = _check_name(request.match_info["version"], "version")
        result = await self.facade.delete_version(name, version)
        logger.info("node %s: model %s version %s deleted", self.settings.node_id, name, version)
        return web.json_response(result)

    async def infer(self, request: web.Request) -> web.StreamResponse:
        received = time.monotonic()
        name = _check_name(request.match_info["name"], "name")

        # Parse and check everything before the agent sees the request.
        body = await self._read_body(request, self.settings.max_request_bytes)
        # aiohttp reports a missing Content-Type as application/octet-stream. A body without the
        # header is read as JSON, the common case of a hand-written request.
        content_type = request.content_type if "Content-Type" in request.headers else ""
        if not body:
            raise bad_request('the request body is empty; send {"text": [...]} or {"inputs": {...}} as JSON, '
                              "or the msgpack form", field="body", value="<0 bytes>",
                              expected="a JSON or msgpack inference body")
        data, is_msgpack = parse_body(body, content_type)
        options = parse_options(data)
        spec = await self.facade.input_spec(name, options["version"])
        infer_request = build_request(
            name, data, is_msgpack, options, spec,
            limits=self.limits, peer=f"http:{request.remote}", received_monotonic=received,
        )

        # Run it. Client errors (unknown version, bad input) are not counted as model failures.
        version_label = options["version"] or ""
        try:
            result = await self._run_infer(infer_request)
        except (Unavailable, DeadlineExceeded) as exc:
            # The agent names the version it routed to, so unpinned failures count against it.
            self._observe(name, getattr(exc, "version", None) or version_label, received, ok=False)
            logger.info("node %s: infer on model %s failed: %s", self.settings.node_id, name, exc.message)
            raise
        except FacadeError:
            raise
        except Exception:
            self._observe(name, version_label, received, ok=False)
            raise
        self._observe(name, result.version, received, ok=True)

        as_msgpack = wants_msgpack(request.headers.get("Accept", ""), is_msgpack)
        payload, content_type = encode_result(name, result, as_msgpack)
        return web.Response(body=payload, content_type=content_type,
                            headers={"X-Request-Id": result.request_id})

    async def _run_infer(self, infer_request: InferRequest) -> InferResult:
        """Call the agent, and raise DeadlineExceeded when it overruns the deadline plus the grace."""
        if infer_request.deadline_s is None:
            return await self.facade.infer(infer_request)
        elapsed = time.monotonic() - infer_request.received_monotonic
        remaining = infer_request.deadline_s - elapsed
        try:
            # NOTE: on timeout this cancels the agent's infer coroutine, which must then release
            # whatever the request holds (queue slots, in-flight hop state). A timeout scope
            # replaces wait_for because it runs the call in this task, without a task of its own.
            async with asyncio.timeout(remaining + DEADLINE_GRACE_S):
                return await self.facade.infer(infer_request)
        except TimeoutError:
            raise DeadlineExceeded(
                f"deadline of {infer_request.deadline_s * 1000:.0f} ms passed before the cluster "
                "returned a result",
                field="deadline_ms",
                value=infer_request.deadline_s * 1000,
            ) from None

    def _observe(self, name: str, version: str, received: float, *, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.observe_request(name, version, time.monotonic() - received, ok)

    async def get_alerts(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await self.facade.alerts())

    async def get_metrics(self, request: web.Request) -> web.StreamResponse:
        if self.metrics is None:
            raise ApiError(404, "not_found", "this agent was started without metrics")
        body, content_type = self.metrics.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def get_openapi(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.openapi)

    # ---- forwarding to the coordinator ----

    async def forward(self, request: web.Request, exc: NotCoordinator) -> web.StreamResponse:
        if request.headers.get(FORWARDED_HEADER):
            raise Unavailable(
                "the coordinator changed while this request was forwarded; retry it",
                reason="coordinator_changed",
                retry_after_s=1.0,
            )
        target = exc.leader_admin_url
        if not target:
            raise Unavailable(
                "no coordinator is elected, so write operations cannot run now; retry after the "
                "election (GET /v1/cluster shows the coordinator)",
                reason="no_coordinator",
                retry_after_s=1.0,
            )
        if not target.startswith(("http://", "https://")):
            raise Unavailable(
                f"the coordinator's admin URL {target!r} is not an http(s) URL",
                reason="bad_coordinator_url",
            )
        body = await request.read()
        headers = {FORWARDED_HEADER: self.settings.node_id or "1"}
        for name in ("Content-Type", "Accept"):
            if name in request.headers:
                headers[name] = request.headers[name]
        if self.tokens is not None:
            headers["Authorization"] = f"Bearer {self.tokens.admin}"
        url = target.rstrip("/") + request.rel_url.raw_path_qs
        logger.info(
            "node %s: forwarding %s %s to coordinator %s at %s",
            self.settings.node_id, request.method, request.path, exc.leader_id, target,
        )
        if self.session is None:
            raise RuntimeError("forwarding needs the app's client session; start the app first")
        try:
            async with self.session.request(request.method, url, data=body, headers=headers) as reply:
                reply_body = await reply.read()
                out_headers = {"X-Shardmesh-Forwarded-To": target}
                for name in ("Location", "Retry-After"):
                    if name in reply.headers:
                        out_headers[name] = reply.headers[name]
                response = web.Response(status=reply.status, body=reply_body, headers=out_headers)
                response.headers["Content-Type"] = reply.headers.get("Content-Type", JSON_TYPE)
                return response
        except (aiohttp.ClientError, TimeoutError) as err:
            logger.warning(
                "node %s: forwarding %s %s to coordinator at %s failed: %r",
                self.settings.node_id, request.method, request.path, target, err,
            )
            raise Unavailable(
                f"cannot reach the coordinator at {target}: {err!r}; retry shortly",
                reason="coordinator_unreachable",
                retry_after_s=1.0,
            ) from None


_DEPLOY_KEYS = {"name", "version", "source", "strategy", "replicas", "options"}


def parse_deploy(data: Any) -> DeployRequest:
    """Check a deploy body and build the request."""
    if not isinstance(data, dict):
        raise bad_request("deploy body must be a JSON object", field="body", value=data,
                          expected=COMPONENTS["DeployRequest"]["required"])
    unknown = sorted(set(data) - _DEPLOY_KEYS)
    if unknown:
        raise bad_request(f"unknown field {unknown[0]!r} in the deploy body", field=unknown[0],
                          value=data[unknown[0]], expected=sorted(_DEPLOY_KEYS))
    for key in ("name", "version", "source"):
        if key not in data:
            raise bad_request(f"deploy body is missing {key!r}", field=key, value=None,
                              expected="a string")
    name = _require_name(data, "name")
    version = _require_name(data, "version")
    source = data["source"]
    if not isinstance(source, str) or not source or len(source) > 4096:
        raise bad_request("source must be a non-empty string", field="source", value=source,
                          expected="a packaged model name or a path on the coordinator")
    strategy = data.get("strategy", "replace")
    if strategy not in ("replace", "canary"):
        raise bad_request(f"strategy {strategy!r} is invalid", field="strategy", value=strategy,
                          expected=["replace", "canary"])
    replicas = data.get("replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 64:
        raise bad_request("replicas must be an integer from 1 to 64", field="replicas", value=replicas,
                          expected="1..64")
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise bad_request("options must be a JSON object", field="options", value=options, expected="object")
    return DeployRequest(name=name, version=version, source=source, strategy=strategy,
                         replicas=replicas, options=options)


def _require_name(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise bad_request(f"{key} must be a string", field=key, value=value,
                          expected=f"1 to 64 characters matching {NAME_PATTERN}")
    return _check_name(value, key)


def _wrap(api: _Api, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    method = getattr(api, route.handler)
    if not route.forward:
        return method

    async def forwarding_handler(request: web.Request) -> web.StreamResponse:
        try:
            return await method(request)
        except NotCoordinator as exc:
            return await api.forward(request, exc)

    return forwarding_handler


def create_app(
    facade: AgentFacade,
    *,
    config: Any,
    tokens: Tokens | None,
    metrics: AgentMetrics | None = None,
    node_id: str = "",
) -> web.Application:
    """Build the aiohttp application of one agent.

    `config` is an `AgentConfig` (or an `HttpSettings`). `tokens` may be None only when tokens
    are not required (loopback bind and admin.require_token unset or false); when tokens exist
    they are still used to forward writes to a coordinator that requires them.
    """
    settings = HttpSettings.from_config(config, node_id=node_id)
    if settings.auth_on and tokens is None:
        raise ValueError(
            f"the admin endpoint on {settings.admin_host} requires tokens (non-loopback bind or "
            "admin.require_token = true) but none were loaded; run `shardmesh cluster init` or "
            "copy tokens.json into the data directory"
        )
    api = _Api(facade, settings, tokens, metrics)
    scopes: dict[tuple[str, str], Scope] = {
        (route.method, route.path): Scope(route.scope) for route in ROUTES
    }

    def scope_of(request: web.Request) -> Scope:
        resource = request.match_info.route.resource
        if resource is None:
            return Scope.ADMIN  # unknown route: answer 401 before revealing it does not exist
        method = "GET" if request.method == "HEAD" else request.method
        return scopes.get((method, resource.canonical), Scope.ADMIN)

    def on_response(request: web.Request, status: int) -> None:
        if metrics is None:
            return
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics.http_responses.labels(route, str(status)).inc()

    app = web.Application(
        client_max_size=settings.max_request_bytes,
        middlewares=[
            make_error_middleware(settings.max_request_bytes, on_response),
            make_auth_middleware(tokens if settings.auth_on else None, scope_of),
        ],
    )
    app[APP_KEY_API] = api
    for route in ROUTES:
        app.router.add_route(route.method, route.path, _wrap(api, route), name=route.handler)

    async def session_context(app: web.Application) -> Any:
        api.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S))
        logger.info(
            "node %s: admin API ready (tokens %s)", settings.node_id,
            "required" if settings.auth_on else "not required on loopback",
        )
        yield
        await api.session.close()
        logger.info("node %s: admin API stopped", settings.node_id)

    app.cleanup_ctx.append(session_context)
    return app


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving `app` on host:port (0 = a free port); returns the runner and the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, bound
