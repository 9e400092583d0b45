"""TUN with offloads inside network namespaces: real superpackets from a TCP sender, and a reflector
(TUN -> split -> coalesce -> TUN) carrying a 100 MB transfer intact, with and without offloads."""

from __future__ import annotations

import hashlib
import random
import select
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from udpflannel.io import linux
from udpflannel.io.tun import Tun, new_read_arena
from udpflannel.lab.netns import Lab, Netns, call_in_netns
from udpflannel.packet import reference
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.gro import coalesce
from udpflannel.packet.gso import split_superpacket
from udpflannel.packet.parse import validate_ip
from udpflannel.packet.vnet import VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_UDP_L4, VNET_HDR_LEN

pytestmark = pytest.mark.root

HEADROOM = 64
MB = 1 << 20
SENDER = """
import random, socket, sys
block = random.Random(7).randbytes(1 << 20)
s = socket.create_connection((sys.argv[1], 5201), timeout=20)
for _ in range(int(sys.argv[2])):
    s.sendall(block)
s.close()
"""
RECEIVER = """
import hashlib, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 5201)); srv.listen(1); srv.settimeout(20)
print("ready", flush=True)
c, _ = srv.accept(); c.settimeout(20)
h = hashlib.sha256(); n = 0
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    h.update(d); n += len(d)
print(n, h.hexdigest(), flush=True)
"""


@dataclass
class Seen:
    max_len: int = 0
    gso_types: set[int] = field(default_factory=set)
    superpackets: int = 0
    writes: int = 0
    write_errors: int = 0
    drops: int = 0
    error: BaseException | None = None


def reflect(a: Tun, b: Tun, stop: threading.Event, seen: Seen) -> None:
    """Forward both ways until stopped: superpackets are split and coalesced again on the way."""
    poll = select.poll()
    for t in (a, b):
        poll.register(t.fd, select.POLLIN)
    pair = {a.fd: (a, b), b.fd: (b, a)}
    arena = new_read_arena(64, HEADROOM)
    try:
        while not stop.is_set():
            for fd, _ in poll.poll(50):
                src, dst = pair[fd]
                got = src.read_batch(64, HEADROOM, arena)
                if got.batch.n == 0:
                    continue
                seen.max_len = max(seen.max_len, int(got.batch.lengths.max()))
                seen.gso_types.update(np.unique(got.headers["gso_type"]).tolist())
                split = got.needs_split()
                if split.any():
                    for i in np.flatnonzero(split).tolist():
                        seen.superpackets += 1
                        batch = split_superpacket(got.batch.packet(i), got.header(i), HEADROOM)
                        seen.drops += int(batch.drop != 0)
                        writes = coalesce(batch, vnet=dst.vnet)
                        seen.writes += dst.write_batch(writes)
                    rest = got.batch.take(~split)
                else:
                    rest = got.batch
                seen.writes += dst.write_batch(coalesce(rest, vnet=dst.vnet))
        seen.write_errors = a.stats.write_errors + b.stats.write_errors
    except BaseException as exc:  # reported by the test
        seen.error = exc


def _open_tun(lab: Lab, short: str, addr: str, route: str, offload: bool) -> Tun:
    ns = lab.namespaces[short]

    def make() -> Tun:
        tun = Tun.open(f"{lab.prefix}t{short}", offload=offload)
        tun.configure(addresses=[addr], mtu=1500, up=True)
        return tun

    tun = call_in_netns(ns.name, make)
    ns.exec("ip", "route", "add", route, "dev", tun.name)
    return tun


def _transfer(lab: Lab, offload: bool, megabytes: int) -> tuple[Seen, str, str]:
    a, b = lab.netns("a"), lab.netns("b")
    tun_a = _open_tun(lab, "a", "198.19.1.1/24", "198.19.2.0/24", offload)
    tun_b = _open_tun(lab, "b", "198.19.2.1/24", "198.19.1.0/24", offload)
    stop, seen = threading.Event(), Seen()
    thread = threading.Thread(target=reflect, args=(tun_a, tun_b, stop, seen), daemon=True)
    thread.start()
    try:
        rx = b.popen(sys.executable, "-c", RECEIVER, "198.19.2.1", stdout=subprocess.PIPE, text=True)
        assert rx.stdout is not None
        assert rx.stdout.readline().strip() == "ready"
        tx = a.popen(sys.executable, "-c", SENDER, "198.19.2.1", str(megabytes))
        assert tx.wait(timeout=60) == 0
        out = rx.stdout.readline().split()
        assert rx.wait(timeout=30) == 0
    finally:
        stop.set()
        thread.join(timeout=10)
        tun_a.close()
        tun_b.close()
    assert seen.error is None, repr(seen.error)
    expected = hashlib.sha256(random.Random(7).randbytes(MB) * megabytes).hexdigest()
    assert out == [str(megabytes * MB), expected]
    return seen, tun_a.offloads, tun_b.offloads


