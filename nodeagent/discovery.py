"""Peer discovery: mDNS announcements and browsing, plus a static peer list.

Problem: agents on one LAN should find each other with no configuration, agents on networks that
block multicast need a fixed list, and neither source may be trusted. An mDNS record is only a
hint of an address to try. Membership is granted later, by the mutual-TLS handshake on the peer link.

Rules:
- Each agent registers the service `<node id>._shardmesh._tcp.local.` with python-zeroconf's
  asyncio API and browses the same type. TXT keys: `txtvers`, `id` (node id), `cluster` (cluster
  id), `pv` (supported protocol versions, comma-separated), `peer` (peer port, also the SRV port),
  `admin` (admin HTTP port), `inc` (incarnation) and `caps` (short capability summary). Every
  key=value string must fit in 255 bytes (RFC 6763 section 6.1); the free-text `caps` is cut to
  fit with a WARNING, and an id that does not fit is an error. The whole TXT record is kept under
  1300 bytes, the size RFC 6763 section 6.2 recommends so that it fits in one Ethernet frame.
- Services of other clusters, and of peers with no protocol version in common, are ignored and
  logged once per cluster id or version set. A service with this agent's node id but another
  name, or a registration rejected because the name is taken, is reported as a suspected
  duplicate node id (a cloned disk image).
- Interfaces are explicit (`network.mdns_interfaces`: names or IPv4 addresses) or chosen
  automatically for a real deployment: up, multicast capable, not loopback, not virtual (bridges,
  docker, veth, tunnels live under /sys/devices/virtual/net), and not link-local 169.254.0.0/16.
  Tests and the demo pass ["127.0.0.1"], because zeroconf's own default multicasts out of every
  interface. Only IPv4 is used.
  NOTE: IPv6 mDNS is not implemented; a host reachable only over IPv6 needs a static peer entry.
- Static peers ("host:port") are reported once at start with `source="static"` and no node id;
  the peer-link layer learns the id in the handshake and keeps redialing.
- Findings go to a callback as `PeerSeen` / `PeerGone` events. The callback runs on the event
  loop and must not block (typically it calls `Actor.send_nowait`).
- zeroconf calls the browser handler synchronously; the handler only queues a message into this
  actor's own mailbox, and resolution runs in the actor's `run` loop, so no task is left unowned.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ifaddr
from zeroconf import DNSService, IPVersion, NonUniqueNameException, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from nodeagent.actors import Actor, MailboxFull, Supervisor
from nodeagent.config import AgentConfig, parse_host_port
from protocol.messages import PROTOCOL_VERSIONS

logger = logging.getLogger(__name__)

__all__ = [
    "Discovery", "DiscoveryActor", "DiscoveryDiagnostics", "DiscoveryEvent", "InterfaceCandidate",
    "PeerGone", "PeerSeen", "SERVICE_TYPE", "ServiceSighting", "UpdateAnnouncement",
    "build_txt", "choose_interfaces", "list_interface_candidates", "parse_txt",
    "select_interfaces",
]

SERVICE_TYPE = "_shardmesh._tcp.local."
TXT_VERSION = "1"
MAX_TXT_STRING_BYTES = 255
MAX_TXT_TOTAL_BYTES = 1300
MAX_INSTANCE_LABEL_BYTES = 63
DEFAULT_RESOLVE_TIMEOUT_S = 3.0
DEFAULT_ALONE_AFTER_S = 10.0
MAX_RECENT_ERRORS = 20
# DNS record type SRV and class IN (RFC 1035, RFC 2782), for reading zeroconf's cache.
_TYPE_SRV = 33
_CLASS_IN = 1

# /sys/class/net/<name>/flags bits, from linux/if.h.
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_MULTICAST = 0x1000

# Names of virtual interfaces that may sit outside /sys/devices/virtual on some kernels.
VIRTUAL_NAME_PREFIXES = ("lo", "docker", "br-", "veth", "virbr", "cni", "flannel", "cali",
                         "vxlan", "tun", "tap", "zt", "podman", "lxc", "vnet")


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerSeen:
    """A peer address to try. Grants nothing: membership needs the mutual-TLS handshake."""

    node_id: str | None
    """Node id from the TXT record; None for a static peer (learned in the handshake)."""
    cluster_id: str | None
    host: str
    port: int
    """Peer (mutual-TLS) port."""
    admin_port: int | None
    source: str
    """"mdns" or "static"."""
    txt: dict[str, str] = field(default_factory=dict)
    addresses: tuple[str, ...] = ()
    """Every IPv4 address the service announced; `host` is the first."""
    incarnation: int | None = None
    protocol_versions: tuple[int, ...] = ()


@dataclass(frozen=True)
class PeerGone:
    """An mDNS service went away (goodbye packet or expired records)."""

    node_id: str | None
    cluster_id: str | None
    host: str
    port: int
    admin_port: int | None
    source: str
    reason: str


DiscoveryEvent = PeerSeen | PeerGone


@dataclass(frozen=True)
class UpdateAnnouncement:
    """Message to the discovery actor: re-announce with a new summary or incarnation."""

    capability_summary: str | None = None
    incarnation: int | None = None
    admin_port: int | None = None


@dataclass(frozen=True)
class _ServiceChanged:
    """Internal message queued by the zeroconf browser handler."""

    name: str
    state: ServiceStateChange


# -- TXT records -------------------------------------------------------------------------------


def build_txt(*, node_id: str, cluster_id: str, protocol_versions: Sequence[int], peer_port: int,
              admin_port: int | None, incarnation: int, capability_summary: str) -> dict[str, str]:
    """Build the TXT properties, cutting `caps` to the TXT limits; raise ValueError otherwise."""
    txt: dict[str, str] = {
        "txtvers": TXT_VERSION,
        "id": node_id,
        "cluster": cluster_id,
        "pv": ",".join(str(version) for version in protocol_versions),
        "peer": str(peer_port),
        "inc": str(incarnation),
    }
    if admin_port is not None:
        txt["admin"] = str(admin_port)
    for key, value in txt.items():
        size = len(key.encode()) + 1 + len(value.encode())
        if size > MAX_TXT_STRING_BYTES:
            raise ValueError(f"TXT entry {key!r} is {size} bytes; an mDNS TXT string holds at "
                             f"most {MAX_TXT_STRING_BYTES}. Use a shorter {key}")

    used = sum(1 + len(k.encode()) + 1 + len(v.encode()) for k, v in txt.items())
    room = min(MAX_TXT_STRING_BYTES - len(b"caps="), MAX_TXT_TOTAL_BYTES - used - 1 - 5)
    caps = _cut_utf8(capability_summary, room)
    if caps != capability_summary:
        logger.warning("node %s: capability summary cut from %d to %d bytes to fit the mDNS TXT "
                       "record; the full record is exchanged over the peer link", node_id,
                       len(capability_summary.encode()), len(caps.encode()))
    txt["caps"] = caps
    return txt


def _cut_utf8(text: str, max_bytes: int) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max(0, max_bytes)].decode("utf-8", "ignore")


def parse_txt(properties: dict[bytes, bytes | None]) -> dict[str, str]:
    """Decode zeroconf TXT properties to str; keys without a value map to ""."""
    decoded: dict[str, str] = {}
    for key, value in properties.items():
        decoded[key.decode("utf-8", "replace")] = (value or b"").decode("utf-8", "replace")
    return decoded


def instance_label(node_id: str) -> str:
    """Return the DNS-SD instance label for `node_id`, hashed down to 63 bytes when longer."""
    if len(node_id.encode()) <= MAX_INSTANCE_LABEL_BYTES:
        return node_id
    digest = hashlib.sha256(node_id.encode()).hexdigest()[:12]
    return _cut_utf8(node_id, MAX_INSTANCE_LABEL_BYTES - 13) + "-" + digest


# -- interfaces --------------------------------------------------------------------------------


@dataclass(frozen=True)
class InterfaceCandidate:
    """One IPv4 address of one network interface, with the facts selection needs."""

    name: str
    address: str
    flags: int | None
    """/sys/class/net/<name>/flags, or None where unreadable."""
    is_virtual: bool


def list_interface_candidates(sys_net: Path = Path("/sys/class/net")) -> list[InterfaceCandidate]:
    """List every IPv4 address of every interface, using ifaddr and /sys/class/net."""
    candidates: list[InterfaceCandidate] = []
    for adapter in ifaddr.get_adapters():
        name = str(adapter.name)
        flags: int | None
        try:
            flags = int((sys_net / name / "flags").read_text().strip(), 16)
        except (OSError, ValueError):
            flags = None
        try:
            is_virtual = "/virtual/" in str((sys_net / name).resolve())
        except OSError:
            is_virtual = False
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                candidates.append(InterfaceCandidate(name, ip.ip, flags, is_virtual))
    return candidates


def select_interfaces(candidates: Iterable[InterfaceCandidate]) -> tuple[list[str], dict[str, str]]:
    """Pick addresses fit to announce to other hosts; return (chosen, {address: why rejected})."""
    chosen: list[str] = []
    rejected: dict[str, str] = {}
    for candidate in candidates:
        label = f"{candidate.name}/{candidate.address}"
        address = ipaddress.IPv4Address(candidate.address)
        if address.is_loopback:
            rejected[label] = "loopback address"
        elif address.is_link_local:
            rejected[label] = "link-local address (169.254.0.0/16)"
        elif candidate.name.startswith(VIRTUAL_NAME_PREFIXES) or candidate.is_virtual:
            rejected[label] = "virtual interface (bridge, container, tunnel or veth)"
        elif candidate.flags is not None and not candidate.flags & IFF_UP:
            rejected[label] = "interface is down"
        elif candidate.flags is not None and candidate.flags & IFF_LOOPBACK:
            rejected[label] = "loopback interface"
        elif candidate.flags is not None and not candidate.flags & IFF_MULTICAST:
            rejected[label] = "interface is not multicast capable"
        else:
            chosen.append(candidate.address)
    return chosen, rejected


def choose_interfaces(configured: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Resolve configured interface names or addresses to IPv4 addresses, or pick automatically.

    Returns (addresses, rejected). Raises ValueError for a configured name that has no IPv4
    address, naming the interfaces that exist.
    """
    if not configured:
        return select_interfaces(list_interface_candidates())

    addresses: list[str] = []
    candidates: list[InterfaceCandidate] | None = None
    for entry in configured:
        try:
            ipaddress.IPv4Address(entry)
        except ValueError:
            if candidates is None:
                candidates = list_interface_candidates()
            matches = [c.address for c in candidates if c.name == entry]
            if not matches:
                known = ", ".join(sorted({c.name for c in candidates}))
                raise ValueError(f"mDNS interface {entry!r} has no IPv4 address; interfaces "
                                 f"with one: {known}") from None
            addresses.extend(matches)
        else:
            addresses.append(entry)
    return list(dict.fromkeys(addresses)), {}


