"""The ``shardmesh`` command line: the agent daemon, the demo, offline tools and API clients."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from protocol.errors import CredentialsError

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=LOG_FORMAT, stream=sys.stderr)
    # aiohttp's access log and zeroconf's chatter are noise at INFO for an operator.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("zeroconf").setLevel(logging.WARNING)


def _run_loop(coro):
    """Run ``coro`` on uvloop when it is installed, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ===================================================================== agent


def _agent_overrides(args: argparse.Namespace) -> dict:
    overrides: dict = {}
    if args.profile:
        overrides["profile"] = args.profile
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    for key, value in (
        ("network.bind_host", args.bind_host), ("network.peer_port", args.peer_port),
        ("network.admin_host", args.admin_host), ("network.admin_port", args.admin_port),
        ("log_level", args.log_level),
    ):
        if value is not None:
            overrides[key] = value
    if args.static_peer:
        overrides["network.static_peers"] = list(args.static_peer)
    if args.mdns_interface:
        overrides["network.mdns_interfaces"] = list(args.mdns_interface)
    if args.no_mdns:
        overrides["network.mdns_enabled"] = False
    if args.voter:
        overrides["election.voters"] = list(args.voter)
    return overrides


def cmd_agent(args: argparse.Namespace) -> int:
    from nodeagent.config import AgentConfig, ConfigError

    try:
        config = AgentConfig.load(args.config, overrides=_agent_overrides(args),
                                  use_default_path=args.config is None)
    except ConfigError as exc:
        print(f"shardmesh agent: invalid configuration: {exc}", file=sys.stderr)
        return 2
    _setup_logging(config.log_level)
    from coordinator.election import validate_voters
    if not config.election.voters and config.election.static_coordinator is None and (
            config.network.mdns_enabled or config.network.static_peers):
        # Without a voter list every agent would count only itself and elect itself, and the
        # cluster would split into as many coordinators as agents.
        print("shardmesh agent: election.voters is empty, but this agent looks for peers "
              "(mDNS or static peers). List the node ids of the voting agents in every agent's "
              "config, for example voters = [\"node-a\", \"node-b\", \"node-c\"]; a single-agent "
              "cluster lists only itself.", file=sys.stderr)
        return 2
    try:
        validate_voters(config.election.voters or (), static_coordinator=config.election.static_coordinator)
    except ValueError as exc:
        if config.election.voters:
            print(f"shardmesh agent: {exc}", file=sys.stderr)
            return 2
    if config.admin.alert_rules_file is not None:
        import tomllib

        from nodeagent.alerts import AlertRuleError, rules_from_config
        try:
            with open(config.admin.alert_rules_file, "rb") as handle:
                rules_from_config(tomllib.load(handle).get("rules", []))
        except (OSError, tomllib.TOMLDecodeError, AlertRuleError) as exc:
            print(f"shardmesh agent: invalid admin.alert_rules_file {config.admin.alert_rules_file}: {exc}",
                  file=sys.stderr)
            return 2
    from nodeagent.agent import Agent

    async def main() -> int:
        agent = Agent(config)
        return await agent.run()

    try:
        code = _run_loop(main())
    except (FileNotFoundError, CredentialsError) as exc:
        print(f"shardmesh agent: cannot load the node credentials: {exc}", file=sys.stderr)
        return 2
    # Every component has stopped and every file is closed. Exiting here skips the interpreter's
    # final garbage collection of torch and aiohttp objects, which took over a second.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _add_agent_parser(sub) -> None:
    p = sub.add_parser("agent", help="run the node agent daemon",
                       description="Run the node agent until SIGTERM or SIGINT.")
    p.add_argument("--config", type=Path, default=None,
                   help="TOML config file (default /etc/shardmesh/agent.toml when it exists)")
    p.add_argument("--profile", choices=("lan", "wan", "test"), help="timing profile")
    p.add_argument("--data-dir", help="data directory (credentials, election state, segment store)")
    p.add_argument("--bind-host", help="address of the peer listener")
    p.add_argument("--peer-port", type=int, help="port of the peer listener (0 picks one)")
    p.add_argument("--admin-host", help="address of the admin HTTP endpoint")
    p.add_argument("--admin-port", type=int, help="port of the admin HTTP endpoint (0 picks one)")
    p.add_argument("--static-peer", action="append", metavar="HOST:PORT", help="peer to dial without mDNS (repeatable)")
    p.add_argument("--mdns-interface", action="append", metavar="ADDR", help="interface or IPv4 address for mDNS (repeatable)")
    p.add_argument("--no-mdns", action="store_true", help="turn mDNS discovery off")
    p.add_argument("--voter", action="append", metavar="NODE_ID", help="voting node id (repeatable; lists every voter)")
    p.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.set_defaults(func=cmd_agent)


# ===================================================================== credentials


def cmd_cluster_init(args: argparse.Namespace) -> int:
    from nodeagent.http_auth import generate_tokens
    from protocol.tls import init_cluster

    data_dir = Path(args.data_dir)
    try:
        creds = init_cluster(data_dir, node_id=args.node_id, cluster_id=args.cluster_id)
    except (FileExistsError, ValueError, CredentialsError) as exc:
        print(f"shardmesh cluster init: {exc}", file=sys.stderr)
        return 2
    generate_tokens(data_dir)
    print(f"created cluster {creds.cluster_id} with CA and node {creds.node_id} in {data_dir}")
    print(f"admin and inference tokens: {data_dir / 'tokens.json'} (mode 0600)")
    return 0


