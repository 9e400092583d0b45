"""io/tunnel_tap.py with the real kernel: one VXLAN-wrapped TCP superpacket written to the TAP leaves the
underlay as wire-size VXLAN frames with every checksum right, and a kernel VXLAN peer (set up as flanneld
does) takes them in. Plus the cases where the path must stay off."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

from udpflannel.codec import tunnel_gso as tg
from udpflannel.io import tunnel_tap
from udpflannel.io.tunnel_tap import TunnelTap, tap_name
from udpflannel.lab import kernel_vxlan
from udpflannel.lab.netns import call_in_netns
from udpflannel.packet import vnet

A_MAC, K_MAC = bytes.fromhex("025a00000001"), bytes.fromhex("025a00000002")
MSS = 1398


def _sum16(data: bytes) -> int:
    data += b"\0" * (len(data) & 1)
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _superpacket(segments: int, mss: int = MSS) -> bytes:
    """A TCP superpacket 198.19.1.0 -> 198.19.2.0 as the TUN hands it out: the TCP checksum field holds
    the pseudo-header sum (NEEDS_CSUM), the payload a counting pattern."""
    payload = bytes(i & 0xFF for i in range(mss * segments - 100))
    src, dst = socket.inet_aton("198.19.1.0"), socket.inet_aton("198.19.2.0")
    total = 20 + 20 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 7, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", 0xFFFF - _sum16(ip)) + ip[12:]
    pseudo = _sum16(src + dst + struct.pack("!HH", 6, 20 + len(payload)))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5999, 1000, 1, 0x50, 0x18, 512, pseudo, 0)
    return ip + tcp + payload


def _udp_superpacket(datagrams: int, seg: int) -> bytes:
    """A UDP superpacket 198.19.1.0 -> 198.19.2.0 as the TUN hands out what a pod sends with UDP_SEGMENT:
    one UDP header, the checksum field the pseudo-header sum (NEEDS_CSUM); the last datagram shorter."""
    payload = bytes(i & 0xFF for i in range(seg * datagrams - 300))
    src, dst = socket.inet_aton("198.19.1.0"), socket.inet_aton("198.19.2.0")
    ulen = 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 7, 0x4000, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", 0xFFFF - _sum16(ip)) + ip[12:]
    udp = struct.pack("!HHHH", 40000, 5999, ulen, _sum16(src + dst + struct.pack("!HH", 17, ulen)))
    return ip + udp + payload


def _write_and_dissect(
    a, tap: TunnelTap, pcap_path: str, src: str, dst: str, packet: bytes, vh: tuple, fields: list[str]
) -> list[list[str]]:
    """Write `packet` (a superpacket read with virtio header `vh`), VXLAN-wrapped from src to dst, to the
    TAP, capture the frames that leave eth0 and return tshark's `fields` of each (every checksum checked)."""
    count = -(-(len(packet) - vh[2]) // vh[3])
    cap = a.popen("tcpdump", "-ni", "eth0", "-Q", "out", "-U", "-w", pcap_path, "-c", str(count), "udp")
    time.sleep(1)
    headers = tg.TunnelHeaders.for_peer(
        tap_mac=tap.mac, src_ip=src, dst_ip=dst, dst_port=8472, encap=tg.vxlan_encap(1, A_MAC, K_MAC)
    )
    prefix = headers.build(len(packet), vh, 32768, 100)
    assert os.writev(tap.fd, (prefix, packet)) == len(prefix) + len(packet)
    cap.wait(timeout=10)
    checks = [x for proto in ("udp", "tcp", "ip") for x in ("-o", f"{proto}.check_checksum:TRUE")]
    out = subprocess.run(
        ["tshark", "-r", pcap_path, "-d", "udp.port==8472,vxlan", *checks, "-T", "fields",
         *[x for f in fields for x in ("-e", f)]],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split("\n")  # fmt: skip
    return [line.split("\t") for line in out if line.strip()]


def _node_and_kernel_peer(lab, prefix: str, name: str) -> tuple:
    """Our node (198.18.0.1, with the tunnel TAP `name` opened in it) and a kernel VXLAN peer at 198.18.0.2
    set up as flanneld does; skips when tshark/tcpdump or the TAP are not available."""
    if shutil.which("tshark") is None or shutil.which("tcpdump") is None:
        pytest.skip("needs tcpdump and tshark")
    a, k = lab.netns(f"{prefix}a"), lab.netns(f"{prefix}k")
    lab.veth(a, k, "198.18.0.1/16", "198.18.0.2/16")
    kernel_vxlan.add_device(k, mac="02:5a:00:00:00:02", local="198.18.0.2", address="198.19.2.0/32")
    kernel_vxlan.add_peer(k, subnet="198.19.1.0/24", vtep="198.19.1.0", mac="02:5a:00:00:00:01",
                          public_ip="198.18.0.1")  # fmt: skip
    tap, why = call_in_netns(a.name, lambda: TunnelTap.open(name))
    if tap is None:
        pytest.skip(f"tunnel TAP unavailable here: {why}")
    return a, k, tap


def test_a_superpacket_becomes_checksummed_vxlan_frames_a_kernel_peer_accepts(lab, tmp_path):
    a, k, tap = _node_and_kernel_peer(lab, "t", tap_name("flannel.1"))
    try:
        assert tap.name == "flannel.1-tx"
        fields = ["frame.len", "udp.checksum.status", "ip.checksum.status", "tcp.checksum.status",
                  "vxlan.vni", "tcp.seq_raw", "ip.ttl"]  # fmt: skip
        packet = _superpacket(46)
        vh = (1, vnet.VIRTIO_NET_HDR_GSO_TCPV4, 40, MSS, 20, 16)
        rows = _write_and_dissect(
            a, tap, str(tmp_path / "tap.pcap"), "198.18.0.1", "198.18.0.2", packet, vh, fields
        )
        assert len(rows) == 46
        seqs = []
        for length, udp_ok, ip_ok, tcp_ok, vni, seq, ttl in rows:
            assert int(length) <= 1514 and vni == "1" and udp_ok == "1" and tcp_ok == "1"
            assert ip_ok == "1,1" and ttl.split(",")[0] == "64"  # forwarded once: 65 -> 64
            seqs.append(int(seq))
        assert seqs == [1000 + i * MSS for i in range(46)]
        # The kernel peer took them in: no checksum errors, the inner bytes through its VXLAN device.
        nstat = k.exec("nstat", "-az", "UdpInCsumErrors").split()
        assert nstat[nstat.index("UdpInCsumErrors") + 1] == "0"
        (link,) = json.loads(k.exec("ip", "-s", "-j", "link", "show", "flannel.1"))
        assert link["stats64"]["rx"]["bytes"] >= len(packet)
    finally:
        tap.close()
    assert tap_name("flannel.1") not in a.exec("ip", "link")  # not persistent: gone with its fd


def test_a_udp_superpacket_becomes_datagrams_a_kernel_peer_accepts(lab, tmp_path):
    """What a pod sends with UDP_SEGMENT: the kernel cuts the UDP superpacket inside the tunnel as it does
    TCP, each frame one datagram of the pod's with its own UDP length and checksum."""
    a, k, tap = _node_and_kernel_peer(lab, "tu", "fu-tx")
    try:
        seg = 1200
        packet = _udp_superpacket(20, seg)
        vh = (1, vnet.VIRTIO_NET_HDR_GSO_UDP_L4, 28, seg, 20, 6)
        fields = ["frame.len", "udp.checksum.status", "udp.length", "vxlan.vni"]
        rows = _write_and_dissect(
            a, tap, str(tmp_path / "uso.pcap"), "198.18.0.1", "198.18.0.2", packet, vh, fields
        )
        assert len(rows) == 20
        for length, csum, ulen, vni in rows[:-1]:
            assert int(length) <= 1514 and csum == "1,1" and ulen.split(",")[1] == str(8 + seg) and vni == "1"
        assert rows[-1][1] == "1,1" and rows[-1][2].split(",")[1] == str(8 + seg - 300)
        nstat = k.exec("nstat", "-az", "UdpInCsumErrors").split()
        assert nstat[nstat.index("UdpInCsumErrors") + 1] == "0"
        (link,) = json.loads(k.exec("ip", "-s", "-j", "link", "show", "flannel.1"))
        assert link["stats64"]["rx"]["packets"] >= 20
    finally:
        tap.close()


def test_over_an_ipv6_underlay_the_frames_are_ipv6_and_a_kernel_peer_takes_them(lab, tmp_path):
    """A dual-stack node's peer over IPv6 (flannel-v6.1, MTU 1430): the TAP forwards the superpacket with
    its IPv6 outer header (net.ipv6.conf.all.forwarding=1, as on a Kubernetes node) as checksummed
    frames, hop limit 64, which the kernel peer takes in; with IPv6 forwarding off it says why."""
    if shutil.which("tshark") is None or shutil.which("tcpdump") is None:
        pytest.skip("needs tcpdump and tshark")
    a, k = lab.netns("t6a"), lab.netns("t6k")
    lab.veth(a, k, "198.18.0.1/16", "198.18.0.2/16")
    a.exec("ip", "addr", "add", "fd00:198::1/64", "dev", "eth0", "nodad")
    k.exec("ip", "addr", "add", "fd00:198::2/64", "dev", "eth0", "nodad")
    kernel_vxlan.add_device(k, mac="02:5a:00:00:00:02", local="fd00:198::2", address="198.19.2.0/32",
                            name=kernel_vxlan.DEVICE_V6, mtu=1430)  # fmt: skip
    a.exec("sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")
    tap, _ = call_in_netns(a.name, lambda: TunnelTap.open("f6-tx", ipv6=True))
    if tap is None:
        pytest.skip("tunnel TAP unavailable here")
    assert not tap.ipv6 and "forwarding=0" in tap.why_not_ipv6
    tap.close()
    a.exec("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    tap, _ = call_in_netns(a.name, lambda: TunnelTap.open("f6-tx", ipv6=True))
    assert tap is not None and tap.ipv6
    try:
        assert "inet6" not in a.exec("ip", "-6", "addr", "show", "dev", "f6-tx")  # it sends nothing itself
        a.exec("ping", "-6", "-c", "1", "-W", "2", "fd00:198::2")  # the neighbour, known before the write
        fields = [
            "frame.len",
            "udp.checksum.status",
            "tcp.checksum.status",
            "vxlan.vni",
            "ipv6.hlim",
            "ipv6.src",
        ]
        mss = MSS - 20  # the IPv6 outer header is 20 bytes longer
        packet = _superpacket(46, mss)
        vh = (1, vnet.VIRTIO_NET_HDR_GSO_TCPV4, 40, mss, 20, 16)
        rows = _write_and_dissect(
            a, tap, str(tmp_path / "tap6.pcap"), "fd00:198::1", "fd00:198::2", packet, vh, fields
        )
        assert len(rows) == 46
        for length, *status in rows:
            assert int(length) <= 1514 and status == ["1", "1", "1", "64", "fd00:198::1"]
        nstat = k.exec("nstat", "-az", "Udp6InCsumErrors").split()
        assert nstat[nstat.index("Udp6InCsumErrors") + 1] == "0"
        (link,) = json.loads(k.exec("ip", "-s", "-j", "link", "show", kernel_vxlan.DEVICE_V6))
        assert link["stats64"]["rx"]["bytes"] >= len(packet)
    finally:
        tap.close()


def test_the_path_stays_off_when_turned_off_or_filtered(monkeypatch, tmp_path):
    monkeypatch.setenv("UDPFLANNEL_TX_TUNNEL", "0")
    tap, why = TunnelTap.open("x-tx")
    assert tap is None and "UDPFLANNEL_TX_TUNNEL" in why
    monkeypatch.delenv("UDPFLANNEL_TX_TUNNEL")
    (tmp_path / "ipv4/conf/all").mkdir(parents=True)
    (tmp_path / "ipv4/conf/all/rp_filter").write_text("2\n")
    monkeypatch.setattr(tunnel_tap, "PROC_CONF", tmp_path)
    tap, why = TunnelTap.open("x-tx")
    assert tap is None and "rp_filter=2" in why


def test_tap_names_fit_ifnamsiz():
    assert tap_name("flannel.1") == "flannel.1-tx"
    assert tap_name("a-very-long-name") == "a-very-long--tx"  # 15 bytes: IFNAMSIZ with its NUL


def test_opening_it_keeps_pyroute2_out_of_the_agent(lab):
    """The agent opens the TAP: that must not load pyroute2 (~13 MB; host/links.py keeps it in a child)."""
    ns = lab.netns("tp")
    script = (
        "import sys; from udpflannel.io.tunnel_tap import TunnelTap; "
        "tap, why = TunnelTap.open('t-tx'); print(tap is not None, 'pyroute2' in sys.modules, why)"
    )
    out = ns.exec(sys.executable, "-c", script, timeout=30).split()
    assert out[1] == "False", out
    if out[0] == "True":
        assert "t-tx" not in ns.exec("ip", "link")  # the process is gone, so is the TAP