# -- diagnostics -------------------------------------------------------------------------------


@dataclass
class ServiceSighting:
    """Record of one service name seen by discovery, for status output."""

    name: str
    node_id: str | None
    cluster_id: str | None
    addresses: tuple[str, ...]
    port: int | None
    source: str
    state: str
    """present, gone, ignored (with `reason`) or unresolved."""
    reason: str = ""
    first_seen_at: float = 0.0
    """Unix time of the first sighting."""
    last_seen_at: float = 0.0


@dataclass
class DiscoveryDiagnostics:
    """Discovery state for `shardmesh status` and `GET /v1/discovery`."""

    mdns_enabled: bool
    interfaces: list[str] = field(default_factory=list)
    rejected_interfaces: dict[str, str] = field(default_factory=dict)
    announced_as: str | None = None
    static_peers: list[str] = field(default_factory=list)
    services: dict[str, ServiceSighting] = field(default_factory=dict)
    ignored_clusters: set[str] = field(default_factory=set)
    duplicate_node_id: str | None = None
    """Reason to suspect that another agent uses this node id, or None."""
    errors: list[str] = field(default_factory=list)
    started_monotonic: float | None = None

    def peers_found(self) -> int:
        """Return the number of services currently present, static peers included."""
        return sum(1 for s in self.services.values() if s.state == "present")

    def alone_message(self, now_monotonic: float, after_s: float) -> str | None:
        """Return "no peers found on X after T s" once `after_s` passed with no peer, else None."""
        if self.started_monotonic is None or self.peers_found():
            return None
        waited = now_monotonic - self.started_monotonic
        if waited < after_s:
            return None
        where = ", ".join(self.interfaces) if self.mdns_enabled and self.interfaces else \
            "no interface (mDNS disabled)"
        return f"no peers found on {where} after {waited:.0f} s"

    def add_error(self, text: str) -> None:
        """Record an error for status output, keeping the latest MAX_RECENT_ERRORS."""
        self.errors.append(text)
        del self.errors[:-MAX_RECENT_ERRORS]

    def to_dict(self, now_monotonic: float | None = None,
                alone_after_s: float = DEFAULT_ALONE_AFTER_S) -> dict[str, Any]:
        """Return a JSON-compatible dict."""
        now = time.monotonic() if now_monotonic is None else now_monotonic
        return {
            "mdns_enabled": self.mdns_enabled,
            "interfaces": list(self.interfaces),
            "rejected_interfaces": dict(self.rejected_interfaces),
            "announced_as": self.announced_as,
            "static_peers": list(self.static_peers),
            "services": [vars(s) | {"addresses": list(s.addresses)}
                         for s in self.services.values()],
            "ignored_clusters": sorted(self.ignored_clusters),
            "duplicate_node_id": self.duplicate_node_id,
            "errors": list(self.errors),
            "alone": self.alone_message(now, alone_after_s),
        }


