"""What the control plane hands a vxlan/udp datapath worker, without numpy (DESIGN.md, memory budget: the
agent must not load the datapath's modules): the engine settings and the peer rows, both sent as JSON."""

from __future__ import annotations

from dataclasses import dataclass

from udpflannel.codec.wire import VXLAN_DEFAULT_VNI

# Bytes before every packet in the datapath's buffers: >= virtio header (10) and VXLAN + Ethernet (22),
# cache-line aligned.
HEADROOM = 64


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What a worker needs to know; built by the backend, sent to the worker as JSON."""

    encap: str  # "vxlan" or "udp"
    mtu: int  # inner MTU of the tunnel (TUN MTU)
    port: int  # destination UDP port at peers
    vni: int = VXLAN_DEFAULT_VNI
    vtep_mac: str = "00:00:00:00:00:00"
    icmp_src_v4: str | None = None  # our TUN address: source of ICMP errors we generate
    icmp_src_v6: str | None = None
    check_peer_source: bool = True

    def to_json(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, obj: dict) -> EngineConfig:
        return cls(**{k: v for k, v in obj.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class Peer:
    """One remote node as the datapath sees it."""

    subnet: str  # CIDR, IPv4 or IPv6 (a dual-stack node is two Peer rows)
    public_ip: str  # outer destination
    vtep_mac: str = "00:00:00:00:00:00"  # VXLAN only

    def to_json(self) -> dict[str, str]:
        return {"subnet": self.subnet, "public_ip": self.public_ip, "vtep_mac": self.vtep_mac}

    @classmethod
    def from_json(cls, obj: dict[str, str]) -> Peer:
        return cls(str(obj["subnet"]), str(obj["public_ip"]), str(obj.get("vtep_mac", "00:00:00:00:00:00")))
