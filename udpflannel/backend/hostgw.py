"""The host-gw backend: no tunnel and no datapath of ours. Every peer's subnet is a kernel route via the
peer's PublicIP on the shared underlay network (`<subnet> via <PublicIP> dev <iface>`), as flannel's host-gw
sets it; routes someone removes are put back within 10 s, as flannel's route check does (host/peer_routes).

It needs every node on one layer-2 network and the public IP to be the interface's own address (no NAT):
otherwise it refuses to start, as flanneld does.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from udpflannel.backend import BackendUnavailable, ExternalInterface, update_peer_map
from udpflannel.host.links import Route
from udpflannel.host.peer_routes import Network, PeerRoutes, peer_routes
from udpflannel.lease.model import Event, Lease, LeaseAttrs

log = logging.getLogger(__name__)

BACKEND_TYPE = "host-gw"


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
        addresses = (iface.address, iface.address_v6, iface.public_ip, iface.public_ipv6)
        self.own_ips = frozenset(a for a in addresses if a)
        self.lease: Lease | None = None
        self.peers: dict[str, Lease] = {}
        self.routes: PeerRoutes | None = None

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
        self.routes = PeerRoutes(self.iface.name)
        self.peers = {k: v for k, v in self.peers.items() if k != lease.key}
        self._sync()

    def apply(self, events: list[Event]) -> None:
        own = self.lease.key if self.lease is not None else None
        if update_peer_map(self.peers, events, own) and self.routes is not None:
            self._sync()

    def check(self) -> bool:
        """Routes of ours that someone removed are put back (every CHECK_INTERVAL)."""
        if self.routes is not None:
            self.routes.check()
        return True

    def stats(self) -> dict[str, int]:
        self.check()
        return self.routes.counts("hostgw") if self.routes is not None else {}

    def stop(self) -> None:
        """Remove the routes we added (a failed start leaves nothing; a stopped node's peers reach nobody)."""
        if self.routes is not None:
            self.routes.undo()
            self.routes = None

    def _sync(self) -> None:
        """The kernel's routes made to match the peer map."""
        assert self.routes is not None
        own = self.lease.subnets if self.lease else []
        wanted: list[Route] = []
        for lease in self.peers.values():
            if lease.attrs.backend_type != BACKEND_TYPE:
                log.warning(
                    "ignoring peer %s: its backend is %r, not host-gw",
                    lease.key,
                    lease.attrs.backend_type or "udp",
                )
            wanted += peer_routes(lease, BACKEND_TYPE, self.iface.name, self.networks, own, self.own_ips)
        self.routes.set(wanted)
