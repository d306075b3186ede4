"""Tests of the admin and inference HTTP layer over a real aiohttp server on 127.0.0.1.

The agent behind the routes is tests.memfacade.MemFacade, an in-memory implementation of
AgentFacade: these tests are about the HTTP layer (parsing, checks, status codes, auth,
forwarding, documentation), and the real agent behind the same interface is covered by the
end-to-end tests that start agent processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import msgpack
import pytest
import torch
from aiohttp import web

from nodeagent.client import add_subcommands
from nodeagent.config import AgentConfig
from nodeagent.http_api import ROUTES, create_app, start_server
from nodeagent.http_auth import TokenFileError, Tokens, generate_tokens, load_tokens
from nodeagent.http_infer import MAX_TEXT_CHARS, MAX_TEXT_TOTAL_CHARS, decode_msgpack_response, encode_msgpack_request
from nodeagent.metrics import AgentMetrics
from protocol.tensors import encode_tensors, tensor_from_json, tensor_to_json
from memfacade import MemFacade  # tests/ is on sys.path (rootdir conftest)

TOKENS = Tokens(admin="smadm_" + "a" * 43, infer="sminf_" + "b" * 43)
ADMIN = {"Authorization": f"Bearer {TOKENS.admin}"}
INFER = {"Authorization": f"Bearer {TOKENS.infer}"}
SMALL_LIMIT = 4096  # bytes; the smallest limit the config accepts is 1024

Start = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Start]:
    """Start apps on 127.0.0.1 with a free port; every one is cleaned up after the test."""
    runners: list[web.AppRunner] = []
    apps: dict[str, web.Application] = {}

    async def start(
        facade: MemFacade | None = None,
        *,
        require_token: bool | None = None,
        admin_host: str = "127.0.0.1",
        max_request_bytes: int = 64 * 1024 * 1024,
        tokens: Tokens | None = None,
        metrics: AgentMetrics | None = None,
    ) -> str:
        facade = facade or MemFacade()
        config = AgentConfig.with_profile(
            "test",
            {
                "network.admin_host": admin_host,
                "admin.require_token": require_token,
                "limits.max_request_bytes": max_request_bytes,
            },
        )
        app = create_app(facade, config=config, tokens=tokens, metrics=metrics, node_id=facade.node_id)
        runner, port = await start_server(app, "127.0.0.1", 0)
        runners.append(runner)
        url = f"http://127.0.0.1:{port}"
        apps[url] = app
        return url

    start.apps = apps  # type: ignore[attr-defined]
    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


def x_tensor(rows: int = 2) -> torch.Tensor:
    return torch.arange(rows * 4, dtype=torch.float32).reshape(rows, 4) / 3.0


def infer_body(**extra: Any) -> dict[str, Any]:
    return {"inputs": {"x": tensor_to_json(x_tensor())}, **extra}


async def error_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    body = await response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "field", "value", "expected"}
    return body["error"]


# ---- reads ---------------------------------------------------------------------------------


async def test_healthz_answers_without_token(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve(require_token=True, tokens=TOKENS)
    async with http.get(f"{base}/healthz") as r:
        assert r.status == 200
        assert (await r.json())["status"] == "ok"


async def test_cluster_lists_members(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve()
    async with http.get(f"{base}/v1/cluster") as r:
        assert r.status == 200
        body = await r.json()
    assert [m["node_id"] for m in body["members"]] == ["node-a", "node-b", "node-c"]
    assert body["coordinator"]["node_id"] == "node-a"
    assert body["epoch"] == 4


async def test_models_include_gateway_stats(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve(metrics=AgentMetrics("node-a", collect_host=False))
    for _ in range(3):
        async with http.post(f"{base}/v1/models/double/infer", json=infer_body()) as r:
            assert r.status == 200
    async with http.get(f"{base}/v1/models") as r:
        models = {m["name"]: m for m in await r.json()}
    v1 = next(v for v in models["double"]["versions"] if v["version"] == "v1")
    assert v1["stats"]["requests"] == 3
    assert v1["stats"]["p99_ms"] is not None
    assert v1["segments"][1]["agents"] == ["node-b", "node-c"]


# ---- inference -----------------------------------------------------------------------------


async def test_infer_json_roundtrip(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve()
    async with http.post(f"{base}/v1/models/double/infer", json=infer_body()) as r:
        assert r.status == 200
        assert r.headers["X-Request-Id"]
        body = await r.json()
    assert body["version"] == "v1"
    assert body["route"] == ["node-a", "node-b"]
    y = tensor_from_json(body["outputs"]["y"])
    assert torch.equal(y, x_tensor() * 2.0)


async def test_infer_msgpack_roundtrip(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve()
    x = torch.randn(3, 4)
    body = encode_msgpack_request({"x": x}, version="v2", priority="high", deadline_ms=5000)
    headers = {"Content-Type": "application/msgpack"}
    async with http.post(f"{base}/v1/models/double/infer", data=body, headers=headers) as r:
        assert r.status == 200
        assert r.content_type == "application/msgpack"
        answer = decode_msgpack_response(await r.read())
    assert answer["version"] == "v2"
    assert torch.equal(answer["outputs"]["y"], x * 3.0)


async def test_infer_json_answer_for_msgpack_request(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve()
    body = encode_msgpack_request({"x": x_tensor()})
    headers = {"Content-Type": "application/msgpack", "Accept": "application/json"}
    async with http.post(f"{base}/v1/models/double/infer", data=body, headers=headers) as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        assert torch.equal(tensor_from_json((await r.json())["outputs"]["y"]), x_tensor() * 2.0)


async def test_infer_text_input(serve: Start, http: aiohttp.ClientSession) -> None:
    facade = MemFacade()
    base = await serve(facade)
    texts = ["A man is eating food.", "hi"]
    async with http.post(f"{base}/v1/models/embed/infer", json={"text": texts, "task": "embed"}) as r:
        assert r.status == 200
        body = await r.json()
    assert tensor_from_json(body["outputs"]["lengths"]).tolist() == [21, 2]
    request = facade.calls[-1][1]
    assert request.text == texts
    assert request.inputs is None


@pytest.mark.parametrize(("texts", "field", "words"), [
    (["a" * (MAX_TEXT_CHARS + 1)], "text[0]", "cut it, or split it"),
    (["b" * MAX_TEXT_CHARS] * (MAX_TEXT_TOTAL_CHARS // MAX_TEXT_CHARS + 1), "text", "several requests"),
])
async def test_infer_text_too_long_rejected(serve: Start, http: aiohttp.ClientSession, texts: list[str],
                                            field: str, words: str) -> None:
    facade = MemFacade()
    base = await serve(facade)
    async with http.post(f"{base}/v1/models/embed/infer", json={"text": texts, "task": "embed"}) as r:
        assert r.status == 400
        error = (await r.json())["error"]
    assert error["field"] == field, error
    assert words in error["message"], error
    assert len(str(error["value"])) < 100  # the text itself is not echoed back
    assert not facade.calls


async def test_infer_without_content_type_reads_json(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve(MemFacade())
    body = json.dumps(infer_body()).encode()
    async with http.post(f"{base}/v1/models/double/infer", data=body, skip_auto_headers=["Content-Type"]) as r:
        assert r.status == 200, await r.text()
        outputs = (await r.json())["outputs"]
    assert torch.equal(tensor_from_json(outputs["y"]), x_tensor() * 2.0)


async def test_infer_passes_options_to_agent(serve: Start, http: aiohttp.ClientSession) -> None:
    facade = MemFacade()
    base = await serve(facade)
    body = infer_body(priority="low", deadline_ms=2500, request_key="user-17")
    async with http.post(f"{base}/v1/models/double/infer", json=body) as r:
        assert r.status == 200
    request = facade.calls[-1][1]
    assert request.priority == "low"
    assert request.deadline_s == pytest.approx(2.5)
    assert request.request_key == "user-17"
    assert request.version is None


async def test_infer_request_key_is_sticky(serve: Start, http: aiohttp.ClientSession) -> None:
    facade = MemFacade()
    base = await serve(facade)
    async with http.put(f"{base}/v1/models/double/traffic", json={"v1": 0.5, "v2": 0.5}) as r:
        assert r.status == 200
    seen: dict[str, set[str]] = {}
    for key in ("alice", "bob", "carol", "dave"):
        for _ in range(4):
            async with http.post(f"{base}/v1/models/double/infer", json=infer_body(request_key=key)) as r:
                seen.setdefault(key, set()).add((await r.json())["version"])
    assert all(len(versions) == 1 for versions in seen.values()), seen


# ---- bad input -----------------------------------------------------------------------------

BAD_INFER_CASES: list[tuple[str, str, Any, str, int, str]] = [
    # (case, model, body or raw bytes, content type, expected status, expected field)
    ("malformed_json", "double", b'{"inputs": {', "application/json", 400, "body"),
    ("json_not_object", "double", b"[1, 2]", "application/json", 400, "body"),
    ("malformed_msgpack", "double", b"\xc1\xff\x00", "application/msgpack", 400, "body"),
    ("empty_msgpack", "double", b"", "application/msgpack", 400, "body"),
    ("msgpack_not_map", "double", msgpack.packb([1, 2]), "application/msgpack", 400, "body"),
    ("wrong_dtype", "double", {"inputs": {"x": tensor_to_json(torch.zeros(2, 4, dtype=torch.int64))}},
     "application/json", 422, "inputs.x.dtype"),
    ("wrong_shape", "double", {"inputs": {"x": tensor_to_json(torch.zeros(2, 5))}},
     "application/json", 422, "inputs.x.shape"),
    ("wrong_rank", "double", {"inputs": {"x": tensor_to_json(torch.zeros(4))}},
     "application/json", 422, "inputs.x.shape"),
    ("missing_input", "embed", {"inputs": {"input_ids": tensor_to_json(torch.zeros(1, 3, dtype=torch.int64))}},
     "application/json", 422, "inputs.attention_mask"),
    ("empty_sequence", "embed", {"task": "embed", "inputs": {
        "input_ids": tensor_to_json(torch.zeros(1, 0, dtype=torch.int64)),
        "attention_mask": tensor_to_json(torch.ones(1, 0, dtype=torch.int64))}},
     "application/json", 422, "inputs.input_ids.shape"),
    ("empty_batch", "double", {"inputs": {"x": tensor_to_json(torch.zeros(0, 4))}},
     "application/json", 422, "inputs.x.shape"),
    ("unequal_lengths", "embed", {"task": "embed", "inputs": {
        "input_ids": tensor_to_json(torch.zeros(1, 3, dtype=torch.int64)),
        "attention_mask": tensor_to_json(torch.ones(1, 2, dtype=torch.int64))}},
     "application/json", 422, "inputs.attention_mask.shape"),
    ("unexpected_input", "double", {"inputs": {"x": tensor_to_json(torch.zeros(1, 4)),
                                               "z": tensor_to_json(torch.zeros(1))}},
     "application/json", 422, "inputs.z"),
    ("data_shape_mismatch", "double", {"inputs": {"x": {"dtype": "float32", "shape": [2, 4], "data": [[1, 2]]}}},
     "application/json", 400, "inputs.x.data"),
    ("unknown_dtype", "double", {"inputs": {"x": {"dtype": "float99", "shape": [1], "data": [1]}}},
     "application/json", 400, "inputs.x.dtype"),
    ("unknown_model", "nosuch", infer_body(), "application/json", 404, "name"),
    ("unknown_version", "double", infer_body(version="v9"), "application/json", 404, "version"),
    ("deadline_passed", "double", infer_body(deadline_ms=0), "application/json", 400, "deadline_ms"),
    ("deadline_negative", "double", infer_body(deadline_ms=-30), "application/json", 400, "deadline_ms"),
    ("deadline_not_number", "double", infer_body(deadline_ms="soon"), "application/json", 400, "deadline_ms"),
    ("deadline_too_long", "double", infer_body(deadline_ms=10**9), "application/json", 400, "deadline_ms"),
    ("bad_priority", "double", infer_body(priority="urgent"), "application/json", 400, "priority"),
    ("unknown_field", "double", infer_body(temperature=0.7), "application/json", 400, "temperature"),
    ("text_for_tensor_model", "double", {"text": ["hello"]}, "application/json", 422, "text"),
    ("text_not_list", "embed", {"text": "hello"}, "application/json", 400, "text"),
    ("both_forms", "embed", {"text": ["a"], "inputs": {}}, "application/json", 400, "inputs"),
    ("unknown_task", "embed", {"text": ["a"], "task": "classify"}, "application/json", 422, "task"),
    ("bad_media_type", "double", b"x=1", "application/x-www-form-urlencoded", 415, "Content-Type"),
    ("msgpack_nbytes_mismatch", "double",
     msgpack.packb({"inputs": [{"name": "x", "dtype": "float32", "shape": [2, 4], "nbytes": 999}],
                    "payload": b"\x00" * 32}),
     "application/msgpack", 400, "inputs[0]"),
    ("msgpack_payload_not_bin", "double",
     msgpack.packb({"inputs": encode_tensors({"x": torch.zeros(1, 4)})[0], "payload": "text"}),
     "application/msgpack", 400, "payload"),
]


@pytest.mark.parametrize(
    "case,model,body,content_type,status,field", BAD_INFER_CASES, ids=[c[0] for c in BAD_INFER_CASES]
)
async def test_infer_bad_input_names_field(
    serve: Start, http: aiohttp.ClientSession, case: str, model: str, body: Any, content_type: str,
    status: int, field: str,
) -> None:
    facade = MemFacade()
    base = await serve(facade)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(f"{base}/v1/models/{model}/infer", data=data,
                         headers={"Content-Type": content_type}) as r:
        assert r.status == status
        error = await error_of(r)
    assert error["field"] is not None and error["field"].startswith(field), error
    assert error["message"]
    assert error["value"] is not None or error["expected"] is not None, error
    assert not any(name == "infer" for name, _ in facade.calls), "bad input reached the agent"
    async with http.get(f"{base}/healthz") as r:
        assert r.status == 200


async def test_infer_malformed_msgpack_gives_reason(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve(MemFacade())
    async with http.post(f"{base}/v1/models/double/infer", data=b"\xc1\xff\x00",
                         headers={"Content-Type": "application/msgpack"}) as r:
        assert r.status == 400
        error = await error_of(r)
    assert "FormatError" in error["message"], error
    assert "msgpack.packb" in error["message"], error
    async with http.post(f"{base}/v1/models/double/infer", data=b"",
                         headers={"Content-Type": "application/msgpack"}) as r:
        assert r.status == 400
        error = await error_of(r)
    assert "body is empty" in error["message"], error
    # A wrong nbytes names the tensor, its wire dtype and the right byte count.
    body = msgpack.packb({"inputs": [{"name": "x", "dtype": "float32", "shape": [2, 4], "nbytes": 999}],
                          "payload": b"\x00" * 32})
    async with http.post(f"{base}/v1/models/double/infer", data=body,
                         headers={"Content-Type": "application/msgpack"}) as r:
        assert r.status == 400
        error = await error_of(r)
    assert "tensor 'x': nbytes is 999, but shape [2, 4] of float32 takes 32 bytes" in error["message"], error
    assert error["field"] == "inputs[0].nbytes", error


async def test_infer_unknown_model_lists_available(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve()
    async with http.post(f"{base}/v1/models/nosuch/infer", json=infer_body()) as r:
        assert r.status == 404
        error = await error_of(r)
    assert error["value"] == "nosuch"
    assert error["expected"] == ["double", "embed"]
    assert "nosuch" in error["message"]


async def test_infer_unknown_version_lists_available(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve()
    async with http.post(f"{base}/v1/models/double/infer", json=infer_body(version="v9")) as r:
        error = await error_of(r)
    assert error["value"] == "v9"
    assert error["expected"] == ["v1", "v2"]


async def test_infer_wrong_shape_reports_values(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve()
    body = {"inputs": {"x": tensor_to_json(torch.zeros(3, 7))}}
    async with http.post(f"{base}/v1/models/double/infer", json=body) as r:
        error = await error_of(r)
    assert error["value"] == [3, 7]
    assert error["expected"] == [-1, 4]


async def test_body_over_limit_gets_413(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve(max_request_bytes=SMALL_LIMIT)
    body = json.dumps(infer_body(request_key="k" * (2 * SMALL_LIMIT))).encode()
    async with http.post(f"{base}/v1/models/double/infer", data=body,
                         headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
        error = await error_of(r)
    assert str(SMALL_LIMIT) in error["message"]
    assert "limits.max_request_bytes" in error["message"]
    assert error["value"] == len(body)


async def test_chunked_body_over_limit_gets_413(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve(max_request_bytes=SMALL_LIMIT)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b" " * 1024

    async with http.post(f"{base}/v1/models/double/infer", data=chunks(),
                         headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
        error = await error_of(r)
    assert "limits.max_request_bytes" in error["message"]


async def test_deadline_exceeded_gives_504(serve: Start, http: aiohttp.ClientSession) -> None:
    facade = MemFacade()
    facade.infer_delay_s = 3.0
    base = await serve(facade)
    async with http.post(f"{base}/v1/models/double/infer", json=infer_body(deadline_ms=50)) as r:
        assert r.status == 504
        error = await error_of(r)
    assert error["field"] == "deadline_ms"


async def test_unavailable_gives_503_retry_after(serve: Start, http: aiohttp.ClientSession) -> None:
    facade = MemFacade()
    facade.fail_versions.add("v1")
    base = await serve(facade)
    async with http.post(f"{base}/v1/models/double/infer", json=infer_body()) as r:
        assert r.status == 503
        assert r.headers["Retry-After"] == "2"
        error = await error_of(r)
    assert error["code"] == "no_replica"


async def test_agent_bug_gives_500_and_server_survives(
    serve: Start, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    facade = MemFacade()
    facade.fail_cluster_status = True
    base = await serve(facade)
    with caplog.at_level(logging.ERROR, logger="nodeagent.http_errors"):
        async with http.get(f"{base}/v1/cluster") as r:
            assert r.status == 500
            error = await error_of(r)
    incident = re.search(r"incident ([0-9a-f]{12})", error["message"])
    assert incident is not None
    assert any(incident.group(1) in rec.getMessage() for rec in caplog.records)
    async with http.get(f"{base}/v1/models") as r:
        assert r.status == 200


async def test_unknown_route_gives_json_404(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve()
    async with http.get(f"{base}/v2/nothing") as r:
        assert r.status == 404
        error = await error_of(r)
    assert error["value"] == "/v2/nothing"


async def test_wrong_method_gives_json_405(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve()
    async with http.delete(f"{base}/v1/cluster") as r:
        assert r.status == 405
        error = await error_of(r)
    assert error["value"] == "DELETE"
    assert "GET" in error["expected"]


# ---- writes --------------------------------------------------------------------------------


async def test_deploy_returns_progress(serve: Start, http: aiohttp.ClientSession) -> None:
    facade = MemFacade()
    base = await serve(facade)
    body = {"name": "double", "version": "v3", "source": "mem:double", "strategy": "canary", "replicas": 2}
    async with http.post(f"{base}/v1/models", json=body) as r:
        assert r.status == 202
        progress = await r.json()
        location = r.headers["Location"]
    assert location == f"/v1/deployments/{progress['id']}"
    assert progress["state"] == "pending"
    states = []
    for _ in range(2):
        async with http.get(f"{base}{location}") as r:
            states.append((await r.json())["state"])
    assert states == ["distributing", "ready"]
    request = facade.calls[0][1]
    assert (request.strategy, request.replicas) == ("canary", 2)


@pytest.mark.parametrize(
    "body,field",
    [
        ({"version": "v3", "source": "s"}, "name"),
        ({"name": "a/b", "version": "v3", "source": "s"}, "name"),
        ({"name": "m", "version": 3, "source": "s"}, "version"),
        ({"name": "m", "version": "v3", "source": "s", "strategy": "yolo"}, "strategy"),
        ({"name": "m", "version": "v3", "source": "s", "replicas": 0}, "replicas"),
        ({"name": "m", "version": "v3", "source": "s", "color": "red"}, "color"),
        ({"name": "m", "version": "v3", "source": "missing:model"}, "source"),
    ],
    ids=["missing_name", "bad_name", "version_type", "strategy", "replicas", "unknown_key", "agent_rejects"],
)
async def test_deploy_bad_body_names_field(
    serve: Start, http: aiohttp.ClientSession, body: dict[str, Any], field: str
) -> None:
    base = await serve()
    async with http.post(f"{base}/v1/models", json=body) as r:
        assert r.status == 400
        error = await error_of(r)
    assert error["field"] == field


async def test_deployment_unknown_id_404(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve()
    async with http.get(f"{base}/v1/deployments/dep404") as r:
        assert r.status == 404
        error = await error_of(r)
    assert error["value"] == "dep404"


async def test_traffic_then_rollback(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve()
    async with http.put(f"{base}/v1/models/double/traffic", json={"v1": 0.8, "v2": 0.2}) as r:
        assert r.status == 200
        model = await r.json()
    assert model["weights"] == {"v1": 0.8, "v2": 0.2}
    assert model["previous_version"] == "v1"
    async with http.post(f"{base}/v1/models/double/rollback") as r:
        assert r.status == 200
        model = await r.json()
    assert model["weights"] == {"v1": 1.0, "v2": 0.0}
    assert [v["version"] for v in model["versions"]] == ["v1", "v2"]  # v2 stays loaded
    async with http.post(f"{base}/v1/models/double/rollback") as r:
        assert r.status == 409
        error = await error_of(r)
    assert error["field"] == "previous_version"


@pytest.mark.parametrize(
    "weights,status,field",
    [
        ({"v9": 1.0}, 422, "weights.v9"),
        ({"v1": -1.0}, 422, "weights.v1"),
        ({"v1": 0.0, "v2": 0.0}, 422, "weights"),
        ({"v1": "half"}, 400, "weights.v1"),
        ([0.5, 0.5], 400, "body"),
    ],
    ids=["unknown_version", "negative", "zero_sum", "not_number", "not_object"],
)
async def test_traffic_invalid_names_field(
    serve: Start, http: aiohttp.ClientSession, weights: Any, status: int, field: str
) -> None:
    base = await serve()
    async with http.put(f"{base}/v1/models/double/traffic", json=weights) as r:
        assert r.status == status
        error = await error_of(r)
    assert error["field"] == field


async def test_delete_version_in_use_conflicts(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve()
    async with http.delete(f"{base}/v1/models/double/versions/v1") as r:
        assert r.status == 409
        error = await error_of(r)
    assert error["expected"] == ["v2"]
    async with http.delete(f"{base}/v1/models/double/versions/v2") as r:
        assert r.status == 200
        assert [v["version"] for v in (await r.json())["versions"]] == ["v1"]


# ---- forwarding to the coordinator ---------------------------------------------------------


async def test_write_forwarded_to_coordinator(serve: Start, http: aiohttp.ClientSession) -> None:
    coordinator = MemFacade(node_id="node-a")
    coordinator_url = await serve(coordinator, require_token=True, tokens=TOKENS)
    gateway = MemFacade(node_id="node-b", is_coordinator=False, leader_admin_url=coordinator_url)
    # The gateway is loopback-only with no token required, but it has the cluster tokens and
    # uses the admin token toward the coordinator, which requires one.
    gateway_url = await serve(gateway, tokens=TOKENS)
    async with http.put(f"{gateway_url}/v1/models/double/traffic", json={"v1": 0.5, "v2": 0.5}) as r:
        assert r.status == 200
        assert r.headers["X-Shardmesh-Forwarded-To"] == coordinator_url
        assert (await r.json())["weights"] == {"v1": 0.5, "v2": 0.5}
    assert coordinator.calls == [("set_traffic", ("double", {"v1": 0.5, "v2": 0.5}))]
    assert gateway.calls == []


async def test_deploy_forwarded_keeps_location(serve: Start, http: aiohttp.ClientSession) -> None:
    coordinator = MemFacade(node_id="node-a")
    coordinator_url = await serve(coordinator)
    gateway_url = await serve(MemFacade(node_id="node-b", is_coordinator=False, leader_admin_url=coordinator_url))
    body = {"name": "double", "version": "v3", "source": "mem:double"}
    async with http.post(f"{gateway_url}/v1/models", json=body) as r:
        assert r.status == 202
        location = r.headers["Location"]
    async with http.get(f"{gateway_url}{location}") as r:  # progress is forwarded too
        assert r.status == 200
        assert (await r.json())["state"] == "distributing"


async def test_forward_without_coordinator_gives_503(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve(MemFacade(is_coordinator=False, leader_admin_url=None))
    async with http.post(f"{base}/v1/models/double/rollback") as r:
        assert r.status == 503
        assert r.headers["Retry-After"] == "1"
        error = await error_of(r)
    assert error["code"] == "no_coordinator"


async def test_forward_is_not_repeated(serve: Start, http: aiohttp.ClientSession) -> None:
    # The "coordinator" it points to thinks it is not the coordinator either.
    stale = MemFacade(node_id="node-c", is_coordinator=False, leader_admin_url="http://127.0.0.1:9")
    stale_url = await serve(stale)
    gateway_url = await serve(MemFacade(node_id="node-b", is_coordinator=False, leader_admin_url=stale_url))
    async with http.post(f"{gateway_url}/v1/models/double/rollback") as r:
        assert r.status == 503
        error = await error_of(r)
    assert error["code"] == "coordinator_changed"


async def test_forward_unreachable_gives_503(serve: Start, http: aiohttp.ClientSession) -> None:
    probe = web.AppRunner(web.Application())
    await probe.setup()
    site = web.TCPSite(probe, "127.0.0.1", 0)
    await site.start()
    closed_port = probe.addresses[0][1]
    await probe.cleanup()  # nothing listens on this port any more
    base = await serve(MemFacade(is_coordinator=False, leader_admin_url=f"http://127.0.0.1:{closed_port}"))
    async with http.post(f"{base}/v1/models/double/rollback") as r:
        assert r.status == 503
        error = await error_of(r)
    assert error["code"] == "coordinator_unreachable"
    assert str(closed_port) in error["message"]


# ---- auth ----------------------------------------------------------------------------------


def concrete_routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, path) for every route of the app router, with path parameters filled in."""
    values = {"name": "double", "version": "v2", "id": "dep1"}
    routes = []
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        path = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], resource.canonical)
        routes.append((route.method, path))
    return routes


