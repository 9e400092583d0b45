"""io/udp_recv: message sizes read with struct (a few messages) agree with the array path, and
append_rests makes a superpacket the sender had to cut into two UDP_SEGMENT messages one train again in
the receive buffer, and joins nothing else. Arenas are filled as recvmmsg with UDP_GRO leaves them (no
traffic here; tests/io/test_udp_io.py has the real thing)."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from udpflannel.io import linux
from udpflannel.io.mmsg import MmsgArena, encode_sockaddr
from udpflannel.io.udp import UdpSocket
from udpflannel.io.udp_recv import ARENA_SLACK, FEW_MESSAGES, append_rests

SEG = 1472  # a VXLAN datagram of a 1450-byte inner packet
PEER, OTHER = ("198.18.0.2", 8472), ("198.18.0.3", 8472)


def arena_of(messages: list[tuple[int, int, tuple[str, int]]]) -> tuple[MmsgArena, list[bytes]]:
    """Messages of (datagrams, length of the last, source): slot j holds message j's datagrams end to end,
    each byte telling which message and datagram it is. Returns the arena and each message's bytes."""
    arena = MmsgArena(len(messages), 65536 + ARENA_SLACK)
    raw = []
    for j, (k, last, src) in enumerate(messages):
        data = b"".join(bytes([j * 64 + i % 64]) * (SEG if i < k - 1 else last) for i in range(k))
        arena.data[j, : len(data)] = np.frombuffer(data, np.uint8)
        arena.names[j, :16] = np.frombuffer(encode_sockaddr(socket.AF_INET, *src)[:16], np.uint8)
        raw.append(data)
    return arena, raw


def shapes(messages: list[tuple[int, int, tuple[str, int]]]) -> tuple[list[int], list[int], list[int]]:
    total = [(k - 1) * SEG + last for k, last, _ in messages]
    seg = [SEG if k > 1 else t for (k, _, _), t in zip(messages, total, strict=True)]
    return total, seg, [k for k, _, _ in messages]


def set_message(arena: MmsgArena, j: int, length: int, gro_size: int | None, *, truncated: bool) -> None:
    """Message j's length, MSG_TRUNC flag and UDP_GRO cmsg (none when gro_size is None), as recvmmsg
    sets them."""
    arena.hdrs["len"][j] = length
    arena.hdrs["flags"][j] = linux.MSG_TRUNC if truncated else 0
    arena.hdrs["controllen"][j] = 0 if gro_size is None else 24
    if gro_size is not None:
        gro = np.array([linux.SOL_UDP, linux.UDP_GRO, gro_size], "<i4")
        cmsg = np.array([20], "<u8").tobytes() + gro.tobytes()
        arena.control[j, :20] = np.frombuffer(cmsg, np.uint8)


@pytest.mark.parametrize("gro", [True, False])
def test_message_sizes_with_struct_and_with_arrays_agree(gro: bool) -> None:
    kinds = [
        (44 * SEG, SEG, False),  # a train
        (2 * SEG + 700, SEG, False),  # a train with a short last datagram
        (900, None, False),  # one datagram, no cmsg
        (SEG, SEG, False),  # a cmsg whose size is the whole message: one datagram
        (65536, SEG, True),  # truncated: empty
        (0, None, False),  # an empty datagram
    ]
    arena = MmsgArena(FEW_MESSAGES, 65536 + ARENA_SLACK)
    for j in range(FEW_MESSAGES):
        length, gro_size, truncated = kinds[j % len(kinds)]
        set_message(arena, j, length, gro_size, truncated=truncated)
    # No socket: only the parsing of what a receive left in the arena is tested.
    rx = UdpSocket(None, socket.AF_INET, False, gro, 128, 65507, 64, 0)  # type: ignore[arg-type]
    few = rx.message_shape_lists(arena, FEW_MESSAGES)
    truncated = rx.stats.truncated
    arrays = rx.message_shapes(arena, FEW_MESSAGES)
    assert few == tuple(a.tolist() for a in arrays)
    assert truncated == rx.stats.truncated - truncated == FEW_MESSAGES // len(kinds)
    total, seg, counts = few
    assert (total[0], seg[0], counts[0]) == ((44 * SEG, SEG, 44) if gro else (44 * SEG, 44 * SEG, 1))
    assert (total[4], counts[4], total[5], counts[5]) == (0, 0, 0, 0)


def test_a_superpacket_in_two_messages_is_one_train() -> None:
    msgs = [(44, SEG, PEER), (2, 700, PEER), (44, SEG, PEER), (3, SEG, PEER)]
    arena, raw = arena_of(msgs)
    total, seg, counts = shapes(msgs)
    assert append_rests(arena, total, seg, counts) == 2
    assert counts == [46, 0, 47, 0] and total == [45 * SEG + 700, 0, 47 * SEG, 0] and seg[0] == seg[2] == SEG
    assert arena.data[0, : total[0]].tobytes() == raw[0] + raw[1]
    assert arena.data[2, : total[2]].tobytes() == raw[2] + raw[3]


def test_a_one_datagram_rest_is_appended_too() -> None:
    msgs = [(44, SEG, PEER), (1, 900, PEER)]  # no UDP_GRO cmsg: one datagram, its length its size
    arena, raw = arena_of(msgs)
    total, seg, counts = shapes(msgs)
    assert append_rests(arena, total, seg, counts) == 1
    assert counts == [45, 0] and arena.data[0, : total[0]].tobytes() == raw[0] + raw[1]


@pytest.mark.parametrize(
    "msgs",
    [
        [(20, SEG, PEER), (2, SEG, PEER)],  # the first was not cut at the send limit
        [(44, 1000, PEER), (2, SEG, PEER)],  # the first ends short: its superpacket ended there
        [(44, SEG, PEER), (2, SEG, OTHER)],  # another sender
        [(44, SEG, PEER), (0, 0, PEER), (2, SEG, PEER)],  # something lost between (a truncated message)
        [(2, SEG, PEER), (44, SEG, PEER)],  # a rest first (its lead came in the receive before)
    ],
    ids=["not-cut", "short-last", "other-source", "gap", "rest-first"],
)
def test_what_is_not_a_rest_stays_apart(msgs: list[tuple[int, int, tuple[str, int]]]) -> None:
    arena, raw = arena_of(msgs)
    total, seg, counts = shapes(msgs)
    before = (list(total), list(counts))
    assert append_rests(arena, total, seg, counts) == 0
    assert (total, counts) == before
    for j, data in enumerate(raw):
        assert arena.data[j, : len(data)].tobytes() == data


def test_bigger_datagrams_or_no_room_stay_apart() -> None:
    msgs = [(44, SEG, PEER), (2, SEG, PEER)]
    arena, _ = arena_of(msgs)
    total, seg, counts = shapes(msgs)
    seg[1] = SEG + 8  # the second message's datagrams are larger: not the same superpacket's
    assert append_rests(arena, total, seg, counts) == 0
    small = MmsgArena(2, 44 * SEG + 100)  # a slot with no room for the rest
    total, seg, counts = shapes(msgs)
    assert append_rests(small, total, seg, counts) == 0
