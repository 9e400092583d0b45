"""The engine's batch-of-batches paths: several superpackets in one TUN read (gso_many) and several GRO
trains in one receive (gro_trains) give the datagrams and TUN writes that one at a time gives."""

from __future__ import annotations

import socket
import struct

import numpy as np
import pytest
from test_engine import OUR_MAC, PEER_MAC, Harness

from udpflannel.codec import vxlan
from udpflannel.dataplane.counters import DROP_NAMES, INDEX
from udpflannel.dataplane.engine import HEADROOM
from udpflannel.io.mmsg import MmsgArena, encode_sockaddr
from udpflannel.io.udp import UdpSocket
from udpflannel.io.udp_recv import ARENA_SLACK, SET_MIN, TrainSet
from udpflannel.packet import reference
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.drops import DropReason
from udpflannel.packet.vnet import VNET_HDR_DTYPE, VnetHdr

scapy = pytest.importorskip("scapy.all")
MSS = 1370


def superpacket(seq: int, size: int, flags: str = "A") -> bytes:
    """A TCP superpacket as the TUN hands it over (the checksum field holds the pseudo-header sum)."""
    inner = scapy.IP(src="198.19.1.0", dst="198.19.2.9") / scapy.TCP(sport=4, dport=5, flags=flags, seq=seq)
    raw = bytearray(bytes(inner / bytes((seq + i) & 0xFF for i in range(size))))
    raw[36:38] = reference.pseudo_header(bytes(raw), 6, len(raw) - 20).to_bytes(2, "big")
    return bytes(raw)


def send(h: Harness, packets: list[bytes]) -> None:
    batch = PacketBatch.from_packets(packets, headroom=HEADROOM)
    headers = np.zeros(len(packets), VNET_HDR_DTYPE)
    headers[:] = (1, 1, 40, MSS, 20, 16)  # NEEDS_CSUM, TCPV4
    h.engine.process_tx(batch, headers, lambda i: VnetHdr(*headers[i].tolist()))


def test_superpackets_of_one_read_go_out_as_one_at_a_time_in_one_call():
    sps = [superpacket(1000 + i * 50000, 20000 + 3000 * i, "PA" if i == 2 else "A") for i in range(3)]
    together, alone = Harness("vxlan"), Harness("vxlan")
    send(together, sps)
    for sp in sps:
        send(alone, [sp])
    assert [d for d, _, _ in together.sent] == [d for d, _, _ in alone.sent]
    assert together.counters[INDEX["tx_superpackets"]] == 3
    assert together.counters[INDEX["tx_send_calls"]] == 1  # one sendmmsg for the read (one flow)
    assert alone.counters[INDEX["tx_send_calls"]] == 3


@pytest.mark.parametrize("encap", ["vxlan", "udp"])
@pytest.mark.parametrize("flows", [1, 2], ids=["one-flow", "two-flows"])
def test_a_read_of_superpackets_sends_what_one_at_a_time_sends(encap: str, flows: int) -> None:
    """Four superpackets of one read split together: one sendmmsg when they are one flow's, else one send
    each; the same datagrams either way, and (udp) every TTL down by exactly one."""
    sps = [superpacket(1000 + i * 50000, 20000 + 3000 * i) for i in range(4)]
    if flows == 2:
        sps[2] = sps[2][:22] + b"\x00\x06" + sps[2][24:]  # another destination port: another flow
    together, alone = Harness(encap), Harness(encap)
    send(together, sps)
    for sp in sps:
        send(alone, [sp])
    assert [d for d, _, _ in together.sent] == [d for d, _, _ in alone.sent]
    assert together.counters[INDEX["tx_send_calls"]] == (1 if flows == 1 else 4)
    if encap == "udp":
        assert {scapy.IP(d).ttl for d, _, _ in together.sent} == {63}


class RecordingTun:
    vnet = True

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write_batch(self, writes) -> int:
        self.written.extend(b"".join(bytes(x) for x in iov) for iov in writes)
        return len(writes)


