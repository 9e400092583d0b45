"""gso_many against gso.split_superpacket: several superpackets split together give, for each, the very
bytes split_superpacket(packed=True) gives for it alone; anything it cannot take together it leaves."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packet_builders import TCP_OPTIONS, Super, build_tcp, build_udp, payload_bytes

from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.gso import packed_payload, split_superpacket
from udpflannel.packet.gso_many import split_many
from udpflannel.packet.vnet import VNET_HDR_DTYPE

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAD = 22


def tun_batch(sps: list[Super]) -> tuple[PacketBatch, np.ndarray]:
    """The superpackets as one TUN read batch (headroom 64), with their virtio headers."""
    batch = PacketBatch.from_packets([sp.raw for sp in sps], headroom=64)
    headers = np.frombuffer(b"".join(sp.vh.encode() for sp in sps), VNET_HDR_DTYPE).copy()
    return batch, headers


def alone(sp: Super) -> list[bytes]:
    return split_superpacket(sp.raw, sp.vh, HEAD, packed=True).packets()


@st.composite
def flows(draw: st.DrawFn) -> list[Super]:
    v6 = draw(st.booleans())
    mss = draw(st.integers(256, 9000))
    options = draw(st.sampled_from(TCP_OPTIONS))
    out = []
    # Equal superpackets (what a sender that is behind mostly reads) or of any lengths.
    same = draw(st.integers(1, min(63000, mss * 60))) if draw(st.booleans()) else None
    for _ in range(draw(st.integers(2, 6))):
        n = same or draw(st.integers(1, min(63000, mss * 60)))
        out.append(
            build_tcp(
                v6=v6,
                payload=payload_bytes(draw(st.integers(0, 2**32 - 1)), n),
                mss=mss,
                seq=draw(st.integers(0, 2**32 - 1)),
                flags=draw(st.sampled_from(["A", "PA", "FA", "CA", "CPA", "EA"])),
                options=options,
                ip_id=draw(st.integers(0, 0xFFFF)),
                window=draw(st.integers(0, 0xFFFF)),
            )
        )
    return out


@given(sps=flows())
@SETTINGS
def test_each_superpacket_splits_as_alone(sps: list[Super]) -> None:
    batch, headers = tun_batch(sps)
    many = split_many(batch, headers, np.arange(len(sps)), HEAD)
    assert many is not None and len(many) == len(sps)
    flat = many.whole.buf.reshape(-1)
    for segs, sp, (at, size) in zip(many.parts(), sps, many.spans(), strict=True):
        assert segs.packets() == alone(sp)
        # packed: datagram i + 1 starts right after datagram i's row of headroom + segment
        assert len(packed_payload(segs)) == (segs.n - 1) * segs.stride + HEAD + int(segs.lengths[-1])
        assert segs.offset == HEAD and segs.stride == HEAD + sp.vh.hdr_len + sp.vh.gso_size
        assert bytes(flat[at : at + size]) == bytes(packed_payload(segs))  # its span of the whole buffer


def test_equal_superpackets_apart_in_the_read_split_as_alone() -> None:
    """Equal superpackets that are not consecutive rows of the read (a plain packet between them)."""
    sps = [build_tcp(v6=False, payload=payload_bytes(i, 9500), mss=1000, seq=77 * i) for i in range(4)]
    batch, headers = tun_batch(sps)
    rows = np.array([0, 2, 3])
    many = split_many(batch, headers, rows, HEAD)
    assert many is not None
    assert [s.packets() for s in many.parts()] == [alone(sps[i]) for i in rows.tolist()]


def test_ip_id_wraps_inside_a_superpacket() -> None:
    sps = [build_tcp(v6=False, payload=payload_bytes(i, 9000), mss=1000, ip_id=0xFFFC + i) for i in range(2)]
    batch, headers = tun_batch(sps)
    many = split_many(batch, headers, np.arange(2), HEAD)
    assert many is not None
    assert [s.packets() for s in many.parts()] == [alone(sp) for sp in sps]


def test_different_shapes_are_left_to_the_caller() -> None:
    a = build_tcp(v6=False, payload=payload_bytes(1, 5000), mss=1000)
    cases = [
        [a, build_tcp(v6=False, payload=payload_bytes(2, 5000), mss=900)],  # gso_size
        [a, build_tcp(v6=True, payload=payload_bytes(2, 5000), mss=1000)],  # IP version
        [a, build_tcp(v6=False, payload=payload_bytes(2, 5000), mss=1000, options=TCP_OPTIONS[1])],
        [a, build_udp(v6=False, payload=payload_bytes(2, 5000), mss=1000)],  # USO
    ]
    for sps in cases:
        batch, headers = tun_batch(sps)
        assert split_many(batch, headers, np.arange(2), HEAD) is None
