"""An in-memory `AgentFacade` for the HTTP layer's own tests.

It holds a fixed three-member cluster and two small models computed with real torch ops, and uses
the real traffic core (nodeagent.traffic) for splits and rollback. Knobs let a test make the
agent a non-coordinator (writes raise NotCoordinator), make a version fail, or slow inference
down. The real agent behind the same interface is exercised by the end-to-end tests that run
agent processes.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from nodeagent.facade import (
    AlertInfo,
    BadRequest,
    ClusterStatus,
    DeployProgress,
    DeployRequest,
    InferRequest,
    InferResult,
    InputSpec,
    ModelInfo,
    NotCoordinator,
    NotFound,
    Unavailable,
    from_traffic_error,
)
from nodeagent.traffic import ModelTraffic, TrafficError


@dataclass
class MemModel:
    name: str
    inputs: list[dict[str, Any]]
    text_input: bool
    # version -> function from the request to the outputs
    versions: dict[str, Callable[[InferRequest], dict[str, torch.Tensor]]]
    segments: dict[str, list[dict[str, Any]]]
    traffic: ModelTraffic
    states: dict[str, str] = field(default_factory=dict)
    # Groups of [input name, dimension] that must have one size, as a real manifest lists them.
    equal_dims: list[list[list[Any]]] = field(default_factory=list)


def _scaled(factor: float) -> Callable[[InferRequest], dict[str, torch.Tensor]]:
    def run(request: InferRequest) -> dict[str, torch.Tensor]:
        assert request.inputs is not None
        return {"y": request.inputs["x"] * factor}

    return run


def _lengths(request: InferRequest) -> dict[str, torch.Tensor]:
    assert request.text is not None
    return {"lengths": torch.tensor([len(t) for t in request.text], dtype=torch.int64)}


def _placement(*agents_per_segment: list[str]) -> list[dict[str, Any]]:
    return [
        {"segment": f"seg{i}", "index": i, "units": [f"unit{i}"], "agents": agents}
        for i, agents in enumerate(agents_per_segment)
    ]


class MemFacade:
    """A facade over in-memory state; see the module docstring."""

    def __init__(
        self, *, node_id: str = "node-a", is_coordinator: bool = True, leader_admin_url: str | None = None
    ) -> None:
        self.node_id = node_id
        self.is_coordinator = is_coordinator
        self.leader_admin_url = leader_admin_url
        self.fail_cluster_status = False
        self.fail_versions: set[str] = set()
        self.infer_delay_s = 0.0
        self.alert_list: list[AlertInfo] = []
        self.rng = random.Random(7)
        self.calls: list[tuple[str, Any]] = []
        self._ids = itertools.count(1)
        self.deployments: dict[str, DeployProgress] = {}
        traffic = ModelTraffic("double").add_version("v1").add_version("v2", weight=0.0)
        self.models: dict[str, MemModel] = {
            "double": MemModel(
                name="double",
                inputs=[{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
                text_input=False,
                versions={"v1": _scaled(2.0), "v2": _scaled(3.0)},
                segments={
                    "v1": _placement(["node-a"], ["node-b", "node-c"]),
                    "v2": _placement(["node-c"], ["node-b"], ["node-a"]),
                },
                traffic=traffic,
                states={"v1": "ready", "v2": "ready"},
            ),
            "embed": MemModel(
                name="embed",
                inputs=[
                    {"name": "input_ids", "dtype": "int64", "shape": [-1, -1]},
                    {"name": "attention_mask", "dtype": "int64", "shape": [-1, -1]},
                ],
                text_input=True,
                versions={"v1": _lengths},
                segments={"v1": _placement(["node-b"], ["node-c"])},
                traffic=ModelTraffic("embed").add_version("v1"),
                states={"v1": "ready"},
                equal_dims=[[["input_ids", 0], ["attention_mask", 0]], [["input_ids", 1], ["attention_mask", 1]]],
            ),
        }

    # ---- helpers ----

    def _model(self, name: str) -> MemModel:
        model = self.models.get(name)
        if model is None:
            raise NotFound(
                f"model {name!r} is not deployed; deployed models: {', '.join(sorted(self.models))}",
                field="name",
                value=name,
                expected=sorted(self.models),
            )
        return model

    def _version(self, model: MemModel, version: str) -> str:
        if version not in model.versions:
            raise NotFound(
                f"model {model.name!r} has no version {version!r}; versions: "
                f"{', '.join(sorted(model.versions))}",
                field="version",
                value=version,
                expected=sorted(model.versions),
            )
        return version

    def _write(self, operation: str, argument: Any) -> None:
        if not self.is_coordinator:
            raise NotCoordinator(self.leader_admin_url, leader_id="node-a")
        self.calls.append((operation, argument))

    def _info(self, model: MemModel) -> ModelInfo:
        return ModelInfo(
            name=model.name,
            weights=dict(model.traffic.weights),
            previous_version=model.traffic.previous,
            text_input=model.text_input,
            versions=[
                {
                    "version": v,
                    "state": model.states.get(v, "ready"),
                    "source": f"mem:{model.name}",
                    "segments": model.segments.get(v, []),
                }
                for v in sorted(model.versions)
            ],
        )

    # ---- the facade ----

    async def cluster_status(self) -> ClusterStatus:
        if self.fail_cluster_status:
            raise RuntimeError("simulated bug in the agent")
        members = [
            {"node_id": "node-a", "role": "coordinator", "state": "alive", "address": "127.0.0.1:7001",
             "capabilities": {"devices": ["cpu"]}, "health": {"loop_lag_ms": 0.4, "inflight": 0}},
            {"node_id": "node-b", "role": "voter", "state": "alive", "address": "127.0.0.1:7002",
             "capabilities": {"devices": ["cpu"]}, "health": {"loop_lag_ms": 0.6, "inflight": 1}},
            {"node_id": "node-c", "role": "voter", "state": "suspect", "address": "127.0.0.1:7003",
             "capabilities": {"devices": ["cpu", "cuda:0"]}, "health": {"loop_lag_ms": 9.5, "inflight": 0}},
        ]
        return ClusterStatus(
            cluster="memtest",
            node_id=self.node_id,
            coordinator={"node_id": "node-a", "admin_url": self.leader_admin_url},
            epoch=4,
            plan_version=12,
            members=members,  # type: ignore[typeddict-item]
        )

    async def discovery_status(self) -> dict[str, Any]:
        return {"mdns": {"enabled": False}, "static_peers": ["127.0.0.1:7002"], "found": ["node-b", "node-c"]}

    async def list_models(self) -> list[ModelInfo]:
        return [self._info(m) for _, m in sorted(self.models.items())]

    async def get_model(self, name: str) -> ModelInfo:
        return self._info(self._model(name))

    async def deploy(self, request: DeployRequest) -> DeployProgress:
        self._write("deploy", request)
        if request.source.startswith("missing:"):
            raise BadRequest(
                f"source {request.source!r} does not exist",
                field="source",
                value=request.source,
                expected="a packaged model name",
            )
        progress = DeployProgress(
            id=f"dep{next(self._ids)}", model=request.name, version=request.version,
            state="pending", percent=0.0, message="queued",
        )
        self.deployments[progress.id] = progress
        return progress

    async def deploy_progress(self, deployment_id: str) -> dict[str, Any]:
        if not self.is_coordinator:
            raise NotCoordinator(self.leader_admin_url, leader_id="node-a")
        progress = self.deployments.get(deployment_id)
        if progress is None:
            raise NotFound(
                f"deployment {deployment_id!r} does not exist",
                field="id",
                value=deployment_id,
                expected=sorted(self.deployments),
            )
        if progress.state != "ready":
            progress.percent = min(100.0, progress.percent + 50.0)
            progress.state = "ready" if progress.percent >= 100.0 else "distributing"
            progress.message = "all segments loaded" if progress.state == "ready" else "sending segments"
        return progress.to_dict()

    async def set_traffic(self, name: str, weights: dict[str, float]) -> ModelInfo:
        model = self._model(name)
        self._write("set_traffic", (name, weights))
        try:
            model.traffic = model.traffic.set_weights(weights)
        except TrafficError as exc:
            raise from_traffic_error(exc) from None
        return self._info(model)

    async def rollback(self, name: str) -> ModelInfo:
        model = self._model(name)
        self._write("rollback", name)
        try:
            model.traffic = model.traffic.rollback()
        except TrafficError as exc:
            raise from_traffic_error(exc) from None
        return self._info(model)

    async def delete_version(self, name: str, version: str) -> ModelInfo:
        model = self._model(name)
        self._version(model, version)
        self._write("delete_version", (name, version))
        try:
            model.traffic = model.traffic.delete_version(version)
        except TrafficError as exc:
            raise from_traffic_error(exc) from None
        del model.versions[version]
        return self._info(model)

    async def infer(self, request: InferRequest) -> InferResult:
        model = self._model(request.model)
        if request.version is not None:
            version = self._version(model, request.version)
        else:
            version = model.traffic.choose(request.request_key, rng=self.rng)
        if self.infer_delay_s:
            await asyncio.sleep(self.infer_delay_s)
        if version in self.fail_versions:
            raise Unavailable(f"no replica of {request.model} {version} is alive", reason="no_replica",
                              retry_after_s=2.0)
        self.calls.append(("infer", request))
        outputs = model.versions[version](request)
        route = [seg["agents"][0] for seg in model.segments[version]]
        return InferResult(outputs=outputs, version=version, request_id=f"req{next(self._ids)}",
                           route=route, timings={"total": 0.001})

    async def alerts(self) -> list[AlertInfo]:
        return list(self.alert_list)

    async def input_spec(self, name: str, version: str | None) -> InputSpec:
        model = self._model(name)
        if version is None:
            weights = model.traffic.weights
            version = max(weights, key=lambda v: weights[v])
        self._version(model, version)
        return InputSpec(model=name, version=version, inputs=model.inputs, text_input=model.text_input,
                         tasks=["embed"] if model.text_input else [], equal_dims=model.equal_dims)
