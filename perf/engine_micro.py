"""Per-batch Python cost of the vxlan datapath engine, without the kernel: one 61000-byte TCP superpacket
through TX (split, headers, hand-off to a UDP socket stand-in), one 44-datagram UDP_GRO train through RX
(split the train, decapsulate, validate, coalesce, hand-off to a TUN stand-in), a receive of one and of
three superpackets each in two trains (44 + 2 datagrams: what a receiver that keeps up, and one that is
behind, gets), and a batch of 4 bare ACKs each way. The stand-ins only count, so the numbers are what
the worker spends in Python and numpy per batch: with warm caches (the best of many rounds: the machine is
shared), or with --cold 8, the median after 8 MB of other memory traffic before each call, which is how a
live worker finds its caches on two cores shared with the other worker, iperf3 and the kernel (about
twice the warm cost; live CPU per superpacket is about that too).

Run: .venv/bin/python perf/engine_micro.py [--repeat 5] [--cold MB]"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from udpflannel.codec import vxlan
from udpflannel.dataplane.counters import INDEX, SLOTS
from udpflannel.dataplane.engine import HEADROOM, Engine, EngineConfig
from udpflannel.dataplane.peers import Peer
from udpflannel.io.tun import TunRead, new_read_arena
from udpflannel.io.udp import UdpSocket
from udpflannel.io.udp_sink import SinkSocket
from udpflannel.packet import reference
from udpflannel.packet.vnet import VIRTIO_NET_HDR_F_NEEDS_CSUM, VNET_HDR_DTYPE, VnetHdr

OUR_MAC, PEER_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
MSS = 1386  # MTU 1450 - IPv4 20 - TCP 20 - timestamps 12
SUPERPACKET = 61000  # one UDP_SEGMENT message's worth (the size earlier figures were measured at)
TRAIN = 44
SMALL_TRAIN = 64
SET_SUPERPACKETS = 3  # a receive of several superpackets: 44 + 2 trains each, as the live receiver sees
SET_SEGMENTS = 46
ACK_TRAIN = 21  # a sender's worker gets its peer's ACKs ~20 to a receive at full speed (runner stats)


def _micro():
    path = Path(__file__).resolve().parent / "micro.py"
    spec = importlib.util.spec_from_file_location("udpflannel_perf_micro_e", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class SinkTun:
    """io.tun.Tun stand-in: reads come from a prepared arena, writes are counted."""

    vnet = True
    uso = True  # as the live TUN on Linux 6.2+: one UDP flow's receive is one write

    def __init__(self) -> None:
        self.arena = new_read_arena(4, HEADROOM)
        self.n = 0
        self.headers = np.zeros(0, VNET_HDR_DTYPE)
        self.writes = 0

    def load(self, packets: list[tuple[bytes, VnetHdr]]) -> None:
        for i, (pkt, hdr) in enumerate(packets):
            self.arena.buf[i, HEADROOM - 10 : HEADROOM] = np.frombuffer(hdr.encode(), np.uint8)
            self.arena.buf[i, HEADROOM : HEADROOM + len(pkt)] = np.frombuffer(pkt, np.uint8)
            self.arena.lengths[i] = len(pkt)
        self.n = len(packets)

    def read(self) -> TunRead:
        from udpflannel.packet.batch import PacketBatch

        n = self.n
        batch = PacketBatch(self.arena.buf[:n], self.arena.lengths[:n], HEADROOM, n)
        # A copy: sending writes the outer header over the virtio header in front of each packet, and
        # every round must read the headers as the TUN gave them.
        raw = self.arena.buf[:n, HEADROOM - 10 : HEADROOM].copy()
        return TunRead(batch, raw.view(VNET_HDR_DTYPE).reshape(n))

    def write_batch(self, writes) -> int:
        self.writes += len(writes)
        return len(writes)

    def write_plain(self, packet) -> bool:
        return True


def engine() -> tuple[Engine, SinkTun]:
    cfg = EngineConfig(encap="vxlan", mtu=1450, port=8472, vtep_mac=OUR_MAC, icmp_src_v4="198.19.1.0")
    tun = SinkTun()
    pool = [SinkSocket(HEADROOM) for _ in range(4)]
    eng = Engine(cfg, tun, pool[0], pool, np.zeros(SLOTS, np.int64))
    eng.set_peers([Peer("198.19.2.0/24", "198.18.0.2", PEER_MAC)])
    return eng, tun


@dataclass
class Timer:
    """Per-call CPU time of this thread (not wall time: other processes on a shared machine would count
    otherwise). Warm (evict=0): the best of many short rounds. Cold: before each call, `evict` bytes of
    other memory traffic, as the other processes on a worker's core leave its caches; the median."""

    evict: int = 0

    def us(self, fn: Callable[[], object], number: int, rounds: int) -> float:
        fn()
        if self.evict:
            junk, sink = np.ones(self.evict, np.uint8), np.empty(self.evict, np.uint8)
            times = []
            for _ in range(number * rounds // 4):
                np.bitwise_xor(junk, 1, out=sink)
                t0 = time.thread_time_ns()
                fn()
                times.append(time.thread_time_ns() - t0)
            return sorted(times)[len(times) // 2] / 1e3
        best = float("inf")
        for _ in range(rounds):
            t0 = time.thread_time()
            for _ in range(number):
                fn()
            best = min(best, (time.thread_time() - t0) / number)
        return best * 1e6


def udp_packet(payload_len: int, *, outbound: bool = False) -> bytes:
    """An IPv4/UDP packet with correct checksums, 198.19.2.3:5000 -> 198.19.1.2:5201 (from the peer's
    subnet to ours), or the other way round when outbound."""
    src, dst = bytes([198, 19, 2, 3]), bytes([198, 19, 1, 2])
    if outbound:
        src, dst = dst, src
    udp_len = 8 + payload_len
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 7, 0x4000, 64, 17, 0, src, dst))
    struct.pack_into("!H", ip, 10, reference.checksum(ip))
    udp = bytearray(struct.pack("!HHHH", 5000, 5201, udp_len, 0) + bytes(range(payload_len)))
    pkt = bytes(ip) + bytes(udp)
    pseudo = reference.pseudo_header(pkt, 17, udp_len)
    # outbound: as the TUN hands it over with NEEDS_CSUM, only the pseudo-header sum in the field
    c = pseudo if outbound else reference.checksum(bytes(udp), pseudo) or 0xFFFF
    struct.pack_into("!H", udp, 6, c)
    return bytes(ip) + bytes(udp)


