"""Routes to peers' subnets via their addresses on the underlay (`<subnet> via <ip> dev <iface>`), kept in
the kernel: host-gw's routes, and vxlan's with DirectRouting. set() makes the kernel match a wanted set,
check() puts back what someone removed, as flannel's route check does every 10 s; undo() removes them all.
"""

from __future__ import annotations

import ipaddress
import logging
import time

from udpflannel.host.links import HostConfig, HostError, Route
from udpflannel.host.netlink import NetlinkError
from udpflannel.lease.model import Lease

log = logging.getLogger(__name__)

CHECK_INTERVAL = 10.0  # seconds between looks at the routing table (flannel's routeCheck period)
DIRECT_TTL = 60.0  # seconds an answer of is_direct() is reused
PROC_ROUTE = "/proc/net/route"
PROC_ROUTE_V6 = "/proc/net/ipv6_route"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def safe_peer_subnet(subnet: Network, networks: list[Network], own: list[Network]) -> bool:
    """A peer's subnet may be routed: inside a cluster network and clear of our own subnets, so a store entry
    can never take over a host route (the default route, the underlay, our pods)."""
    inside = any(subnet.subnet_of(n) for n in networks if n.version == subnet.version)  # type: ignore[arg-type]
    return inside and not any(subnet.overlaps(o) for o in own if o.version == subnet.version)


def peer_routes(
    lease: Lease,
    backend_type: str,
    dev: str,
    networks: list[Network],
    own: list[Network],
    own_ips: frozenset[str] = frozenset(),
) -> list[Route]:
    """The routes to one peer lease's subnets via its public addresses; [] for a lease of another backend
    type, and none for a family without its public address (flannel ignores those too), for a subnet that is
    not safe_peer_subnet, or via an address of ours (a stale lease of this node: the kernel would take a
    route via ourselves)."""
    if lease.attrs.backend_type != backend_type:
        return []
    routes = []
    for subnet, gateway in (
        (lease.subnet, lease.attrs.public_ip),
        (lease.ipv6_subnet, lease.attrs.public_ipv6),
    ):
        if subnet is None or gateway is None or str(gateway) in own_ips:
            continue
        if safe_peer_subnet(subnet, networks, own):
            routes.append(Route(str(subnet), dev, gateway=str(gateway)))
        else:
            log.warning("ignoring peer subnet %s: outside the cluster network or overlapping ours", subnet)
    return routes


def kernel_gateways(
    dev: str, route_file: str = PROC_ROUTE, route6_file: str = PROC_ROUTE_V6
) -> dict[str, str]:
    """Main-table routes through `dev` that have a gateway, as {dst CIDR: gateway}, read from /proc (no
    netlink child needed for a periodic look)."""
    found: dict[str, str] = {}
    try:
        with open(route_file, encoding="ascii") as f:
            next(f, None)  # the header line
            for line in f:
                cols = line.split()
                if len(cols) < 8 or cols[0] != dev or int(cols[2], 16) == 0:
                    continue
                dst, gw, mask = (_proc_ipv4(c) for c in (cols[1], cols[2], cols[7]))
                found[str(ipaddress.IPv4Network(f"{dst}/{mask}", strict=False))] = str(gw)
    except (OSError, ValueError):
        pass
    try:
        with open(route6_file, encoding="ascii") as f:
            for line in f:
                cols = line.split()
                if len(cols) < 10 or cols[9] != dev or int(cols[4], 16) == 0:
                    continue
                net6 = ipaddress.IPv6Network(
                    (ipaddress.IPv6Address(bytes.fromhex(cols[0])), int(cols[1], 16)), strict=False
                )
                found[str(net6)] = str(ipaddress.IPv6Address(bytes.fromhex(cols[4])))
    except (OSError, ValueError):
        pass
    return found


def _proc_ipv4(hex_le: str) -> ipaddress.IPv4Address:
    """/proc/net/route prints addresses as the hex of their network-order bytes read little-endian."""
    return ipaddress.IPv4Address(int(hex_le, 16).to_bytes(4, "little"))


