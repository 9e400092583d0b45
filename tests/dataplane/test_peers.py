"""dataplane/peers.py: batch longest-prefix match against a per-address reference (ipaddress)."""

from __future__ import annotations

import ipaddress
import random

import numpy as np

from udpflannel.dataplane.peers import NO_PEER, Peer, PeerTable
from udpflannel.packet.batch import PacketBatch


def _reference(peers: list[Peer], addr: str) -> int:
    ip = ipaddress.ip_address(addr)
    best, best_len = NO_PEER, -1
    for i, p in enumerate(peers):
        net = ipaddress.ip_network(p.subnet)
        if ip.version == net.version and ip in net and net.prefixlen > best_len:
            best, best_len = i, net.prefixlen
    return best


def test_v4_longest_prefix_matches_reference():
    rng = random.Random(3)
    peers = [Peer(f"198.19.{i}.0/24", f"198.18.0.{i}", f"02:00:00:00:00:{i:02x}") for i in range(1, 200, 3)]
    peers += [Peer("198.19.0.0/16", "198.18.1.1"), Peer("198.19.7.128/25", "198.18.1.2")]
    table = PeerTable(peers)
    addrs = [f"198.19.{rng.randrange(256)}.{rng.randrange(256)}" for _ in range(2000)] + [
        "198.18.0.1",
        "0.0.0.0",
    ]
    dst = np.array([int(ipaddress.IPv4Address(a)) for a in addrs], dtype=np.uint32)
    got = table.lookup_v4(dst).tolist()
    assert got == [_reference(peers, a) for a in addrs]
    assert table.macs[got[addrs.index(next(a for a in addrs if a.startswith("198.19.1.")))]].tolist() == [
        2,
        0,
        0,
        0,
        0,
        1,
    ]


def test_v6_longest_prefix_matches_reference():
    rng = random.Random(4)
    peers = [Peer(f"fd00:198:19:{i:x}::/64", f"198.18.0.{i}") for i in range(1, 60)]
    peers += [Peer("fd00:198:19::/48", "198.18.1.1"), Peer("fd00:198:19:5:8000::/65", "198.18.1.2")]
    table = PeerTable(peers)
    addrs = [
        str(ipaddress.IPv6Address((0xFD000198_0019 << 80) | (rng.randrange(70) << 64) | rng.getrandbits(64)))
        for _ in range(2000)
    ] + ["fd00:198:20::1", "::"]
    raw = np.array([list(ipaddress.IPv6Address(a).packed) for a in addrs], dtype=np.uint8)
    assert table.lookup_v6(raw).tolist() == [_reference(peers, a) for a in addrs]


def test_lookup_packets_mixes_families_and_empty_table():
    v4 = bytes([0x45]) + bytes(15) + ipaddress.IPv4Address("198.19.2.9").packed + bytes(20)
    v6 = bytes([0x60]) + bytes(23) + ipaddress.IPv6Address("fd00:198:19:2::9").packed + bytes(8)
    junk = bytes([0x15]) + bytes(40)
    batch = PacketBatch.from_packets([v4, v6, junk], headroom=22)
    table = PeerTable([Peer("fd00:198:19:2::/64", "198.18.0.2"), Peer("198.19.2.0/24", "198.18.0.2")])
    assert table.lookup_packets(batch.buf, batch.offset, batch.n).tolist() == [1, 0, NO_PEER]
    assert PeerTable().lookup_packets(batch.buf, batch.offset, batch.n).tolist() == [NO_PEER] * 3
    assert table.sources == {"198.18.0.2"}


def test_lookup_one_agrees_with_lookup_packets():
    """The plain-Python lookup of a lone packet finds what the batch lookup finds, in both families, with
    overlapping prefixes, a subnet two peers claim, and packets too short or of no IP version."""
    rng = random.Random(5)
    peers = [Peer(f"198.19.{i}.0/24", f"198.18.0.{i}") for i in range(1, 40)]
    peers += [Peer("198.19.0.0/16", "198.18.1.1"), Peer("198.19.7.128/25", "198.18.1.2")]
    peers += [Peer("198.19.9.0/24", "198.18.1.3")]  # a second claim on 198.19.9.0/24
    peers += [Peer(f"fd00:198:19:{i:x}::/64", "198.18.2.1") for i in range(1, 20)]
    peers += [Peer("fd00:198:19::/48", "198.18.2.2"), Peer("fd00:198:19:5:8000::/65", "198.18.2.3")]
    table = PeerTable(peers)
    pkts = []
    for _ in range(500):
        dst4 = ipaddress.IPv4Address(f"198.{rng.choice((18, 19))}.{rng.randrange(48)}.{rng.randrange(256)}")
        pkts.append(bytes([0x45]) + bytes(15) + dst4.packed + bytes(24))
        low = (rng.randrange(24) << 64) | rng.getrandbits(64)
        dst6 = ipaddress.IPv6Address((0xFD000198_0019 << 80) | low)
        pkts.append(bytes([0x60]) + bytes(23) + dst6.packed + bytes(4))
    pkts += [bytes([0x15]) + bytes(43), bytes([0x45]) + bytes(10), bytes([0x60]) + bytes(30), b""]
    batch = PacketBatch.from_packets([p.ljust(44, b"\0") for p in pkts], headroom=8)
    want = table.lookup_packets(batch.buf, batch.offset, batch.n).tolist()
    got = [table.lookup_one(p) for p in pkts]
    assert got[:-4] == want[:-4] and got[-4:] == [NO_PEER] * 4
    assert NO_PEER in got and len(set(got)) > 40
    assert PeerTable().lookup_one(pkts[0]) == NO_PEER


def test_peer_json_roundtrip():
    p = Peer("198.19.2.0/24", "198.18.0.2", "02:00:00:00:00:02")
    assert Peer.from_json(p.to_json()) == p


def test_strangers_match_a_per_address_reference_for_every_row_layout():
    """strangers and any_stranger. One source (a GRO train's stride-0 view, or equal rows), a few mixed,
    and many mixed rows: a row is a stranger exactly when its source is no peer's PublicIP."""
    table = PeerTable([Peer(f"198.19.{i}.0/24", f"198.18.0.{i}") for i in range(1, 6)])
    known = {f"198.18.0.{i}" for i in range(1, 6)}
    rng = random.Random(5)
    cases = [["198.18.0.2"] * 3, ["198.18.0.9"] * 3, ["198.18.0.2", "198.18.0.9", "198.18.0.2"]]
    cases.append([f"198.18.0.{rng.randrange(1, 12)}" for _ in range(200)])
    for addrs in cases:
        rows = np.array([list(ipaddress.IPv4Address(a).packed) for a in addrs], np.uint8)
        want = [a not in known for a in addrs]
        assert table.strangers(rows).tolist() == want
        spaced = np.zeros((len(addrs), 2, 4), np.uint8)  # every other row of a wider array, as a train set's
        spaced[:, 0] = rows
        assert table.strangers(spaced[:, 0]).tolist() == want
        assert table.any_stranger(rows) == table.any_stranger(spaced[:, 0]) == any(want)
    one = np.lib.stride_tricks.as_strided(rows[:1], (7, 4), (0, 1))  # the last case's row 0, 7 times
    assert table.strangers(one).tolist() == [want[0]] * 7
    assert table.any_stranger(one) == want[0]
