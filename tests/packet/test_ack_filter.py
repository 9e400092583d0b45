"""packet/ack_filter.py: within one TUN read, a pure ACK is redundant only when a later pure ACK of the same
flow acknowledges more with a window no smaller and nothing else of that flow lies between; duplicate
ACKs, SACKs, data, other flags, ECN marks and anything not plain TCP are never touched."""

from __future__ import annotations

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from udpflannel.packet.ack_filter import redundant_acks

OFF = 26  # packets start at this column, as behind a TUN read's headroom
STAMP = [("NOP", None), ("NOP", None), ("Timestamp", (1000, 2000))]


def ack(
    n: int,
    *,
    v6: bool = False,
    window: int = 500,
    flags: str = "A",
    options: list | None = None,
    sport: int = 5201,
    data: bytes = b"",
    tos: int = 0,
) -> bytes:
    ip = (
        IPv6(src="fd00:198::1:2", dst="fd00:198::2:3", tc=tos)
        if v6
        else IP(src="198.19.1.2", dst="198.19.2.3", flags="DF", tos=tos)
    )
    tcp = TCP(sport=sport, dport=40000, flags=flags, seq=77, ack=n, window=window)
    tcp.options = STAMP if options is None else options
    return bytes(ip / tcp / data)


def judge(pkts: list[bytes], rows: list[int] | None = None) -> set[int]:
    width = OFF + max(len(p) for p in pkts) + 8
    buf = np.zeros((len(pkts), width), np.uint8)
    for i, p in enumerate(pkts):
        buf[i, OFF : OFF + len(p)] = np.frombuffer(p, np.uint8)
    before = buf.copy()
    out = redundant_acks(buf, OFF, [len(p) for p in pkts], list(range(len(pkts))) if rows is None else rows)
    assert np.array_equal(buf, before)  # judged, never changed
    return out


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("options", [STAMP, []], ids=["timestamps", "no-options"])
def test_earlier_acks_of_a_flow_give_way_to_its_last(v6, options):
    pkts = [ack(n, v6=v6, options=options) for n in (1000, 2448, 3896)]
    assert judge(pkts) == {0, 1}


def test_only_the_rows_asked_about_are_judged():
    pkts = [ack(n) for n in (1000, 2448, 3896)]
    assert judge(pkts, rows=[0, 1]) == {0}  # row 2 is not part of this send


def test_acknowledgment_numbers_compare_across_the_wrap():
    assert judge([ack(0xFFFF_FF00), ack(0x100)]) == {0}
    assert judge([ack(0x100), ack(0xFFFF_FF00)]) == set()  # the later one is older: both stay


def test_duplicate_acks_all_stay():
    # fast retransmit counts them; the first is still superseded by a higher one after the duplicates
    assert judge([ack(1000), ack(2000), ack(2000), ack(2000)]) == {0}


def test_a_shrinking_window_keeps_the_earlier_ack():
    assert judge([ack(1000, window=600), ack(2000, window=500)]) == set()
    assert judge([ack(1000, window=500), ack(2000, window=600)]) == {0}


@pytest.mark.parametrize(
    "odd",
    [
        {"options": [("NOP", None), ("NOP", None), ("SAck", (3000, 4000))]},
        {"options": [("MSS", 1448)]},
        {"flags": "PA"},
        {"flags": "FA"},
        {"flags": "AE"},
        {"data": b"x"},
    ],
    ids=["sack", "other-option", "push", "fin", "ece", "data"],
)
def test_anything_but_a_plain_ack_stays_and_is_a_barrier(odd):
    # it is kept, is not judged redundant by the later ACK, and the ACK before it is kept too
    assert judge([ack(1000), ack(1500, **odd), ack(2000)]) == set()


def test_flows_are_judged_apart():
    pkts = [ack(1000, sport=1), ack(5000, sport=2), ack(2000, sport=1), ack(6000, sport=2), ack(1, sport=3)]
    assert judge(pkts) == {0, 1}


def test_ecn_marks_keep_acks_apart():
    assert judge([ack(1000, tos=3), ack(2000)]) == set()
    assert judge([ack(1000, v6=True, tos=3), ack(2000, v6=True)]) == set()


def test_other_packets_are_never_judged():
    other = [
        bytes(IP(src="198.19.1.2", dst="198.19.2.3") / UDP(sport=5201, dport=40000) / bytes(32)),
        bytes(IP(src="198.19.1.2", dst="198.19.2.3") / ICMP()),
        bytes(IP(src="198.19.1.2", dst="198.19.2.3", options=b"\x01\x01\x01\x00") / TCP(flags="A", ack=1)),
        bytes(IP(src="198.19.1.2", dst="198.19.2.3", flags="MF") / TCP(flags="A", ack=1)),
    ]
    for p in other:
        assert judge([p, ack(2000)]) == set()
    assert judge([ack(1000), *other, ack(2000)]) == {0}  # not the flow's: no barrier


def test_a_length_that_disagrees_with_the_header_is_not_a_pure_ack():
    pkts = [ack(1000), ack(2000)]
    padded = pkts[0] + b"\0\0\0\0"  # 4 bytes past the IPv4 total length
    assert judge([padded, pkts[1]]) == set()


@pytest.mark.parametrize("cut", [0, 1, 9, 20, 39, 45, 51])
def test_short_or_cut_packets_are_never_judged(cut):
    for v6 in (False, True):
        pkts = [ack(1000, v6=v6)[:cut] or b"\x45", ack(2000, v6=v6)]
        assert judge(pkts) == set()
