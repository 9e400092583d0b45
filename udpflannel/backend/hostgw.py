"""The host-gw backend: no tunnel and no datapath of ours. Every peer's subnet is a kernel route via the
peer's PublicIP on the shared underlay network (`<subnet> via <PublicIP> dev <iface>`), as flannel's host-gw
sets it; routes someone removes are put back within CHECK_INTERVAL, as flannel's route check does.

It needs every node on one layer-2 network and the public IP to be the interface's own address (no NAT):
otherwise it refuses to start, as flanneld does.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any

from udpflannel.backend import BackendUnavailable, ExternalInterface, update_peer_map
from udpflannel.host.links import HostConfig, HostError, Route
from udpflannel.lease.model import Event, Lease, LeaseAttrs

log = logging.getLogger(__name__)

BACKEND_TYPE = "host-gw"
CHECK_INTERVAL = 10.0  # seconds between looks at the routing table (flannel's routeCheck period)
PROC_ROUTE = "/proc/net/route"
PROC_ROUTE_V6 = "/proc/net/ipv6_route"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def peer_routes(lease: Lease, dev: str, networks: list[Network], own: list[Network]) -> list[Route]:
    """The routes to one peer lease's subnets; [] for a lease of another backend type, and none for a family
    without its public address (flannel ignores those too) or for a subnet outside the cluster networks or
    overlapping our own: a store entry must never take over a host route such as the default route."""
    if lease.attrs.backend_type != BACKEND_TYPE:
        return []
    routes = []
    for subnet, gateway in (
        (lease.subnet, lease.attrs.public_ip),
        (lease.ipv6_subnet, lease.attrs.public_ipv6),
    ):
        if subnet is None or gateway is None:
            continue
        if any(subnet.subnet_of(n) for n in networks if n.version == subnet.version) and not any(
            subnet.overlaps(o) for o in own if o.version == subnet.version
        ):
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
                net = ipaddress.IPv4Network(f"{dst}/{mask}", strict=False)
                found[str(net)] = str(gw)
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


class HostGwBackend:
    type = BACKEND_TYPE
    overhead = 0

    def __init__(self, config: Any, options: Any, iface: ExternalInterface) -> None:
        self.config = config
        self.options = options
        self.iface = iface
        self.ipv4 = bool(getattr(config, "enable_ipv4", True))
        self.ipv6 = bool(getattr(config, "enable_ipv6", False))
        for family, public, own in (
            ("", iface.public_ip if self.ipv4 else None, iface.address),
            ("v6", iface.public_ipv6 if self.ipv6 else None, iface.address_v6),
        ):
            if public is not None and public != own:
                flag = "--public-ipv6" if family else "--public-ip"
                raise BackendUnavailable(
                    f"host-gw: public IP{family} {public} is not the address of {iface.name} ({own}): peers "
                    f"route to it directly, so NAT is not supported; drop {flag} or use the vxlan backend"
                )
        self.mtu = int(iface.mtu)
        # The families we route: a peer's IPv6 subnet only when IPv6 is on, as flannel.
        v4net, v6net = getattr(config, "network", None), getattr(config, "ipv6_network", None)
        self.networks: list[Network] = [n for n, on in ((v4net, self.ipv4), (v6net, self.ipv6)) if on and n]
        self.lease: Lease | None = None
        self.peers: dict[str, Lease] = {}
        self.host: HostConfig | None = None
        self.wanted: dict[str, Route] = {}  # dst -> the route we keep there
        self.failed: dict[str, str] = {}  # dst -> why the kernel refused it (logged once)
        self.errors = 0
        self.repairs = 0
        self._next_check = 0.0

    # --- Backend protocol -----------------------------------------------------------------------------------

    def lease_attrs(self) -> LeaseAttrs:
        iface = self.iface
        return LeaseAttrs(
            public_ip=ipaddress.IPv4Address(iface.public_ip) if self.ipv4 and iface.public_ip else None,
            public_ipv6=ipaddress.IPv6Address(iface.public_ipv6) if self.ipv6 and iface.public_ipv6 else None,
            backend_type=BACKEND_TYPE,
        )

    def start(self, lease: Lease) -> None:
        self.lease = lease
        self.host = HostConfig()
        self.peers = {k: v for k, v in self.peers.items() if k != lease.key}
        self._sync()
        self._next_check = time.monotonic() + CHECK_INTERVAL

    def apply(self, events: list[Event]) -> None:
        own = self.lease.key if self.lease is not None else None
        if update_peer_map(self.peers, events, own) and self.host is not None:
            self._sync()

    def check(self) -> bool:
        """Every CHECK_INTERVAL: routes of ours that are gone or changed are put back."""
        now = time.monotonic()
        if self.host is None or now < self._next_check:
            return True
        self._next_check = now + CHECK_INTERVAL
        have = kernel_gateways(self.iface.name)
        for dst, route in self.wanted.items():
            if have.get(dst) == route.gateway:
                continue
            if dst not in self.failed:  # (a refused one is simply tried again)
                log.warning("route to %s via %s was removed or changed: put back", dst, route.gateway)
                self.repairs += 1
            self._add(route)
        self.host.close()
        return True

    def stats(self) -> dict[str, int]:
        self.check()
        return {
            "hostgw_routes": len(self.wanted) - len(self.failed),
            "hostgw_route_errors": self.errors,
            "hostgw_route_repairs": self.repairs,
        }

    def stop(self) -> None:
        """Remove the routes we added (a failed start leaves nothing; a stopped node's peers reach nobody)."""
        if self.host is not None:
            self.host.undo()
            self.host = None
        self.wanted.clear()
        self.failed.clear()

    # --- routes ---------------------------------------------------------------------------------------------

    def _sync(self) -> None:
        """The kernel's routes made to match the peer map: new and changed ones added, those of peers gone
        removed."""
        assert self.host is not None
        wanted: dict[str, Route] = {}
        own = [n for n in (self.lease.subnet, self.lease.ipv6_subnet) if n is not None] if self.lease else []
        for lease in self.peers.values():
            routes = peer_routes(lease, self.iface.name, self.networks, own)
            if not routes and lease.attrs.backend_type != BACKEND_TYPE:
                log.warning(
                    "ignoring peer %s: its backend is %r, not host-gw",
                    lease.key,
                    lease.attrs.backend_type or "udp",
                )
            for route in routes:
                wanted[route.dst] = route
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
        self.host.close()

    def _add(self, route: Route) -> None:
        assert self.host is not None
        try:
            self.host.add_route(route)
        except HostError as exc:
            self.errors += 1
            if self.failed.get(route.dst) != str(exc):
                log.warning("%s: is %s on %s's network?", exc, route.gateway, self.iface.name)
            self.failed[route.dst] = str(exc)
            return
        self.failed.pop(route.dst, None)
        log.info("route to %s via %s dev %s", route.dst, route.gateway, route.dev)
