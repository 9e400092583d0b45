"""Device state machine driven over a fake wire: handshake both ways, data, staging, rotation, drops."""

from __future__ import annotations

from wg_helpers import ENDPOINT_A, ENDPOINT_B, PRIV_A, Pair, det_rand, ipv4_packet, make_pair

from udpflannel.codec.wireguard import messages as m
from udpflannel.codec.wireguard.events import Delivered, Drop, DropReason, HandshakeCompleted, Queued, Reply
from udpflannel.codec.wireguard.session import Device


def handshake(p: Pair) -> None:
    events = p.a.initiate(p.b.identity.public, p.now)
    assert len(events) == 1 and len(events[0].data) == m.MESSAGE_INITIATION_SIZE
    p.deliver(p.a, events)


def test_handshake_and_data_both_ways() -> None:
    p = make_pair()
    handshake(p)
    assert [c.initiator for c in p.completed("a")] == [True]
    # The initiator's keepalive confirmed the session for the responder.
    assert [c.initiator for c in p.completed("b")] == [False]
    pb = p.b.peers[p.a.identity.public]
    assert pb.current is not None and pb.next is None
    pkt = ipv4_packet(100)
    p.send(p.a, pkt)
    p.send(p.b, ipv4_packet(7, src="198.19.2.1", dst="198.19.1.1"))
    assert p.delivered("b") == [pkt]
    assert p.delivered("a") == [ipv4_packet(7, src="198.19.2.1", dst="198.19.1.1")]
    assert not p.a.drops and not p.b.drops


def test_transport_is_padded_to_16() -> None:
    p = make_pair()
    handshake(p)
    for n in (0, 1, 15, 16, 17, 100):
        pkt = ipv4_packet(n) if n else b""
        out = p.a.send(p.b.identity.public, pkt, p.now)
        assert isinstance(out, bytes)
        assert len(out) == m.transport_size(len(pkt)) and (len(out) - 32) % 16 == 0


def test_padding_capped_at_mtu() -> None:
    dev = Device(PRIV_A, rand=det_rand(b"x"), mtu=1420)
    assert dev.padded_length(1419) == 1420
    assert dev.padded_length(1420) == 1420
    assert dev.padded_length(1421) == 1420 + 16


def test_send_without_session_stages_and_flushes() -> None:
    p = make_pair()
    pkts = [ipv4_packet(i + 1) for i in range(3)]
    for pkt in pkts:
        assert isinstance(p.a.send(p.b.identity.public, pkt, p.now), Queued)
    assert p.a.next_timer() == p.now  # the initiation is due at once
    p.tick(0.0)
    assert p.delivered("b") == pkts
    assert p.completed("a") and p.completed("b")


def test_responder_stages_until_confirmed() -> None:
    p = make_pair()
    init = p.a.initiate(p.b.identity.public, p.now)
    resp = p.b.receive_datagram(init[0].data, ENDPOINT_A, p.now)
    assert isinstance(resp[0], Reply) and len(resp[0].data) == m.MESSAGE_RESPONSE_SIZE
    # B holds the new keypair as `next`: it cannot send yet.
    assert isinstance(p.b.send(p.a.identity.public, ipv4_packet(5), p.now), Queued)
    p.deliver(p.b, resp)  # A consumes, sends keepalive; B confirms and flushes the staged packet
    assert p.delivered("a") == [ipv4_packet(5)]


def test_replayed_transport_dropped() -> None:
    p = make_pair()
    handshake(p)
    out = p.a.send(p.b.identity.public, ipv4_packet(10), p.now)
    assert len(p.b.receive_datagram(out, ENDPOINT_A, p.now)) == 1
    assert p.b.receive_datagram(out, ENDPOINT_A, p.now) == [Drop(DropReason.REPLAY)]
    assert p.b.drops[DropReason.REPLAY] == 1


def test_bit_flip_and_unknown_index() -> None:
    p = make_pair()
    handshake(p)
    out = bytearray(p.a.send(p.b.identity.public, ipv4_packet(10), p.now))
    out[-1] ^= 0x80
    assert p.b.receive_datagram(bytes(out), ENDPOINT_A, p.now) == [Drop(DropReason.DECRYPT_FAILED)]
    out[4] ^= 0xFF
    assert p.b.receive_datagram(bytes(out), ENDPOINT_A, p.now) == [Drop(DropReason.UNKNOWN_INDEX)]


