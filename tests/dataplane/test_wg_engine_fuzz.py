"""Hostile traffic through two WireGuard engines: damaged superpackets and ACKs read from A's TUN (and B's),
sealed and sent as UDP_GRO trains, so B opens authenticated packets that are not sound; and strangers'
datagrams and trains sent to B's port. Nothing may end as an internal error (which drops a whole batch,
the good packets beside the bad), and clean traffic still passes both ways afterwards."""

from __future__ import annotations

import random
import socket
import struct
import time

import pytest
from mangle import tcp, tun_reads
from wg_nodes import ADDR, Node, pump

from udpflannel.codec.wireguard import messages as wgm
from udpflannel.dataplane.wg_engine import WgPeerConfig
from udpflannel.io import linux

pytestmark = pytest.mark.usefixtures("private_net")  # the underlay in a namespace of the module's own
TRIALS = 250  # ~2 s
HANDSHAKES = [
    (wgm.MESSAGE_INITIATION_TYPE, wgm.MESSAGE_INITIATION_SIZE),
    (wgm.MESSAGE_RESPONSE_TYPE, wgm.MESSAGE_RESPONSE_SIZE),
    (wgm.MESSAGE_COOKIE_REPLY_TYPE, wgm.MESSAGE_COOKIE_REPLY_SIZE),
]


def drain(node: Node) -> int:
    """TUN writes the node made (its TUN reader's side), read and counted."""
    return len(node.written())


def stranger(rng: random.Random, to: Node) -> None:
    """Datagrams no peer sent: random bytes, handshake messages with random contents, or transport messages
    under one of `to`'s receiver indexes (or none) with random ciphertext, alone or as a UDP_SEGMENT train
    (opened as rows on arrival)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        dest = (ADDR, to.udp.address[1])
        r = rng.random()
        if r < 0.2:
            s.sendto(rng.randbytes(rng.randrange(0, 200)), dest)
            return
        if r < 0.35:  # a handshake message of the right type and size, random inside
            kind, size = rng.choice(HANDSHAKES)
            s.sendto(bytes([kind, 0, 0, 0]) + rng.randbytes(size - 4), dest)
            return
        indexes = list(to.device.index_table.keys()) or [0]
        receiver = rng.choice(indexes) if rng.random() < 0.8 else rng.getrandbits(32)
        size = rng.choice([32, 48, 64, 1200, 1452])
        count = rng.choice([1, 2, 5, 20])
        msgs = b"".join(
            wgm.encode_transport_header(receiver, rng.getrandbits(64))
            + rng.randbytes(size - wgm.MESSAGE_TRANSPORT_HEADER_SIZE)
            for _ in range(count)
        )
        if count == 1:
            s.sendto(msgs, dest)
            return
        anc = [(linux.SOL_UDP, linux.UDP_SEGMENT, struct.pack("=H", size))]
        s.sendmsg([msgs], anc, 0, dest)


def internal_errors(nodes: list[Node]) -> int:
    return sum(n.engine.counters.drops["internal_error"] for n in nodes)


def test_damaged_traffic_is_judged_never_an_internal_error() -> None:
    a, b = Node(1, True), Node(2, True)
    nodes = [a, b]
    try:
        for x, y, i in ((a, b, 2), (b, a, 1)):
            allowed = (f"198.19.{i}.0/24", f"fd00:198:0:{i}::/64")
            x.engine.set_peers(
                [WgPeerConfig(y.public_key, (ADDR, y.udp.address[1]), allowed)], time.monotonic()
            )
        clean = tcp(random.Random(-1), 10 * 1380, 1380, v6=False, outbound=True)
        a.inject(*clean)  # the first packet starts the handshake
        pump(nodes, rounds=200, settle=0)
        assert drain(b) >= 1
        for trial in range(TRIALS):
            rng = random.Random(trial)
            r = rng.random()
            if r < 0.6:
                tun_reads(rng, a.inject)
            elif r < 0.8:
                # B's pods answering: the inbound shape of the same traffic, read from B's TUN
                pkt, vh = tcp(
                    rng,
                    rng.randrange(0, 30000),
                    rng.choice([1380, 500]),
                    v6=rng.random() < 0.3,
                    outbound=False,
                )
                b.inject(pkt, vh)
            else:
                stranger(rng, b)
            pump(nodes, rounds=200, settle=0)
            drain(a)
            drain(b)
            assert internal_errors(nodes) == 0, f"trial {trial}"
        # Not vacuous: B wrote packets to its TUN, and refused some as unsound or unauthenticated.
        st = b.engine.stats(0.0)
        drops = {k: v for k, v in st.items() if k.startswith("drop_") and v}
        assert st["rx_packets"] > 0 and len(drops) >= 2, drops
        # Clean traffic passes both ways.
        a.inject(*clean)
        pump(nodes, rounds=200, settle=0)
        assert drain(b) >= 1
        b.inject(*tcp(random.Random(-2), 1000, 1380, v6=False, outbound=False))
        pump(nodes, rounds=200, settle=0)
        assert drain(a) >= 1
    finally:
        for n in nodes:
            n.close()


def test_stranger_helper_reaches_the_port() -> None:
    """The strangers' datagrams do arrive (else the test above would prove nothing about them)."""
    b = Node(2, True)
    try:
        for seed in range(12):  # random bytes, lone messages and trains among them
            stranger(random.Random(seed), b)
            time.sleep(0.02)
            assert b.engine.rx_once(time.monotonic()) >= 1, seed
    finally:
        b.close()