PUBLIC_PATHS = {"/healthz", "/", "/static/app.js", "/static/style.css"}


async def test_auth_every_route_needs_token(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve(require_token=True, tokens=TOKENS)
    routes = concrete_routes(serve.apps[base])  # type: ignore[attr-defined]
    assert len(routes) >= len(ROUTES)
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong-token-value"}, {"Authorization": "Basic YTpi"}):
            async with http.request(method, f"{base}{path}", headers=headers) as r:
                if path in PUBLIC_PATHS:
                    assert r.status == 200, (method, path)
                else:
                    assert r.status == 401, (method, path, headers)
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")


async def test_auth_inference_token_scope(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve(require_token=True, tokens=TOKENS)
    for method, path in concrete_routes(serve.apps[base]):  # type: ignore[attr-defined]
        kwargs: dict[str, Any] = {"headers": INFER}
        if path.endswith("/infer"):
            kwargs["json"] = infer_body()
        async with http.request(method, f"{base}{path}", **kwargs) as r:
            if path.endswith("/infer") or path in PUBLIC_PATHS:
                assert r.status == 200, (method, path)
            else:
                assert r.status == 401, (method, path)


async def test_auth_admin_token_opens_all(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve(require_token=True, tokens=TOKENS, metrics=AgentMetrics(collect_host=False))
    for method, path in concrete_routes(serve.apps[base]):  # type: ignore[attr-defined]
        kwargs: dict[str, Any] = {"headers": ADMIN}
        if path.endswith("/infer"):
            kwargs["json"] = infer_body()
        async with http.request(method, f"{base}{path}", **kwargs) as r:
            assert r.status != 401, (method, path)


async def test_auth_on_for_non_loopback_host(serve: Start, http: aiohttp.ClientSession) -> None:
    # Only the config sets 0.0.0.0; the test server itself still listens on 127.0.0.1.
    base = await serve(admin_host="0.0.0.0", tokens=TOKENS)
    async with http.get(f"{base}/v1/cluster") as r:
        assert r.status == 401
    async with http.get(f"{base}/v1/cluster", headers=ADMIN) as r:
        assert r.status == 200


async def test_auth_off_on_loopback_by_default(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve(tokens=TOKENS)
    async with http.get(f"{base}/v1/cluster") as r:
        assert r.status == 200


def test_create_app_refuses_auth_without_tokens() -> None:
    config = AgentConfig.with_profile("test", {"network.admin_host": "0.0.0.0"})
    with pytest.raises(ValueError, match="requires tokens"):
        create_app(MemFacade(), config=config, tokens=None)


async def test_auth_tokens_never_logged(
    serve: Start, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator_url = await serve(MemFacade(), require_token=True, tokens=TOKENS)
    gateway_url = await serve(
        MemFacade(node_id="node-b", is_coordinator=False, leader_admin_url=coordinator_url),
        require_token=True, tokens=TOKENS,
    )
    wrong = "Bearer smadm_" + "z" * 43
    with caplog.at_level(logging.DEBUG):
        for headers in ({}, {"Authorization": wrong}, ADMIN, INFER):
            async with http.post(f"{gateway_url}/v1/models/double/rollback", headers=headers) as r:
                await r.read()
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "missing token" in text
    assert "invalid token" in text
    for secret in (TOKENS.admin, TOKENS.infer, wrong.split()[1]):
        assert secret not in text


def test_tokens_file_mode_0600(tmp_path: Path) -> None:
    tokens = generate_tokens(tmp_path)
    path = tmp_path / "tokens.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_tokens(tmp_path) == tokens
    assert tokens.admin != tokens.infer
    assert tokens.admin not in repr(tokens)
    assert tokens.infer not in repr(tokens)


def test_tokens_file_readable_by_others_rejected(tmp_path: Path) -> None:
    generate_tokens(tmp_path)
    path = tmp_path / "tokens.json"
    os.chmod(path, 0o644)
    with pytest.raises(TokenFileError, match="chmod 600"):
        load_tokens(tmp_path)


def test_tokens_file_missing_says_how_to_create(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="shardmesh cluster init"):
        load_tokens(tmp_path)


# ---- documentation, metrics, page ----------------------------------------------------------


async def test_openapi_documents_every_route(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve()
    async with http.get(f"{base}/v1/openapi.json") as r:
        assert r.status == 200
        document = await r.json()
    documented = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    app = serve.apps[base]  # type: ignore[attr-defined]
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    assert documented == served
    infer = document["paths"]["/v1/models/{name}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/msgpack"}
    assert [p["name"] for p in infer["parameters"]] == ["name"]


async def test_metrics_count_requests(serve: Start, http: aiohttp.ClientSession) -> None:
    metrics = AgentMetrics("node-a")
    facade = MemFacade()
    facade.fail_versions.add("v2")
    base = await serve(facade, metrics=metrics)
    for version in ("v1", "v1", "v2"):
        async with http.post(f"{base}/v1/models/double/infer", json=infer_body(version=version)) as r:
            await r.read()
    async with http.get(f"{base}/metrics") as r:
        assert r.status == 200
        assert r.content_type == "text/plain"
        text = await r.text()
    assert 'shardmesh_requests_total{model="double",outcome="ok",version="v1"} 2.0' in text
    assert 'shardmesh_requests_total{model="double",outcome="error",version="v2"} 1.0' in text
    assert "shardmesh_request_seconds_bucket" in text
    assert "shardmesh_host_cpu_utilization" in text
    assert "shardmesh_gpu_metrics_available 0.0" in text
    assert 'shardmesh_http_responses_total{route="/v1/models/{name}/infer",status="200"} 2.0' in text


async def test_status_page_holds_no_cluster_data(serve: Start, http: aiohttp.ClientSession) -> None:
    base = await serve(require_token=True, tokens=TOKENS)
    for path in ("/", "/static/app.js", "/static/style.css"):
        async with http.get(f"{base}{path}") as r:
            assert r.status == 200
            text = await r.text()
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        assert "node-b" not in text
        assert "memtest" not in text
    async with http.get(f"{base}/static/../http_api.py") as r:
        assert r.status in (401, 404)


# ---- CLI client ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let rich draw 250 columns so that table cells and messages are not wrapped."""
    monkeypatch.setenv("COLUMNS", "250")


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="shardmesh")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


async def run_cli(*argv: str) -> int:
    """Run a client command in a thread: it blocks on urllib while this loop serves the app."""
    args = cli(*argv)
    return await asyncio.to_thread(args.func, args)


async def test_client_status_json(serve: Start, capsys: pytest.CaptureFixture[str]) -> None:
    base = await serve(require_token=True, tokens=TOKENS)
    assert await run_cli("status", "--url", base, "--token", TOKENS.admin, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert [m["node_id"] for m in out["cluster"]["members"]] == ["node-a", "node-b", "node-c"]
    assert {m["name"] for m in out["models"]} == {"double", "embed"}


async def test_client_status_tables(serve: Start, capsys: pytest.CaptureFixture[str]) -> None:
    base = await serve()
    assert await run_cli("status", "--url", base) == 0
    out = capsys.readouterr().out
    assert "coordinator node-a" in out
    assert "seg0(node-a) -> seg1(node-b,node-c)" in out


async def test_client_status_piped_not_cut(serve: Start, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Under capsys, stdout is not a terminal, as with a pipe, and COLUMNS is unset here.
    monkeypatch.delenv("COLUMNS")
    base = await serve()
    assert await run_cli("status", "--url", base) == 0
    out = capsys.readouterr().out
    assert "\u2026" not in out, out
    assert "seg0(node-a) -> seg1(node-b,node-c)" in out


async def test_client_deploy_waits_until_ready(serve: Start, capsys: pytest.CaptureFixture[str]) -> None:
    base = await serve()
    code = await run_cli("deploy", "double", "--version", "v3", "--source", "mem:double",
                         "--strategy", "canary", "--option", "canary_weight=0.2", "--url", base, "--json")
    assert code == 0
    final = json.loads(capsys.readouterr().out)
    assert final["state"] == "ready"
    assert final["percent"] == 100.0


async def test_client_traffic_and_rollback(serve: Start, capsys: pytest.CaptureFixture[str]) -> None:
    base = await serve()
    assert await run_cli("traffic", "double", "v1=0.7", "v2=0.3", "--url", base, "--json") == 0
    assert json.loads(capsys.readouterr().out)["weights"] == {"v1": 0.7, "v2": 0.3}
    assert await run_cli("rollback", "double", "--url", base, "--json") == 0
    assert json.loads(capsys.readouterr().out)["weights"] == {"v1": 1.0, "v2": 0.0}
    assert await run_cli("rollback", "double", "--url", base) == 1
    assert "409" in capsys.readouterr().err


async def test_client_delete_version(serve: Start, capsys: pytest.CaptureFixture[str]) -> None:
    base = await serve()
    assert await run_cli("traffic", "double", "v1=1", "v2=0", "--url", base, "--json") == 0
    capsys.readouterr()
    assert await run_cli("delete", "double", "--version", "v2", "--url", base, "--json") == 0
    assert [v["version"] for v in json.loads(capsys.readouterr().out)["versions"]] == ["v1"]
    assert await run_cli("delete", "double", "--version", "v9", "--url", base) == 1
    assert "404" in capsys.readouterr().err


async def test_client_infer_text(serve: Start, capsys: pytest.CaptureFixture[str]) -> None:
    base = await serve()
    assert await run_cli("infer", "embed", "--text", "abc", "--text", "hello", "--url", base, "--json") == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["outputs"]["lengths"]["data"] == [3, 5]


async def test_client_infer_npy_input(serve: Start, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy

    base = await serve()
    numpy.save(tmp_path / "x.npy", x_tensor().numpy())
    assert await run_cli("infer", "double", "--input", f"x={tmp_path / 'x.npy'}", "--version", "v2",
                         "--url", base, "--json") == 0
    answer = json.loads(capsys.readouterr().out)
    assert torch.equal(tensor_from_json(answer["outputs"]["y"]), x_tensor() * 3.0)


async def test_client_missing_token_says_what_to_do(serve: Start, capsys: pytest.CaptureFixture[str]) -> None:
    base = await serve(require_token=True, tokens=TOKENS)
    env_token = os.environ.pop("SHARDMESH_TOKEN", None)
    try:
        assert await run_cli("status", "--url", base) == 1
    finally:
        if env_token is not None:
            os.environ["SHARDMESH_TOKEN"] = env_token
    err = capsys.readouterr().err
    assert "401" in err
    assert "--token" in err


async def test_client_unreachable_names_url(capsys: pytest.CaptureFixture[str]) -> None:
    probe = web.AppRunner(web.Application())
    await probe.setup()
    site = web.TCPSite(probe, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{probe.addresses[0][1]}"
    await probe.cleanup()
    assert await run_cli("status", "--url", url) == 2
    err = capsys.readouterr().err
    assert url in err
    assert "SHARDMESH_ADMIN_URL" in err
