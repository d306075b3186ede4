"""Request and response bodies of the inference route, and their checks.

Three request forms are accepted on POST /v1/models/{name}/infer:

- JSON (`application/json`): `{"inputs": {"x": {"dtype": "float32", "shape": [2, 4], "data":
  [[...], [...]]}}}`, the tensor form of `protocol.tensors.tensor_to_json`.
- JSON text (`application/json`): `{"text": ["a sentence", ...]}` for models that ship a
  tokenizer.
- msgpack (`application/msgpack`): a map `{"inputs": [metadata...], "payload": <bin>}` where the
  metadata list and the payload bytes are exactly what `protocol.tensors.encode_tensors` returns
  (the payload is its buffers joined). Raw bytes avoid the 5 to 10 times size and the float
  parsing cost of JSON for images and activations.

Every form may add `version`, `priority` ("high", "normal", "low"), `deadline_ms` (time budget in
milliseconds from arrival), `task` and `request_key` (for sticky traffic split).

Checks run in this order, each failing with the field, the received value and the expected one:
syntax of the body, the options, the deadline, then each input against the model's input spec
(names, dtype, shape with -1 as a dynamic dimension). A dtype or shape that does not fit the
model is 422; a body that cannot be parsed at all is 400.

The response uses msgpack when the request's Accept header asks for `application/msgpack`, or when
the request was msgpack and Accept does not ask for JSON; otherwise JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from coordinator.export import first_unequal_dims
from nodeagent.batching import Priority
from nodeagent.facade import InferRequest, InferResult, InputSpec
from nodeagent.http_errors import ApiError, bad_request
from protocol.errors import ProtocolError
from protocol.limits import Limits
from protocol.tensors import decode_tensors, encode_tensors, tensor_from_json, tensor_to_json

JSON_TYPE = "application/json"
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")
MSGPACK_TYPE = MSGPACK_TYPES[0]

PRIORITIES = tuple(p.name.lower() for p in Priority)
_OPTION_KEYS = {"version", "priority", "deadline_ms", "task", "request_key"}
_BODY_KEYS = _OPTION_KEYS | {"inputs", "text", "payload"}

# One hour: a longer budget is almost surely a unit mistake (seconds sent as milliseconds twice).
MAX_DEADLINE_MS = 3_600_000
MAX_TEXTS = 1024  # sentences per request; above this a client should split the batch
# A text model reads only its first tokens (128 for the packaged MiniLM), but the tokenizer
# reads the whole text first. At about 1 MB/s (2-core x86-64 VM), a 20 MB text held a request
# for 20 s.
MAX_TEXT_CHARS = 100_000  # per text
MAX_TEXT_TOTAL_CHARS = 1_000_000  # per request
MAX_KEY_CHARS = 256  # request_key and version length
MAX_TASK_CHARS = 64


@dataclass(frozen=True)
class ParsedInfer:
    request: InferRequest
    wants_msgpack: bool


def _check_text_field(value: Any, field: str, max_chars: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > max_chars:
        raise bad_request(
            f"{field} must be a non-empty string of at most {max_chars} characters",
            field=field,
            value=value,
            expected=f"string of 1 to {max_chars} characters",
        )
    return value


def parse_body(body: bytes, content_type: str) -> tuple[dict[str, Any], bool]:
    """Parse the body into a dict; the flag is True when the body was msgpack."""
    if content_type in MSGPACK_TYPES:
        try:
            data = msgpack.unpackb(
                body,
                raw=False,
                strict_map_key=True,
                use_list=True,
                # The body itself is bounded by the server's body size limit; these caps stop a
                # tiny body from declaring huge containers that msgpack would pre-allocate.
                max_array_len=1 << 16,
                max_map_len=1 << 12,
                max_str_len=1 << 24,
                max_ext_len=0,
            )
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
            # msgpack's FormatError carries no text, so the exception's type is the reason.
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise bad_request(
                f"body is not valid msgpack ({reason}); encode it with msgpack.packb, or send JSON",
                field="body",
                value=f"<{len(body)} bytes>",
                expected='a msgpack map {"inputs": [tensor metadata], "payload": <bin>} or {"text": [...]}',
            ) from None
        if not isinstance(data, dict):
            raise bad_request(
                "msgpack body must be a map",
                field="body",
                value=type(data).__name__,
                expected="map",
            )
        return data, True
    if content_type in ("", JSON_TYPE) or content_type.endswith("+json"):
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
            raise bad_request(
                f"body is not valid JSON{where}: {exc.msg if isinstance(exc, json.JSONDecodeError) else exc}",
                field="body",
                value=body[:80].decode("utf-8", "replace"),
                expected='a JSON object {"inputs": {name: tensor}} or {"text": [...]}',
            ) from None
        except RecursionError:
            raise bad_request(
                "body nests JSON too deeply",
                field="body",
                value=f"<{len(body)} bytes>",
                expected="tensors of at most 32 dimensions",
            ) from None
        if not isinstance(data, dict):
            raise bad_request(
                "JSON body must be an object",
                field="body",
                value=type(data).__name__,
                expected='{"inputs": {...}} or {"text": [...]}',
            )
        return data, False
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {content_type!r} is not accepted by the inference route",
        field="Content-Type",
        value=content_type,
        expected=[JSON_TYPE, MSGPACK_TYPE],
    )


def _parse_deadline(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(
            "deadline_ms must be a number of milliseconds",
            field="deadline_ms",
            value=value,
            expected=f"number in (0, {MAX_DEADLINE_MS}]",
        )
    if value <= 0:
        raise ApiError(
            400,
            "deadline_passed",
            f"deadline_ms is {value}, so the deadline passed before the request arrived; send a "
            "positive remaining budget",
            field="deadline_ms",
            value=value,
            expected=f"number in (0, {MAX_DEADLINE_MS}]",
        )
    if value > MAX_DEADLINE_MS:
        raise bad_request(
            f"deadline_ms {value} is above the maximum of {MAX_DEADLINE_MS} (one hour)",
            field="deadline_ms",
            value=value,
            expected=f"number in (0, {MAX_DEADLINE_MS}]",
        )
    return float(value) / 1000.0


def _parse_text(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > MAX_TEXTS:
        raise bad_request(
            f"text must be a list of 1 to {MAX_TEXTS} strings",
            field="text",
            value=value if not isinstance(value, list) else f"list of {len(value)} items",
            expected=f"list of 1 to {MAX_TEXTS} strings",
        )
    total = 0
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise bad_request(
                f"text[{index}] must be a string",
                field=f"text[{index}]",
                value=item,
                expected="string",
            )
        if len(item) > MAX_TEXT_CHARS:
            raise bad_request(
                f"text[{index}] has {len(item)} characters, above the limit of {MAX_TEXT_CHARS}; the model "
                "reads only the first tokens of a text, so cut it, or split it into several texts",
                field=f"text[{index}]",
                value=f"<{len(item)} characters>",
                expected=f"at most {MAX_TEXT_CHARS} characters",
            )
        total += len(item)
    if total > MAX_TEXT_TOTAL_CHARS:
        raise bad_request(
            f"the texts have {total} characters in all, above the limit of {MAX_TEXT_TOTAL_CHARS} per "
            "request; send them in several requests",
            field="text",
            value=f"<{total} characters in {len(value)} texts>",
            expected=f"at most {MAX_TEXT_TOTAL_CHARS} characters in all",
        )
    return value


def _protocol_error_field(exc: ProtocolError, prefix: str) -> str:
    return f"{prefix}.{exc.field}" if exc.field else prefix


def _decode_inputs(data: dict[str, Any], is_msgpack: bool, limits: Limits, peer: str) -> dict[str, torch.Tensor]:
    raw = data.get("inputs")
    if is_msgpack:
        payload = data.get("payload", b"")
        if not isinstance(raw, list):
            raise bad_request(
                "msgpack inputs must be the tensor metadata list of protocol.tensors.encode_tensors",
                field="inputs",
                value=type(raw).__name__,
                expected="list of {name, dtype, shape, nbytes}",
            )
        if not isinstance(payload, (bytes, bytearray)):
            raise bad_request(
                "msgpack payload must be binary (the encoded tensor buffers joined)",
                field="payload",
                value=type(payload).__name__,
                expected="bin",
            )
        try:
            return decode_tensors(raw, memoryview(bytearray(payload)), limits=limits, peer=peer)
        except ProtocolError as exc:
            # The codec names entries as in a frame header ("tensors[2].nbytes"). In this body the
            # same list is "inputs", and "payload" is a top-level key, as in a frame.
            field = _protocol_error_field(exc, "inputs")
            if (exc.field or "").startswith("tensors["):
                field = "inputs" + exc.field[len("tensors"):]
            elif exc.field == "payload":
                field = "payload"
            raise bad_request(
                f"msgpack tensors are invalid: {exc.message}",
                field=field,
                value=exc.value,
                expected="one {name, dtype, shape, nbytes} entry per tensor, and a payload with each tensor's "
                         "bytes starting at a multiple of 64 bytes",
            ) from None
    if not isinstance(raw, dict) or not raw:
        raise bad_request(
            "inputs must be a non-empty object of input name to tensor",
            field="inputs",
            value=raw if not isinstance(raw, dict) else {},
            expected='{"name": {"dtype": ..., "shape": [...], "data": [...]}}',
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, obj in raw.items():
        try:
            tensors[name] = tensor_from_json(obj, limits=limits, peer=peer)
        except ProtocolError as exc:
            raise bad_request(
                f"input {name!r} is not a valid tensor: {exc.message}",
                field=_protocol_error_field(exc, f"inputs.{name}"),
                value=exc.value,
                expected='{"dtype": ..., "shape": [...], "data": nested lists matching shape}',
            ) from None
    return tensors


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_against_spec(tensors: dict[str, torch.Tensor], spec: InputSpec) -> None:
    """Raise a 422 error naming the first input whose name, dtype or shape does not fit."""
    specs = {item["name"]: item for item in spec.get("inputs", [])}
    missing = sorted(set(specs) - set(tensors))
    unexpected = sorted(set(tensors) - set(specs))
    if unexpected:
        raise bad_request(
            f"input {unexpected[0]!r} is not an input of model {spec.get('model')!r} version "
            f"{spec.get('version')!r}",
            field=f"inputs.{unexpected[0]}",
            value=unexpected[0],
            expected=sorted(specs),
            status=422,
        )
    if missing:
        raise bad_request(
            f"input {missing[0]!r} of model {spec.get('model')!r} is missing",
            field=f"inputs.{missing[0]}",
            value=None,
            expected=sorted(specs),
            status=422,
        )
    for name, tensor in tensors.items():
        want = specs[name]
        got_dtype = dtype_name(tensor.dtype)
        if got_dtype != want["dtype"]:
            raise bad_request(
                f"input {name!r} has dtype {got_dtype}, the model expects {want['dtype']}",
                field=f"inputs.{name}.dtype",
                value=got_dtype,
                expected=want["dtype"],
                status=422,
            )
        got_shape = list(tensor.shape)
        want_shape = list(want["shape"])
        fits = len(got_shape) == len(want_shape) and all(
            w == -1 or g == w for g, w in zip(got_shape, want_shape)
        )
        if not fits:
            raise bad_request(
                f"input {name!r} has shape {got_shape}, the model expects {want_shape} (-1 is any size)",
                field=f"inputs.{name}.shape",
                value=got_shape,
                expected=want_shape,
                status=422,
            )
        if 0 in got_shape:
            raise bad_request(
                f"input {name!r} has shape {got_shape}, with size 0 in dimension {got_shape.index(0)}. Every "
                f"dimension needs at least 1 element (for text, at least one token)",
                field=f"inputs.{name}.shape",
                value=got_shape,
                expected="sizes of at least 1",
                status=422,
            )
    unequal = first_unequal_dims(spec.get("equal_dims", []), tensors)
    if unequal is not None:
        (name, dim, size), (other, other_dim, other_size) = unequal
        raise bad_request(
            f"input {name!r} has {size} in dimension {dim}, but input {other!r} has {other_size} in dimension "
            f"{other_dim}; model {spec.get('model')!r} needs them equal, so give both the same size",
            field=f"inputs.{name}.shape",
            value=list(tensors[name].shape),
            expected=f"{other_size} in dimension {dim}",
            status=422,
        )


def parse_options(data: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(data) - _BODY_KEYS)
    if unknown:
        raise bad_request(
            f"unknown field {unknown[0]!r} in the inference body",
            field=unknown[0],
            value=data[unknown[0]],
            expected=sorted(_BODY_KEYS),
        )
    priority = data.get("priority", "normal")
    if priority not in PRIORITIES:
        raise bad_request(
            f"priority {priority!r} is invalid",
            field="priority",
            value=priority,
            expected=list(PRIORITIES),
        )
    return {
        "version": _check_text_field(data.get("version"), "version", MAX_KEY_CHARS),
        "priority": priority,
        "deadline_s": _parse_deadline(data.get("deadline_ms")),
        "task": _check_text_field(data.get("task"), "task", MAX_TASK_CHARS),
        "request_key": _check_text_field(data.get("request_key"), "request_key", MAX_KEY_CHARS),
    }


def wants_msgpack(accept: str, request_was_msgpack: bool) -> bool:
    accept = accept.lower()
    if any(t in accept for t in MSGPACK_TYPES):
        return True
    if JSON_TYPE in accept:
        return False
    return request_was_msgpack


def check_input_form(data: dict[str, Any], spec: InputSpec) -> None:
    """Check that the body uses the form the model accepts (tensors, or text with a tokenizer)."""
    has_inputs = "inputs" in data
    has_text = "text" in data
    if has_inputs == has_text:
        raise bad_request(
            "send exactly one of inputs and text",
            field="inputs" if has_inputs else "body",
            value=sorted(k for k in ("inputs", "text") if k in data),
            expected="inputs" if not spec.get("text_input") else "inputs or text",
        )
    if has_text and not spec.get("text_input"):
        raise bad_request(
            f"model {spec.get('model')!r} version {spec.get('version')!r} has no tokenizer, so it "
            "accepts tensor inputs only",
            field="text",
            value=f"list of {len(data['text'])} items" if isinstance(data["text"], list) else data["text"],
            expected={"inputs": [item["name"] for item in spec.get("inputs", [])]},
            status=422,
        )


def check_task(task: str | None, spec: InputSpec) -> None:
    tasks = spec.get("tasks") or []
    if task is not None and task not in tasks:
        raise bad_request(
            f"task {task!r} is not offered by model {spec.get('model')!r}",
            field="task",
            value=task,
            expected=tasks,
            status=422,
        )


def build_request(
    name: str,
    data: dict[str, Any],
    is_msgpack: bool,
    options: dict[str, Any],
    spec: InputSpec,
    *,
    limits: Limits,
    peer: str,
    received_monotonic: float,
) -> InferRequest:
    check_input_form(data, spec)
    check_task(options["task"], spec)
    if "text" in data:
        text = _parse_text(data["text"])
        inputs = None
    else:
        text = None
        inputs = _decode_inputs(data, is_msgpack, limits, peer)
        check_against_spec(inputs, spec)
    return InferRequest(
        model=name,
        version=options["version"],
        inputs=inputs,
        text=text,
        task=options["task"],
        priority=options["priority"],
        deadline_s=options["deadline_s"],
        request_key=options["request_key"],
        received_monotonic=received_monotonic,
    )


def encode_result(name: str, result: InferResult, as_msgpack: bool) -> tuple[bytes, str]:
    """Encode the response body; returns (body, content type)."""
    common = {
        "model": name,
        "version": result.version,
        "request_id": result.request_id,
        "route": list(result.route),
        "timings_ms": {k: v * 1000.0 for k, v in result.timings.items()},
        "failovers": result.failovers,
    }
    if as_msgpack:
        meta, buffers = encode_tensors(result.outputs)
        body = msgpack.packb({**common, "outputs": meta, "payload": b"".join(buffers)}, use_bin_type=True)
        return body, MSGPACK_TYPE
    outputs = {k: tensor_to_json(v) for k, v in result.outputs.items()}
    return json.dumps({**common, "outputs": outputs}).encode("utf-8"), JSON_TYPE


def encode_msgpack_request(tensors: dict[str, torch.Tensor] | None = None, **options: Any) -> bytes:
    """Build a msgpack inference body from tensors (or `text=[...]`) and options, for clients."""
    body: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    if tensors is not None:
        meta, buffers = encode_tensors(tensors)
        body["inputs"] = meta
        body["payload"] = b"".join(buffers)
    return msgpack.packb(body, use_bin_type=True)


def decode_msgpack_response(body: bytes) -> dict[str, Any]:
    """Decode a msgpack inference response; `outputs` becomes a dict of tensors."""
    data = msgpack.unpackb(body, raw=False)
    data["outputs"] = decode_tensors(data["outputs"], memoryview(bytearray(data.pop("payload"))))
    return data
