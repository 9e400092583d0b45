"""coalesce_udp: datagrams of one UDP flow become one USO superpacket whose split (the kernel's, here the
per-packet oracle's) gives back exactly those datagrams, with the checksum field holding what the kernel
expects (the folded pseudo-header sum with the full UDP length); anything that is not one flow by the
kernel's UDP GRO rules stays apart."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packet_builders import DST4, DST6, SRC4, SRC6, payload_bytes
from packet_builders import VXLAN_PREFIX as PREFIX
from packet_builders import received_train as train
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from udpflannel.packet import headers as h
from udpflannel.packet import reference
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.gro import coalesce
from udpflannel.packet.gro_udp import UDP_MAX_SEGMENTS, coalesce_udp, udp_run
from udpflannel.packet.parse import ip_fields, validate_ip
from udpflannel.packet.vnet import VIRTIO_NET_HDR_GSO_UDP_L4, VnetHdr

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def datagrams(v6: bool, sizes: list[int], id0: int = 7, ttl: int = 64, seed: int = 0) -> list[bytes]:
    """One flow's datagrams as a sender's kernel numbers them (IPv4 ids id0, id0 + 1, ...)."""
    out = []
    for i, size in enumerate(sizes):
        l3 = (
            IPv6(src=SRC6, dst=DST6, hlim=ttl)
            if v6
            else IP(src=SRC4, dst=DST4, id=(id0 + i) & 0xFFFF, ttl=ttl)
        )
        out.append(bytes(l3 / UDP(sport=40000, dport=5201) / payload_bytes(seed + i, size)))
    return out


def merged(pkts: list[bytes]) -> memoryview | None:
    batch = PacketBatch.from_packets(pkts, headroom=16)
    codes = validate_ip(batch, l4_checksum=True)
    assert not codes.any()
    return coalesce_udp(batch, codes == 0, ip_fields(batch))


@given(
    v6=st.booleans(),
    size=st.integers(1, 1400),
    k=st.integers(2, UDP_MAX_SEGMENTS),
    short=st.integers(0, 1399),
    id0=st.integers(0, 0xFFFF),
)
@SETTINGS
def test_one_flow_is_one_superpacket_that_splits_back(v6: bool, size: int, k: int, short: int, id0: int):
    k = min(k, 60000 // (size + 48))
    if k < 2:
        return
    pkts = datagrams(v6, [size] * (k - 1) + [max(1, size - short)], id0=id0)
    run = merged(pkts)
    assert run is not None
    raw = bytes(run)
    vh = VnetHdr.decode(raw[:10])
    l3 = 40 if v6 else 20
    assert (vh.gso_type, vh.gso_size, vh.csum_start, vh.csum_offset) == (
        VIRTIO_NET_HDR_GSO_UDP_L4,
        size,
        l3,
        6,
    )
    assert reference.split(raw[10:], vh) == pkts
    udp_len = len(raw) - 10 - l3
    field = struct.unpack_from("!H", raw, 10 + l3 + h.UDP_CSUM)[0]
    assert field == reference.pseudo_header(raw[10:], h.IPPROTO_UDP, udp_len)


def odd_one(dport: int = 5201, ttl: int = 64, size: int = 300, mf: bool = False, tcp: bool = False) -> bytes:
    """A datagram to put among the flow's: another port, TTL or size, a fragment, or TCP."""
    l4 = TCP(sport=40000, dport=dport) if tcp else UDP(sport=40000, dport=dport)
    return bytes(IP(src=SRC4, dst=DST4, id=9, ttl=ttl, flags="MF" if mf else 0) / l4 / payload_bytes(2, size))


@pytest.mark.parametrize("flaw", ["port", "ttl", "longer", "shorter-middle", "tcp", "fragment", "udp-length"])
def test_anything_but_one_flow_stays_apart(flaw: str) -> None:
    pkts = datagrams(False, [300] * 5)
    mid = {
        "port": lambda: odd_one(dport=5202),
        "ttl": lambda: odd_one(ttl=63),
        "longer": lambda: odd_one(size=301),
        "shorter-middle": lambda: odd_one(size=299),
        "tcp": lambda: odd_one(tcp=True, size=288),
        "fragment": lambda: odd_one(mf=True),
        "udp-length": lambda: pkts[2],
    }[flaw]()
    if flaw == "udp-length":  # a UDP length short of the datagram (trailing bytes a socket would cut off)
        m = bytearray(mid)
        struct.pack_into("!HH", m, 20 + h.UDP_LEN, 300, 0)  # IPv4 without checksum: only the length is off
        mid = bytes(m)
    pkts[2] = mid
    assert merged(pkts) is None
    batch = PacketBatch.from_packets(pkts, headroom=16)
    assert len(coalesce(batch, validate_ip(batch, l4_checksum=True), uso=True)) == len(pkts)


def test_coalesce_merges_only_with_uso() -> None:
    pkts = datagrams(True, [64] * 20)
    for uso, count in ((True, 1), (False, 20)):
        batch = PacketBatch.from_packets(pkts, headroom=16)
        assert len(coalesce(batch, validate_ip(batch, l4_checksum=True), uso=uso)) == count


