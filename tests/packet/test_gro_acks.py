"""ack_run: a train of pure ACKs is written a row at a time exactly as the general path (validate_ip, then
coalesce) writes it, and any train that is not sound pure ACKs of one flow is refused, untouched."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packet_builders import DST4, DST6, SRC4, SRC6
from packet_builders import VXLAN_PREFIX as PREFIX
from packet_builders import received_train as train
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from udpflannel.packet import headers as h
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.gro import coalesce
from udpflannel.packet.gro_acks import ack_run
from udpflannel.packet.parse import ip_fields, validate_ip

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STAMPS = [("NOP", None), ("NOP", None), ("Timestamp", (123456, 654321))]


def acks(v6: bool, k: int, *, seed: int = 0, stamps: bool = True, flags: str = "A") -> list[bytes]:
    """k pure ACKs of one flow as a receiver's kernel sends them: ACK number, window and timestamps move."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(k):
        ip = IPv6(src=SRC6, dst=DST6) if v6 else IP(src=SRC4, dst=DST4, id=(seed + i) & 0xFFFF, flags="DF")
        opts = [("NOP", None), ("NOP", None), ("Timestamp", (1000 + i, int(rng.integers(1 << 32))))]
        tcp = TCP(
            sport=5201,
            dport=40000,
            flags=flags if i == k - 1 else "A",
            seq=77,
            ack=int(rng.integers(1 << 32)),
            window=int(rng.integers(1 << 16)),
            options=opts if stamps else [],
        )
        out.append(bytes(ip / tcp))
    return out


def joined(writes) -> list[bytes]:
    return [b"".join(bytes(part) for part in w) for w in writes]


def general(pkts: list[bytes]) -> list[bytes]:
    """What the general path writes for these packets."""
    batch = PacketBatch.from_packets(pkts, headroom=16)
    fields = ip_fields(batch)
    codes = validate_ip(batch, l4_checksum=True, fields=fields)
    assert not codes.any()
    return joined(coalesce(batch, codes, vnet=True, fields=fields))


@given(
    v6=st.booleans(),
    k=st.integers(2, 64),
    seed=st.integers(0, 1000),
    packed=st.booleans(),
    bare=st.booleans(),
    fin=st.booleans(),
)
@SETTINGS
def test_ack_run_writes_what_the_general_path_writes(
    v6: bool, k: int, seed: int, packed: bool, bare: bool, fin: bool
):
    pkts = acks(v6, k, seed=seed, flags="FA" if fin else "A")
    prefix = b"" if bare else PREFIX
    writes = ack_run(train(pkts, prefix, packed=packed), len(prefix))
    assert writes is not None and len(writes) == k
    assert joined(writes) == general(pkts)
    assert all(w[:10] == bytes(10) for w in joined(writes))


def test_a_shorter_last_row_is_judged_alone() -> None:
    pkts = acks(False, 5) + acks(False, 1, stamps=False, seed=9)
    writes = ack_run(train(pkts, packed=False), len(PREFIX))
    assert writes is not None and joined(writes) == general(pkts)


def flawed(flaw: str) -> tuple[list[bytes], list[bytes]]:
    """Five ACKs of a flow with one flaw, and the prefixes of their rows."""
    pkts = acks(False, 5)
    prefixes = [PREFIX] * 5
    where = 4 if flaw.endswith("-last") else 2
    kind = flaw.removesuffix("-last")
    p = bytearray(pkts[where])
    if kind == "tcp-checksum":
        p[-1] ^= 1
    elif kind == "ip-checksum":
        p[h.IPV4_TTL] ^= 1  # TTL changed, header checksum not fixed
    elif kind == "prefix":
        prefixes[where] = PREFIX[:-3] + b"\0" + PREFIX[-2:]
    elif kind == "port":
        p = bytearray(bytes(IP(src=SRC4, dst=DST4, flags="DF") / TCP(sport=5202, options=STAMPS)))
    elif kind == "data":  # a segment with payload: the general path may merge it
        p = bytearray(bytes(IP(src=SRC4, dst=DST4) / TCP(sport=5201, options=STAMPS[:2]) / b"ab"))
    elif kind == "fragment":
        p = bytearray(bytes(IP(src=SRC4, dst=DST4, flags="MF") / TCP(sport=5201, options=STAMPS)))
    elif kind == "udp":
        p = bytearray(bytes(IP(src=SRC4, dst=DST4) / UDP(sport=5201) / bytes(24)))
    elif kind == "truncated":  # the IP length says more than the row holds
        p[h.IPV4_TOTAL_LEN + 1] += 4
    pkts[where] = bytes(p)
    return pkts, prefixes


UNSOUND = ("tcp-checksum", "ip-checksum", "prefix", "truncated")
OTHER = ("port", "data", "fragment", "udp")  # sound packets, but not one more ACK of the flow


@pytest.mark.parametrize("flaw", [*UNSOUND, *OTHER, *(f"{k}-last" for k in UNSOUND)])
def test_ack_run_refuses_anything_but_sound_pure_acks(flaw: str) -> None:
    pkts, prefixes = flawed(flaw)
    rows = [a + b for a, b in zip(prefixes, pkts, strict=True)]
    batch = PacketBatch.from_packets(rows)
    before = batch.buf.copy()
    assert ack_run(batch, len(PREFIX)) is None
    assert np.array_equal(batch.buf, before)  # nothing written in place


@pytest.mark.parametrize("other", OTHER)
def test_a_sound_last_row_of_another_kind_is_written_as_the_general_path_writes_it(other: str) -> None:
    """The last row is written on its own either way: it only has to be sound."""
    pkts, _ = flawed(f"{other}-last")
    writes = ack_run(PacketBatch.from_packets([PREFIX + p for p in pkts]), len(PREFIX))
    assert writes is not None and joined(writes) == general(pkts)


def test_ack_run_refuses_single_rows_options_and_data_trains() -> None:
    assert ack_run(train(acks(False, 1)), len(PREFIX)) is None
    opts = [bytes(IP(src=SRC4, dst=DST4, id=i, options=b"\x01\x01\x01\x00") / TCP()) for i in range(3)]
    assert ack_run(train(opts), len(PREFIX)) is None
    data = [bytes(IP(src=SRC4, dst=DST4) / TCP(seq=100 * i) / bytes(100)) for i in range(3)]
    assert ack_run(train(data), len(PREFIX)) is None


@given(
    v6=st.booleans(),
    k=st.integers(2, 12),
    row=st.integers(0, 11),
    at=st.integers(0, 100),
    xor=st.integers(1, 255),
)
@SETTINGS
def test_ack_run_never_hides_a_changed_byte(v6: bool, k: int, row: int, at: int, xor: int):
    """One byte of one row changed (prefix or headers; no checksum fixed): ack_run refuses the train, or
    writes exactly what the general path would (the change left every row a sound ACK of the flow)."""
    pkts = acks(v6, k)
    rows = [bytearray(PREFIX + p) for p in pkts]
    rows[row % k][at % len(rows[row % k])] ^= xor
    writes = ack_run(PacketBatch.from_packets([bytes(r) for r in rows]), len(PREFIX))
    if writes is None:
        return
    assert all(bytes(r[: len(PREFIX)]) == PREFIX for r in rows)
    assert joined(writes) == general([bytes(r[len(PREFIX) :]) for r in rows])
