"""TunnelBackend: what the vxlan and udp backends share. It turns our lease into host setup (TUN MTU,
address, cluster route) and peer leases into peer-table rows for the datapath workers, and undoes it all on
stop(). Subclasses say how a peer lease becomes a Peer (which BackendData they need) and what they publish.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from udpflannel.backend import update_peer_map
from udpflannel.dataplane.process import Dataplane
from udpflannel.dataplane.spec import EngineConfig, Peer
from udpflannel.host.links import Route
from udpflannel.host.peer_routes import PeerRoutes, peer_routes
from udpflannel.lease.model import Event, Lease

if TYPE_CHECKING:
    from udpflannel.backend import ExternalInterface
    from udpflannel.host.links import HostConfig

log = logging.getLogger(__name__)

TUN_TXQUEUELEN = 1000


class TunnelBackend:
    """Base for TUN-based backends; subclasses set type, overhead, tun_name, port and implement the hooks."""

    type: str = ""
    overhead: int = 0
    overhead_v6: int = 0  # encapsulation bytes over an IPv6 underlay
    supports_v6_underlay = False
    tun_name: str = ""
    port: int = 0

    def __init__(self, config: Any, options: Any, iface: ExternalInterface) -> None:
        self.config = config
        self.options = options
        self.iface = iface
        base_mtu = config.backend.mtu or iface.mtu
        # Dual-stack with an IPv6 underlay address: IPv6 inner traffic goes over IPv6 as flannel-v6.1 does.
        self.v6_underlay = bool(self.supports_v6_underlay and getattr(config, "enable_ipv6", False))
        self.v6_underlay = self.v6_underlay and iface.public_ipv6 is not None
        # One TUN carries both families, so it takes the larger overhead when IPv6 frames ride IPv6.
        self.mtu = int(base_mtu) - (self.overhead_v6 if self.v6_underlay else self.overhead)
        self.lease: Lease | None = None
        self.peers: dict[str, Lease] = {}
        self.dataplane: Dataplane | None = None
        self.host: HostConfig | None = None
        # vxlan's DirectRouting: peers the kernel reaches with no gateway get a plain route instead.
        self.direct_routing = bool(getattr(config.backend, "direct_routing", False))
        self.direct: PeerRoutes | None = None
        # Superpackets through the tunnel TAP, whose frames the kernel forwards. The agent allows it
        # only when its FORWARD rules are in place to let them through (it adds the TAP to FLANNEL-FWD).
        self.tx_tunnel = bool(getattr(options, "iptables_forward_rules", True))

    # --- hooks ----------------------------------------------------------------------------------------------

    def engine_config(self, lease: Lease) -> EngineConfig:
        raise NotImplementedError

    def peer_rows(self, lease: Lease) -> list[Peer]:
        """The peer-table rows for one peer lease; [] when the lease is unusable (logged)."""
        raise NotImplementedError

    def configure_tun(self, host: HostConfig, lease: Lease) -> None:
        raise NotImplementedError

    # --- Backend protocol -----------------------------------------------------------------------------------

    def start(self, lease: Lease) -> None:
        from udpflannel.host.links import HostConfig

        self.lease = lease
        bind_ip = self.iface.address or "0.0.0.0"
        # Receive on every address of the node as kernel VXLAN does; send from the interface address.
        bind_ip6 = (self.iface.address_v6 or "::") if self.v6_underlay else None
        self.host = HostConfig()
        try:
            self.host.connect()  # the netlink child starts up while the workers do
            self.dataplane = Dataplane(
                self.engine_config(lease),
                self.tun_name,
                bind_ip,
                self.port,
                rx_bind_ip="0.0.0.0",
                bind_ip6=bind_ip6,
                tx_tunnel=self.tx_tunnel,
            )
            self.dataplane.start()
            log.info(
                "%s datapath: TUN %s, workers %s, offloads %s",
                self.type,
                self.tun_name,
                self.dataplane.pids(),
                self.dataplane.offloads(),
            )
            self.host.link_index(self.tun_name, wait=2.0)
            self.host.no_link_local(self.tun_name)
            # gso_max_size stays at the default 64 KiB. spec/fastpath.md suggests 61000, so that a
            # superpacket fits one UDP_SEGMENT send, but the kernel then cuts every larger superpacket it
            # forwards into MTU-sized packets before the TUN (gso_features_check): pods' TCP sizes its
            # superpackets for their own veth, 64 KiB, and pod-to-pod traffic in the lab halved (0.73 vs
            # 1.46 Gbit/s). A 64 KiB superpacket is two UDP_SEGMENT messages in one sendmmsg instead,
            # whose two trains the receiving agent joins into one TUN write again (dataplane/rx_hold.py).
            self.host.set_link(self.tun_name, mtu=self.mtu, up=True, txqlen=TUN_TXQUEUELEN)
            self.configure_tun(self.host, lease)
            self.host.close()  # the netlink child exits; undo() starts another if there is work left
            if self.direct_routing:
                self.direct = PeerRoutes(self.iface.name)
            self._push_peers()
        except BaseException:
            self.stop()
            raise

    def check(self) -> bool:
        """Restart a datapath worker that died (see Dataplane.check); True if all were running. Direct
        routes someone removed are put back, and once a minute every peer's directness is judged again
        (flanneld judges only at lease events, so a peer that moved behind a router kept a dead route)."""
        if self.direct is not None:
            if self.lease is not None and self.direct.judgement_due():
                self.direct.set(self._direct_routes())
            self.direct.check()
        return self.dataplane.check() if self.dataplane is not None else True

    def apply(self, events: list[Event]) -> None:
        self.check()
        changed = update_peer_map(self.peers, events, self.lease.key if self.lease is not None else None)
        if changed and self.dataplane is not None:
            self._push_peers()

    def _push_peers(self) -> None:
        rows: list[Peer] = []
        for lease in self.peers.values():
            rows.extend(self.peer_rows(lease))
        assert self.dataplane is not None
        self.dataplane.set_peers(rows)  # direct peers too: the TUN still carries them if their route fails
        if self.direct is not None:
            self.direct.set(self._direct_routes())

    def _direct_routes(self) -> list[Route]:
        """flannel's DirectRouting: a peer of our type whose public address the kernel reaches through our
        interface with no gateway (one layer-2 network) gets `<subnet> via <address>`, no encapsulation."""
        assert self.direct is not None and self.lease is not None
        networks = [n for n in (self.config.network, getattr(self.config, "ipv6_network", None)) if n]
        own_ips = frozenset(a for a in (self.iface.address, self.iface.address_v6) if a)
        return [
            route
            for lease in self.peers.values()
            for route in peer_routes(lease, self.type, self.iface.name, networks, self.lease.subnets, own_ips)
            if route.gateway is not None and self.direct.is_direct(route.gateway)
        ]

    def stats(self) -> dict[str, int]:
        self.check()
        out = self.dataplane.stats() if self.dataplane is not None else {}
        return out | self.direct.counts("direct") if self.direct is not None else out

    def stop(self) -> None:
        if self.direct is not None:
            self.direct.undo()
            self.direct = None
        # The datapath first: its TUN goes, and with it the addresses and routes through it, so undo()
        # usually has nothing left to ask netlink for.
        if self.dataplane is not None:
            self.dataplane.stop()
            self.dataplane = None
        if self.host is not None:
            self.host.undo()
            self.host = None

    # --- helpers --------------------------------------------------------------------------------------------

    def _tun_addresses(self, lease: Lease) -> tuple[str | None, str | None]:
        """flannel puts the subnet's network address on its tunnel device; ICMP errors come from it."""
        v4 = str(lease.subnet.network_address) if lease.subnet is not None else None
        v6 = str(lease.ipv6_subnet.network_address) if lease.ipv6_subnet is not None else None
        return v4, v6

    def _route_cluster(self, host: HostConfig, lease: Lease) -> None:
        """Address /32 (/128) on the TUN and the cluster CIDR(s) routed into it."""
        from udpflannel.host.links import Route

        v4, v6 = self._tun_addresses(lease)
        network = getattr(self.config, "network", None)
        ipv6_network = getattr(self.config, "ipv6_network", None)
        if v4 is not None:
            host.add_address(self.tun_name, f"{v4}/32")
            if network is not None:
                host.add_route(Route(str(network), self.tun_name, src=v4))
        if v6 is not None:
            host.add_address(self.tun_name, f"{v6}/128")
            if ipv6_network is not None:
                host.add_route(Route(str(ipv6_network), self.tun_name, src=v6))


def peer_public_ip(lease: Lease, family: int, v6_underlay: bool = False) -> str | None:
    """Outer destination for a peer's subnet of `family`: its PublicIPv6 for IPv6 subnets when both ends have
    an IPv6 underlay (flannel's flannel-v6.1 path), else its IPv4 PublicIP."""
    if family == 6 and v6_underlay and lease.attrs.public_ipv6 is not None:
        return str(lease.attrs.public_ipv6)
    ip = lease.attrs.public_ip
    return str(ip) if ip is not None else None