# -- the actor ---------------------------------------------------------------------------------


class DiscoveryActor(Actor[object]):
    """Announces this agent over mDNS, browses for peers and reports static peers."""

    accepts = (UpdateAnnouncement, _ServiceChanged)

    def __init__(self, *, node_id: str, cluster_id: str, peer_port: int,
                 admin_port: int | None, on_event: Callable[[DiscoveryEvent], None],
                 protocol_versions: Sequence[int] = PROTOCOL_VERSIONS,
                 interfaces: Sequence[str] = (), static_peers: Sequence[str] = (),
                 mdns_enabled: bool = True, advertise_host: str | None = None,
                 capability_summary: str = "", incarnation: int = 0,
                 alone_after_s: float = DEFAULT_ALONE_AFTER_S,
                 resolve_timeout_s: float = DEFAULT_RESOLVE_TIMEOUT_S,
                 mailbox_size: int = 256) -> None:
        super().__init__("discovery", mailbox_size=mailbox_size)
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.peer_port = peer_port
        self.admin_port = admin_port
        self.protocol_versions = tuple(protocol_versions)
        self.configured_interfaces = tuple(interfaces)
        self.static_peers = tuple(static_peers)
        self.mdns_enabled = mdns_enabled
        self.advertise_host = advertise_host
        self.capability_summary = capability_summary
        self.incarnation = incarnation
        self.alone_after_s = alone_after_s
        self.resolve_timeout_s = resolve_timeout_s
        self._on_event = on_event
        self.diagnostics = DiscoveryDiagnostics(mdns_enabled=mdns_enabled,
                                                static_peers=list(static_peers))
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._registered = False
        self._seen: dict[str, PeerSeen] = {}
        self._logged_ignores: set[str] = set()
        self._alone_logged = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # The A-record host name is unique per process. zeroconf treats a service name announced
        # with the same host name as the same responder, so a shared host name would hide a
        # second agent with this node id instead of raising NonUniqueNameException.
        self._server_name = f"{_cut_utf8(instance_label(node_id), 50)}-{secrets.token_hex(4)}.local."
        self.started = asyncio.Event()
        """Set when `on_start` finished (announced and browsing, or mDNS disabled)."""
        # Checked now so that a bad id fails at construction, not on every restart.
        self._txt()

    @classmethod
    def from_config(cls, config: AgentConfig, *, node_id: str, cluster_id: str, peer_port: int,
                    admin_port: int | None, on_event: Callable[[DiscoveryEvent], None],
                    protocol_versions: Sequence[int] = PROTOCOL_VERSIONS,
                    capability_summary: str = "",
                    incarnation: int = 0) -> DiscoveryActor:
        """Build the actor from the `network` section of the agent config."""
        network = config.network
        return cls(node_id=node_id, cluster_id=cluster_id, peer_port=peer_port,
                   admin_port=admin_port, protocol_versions=protocol_versions,
                   on_event=on_event, interfaces=network.mdns_interfaces,
                   static_peers=network.static_peers, mdns_enabled=network.mdns_enabled,
                   advertise_host=network.advertise_host,
                   capability_summary=capability_summary, incarnation=incarnation,
                   alone_after_s=max(DEFAULT_ALONE_AFTER_S, 4 * config.timing.dead_after_s))

    def _txt(self) -> dict[str, str]:
        return build_txt(node_id=self.node_id, cluster_id=self.cluster_id,
                         protocol_versions=self.protocol_versions, peer_port=self.peer_port,
                         admin_port=self.admin_port, incarnation=self.incarnation,
                         capability_summary=self.capability_summary)

    @property
    def service_name(self) -> str:
        """The DNS-SD instance name this agent registers."""
        return f"{instance_label(self.node_id)}.{SERVICE_TYPE}"

    # -- lifecycle ----------------------------------------------------------------------------

    async def on_start(self) -> None:
        """Report static peers, then start mDNS (announce and browse) when enabled."""
        self._loop = asyncio.get_running_loop()
        self.diagnostics.started_monotonic = time.monotonic()
        self._alone_logged = False
        self._report_static_peers()
        if self.mdns_enabled:
            await self._start_mdns()
        self.started.set()

    async def _start_mdns(self) -> None:
        addresses, rejected = choose_interfaces(self.configured_interfaces)
        self.diagnostics.interfaces = addresses
        self.diagnostics.rejected_interfaces = rejected
        if not addresses:
            message = ("no usable mDNS interface (rejected: " +
                       (", ".join(f"{k}: {v}" for k, v in rejected.items()) or "none found") +
                       "); set network.mdns_interfaces or use network.static_peers")
            self.diagnostics.add_error(message)
            logger.warning("node %s: %s", self.node_id, message)
            return

        announce = self._announce_addresses(addresses)
        logger.info("node %s: mDNS on %s, announcing %s at %s port %d", self.node_id,
                    ", ".join(addresses), self.service_name, ", ".join(announce), self.peer_port)
        self._aiozc = AsyncZeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
        self._info = AsyncServiceInfo(
            SERVICE_TYPE, self.service_name, port=self.peer_port, properties=self._txt(),
            parsed_addresses=announce, server=self._server_name)
        try:
            await (await self._aiozc.async_register_service(self._info))
            self._registered = True
            self.diagnostics.announced_as = self.service_name
        except NonUniqueNameException:
            reason = (f"mDNS name {self.service_name} is already announced by another host; "
                      "two agents seem to share node id " + repr(self.node_id) +
                      " (a cloned disk image?). Issue a new certificate for one of them")
            self.diagnostics.duplicate_node_id = reason
            self.diagnostics.add_error(reason)
            logger.error("node %s: %s", self.node_id, reason)
        self._browser = AsyncServiceBrowser(self._aiozc.zeroconf, SERVICE_TYPE,
                                            handlers=[self._on_service_state_change])

    def _announce_addresses(self, interface_addresses: list[str]) -> list[str]:
        if self.advertise_host is None:
            return interface_addresses
        try:
            ipaddress.IPv4Address(self.advertise_host)
        except ValueError:
            logger.warning("node %s: network.advertise_host %r is not an IPv4 address; mDNS "
                           "announces the interface addresses instead", self.node_id,
                           self.advertise_host)
            return interface_addresses
        return [self.advertise_host]

    async def on_stop(self) -> None:
        """Unregister (sends goodbye packets), stop browsing and close zeroconf."""
        self.started.clear()
        aiozc, self._aiozc = self._aiozc, None
        browser, self._browser = self._browser, None
        if aiozc is None:
            return
        try:
            if browser is not None:
                await browser.async_cancel()
            if self._registered and self._info is not None:
                await (await aiozc.async_unregister_service(self._info))
                logger.info("node %s: mDNS service %s unregistered", self.node_id,
                            self.service_name)
        except Exception as exc:  # zeroconf may fail on a closed socket; close must still run
            logger.warning("node %s: mDNS unregister failed: %s", self.node_id, exc)
        finally:
            self._registered = False
            await aiozc.async_close()

    def _report_static_peers(self) -> None:
        now = time.time()
        for entry in self.static_peers:
            host, port = parse_host_port(entry)
            event = PeerSeen(node_id=None, cluster_id=None, host=host, port=port,
                             admin_port=None, source="static", addresses=(host,))
            self.diagnostics.services[f"static:{entry}"] = ServiceSighting(
                name=f"static:{entry}", node_id=None, cluster_id=None, addresses=(host,),
                port=port, source="static", state="present", first_seen_at=now,
                last_seen_at=now)
            self._emit(event)

    # -- browsing -----------------------------------------------------------------------------

    def _on_service_state_change(self, zeroconf: Any, service_type: str, name: str,
                                 state_change: ServiceStateChange) -> None:
        """zeroconf browser handler: queue the change for the run loop and return at once."""
        message = _ServiceChanged(name, state_change)
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._queue_change, message)
        except RuntimeError:  # the loop is closed during shutdown; nothing left to notify
            pass

    def _queue_change(self, message: _ServiceChanged) -> None:
        try:
            self.send_nowait(message)
        except MailboxFull:
            # mDNS repeats announcements, so a dropped change is seen again later.
            logger.warning("node %s: discovery mailbox full; dropped %s of %s", self.node_id,
                           message.state.name, message.name)
        except Exception as exc:  # the actor may be stopping; never raise into zeroconf
            logger.debug("node %s: change of %s not queued: %s", self.node_id, message.name, exc)

    async def run(self) -> None:
        """Handle messages; log "no peers found" once when alone for `alone_after_s`."""
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses an outside
            # cancellation that arrives just as the mailbox delivers, which made stop() hang.
            try:
                async with asyncio.timeout(1.0):
                    message = await self._mailbox.get()
            except TimeoutError:
                self._check_alone()
                self._check_duplicate()
                continue
            await self.handle(message)

    def _check_alone(self) -> None:
        if self._alone_logged:
            return
        text = self.diagnostics.alone_message(time.monotonic(), self.alone_after_s)
        if text is not None:
            self._alone_logged = True
            logger.warning("node %s: %s", self.node_id, text)

    async def handle(self, message: object) -> None:
        """Dispatch one message."""
        if isinstance(message, _ServiceChanged):
            if message.state is ServiceStateChange.Removed:
                self._service_removed(message.name)
            else:
                await self._resolve(message.name)
        elif isinstance(message, UpdateAnnouncement):
            await self._update(message)

    def _check_duplicate(self) -> None:
        """Report another responder announcing this agent's service name (same node id).

        zeroconf's probing catches this at registration only when the other agent responds in
        time; the cache check here also catches an agent that appears later.
        """
        if self._aiozc is None or self.diagnostics.duplicate_node_id is not None:
            return
        records = self._aiozc.zeroconf.cache.async_all_by_details(self.service_name, _TYPE_SRV,
                                                                  _CLASS_IN)
        foreign = sorted({record.server for record in records if isinstance(record, DNSService)
                          and record.server.lower() != self._server_name.lower()})
        if not foreign:
            return
        reason = (f"another host ({', '.join(foreign)}) announces this agent's mDNS name "
                  f"{self.service_name}; two agents seem to share node id {self.node_id!r} "
                  "(a cloned disk image?). Issue a new certificate for one of them")
        self.diagnostics.duplicate_node_id = reason
        self.diagnostics.add_error(reason)
        logger.error("node %s: %s", self.node_id, reason)

    async def _resolve(self, name: str) -> None:
        if self._aiozc is None:
            return
        if name == self.service_name:
            self._check_duplicate()
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        found = await info.async_request(self._aiozc.zeroconf, self.resolve_timeout_s * 1000)
        now = time.time()
        sighting = self.diagnostics.services.get(name)
        if not found:
            logger.info("node %s: mDNS service %s did not resolve within %.1f s", self.node_id,
                        name, self.resolve_timeout_s)
            if sighting is None:
                self.diagnostics.services[name] = ServiceSighting(
                    name=name, node_id=None, cluster_id=None, addresses=(), port=None,
                    source="mdns", state="unresolved", reason="no SRV/TXT/A answer",
                    first_seen_at=now, last_seen_at=now)
            return

        txt = parse_txt(info.properties)
        addresses = tuple(info.parsed_addresses(IPVersion.V4Only))
        node_id = txt.get("id") or None
        cluster_id = txt.get("cluster") or None
        reason = self._ignore_reason(name, txt, addresses, info.port)
        state = "ignored" if reason else "present"
        first_seen = sighting.first_seen_at if sighting is not None else now
        self.diagnostics.services[name] = ServiceSighting(
            name=name, node_id=node_id, cluster_id=cluster_id, addresses=addresses,
            port=info.port, source="mdns", state=state, reason=reason or "",
            first_seen_at=first_seen, last_seen_at=now)
        if reason:
            return

        if info.port is None or node_id is None:  # already rejected by _ignore_reason
            return
        event = PeerSeen(node_id=node_id, cluster_id=cluster_id, host=addresses[0],
                         port=info.port, admin_port=_int_or_none(txt.get("admin")),
                         source="mdns", txt=txt, addresses=addresses,
                         incarnation=_int_or_none(txt.get("inc")),
                         protocol_versions=_versions(txt.get("pv", "")))
        previous = self._seen.get(name)
        if previous == event:
            return
        self._seen[name] = event
        logger.info("node %s: found peer %s at %s:%d via mDNS (incarnation %s)", self.node_id,
                    node_id, event.host, event.port, event.incarnation)
        self._emit(event)

    def _ignore_reason(self, name: str, txt: dict[str, str], addresses: tuple[str, ...],
                       port: int | None) -> str | None:
        """Return why a resolved service is not reported as a peer, or None to report it."""
        node_id = txt.get("id")
        cluster_id = txt.get("cluster", "")
        if not node_id or port is None or not addresses:
            reason = "TXT record lacks a node id, or the service has no port or IPv4 address"
            self._log_ignore_once(f"malformed:{name}", f"ignoring mDNS service {name}: {reason}")
            return reason
        if cluster_id != self.cluster_id:
            self.diagnostics.ignored_clusters.add(cluster_id)
            self._log_ignore_once(f"cluster:{cluster_id}",
                                  f"ignoring mDNS services of cluster {cluster_id!r} (this "
                                  f"agent is in cluster {self.cluster_id!r})")
            return f"other cluster {cluster_id!r}"
        common = set(_versions(txt.get("pv", ""))) & set(self.protocol_versions)
        if not common:
            versions = txt.get("pv", "")
            self._log_ignore_once(f"pv:{versions}",
                                  f"ignoring peer {node_id} at {addresses[0]}: protocol "
                                  f"versions {versions!r} share none with "
                                  f"{list(self.protocol_versions)}")
            return f"no common protocol version (peer offers {versions!r})"
        if node_id == self.node_id:
            reason = (f"service {name} at {', '.join(addresses)} claims this agent's node id; "
                      "two agents seem to share one identity (a cloned disk image?)")
            self.diagnostics.duplicate_node_id = reason
            self._log_ignore_once(f"duplicate:{name}", reason, level=logging.ERROR)
            return "duplicate of this agent's node id"
        return None

    def _log_ignore_once(self, key: str, text: str, level: int = logging.INFO) -> None:
        if key in self._logged_ignores:
            logger.debug("node %s: %s", self.node_id, text)
            return
        if len(self._logged_ignores) < 1000:
            self._logged_ignores.add(key)
        logger.log(level, "node %s: %s", self.node_id, text)

    def _service_removed(self, name: str) -> None:
        sighting = self.diagnostics.services.get(name)
        if sighting is not None:
            sighting.state = "gone"
            sighting.last_seen_at = time.time()
        previous = self._seen.pop(name, None)
        if previous is None:
            return
        logger.info("node %s: peer %s at %s:%d left mDNS", self.node_id, previous.node_id,
                    previous.host, previous.port)
        self._emit(PeerGone(node_id=previous.node_id, cluster_id=previous.cluster_id,
                            host=previous.host, port=previous.port,
                            admin_port=previous.admin_port, source="mdns",
                            reason="mDNS service removed (goodbye or expired)"))

    async def _update(self, message: UpdateAnnouncement) -> None:
        if message.capability_summary is not None:
            self.capability_summary = message.capability_summary
        if message.incarnation is not None:
            self.incarnation = message.incarnation
        if message.admin_port is not None:
            self.admin_port = message.admin_port
        if self._aiozc is None or self._info is None or not self._registered:
            return
        self._info = AsyncServiceInfo(
            SERVICE_TYPE, self.service_name, port=self.peer_port, properties=self._txt(),
            parsed_addresses=self._info.parsed_addresses(IPVersion.V4Only),
            server=self._info.server)
        await (await self._aiozc.async_update_service(self._info))
        logger.info("node %s: mDNS announcement updated (incarnation %d)", self.node_id,
                    self.incarnation)

    def _emit(self, event: DiscoveryEvent) -> None:
        try:
            self._on_event(event)
        except Exception as exc:  # a consumer bug must not stop discovery
            self.diagnostics.add_error(f"event callback failed: {type(exc).__name__}: {exc}")
            logger.error("node %s: discovery event callback failed for %s", self.node_id,
                         type(event).__name__, exc_info=exc)


