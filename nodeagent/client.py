"""Admin API client and the `shardmesh status | deploy | infer | traffic | rollback | delete` commands.

The commands talk to one agent's admin endpoint over HTTP; the agent forwards writes to the
coordinator itself, so any agent's URL works. The URL comes from, in order: `--url`, the
environment variable SHARDMESH_ADMIN_URL, the agent config (`network.admin_host` and
`network.admin_port`), or, when the config's port is 0 (picked at start), the `agent.json` file
the running agent writes into its data directory. The token comes from `--token`,
SHARDMESH_TOKEN, or `<data_dir>/tokens.json`; a loopback agent needs none.

Output is rich tables for people and, with `--json`, one JSON document on stdout for scripts.
Exit status: 0 success, 1 the API returned an error, 2 the agent could not be reached or the
command line was invalid.

The client uses the standard library's urllib: each command makes a handful of sequential
requests, so an event loop would add nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

DEFAULT_TIMEOUT_S = 30.0
# Deploy progress is polled at this interval; a deploy moves hundreds of MB, so 0.5 s is plenty.
POLL_INTERVAL_S = 0.5
EXIT_OK, EXIT_API_ERROR, EXIT_UNREACHABLE = 0, 1, 2


class ClientError(Exception):
    """A command failed; `exit_code` is the process exit status to use."""

    def __init__(self, message: str, *, exit_code: int = EXIT_API_ERROR, body: Any = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.body = body


@dataclass
class AdminClient:
    """A small synchronous client of one agent's admin API."""

    url: str
    token: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                content_type: str = "application/json", accept: str = "application/json") -> Any:
        """Send one request; returns the decoded JSON response, or bytes when `accept` is not JSON."""
        data = raw
        if data is None and body is not None:
            data = json.dumps(body).encode()
        headers = {"Accept": accept}
        if data is not None:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        target = self.url.rstrip("/") + path
        request = urllib.request.Request(target, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
                if "json" in response.headers.get("Content-Type", ""):
                    return json.loads(payload) if payload else None
                return payload
        except urllib.error.HTTPError as exc:
            raise _api_error(method, path, exc) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(
                f"cannot reach the shardmesh admin API at {self.url}: {reason}. Check that the agent "
                "runs (`systemctl status shardmesh-agent`) and that --url or SHARDMESH_ADMIN_URL "
                "points at its admin address (network.admin_host and network.admin_port).",
                exit_code=EXIT_UNREACHABLE,
            ) from None


def _api_error(method: str, path: str, exc: urllib.error.HTTPError) -> ClientError:
    raw = exc.read()
    try:
        body = json.loads(raw)
        error = body["error"]
        message = error["message"]
        details = [f"{k}={json.dumps(error[k])}" for k in ("field", "value", "expected") if error.get(k) is not None]
    except (ValueError, KeyError, TypeError):
        body, message, details = None, raw[:200].decode("utf-8", "replace"), []
    text = f"{method} {path} failed with {exc.code}: {message}"
    if details:
        text += " (" + ", ".join(details) + ")"
    if exc.code == 401:
        text += ". Pass the admin token with --token or SHARDMESH_TOKEN (it is in tokens.json in the data directory)."
    return ClientError(text, body=body)


# ---- finding the agent -----------------------------------------------------------------------


def _connect_host(host: str) -> str:
    """Turn a bind address into one a client can dial on the same machine."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def resolve_connection(args: argparse.Namespace, env: dict[str, str] | None = None) -> AdminClient:
    """Build the client from the options, the environment and the agent config."""
    environ = dict(os.environ if env is None else env)
    url = getattr(args, "url", None) or environ.get("SHARDMESH_ADMIN_URL")
    token = getattr(args, "token", None) or environ.get("SHARDMESH_TOKEN")
    config = None
    if not url or not token:
        config = _load_config(getattr(args, "config", None), environ)
    if not url:
        url = _url_from_config(config)
    if not token and config is not None:
        token = _token_from_data_dir(config)
    return AdminClient(url=url, token=token, timeout_s=getattr(args, "timeout", DEFAULT_TIMEOUT_S))


def _load_config(path: str | None, environ: dict[str, str]) -> Any:
    from nodeagent.config import AgentConfig, ConfigError

    try:
        return AgentConfig.load(path, env=environ, use_default_path=path is None)
    except (ConfigError, OSError) as exc:
        if path is not None:
            raise ClientError(f"cannot load the agent config {path}: {exc}", exit_code=EXIT_UNREACHABLE) from None
        return None


def _url_from_config(config: Any) -> str:
    if config is None:
        raise ClientError(
            "no admin URL: pass --url http://HOST:PORT, set SHARDMESH_ADMIN_URL, or pass --config "
            "with the agent's config file",
            exit_code=EXIT_UNREACHABLE,
        )
    host, port = config.network.admin_host, config.network.admin_port
    if port == 0:
        # The agent picked a free port at start and recorded it in its data directory.
        state_file = Path(config.data_dir) / "agent.json"
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            host, port = state["admin_host"], int(state["admin_port"])
        except (OSError, ValueError, KeyError) as exc:
            raise ClientError(
                f"the config sets network.admin_port = 0 and {state_file} is unreadable ({exc}); "
                "start the agent, or pass --url",
                exit_code=EXIT_UNREACHABLE,
            ) from None
    return f"http://{_connect_host(host)}:{port}"


def _token_from_data_dir(config: Any) -> str | None:
    from nodeagent.http_auth import TokenFileError, load_tokens

    try:
        return load_tokens(config.data_dir, path=getattr(config.admin, "token_file", None)).admin
    except TokenFileError:
        return None  # a loopback agent needs none, and a 401 error message names the tokens file


# ---- output helpers --------------------------------------------------------------------------


# rich draws 80 columns when stdout is not a terminal, which cuts addresses and roles in the
# status table when it is piped to a file or to grep. A pipe has no width, so draw wider.
PIPED_WIDTH = 200


def _console() -> Console:
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else PIPED_WIDTH
    return Console(highlight=False, width=width)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _device_names(member: dict) -> str:
    """Return the member's devices as "cpu, cuda:0"; the capability record lists them as dicts."""
    devices = (member.get("capabilities") or {}).get("devices", [])
    names = [device.get("name", "?") if isinstance(device, dict) else str(device) for device in devices]
    return ", ".join(names) or "-"


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _models_table(models: list[dict[str, Any]]) -> Table:
    table = Table(title="Models")
    for column in ("model", "version", "state", "weight", "segments (agents)", "req/s", "p99 ms", "errors"):
        table.add_column(column)
    for model in models:
        weights = model.get("weights", {})
        for info in model.get("versions", []):
            placement = " -> ".join(
                f"{s.get('segment')}({','.join(s.get('agents', []))})" for s in info.get("segments", [])
            )
            stats = info.get("stats") or {}
            marker = " (previous)" if model.get("previous_version") == info["version"] else ""
            table.add_row(
                model["name"], info["version"] + marker, info.get("state", "-"),
                _fmt(weights.get(info["version"]), 2), placement or "-",
                _fmt(stats.get("rate_per_s"), 2), _fmt(stats.get("p99_ms")),
                _fmt(100 * stats["error_rate"], 1) + "%" if "error_rate" in stats else "-",
            )
    return table


# ---- commands --------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    client = resolve_connection(args)
    cluster = client.request("GET", "/v1/cluster")
    models = client.request("GET", "/v1/models")
    alerts = client.request("GET", "/v1/alerts")
    if args.json:
        _print_json({"cluster": cluster, "models": models, "alerts": alerts})
        return EXIT_OK

    console = _console()
    coordinator = (cluster.get("coordinator") or {}).get("node_id", "none elected")
    console.print(
        f"cluster [bold]{cluster.get('cluster', '-')}[/]  coordinator [bold]{coordinator}[/]  "
        f"epoch {cluster.get('epoch', '-')}  plan {cluster.get('plan_version', '-')}  "
        f"(answered by {cluster.get('node_id', '-')} at {client.url})"
    )

    members = Table(title="Members")
    for column in ("node", "role", "state", "address", "devices", "loop lag ms", "in flight"):
        members.add_column(column)
    for member in cluster.get("members", []):
        health = member.get("health") or {}
        members.add_row(
            member.get("node_id", "-"), member.get("role", "-"), member.get("state", "-"),
            member.get("address", "-"), _device_names(member), 
            _fmt(health.get("loop_lag_ms")), _fmt(health.get("inflight")),
        )
    console.print(members)
    console.print(_models_table(models))

    if alerts:
        table = Table(title="Firing alarms", style="red")
        for column in ("alarm", "value", "threshold", "message"):
            table.add_column(column)
        for alert in alerts:
            table.add_row(alert.get("name", "-"), _fmt(alert.get("value"), 3),
                          f"{alert.get('comparison', '')} {_fmt(alert.get('threshold'), 3)}", alert.get("message", ""))
        console.print(table)
    else:
        console.print("no alarms firing")
    return EXIT_OK


def _parse_options(pairs: list[str] | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ClientError(f"--option {pair!r} must look like KEY=VALUE", exit_code=EXIT_UNREACHABLE)
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value  # plain strings need no quotes
    return options


def cmd_deploy(args: argparse.Namespace) -> int:
    client = resolve_connection(args)
    body = {
        "name": args.name, "version": args.version, "source": args.source,
        "strategy": args.strategy, "replicas": args.replicas, "options": _parse_options(args.option),
    }
    progress = client.request("POST", "/v1/models", body)
    if args.no_wait:
        _print_json(progress) if args.json else _console().print(
            f"deployment {progress['id']} accepted: {progress['state']} ({progress['message']})")
        return EXIT_OK
    final = wait_for_deployment(client, progress, show=not args.json, timeout_s=args.wait_timeout)
    if args.json:
        _print_json(final)
    elif final["state"] == "ready":
        _console().print(f"[green]{args.name} {args.version} is ready[/] ({final.get('message', '')})")
    return EXIT_OK if final["state"] == "ready" else EXIT_API_ERROR


def wait_for_deployment(client: AdminClient, progress: dict[str, Any], *, show: bool, timeout_s: float,
                        sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Poll a deployment until it is ready or failed; draws a progress bar when `show`."""
    path = f"/v1/deployments/{urllib.parse.quote(progress['id'], safe='')}"
    deadline = time.monotonic() + timeout_s
    console = _console()
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[message]}"), console=console, disable=not show, transient=False) as bar:
        task = bar.add_task(f"deploy {progress['model']} {progress['version']}", total=100,
                            message=progress.get("message", ""))
        while progress["state"] not in ("ready", "failed"):
            if time.monotonic() > deadline:
                raise ClientError(
                    f"deployment {progress['id']} still {progress['state']} after {timeout_s:g} s; "
                    f"follow it with GET {path} or raise --wait-timeout",
                )
            sleep(POLL_INTERVAL_S)
            progress = client.request("GET", path)
            bar.update(task, completed=float(progress.get("percent", 0)), message=progress.get("message", ""))
        if progress["state"] == "failed" and show:
            console.print(f"[red]deployment {progress['id']} failed:[/] {progress.get('message', '')}")
    return progress


def _load_inputs(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.body:
        try:
            body = json.loads(Path(args.body).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ClientError(f"cannot read the JSON body file {args.body}: {exc}", exit_code=EXIT_UNREACHABLE) from None
    if args.text:
        body["text"] = list(args.text)
    if args.input:
        import numpy
        import torch

        from protocol.tensors import tensor_to_json

        inputs = body.setdefault("inputs", {})
        for item in args.input:
            name, sep, file = item.partition("=")
            if not sep:
                raise ClientError(f"--input {item!r} must look like NAME=FILE.npy", exit_code=EXIT_UNREACHABLE)
            try:
                array = numpy.load(file, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ClientError(f"cannot read {file} as a .npy array: {exc}", exit_code=EXIT_UNREACHABLE) from None
            inputs[name] = tensor_to_json(torch.from_numpy(array))
    if "text" not in body and "inputs" not in body:
        raise ClientError("give the inputs with --text, --input NAME=FILE.npy or --body FILE.json",
                          exit_code=EXIT_UNREACHABLE)
    for key in ("version", "priority", "deadline_ms", "task", "request_key"):
        value = getattr(args, key, None)
        if value is not None:
            body[key] = value
    return body


def cmd_infer(args: argparse.Namespace) -> int:
    client = resolve_connection(args)
    body = _load_inputs(args)
    path = f"/v1/models/{urllib.parse.quote(args.name, safe='')}/infer"
    answer = client.request("POST", path, body)
    if args.json:
        _print_json(answer)
        return EXIT_OK
    console = _console()
    console.print(f"model {answer['model']} version {answer['version']} request {answer['request_id']} "
                  f"route {' -> '.join(answer.get('route', []))}")
    table = Table(title="Outputs")
    for column in ("output", "dtype", "shape", "first values"):
        table.add_column(column)
    for name, tensor in answer["outputs"].items():
        flat: list[Any] = tensor["data"]
        while flat and isinstance(flat, list) and isinstance(flat[0], list):
            flat = flat[0]
        preview = ", ".join(_fmt(v, 4) if isinstance(v, float) else str(v) for v in (flat or [])[:6])
        table.add_row(name, tensor["dtype"], str(tensor["shape"]), preview)
    console.print(table)
    timings = answer.get("timings_ms") or {}
    if timings:
        console.print("timings: " + ", ".join(f"{k} {v:.1f} ms" for k, v in timings.items()))
    return EXIT_OK


def _parse_weights(pairs: list[str]) -> dict[str, float]:
    weights: dict[str, float] = {}
    for pair in pairs:
        version, sep, value = pair.partition("=")
        try:
            weights[version] = float(value)
        except ValueError:
            sep = ""
        if not sep or not version:
            raise ClientError(f"weight {pair!r} must look like VERSION=WEIGHT, e.g. v2=0.1",
                              exit_code=EXIT_UNREACHABLE)
    return weights


def _print_model(args: argparse.Namespace, model: dict[str, Any], headline: str) -> None:
    if args.json:
        _print_json(model)
        return
    console = _console()
    console.print(headline)
    console.print(_models_table([model]))


def cmd_traffic(args: argparse.Namespace) -> int:
    client = resolve_connection(args)
    name = urllib.parse.quote(args.name, safe="")
    if not args.weights:
        model = client.request("GET", f"/v1/models/{name}")
        _print_model(args, model, f"traffic of {args.name}")
        return EXIT_OK
    model = client.request("PUT", f"/v1/models/{name}/traffic", _parse_weights(args.weights))
    _print_model(args, model, f"traffic of {args.name} set")
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    client = resolve_connection(args)
    path = f"/v1/models/{urllib.parse.quote(args.name, safe='')}/versions/{urllib.parse.quote(args.version, safe='')}"
    model = client.request("DELETE", path)
    if not model.get("versions"):
        if args.json:
            print(json.dumps(model))
        else:
            _console().print(f"{args.name} {args.version} deleted; it was the model's last version, so the model is gone")
        return EXIT_OK
    _print_model(args, model, f"{args.name} {args.version} deleted")
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    client = resolve_connection(args)
    model = client.request("POST", f"/v1/models/{urllib.parse.quote(args.name, safe='')}/rollback")
    _print_model(args, model, f"{args.name} rolled back; the other versions stay loaded")
    return EXIT_OK


# ---- registration ----------------------------------------------------------------------------


def _run(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ClientError as exc:
            if getattr(args, "json", False):
                print(json.dumps({"error": str(exc), "body": exc.body}), file=sys.stderr)
            else:
                Console(stderr=True, highlight=False).print(f"[red]error:[/] {exc}")
            return exc.exit_code

    run.__name__ = handler.__name__
    return run


def _connection_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument("--url", help="admin API URL, e.g. http://127.0.0.1:8470 (default: SHARDMESH_ADMIN_URL, "
                       "else from the agent config)")
    group.add_argument("--token", help="admin token (default: SHARDMESH_TOKEN, else tokens.json in the data dir)")
    group.add_argument("--config", help="agent config file to read the admin address and data dir from")
    group.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per HTTP request")
    group.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")
    return parent


def add_subcommands(subparsers: Any) -> None:
    """Register status, deploy, infer, traffic, rollback and delete; each sets `func` to its handler."""
    common = [_connection_options()]

    status = subparsers.add_parser("status", parents=common, help="show members, models and alarms")
    status.set_defaults(func=_run(cmd_status))

    deploy = subparsers.add_parser("deploy", parents=common, help="deploy a model version and follow its progress")
    deploy.add_argument("name", help="model name")
    deploy.add_argument("--version", required=True, help="version name, e.g. v2")
    deploy.add_argument("--source", required=True, help="minilm, efficientnet, factory:package.module:function, exported:/abs/model.pt2 "
                        "or hf:/abs/model-dir")
    deploy.add_argument("--strategy", choices=("replace", "canary"), default="replace",
                        help="replace: all traffic once ready; canary: a share set by --option canary_weight=0.1")
    deploy.add_argument("--replicas", type=int, default=1,
                        help="2 or more: every spare agent (one the pipeline leaves free) copies the segment "
                             "with the most work per holder; any value above 1 does the same (default 1: no copies)")
    deploy.add_argument("--option", action="append", metavar="KEY=VALUE", help="deploy option (repeatable)")
    deploy.add_argument("--no-wait", action="store_true", help="return after the deployment is accepted")
    deploy.add_argument("--wait-timeout", type=float, default=600.0, help="seconds to wait for ready (default 600)")
    deploy.set_defaults(func=_run(cmd_deploy))

    infer = subparsers.add_parser("infer", parents=common, help="run one inference")
    infer.add_argument("name", help="model name")
    infer.add_argument("--text", action="append", help="input sentence (repeatable; models with a tokenizer)")
    infer.add_argument("--input", action="append", metavar="NAME=FILE.npy", help="tensor input from a .npy file")
    infer.add_argument("--body", metavar="FILE.json", help="JSON request body in the API's format")
    infer.add_argument("--version", help="pin a version instead of the traffic split")
    infer.add_argument("--priority", choices=("high", "normal", "low"))
    infer.add_argument("--deadline-ms", dest="deadline_ms", type=float, help="time budget in milliseconds")
    infer.add_argument("--task")
    infer.add_argument("--request-key", dest="request_key", help="requests with the same key get the same version")
    infer.set_defaults(func=_run(cmd_infer))

    traffic = subparsers.add_parser("traffic", parents=common, help="show or set the traffic split of a model")
    traffic.add_argument("name", help="model name")
    traffic.add_argument("weights", nargs="*", metavar="VERSION=WEIGHT", help="e.g. v1=0.9 v2=0.1; none shows")
    traffic.set_defaults(func=_run(cmd_traffic))

    rollback = subparsers.add_parser("rollback", parents=common,
                                     help="give the previous version all traffic again")
    rollback.add_argument("name", help="model name")
    rollback.set_defaults(func=_run(cmd_rollback))

    delete = subparsers.add_parser("delete", parents=common,
                                   help="delete a model version that receives no traffic, or the model's last version")
    delete.add_argument("name", help="model name")
    delete.add_argument("--version", required=True, help="version to delete")
    delete.set_defaults(func=_run(cmd_delete))