def test_offloaded_tun_reflector_carries_100mb(lab: Lab) -> None:
    seen, offloads, _ = _transfer(lab, offload=True, megabytes=100)
    assert "vnet_hdr" in offloads and "tso4" in offloads
    # The kernel handed us real superpackets: TCPv4 GSO and longer than the 1500-byte MTU.
    assert VIRTIO_NET_HDR_GSO_TCPV4 in seen.gso_types
    assert seen.max_len > 1500
    assert seen.superpackets > 0
    assert seen.drops == 0


def test_plain_tun_reflector_carries_100mb(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(linux.NO_OFFLOAD_ENV, "1")
    seen, offloads, _ = _transfer(lab, offload=None, megabytes=100)  # type: ignore[arg-type]
    assert offloads == []
    assert seen.max_len <= 1500
    assert seen.gso_types <= {0}
    assert seen.superpackets == 0


def test_tun_read_write_plain_packet(lab: Lab) -> None:
    """A ping through a vnet TUN: the echo request comes out with a zero-GSO header, our reply goes in."""
    ns = lab.netns("p")

    def make() -> Tun:
        tun = Tun.open(f"{lab.prefix}tp", offload=True)
        tun.configure(addresses=["198.19.5.1/24"], up=True)
        return tun

    tun = call_in_netns(ns.name, make)
    try:
        proc = ns.popen("ping", "-c", "1", "-W", "2", "198.19.5.2")
        arena = new_read_arena(4, HEADROOM)
        got = None
        for _ in range(100):
            select.select([tun.fd], [], [], 0.05)
            r = tun.read_batch(4, HEADROOM, arena)
            icmp = [i for i in range(r.batch.n) if r.batch.packet(i)[9] == 1]
            if icmp:
                got = bytes(r.batch.packet(icmp[0]))
                assert r.headers["gso_type"][icmp[0]] == 0
                break
        assert got is not None, "no echo request read from the TUN"
        # Swap addresses, turn the request into a reply (type 0); the ICMP checksum moves by 0x0800.
        reply = bytearray(got)
        reply[12:16], reply[16:20] = got[16:20], got[12:16]
        reply[20] = 0
        csum = int.from_bytes(reply[22:24], "big") + 0x0800
        reply[22:24] = ((csum & 0xFFFF) + (csum >> 16)).to_bytes(2, "big")
        assert tun.write_plain(bytes(reply))
        assert proc.wait(timeout=5) == 0
        assert tun.stats.write_errors == 0
        assert tun.offloads[0] == "vnet_hdr"
        assert VNET_HDR_LEN == 10
    finally:
        tun.close()


def _uso_tun(lab: Lab, short: str, address: str, route: str) -> tuple[Netns, Tun]:
    """A namespace with an offloaded TUN (its address, and `route` through it); skips without USO."""
    ns = lab.netns(short)
    ns.exec("sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0")  # an IPv6 address usable at once

    def make() -> Tun:
        tun = Tun.open(f"{lab.prefix}t{short}", offload=True)
        tun.configure(addresses=[address], up=True)
        return tun

    tun = call_in_netns(ns.name, make)
    if "uso4" not in tun.offloads:
        tun.close()
        pytest.skip("kernel without TUN USO (Linux < 6.2)")
    ns.exec("ip", "route", "add", route, "dev", tun.name)
    return ns, tun


def test_uso_superpacket_is_read_and_split(lab: Lab) -> None:
    """A UDP_SEGMENT send routed into a TUN with USO arrives as one UDP_L4 superpacket; our split gives
    back every datagram with a correct checksum."""
    ns, tun = _uso_tun(lab, "u", "198.19.6.1/24", "198.19.7.0/24")
    try:
        payload = random.Random(3).randbytes(10 * 1000 + 123)

        def send() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                seg = [(linux.SOL_UDP, linux.UDP_SEGMENT, struct.pack("=H", 1000))]
                s.sendmsg([payload], seg, 0, ("198.19.7.2", 9999))

        call_in_netns(ns.name, send)
        arena = new_read_arena(8, HEADROOM)
        found = None
        for _ in range(100):
            select.select([tun.fd], [], [], 0.05)
            got = tun.read_batch(8, HEADROOM, arena)
            for i in range(got.batch.n):
                if got.headers["gso_type"][i] == VIRTIO_NET_HDR_GSO_UDP_L4:
                    found = (bytes(got.batch.packet(i)), got.header(i))
            if found:
                break
        assert found is not None, "no UDP_L4 superpacket read from the TUN"
        raw, vh = found
        assert vh.gso_size == 1000 and len(raw) > 1500
        segs = split_superpacket(raw, vh, HEADROOM).packets()
        assert len(segs) == 11
        assert b"".join(s[28:] for s in segs) == payload
        assert all(reference.validate(s) == (0, len(s)) for s in segs)
    finally:
        tun.close()


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_uso_write_reaches_a_socket_as_its_datagrams(lab: Lab, v6: bool) -> None:
    """Datagrams of one UDP flow coalesced into one UDP_L4 write (packet/gro_udp.py): the kernel cuts it
    back and a socket behind the TUN receives every datagram, payloads intact, checksums accepted."""
    if v6:
        ours, theirs, address, route = "fd00:198:8::1", "fd00:198:9::2", "fd00:198:8::1/64", "fd00:198:9::/64"
    else:
        ours, theirs, address, route = "198.19.8.1", "198.19.9.2", "198.19.8.1/24", "198.19.9.0/24"
    ns, tun = _uso_tun(lab, "w6" if v6 else "w", address, route)  # the senders' side routed back in
    try:
        rng = random.Random(5)
        payloads = [rng.randbytes(700) for _ in range(19)] + [rng.randbytes(123)]

        def bound() -> socket.socket:
            s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("::" if v6 else "0.0.0.0", 9999))
            s.settimeout(5)
            return s

        sock = call_in_netns(ns.name, bound)
        with sock:
            ip = (lambda i: IPv6(src=theirs, dst=ours)) if v6 else (lambda i: IP(src=theirs, dst=ours, id=i))
            pkts = [bytes(ip(i) / UDP(sport=40000, dport=9999) / p) for i, p in enumerate(payloads)]
            batch = PacketBatch.from_packets(pkts, headroom=HEADROOM)
            writes = coalesce(batch, validate_ip(batch, l4_checksum=True), uso=True)
            assert len(writes) == 1
            assert tun.write_batch(writes) == 1
            got = [sock.recv(2048) for _ in payloads]
        assert got == payloads
    finally:
        tun.close()