class Discovery:
    """A `DiscoveryActor` under its own supervisor, for callers that start and stop it directly.

    `start()` returns once the service is announced and browsing; `stop()` unregisters it (peers
    receive goodbye packets) and awaits every task. Constructor arguments are those of
    `DiscoveryActor`.
    """

    def __init__(self, *, start_timeout_s: float = 10.0, **actor_kwargs: Any) -> None:
        self.actor = DiscoveryActor(**actor_kwargs)
        self.start_timeout_s = start_timeout_s
        self._supervisor: Supervisor | None = None

    async def start(self) -> None:
        """Start the actor and wait until it announced itself; raise TimeoutError otherwise."""
        if self._supervisor is not None:
            raise RuntimeError(f"discovery of node {self.actor.node_id} is already started")
        self._supervisor = Supervisor(f"discovery {self.actor.node_id}")
        self._supervisor.start(self.actor)
        try:
            await asyncio.wait_for(self.actor.started.wait(), self.start_timeout_s)
        except TimeoutError:
            await self.stop()
            raise TimeoutError(f"discovery of node {self.actor.node_id} did not start within "
                               f"{self.start_timeout_s} s; see the log for the error") from None

    async def stop(self) -> None:
        """Unregister, stop browsing and await the actor's task. Safe to call twice."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            await supervisor.stop()

    def update(self, announcement: UpdateAnnouncement) -> None:
        """Queue a re-announcement with a new summary, incarnation or admin port."""
        self.actor.send_nowait(announcement)

    def diagnostics(self) -> dict[str, Any]:
        """Return the discovery diagnostics as a JSON-compatible dict."""
        return self.actor.diagnostics.to_dict(alone_after_s=self.actor.alone_after_s)


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _versions(text: str) -> tuple[int, ...]:
    versions: list[int] = []
    for part in text.split(","):
        value = _int_or_none(part.strip())
        if value is not None:
            versions.append(value)
    return tuple(versions)
