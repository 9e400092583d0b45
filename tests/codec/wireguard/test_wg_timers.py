"""Every timer rule of the spec with a fake clock (wireguard-go device/timers.go semantics)."""

from __future__ import annotations

import itertools

import pytest
from wg_helpers import ENDPOINT_A, ENDPOINT_B, PRIV_A, PRIV_B, Pair, det_rand, ipv4_packet, make_pair

from udpflannel.codec.wireguard import messages as m
from udpflannel.codec.wireguard.events import Drop, DropReason, Queued, Reply
from udpflannel.codec.wireguard.session import Device
from udpflannel.codec.wireguard.timers import PeerTimers, TimerKind, Timing


def established(timing: Timing | None = None, keepalive: float = 0.0) -> Pair:
    p = make_pair(timing, keepalive=keepalive)
    p.deliver(p.a, p.a.initiate(p.b.identity.public, p.now))
    assert p.completed("a") and p.completed("b")
    return p


def replies(events: list) -> list[bytes]:
    return [e.data for e in events if isinstance(e, Reply)]


def lone_initiator(jitter: float) -> Device:
    a = Device(PRIV_A, rand=det_rand(b"a"), jitter=lambda: jitter)
    a.add_peer(Device(PRIV_B, rand=det_rand(b"b")).identity.public, endpoint=ENDPOINT_B)
    return a


def test_retransmit_every_rekey_timeout_plus_jitter_then_give_up() -> None:
    a = lone_initiator(jitter=0.5)
    peer_key = next(iter(a.peers))
    assert isinstance(a.send(peer_key, ipv4_packet(10), 0.0), Queued)
    sent = replies(a.handle_timer(0.0))
    assert len(sent) == 1
    times = [0.0]
    for _ in range(100):
        deadline = a.next_timer()
        if deadline is None or a.peers[peer_key].timers.pending(TimerKind.ZERO_KEY_MATERIAL):
            break
        out = replies(a.handle_timer(deadline))
        if out:
            assert len(out[0]) == m.MESSAGE_INITIATION_SIZE
            times.append(deadline)
    gaps = {round(b - a_, 6) for a_, b in itertools.pairwise(times)}
    assert gaps == {5.0 + 0.5 * m.REKEY_TIMEOUT_JITTER_MAX}
    # wireguard-go retries while attempts <= MAX_TIMER_HANDSHAKES (18): the first plus 19 retries.
    assert len(times) == 2 + m.MAX_TIMER_HANDSHAKES
    assert a.drops[DropReason.NO_SESSION] == 1  # the staged packet was flushed on giving up
    zero_at = a.peers[peer_key].timers.deadlines[TimerKind.ZERO_KEY_MATERIAL]
    assert zero_at == pytest.approx(times[-1] + 5.167 + 540.0)


def test_jitter_is_bounded_and_injected() -> None:
    t = PeerTimers(Timing(), jitter=lambda: 0.999)
    t.on_handshake_initiated(10.0)
    assert 15.0 < t.deadlines[TimerKind.RETRANSMIT_HANDSHAKE] < 15.334


def test_passive_keepalive_after_10s() -> None:
    p = established()
    p.send(p.a, ipv4_packet(20))
    start = p.now
    assert p.b.next_timer() == pytest.approx(start + 10.0)
    before = p.b.peers[p.a.identity.public].stats.tx_bytes
    p.tick(9.9)
    assert p.b.peers[p.a.identity.public].stats.tx_bytes == before
    p.tick(0.2)
    assert p.b.peers[p.a.identity.public].stats.tx_bytes == before + m.MESSAGE_KEEPALIVE_SIZE


def test_keepalive_not_sent_when_data_goes_back() -> None:
    p = established()
    p.send(p.a, ipv4_packet(20))
    p.tick(1.0)
    p.send(p.b, ipv4_packet(20, src="198.19.2.1"))
    assert not p.b.peers[p.a.identity.public].timers.pending(TimerKind.SEND_KEEPALIVE)


def test_new_handshake_after_15s_without_reply() -> None:
    p = established()
    out = p.a.send(p.b.identity.public, ipv4_packet(20), p.now)
    assert isinstance(out, bytes)  # never delivered: B stays silent
    deadline = p.a.next_timer()
    assert deadline == pytest.approx(p.now + 15.0)
    assert replies(p.a.handle_timer(deadline - 0.01)) == []
    msgs = replies(p.a.handle_timer(deadline))
    assert len(msgs) == 1 and len(msgs[0]) == m.MESSAGE_INITIATION_SIZE


