"""dataplane/rx_hold.py: a superpacket that comes as two trains (the sender's UDP GSO limit) is one TUN write,
whether both trains come in one receive or in two; what is not its rest is written after it, in order; and
without hold_runs (tests, tools) every run is written at once."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine import Harness
from test_engine_batches import MSS, RecordingTun, received, superpacket, vxlan_train

from udpflannel.dataplane.counters import INDEX
from udpflannel.packet.vnet import VnetHdr

SEGMENTS = 46  # a 64 KiB superpacket: 44 datagrams in one UDP_SEGMENT message, 2 in the next
WRITE = VnetHdr(1, 1, 40, MSS, 20, 16).encode()  # NEEDS_CSUM, TCPV4


def harness(hold: bool) -> Harness:
    h = Harness("vxlan")
    h.engine.tun = h.tun = RecordingTun()
    h.engine.hold_runs = hold
    return h


@pytest.mark.parametrize("receives", [1, 2])
def test_a_superpacket_in_two_trains_is_one_write(receives: int) -> None:
    train = vxlan_train(5000, SEGMENTS * MSS)
    h = harness(hold=True)
    if receives == 1:
        h.engine.rx, _ = received([train[:44], train[44:]])
        assert h.engine.rx_once() == SEGMENTS
    else:
        for part in (train[:44], train[44:]):
            h.engine.rx, _ = received([part])
            assert h.engine.rx_once() == len(part)
    h.engine.flush_held()  # the worker does this before it sleeps
    assert h.tun.written == [WRITE + superpacket(5000, SEGMENTS * MSS)]
    assert h.counters[INDEX["rx_joined_runs"]] == 1
    assert h.counters[INDEX["rx_packets"]] == SEGMENTS
    assert h.counters[INDEX["rx_coalesced_writes"]] == 1


def test_superpackets_in_two_trains_each_in_one_receive_are_one_write_each() -> None:
    """Three superpackets of full-size (1450-byte MTU) segments, each 44 datagrams (all a UDP_SEGMENT send
    can carry) and its 2-datagram rest, in one receive (a receiver that is behind): each rest is moved
    behind its first part in the receive buffer, and the set is checked as three trains in every other
    slot, not in the slots next to each other (which hold what an earlier receive left there)."""
    mss = 1410  # 1450 - IPv4 20 - TCP 20: 1472-byte VXLAN datagrams, 44 to a message
    seqs = [5000 + i * SEGMENTS * mss for i in range(3)]
    trains = [vxlan_train(seq, SEGMENTS * mss, mss=mss) for seq in seqs]
    h = harness(hold=True)
    h.engine.rx, arena = received([part for t in trains for part in (t[:44], t[44:])])
    s = len(trains[0][0])
    for j in (1, 3, 5):  # behind each rest, what an earlier receive left: sound datagrams, stale
        arena.data[j, 2 * s : 46 * s] = np.frombuffer(b"".join(trains[j // 2][2:]), np.uint8)
    assert h.engine.rx_once() == 3 * SEGMENTS
    h.engine.flush_held()
    write = VnetHdr(1, 1, 40, mss, 20, 16).encode()
    assert h.tun.written == [write + superpacket(seq, SEGMENTS * mss) for seq in seqs]
    assert h.engine.rx.stats.rests_appended == 3
    assert h.counters[INDEX["rx_joined_runs"]] == 3
    assert h.counters[INDEX["rx_coalesced_writes"]] == 3


def test_a_held_run_is_written_first_when_the_rest_is_not_its_own() -> None:
    first, other = vxlan_train(5000, SEGMENTS * MSS)[:44], vxlan_train(900_000, 10 * MSS)
    h = harness(hold=True)
    h.engine.rx, _ = received([first])
    h.engine.rx_once()
    assert h.tun.written == []  # held: its rest may come with the next receive
    h.engine.rx, _ = received([other])
    h.engine.rx_once()  # `other` ends on a full segment: held in turn, until the flush
    h.engine.flush_held()
    assert h.tun.written == [WRITE + superpacket(5000, 44 * MSS), WRITE + superpacket(900_000, 10 * MSS)]
    assert h.counters[INDEX["rx_joined_runs"]] == 0


def test_without_hold_runs_every_run_is_written_at_once() -> None:
    train = vxlan_train(5000, SEGMENTS * MSS)
    h = harness(hold=False)
    h.engine.rx, _ = received([train[:44]])
    h.engine.rx_once()
    assert h.tun.written == [WRITE + superpacket(5000, 44 * MSS)]
    h.engine.rx, _ = received([train[44:]])
    h.engine.rx_once()  # two datagrams: the few-packets path writes each
    assert len(h.tun.written) == 3
    assert h.counters[INDEX["rx_joined_runs"]] == 0


def test_a_held_run_outlives_the_next_receive_of_several_trains() -> None:
    """A receive of several trains ends on a superpacket's first part (held); the next receive brings its
    rest and another superpacket, checked together in the same output buffers: the held part must not be
    overwritten by them. Then a superpacket sent whole, 46 full segments, is written at once (no room for
    more) and the one after it follows in order."""
    x, b, y = (
        vxlan_train(100, 10 * MSS - 300),
        vxlan_train(5000, SEGMENTS * MSS),
        vxlan_train(200_000, 9 * MSS),
    )
    h = harness(hold=True)
    h.engine.rx, _ = received([x, b[:44]])
    h.engine.rx_once()
    assert h.tun.written == [WRITE + superpacket(100, 10 * MSS - 300)]  # b's first part is held
    h.engine.rx, _ = received([b[44:], y])
    h.engine.rx_once()
    h.engine.flush_held()
    assert h.tun.written[1:] == [
        WRITE + superpacket(5000, SEGMENTS * MSS),
        WRITE + superpacket(200_000, 9 * MSS),
    ]
    c, d = vxlan_train(300_000, SEGMENTS * MSS), vxlan_train(300_000 + SEGMENTS * MSS, 9 * MSS)
    h.engine.rx, _ = received([c[:44], c[44:], d])
    h.engine.rx_once()
    assert h.tun.written[3:] == [WRITE + superpacket(300_000, SEGMENTS * MSS)]  # d (full segments): held
    h.engine.flush_held()
    assert h.tun.written[4:] == [WRITE + superpacket(300_000 + SEGMENTS * MSS, 9 * MSS)]
    assert h.counters[INDEX["rx_joined_runs"]] == 2
