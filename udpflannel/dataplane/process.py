"""Dataplane: the control-plane handle on the datapath workers. It opens the TUN and the UDP sockets (cheap,
no heavy imports), starts worker process(es) that inherit them, sends peer tables over a control socket,
reads counters from shared memory, and on stop() ends the workers and closes everything (the TUN vanishes
with its last fd, taking its addresses and routes with it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from udpflannel.dataplane.counters import Counters
from udpflannel.dataplane.spec import HEADROOM, EngineConfig, Peer
from udpflannel.io import linux
from udpflannel.io.tun_device import TunDevice
from udpflannel.io.tunnel_tap import TunnelTap, tap_name
from udpflannel.io.udp_endpoint import (
    UdpEndpoint,
    _probe_gso,
    _try_setsockopt,
    grow_buffers,
    probe_max_segments,
)

log = logging.getLogger(__name__)

READY_TIMEOUT = 10.0
SRC_PORT_BASE = 32768  # outer source ports of the per-flow socket pool (Linux's ephemeral range start)
SRC_PORT_LAST = 60999
RECV_SLOTS = 64
ACK_TIMEOUT = 5.0
# "1": one worker does TX and RX; "2": one worker per direction. Measured with perf/bench_vxlan.py on the
# 2-core VMs (vxlan<->vxlan, iperf3 one stream, medians of 3): one direction 2 workers gave no gain beyond the
# noise and 1/3 of the 64-byte packet rate; bidirectional 0.95 Gbit/s with 1 worker vs 0.67 with 2, and
# 11 vs 19 CPU-s/GiB. So one worker is the default.
WORKERS_ENV = "UDPFLANNEL_WORKERS"
DEFAULT_WORKERS = 1


def check_environment() -> None:
    """Raise ValueError (one line: the variable and what it takes) for a bad UDPFLANNEL_WORKERS, so the
    agent refuses it before it takes a lease."""
    workers(0)


def workers(configured: int) -> int:
    """Worker processes: `configured`, else UDPFLANNEL_WORKERS, else the default; 1 or 2."""
    raw = str(configured) if configured else os.environ.get(WORKERS_ENV, "").strip() or str(DEFAULT_WORKERS)
    if raw not in ("1", "2"):
        raise ValueError(f"{WORKERS_ENV} must be 1 or 2, not {raw!r}")
    return int(raw)


def open_udp6(bind_ip: str, port: int, *, gro: bool = True, recv_slots: int = RECV_SLOTS) -> UdpEndpoint:
    """An IPv6-only UDP socket (so it never competes with the IPv4 one on the same port), with the same
    probed offloads UdpEndpoint.open gives an IPv4 one."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        grow_buffers(sock)
        sock.bind((bind_ip, port))
        sock.setblocking(False)
        gso = not linux.offload_disabled() and _probe_gso(sock)
        gro = gro and not linux.offload_disabled() and _try_setsockopt(sock, linux.SOL_UDP, linux.UDP_GRO, 1)
    except OSError:
        sock.close()
        raise
    max_segments = probe_max_segments(socket.AF_INET6) if gso else 1
    return UdpEndpoint(
        sock, socket.AF_INET6, gso, gro, max_segments, linux.UDP_MAX_PAYLOAD_V6, recv_slots, HEADROOM
    )


class DataplaneError(RuntimeError):
    """A worker did not start or stopped answering; the message says which and why."""


@dataclass
class _Worker:
    proc: subprocess.Popen
    ctrl: socket.socket
    role: str


