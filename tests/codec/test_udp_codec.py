"""codec/udp.py: udp-backend payload validation and the TTL decrement with RFC 1624 checksum update."""

from __future__ import annotations

import numpy as np
import pytest

from udpflannel.codec import udp

scapy_all = pytest.importorskip("scapy.all")


def _batch(packets: list[bytes], offset: int = 8, stride: int = 256):
    buf = np.full((len(packets), stride), 0x55, dtype=np.uint8)
    for i, p in enumerate(packets):
        buf[i, offset : offset + len(p)] = np.frombuffer(p, dtype=np.uint8)
    return buf, np.array([len(p) for p in packets], dtype=np.int32)


def test_constants():
    assert udp.UDP_PORT == 8285 and udp.UDP_OVERHEAD == 28


def test_decode_codes():
    good4 = bytes(scapy_all.IP(src="198.19.1.1", dst="198.19.2.1") / scapy_all.UDP() / b"x")
    good6 = bytes(scapy_all.IPv6(src="fd00:198::1", dst="fd00:198::2") / scapy_all.UDP() / b"x")
    packets = [good4, good6, good4[:10], b"\x55" + good4[1:], good4[:-1], good6[:-1], b""]
    buf, lengths = _batch(packets)
    codes = udp.decode_batch(buf, lengths, 8).tolist()
    assert codes == [udp.OK, udp.OK] + [udp.BAD_HEADER] * 5


@pytest.mark.parametrize("ttl", [64, 2, 255, 17])
def test_ttl_decrement_matches_scapy_checksum(ttl):
    pkt = scapy_all.IP(src="198.19.1.1", dst="198.19.2.1", ttl=ttl, id=ttl * 77) / scapy_all.ICMP()
    six = scapy_all.IPv6(src="fd00:198::1", dst="fd00:198::2", hlim=ttl) / scapy_all.ICMPv6EchoRequest()
    buf, lengths = _batch([bytes(pkt), bytes(six)])
    valid = udp.decode_batch(buf, lengths, 8) == udp.OK
    expired = udp.decrement_ttl_batch(buf, lengths, 8, valid)
    assert not expired.any()
    out = buf[0, 8 : 8 + lengths[0]].tobytes()
    ref = scapy_all.IP(bytes(pkt))
    ref.ttl -= 1
    del ref.chksum
    assert out == bytes(ref)
    assert buf[1, 8 + 7] == ttl - 1


def test_ttl_one_expires_and_is_left_alone():
    pkt = bytes(scapy_all.IP(src="198.19.1.1", dst="198.19.2.1", ttl=1) / scapy_all.ICMP())
    buf, lengths = _batch([pkt])
    expired = udp.decrement_ttl_batch(buf, lengths, 8, np.array([True]))
    assert expired.tolist() == [True]
    assert buf[0, 8 : 8 + len(pkt)].tobytes() == pkt


@pytest.mark.parametrize("width", [0, 1, 5, 7])
def test_rows_narrower_than_a_header_are_bad_not_an_error(width):
    # A UDP_GRO train of tiny datagrams is viewed as rows of its segment size: no room for a header.
    buf = np.full((3, width), 0x45, np.uint8)
    lengths = np.full(3, width, np.int32)
    assert udp.decode_batch(buf, lengths, 0).tolist() == [udp.BAD_HEADER] * 3
    expired = udp.decrement_ttl_batch(buf, lengths, 0, np.zeros(3, bool))
    assert not expired.any()
    assert (buf == 0x45).all()
