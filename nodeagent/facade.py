"""The interface between the HTTP layer and the node agent.

The admin API, the inference gateway, the status page and the CLI see the agent only through
`AgentFacade`. The agent implements it; the HTTP layer's unit tests use an in-memory version. The
HTTP layer never reaches into agent internals, so the agent can change its actors freely as long
as these methods keep their meaning.

Failures cross this boundary as the exception types below, never as HTTP status codes: the agent
raises `NotFound`, `BadRequest`, `Conflict`, `Unavailable`, `DeadlineExceeded` or
`NotCoordinator`, and the HTTP layer alone maps them to 404, 400/422, 409, 503, 504 or a request
forwarded to the coordinator.

The dict shapes returned by the read methods are written down as `TypedDict`s so that the status
page, the CLI and the OpenAPI document agree with the agent on the field names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypedDict, runtime_checkable

import torch

from nodeagent.traffic import RollbackUnavailable, TrafficError, VersionInUse

# --------------------------------------------------------------------------------------------
# Errors raised by the facade
# --------------------------------------------------------------------------------------------


class FacadeError(Exception):
    """Base class of the errors that the HTTP layer maps to a status code.

    `field` names the request field at fault (a dotted path such as `inputs.x.shape`), `value` the
    value received, and `expected` what would have been accepted. Each is None when it does not
    apply.
    """

    code: str = "error"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        value: Any = None,
        expected: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.value = value
        self.expected = expected


class NotFound(FacadeError):
    """A model, version or deployment does not exist (HTTP 404); `expected` lists those that do."""

    code = "not_found"


class BadRequest(FacadeError):
    """The request is invalid (HTTP 400, or 422 when well-formed but wrong for the model)."""

    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        value: Any = None,
        expected: Any = None,
        status: int = 400,
    ) -> None:
        super().__init__(message, field=field, value=value, expected=expected)
        if status not in (400, 422):
            raise ValueError(f"BadRequest status must be 400 or 422, got {status}")
        self.status = status


class Conflict(FacadeError):
    """The request contradicts the current state, such as deleting a version that serves traffic
    (HTTP 409)."""

    code = "conflict"


class Unavailable(FacadeError):
    """The cluster cannot serve the request now (HTTP 503).

    `reason` is a short machine-readable tag such as `no_coordinator`, `no_replica` or
    `deadline_unreachable`; `retry_after_s` becomes the Retry-After header when set.
    """

    code = "unavailable"

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        retry_after_s: float | None = None,
        field: str | None = None,
        value: Any = None,
        expected: Any = None,
    ) -> None:
        super().__init__(message, field=field, value=value, expected=expected)
        self.reason = reason
        self.retry_after_s = retry_after_s


class DeadlineExceeded(FacadeError):
    """The request's deadline passed while it was running (HTTP 504)."""

    code = "deadline_exceeded"


class NotCoordinator(FacadeError):
    """A write operation reached an agent that is not the coordinator.

    The HTTP layer forwards the request to `leader_admin_url` (for example
    `http://10.0.0.5:8470`), or answers 503 when it is None because no coordinator is known.
    """

    code = "not_coordinator"

    def __init__(self, leader_admin_url: str | None, *, leader_id: str | None = None) -> None:
        where = leader_admin_url or "unknown (no coordinator elected)"
        super().__init__(f"this agent is not the coordinator; the coordinator is at {where}")
        self.leader_admin_url = leader_admin_url
        self.leader_id = leader_id


# --------------------------------------------------------------------------------------------
# Request and result records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeployRequest:
    """A request to deploy one version of a model.

    `source` names where the model comes from (a packaged zoo name such as `minilm`, or a path on
    the coordinator); `strategy` is `replace` (all traffic moves to the new version once it is
    ready) or `canary` (the new version starts at `options["canary_weight"]`, default 0.1).
    """

    name: str
    version: str
    source: str
    strategy: Literal["replace", "canary"] = "replace"
    replicas: int = 1
    options: dict[str, Any] = field(default_factory=dict)


DeployState = Literal["pending", "distributing", "loading", "ready", "failed"]


@dataclass
class DeployProgress:
    """The progress resource of one deployment, served at GET /v1/deployments/{id}."""

    id: str
    model: str
    version: str
    state: DeployState
    percent: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "state": self.state,
            "percent": self.percent,
            "message": self.message,
        }


@dataclass(frozen=True)
class InferRequest:
    """One inference request as the gateway hands it to the agent.

    Exactly one of `inputs` and `text` is set. `version` pins a version, otherwise the traffic
    split chooses one (sticky for a given `request_key`). `priority` is one of "high", "normal"
    and "low", the classes of the segment queues. `deadline_s` is the time budget in seconds
    counted from `received_monotonic` (a `time.monotonic()` value), or None for no deadline.
    """

    model: str
    version: str | None
    inputs: dict[str, torch.Tensor] | None
    text: list[str] | None
    task: str | None = None
    priority: str = "normal"
    deadline_s: float | None = None
    request_key: str | None = None
    received_monotonic: float = field(default_factory=time.monotonic)

    def deadline_monotonic(self) -> float | None:
        """Return the absolute `time.monotonic()` deadline, or None when there is none."""
        if self.deadline_s is None:
            return None
        return self.received_monotonic + self.deadline_s


