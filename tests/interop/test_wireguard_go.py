"""udpflannel's WireGuard datapath against Debian's wireguard-go, in network namespaces: handshakes either
way, ping and 100 MB sha256-checked transfers each way, a PSK, a rekey mid-transfer, replayed and bit-flipped
packets dropped and counted, and our cookie reply making wireguard-go retry with mac2."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import pytest
from wg_lab import WgLab, WgNode, have_wireguard_go, ping, transfer

from udpflannel.lab.transfer import reordering_seen

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="needs /dev/net/tun"),
    pytest.mark.skipif(not have_wireguard_go(), reason="needs wireguard-go and wg (scripts/setup.sh)"),
]

MB100 = 100 * 1024 * 1024
PSK = bytes(range(100, 132))


def test_udpflannel_initiates_with_psk() -> None:
    with WgLab() as lab:
        ours, wggo = lab.node(1, "ours"), lab.node(2, "wggo")
        lab.connect(ours, wggo, psk=PSK)
        lab.connect(wggo, ours, psk=PSK)
        ping(ours, wggo)
        st = ours.stats()
        assert st["handshakes"] == 1
        assert wggo.handshake_time() > 0
        transfer(ours, wggo, MB100)
        transfer(wggo, ours, MB100)
        st = ours.stats()
        assert st["rx_bytes"] > MB100 and st["tx_bytes"] > MB100
        assert st.get("drop_decrypt_failed", 0) == 0 and st.get("drop_replay", 0) == 0


def test_wireguard_go_initiates() -> None:
    with WgLab() as lab:
        ours, wggo = lab.node(1, "ours"), lab.node(2, "wggo")
        lab.connect(ours, wggo)
        lab.connect(wggo, ours)
        ping(wggo, ours)
        assert ours.stats()["handshakes"] == 1  # as responder: confirmed by wireguard-go's first packet
        ping(ours, wggo)
        transfer(wggo, ours, MB100)
        transfer(ours, wggo, MB100)
        assert ours.stats()["handshakes"] == 1


def test_rekey_mid_transfer_without_a_break() -> None:
    # Our side rekeys every 2 s as initiator (spec values are 120/180 s); wireguard-go keeps its defaults.
    timing = {"rekey_after_time": 2, "reject_after_time": 6, "rekey_timeout": 1, "keepalive_timeout": 1}
    with WgLab() as lab:
        ours, wggo = lab.node(1, "ours", timing=timing), lab.node(2, "wggo")
        lab.connect(ours, wggo)
        lab.connect(wggo, ours)
        ping(ours, wggo)
        before = ours.stats()["handshakes"]
        # Keep transferring (each one sha256-checked) until the transfers have spanned two rekeys; a fast
        # machine needs more rounds, a slow one fewer. Bounded: at most 8 rounds.
        seconds = 0.0
        for i in range(8):
            seconds += transfer(ours, wggo, MB100) if i % 2 == 0 else transfer(wggo, ours, MB100 // 2)
            if ours.stats()["handshakes"] - before >= 2:
                break
        after = ours.stats()["handshakes"]
        assert after - before >= 2, (before, after, seconds)
        assert ours.stats().get("drop_key_expired", 0) == 0


CAPTURE = r"""
import socket, struct, sys, time
# Collect WireGuard transport messages arriving on eth0 (AF_PACKET sees them before our socket does).
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind(("eth0", 0))
s.settimeout(0.2)
out = []
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end and len(out) < int(sys.argv[2]):
    try:
        frame = s.recv(65535)
    except TimeoutError:
        continue
    ip = frame[14:]
    ihl = (ip[0] & 15) * 4
    if ip[9] != 17 or ip[12:16] != socket.inet_aton(sys.argv[3]):
        continue
    udp = ip[ihl:]
    payload = udp[8 : struct.unpack(">H", udp[4:6])[0]]
    if payload[:1] == b"\x04" and len(payload) > 32:
        out.append(payload.hex())
print(" ".join(out), flush=True)
"""

SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for h in sys.argv[3:]:
    s.sendto(bytes.fromhex(h), (sys.argv[1], int(sys.argv[2])))
"""


def capture_transport(at: WgNode, source: WgNode, during) -> list[bytes]:
    cap = at.ns.popen(
        sys.executable, "-c", CAPTURE, "8", "3", source.underlay_ip, stdout=subprocess.PIPE, text=True
    )
    time.sleep(0.3)
    during()
    out, _ = cap.communicate(timeout=15)
    return [bytes.fromhex(h) for h in out.split()]