def test_replayed_initiation_is_stale() -> None:
    p = make_pair()
    init = p.a.initiate(p.b.identity.public, p.now)[0].data
    p.b.receive_datagram(init, ENDPOINT_A, p.now)
    p.now += 1.0
    assert p.b.receive_datagram(init, ENDPOINT_A, p.now) == [Drop(DropReason.STALE_TIMESTAMP)]


def test_initiation_flood_20ms() -> None:
    p = make_pair()
    first = p.a.initiate(p.b.identity.public, p.now)[0].data
    p.b.receive_datagram(first, ENDPOINT_A, p.now)
    # A newer initiation (later wall clock), but only 10 ms later on B's clock.
    p.a.peers[p.b.identity.public].handshake.last_sent_handshake = float("-inf")
    second = p.a.initiate(p.b.identity.public, p.now + 1.0)[0].data
    assert p.b.receive_datagram(second, ENDPOINT_A, p.now + 0.010) == [Drop(DropReason.INITIATION_FLOOD)]
    assert isinstance(p.b.receive_datagram(second, ENDPOINT_A, p.now + 0.030)[0], Reply)


def test_one_initiation_per_rekey_timeout() -> None:
    p = make_pair()
    assert len(p.a.initiate(p.b.identity.public, p.now)) == 1
    assert p.a.initiate(p.b.identity.public, p.now + 4.9) == []
    assert len(p.a.initiate(p.b.identity.public, p.now + 5.0)) == 1


def test_unknown_peer_initiation() -> None:
    p = make_pair()
    stranger = Device(bytes(range(1, 33)), rand=det_rand(b"s"))
    stranger.add_peer(p.b.identity.public, endpoint=ENDPOINT_B)
    init = stranger.initiate(p.b.identity.public, p.now)[0].data
    assert p.b.receive_datagram(init, ("198.18.0.9", 51820), p.now) == [Drop(DropReason.UNKNOWN_PEER)]


def test_psk_mismatch_fails_response() -> None:
    p = make_pair()
    p.b.peers[p.a.identity.public].handshake.preshared_key = bytes(32)
    p.deliver(p.a, p.a.initiate(p.b.identity.public, p.now))
    assert p.a.drops[DropReason.DECRYPT_FAILED] == 1
    assert not p.completed("a")


def test_no_psk_both_sides() -> None:
    p = make_pair(psk=None)
    handshake(p)
    assert p.completed("a") and p.completed("b")


def test_simultaneous_initiation_converges() -> None:
    p = make_pair()
    ia = p.a.initiate(p.b.identity.public, p.now)
    ib = p.b.initiate(p.a.identity.public, p.now)
    p.deliver(p.a, ia)
    p.deliver(p.b, ib)
    p.send(p.a, ipv4_packet(3))
    p.send(p.b, ipv4_packet(4, src="198.19.2.1"))
    assert p.delivered("b")[-1] == ipv4_packet(3)
    assert p.delivered("a")[-1] == ipv4_packet(4, src="198.19.2.1")


def test_keypair_rotation_previous_current_next() -> None:
    p = make_pair()
    handshake(p)
    pa = p.a.peers[p.b.identity.public]
    first = pa.current
    # A rekeys: previous <- first, current <- new; old packets under `first` still decrypt at B.
    old = p.a.send(p.b.identity.public, ipv4_packet(1), p.now)
    p.now += 6
    p.deliver(p.a, p.a.initiate(p.b.identity.public, p.now))
    assert pa.previous is first and pa.current is not first
    assert p.b.receive_datagram(old, ENDPOINT_A, p.now) == [Delivered(p.a.identity.public, ipv4_packet(1))]
    assert len(p.completed("a")) == 2
    # A third handshake drops the first keypair's index.
    p.now += 6
    p.deliver(p.a, p.a.initiate(p.b.identity.public, p.now))
    assert first.local_index not in p.a.index_table


def test_allowed_ips_enforced() -> None:
    p = make_pair()
    p.b.peers[p.a.identity.public].set_allowed_ips(["198.19.1.0/24"])
    handshake(p)
    p.send(p.a, ipv4_packet(5, src="198.19.1.7"))
    p.send(p.a, ipv4_packet(5, src="198.19.9.7"))
    assert len(p.delivered("b")) == 1
    assert p.b.drops[DropReason.NOT_ALLOWED_IP] == 1


