"""Two WgEngines in one process (tests of dataplane/wg_engine.py): the TUN a SOCK_SEQPACKET socketpair (one
message per packet, as a TUN read), the underlay UdpSockets on SERVICE_ADDR, the loopback of the test
module's own namespace (tests/conftest.py private_net)."""

from __future__ import annotations

import os
import socket
import time

from udpflannel.codec.wireguard import crypto
from udpflannel.codec.wireguard.session import Device
from udpflannel.dataplane.wg_engine import WgEngine
from udpflannel.io.tun import Tun
from udpflannel.io.udp import UdpSocket
from udpflannel.lab.netns import SERVICE_ADDR
from udpflannel.packet.vnet import VnetHdr

MTU = 1420
ADDR = SERVICE_ADDR  # both nodes' underlay address


class Node:
    def __init__(self, index: int, vnet: bool) -> None:
        self.key = crypto.generate_private_key(os.urandom(32))
        self.outside, inside = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        inside.setblocking(False)
        self.outside.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)  # room for a few superpackets
        self.outside.settimeout(2)
        self._inside = inside  # keep the socket object alive: Tun holds only its fd
        self.tun = Tun.from_fd(inside.fileno(), f"fake{index}", vnet=vnet)
        self.udp = UdpSocket.open(socket.AF_INET, ADDR, 0)
        self.device = Device(self.key, wall_offset=time.time() - time.monotonic(), mtu=MTU)
        self.engine = WgEngine(self.device, self.tun, self.udp)
        self.subnet = f"198.19.{index}.0/24"
        self.vnet = vnet

    @property
    def public_key(self) -> bytes:
        return crypto.public_key(self.key)

    def close(self) -> None:
        self.udp.close()
        self._inside.close()
        self.outside.close()

    def inject(self, packet: bytes, hdr: VnetHdr | None = None) -> None:
        """What the kernel would hand the TUN reader."""
        self.outside.send(((hdr or VnetHdr()).encode() if self.vnet else b"") + packet)

    def written(self) -> list[bytes]:
        out = []
        self.outside.setblocking(False)
        try:
            while True:
                out.append(self.outside.recv(1 << 17))
        except BlockingIOError:
            pass
        finally:
            self.outside.settimeout(2)
        return out


def pump(nodes: list[Node], rounds: int = 20, settle: float = 0.01) -> None:
    """Run every engine's TX, RX and timers until nothing moves (bounded). When nothing moved, wait
    `settle` seconds for stragglers before stopping (0: stop at once, loopback delivery being immediate)."""
    for _ in range(rounds):
        moved = 0
        for n in nodes:
            now = time.monotonic()
            moved += n.engine.tx_once(now) + n.engine.rx_once(now)
            n.engine.run_timers(now)
        if not moved:
            if not settle:
                return
            time.sleep(settle)
            if not any(n.engine.rx_once(time.monotonic()) for n in nodes):
                return
