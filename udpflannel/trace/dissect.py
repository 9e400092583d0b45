"""Dissects one captured frame into readable layers, outer and inner: Ethernet/IP/UDP, then VXLAN and its
inner Ethernet/IP/ICMP, the udp backend's bare inner IP packet, or WireGuard's type, receiver index, counter.

Display only (scapy): never imported by `udpflannel run`. Which UDP port means which encapsulation comes from
the backend's net-conf, with the defaults owned by the codecs and config.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from scapy.contrib.wireguard import (
    Wireguard,
    WireguardCookieReply,
    WireguardInitiation,
    WireguardResponse,
    WireguardTransport,
)
from scapy.error import Scapy_Exception
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, CookedLinux, Ether
from scapy.packet import NoPayload, Packet, Padding, Raw

from udpflannel.codec.udp import UDP_PORT
from udpflannel.codec.wire import VXLAN_HEADER, VXLAN_HEADER_LEN, VXLAN_PORT
from udpflannel.config import BackendConfig, parse_backend

# pcap link types (tcpdump's LINKTYPE_*): what a capture on each kind of hop gives us.
LINKTYPE_ETHERNET = 1  # veths, bridges, the underlay
LINKTYPE_RAW = 101  # TUN devices: bare IP packets
LINKTYPE_RAW_ALT = 12  # some systems write DLT_RAW as 12
LINKTYPE_IPV4 = 228
LINKTYPE_LINUX_SLL = 113  # `tcpdump -i any`

ICMP_TYPES = {0: "echo-reply", 3: "dest-unreachable", 8: "echo-request", 11: "time-exceeded"}
WIREGUARD_TYPES = {1: "handshake initiation", 2: "handshake response", 3: "cookie reply", 4: "transport data"}
ETHERTYPES = {0x0800: "IPv4", 0x86DD: "IPv6", 0x0806: "ARP"}
IP_PROTOS = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6"}


@dataclass(frozen=True, slots=True)
class Layer:
    """One header: `depth` 0 is the outer packet, 1 what an encapsulation carries inside."""

    name: str
    summary: str
    fields: dict[str, Any] = field(default_factory=dict)
    depth: int = 0


@dataclass(frozen=True, slots=True)
class Dissection:
    layers: list[Layer]
    encapsulation: str | None = None  # "vxlan", "udp" or "wireguard" when the frame is a tunnel packet
    length: int = 0

    def find(self, name: str, depth: int | None = None) -> Layer | None:
        """The first layer called `name` (at `depth`, if given)."""
        for layer in self.layers:
            if layer.name == name and (depth is None or layer.depth == depth):
                return layer
        return None

    def format(self, indent: str = "  ") -> str:
        lines = []
        for layer in self.layers:
            pad = indent + "  " * layer.depth + ("└ " if layer.depth else "")
            lines.append(f"{pad}{layer.name:<10} {layer.summary}")
        return "\n".join(lines)


def encap_ports(backend: dict[str, Any] | None = None) -> dict[int, str]:
    """UDP port -> encapsulation. flannel's defaults, then the ports the net-conf Backend sets."""
    ports = {VXLAN_PORT: "vxlan", UDP_PORT: "udp", BackendConfig().listen_port: "wireguard"}
    if backend:
        cfg = parse_backend(backend)
        if cfg.type in ("vxlan", "udp") and cfg.port:
            ports[cfg.port] = cfg.type
        elif cfg.type == "wireguard":
            ports[cfg.listen_port] = "wireguard"
            ports[cfg.listen_port_v6] = "wireguard"
    return ports


def dissect(
    data: bytes, linktype: int = LINKTYPE_ETHERNET, ports: dict[int, str] | None = None
) -> Dissection:
    """Dissect one frame as captured with `linktype`. Never raises on malformed bytes: what cannot be parsed
    shows up as a `Malformed` or `Payload` layer."""
    ports = encap_ports() if ports is None else ports
    layers: list[Layer] = []
    if linktype == LINKTYPE_ETHERNET:
        pkt = _parse(Ether, data, 0, layers)
    elif linktype in (LINKTYPE_RAW, LINKTYPE_RAW_ALT, LINKTYPE_IPV4):
        pkt = _parse(_ip_class(data), data, 0, layers)
    elif linktype == LINKTYPE_LINUX_SLL:
        pkt = _parse(CookedLinux, data, 0, layers)
    else:
        return Dissection(
            [Layer("Raw", f"{len(data)} bytes (link type {linktype} not dissected)")], None, len(data)
        )
    encap = _walk(pkt, 0, ports, layers) if pkt is not None else None
    return Dissection(layers, encap, len(data))