def test_replayed_and_bit_flipped_packets_are_dropped_and_counted() -> None:
    with WgLab() as lab:
        ours, wggo = lab.node(1, "ours"), lab.node(2, "wggo")
        lab.connect(ours, wggo)
        lab.connect(wggo, ours)
        ping(ours, wggo, count=1)
        captured = capture_transport(ours, wggo, lambda: ping(ours, wggo, count=3))
        assert len(captured) == 3, "expected the three echo replies from wireguard-go"
        before = ours.stats()
        flipped = []
        for msg in captured:
            b = bytearray(msg)
            b[40] ^= 0x01  # inside the ciphertext
            flipped.append(bytes(b))
        args = [ours.underlay_ip, "51820", *(m.hex() for m in captured + flipped)]
        wggo.ns.exec(sys.executable, "-c", SEND, *args)
        time.sleep(0.5)
        after = ours.stats()
        assert after.get("drop_replay", 0) - before.get("drop_replay", 0) == 3
        assert after.get("drop_decrypt_failed", 0) - before.get("drop_decrypt_failed", 0) == 3
        assert after["rx_packets"] == before["rx_packets"]
        # Counters and endpoint came through unchanged: the session still works.
        ping(ours, wggo, count=1)
        assert struct.unpack_from("<Q", captured[0], 8)[0] < struct.unpack_from("<Q", captured[-1], 8)[0]


def test_cookie_reply_under_load_makes_wireguard_go_retry_with_mac2() -> None:
    with WgLab() as lab:
        ours, wggo = lab.node(1, "ours"), lab.node(2, "wggo")
        lab.connect(ours, wggo)
        lab.connect(wggo, ours)
        ours.send({"op": "under_load", "on": True}, "under_load")
        t0 = time.monotonic()
        # wireguard-go's first initiation gets a cookie reply; it retries after REKEY_TIMEOUT with mac2.
        ping(wggo, ours, count=1, wait=15, timeout=30)
        took = time.monotonic() - t0
        st = ours.stats()
        assert st.get("drop_cookie_required", 0) >= 1
        assert st["handshakes"] == 1
        assert took > 4.0, "the handshake completed without going through the cookie"
        assert st.get("drop_bad_mac2", 0) == 0


def test_udpflannel_to_udpflannel() -> None:
    with WgLab() as lab:
        a, b = lab.node(1, "ours"), lab.node(2, "ours")
        lab.connect(a, b, psk=PSK)
        lab.connect(b, a, psk=PSK)
        ping(a, b)
        ping(b, a)
        # Two Python workers share the 2 test cores with both TCP ends: 20 MB keeps this under ~20 s.
        transfer(a, b, MB100 // 5)
        transfer(b, a, MB100 // 5)
        for node in (a, b):
            st = node.stats()
            assert st["handshakes"] == 1 and st.get("drop_decrypt_failed", 0) == 0
            assert reordering_seen(node.ns) == {}


def test_persistent_keepalive_handshakes_and_keeps_sending() -> None:
    with WgLab() as lab:
        ours, wggo = lab.node(1, "ours"), lab.node(2, "wggo")
        lab.connect(wggo, ours)
        # Setting the interval starts a handshake and then sends a keepalive every second, with no traffic.
        lab.connect(ours, wggo, keepalive=1)
        deadline = time.monotonic() + 10
        while wggo.handshake_time() == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert wggo.handshake_time() > 0
        first = wggo.stats()["peers"][0]["rx_bytes"]
        time.sleep(3.5)
        later = wggo.stats()["peers"][0]["rx_bytes"]
        assert later - first >= 2 * 32, (first, later)  # keepalives are 32-byte transport messages
        assert ours.stats()["peers"][0]["persistent_keepalive"] == 1


@pytest.mark.parametrize("kinds", [("ours", "wggo"), ("wggo", "ours")])
def test_ipv6_underlay_and_inner_ipv6(kinds: tuple[str, str]) -> None:
    with WgLab(v6_underlay=True) as lab:
        a, b = lab.node(1, kinds[0]), lab.node(2, kinds[1])
        lab.connect(a, b)
        lab.connect(b, a)
        ping(a, b, v6=True)
        ping(b, a)
        ping(a, b, size=1300, v6=True)  # near the MTU: padding and the IPv6 outer header still fit
        transfer(a, b, 10 * 1024 * 1024)
        ours = a if a.kind == "ours" else b
        peer = ours.stats()["peers"][0]
        assert peer["endpoint"].startswith("[fd00:198::"), peer


def test_addresses_are_in_the_test_range() -> None:
    # The lab's own guard: every address used above is inside 198.18.0.0/15.
    for text in ("198.18.0.1", "198.18.0.2", "198.19.1.1", "198.19.2.1"):
        assert socket.inet_aton(text)[:1] == b"\xc6" and socket.inet_aton(text)[1] in (18, 19)


def test_per_packet_mode_against_wireguard_go(monkeypatch: pytest.MonkeyPatch) -> None:
    # UDPFLANNEL_NO_OFFLOAD=1: plain TUN (no superpackets, no GRO writes) and no UDP GSO/GRO, so every
    # packet takes the per-datagram paths of the engine; bytes must still match both ways.
    monkeypatch.setenv("UDPFLANNEL_NO_OFFLOAD", "1")
    with WgLab() as lab:
        ours, wggo = lab.node(1, "ours"), lab.node(2, "wggo")
        lab.connect(ours, wggo)
        lab.connect(wggo, ours)
        ping(ours, wggo)
        transfer(ours, wggo, MB100 // 10)
        transfer(wggo, ours, MB100 // 10)
        st = ours.stats()
        assert st["tun_writes"] == st["rx_packets"] > 5000  # one TUN write per packet: nothing coalesced
        assert st.get("drop_decrypt_failed", 0) == 0 and st.get("drop_bad_inner_packet", 0) == 0
