"""Hostile traffic through the whole vxlan/udp engine: valid superpackets, GRO trains and ACKs with a few
bytes changed (IP and TCP headers, the VXLAN header, virtio header fields, lengths, GRO segment sizes,
sources), through a TUN with offloads and through a plain one. Every batch is judged and counted; none may
end as an internal error (which would drop the good packets beside the bad ones), and clean traffic still
goes through afterwards."""

from __future__ import annotations

import random
import socket
import struct

import numpy as np
import pytest
from mangle import flip, tcp, tun_reads

from udpflannel.codec import vxlan
from udpflannel.dataplane.counters import INDEX, SLOTS
from udpflannel.dataplane.engine import HEADROOM, Engine, EngineConfig
from udpflannel.dataplane.spec import Peer
from udpflannel.io import linux
from udpflannel.io.mmsg import CMSG_SPACE, MmsgArena, encode_sockaddr
from udpflannel.io.tun import TunRead
from udpflannel.io.udp_sink import SinkSocket
from udpflannel.packet import reference
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.vnet import VNET_HDR_DTYPE, VnetHdr

OUR_MAC, PEER_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
PEER_PUBLIC = "198.18.0.2"
TRIALS = 400  # per encapsulation: ~1 s each
READ_ROWS = 8


class FuzzTun:
    """io.tun.Tun: reads copy queued packets into the engine's arena (with their virtio headers, or without
    in plain mode, the fallback when the kernel offers no offloads), writes count."""

    def __init__(self, vnet: bool) -> None:
        self.vnet = self.uso = vnet
        self.queue: list[tuple[bytes, VnetHdr]] = []
        self.written = 0

    def read_batch(self, max_packets: int, headroom: int, arena: PacketBatch) -> TunRead:
        take, self.queue = self.queue[:max_packets], self.queue[max_packets:]
        for i, (pkt, vh) in enumerate(take):
            header = vh.encode() if self.vnet else bytes(10)
            arena.buf[i, headroom - 10 : headroom] = np.frombuffer(header, np.uint8)
            arena.buf[i, headroom : headroom + len(pkt)] = np.frombuffer(pkt, np.uint8)
            arena.lengths[i] = len(pkt)
        n = len(take)
        headers = arena.buf[:n, headroom - 10 : headroom].copy().view(VNET_HDR_DTYPE).reshape(n)
        return TunRead(PacketBatch(arena.buf[:n], arena.lengths[:n], headroom, n), headers, True)

    def write_batch(self, writes) -> int:
        self.written += len(writes)
        return len(writes)

    def write_plain(self, packet) -> bool:
        self.written += 1
        return True


class ArrivingSock(SinkSocket):
    """io.udp_sink.SinkSocket whose next receive returns the first `ready` slots of `arena`, as recvmmsg
    would have left them."""

    def __init__(self) -> None:
        super().__init__(HEADROOM, max_segments=64)
        self.arena = MmsgArena(24, 65536 + 4096)
        self.ready = 0

    def _recv(self, max_messages: int | None) -> tuple[MmsgArena, int]:
        m, self.ready = self.ready, 0
        return self.arena, m


def make_engine(encap: str, vnet: bool = True) -> tuple[Engine, FuzzTun, ArrivingSock]:
    cfg = EngineConfig(
        encap=encap,
        mtu=1450 if encap == "vxlan" else 1472,
        port=8472 if encap == "vxlan" else 8285,
        vtep_mac=OUR_MAC,
        icmp_src_v4="198.19.1.0",
        icmp_src_v6="fd00:198:0:1::",
    )
    tun, rx = FuzzTun(vnet), ArrivingSock()
    eng = Engine(cfg, tun, rx, [rx, SinkSocket(HEADROOM)], np.zeros(SLOTS, np.int64))
    eng.set_peers(
        [Peer("198.19.2.0/24", PEER_PUBLIC, PEER_MAC), Peer("fd00:198:0:2::/64", PEER_PUBLIC, PEER_MAC)]
    )
    eng.hold_runs = True  # as the worker runs it
    return eng, tun, rx


def put_datagrams(arena: MmsgArena, j: int, datagrams: list[bytes]) -> int:
    """Receive slot j holding `datagrams` as one UDP_GRO receive leaves them; returns the segment size."""
    raw = b"".join(datagrams)
    seg = len(datagrams[0])
    arena.data[j, : len(raw)] = np.frombuffer(raw, np.uint8)
    arena.hdrs["len"][j] = len(raw)
    gro = len(datagrams) > 1
    arena.hdrs["controllen"][j] = CMSG_SPACE if gro else 0
    cmsg = struct.pack("<Qiii", 20, linux.SOL_UDP, linux.UDP_GRO, seg)  # cmsghdr and the segment size
    arena.control[j, :20] = np.frombuffer(cmsg, np.uint8)
    arena.names[j, :16] = np.frombuffer(encode_sockaddr(socket.AF_INET, PEER_PUBLIC, 40000)[:16], np.uint8)
    return seg


