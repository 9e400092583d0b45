"""Layouts and sizes of the four message types (spec/wireguard.md, Messages)."""

from __future__ import annotations

import pytest

from udpflannel.codec.wireguard import messages as m


def test_sizes_follow_offsets() -> None:
    assert m.INIT_OFFSET_MAC2 + m.MAC_SIZE == m.MESSAGE_INITIATION_SIZE == 148
    assert m.RESP_OFFSET_MAC2 + m.MAC_SIZE == m.MESSAGE_RESPONSE_SIZE == 92
    assert m.COOKIE_OFFSET_COOKIE + 32 == m.MESSAGE_COOKIE_REPLY_SIZE == 64
    assert m.MESSAGE_TRANSPORT_SIZE == 32 and m.MESSAGE_TRANSPORT_OFFSET_CONTENT == 16


def test_initiation_round_trip() -> None:
    msg = m.Initiation(7, b"e" * 32, b"s" * 48, b"t" * 28, b"1" * 16, b"2" * 16)
    data = m.encode_initiation(msg)
    assert len(data) == 148 and data[:4] == b"\x01\x00\x00\x00" and data[4:8] == (7).to_bytes(4, "little")
    assert data[m.INIT_OFFSET_TIMESTAMP : m.INIT_OFFSET_MAC1] == b"t" * 28
    assert m.decode_initiation(data) == msg
    assert m.decode_initiation(data[:-1]) is None
    assert m.decode_initiation(data + b"\x00") is None


def test_response_round_trip() -> None:
    msg = m.Response(1, 2, b"e" * 32, b"x" * 16, b"1" * 16, b"2" * 16)
    data = m.encode_response(msg)
    assert len(data) == 92 and data[8:12] == (2).to_bytes(4, "little")
    assert m.decode_response(data) == msg
    assert m.decode_response(data[:91]) is None


def test_cookie_reply_round_trip() -> None:
    msg = m.CookieReply(9, b"n" * 24, b"c" * 32)
    data = m.encode_cookie_reply(msg)
    assert len(data) == 64 and m.decode_cookie_reply(data) == msg


def test_transport_header() -> None:
    hdr = m.encode_transport_header(0x01020304, 5)
    assert hdr == b"\x04\x00\x00\x00\x04\x03\x02\x01\x05" + bytes(7)
    buf = bytearray(40)
    m.pack_transport_header_into(buf, 4, 0x01020304, 5)
    assert bytes(buf[4:20]) == hdr
    assert m.decode_transport_header(hdr + bytes(16)) == m.TransportHeader(0x01020304, 5)
    assert m.decode_transport_header(hdr + bytes(15)) is None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", None),
        (b"\x01\x00\x00", None),
        (b"\x01\x00\x00\x00", 1),
        (b"\x04\x00\x01\x00", None),
        (b"\x09\0\0\0", 9),
    ],
)
def test_message_type(data: bytes, expected: int | None) -> None:
    assert m.message_type(data) == expected


def test_padding() -> None:
    assert [m.padded_length(n) for n in (0, 1, 16, 17, 1420)] == [0, 16, 16, 32, 1424]
    assert m.transport_size(0) == 32 and m.transport_size(84) == 128