def received(trains: list[list[bytes]], src: str = "198.18.0.2") -> tuple[UdpSocket, MmsgArena]:
    """A UdpSocket whose arena holds the trains as recvmmsg with UDP_GRO leaves them."""
    sock = UdpSocket(None, socket.AF_INET, True, True, 128, 65507, 64, HEADROOM)  # type: ignore[arg-type]
    arena = MmsgArena(8, 65536 + ARENA_SLACK)
    for j, datagrams in enumerate(trains):
        raw = b"".join(datagrams)
        arena.data[j, : len(raw)] = np.frombuffer(raw, np.uint8)
        arena.hdrs["len"][j] = len(raw)
        arena.hdrs["controllen"][j] = 24
        cmsg = np.array([20], "<u8").tobytes() + np.array([17, 104, len(datagrams[0])], "<i4").tobytes()
        arena.control[j, :20] = np.frombuffer(cmsg, np.uint8)
        arena.names[j, :16] = np.frombuffer(encode_sockaddr(socket.AF_INET, src, 8472)[:16], np.uint8)
    sock._recv = lambda _max: (arena, len(trains))  # type: ignore[method-assign]
    return sock, arena


def vxlan_train(seq: int, size: int, flaw: str = "", mss: int = MSS) -> list[bytes]:
    """A superpacket's VXLAN datagrams; flaw: "l4" flips a payload bit of datagram 1, "last-l4" one of
    the last datagram, "vni" gives datagram 1 VNI 2, "src-mac" another inner source MAC (which the receive
    does not judge)."""
    raw = superpacket(seq, size)
    segs = reference.split(raw, VnetHdr(1, 1, 40, mss, 20, 16))
    if flaw in ("l4", "last-l4"):
        at = 1 if flaw == "l4" else len(segs) - 1
        bad = bytearray(segs[at])
        bad[-1] ^= 1
        segs[at] = bytes(bad)
    out = [vxlan.encode_vxlan(s, 1, vxlan.parse_mac(PEER_MAC), vxlan.parse_mac(OUR_MAC)) for s in segs]
    if flaw == "vni":
        out[1] = vxlan.encode_vxlan(segs[1], 2, vxlan.parse_mac(PEER_MAC), vxlan.parse_mac(OUR_MAC))
    elif flaw == "src-mac":
        other = vxlan.parse_mac("02:00:00:00:00:77")
        out[1] = vxlan.encode_vxlan(segs[1], 1, other, vxlan.parse_mac(OUR_MAC))
    return out


@pytest.mark.parametrize("count", [SET_MIN - 1, SET_MIN], ids=["fewer-than-a-set", "a-set"])
@pytest.mark.parametrize("flaw", ["", "l4", "last-l4", "vni", "src-mac"])
def test_trains_of_one_receive_are_written_as_one_at_a_time(flaw: str, count: int):
    """A flawed datagram in the second train keeps that train out of the set's merge; it is judged alone,
    and everything written and counted is what one train at a time gives. Fewer than SET_MIN trains
    are no set: each goes its own way (cheaper than a set's fixed cost)."""
    trains = [vxlan_train(1000 + i * 40000, 30000 + i * MSS, flaw if i == 1 else "") for i in range(count)]
    together, alone = Harness("vxlan"), Harness("vxlan")
    for h in (together, alone):
        h.engine.tun = h.tun = RecordingTun()
    sock, _ = received(trains)
    recs = sock.recv_trains(sets=True)
    if count < SET_MIN:
        assert len(recs) == count and not any(isinstance(r, TrainSet) for r in recs)
        sock, _ = received(trains)  # a fresh receive for the engine
    else:
        assert len(recs) == 1 and isinstance(recs[0], TrainSet)
        ts = recs[0]
        for j, (k, last) in enumerate(zip(ts.counts, ts.lasts, strict=True)):
            assert not ts.rows[j, k - 1, last:].any()  # zero past the train's end: its checksum sums the row
    together.engine.rx = sock
    assert together.engine.rx_once() == sum(len(t) for t in trains)
    for t in trains:
        one, _ = received([t])
        alone.engine.rx = one
        alone.engine.rx_once()
    assert together.tun.written == alone.tun.written
    # A dropped datagram splits its train: the rows before it, then the rest.
    assert len(together.tun.written) == count + (flaw in ("l4", "vni"))
    names = [DROP_NAMES[DropReason.BAD_L4_CHECKSUM], DROP_NAMES[DropReason.BAD_VNI]]
    assert [together.counters[INDEX[d]] for d in names] == [flaw in ("l4", "last-l4"), flaw == "vni"]
    for name in ("rx_packets", "rx_bytes", "rx_coalesced_writes", *names):
        assert together.counters[INDEX[name]] == alone.counters[INDEX[name]], name


