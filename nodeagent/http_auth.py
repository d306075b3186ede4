"""Bearer tokens of the admin API.

Two tokens exist per cluster: the admin token opens every route, the inference token opens only
the inference route, so a client application that needs predictions cannot deploy models or move
traffic. Both are made once (`generate_tokens`, called by `shardmesh cluster init`) and stored in
`<data_dir>/tokens.json` with mode 0600. `load_tokens` rejects a file that other users can read,
as ssh does for private keys, because a leaked admin token gives control of the cluster.

When tokens are required: always when `admin.require_token` is true, never when it is false, and
when it is unset (the default) only if the endpoint binds to an address other than loopback. On a
loopback-only endpoint every local user can already reach the agent's data directory or process,
so a token adds little there.

Comparison uses `hmac.compare_digest` against both tokens, evaluated in full, so the time taken
does not reveal which token or how many leading characters matched. Tokens never appear in logs:
a rejected request is logged with its route, its remote address and "missing token" or "invalid
token", at WARNING the first time per route and reason per minute and at DEBUG after that.

Routes without a token: `/healthz`, and the status page with its script and stylesheet. The page
files are constant package data with no cluster information in them; the page prompts the operator
for the token and sends it with every API call it makes, so it must load before it has one.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import json
import logging
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from nodeagent.atomicfile import atomic_write_json
from nodeagent.http_errors import ApiError, Handler

logger = logging.getLogger(__name__)

TOKENS_FILE = "tokens.json"
# 32 random bytes (256 bits) in URL-safe base64; the prefixes make a leaked token recognizable to
# secret scanners and to people.
_TOKEN_BYTES = 32
ADMIN_PREFIX = "smadm_"
INFER_PREFIX = "sminf_"

# Seconds during which repeated rejections of the same route and reason log at DEBUG.
_LOG_REPEAT_WINDOW_S = 60.0


class Scope(enum.Enum):
    """Token scope of a route."""

    PUBLIC = "public"  # no token
    INFER = "infer"  # the inference token or the admin token
    ADMIN = "admin"  # the admin token


class TokenFileError(Exception):
    """The tokens file is missing, unreadable, malformed or readable by other users."""


@dataclass(frozen=True)
class Tokens:
    admin: str
    infer: str

    def __repr__(self) -> str:  # keep tokens out of tracebacks and debug output
        return "Tokens(admin=<hidden>, infer=<hidden>)"


def generate_tokens(data_dir: Path | str) -> Tokens:
    """Create new admin and inference tokens in `<data_dir>/tokens.json` (mode 0600).

    Replaces an existing file, which invalidates the old tokens on every agent that reloads it.
    """
    tokens = Tokens(
        admin=ADMIN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES),
        infer=INFER_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES),
    )
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / TOKENS_FILE, {"admin": tokens.admin, "infer": tokens.infer}, mode=0o600)
    logger.info("wrote new admin and inference tokens to %s", directory / TOKENS_FILE)
    return tokens


def load_tokens(data_dir: Path | str, *, path: Path | str | None = None) -> Tokens:
    """Read the tokens from `path`, or from `<data_dir>/tokens.json` when `path` is None."""
    file = Path(path) if path is not None else Path(data_dir) / TOKENS_FILE
    try:
        info = file.stat()
        raw = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenFileError(
            f"tokens file {file} does not exist; create it with `shardmesh cluster init` or copy it "
            "from the agent that ran it"
        ) from None
    except OSError as exc:
        raise TokenFileError(f"cannot read tokens file {file}: {exc}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenFileError(
            f"tokens file {file} has mode {stat.S_IMODE(info.st_mode):04o}, so other users can "
            f"read it; run `chmod 600 {file}`"
        )
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TokenFileError(f"tokens file {file} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict):
        raise TokenFileError(f"tokens file {file} must hold a JSON object with keys admin and infer")
    for key in ("admin", "infer"):
        value = data.get(key)
        if not isinstance(value, str) or len(value) < 16:
            raise TokenFileError(
                f"tokens file {file}: key {key!r} is missing or shorter than 16 characters; "
                "regenerate the tokens with `shardmesh cluster init`"
            )
    return Tokens(admin=data["admin"], infer=data["infer"])


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; False for every other name or address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def token_required(admin_host: str, require_token: bool | None) -> bool:
    if require_token is not None:
        return require_token
    return not is_loopback(admin_host)


def _matches(candidate: bytes, token: str) -> bool:
    return hmac.compare_digest(candidate, token.encode("utf-8"))


def check_token(header: str | None, tokens: Tokens, scope: Scope) -> str | None:
    """Return None when `header` grants `scope`, otherwise "missing token" or "invalid token"."""
    if scope is Scope.PUBLIC:
        return None
    if not header:
        return "missing token"
    kind, _, value = header.partition(" ")
    if kind.lower() != "bearer" or not value.strip():
        return "missing token"
    candidate = value.strip().encode("utf-8", "replace")
    # Both comparisons always run so that timing does not tell which token matched.
    admin_ok = _matches(candidate, tokens.admin)
    infer_ok = _matches(candidate, tokens.infer)
    if admin_ok or (scope is Scope.INFER and infer_ok):
        return None
    return "invalid token"


class _RejectionLog:
    """Logs a rejection at WARNING once per (route, reason) per window, then at DEBUG."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[tuple[str, str], float] = {}

    def log(self, route: str, reason: str, remote: str | None) -> None:
        now = self._clock()
        key = (route, reason)
        last = self._last.get(key)
        if last is None or now - last >= _LOG_REPEAT_WINDOW_S:
            self._last[key] = now
            if len(self._last) > 1024:  # bound the memory a scan of many routes can take
                self._last.clear()
            logger.warning("rejected request to %s from %s: %s", route, remote, reason)
        else:
            logger.debug("rejected request to %s from %s: %s", route, remote, reason)


def make_auth_middleware(tokens: Tokens | None, scope_of: Callable[[web.Request], Scope]) -> Any:
    """Build the middleware that enforces `scope_of(request)`; None tokens means auth is off."""
    rejections = _RejectionLog()

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if tokens is not None:
            scope = scope_of(request)
            failure = check_token(request.headers.get("Authorization"), tokens, scope)
            if failure is not None:
                route = request.match_info.route.resource.canonical if request.match_info.route.resource else request.path
                rejections.log(f"{request.method} {route}", failure, request.remote)
                accepted = "the admin token" if scope is Scope.ADMIN else "the inference or admin token"
                raise ApiError(
                    401,
                    "unauthorized",
                    f"{failure}: send `Authorization: Bearer <token>` with {accepted}; tokens are in "
                    f"<data_dir>/{TOKENS_FILE} on the agent that ran `shardmesh cluster init`",
                    field="Authorization",
                    value=None,
                    expected="Bearer <token>",
                    headers={"WWW-Authenticate": 'Bearer realm="shardmesh"'},
                )
        return await handler(request)

    return auth_middleware