def test_rekey_after_time_on_send_initiator_only() -> None:
    p = established()
    p.now += 121.0
    out = p.a.send(p.b.identity.public, ipv4_packet(5), p.now)
    assert isinstance(out, bytes)  # still valid, and a rekey is now due
    assert p.a.next_timer() == p.now
    # The responder does not rekey on send at 121 s.
    p.b.send(p.a.identity.public, ipv4_packet(5), p.now)
    assert not p.b.peers[p.a.identity.public].timers.pending(TimerKind.SEND_INITIATION)
    p.tick(0.0)
    assert len(p.completed("a")) == 2


def test_rekey_after_messages() -> None:
    p = established(Timing(rekey_after_messages=5))
    # The keepalive after the handshake used counter 0; four more make the next nonce 5 (not past 5).
    for _ in range(4):
        p.a.send(p.b.identity.public, ipv4_packet(1), p.now)
    assert not p.a.peers[p.b.identity.public].timers.pending(TimerKind.SEND_INITIATION)
    p.a.send(p.b.identity.public, ipv4_packet(1), p.now)
    assert p.a.peers[p.b.identity.public].timers.pending(TimerKind.SEND_INITIATION)


def test_reject_after_messages() -> None:
    p = established(Timing(reject_after_messages=3))
    # The keepalive after the handshake used counter 0.
    assert isinstance(p.a.send(p.b.identity.public, ipv4_packet(1), p.now), bytes)
    assert isinstance(p.a.send(p.b.identity.public, ipv4_packet(1), p.now), bytes)
    assert isinstance(p.a.send(p.b.identity.public, ipv4_packet(1), p.now), Queued)


def test_reject_after_time_180s() -> None:
    p = established()
    old = p.a.send(p.b.identity.public, ipv4_packet(3), p.now)
    p.now += 180.0
    assert isinstance(p.a.send(p.b.identity.public, ipv4_packet(3), p.now), Queued)
    assert p.b.receive_datagram(old, ENDPOINT_A, p.now) == [Drop(DropReason.KEY_EXPIRED)]


def test_rekey_on_receive_after_165s() -> None:
    p = established()
    p.now += 164.0
    msg = p.b.send(p.a.identity.public, ipv4_packet(3, src="198.19.2.1"), p.now)
    assert replies(p.a.receive_datagram(msg, ENDPOINT_B, p.now)) == []
    p.now += 2.0
    msg = p.b.send(p.a.identity.public, ipv4_packet(3, src="198.19.2.1"), p.now)
    out = replies(p.a.receive_datagram(msg, ENDPOINT_B, p.now))
    assert len(out) == 1 and len(out[0]) == m.MESSAGE_INITIATION_SIZE
    # Only once per keypair ("last minute" handshake).
    msg = p.b.send(p.a.identity.public, ipv4_packet(3, src="198.19.2.1"), p.now + 6)
    assert replies(p.a.receive_datagram(msg, ENDPOINT_B, p.now + 6)) == []


def test_zero_key_material_after_540s() -> None:
    p = established()
    pa = p.a.peers[p.b.identity.public]
    assert pa.timers.deadlines[TimerKind.ZERO_KEY_MATERIAL] == pytest.approx(p.now + 540.0)
    p.a.handle_timer(p.now + 539.0)
    assert pa.current is not None
    p.a.handle_timer(p.now + 540.0)
    assert pa.current is None and pa.previous is None and p.a.index_table == {}


def test_persistent_keepalive() -> None:
    p = established(keepalive=25.0)
    pa = p.a.peers[p.b.identity.public]
    assert pa.timers.deadlines[TimerKind.PERSISTENT_KEEPALIVE] == pytest.approx(p.now + 25.0)
    out = replies(p.a.handle_timer(p.now + 25.0))
    assert [len(x) for x in out] == [m.MESSAGE_KEEPALIVE_SIZE]
    assert pa.timers.deadlines[TimerKind.PERSISTENT_KEEPALIVE] == pytest.approx(p.now + 50.0)


def test_shortened_timing_rekeys_quickly() -> None:
    fast = Timing(rekey_after_time=2.0, reject_after_time=3.0, rekey_timeout=0.5, keepalive_timeout=1.0)
    p = established(fast)
    for _ in range(20):
        p.send(p.a, ipv4_packet(8))
        p.tick(0.25)
    assert len(p.completed("a")) >= 2
    assert len(p.delivered("b")) == 20 and not p.b.drops


def test_no_timers_for_idle_peer() -> None:
    a = lone_initiator(jitter=0.0)
    assert a.next_timer() is None and a.handle_timer(100.0) == []