def cmd_cert_issue(args: argparse.Namespace) -> int:
    from protocol.tls import issue_node

    try:
        creds = issue_node(Path(args.ca_dir), Path(args.data_dir), args.node_id)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"shardmesh cert issue: {exc}", file=sys.stderr)
        return 2
    print(f"issued certificate for node {creds.node_id} of cluster {creds.cluster_id} in {args.data_dir}")
    return 0


def cmd_cert_request(args: argparse.Namespace) -> int:
    from protocol.tls import make_csr

    csr = make_csr(Path(args.data_dir), args.node_id)
    Path(args.out).write_bytes(csr)
    print(f"made the key of node {args.node_id} in {args.data_dir}/tls/node.key and wrote its "
          f"signing request to {args.out}; sign it on the CA holder with `shardmesh cert sign`")
    return 0


def cmd_cert_sign(args: argparse.Namespace) -> int:
    from protocol.tls import sign_csr

    certificate = sign_csr(Path(args.ca_dir), Path(args.csr).read_bytes(), node_id=args.node_id)
    Path(args.out).write_bytes(certificate)
    print(f"signed the certificate of node {args.node_id} into {args.out}; install it on the node "
          f"with `shardmesh cert install` together with {args.ca_dir}/tls/ca.pem")
    return 0


def cmd_cert_install(args: argparse.Namespace) -> int:
    from protocol.tls import install_certificate

    creds = install_certificate(Path(args.data_dir), Path(args.certificate).read_bytes(), Path(args.ca).read_bytes())
    print(f"installed the certificate of node {creds.node_id} in cluster {creds.cluster_id} into {args.data_dir}/tls")
    return 0


def _add_credential_parsers(sub) -> None:
    cluster = sub.add_parser("cluster", help="cluster credentials")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    init = cluster_sub.add_parser("init", help="create a cluster CA and the first node's certificate")
    init.add_argument("--data-dir", required=True, help="data directory of the first node")
    init.add_argument("--node-id", default=None, help="node id (default: the host name)")
    init.add_argument("--cluster-id", default=None, help="cluster id (default: random)")
    init.set_defaults(func=cmd_cluster_init)

    cert = sub.add_parser("cert", help="node certificates")
    cert_sub = cert.add_subparsers(dest="cert_command", required=True)
    issue = cert_sub.add_parser(
        "issue", help="make a node key in --data-dir and sign its certificate with the CA in --ca-dir")
    issue.add_argument("--node-id", required=True, help="node id written into the certificate")
    issue.add_argument("--ca-dir", required=True, help="data directory that holds tls/ca.key")
    issue.add_argument("--data-dir", required=True, help="data directory of the new node")
    issue.set_defaults(func=cmd_cert_issue)

    request = cert_sub.add_parser("request", help="make this node's key and a certificate signing request")
    request.add_argument("--node-id", required=True, help="node id to request")
    request.add_argument("--data-dir", required=True, help="data directory of this node (the key goes to tls/node.key)")
    request.add_argument("--out", required=True, help="file to write the PEM signing request to")
    request.set_defaults(func=cmd_cert_request)

    sign = cert_sub.add_parser("sign", help="sign a node's certificate signing request with the cluster CA")
    sign.add_argument("--node-id", required=True, help="node id the request must name")
    sign.add_argument("--ca-dir", required=True, help="data directory that holds tls/ca.key")
    sign.add_argument("csr", help="PEM signing request made by `shardmesh cert request`")
    sign.add_argument("--out", required=True, help="file to write the PEM certificate to")
    sign.set_defaults(func=cmd_cert_sign)

    install = cert_sub.add_parser("install", help="install a signed certificate and the CA certificate")
    install.add_argument("--data-dir", required=True, help="data directory of this node")
    install.add_argument("certificate", help="PEM certificate made by `shardmesh cert sign`")
    install.add_argument("ca", help="the cluster's ca.pem")
    install.set_defaults(func=cmd_cert_install)


# ===================================================================== plan and demo


def cmd_plan(args: argparse.Namespace) -> int:
    from coordinator.plan_cli import main as plan_main

    return plan_main(args.plan_args)


def cmd_demo(args: argparse.Namespace) -> int:
    from nodeagent.demo import run_demo

    # The demo prints its own progress; library INFO lines would only bury it.
    _setup_logging("WARNING")
    return run_demo(args)


def _add_tool_parsers(sub) -> None:
    plan = sub.add_parser("plan", help="plan a placement offline from CLUSTER.json and PROFILE.json",
                          add_help=False)
    plan.add_argument("plan_args", nargs=argparse.REMAINDER)
    plan.set_defaults(func=cmd_plan)

    demo = sub.add_parser("demo", help="run a local cluster on a real packaged model and check its outputs")
    demo.add_argument("--agents", type=int, default=3, help="agent processes to start (default 3)")
    demo.add_argument("--model", choices=("minilm", "efficientnet"), default="minilm", help="packaged model")
    demo.add_argument("--requests", type=int, default=60, help="requests to send (default 60)")
    demo.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    demo.add_argument("--chaos", action="store_true", help="SIGKILL a segment-holding agent mid-run")
    demo.add_argument("--json", action="store_true", help="print one JSON summary as the last line")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory (agent logs and data) after the run; "
                      "the agents themselves are stopped")
    demo.set_defaults(func=cmd_demo)


# ===================================================================== entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardmesh",
        description="Split a PyTorch model into segments and serve it across a cluster of machines.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_agent_parser(sub)
    _add_credential_parsers(sub)
    _add_tool_parsers(sub)
    from nodeagent.client import add_subcommands
    add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        # The planner parses its own flags, including --help.
        from coordinator.plan_cli import main as plan_main
        return plan_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return int(args.func(args) or 0)
    except CredentialsError as exc:
        print(f"shardmesh {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"shardmesh {args.command}: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
