"""dataplane/icmp.py: the ICMP errors we write back into the TUN, checked with scapy's dissection."""

from __future__ import annotations

import pytest

from udpflannel.dataplane import icmp

scapy = pytest.importorskip("scapy.all")


def _v4(df: bool = True, size: int = 1500) -> bytes:
    return bytes(
        scapy.IP(src="198.19.1.0", dst="198.19.2.1", flags="DF" if df else 0) / scapy.UDP() / bytes(size)
    )


def test_frag_needed_v4():
    pkt = _v4()
    assert icmp.is_dont_fragment(pkt) and not icmp.is_dont_fragment(_v4(df=False))
    reply = scapy.IP(icmp.packet_too_big(pkt, 1450, "198.19.1.0", None))
    assert reply.src == "198.19.1.0" and reply.dst == "198.19.1.0"
    assert (reply[scapy.ICMP].type, reply[scapy.ICMP].code, reply[scapy.ICMP].nexthopmtu) == (3, 4, 1450)
    assert len(bytes(reply)) <= 576
    # scapy recomputes the checksums of a copy with them deleted: ours must be equal
    clean = scapy.IP(bytes(reply))
    del clean.chksum
    del clean[scapy.ICMP].chksum
    assert bytes(scapy.IP(bytes(clean))) == bytes(reply)


def test_packet_too_big_v6_checksum():
    pkt = bytes(scapy.IPv6(src="fd00:198:19:1::5", dst="fd00:198:19:2::1") / scapy.UDP() / bytes(1500))
    raw = icmp.packet_too_big(pkt, 1450, None, "fd00:198:19:1::")
    reply = scapy.IPv6(raw)
    assert reply[scapy.ICMPv6PacketTooBig].mtu == 1450 and reply.dst == "fd00:198:19:1::5"
    assert len(raw) <= 1280
    again = scapy.IPv6(raw)
    del again[scapy.ICMPv6PacketTooBig].cksum
    assert bytes(again) == raw


def test_net_unreachable_and_time_exceeded():
    pkt = _v4(size=10)
    assert scapy.IP(icmp.net_unreachable(pkt, "198.19.1.0", None))[scapy.ICMP].code == 0
    assert scapy.IP(icmp.time_exceeded(pkt, "198.19.1.0", None))[scapy.ICMP].type == 11


def test_never_answer_an_icmp_error_or_garbage():
    err = icmp.net_unreachable(_v4(size=10), "198.19.1.0", None)
    assert icmp.net_unreachable(err, "198.19.1.0", None) is None
    assert icmp.net_unreachable(b"\x45" + bytes(5), "198.19.1.0", None) is None
    assert icmp.packet_too_big(_v4(), 1450, None, None) is None


def test_never_answer_packets_to_multicast():
    mld = bytes(scapy.IPv6(src="fe80::1", dst="ff02::16") / scapy.ICMPv6EchoRequest())
    assert icmp.net_unreachable(mld, None, "fd00:198:19:1::") is None
    v4 = bytes(scapy.IP(src="198.19.1.0", dst="224.0.0.22") / scapy.UDP())
    assert icmp.net_unreachable(v4, "198.19.1.0", None) is None
