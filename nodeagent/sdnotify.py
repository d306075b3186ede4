"""The systemd notification protocol (sd_notify) without extra dependencies.

systemd starts a `Type=notify` service with `$NOTIFY_SOCKET` set to a unix datagram socket path;
a path starting with '@' names a Linux abstract socket (the '@' stands for a leading NUL byte).
The service sends newline-separated `KEY=VALUE` assignments in one datagram each:
`READY=1` once it serves, `STOPPING=1` when shutdown begins, `WATCHDOG=1` at least every
`$WATCHDOG_USEC` microseconds when `WatchdogSec=` is set, and `STATUS=...` as a free-text status
line for `systemctl status`. See sd_notify(3).

Outside systemd (`$NOTIFY_SOCKET` unset) every call is a no-op that returns False, so the agent
runs unchanged from a shell or in tests. A send error is logged once at WARNING and otherwise
ignored: a missed notification must never take the agent down (systemd's watchdog catches a
service that really stopped notifying).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

from nodeagent.actors import Actor

logger = logging.getLogger(__name__)

__all__ = ["SystemdNotifier", "WatchdogPinger"]

# Status text is cut to this many characters so that a datagram stays small; `systemctl status`
# shows it on one line anyway.
_MAX_STATUS_CHARS = 1024


class SystemdNotifier:
    """Sender of sd_notify messages to the socket named by `$NOTIFY_SOCKET`.

    `env` defaults to `os.environ`; tests pass their own mapping.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _watchdog_usec(env)
        self._socket: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notification socket."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half of `$WATCHDOG_USEC`, or None without a watchdog.

        Half the deadline is what sd_watchdog_enabled(3) recommends, so that one late ping does
        not get the service killed.
        """
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 1_000_000 / 2

    def notify(self, **fields: str) -> bool:
        """Send `KEY=VALUE` lines (keyword names are upper-cased); return True when sent."""
        if self._address is None:
            return False
        payload = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(payload.encode("utf-8"), self._address)
        except OSError as exc:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            logger.log(level, "sd_notify to %r failed (%s); continuing without it",
                       _display(self._address), exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd that startup finished (READY=1)."""
        return self.notify(**_with_status({"READY": "1"}, status))

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd that shutdown began (STOPPING=1)."""
        return self.notify(**_with_status({"STOPPING": "1"}, status))

    def watchdog(self) -> bool:
        """Reset the systemd watchdog timer (WATCHDOG=1)."""
        return self.notify(WATCHDOG="1")

    def status(self, text: str) -> bool:
        """Set the one-line status shown by `systemctl status`."""
        return self.notify(STATUS=_one_line(text))

    def close(self) -> None:
        """Close the socket; later calls reopen it."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class WatchdogPinger(Actor[object]):
    """Actor that sends WATCHDOG=1 every `notifier.watchdog_interval_s` while the agent is healthy.

    Because it runs on the event loop, a blocked loop stops the pings and systemd restarts the
    service after `WatchdogSec`. `is_healthy`, when given, is asked before each ping; returning
    False withholds the ping (for example when the supervisor escalated) and logs a WARNING once.
    Without a watchdog configured, `run` returns at once and the supervisor records it finished.
    """

    def __init__(self, notifier: SystemdNotifier, *,
                 is_healthy: Callable[[], bool] | None = None) -> None:
        super().__init__("watchdog", mailbox_size=1)
        self.notifier = notifier
        self._is_healthy = is_healthy
        self.pings = 0

    async def run(self) -> None:
        """Ping until cancelled."""
        interval_s = self.notifier.watchdog_interval_s
        if interval_s is None or not self.notifier.enabled:
            logger.debug("systemd watchdog is not configured; no pings are sent")
            return
        logger.info("systemd watchdog: pinging every %.2f s", interval_s)
        withheld = False
        while True:
            if self._is_healthy is None or self._is_healthy():
                self.notifier.watchdog()
                self.pings += 1
                withheld = False
            elif not withheld:
                withheld = True
                logger.warning("systemd watchdog ping withheld because the agent reports "
                               "itself unhealthy; systemd restarts it unless it recovers")
            await asyncio.sleep(interval_s)


def _socket_address(raw: str) -> str | bytes | None:
    if not raw:
        return None
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode("utf-8")
    if raw.startswith("/"):
        return raw
    logger.warning("NOTIFY_SOCKET=%r is neither an absolute path nor an abstract name; "
                   "systemd notifications are disabled", raw)
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    # systemd sets WATCHDOG_PID to the main process; a child that inherited the variable must not
    # ping on the parent's behalf.
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        logger.warning("WATCHDOG_USEC=%r is not an integer; the systemd watchdog is ignored", raw)
        return None
    return usec if usec > 0 else None


def _with_status(fields: dict[str, str], status: str | None) -> dict[str, str]:
    if status is not None:
        fields["STATUS"] = _one_line(status)
    return fields


def _one_line(text: str) -> str:
    return " ".join(text.split())[:_MAX_STATUS_CHARS]


def _display(address: str | bytes) -> str:
    if isinstance(address, bytes):
        return "@" + address[1:].decode("utf-8", "replace")
    return address