def test_non_ip_payload_dropped() -> None:
    p = make_pair()
    handshake(p)
    out = p.a.send(p.b.identity.public, b"\x00" * 40, p.now)
    assert p.b.receive_datagram(out, ENDPOINT_A, p.now) == [Drop(DropReason.BAD_INNER_PACKET)]


def test_endpoint_roams_on_authenticated_packet() -> None:
    p = make_pair()
    handshake(p)
    out = p.a.send(p.b.identity.public, ipv4_packet(5), p.now)
    p.b.receive_datagram(out, ("198.18.0.77", 4000), p.now)
    assert p.b.peers[p.a.identity.public].endpoint == ("198.18.0.77", 4000)


def test_ipv6_inner_packet() -> None:
    p = make_pair()
    handshake(p)
    pkt = bytes([0x60, 0, 0, 0, 0, 8, 17, 64]) + bytes(32) + b"abcdefgh"
    p.send(p.a, pkt)
    assert p.delivered("b") == [pkt]


def test_remove_peer_forgets_indices() -> None:
    p = make_pair()
    handshake(p)
    p.a.remove_peer(p.b.identity.public)
    assert p.a.index_table == {}
    assert not any(isinstance(e, HandshakeCompleted) for e in p.a.handle_timer(p.now + 1000))


def test_under_load_cookie_round_trip() -> None:
    p = make_pair()
    p.b.force_under_load = True
    init = p.a.initiate(p.b.identity.public, p.now)
    out = p.b.receive_datagram(init[0].data, ENDPOINT_A, p.now)
    assert len(out) == 2 and len(out[0].data) == m.MESSAGE_COOKIE_REPLY_SIZE
    assert out[1] == Drop(DropReason.COOKIE_REQUIRED)
    assert p.a.receive_datagram(out[0].data, ENDPOINT_B, p.now) == []
    # The retransmission carries mac2 and completes.
    p.tick(5.0)
    assert p.completed("a") and p.completed("b")
    assert p.b.drops[DropReason.COOKIE_REQUIRED] == 1


def test_under_load_from_handshake_rate() -> None:
    p = make_pair()
    init = p.a.initiate(p.b.identity.public, p.now)[0].data
    for i in range(200):
        p.b.receive_datagram(init, ENDPOINT_A, p.now + i * 1e-4)
    assert p.b.under_load(p.now + 0.05)
    assert p.b.drops[DropReason.COOKIE_REQUIRED] > 0
    assert not p.b.under_load(p.now + 5)


def test_rate_limited_under_load_with_valid_mac2() -> None:
    p = make_pair()
    p.b.force_under_load = True
    init = p.a.initiate(p.b.identity.public, p.now)[0].data
    reply = p.b.receive_datagram(init, ENDPOINT_A, p.now)[0]
    p.a.receive_datagram(reply.data, ENDPOINT_B, p.now)
    pa = p.a.peers[p.b.identity.public]
    with_mac2 = pa.cookie.add_macs(init, p.now)
    results = [p.b.receive_datagram(with_mac2, ENDPOINT_A, p.now) for _ in range(10)]
    assert isinstance(results[0][0], Reply)  # mac2 valid: processed
    # Burst of 5 per source IP, then 20/s: the other 4 of the burst are replays, the rest are limited.
    assert p.b.drops[DropReason.STALE_TIMESTAMP] == 4
    assert p.b.drops[DropReason.RATE_LIMITED] == 5


def test_bad_cookie_reply() -> None:
    p = make_pair()
    init = p.a.initiate(p.b.identity.public, p.now)[0].data
    sender = int.from_bytes(init[4:8], "little")
    bogus = m.encode_cookie_reply(m.CookieReply(receiver=sender, nonce=bytes(24), enc_cookie=bytes(32)))
    assert p.a.receive_datagram(bogus, ENDPOINT_B, p.now) == [Drop(DropReason.BAD_COOKIE_REPLY)]
    other = m.encode_cookie_reply(m.CookieReply(receiver=sender ^ 1, nonce=bytes(24), enc_cookie=bytes(32)))
    assert p.a.receive_datagram(other, ENDPOINT_B, p.now) == [Drop(DropReason.UNKNOWN_INDEX)]


def test_stats_count_bytes() -> None:
    p = make_pair()
    handshake(p)
    p.send(p.a, ipv4_packet(100))
    pb = p.b.peers[p.a.identity.public]
    assert pb.stats.rx_bytes == m.MESSAGE_KEEPALIVE_SIZE + m.transport_size(120)
    assert pb.stats.last_handshake == p.now