class PeerRoutes:
    """The routes we keep to peers through one underlay device."""

    def __init__(self, dev: str) -> None:
        self.dev = dev
        self.host = HostConfig()
        self.wanted: dict[str, Route] = {}  # dst -> the route we keep there
        self.failed: dict[str, str] = {}  # dst -> why the kernel refused it (logged once per reason)
        self.errors = 0
        self.repairs = 0
        self._next_check = time.monotonic() + CHECK_INTERVAL
        self._direct: dict[str, bool] = {}  # ip -> on the link, as the kernel answered since _direct_since
        self._direct_since = time.monotonic()
        # ip -> (when to ask again, the wait before that): its lookup found no route, or failed
        self._doubtful: dict[str, tuple[float, float]] = {}

    def set(self, routes: list[Route]) -> None:
        """Make the kernel match `routes`: new and changed ones added, the rest of ours removed."""
        wanted = {r.dst: r for r in routes}
        for dst, route in list(self.wanted.items()):
            if wanted.get(dst) != route:
                self.failed.pop(dst, None)
                try:
                    self.host.del_route(route)
                except HostError as exc:
                    log.warning("%s", exc)
        for dst, route in wanted.items():
            if self.wanted.get(dst) != route or dst in self.failed:
                self._add(route)
        self.wanted = wanted
        self.host.close()  # the netlink child goes until the next change (the agent's memory)

    def is_direct(self, ip: str) -> bool:
        """flannel's DirectRouting test: the kernel reaches `ip` through our device with no gateway. Answers
        are kept up to DIRECT_TTL seconds, so a busy lease store does not start the netlink child at every
        event."""
        self.judgement_due()
        known = self._direct.get(ip)
        if known is not None:
            return known
        try:
            got = self.host.route_to(ip)
        except (HostError, NetlinkError) as exc:
            got, why = {}, f"looking up its route failed ({exc})"
        else:
            why = "the kernel has no route to it"
        if not got.get("dev"):
            # Not an answer to keep for a minute (a link still coming up, a netlink child that failed): the
            # peer is tunnelled for now and asked about again at the next route check, then less and less
            # often (each lookup starts a netlink child), up to the minute's judgement.
            before = self._doubtful.get(ip)
            wait = CHECK_INTERVAL if before is None else min(2 * before[1], DIRECT_TTL)
            if before is None:
                log.info("peer %s: %s; tunnelled, asked again in %.0f s", ip, why, wait)
            self._doubtful[ip] = (time.monotonic() + wait, wait)
            return False
        self._doubtful.pop(ip, None)
        direct = got["dev"] == self.dev and not got.get("gateway")
        self._direct[ip] = direct
        if not direct:  # (debug: asked once a minute for every peer behind a router)
            log.debug("peer %s is reached via %s dev %s: tunnelled", ip, got.get("gateway"), got["dev"])
        return direct

    def judgement_due(self) -> bool:
        """True when it is time to judge again which peers are direct: once every DIRECT_TTL, when the kept
        answers are let go, since the underlay's routes may have changed with no lease event (a peer moved
        behind a router, or back), and CHECK_INTERVAL (doubling while it lasts) after a lookup that found no
        route or failed. is_direct() lets answers go too when they are that old."""
        now = time.monotonic()
        if now - self._direct_since >= DIRECT_TTL:
            self._direct_since = now
            self._direct.clear()
            self._doubtful.clear()
            return True
        due = [ip for ip, (when, _) in self._doubtful.items() if now >= when]
        for ip in due:  # asked about again by is_direct (a peer gone by then is not: never due again)
            self._doubtful[ip] = (float("inf"), self._doubtful[ip][1])
        return bool(due)

    def check(self) -> None:
        """Every CHECK_INTERVAL: routes of ours that are gone or changed are put back."""
        now = time.monotonic()
        if now < self._next_check or not self.wanted:
            return
        self._next_check = now + CHECK_INTERVAL
        have = kernel_gateways(self.dev)
        for dst, route in self.wanted.items():
            if have.get(dst) == route.gateway:
                continue
            if dst not in self.failed:  # (a refused one is simply tried again)
                log.warning("route to %s via %s was removed or changed: put back", dst, route.gateway)
                self.repairs += 1
            self._add(route)
        self.host.close()

    def counts(self, prefix: str) -> dict[str, int]:
        return {
            f"{prefix}_routes": len(self.wanted) - len(self.failed),
            f"{prefix}_route_errors": self.errors,
            f"{prefix}_route_repairs": self.repairs,
        }

    def undo(self) -> None:
        self.host.undo()
        self.wanted.clear()
        self.failed.clear()

    def _add(self, route: Route) -> None:
        try:
            self.host.add_route(route)
        except HostError as exc:
            self.errors += 1
            if self.failed.get(route.dst) != str(exc):
                log.warning("%s: is %s on %s's network?", exc, route.gateway, self.dev)
            self.failed[route.dst] = str(exc)
            return
        self.failed.pop(route.dst, None)
        log.info("route to %s via %s dev %s", route.dst, route.gateway, route.dev)