@dataclass(frozen=True)
class InferResult:
    """The outputs of one request; `route` lists the agent that ran each segment, in order, and
    `timings` contains named durations in seconds (for example `queue`, `compute`, `total`)."""

    outputs: dict[str, torch.Tensor]
    version: str
    request_id: str
    route: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    failovers: int = 0  # times the request resumed from a segment boundary on another route


# --------------------------------------------------------------------------------------------
# Shapes of the dicts returned by the read methods
# --------------------------------------------------------------------------------------------


class CoordinatorInfo(TypedDict):
    node_id: str
    admin_url: str | None


class MemberInfo(TypedDict, total=False):
    node_id: str  # required
    role: str  # "coordinator", "voter", "witness" or "agent"
    state: str  # "alive", "suspect", "dead" or "left"
    address: str  # peer address, "host:port"
    admin_url: str | None
    capabilities: dict[str, Any]  # devices, cpu_count, memory_bytes, measured speed
    health: dict[str, Any]  # self: loop_lag_ms, inflight, degraded; peers: queue, degraded, rtt_ms, silent_s


class ClusterStatus(TypedDict, total=False):
    cluster: str
    node_id: str  # the agent that served this response
    coordinator: CoordinatorInfo | None
    epoch: int
    plan_version: int
    members: list[MemberInfo]


class SegmentPlacement(TypedDict, total=False):
    segment: str  # segment id
    index: int  # position in the pipeline, from 0
    units: list[str]  # model units the segment runs
    agents: list[str]  # node ids holding a replica


class VersionInfo(TypedDict, total=False):
    version: str
    state: str  # a DeployState
    source: str
    segments: list[SegmentPlacement]
    stats: dict[str, float]  # added by the gateway: rate_per_s, p50_ms, p99_ms, error_rate


class ModelInfo(TypedDict, total=False):
    name: str
    versions: list[VersionInfo]
    weights: dict[str, float]
    previous_version: str | None
    text_input: bool


class TensorSpec(TypedDict):
    name: str
    dtype: str  # torch dtype name without the prefix, e.g. "float32", "int64"
    shape: list[int]  # -1 marks a dynamic dimension


class InputSpec(TypedDict, total=False):
    model: str
    version: str
    inputs: list[TensorSpec]
    text_input: bool  # whether {"text": [...]} is accepted (the model ships a tokenizer)
    tasks: list[str]  # accepted values of the optional `task` field; empty = none
    equal_dims: list[list[list[Any]]]  # groups of [input name, dimension] that need one size


class AlertInfo(TypedDict, total=False):
    name: str
    metric: str
    value: float
    threshold: float
    comparison: str
    window_s: float
    since: float  # Unix time the alarm started
    message: str


# --------------------------------------------------------------------------------------------
# The facade
# --------------------------------------------------------------------------------------------


@runtime_checkable
class AgentFacade(Protocol):
    """What the HTTP layer needs from a node agent.

    Write methods (`deploy`, `set_traffic`, `rollback`, `delete_version`) raise `NotCoordinator`
    on an agent that is not the coordinator; the HTTP layer then forwards the request.
    `deploy_progress` may raise it too when progress lives only on the coordinator.
    """

    async def cluster_status(self) -> ClusterStatus: ...

    async def discovery_status(self) -> dict[str, Any]: ...

    async def list_models(self) -> list[ModelInfo]: ...

    async def get_model(self, name: str) -> ModelInfo: ...

    async def deploy(self, request: DeployRequest) -> DeployProgress: ...

    async def deploy_progress(self, deployment_id: str) -> dict[str, Any]: ...

    async def set_traffic(self, name: str, weights: dict[str, float]) -> ModelInfo: ...

    async def rollback(self, name: str) -> ModelInfo: ...

    async def delete_version(self, name: str, version: str) -> ModelInfo: ...

    async def infer(self, request: InferRequest) -> InferResult: ...

    async def alerts(self) -> list[AlertInfo]: ...

    async def input_spec(self, name: str, version: str | None) -> InputSpec:
        """Return the input spec of `version`, or of the version most traffic goes to when None."""
        ...


def from_traffic_error(exc: Exception) -> FacadeError:
    """Map a `nodeagent.traffic.TrafficError` to the facade error the HTTP layer expects.

    A version still in use and a missing rollback target are conflicts with the current state
    (409); any other invalid split is a request that does not fit the model (422).
    """
    if not isinstance(exc, TrafficError):
        raise TypeError(f"expected a TrafficError, got {type(exc).__name__}")
    if isinstance(exc, (RollbackUnavailable, VersionInUse)):
        return Conflict(str(exc), field=exc.field, value=exc.value, expected=exc.expected)
    return BadRequest(str(exc), field=exc.field, value=exc.value, expected=exc.expected, status=422)