@given(
    v6=st.booleans(),
    k=st.integers(2, 12),
    row=st.integers(0, 11),
    at=st.integers(0, 47),
    xor=st.integers(1, 255),
)
@SETTINGS
def test_a_changed_header_byte_never_raises_and_never_hides(v6: bool, k: int, row: int, at: int, xor: int):
    """One header byte of one datagram changed (no checksum fixed): coalesce with USO never raises; what it
    writes holds exactly the datagrams validate_ip kept, merged only when they are still one flow."""
    pkts = [bytearray(p) for p in datagrams(v6, [200] * k)]
    target = pkts[row % k]
    target[at % len(target)] ^= xor
    batch = PacketBatch.from_packets([bytes(p) for p in pkts], headroom=16)
    codes = validate_ip(batch, l4_checksum=True)
    writes = coalesce(batch, codes, uso=True)
    kept = int((codes == 0).sum())
    if len(writes) == 1 and kept > 1:
        raw = b"".join(bytes(x) for x in writes[0])
        vh = VnetHdr.decode(raw[:10])
        assert vh.gso_type == VIRTIO_NET_HDR_GSO_UDP_L4
        assert len(reference.split(raw[10:], vh)) == kept
    else:
        assert len(writes) == kept


# udp_run: a receive train's rows (a prefix such as VXLAN + inner Ethernet, then the datagram) checked
# and merged in one pass; its write must be coalesce_udp's for the same datagrams, or None.
@given(
    v6=st.booleans(),
    size=st.integers(1, 1400),
    k=st.integers(2, UDP_MAX_SEGMENTS),
    short=st.integers(0, 1399),
    packed=st.booleans(),
    bare=st.booleans(),
)
@SETTINGS
def test_udp_run_writes_what_coalesce_udp_writes(
    v6: bool, size: int, k: int, short: int, packed: bool, bare: bool
):
    k = min(k, 60000 // (size + 48))
    if k < 2:
        return
    pkts = datagrams(v6, [size] * (k - 1) + [max(1, size - short)])
    prefix = b"" if bare else PREFIX
    run = udp_run(train(pkts, prefix, packed=packed), len(prefix))
    assert run is not None
    assert bytes(run) == bytes(merged(pkts))


def flawed(flaw: str) -> tuple[list[bytes], list[bytes]]:
    """A flow's five datagrams with one flaw, and the prefixes of their rows."""
    pkts = datagrams(False, [300] * 5)
    prefixes = [PREFIX] * 5
    where = 4 if flaw.endswith("-last") else 2
    kind = flaw.removesuffix("-last")
    p = bytearray(pkts[where])
    if kind == "udp-checksum":
        p[-1] ^= 1
    elif kind == "ip-checksum":
        p[h.IPV4_TTL] ^= 1  # TTL changed, header checksum not fixed
    elif kind == "zero-checksum":
        struct.pack_into("!H", p, 20 + h.UDP_CSUM, 0)  # "not computed": sound, but the general path's
    elif kind == "prefix":
        prefixes[where] = PREFIX[:-3] + b"\0" + PREFIX[-2:]
    elif kind == "port":
        p = bytearray(odd_one(dport=5202))
    elif kind == "ttl":
        p = bytearray(odd_one(ttl=63))
    elif kind == "longer":
        p = bytearray(odd_one(size=301))
    elif kind == "fragment":
        p = bytearray(odd_one(mf=True))
    elif kind == "tcp":
        p = bytearray(odd_one(tcp=True, size=288))
    pkts[where] = bytes(p)
    return pkts, prefixes


@pytest.mark.parametrize(
    "flaw",
    [
        f"{kind}{end}"
        for kind in (
            "udp-checksum",
            "ip-checksum",
            "zero-checksum",
            "prefix",
            "port",
            "ttl",
            "longer",
            "fragment",
            "tcp",
        )
        for end in ("", "-last")
    ],
)
def test_udp_run_refuses_anything_but_one_sound_flow(flaw: str) -> None:
    pkts, prefixes = flawed(flaw)
    rows = [a + b for a, b in zip(prefixes, pkts, strict=True)]
    assert udp_run(PacketBatch.from_packets(rows), len(PREFIX)) is None


def test_udp_run_refuses_options_single_rows_and_too_many() -> None:
    assert udp_run(train(datagrams(False, [100])), len(PREFIX)) is None
    assert udp_run(train(datagrams(False, [20] * (UDP_MAX_SEGMENTS + 1))), len(PREFIX)) is None
    ip = [IP(src=SRC4, dst=DST4, id=i, options=b"\x01\x01\x01\x00") for i in range(3)]
    opts = [bytes(x / UDP() / (b"x" * 40)) for x in ip]
    assert udp_run(train(opts), len(PREFIX)) is None


@given(
    v6=st.booleans(),
    k=st.integers(2, 12),
    row=st.integers(0, 11),
    at=st.integers(0, 80),
    xor=st.integers(1, 255),
)
@SETTINGS
def test_udp_run_never_hides_a_changed_byte(v6: bool, k: int, row: int, at: int, xor: int):
    """One byte of one row changed (prefix, headers or payload; no checksum fixed): udp_run refuses the
    train, or writes exactly what the general path would (the change kept it one sound flow)."""
    pkts = datagrams(v6, [60] * k)
    rows = [bytearray(PREFIX + p) for p in pkts]
    rows[row % k][at % len(rows[row % k])] ^= xor
    run = udp_run(PacketBatch.from_packets([bytes(r) for r in rows]), len(PREFIX))
    if run is None:
        return
    assert all(bytes(r[: len(PREFIX)]) == PREFIX for r in rows)
    inner = [bytes(r[len(PREFIX) :]) for r in rows]
    assert bytes(run) == bytes(merged(inner))