def encapsulate(encap: str, inner: bytes) -> bytes:
    """The peer's datagram carrying `inner`."""
    if encap == "udp":
        return inner
    return vxlan.encode_vxlan(inner, 1, vxlan.parse_mac(PEER_MAC), vxlan.parse_mac(OUR_MAC))


def rx_trial(rng: random.Random, encap: str, rx: ArrivingSock) -> None:
    """One receive: a few trains (a superpacket's, or ACKs), or a dozen or two lone datagrams (ACKs and
    small data packets without GRO: the batch paths), most of them damaged."""
    arena = rx.arena
    m = 0
    lone = rng.random() < 0.2
    for _ in range(rng.randrange(8, 24) if lone else rng.choice([1, 1, 2, 3, 4])):
        v6 = rng.random() < 0.3
        if lone:
            pkt, vh = tcp(rng, rng.choice([0, 0, rng.randrange(1, 1300)]), 0, v6=v6, outbound=False)
            trains = [reference.split(pkt, VnetHdr(vh.flags, 0, 0, 0, vh.csum_start, vh.csum_offset))]
        elif rng.random() < 0.7:
            mss = rng.choice([1386, 1386, 500, 100])
            pkt, vh = tcp(rng, rng.randrange(1, 44 * mss), mss, v6=v6, outbound=False)
            segments = reference.split(pkt, vh)
            cut = rng.choice([len(segments), 44, max(1, len(segments) - 1), 1])
            trains = [segments[:cut], segments[cut:]]  # a superpacket's train and its rest
        else:  # a run of bare ACKs
            pkt, vh = tcp(rng, 0, 0, v6=v6, outbound=False)
            ack = reference.split(pkt, VnetHdr(vh.flags, 0, 0, 0, vh.csum_start, vh.csum_offset))[0]
            trains = [[ack] * rng.randrange(1, 30)]
        for segs in trains:
            if m == arena.slots or not segs:
                break
            seg = put_datagrams(arena, m, [encapsulate(encap, x) for x in segs])
            total = int(arena.hdrs["len"][m])
            if rng.random() < 0.7:
                for _ in range(rng.randrange(1, 4)):  # in some datagram's headers
                    flip(rng, arena.data[m], seg * rng.randrange(-(-total // seg)), 110)
            if rng.random() < 0.15:
                arena.hdrs["len"][m] = rng.randrange(0, total + 1)
            if rng.random() < 0.1:
                size = rng.choice([0, 1, 8, 50, seg - 1, seg + 1, 0xFFFF, rng.randrange(70000)])
                arena.control[m, 16:20] = np.frombuffer(struct.pack("<i", size), np.uint8)
            if rng.random() < 0.05:
                arena.names[m, 7] = rng.randrange(256)  # another source address
            m += 1
    rx.ready = m


@pytest.mark.parametrize("vnet", [True, False], ids=["offloads", "plain-tun"])
@pytest.mark.parametrize("encap", ["vxlan", "udp"])
def test_mangled_traffic_is_judged_never_an_internal_error(encap: str, vnet: bool) -> None:
    eng, tun, rx = make_engine(encap, vnet)
    c = eng.counters
    for trial in range(TRIALS):
        rng = random.Random(trial)
        if rng.random() < 0.5:
            tun_reads(rng, lambda pkt, vh: tun.queue.append((pkt, vh)))
            eng.tx_once()
        else:
            rx_trial(rng, encap, rx)
            eng.rx_once()
            if rng.random() < 0.5:
                eng.flush_held()
        assert c[INDEX["drop_internal_error"]] == 0, f"{encap}, vnet {vnet}: trial {trial}"
    eng.flush_held()
    # Not vacuous: traffic went both ways and several kinds of damage were told apart.
    assert c[INDEX["tx_packets"]] > 0 and c[INDEX["rx_packets"]] > 0
    drops = [name for name, i in INDEX.items() if name.startswith("drop_") and c[i]]
    assert len(drops) >= 4, drops
    # Clean traffic still goes through, each way.
    sent, written = c[INDEX["tx_packets"]], tun.written
    rng = random.Random(-1)
    if vnet:  # a superpacket of 20 segments
        tun.queue.append(tcp(rng, 20 * 1386, 1386, v6=False, outbound=True))
    else:  # plain mode reads whole packets, checksums done
        pkt, vh = tcp(rng, 1000, 0, v6=False, outbound=True)
        done = reference.split(pkt, VnetHdr(vh.flags, 0, 0, 0, vh.csum_start, vh.csum_offset))[0]
        tun.queue.append((done, VnetHdr()))
    eng.tx_once()
    assert c[INDEX["tx_packets"]] == sent + (20 if vnet else 1)
    pkt, vh = tcp(rng, 20 * 1386, 1386, v6=False, outbound=False)
    put_datagrams(rx.arena, 0, [encapsulate(encap, x) for x in reference.split(pkt, vh)])
    rx.ready = 1
    eng.rx_once()
    eng.flush_held()
    assert tun.written > written