def _ip_class(data: bytes) -> type[Packet]:
    return IPv6 if data and data[0] >> 4 == 6 else IP


def _parse(cls: type[Packet], data: bytes, depth: int, out: list[Layer]) -> Packet | None:
    """scapy's constructor raises on a header cut short: that becomes a Malformed layer, not an error."""
    try:
        return cls(data)
    except (struct.error, IndexError, ValueError, TypeError, Scapy_Exception) as exc:
        out.append(Layer("Malformed", f"{cls.__name__} cut short at {len(data)} bytes ({exc})", {}, depth))
        return None


def _walk(pkt: Packet, depth: int, ports: dict[int, str], out: list[Layer]) -> str | None:
    """Append one Layer per header of pkt; on a tunnel port, dissect the payload as that tunnel's content."""
    layer: Packet | None = pkt
    while layer is not None and not isinstance(layer, NoPayload):
        if isinstance(layer, UDP):
            kind = ports.get(layer.dport) or ports.get(layer.sport)
            out.append(_udp(layer, depth, kind))
            payload = bytes(layer.payload)
            if kind is not None and depth == 0:
                _tunnel(kind, payload, ports, out)
                return kind
            # Not one of our tunnels: scapy's own port guesses (it binds 4789 to VXLAN) would mislead here.
            if payload:
                out.append(Layer("Payload", f"{len(payload)} bytes", {"length": len(payload)}, depth))
            return None
        if isinstance(layer, (Raw, Padding)):
            if depth or not isinstance(layer, Padding):
                out.append(Layer("Payload", f"{len(layer.load)} bytes", {"length": len(layer.load)}, depth))
            return None
        out.append(_describe(layer, depth))
        layer = layer.payload
    return None


def _tunnel(kind: str, payload: bytes, ports: dict[int, str], out: list[Layer]) -> None:
    if kind == "vxlan":
        if len(payload) < VXLAN_HEADER_LEN:
            out.append(Layer("Malformed", f"VXLAN header needs 8 bytes, got {len(payload)}", {}, 0))
            return
        # RFC 7348's layout, not scapy's VXLAN: that reads GPE/GBP layouts from the flags, and damaged
        # flags then ask for bytes that are not there.
        flags, field = VXLAN_HEADER.unpack_from(payload)
        vni = field >> 8
        out.append(Layer("VXLAN", f"flags 0x{flags:02x}  vni {vni}", {"flags": flags, "vni": vni}, 0))
        inner = _parse(Ether, payload[VXLAN_HEADER_LEN:], 1, out)
    else:
        # flannel's udp backend: the payload is the inner IP packet itself, no header of its own.
        if kind == "wireguard":
            out.append(_wireguard(payload))
            return
        inner = _parse(_ip_class(payload), payload, 1, out)
    if inner is not None:
        _walk(inner, 1, ports, out)


