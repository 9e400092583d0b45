"""Lease records shared by every store and the lease manager: flannel's JSON shape and subnet keys.

A store never invents fields of its own here (flannel's `Asof`/`Cursor` lesson): what only one store needs
(etcd lease IDs, Kubernetes resourceVersions) stays inside that store.
"""

from __future__ import annotations

import enum
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class LeaseAttrs:
    """What a node publishes about itself: flannel's LeaseAttrs (pkg/lease/lease.go)."""

    public_ip: ipaddress.IPv4Address | None = None
    public_ipv6: ipaddress.IPv6Address | None = None
    backend_type: str = ""
    backend_data: Any = None
    backend_v6_data: Any = None

    def to_json(self) -> dict[str, Any]:
        """flannel's JSON: PublicIP always present; BackendType/BackendData omitted when empty."""
        out: dict[str, Any] = {"PublicIP": str(self.public_ip) if self.public_ip else "0.0.0.0"}
        if self.public_ipv6 is not None:
            out["PublicIPv6"] = str(self.public_ipv6)
        if self.backend_type:
            out["BackendType"] = self.backend_type
        if self.backend_data is not None:
            out["BackendData"] = self.backend_data
        if self.backend_v6_data is not None:
            out["BackendV6Data"] = self.backend_v6_data
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LeaseAttrs:
        """Parse flannel's JSON; raises ValueError (with the bad field named) on malformed input."""
        if not isinstance(obj, dict):
            raise ValueError("lease attributes must be a JSON object")
        ip = obj.get("PublicIP")
        ip6 = obj.get("PublicIPv6")
        btype = obj.get("BackendType")
        # As flannel's Go decoder: these are JSON strings (a number would otherwise make an address).
        for name, value in (("PublicIP", ip), ("PublicIPv6", ip6), ("BackendType", btype)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"lease attributes: {name} must be a string, got {json.dumps(value)[:40]}")
        try:
            public_ip = ipaddress.IPv4Address(ip) if ip not in (None, "", "0.0.0.0") else None
            public_ipv6 = ipaddress.IPv6Address(ip6) if ip6 not in (None, "", "::") else None
        except ipaddress.AddressValueError as exc:
            raise ValueError(f"lease attributes: bad PublicIP/PublicIPv6: {exc}") from None
        return cls(
            public_ip=public_ip,
            public_ipv6=public_ipv6,
            backend_type=btype or "",
            backend_data=obj.get("BackendData"),
            backend_v6_data=obj.get("BackendV6Data"),
        )

    @classmethod
    def loads(cls, text: str | bytes) -> LeaseAttrs:
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"lease attributes are not JSON: {exc}") from None
        return cls.from_json(obj)


def subnet_key(subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None = None) -> str:
    """flannel's MakeSubnetKey: `10.244.1.0-24`, `10.244.1.0-24&fd00::-64`, or the v6 part alone."""
    parts = []
    if subnet is not None:
        parts.append(f"{subnet.network_address}-{subnet.prefixlen}")
    if ipv6_subnet is not None:
        parts.append(f"{ipv6_subnet.network_address}-{ipv6_subnet.prefixlen}")
    if not parts:
        raise ValueError("a lease needs an IPv4 or an IPv6 subnet")
    return "&".join(parts)


def parse_subnet_key(key: str) -> tuple[IPv4Network | None, IPv6Network | None]:
    """Inverse of subnet_key; raises ValueError for anything that is not a flannel subnet key."""
    v4: IPv4Network | None = None
    v6: IPv6Network | None = None
    for part in key.split("&"):
        addr, sep, plen = part.rpartition("-")
        if not sep:
            raise ValueError(f"not a subnet key: {key!r}")
        net = ipaddress.ip_network(f"{addr}/{plen}", strict=True)
        if isinstance(net, IPv4Network) and v4 is None:
            v4 = net
        elif isinstance(net, IPv6Network) and v6 is None:
            v6 = net
        else:
            raise ValueError(f"not a subnet key: {key!r}")
    return v4, v6


@dataclass(frozen=True, slots=True)
class Lease:
    """One node's claim on a subnet (and/or an IPv6 subnet).

    expiration is a Unix time, or None for a reservation (never expires, only its PublicIP may take it).
    revision is the store's modification revision of this record, used for compare-and-swap on renew/delete.
    """

    subnet: IPv4Network | None
    attrs: LeaseAttrs
    ipv6_subnet: IPv6Network | None = None
    expiration: float | None = None
    revision: int = 0

    @property
    def key(self) -> str:
        return subnet_key(self.subnet, self.ipv6_subnet)

    @property
    def is_reservation(self) -> bool:
        return self.expiration is None

    @property
    def subnets(self) -> list[IPv4Network | IPv6Network]:
        """The subnets this lease holds, IPv4 first."""
        return [s for s in (self.subnet, self.ipv6_subnet) if s is not None]

    def to_json(self) -> dict[str, Any]:
        """The flannel lease object plus its subnet(s), as `udpflannel leases --json` prints it."""
        out: dict[str, Any] = {
            "Subnet": str(self.subnet) if self.subnet else None,
            "IPv6Subnet": str(self.ipv6_subnet) if self.ipv6_subnet else None,
            "Attrs": self.attrs.to_json(),
            "Expiration": self.expiration,
        }
        return out


class EventType(enum.Enum):
    ADDED = "added"  # new lease, or a lease whose attributes changed (flannel's EventAdded)
    REMOVED = "removed"  # deleted or expired


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    lease: Lease
    revision: int = 0


@dataclass(slots=True)
class LeaseSnapshot:
    """A consistent listing: the leases and the store revision they were read at."""

    leases: list[Lease] = field(default_factory=list)
    revision: int = 0
