"""Dissection of known frames: the golden kernel-flannel VXLAN and wireguard-go captures, a udp-backend frame,
TUN (raw IP) frames, custom ports from net-conf, and truncated input that must never raise."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import RawPcapReader

from udpflannel.trace.dissect import LINKTYPE_ETHERNET, LINKTYPE_RAW, dissect, encap_ports

TESTDATA = Path(os.environ["UDPFLANNEL_TESTDATA"])  # set by tests/conftest.py
VXLAN_PCAP = TESTDATA / "vxlan-kernel-flannel.pcap"
WG_PCAP = TESTDATA / "wireguard-go-session.pcap"


def frames(path: Path) -> list[tuple[bytes, int]]:
    assert path.exists(), f"golden capture {path} is missing (shared/testdata beside the checkout)"
    with RawPcapReader(str(path)) as reader:
        return [(bytes(data), int(reader.linktype)) for data, _ in reader]


def test_golden_vxlan_every_frame_outer_and_inner() -> None:
    meta = json.loads(VXLAN_PCAP.with_suffix(".json").read_text())
    a, b = meta["nodes"]
    macs = {a["public_ip"]: a["vtep_mac"], b["public_ip"]: b["vtep_mac"]}
    pods = {a["public_ip"]: a["pod"], b["public_ip"]: b["pod"]}
    seen_icmp = {"echo-request": 0, "echo-reply": 0}
    tcp = 0
    for data, linktype in frames(VXLAN_PCAP):
        d = dissect(data, linktype)
        assert d.encapsulation == "vxlan"
        assert d.length == len(data)
        outer_ip, udp, vx = d.find("IPv4", 0), d.find("UDP", 0), d.find("VXLAN")
        assert outer_ip and udp and vx
        src, dst = outer_ip.fields["src"], outer_ip.fields["dst"]
        assert {src, dst} == {a["public_ip"], b["public_ip"]}
        assert udp.fields["dport"] == meta["port"]
        assert vx.fields == {"flags": 0x08, "vni": meta["vni"]}
        inner_eth, inner_ip = d.find("Ethernet", 1), d.find("IPv4", 1)
        assert inner_eth and inner_ip
        # flannel's rule: inner dst MAC is the remote node's VtepMAC, src ours.
        assert (inner_eth.fields["src"], inner_eth.fields["dst"]) == (macs[src], macs[dst])
        assert (inner_ip.fields["src"], inner_ip.fields["dst"]) == (pods[src], pods[dst])
        icmp = d.find("ICMP", 1)
        if icmp is not None:
            seen_icmp[icmp.fields["type_name"]] += 1
        tcp += d.find("TCP", 1) is not None
    assert seen_icmp["echo-request"] == 5 and seen_icmp["echo-reply"] == 5  # 3 pings + 2 of 1400 bytes
    assert tcp > 10


def test_golden_vxlan_readable_block() -> None:
    data, linktype = frames(VXLAN_PCAP)[0]
    text = dissect(data, linktype).format()
    lines = text.splitlines()
    assert lines[2].split()[:4] == ["UDP", lines[2].split()[1], "→", "8472"]
    assert "VXLAN      flags 0x08  vni 1" in text
    assert "└ IPv4       198.19.1.1 → 198.19.2.1  ttl 64  ICMP" in text
    assert "└ ICMP       echo-request  code 0" in text


def test_golden_wireguard_types_indices_counters() -> None:
    meta = json.loads(WG_PCAP.with_suffix(".json").read_text())
    a_ip = meta["nodes"][0]["endpoint"].split(":")[0]
    dissections = [dissect(data, lt) for data, lt in frames(WG_PCAP)]
    assert all(d.encapsulation == "wireguard" for d in dissections)
    wg = [(d.find("IPv4", 0).fields["src"], d.find("WireGuard").fields) for d in dissections]
    init, resp = wg[0][1], wg[1][1]
    assert (init["type_name"], init["length"]) == ("handshake initiation", 148)
    assert (resp["type_name"], resp["length"]) == ("handshake response", 92)
    assert resp["receiver_index"] == init["sender_index"]
    counters: dict[str, list[int]] = {}
    for src, f in wg[2:]:
        if f["type"] != 4:
            continue
        # Each side addresses data to the index the other side chose in the handshake.
        expected = resp["sender_index"] if src == a_ip else init["sender_index"]
        assert f["receiver_index"] == expected
        assert (f["length"] - 32) % 16 == 0  # header + tag, plaintext zero-padded to 16
        counters.setdefault(src, []).append(f["counter"])
    for seq in counters.values():
        assert seq == sorted(seq) and seq[0] == 0 and len(set(seq)) == len(seq)
    assert len(counters) == 2


def test_udp_backend_frame_carries_bare_inner_ip() -> None:
    inner = IP(src="198.19.1.2", dst="198.19.2.2", ttl=63) / ICMP(type=8, id=7, seq=1) / (b"x" * 24)
    frame = Ether() / IP(src="198.18.0.1", dst="198.18.0.2") / UDP(sport=40000, dport=8285) / inner
    d = dissect(bytes(frame))
    assert d.encapsulation == "udp"
    assert [(layer.name, layer.depth) for layer in d.layers] == [
        ("Ethernet", 0),
        ("IPv4", 0),
        ("UDP", 0),
        ("IPv4", 1),
        ("ICMP", 1),
        ("Payload", 1),
    ]
    assert d.find("IPv4", 1).fields["ttl"] == 63
    assert d.find("ICMP", 1).fields == {"type": 8, "code": 0, "type_name": "echo-request", "id": 7, "seq": 1}


def test_tun_capture_is_raw_ip() -> None:
    pkt = IP(src="198.19.1.2", dst="198.19.2.2", ttl=63) / ICMP() / b"abc"
    d = dissect(bytes(pkt), LINKTYPE_RAW)
    assert d.encapsulation is None
    assert [layer.name for layer in d.layers] == ["IPv4", "ICMP", "Payload"]


def test_ports_follow_net_conf() -> None:
    ports = encap_ports({"Type": "vxlan", "Port": 4789})
    assert ports[4789] == "vxlan" and ports[8472] == "vxlan"
    assert encap_ports({"Type": "wireguard", "ListenPort": 51000})[51000] == "wireguard"
    data, _ = frames(VXLAN_PCAP)[0]
    moved = bytearray(data)
    moved[36:38] = (4789).to_bytes(2, "big")  # outer UDP dport (14 Ethernet + 20 IP + 2)
    assert dissect(bytes(moved), LINKTYPE_ETHERNET, ports).find("VXLAN") is not None
    plain = dissect(bytes(moved), LINKTYPE_ETHERNET, {})
    assert plain.encapsulation is None and plain.find("VXLAN") is None


@pytest.mark.parametrize("pcap", [VXLAN_PCAP, WG_PCAP], ids=["vxlan", "wireguard"])
def test_every_truncation_dissects_without_raising(pcap: Path) -> None:
    data, linktype = frames(pcap)[0]
    for n in range(len(data) + 1):
        d = dissect(data[:n], linktype)
        assert d.length == n


def test_unknown_linktype_is_reported_not_raised() -> None:
    d = dissect(b"\x00" * 10, 9999)
    assert d.layers[0].name == "Raw" and "9999" in d.layers[0].summary


@pytest.mark.parametrize("seed", range(4))
def test_damaged_frames_dissect_without_raising(seed: int) -> None:
    """Golden frames with bytes changed, cut short or replaced by noise, under every tunnel's ports and
    several link types: a capture of a broken peer must still dissect (a damaged VXLAN flags byte once made
    scapy's VXLAN ask for a GPE header's bytes and raise)."""
    rng = random.Random(seed)
    golden = frames(VXLAN_PCAP) + frames(WG_PCAP)
    backends = [None, {"Type": "vxlan", "Port": 4789}, {"Type": "udp"}]
    port_sets = [encap_ports(b) for b in backends]
    for _ in range(1500):
        data, linktype = rng.choice(golden)
        b = bytearray(data)
        op = rng.randrange(3)
        if op == 0:
            b = b[: rng.randrange(len(b) + 1)]
        elif op == 1:
            for _ in range(rng.randrange(1, 6)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        else:
            b = bytearray(rng.randbytes(rng.randrange(200)))
        if rng.random() < 0.1:
            linktype = rng.choice([LINKTYPE_RAW, 113, 228])
        d = dissect(bytes(b), linktype, rng.choice(port_sets))
        assert d.length == len(b) and d.format()


def test_vxlan_header_is_read_as_rfc_7348_whatever_its_flags() -> None:
    data, linktype = frames(VXLAN_PCAP)[0]
    odd = bytearray(data)
    odd[42] = 0xFF  # the VXLAN flags byte (14 Ethernet + 20 IP + 8 UDP): every bit, GPE's included
    vx = dissect(bytes(odd), linktype).find("VXLAN")
    assert vx is not None and vx.fields == {"flags": 0xFF, "vni": 1}