def gro_train(segments: list[bytes], src_mac: bytes, dst_mac: bytes) -> tuple[np.ndarray, int, int]:
    """The VXLAN datagrams of `segments` laid out as one UDP_GRO receive (buffer, total, segment size)."""
    dgrams = [vxlan.encode_vxlan(s, 1, src_mac, dst_mac) for s in segments]
    raw = b"".join(dgrams)
    return np.frombuffer(raw, np.uint8), len(raw), len(dgrams[0])


def put_train(arena, j: int, segments: list[bytes]) -> None:
    """Receive slot j holding `segments` as the peer's VXLAN datagrams, as one UDP_GRO receive leaves them
    (data, length, the UDP_GRO cmsg with the segment size, the peer's sockaddr)."""
    from udpflannel.io.mmsg import encode_sockaddr

    flat, total, seg = gro_train(segments, vxlan.parse_mac(PEER_MAC), vxlan.parse_mac(OUR_MAC))
    arena.data[j, :total] = flat
    arena.hdrs["len"][j] = total
    arena.hdrs["controllen"][j] = 24
    arena.control[j, :20] = np.frombuffer(
        np.array([20], "<u8").tobytes() + np.array([17, 104, seg], "<i4").tobytes(), np.uint8
    )
    arena.names[j, :16] = np.frombuffer(encode_sockaddr(socket.AF_INET, "198.18.0.2", 40000)[:16], np.uint8)


def _received(sock: UdpSocket, arena, m: int) -> list:
    """What UdpSocket.recv_trains returns for messages already in the arena (no syscall)."""
    orig = sock._recv
    sock._recv = lambda _max: (arena, m)  # type: ignore[method-assign]
    try:
        return sock.recv_trains()
    finally:
        sock._recv = orig  # type: ignore[method-assign]


def train_set_us(micro, eng: Engine, sock: UdpSocket, timer: Timer, repeat: int, superpackets: int) -> float:
    """What the receiver of a 64 KiB-superpacket stream sees (one superpacket when it keeps up, more when
    it is behind): one recvmmsg holding `superpackets` superpackets, each sent as two UDP_SEGMENT messages
    (TRAIN datagrams and the rest), so two GRO trains; handled as the worker does (train set, held run
    joined to its rest, one write)."""
    from udpflannel.io.mmsg import MmsgArena

    arena = MmsgArena(2 * superpackets, 65536 + 4096)
    m = 0
    for i in range(superpackets):
        pkt, hdr = micro.tcp_superpacket((SET_SEGMENTS - 1) * MSS + 700, mss=MSS, seed=i)
        segments = reference.split(pkt, hdr)
        for part in (segments[:TRAIN], segments[TRAIN:]):
            put_train(arena, m, part)
            m += 1
    writes, joined = eng.counters[INDEX["rx_coalesced_writes"]], eng.counters[INDEX["rx_joined_runs"]]
    eng.hold_runs = True
    orig = sock._recv
    sock._recv = lambda _max: (arena, m)  # type: ignore[method-assign]
    try:

        def receive() -> None:
            eng.rx_once()
            eng.flush_held()

        us = timer.us(receive, 20, 10 * repeat)
    finally:
        sock._recv = orig  # type: ignore[method-assign]
        eng.hold_runs = False
    rounds = eng.counters[INDEX["rx_coalesced_writes"]] - writes
    assert rounds > 0 and eng.counters[INDEX["rx_joined_runs"]] - joined == rounds, "not one write each"
    return us


