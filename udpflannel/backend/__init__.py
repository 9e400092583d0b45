"""Backends: one module per flannel backend type, looked up in an explicit registry (no import side effects).

A backend decides; host/ applies. The agent creates one backend, asks it for the lease attributes to publish
(BackendType/BackendData), starts it once the lease is held, and feeds it peer events from the lease manager.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from udpflannel.lease.model import EventType

if TYPE_CHECKING:
    from udpflannel.config import NetworkConfig
    from udpflannel.lease.model import Event, Lease, LeaseAttrs
    from udpflannel.options import RunOptions


@dataclass(frozen=True, slots=True)
class ExternalInterface:
    """The underlay interface the agent sends from (flanneld's --iface / --public-ip choice)."""

    name: str
    index: int
    mtu: int
    address: str | None  # IPv4 of the interface, as a string
    address_v6: str | None
    public_ip: str | None  # what peers send to (--public-ip, or the interface address)
    public_ipv6: str | None


class Backend(Protocol):
    """What the agent needs from every backend type."""

    type: str  # flannel's BackendType string, e.g. "vxlan"
    overhead: int  # bytes of encapsulation: MTU = underlay MTU - overhead

    def lease_attrs(self) -> LeaseAttrs:
        """Our PublicIP(s), BackendType and BackendData as published in the lease."""
        ...

    def start(self, lease: Lease) -> None:
        """Set up the host (TUN, addresses, routes) and start the datapath for our lease."""
        ...

    def apply(self, events: list[Event]) -> None:
        """Peers joined, changed or left: update the peer table (and host routes/neighbours if needed)."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters for /metrics: packets, bytes, drops by reason (names are the metric labels)."""
        ...

    def check(self) -> bool:
        """Restart a datapath process that died (the agent calls this about once a second); True if all
        were running."""
        ...

    def stop(self) -> None:
        """Stop the datapath and remove what start() created."""
        ...


# type name -> "module:factory"; factory(config, options, iface) -> Backend.
REGISTRY: dict[str, str] = {
    "vxlan": "udpflannel.backend.vxlan:VxlanBackend",
    "udp": "udpflannel.backend.udp:UdpBackend",
    "wireguard": "udpflannel.backend.wireguard:WireguardBackend",
    "host-gw": "udpflannel.backend.hostgw:HostGwBackend",
}


def update_peer_map(peers: dict[str, Lease], events: list[Event], own_key: str | None) -> bool:
    """Apply lease events to a backend's peer map (key -> lease), skipping our own lease.
    Returns whether the map changed."""
    changed = False
    for ev in events:
        key = ev.lease.key
        if key == own_key:
            continue  # our own lease is not a peer
        if ev.type is EventType.ADDED:
            peers[key] = ev.lease
            changed = True
        elif ev.type is EventType.REMOVED and peers.pop(key, None) is not None:
            changed = True
    return changed


class BackendUnavailable(RuntimeError):
    """The backend type is known to flannel but cannot run here; the message says why."""


def create_backend(config: NetworkConfig, options: RunOptions, iface: ExternalInterface) -> Backend:
    target = REGISTRY.get(config.backend.type)
    if target is None:
        raise BackendUnavailable(
            f"unknown backend type {config.backend.type!r}: use one of {sorted(REGISTRY)}"
        )
    module_name, _, factory_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise BackendUnavailable(f"backend {config.backend.type!r} is not available in this build") from None
    factory = getattr(module, factory_name)
    return factory(config, options, iface)