def _wireguard(payload: bytes) -> Layer:
    if len(payload) < 4:
        return Layer("Malformed", f"WireGuard message needs 4 bytes, got {len(payload)}")
    msg = Wireguard(payload)  # every WireGuard layout is fixed-size: scapy pads a short one, never raises
    mtype = int(msg.message_type)
    name = WIREGUARD_TYPES.get(mtype, f"unknown type {mtype}")
    fields: dict[str, Any] = {"type": mtype, "type_name": name, "length": len(payload)}
    body = msg.payload
    if isinstance(body, WireguardInitiation):
        fields["sender_index"] = int(body.sender_index)
    elif isinstance(body, WireguardResponse):
        fields["sender_index"] = int(body.sender_index)
        fields["receiver_index"] = int(body.receiver_index)
    elif isinstance(body, WireguardCookieReply):
        fields["receiver_index"] = int(body.receiver_index)
    elif isinstance(body, WireguardTransport):
        fields["receiver_index"] = int(body.receiver_index)
        fields["counter"] = int(body.counter)
        # 16 header bytes, then ciphertext of the zero-padded inner packet and a 16-byte Poly1305 tag.
        fields["ciphertext"] = max(len(payload) - 16, 0)
    parts = [name]
    for key in ("sender_index", "receiver_index"):
        if key in fields:
            parts.append(f"{key.replace('_', ' ')} 0x{fields[key]:08x}")
    if "counter" in fields:
        parts.append(
            f"counter {fields['counter']}  {fields['ciphertext']} bytes encrypted (inner packet + tag)"
        )
    return Layer("WireGuard", "  ".join(parts), fields, 0)


def _udp(udp: UDP, depth: int, kind: str | None) -> Layer:
    fields = {
        "sport": int(udp.sport),
        "dport": int(udp.dport),
        "len": int(udp.len or 0),
        "chksum": int(udp.chksum or 0),
    }
    note = f"  ({kind} tunnel)" if kind and depth == 0 else ""
    summary = f"{udp.sport} → {udp.dport}  len {fields['len']}  checksum 0x{fields['chksum']:04x}{note}"
    return Layer("UDP", summary, fields, depth)


def _describe(layer: Packet, depth: int) -> Layer:
    if isinstance(layer, Ether):
        kind = ETHERTYPES.get(int(layer.type), f"0x{int(layer.type):04x}")
        fields = {"src": layer.src, "dst": layer.dst, "type": int(layer.type)}
        return Layer("Ethernet", f"{layer.src} → {layer.dst}  type {kind}", fields, depth)
    if isinstance(layer, CookedLinux):
        return Layer(
            "LinuxSLL", f"packet type {int(layer.pkttype)}  proto 0x{int(layer.proto):04x}", {}, depth
        )
    if isinstance(layer, IP):
        proto = IP_PROTOS.get(int(layer.proto), str(layer.proto))
        fields = {
            "src": layer.src,
            "dst": layer.dst,
            "ttl": int(layer.ttl),
            "proto": int(layer.proto),
            "len": int(layer.len or 0),
            "id": int(layer.id),
            "df": bool(int(layer.flags) & 0x2),
        }
        df = "  DF" if fields["df"] else ""
        summary = f"{layer.src} → {layer.dst}  ttl {layer.ttl}  {proto}  len {fields['len']}"
        summary += f"  id 0x{layer.id:04x}{df}"
        return Layer("IPv4", summary, fields, depth)
    if isinstance(layer, IPv6):
        proto = IP_PROTOS.get(int(layer.nh), str(layer.nh))
        fields = {"src": layer.src, "dst": layer.dst, "hlim": int(layer.hlim), "nh": int(layer.nh)}
        return Layer("IPv6", f"{layer.src} → {layer.dst}  hop limit {layer.hlim}  {proto}", fields, depth)
    if isinstance(layer, ICMP):
        name = ICMP_TYPES.get(int(layer.type), f"type {layer.type}")
        fields = {"type": int(layer.type), "code": int(layer.code), "type_name": name}
        summary = f"{name}  code {layer.code}"
        if int(layer.type) in (0, 8):
            fields.update(id=int(layer.id), seq=int(layer.seq))
            summary += f"  id 0x{int(layer.id):04x}  seq {int(layer.seq)}"
        return Layer("ICMP", summary, fields, depth)
    if isinstance(layer, TCP):
        fields = {
            "sport": int(layer.sport),
            "dport": int(layer.dport),
            "seq": int(layer.seq),
            "flags": str(layer.flags),
        }
        return Layer("TCP", f"{layer.sport} → {layer.dport}  [{layer.flags}]  seq {layer.seq}", fields, depth)
    if isinstance(layer, ARP):
        op = "who-has" if int(layer.op) == 1 else "is-at"
        return Layer("ARP", f"{op} {layer.pdst} tell {layer.psrc}", {"op": int(layer.op)}, depth)
    return Layer(layer.name, layer.summary(), {}, depth)