def ack_train_rx_us(micro, eng: Engine, rx_sock: UdpSocket, arena, timer: Timer, repeat: int) -> float:
    """One UDP_GRO train of ACK_TRAIN pure ACKs of one flow (ACK number and window moving, checksummed
    as they arrive), through the receive path."""
    partial = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 20, 16)
    acks = []
    for i in range(ACK_TRAIN):
        seg = bytearray(micro.tcp_superpacket(0, mss=MSS)[0])
        struct.pack_into("!I", seg, 20 + 8, (77 + 60000 * i) & 0xFFFFFFFF)  # ACK number
        struct.pack_into("!H", seg, 20 + 14, 500 + i)  # window
        acks.append(reference.split(bytes(seg), partial)[0])
    put_train(arena, 0, acks)
    total = int(arena.hdrs["len"][0])
    fresh = arena.data[0, :total].copy()
    before = int(eng.counters[INDEX["rx_packets"]])

    def rx_train() -> None:
        arena.data[0, :total] = fresh  # each ACK's virtio header was written over its prefix
        for rec in _received(rx_sock, arena, 1):
            eng.process_rx(rec.batch, rec.src_addr)

    us = timer.us(rx_train, 50, 10 * repeat)
    assert int(eng.counters[INDEX["rx_packets"]]) > before, "ACKs were dropped"
    return us


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--cold",
        type=int,
        default=0,
        metavar="MB",
        help="MB of other memory traffic before each call (8: caches as a worker finds them live)",
    )
    args = ap.parse_args(argv)
    timer = Timer(args.cold << 20)
    micro = _micro()
    eng, tun = engine()
    pkt, hdr = micro.tcp_superpacket(SUPERPACKET - 52 - (SUPERPACKET - 52) % MSS, mss=MSS)
    # The sender's view: a TUN read of one superpacket.
    tun.load([(pkt, hdr)])
    read = tun.read()

    def tx() -> None:
        eng.process_tx(read.batch, read.headers, read.header)

    tx_us = timer.us(tx, 20, 10 * args.repeat)
    sent = eng.counters[INDEX["tx_packets"]]
    # The receiver's view: one GRO train of TRAIN datagrams from the peer.
    seg_pkt, seg_hdr = micro.tcp_superpacket(TRAIN * MSS, mss=MSS)
    segments = reference.split(seg_pkt, seg_hdr)
    rx_sock = eng.rx
    from udpflannel.io.mmsg import MmsgArena

    arena = MmsgArena(4, 65536 + 4096)
    put_train(arena, 0, segments)

    def rx() -> None:
        for rec in _received(rx_sock, arena, 1):
            eng.process_rx(rec.batch, rec.src_addr)

    rx_us = timer.us(rx, 20, 10 * args.repeat)
    zero_copy = _received(rx_sock, arena, 1)[0].batch.offset == 0
    assert tun.writes > 0 and eng.counters[INDEX["rx_packets"]] >= TRAIN, eng.counters
    # ACKs: four bare 52-byte TCP segments each way.
    # As the TUN hands them over: the TCP checksum field holds only the pseudo-header sum (NEEDS_CSUM).
    partial = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 20, 16)
    acks = [micro.tcp_superpacket(0, mss=MSS, seed=i)[0] for i in range(4)]
    tun.load([(a, partial) for a in acks])
    acks = [reference.split(a, partial)[0] for a in acks]  # as they arrive at the peer: checksummed
    ack_read = tun.read()

    def tx_acks() -> None:
        eng.process_tx(ack_read.batch, ack_read.headers, ack_read.header)

    ack_tx_us = timer.us(tx_acks, 50, 10 * args.repeat)
    for i, a in enumerate(acks):
        d = vxlan.encode_vxlan(a, 1, vxlan.parse_mac(PEER_MAC), vxlan.parse_mac(OUR_MAC))
        arena.data[i, : len(d)] = np.frombuffer(d, np.uint8)
        arena.hdrs["len"][i] = len(d)
        arena.hdrs["controllen"][i] = 0
        arena.names[i] = arena.names[0]

    # Received data may be changed in place (a virtio header written into the VXLAN header's bytes): put
    # the datagrams back before each round, as the next receive would (a copy of 4 short rows).
    acks_in_arena = arena.data[:4, :128].copy()

    def rx_acks() -> None:
        arena.data[:4, :128] = acks_in_arena
        for rec in _received(rx_sock, arena, 4):
            eng.process_rx(rec.batch, rec.src_addr)

    before = eng.counters[INDEX["rx_packets"]]
    drops_before = int(eng.counters[[v for k, v in INDEX.items() if k.startswith("drop_")]].sum())
    ack_rx_us = timer.us(rx_acks, 50, 10 * args.repeat)
    assert eng.counters[INDEX["rx_packets"]] > before, "ACKs were dropped"
    assert int(eng.counters[[v for k, v in INDEX.items() if k.startswith("drop_")]].sum()) == drops_before
    # 64-byte UDP payloads (the packet-rate benchmark): a TUN batch of 64, then one GRO train of 64.
    udp_partial = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 20, 6)
    tun.arena = new_read_arena(SMALL_TRAIN, HEADROOM)
    tun.load([(udp_packet(64, outbound=True), udp_partial)] * SMALL_TRAIN)
    small_read = tun.read()

    def tx_small() -> None:
        eng.process_tx(small_read.batch, small_read.headers, small_read.header)

    sent_before = int(eng.counters[INDEX["tx_packets"]])
    small_tx_us = timer.us(tx_small, 20, 10 * args.repeat)
    assert eng.counters[INDEX["tx_packets"]] > sent_before, "small packets were not sent"
    put_train(arena, 0, [udp_packet(64)] * SMALL_TRAIN)
    total = int(arena.hdrs["len"][0])
    before = eng.counters[INDEX["rx_packets"]]

    small_in_arena = arena.data[0, :total].copy()

    def rx_small() -> None:
        arena.data[0, :total] = small_in_arena  # as for the ACKs: fresh datagrams each round
        for rec in _received(rx_sock, arena, 1):
            eng.process_rx(rec.batch, rec.src_addr)

    drops_before = int(eng.counters[[v for k, v in INDEX.items() if k.startswith("drop_")]].sum())
    small_rx_us = timer.us(rx_small, 20, 10 * args.repeat)
    ack_train_us = ack_train_rx_us(micro, eng, rx_sock, arena, timer, args.repeat)
    one_us = train_set_us(micro, eng, rx_sock, timer, args.repeat, 1)
    set_us = train_set_us(micro, eng, rx_sock, timer, args.repeat, SET_SUPERPACKETS)
    assert eng.counters[INDEX["rx_packets"]] > before, "small datagrams were dropped"
    assert int(eng.counters[[v for k, v in INDEX.items() if k.startswith("drop_")]].sum()) == drops_before
    k = int(sent) // max(1, int(eng.counters[INDEX["tx_superpackets"]]))
    print(f"TX superpacket ({k} segments)  {tx_us:7.1f} us  {tx_us / k:5.2f} us/segment")
    print(
        f"RX GRO train ({TRAIN} datagrams)  {rx_us:7.1f} us  {rx_us / TRAIN:5.2f} us/datagram"
        f"  ({'zero-copy view' if zero_copy else 'copied rows'})"
    )
    print(f"TX 4 ACKs                      {ack_tx_us:7.1f} us")
    print(f"RX 4 ACKs                      {ack_rx_us:7.1f} us")
    print(
        f"RX {ACK_TRAIN} ACKs of one flow (a train) {ack_train_us:7.1f} us  "
        f"{ack_train_us / ACK_TRAIN:5.2f} us/ACK"
    )
    print(f"RX 1 superpacket, {TRAIN} + {SET_SEGMENTS - TRAIN} datagrams (one receive)  {one_us:7.1f} us")
    print(
        f"RX {SET_SUPERPACKETS} superpackets, {TRAIN} + {SET_SEGMENTS - TRAIN} datagrams each (one receive)"
        f"  {set_us:7.1f} us  {set_us / SET_SUPERPACKETS:5.1f} us/superpacket"
    )
    print(
        f"TX {SMALL_TRAIN} x 64-byte UDP (a batch) {small_tx_us:7.1f} us  "
        f"{small_tx_us / SMALL_TRAIN:5.2f} us/datagram"
    )
    print(
        f"RX {SMALL_TRAIN} x 64-byte UDP (a train) {small_rx_us:7.1f} us  "
        f"{small_rx_us / SMALL_TRAIN:5.2f} us/datagram"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
