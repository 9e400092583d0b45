"""Golden capture from two real wireguard-go instances (shared/testdata/wireguard-go-session.*).

Ephemeral private keys are not in the capture, so transport data cannot be decrypted; what can be checked is
checked: consuming the initiation as B, mac1 of both handshake messages, and every message's layout.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path

import pytest

from udpflannel.codec.wireguard import crypto, noise
from udpflannel.codec.wireguard import messages as m
from udpflannel.codec.wireguard.cookie import CookieChecker
from udpflannel.codec.wireguard.events import DropReason

TESTDATA = Path(os.environ["UDPFLANNEL_TESTDATA"])  # set by tests/conftest.py


def _testdata() -> Path:
    assert (TESTDATA / "wireguard-go-session.json").exists(), f"golden capture missing under {TESTDATA}"
    return TESTDATA


def udp_payloads(pcap: Path) -> list[tuple[str, bytes]]:
    """(source IP, UDP payload) of each IPv4/UDP frame of a classic pcap (Ethernet or raw IP link)."""
    data = pcap.read_bytes()
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    pos, out = 24, []
    while pos + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[pos + 8 : pos + 12])[0]
        frame = data[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
        ip = frame[14:] if linktype == 1 else frame
        if linktype == 1 and frame[12:14] != b"\x08\x00":
            continue
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 17:
            continue
        src = ".".join(str(b) for b in ip[12:16])
        udp_len = struct.unpack(">H", ip[ihl + 4 : ihl + 6])[0]
        out.append((src, ip[ihl + 8 : ihl + udp_len]))
    return out


@pytest.fixture(scope="module")
def capture() -> dict:
    d = _testdata()
    meta = json.loads((d / "wireguard-go-session.json").read_text())
    nodes = {n["name"]: n for n in meta["nodes"]}
    return {
        "meta": meta,
        "a": nodes["A"],
        "b": nodes["B"],
        "psk": base64.b64decode(meta["preshared_key"]),
        "frames": udp_payloads(d / "wireguard-go-session.pcap"),
    }


def key(s: str) -> bytes:
    return base64.b64decode(s)


def test_keys_in_json_are_consistent(capture: dict) -> None:
    for node in (capture["a"], capture["b"]):
        assert crypto.public_key(key(node["private_key"])) == key(node["public_key"])


def test_layouts_and_sizes(capture: dict) -> None:
    frames = capture["frames"]
    types = [m.message_type(p) for _, p in frames]
    assert types[:2] == [m.MESSAGE_INITIATION_TYPE, m.MESSAGE_RESPONSE_TYPE]
    init, resp = frames[0][1], frames[1][1]
    assert len(init) == m.MESSAGE_INITIATION_SIZE and len(resp) == m.MESSAGE_RESPONSE_SIZE
    assert init[132:148] == bytes(16) and resp[76:92] == bytes(16)  # no cookie: mac2 zero
    a_index = m.decode_initiation(init).sender
    b_index = m.decode_response(resp).sender
    assert m.decode_response(resp).receiver == a_index
    a_ip = capture["a"]["endpoint"].split(":")[0]
    counters: dict[int, list[int]] = {a_index: [], b_index: []}
    for src, payload in frames[2:]:
        assert m.message_type(payload) == m.MESSAGE_TRANSPORT_TYPE
        hdr = m.decode_transport_header(payload)
        # Traffic from A carries B's index and the other way round.
        assert hdr.receiver == (b_index if src == a_ip else a_index)
        assert (len(payload) - m.MESSAGE_TRANSPORT_SIZE) % 16 == 0
        counters[hdr.receiver].append(hdr.counter)
    for seq in counters.values():
        assert seq == list(range(len(seq)))  # counters start at 0 and increase by one
    # A 56-byte ping is an 84-byte IP packet: padded to 96, plus 32 of header and tag.
    assert m.transport_size(84) in {len(p) for _, p in frames[2:]}
    assert m.transport_size(1028) in {len(p) for _, p in frames[2:]}


def test_consume_initiation_as_responder(capture: dict) -> None:
    b = noise.StaticIdentity.from_private(key(capture["b"]["private_key"]))
    a_pub = key(capture["a"]["public_key"])
    init = capture["frames"][0][1]
    assert CookieChecker.for_public_key(b.public, lambda n: bytes(n)).check_mac1(init)
    hs = noise.Handshake.for_peer(b, a_pub, capture["psk"])
    res = noise.consume_initiation(b, init, lambda pk: hs if pk == a_pub else None, 0.0)
    assert isinstance(res, noise.ConsumedInitiation)
    assert res.sender == int.from_bytes(init[4:8], "little") == 0x63227084
    seconds, nanos = struct.unpack(">QI", res.timestamp)
    unix = seconds - crypto.TAI64_BASE
    # The capture was made in 2026; wireguard-go whitens nanoseconds to 2^24 ns steps.
    assert 1_767_225_600 <= unix < 1_798_761_600
    assert nanos % (1 << 24) == 0
    # A second copy is a replay.
    assert noise.consume_initiation(b, init, lambda pk: hs, 1.0) is DropReason.STALE_TIMESTAMP
    # And A's own key cannot open it.
    a = noise.StaticIdentity.from_private(key(capture["a"]["private_key"]))
    assert noise.consume_initiation(a, init, lambda pk: hs, 0.0) is DropReason.DECRYPT_FAILED


def test_response_mac1_with_a_key(capture: dict) -> None:
    resp = capture["frames"][1][1]
    a_pub = key(capture["a"]["public_key"])
    assert CookieChecker.for_public_key(a_pub, lambda n: bytes(n)).check_mac1(resp)
    b_pub = key(capture["b"]["public_key"])
    assert not CookieChecker.for_public_key(b_pub, lambda n: bytes(n)).check_mac1(resp)