@pytest.mark.parametrize("case", ["clean", "other-vni", "stranger"])
def test_a_lone_train_is_one_write_or_judged_row_by_row(case: str):
    """One train in a receive (the commonest case under load): a clean one becomes exactly its
    superpacket in one write; a datagram with another VNI is dropped alone, the rows around it still
    delivered; a train from no peer's address is dropped whole. Each counted by its reason."""
    raw = superpacket(7000, 12 * MSS + 100)
    train = vxlan_train(7000, 12 * MSS + 100)
    if case == "other-vni":
        bad = bytearray(train[5])
        bad[6] ^= 0x01  # VNI 1 -> 0
        train[5] = bytes(bad)
    h = Harness("vxlan")
    h.engine.tun = h.tun = RecordingTun()
    h.engine.rx, _ = received([train], src="198.18.0.9" if case == "stranger" else "198.18.0.2")
    assert h.engine.rx_once() == len(train)
    drops = {r: h.counters[INDEX[DROP_NAMES[r]]] for r in (DropReason.BAD_VNI, DropReason.NOT_A_PEER_SOURCE)}
    if case == "clean":
        assert h.tun.written == [VnetHdr(1, 1, 40, MSS, 20, 16).encode() + raw]  # NEEDS_CSUM, TCPV4
        assert h.counters[INDEX["rx_packets"]] == len(train) and not any(drops.values())
    elif case == "other-vni":
        assert len(h.tun.written) == 2 and drops[DropReason.BAD_VNI] == 1
        assert h.counters[INDEX["rx_packets"]] == len(train) - 1
    else:
        assert h.tun.written == [] and drops[DropReason.NOT_A_PEER_SOURCE] == len(train)


@pytest.mark.parametrize("plain_rows", [1, 6], ids=["one-plain", "six-plain"])
def test_a_read_goes_out_in_the_order_it_came(plain_rows: int) -> None:
    """A TUN read of plain segments and superpackets of one flow, interleaved: the datagrams leave in the
    same order (a lone segment must not overtake, nor fall behind, the superpacket read next to it), whichever
    path each row takes (per row for a few plain packets, the batch path for more, the split for the
    superpackets, several of them together or one by one)."""
    rows, headers, seq = [], [], 1000
    for _ in range(3):
        for _ in range(plain_rows):
            rows.append(superpacket(seq, MSS))  # one segment: the kernel sends it without GSO
            headers.append((1, 0, 0, 0, 20, 16))  # NEEDS_CSUM, GSO_NONE
            seq += MSS
        rows.append(superpacket(seq, 5 * MSS))
        headers.append((1, 1, 40, MSS, 20, 16))  # NEEDS_CSUM, TCPV4
        seq += 5 * MSS
    h = Harness("vxlan")
    batch = PacketBatch.from_packets(rows, headroom=HEADROOM)
    vh = np.array(headers, VNET_HDR_DTYPE)
    h.engine.process_tx(batch, vh, lambda i: VnetHdr(*vh[i].tolist()))
    seqs = [struct.unpack_from("!I", d, 22 + 20 + 4)[0] for d, _, _ in h.sent]  # VXLAN + Ethernet, IPv4, TCP
    assert len(seqs) == 3 * (plain_rows + 5) and seqs == sorted(seqs)