def test_configure_sets_mtu_queue_and_gso_max_size(lab: Lab) -> None:
    ns = lab.netns("c")

    def make() -> Tun:
        tun = Tun.open(f"{lab.prefix}tc", offload=True)
        tun.configure(
            mtu=1450, addresses=["198.19.8.1/24", "fd00:198:8::1/64"], txqueuelen=2000, gso_max_size=61000
        )
        return tun

    tun = call_in_netns(ns.name, make)
    try:
        out = ns.exec("ip", "-d", "link", "show", tun.name)
        assert ("mtu 1450" in out and "qlen 2000" in out and "state UNKNOWN" in out) or "UP" in out
        assert "gso_max_size 61000" in out
        addrs = ns.exec("ip", "addr", "show", tun.name)
        assert "198.19.8.1/24" in addrs and "fd00:198:8::1/64" in addrs
    finally:
        tun.close()


def test_read_batch_says_whether_it_emptied_the_queue() -> None:
    """drained: the batch ended at an empty queue (the worker then waits in poll rather than reading
    again), not at its size limit. A SEQPACKET socketpair stands in for the TUN: one packet a read."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        ours.setblocking(False)
        tun = Tun.from_fd(ours.fileno(), "fake", vnet=False)
        for i in range(3):
            theirs.send(bytes([0x45, i]) + bytes(38))
        arena = new_read_arena(4, HEADROOM)
        first = tun.read_batch(2, HEADROOM, arena)
        assert (first.batch.n, first.drained) == (2, False)
        rest = tun.read_batch(4, HEADROOM, arena)
        assert (rest.batch.n, rest.drained) == (1, True)
        empty = tun.read_batch(4, HEADROOM, arena)
        assert (empty.batch.n, empty.drained) == (0, True)
