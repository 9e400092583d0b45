"""Batch seal/open: same bytes as the per-packet path, counters per batch, in-place decryption, drops."""

from __future__ import annotations

from wg_helpers import ENDPOINT_A, Pair, ipv4_packet, make_pair

from udpflannel.codec.wireguard import messages as m
from udpflannel.codec.wireguard.batch import SealedBatch, open_batch, seal_batch, sealed_size
from udpflannel.codec.wireguard.events import Delivered, DropReason, Queued


def established() -> Pair:
    p = make_pair()
    p.deliver(p.a, p.a.initiate(p.b.identity.public, p.now))
    return p


def test_seal_batch_matches_per_packet_bytes() -> None:
    p1, p2 = established(), established()
    segs = [ipv4_packet(n) for n in (100, 100, 100, 37)]
    out = bytearray(sealed_size(p1.a, [len(s) for s in segs]) + 8)
    res = seal_batch(p1.a, p1.b.identity.public, segs, out, p1.now, offset=8)
    assert isinstance(res, SealedBatch) and res.offset == 8
    singles = [p2.a.send(p2.b.identity.public, s, p2.now) for s in segs]
    assert res.sizes == [len(x) for x in singles]
    assert bytes(out[8:]) == b"".join(singles)
    assert res.endpoint == ("198.18.0.2", 51820)
    # Equal plaintexts give equal sizes (UDP GSO needs all but the last segment equal).
    assert res.sizes[0] == res.sizes[1] == res.sizes[2] == m.transport_size(120)


def test_open_batch_in_place_with_drops() -> None:
    p = established()
    segs = [ipv4_packet(n, fill=n) for n in (10, 20, 30)]
    out = bytearray(sealed_size(p.a, [len(s) for s in segs]))
    res = seal_batch(p.a, p.b.identity.public, segs, out, p.now)
    views, pos = [], 0
    for size in res.sizes:
        views.append(memoryview(bytearray(out[pos : pos + size])))
        pos += size
    replay = memoryview(bytearray(views[0]))
    flipped = bytearray(views[1])
    flipped[-1] ^= 1
    garbage = memoryview(bytearray(b"\x07\x00\x00\x00" + bytes(40)))
    batch = open_batch(p.b, [*views, replay, memoryview(flipped), garbage], ENDPOINT_A, p.now)
    assert [bytes(v) for _, v in batch.delivered] == segs
    assert all(k == p.a.identity.public for k, _ in batch.delivered)
    assert p.b.drops[DropReason.REPLAY] == 1
    assert p.b.drops[DropReason.DECRYPT_FAILED] == 1
    assert p.b.drops[DropReason.BAD_HEADER] == 1
    # The delivered views alias the input buffers (no copy).
    assert batch.delivered[0][1].obj is views[0].obj


def test_open_batch_confirms_responder_session() -> None:
    p = make_pair()
    init = p.a.initiate(p.b.identity.public, p.now)
    resp = p.b.receive_datagram(init[0].data, ENDPOINT_A, p.now)
    keepalive = p.a.receive_datagram(resp[0].data, ("198.18.0.2", 51820), p.now)[-1].data
    batch = open_batch(p.b, [memoryview(bytearray(keepalive))], ENDPOINT_A, p.now)
    assert batch.delivered == []
    assert any(type(e).__name__ == "HandshakeCompleted" for e in batch.events)
    assert p.b.peers[p.a.identity.public].current is not None


def test_open_batch_passes_handshakes_through() -> None:
    p = make_pair()
    init = p.a.initiate(p.b.identity.public, p.now)[0].data
    batch = open_batch(p.b, [memoryview(bytearray(init))], ENDPOINT_A, p.now)
    assert len(batch.events) == 1 and len(batch.events[0].data) == m.MESSAGE_RESPONSE_SIZE


def test_seal_batch_without_session_stages() -> None:
    p = make_pair()
    segs = [ipv4_packet(5), ipv4_packet(6)]
    assert isinstance(seal_batch(p.a, p.b.identity.public, segs, bytearray(1000), p.now), Queued)
    p.tick(0.0)
    assert p.delivered("b") == segs


def test_seal_batch_too_small_buffer() -> None:
    p = established()
    res = seal_batch(p.a, p.b.identity.public, [ipv4_packet(100)], bytearray(50), p.now)
    assert res.reason is DropReason.TOO_BIG and p.a.drops[DropReason.TOO_BIG] == 1


def test_counters_per_batch_continue_single_path() -> None:
    p = established()
    segs = [ipv4_packet(8)] * 5
    out = bytearray(sealed_size(p.a, [len(s) for s in segs]))
    seal_batch(p.a, p.b.identity.public, segs, out, p.now)
    single = p.a.send(p.b.identity.public, ipv4_packet(8), p.now)
    # Keepalive used 0, the batch 1..5, so the next single message is counter 6.
    assert m.decode_transport_header(single).counter == 6
    assert p.b.receive_datagram(single, ENDPOINT_A, p.now) == [Delivered(p.a.identity.public, ipv4_packet(8))]


def test_fallback_without_encrypt_into(monkeypatch) -> None:
    # cryptography before 44 has no encrypt_into/decrypt_into: the copying path must give the same bytes.
    from udpflannel.codec.wireguard import batch as batch_mod

    p1, p2 = established(), established()
    segs = [ipv4_packet(64), ipv4_packet(65), b""]  # the last is a keepalive
    fast = bytearray(sealed_size(p1.a, [len(s) for s in segs]))
    seal_batch(p1.a, p1.b.identity.public, segs, fast, p1.now)
    monkeypatch.setattr(batch_mod, "_HAVE_INTO", False)
    slow = bytearray(len(fast))
    res = seal_batch(p2.a, p2.b.identity.public, segs, slow, p2.now)
    assert slow == fast
    views, pos = [], 0
    for size in res.sizes:
        views.append(memoryview(bytearray(slow[pos : pos + size])))
        pos += size
    opened = open_batch(p2.b, views, ENDPOINT_A, p2.now)
    assert [bytes(v) for _, v in opened.delivered] == segs[:2]


def test_batch_never_runs_past_reject_after_messages() -> None:
    from udpflannel.codec.wireguard.timers import Timing

    p = make_pair(Timing(reject_after_messages=4))
    p.deliver(p.a, p.a.initiate(p.b.identity.public, p.now))  # the keepalive used counter 0
    out = bytearray(4096)
    assert isinstance(seal_batch(p.a, p.b.identity.public, [ipv4_packet(1)] * 4, out, p.now), Queued)
    res = seal_batch(p.a, p.b.identity.public, [ipv4_packet(1)] * 3, out, p.now)
    assert isinstance(res, SealedBatch) and len(res.sizes) == 3  # counters 1..3, the last usable ones
