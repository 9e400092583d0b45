"""dataplane/txprep.py: batch completion of partial checksums (vs scapy) and the flow hash; plus the
engine's superpacket path end to end with virtio headers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from udpflannel.dataplane.txprep import (
    finish_partial_checksums,
    finish_run_checksums,
    flow_hash,
    flow_hash_one,
)
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.checksum import inet_sum
from udpflannel.packet.drops import DropReason
from udpflannel.packet.vnet import VNET_HDR_DTYPE

scapy = pytest.importorskip("scapy.all")


def _partial(pkt, l4_off: int, field: int) -> bytes:
    """The packet as the kernel hands it with NEEDS_CSUM: the L4 checksum holds only the pseudo-header."""
    raw = bytearray(bytes(pkt))
    l4len = len(raw) - l4_off
    if raw[0] >> 4 == 4:
        pseudo = raw[12:20] + bytes([0, raw[9]]) + l4len.to_bytes(2, "big")
    else:
        pseudo = raw[8:40] + l4len.to_bytes(4, "big") + bytes([0, 0, 0, raw[6]])
    raw[l4_off + field : l4_off + field + 2] = inet_sum(bytes(pseudo)).to_bytes(2, "big")
    return bytes(raw)


@pytest.mark.parametrize("per_row_max", [0, 16], ids=["vectorised", "per-row"])
def test_finish_partial_checksums_matches_scapy(per_row_max: int):
    pkts = [
        scapy.IP(src="198.19.1.0", dst="198.19.2.0") / scapy.TCP(sport=5, dport=6, flags="A") / b"abc",
        scapy.IP(src="198.19.1.0", dst="198.19.2.0") / scapy.UDP(sport=5, dport=6) / bytes(333),
        scapy.IPv6(src="fd00:198:19:1::", dst="fd00:198:19:2::") / scapy.TCP(flags="PA") / bytes(1001),
        scapy.IP(src="198.19.1.0", dst="198.19.2.0", options=[scapy.IPOption_NOP()] * 4) / scapy.TCP() / b"x",
        scapy.IPv6(src="fd00:198:19:1::", dst="ff02::16", hlim=1) / scapy.ICMPv6EchoRequest(data=b"mld-ish"),
    ]
    offs = [(20, 16), (20, 6), (40, 16), (24, 16), (40, 2)]
    raw = [_partial(p, o, f) for p, (o, f) in zip(pkts, offs, strict=True)]
    batch = PacketBatch.from_packets(raw, headroom=64)
    headers = np.zeros(len(raw), VNET_HDR_DTYPE)
    headers["flags"] = 1
    headers["csum_start"] = [o for o, _ in offs]
    headers["csum_offset"] = [f for _, f in offs]
    codes = finish_partial_checksums(batch, headers, np.arange(len(raw)), per_row_max=per_row_max)
    assert codes.tolist() == [0] * len(raw)
    assert batch.packets() == [bytes(p) for p in pkts]


@pytest.mark.parametrize("per_row_max", [0, 16], ids=["vectorised", "per-row"])
def test_finish_partial_checksums_refuses_bad_offsets(per_row_max: int):
    raw = bytes(scapy.IP(src="198.19.1.0", dst="198.19.2.0") / scapy.TCP())
    batch = PacketBatch.from_packets([raw, raw], headroom=64)
    headers = np.zeros(2, VNET_HDR_DTYPE)
    headers["csum_start"] = [10, 60]
    headers["csum_offset"] = [16, 16]
    codes = finish_partial_checksums(batch, headers, np.arange(2), per_row_max=per_row_max)
    assert codes.tolist() == [DropReason.BAD_HEADER] * 2


def test_flow_hash_one_flow_one_hash_and_spread():
    pkts = [
        bytes(scapy.IP(src="198.19.1.0", dst="198.19.2.0") / scapy.TCP(sport=p, dport=80)) for p in range(64)
    ]
    pkts.append(
        bytes(scapy.IP(src="198.19.1.0", dst="198.19.2.0") / scapy.TCP(sport=0, dport=80, seq=9) / b"z")
    )
    pkts += [bytes(scapy.IPv6(src="fd00:198::1", dst="fd00:198::2") / scapy.UDP(sport=p)) for p in range(64)]
    batch = PacketBatch.from_packets(pkts, headroom=8)
    h = flow_hash(batch.buf, batch.offset, batch.n)
    assert h[0] == h[64]
    assert len(set((h[:64] % 16).tolist())) >= 12 and len(set((h[65:] % 16).tolist())) >= 12


def test_flow_hash_one_is_flow_hash_of_that_row():
    """The plain-Python hash of a lone packet is the batch hash of its row, in both families, for TCP,
    UDP and ICMP, and for random bytes (the hash reads its 44 bytes whatever they hold)."""
    rng = random.Random(8)
    pkts = [
        bytes(scapy.IP(src="198.19.1.0", dst="198.19.2.0") / scapy.TCP(sport=p, dport=80)) for p in range(20)
    ]
    pkts += [bytes(scapy.IPv6(src="fd00:198::1", dst="fd00:198::2") / scapy.UDP(sport=p)) for p in range(20)]
    pkts += [bytes(scapy.IP(src="198.19.1.0", dst="198.19.2.0") / scapy.ICMP(seq=s)) for s in range(5)]
    pkts += [bytes([0x45 if i % 2 else 0x60]) + rng.randbytes(43) for i in range(200)]
    batch = PacketBatch.from_packets([p[:44].ljust(44, b"\0") for p in pkts], headroom=8)
    want = flow_hash(batch.buf, batch.offset, batch.n).tolist()
    assert [flow_hash_one(p[:44]) for p in pkts] == want
    assert flow_hash_one(pkts[-1][:30]) == flow_hash_one(pkts[-1][:30] + bytes(14))  # zero-padded
    # rows narrower than the 44 bytes hashed read as zero-padded too, as flow_hash_one does
    narrow = PacketBatch.from_packets([pkts[0][:24], pkts[-1][:30]], headroom=8)
    assert narrow.stride < 8 + 44
    assert flow_hash(narrow.buf, 8, 2).tolist() == [flow_hash_one(pkts[0][:24]), flow_hash_one(pkts[-1][:30])]


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("tcp", [False, True])
def test_finish_run_checksums_matches_scapy_and_refuses_bad_offsets(v6: bool, tcp: bool):
    """One flow's rows sharing csum_start and csum_offset, lengths odd and even, varied: finished on a view
    of the rows as scapy computes them; offsets past the shortest row change nothing."""
    l3 = (
        scapy.IPv6(src="fd00:198:19:1::", dst="fd00:198:19:2::")
        if v6
        else scapy.IP(src="198.19.1.0", dst="198.19.2.0")
    )
    l4 = scapy.TCP(sport=5, dport=6, flags="A") if tcp else scapy.UDP(sport=5, dport=6)
    pkts = [l3 / l4 / (bytes(range(i % 256)) * (1 + i // 256)) for i in range(0, 900, 37)]
    start, field = (40 if v6 else 20), (16 if tcp else 6)
    raw = [_partial(p, start, field) for p in pkts]
    batch = PacketBatch.from_packets(raw, headroom=64)
    assert finish_run_checksums(batch, start, field)
    assert batch.packets() == [bytes(p) for p in pkts]
    batch = PacketBatch.from_packets(raw, headroom=64)
    assert not finish_run_checksums(batch, start, len(raw[0]))
    assert batch.packets() == raw