@dataclass
class Dataplane:
    cfg: EngineConfig
    tun_name: str
    bind_ip: str
    rx_port: int
    pool_size: int = 16  # outer source ports for vxlan; udp sends from rx_port as flannel does
    workers: int = 0  # 0: from UDPFLANNEL_WORKERS, else DEFAULT_WORKERS
    rx_bind_ip: str | None = None  # None: bind_ip
    bind_ip6: str | None = None  # set: also carry traffic over the IPv6 underlay, sending from this address
    # TCP and UDP superpackets leave through a TAP the kernel segments from (io/tunnel_tap.py), when the
    # kernel has the offload; the agent asks for it only when it keeps the FORWARD chain open.
    tx_tunnel: bool = True
    _tap: TunnelTap | None = None
    _tun: TunDevice | None = None
    _rx: UdpEndpoint | None = None
    _pool: list[UdpEndpoint] = field(default_factory=list)
    _rx6: UdpEndpoint | None = None
    _pool6: list[UdpEndpoint] = field(default_factory=list)
    _counters: Counters | None = None
    _workers: list[_Worker] = field(default_factory=list)
    _seq: int = 0
    _peers: list[Peer] = field(default_factory=list)  # the last table sent, for a restarted worker
    restarts: int = 0

    def start(self) -> None:
        self.workers = workers(self.workers)
        try:
            self._tun = TunDevice.open(self.tun_name)
            self._rx = UdpEndpoint.open(
                socket.AF_INET,
                self.rx_bind_ip or self.bind_ip,
                self.rx_port,
                recv_slots=RECV_SLOTS,
                headroom=HEADROOM,
            )
            if self.cfg.encap == "vxlan":
                self._pool = self._open_pool(socket.AF_INET, self.bind_ip)
            self._open_tap()
            if self.bind_ip6 is not None:
                self._rx6 = open_udp6("::", self.rx_port, recv_slots=RECV_SLOTS)
                if self.cfg.encap == "vxlan":
                    self._pool6 = self._open_pool(socket.AF_INET6, self.bind_ip6)
            self._counters = Counters(self.workers)
            roles = ["both"] if self.workers == 1 else ["tx", "rx"]
            for index, role in enumerate(roles):
                self._workers.append(self._spawn(index, role))
            for w in self._workers:
                self._expect(w, "ready", READY_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def _open_pool(self, family: int, bind_ip: str) -> list[UdpEndpoint]:
        """Send sockets on consecutive ports from 32768 (skipping taken ones), so each inner flow keeps one
        outer source port, as Linux VXLAN does (spec/fastpath.md)."""
        pool: list[UdpEndpoint] = []
        port = SRC_PORT_BASE
        while len(pool) < self.pool_size and port <= SRC_PORT_LAST:
            try:
                if family == socket.AF_INET:
                    pool.append(UdpEndpoint.open(family, bind_ip, port, gro=False, headroom=HEADROOM))
                else:
                    pool.append(open_udp6(bind_ip, port, gro=False))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    for s in pool:
                        s.close()
                    raise
            port += 1
        return pool

    def _open_tap(self) -> None:
        """The tunnel TAP when asked for and possible; why not is logged once (the split path works)."""
        if not self.tx_tunnel or self.bind_ip in ("", "0.0.0.0"):
            return
        self._tap, why = TunnelTap.open(tap_name(self.tun_name), ipv6=self._tap_src6 is not None)
        if self._tap is None:
            log.info("superpackets are split in userspace: the tunnel TAP is off (%s)", why)
        elif self._tap_src6 is not None and not self._tap.ipv6:
            log.info("superpackets to IPv6 peers are split in userspace: %s", self._tap.why_not_ipv6)

    @property
    def _tap_src6(self) -> str | None:
        """Our IPv6 underlay address, the source of the TAP's frames to IPv6 peers (None: no such peers,
        or no single address to send from)."""
        return self.bind_ip6 if self.bind_ip6 not in (None, "", "::") else None

    @property
    def tunnel_iif(self) -> str | None:
        """The tunnel TAP's name while it is in use: the FORWARD chain must accept what comes in on it."""
        return self._tap.name if self._tap is not None else None

    def offloads(self) -> dict[str, list[str]]:
        """Active offloads, for the agent's start-up log line."""
        out: dict[str, list[str]] = {}
        if self._tun is not None:
            out["tun"] = self._tun.offloads
        if self._rx is not None:
            out["rx"] = self._rx.offloads
        if self._pool:
            out["tx"] = list(self._pool[0].offloads)
        if self._tap is not None:  # (the udp format sends from its receive socket: no pool)
            out["tx"] = [*out.get("tx", []), "udp_tunnel_tap"]
        if self._rx6 is not None:
            out["rx6"] = self._rx6.offloads
        if self._tap is not None and self._tap.ipv6 and self._tap_src6 is not None:
            out["tx6"] = ["udp_tunnel_tap"]
        return out

    def _spawn(self, index: int, role: str) -> _Worker:
        assert self._rx is not None and self._counters is not None and self._tun is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        socks = [self._rx, *self._pool, *([self._rx6] if self._rx6 else []), *self._pool6]
        pool_fds = [s.fileno() for s in self._pool] or [self._rx.fileno()]
        pool6_fds = [s.fileno() for s in self._pool6] or ([self._rx6.fileno()] if self._rx6 else [])
        spec = {
            "engine": self.cfg.to_json(),
            "role": role,
            "index": index,
            "workers": self.workers,
            "tun": {
                "fd": self._tun.fd,
                "name": self._tun.name,
                "vnet": self._tun.vnet,
                "offload_flags": self._tun.offload_flags,
            },
            "rx_fd": self._rx.fileno(),
            "pool_fds": pool_fds,
            "rx6_fd": self._rx6.fileno() if self._rx6 else None,
            "pool6_fds": pool6_fds,
            "udp": {
                str(s.fileno()): {
                    "family": int(s.family),
                    "gso": s.gso,
                    "gro": s.gro,
                    "max_segments": s.max_segments,
                    "max_payload": s.max_payload,
                    "recv_slots": s.recv_slots,
                }
                for s in socks
            },
            "ctrl_fd": theirs.fileno(),
            "counters_fd": self._counters.fd,
            "tap": None,
        }
        fds = [self._tun.fd, theirs.fileno(), self._counters.fd, *(s.fileno() for s in socks)]
        if self._tap is not None:
            spec["tap"] = {
                "fd": self._tap.fd,
                "mac": self._tap.mac.hex(),
                "src_ip": self.bind_ip,
                # the outer source ports the split path sends from: vxlan's pool, the udp format's own port
                "ports": [s.address[1] for s in self._pool] or [self._rx.address[1]],
                "src_ip6": self._tap_src6 if self._tap.ipv6 else None,
                "ports6": [s.address[1] for s in self._pool6],
            }
            fds.append(self._tap.fd)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "udpflannel.dataplane.worker", json.dumps(spec)],
                pass_fds=tuple(sorted(set(fds))),
                close_fds=True,
            )
        finally:
            theirs.close()
        return _Worker(proc, ours, role)

    def _expect(self, w: _Worker, op: str, timeout: float, seq: int | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or w.proc.poll() is not None:
                raise DataplaneError(
                    f"worker {w.role} (pid {w.proc.pid}) did not answer {op!r} "
                    f"(exit code {w.proc.poll()}); see its stderr"
                )
            w.ctrl.settimeout(min(left, 0.5))
            try:
                msg = w.ctrl.recv(65536)
            except TimeoutError:
                continue
            if not msg:
                continue
            obj = json.loads(msg)
            if obj.get("op") == op and (seq is None or obj.get("seq") == seq):
                return

    def set_peers(self, peers: list[Peer]) -> None:
        """Replace every worker's peer table; returns once all applied it (traffic keeps flowing)."""
        self._peers = list(peers)
        self._seq += 1
        msg = json.dumps({"op": "peers", "seq": self._seq, "peers": [p.to_json() for p in peers]}).encode()
        for w in self._workers:
            w.ctrl.send(msg)
        for w in self._workers:
            self._expect(w, "peers_applied", ACK_TIMEOUT, self._seq)

    def check(self) -> bool:
        """Respawn any worker that exited and hand it the peer table; True when all were running. The TUN,
        the sockets and the counters belong to this process, so a new worker takes over where the dead
        one stopped (its counters row included) and nothing on the host changes."""
        dead = [i for i, w in enumerate(self._workers) if w.proc.poll() is not None]
        if not dead or self._tun is None:
            return True
        for i in dead:
            old = self._workers[i]
            log.error(
                "datapath worker %s (pid %d) exited with code %s: restarting it",
                old.role,
                old.proc.pid,
                old.proc.returncode,
            )
            old.ctrl.close()
            self._workers[i] = self._spawn(i, old.role)
            self.restarts += 1
            self._expect(self._workers[i], "ready", READY_TIMEOUT)
        if self._peers:
            self.set_peers(self._peers)
        return False

    def stats(self) -> dict[str, int]:
        """Counters summed over workers, how many workers are alive (a dead one is a bug to page on) and
        how many were restarted."""
        if self._counters is None:
            return {}
        out = self._counters.totals()
        out["workers_alive"] = sum(w.proc.poll() is None for w in self._workers)
        out["worker_restarts"] = self.restarts
        return out

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def stop(self) -> None:
        for w in self._workers:
            with contextlib.suppress(OSError):
                w.ctrl.send(b'{"op":"stop"}')
        for w in self._workers:
            try:
                w.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(timeout=3)
            w.ctrl.close()
        self._workers.clear()
        for s in [*self._pool, *self._pool6]:
            s.close()
        self._pool.clear()
        self._pool6.clear()
        if self._rx6 is not None:
            self._rx6.close()
            self._rx6 = None
        if self._rx is not None:
            self._rx.close()
            self._rx = None
        if self._tun is not None:
            self._tun.close()
            self._tun = None
        if self._tap is not None:
            self._tap.close()
            self._tap = None
        if self._counters is not None:
            self._counters.close()
            self._counters = None
