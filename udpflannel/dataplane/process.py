"""Dataplane: the control-plane handle on the datapath workers. It opens the TUN and the UDP sockets (cheap,
no heavy imports), starts worker process(es) that inherit them, sends peer tables over a control socket,
reads counters from shared memory, and on stop() ends the workers and closes everything (the TUN vanishes
with its last fd, taking its addresses and routes with it).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from udpflannel.dataplane.counters import Counters
from udpflannel.dataplane.engine import EngineConfig
from udpflannel.dataplane.peers import Peer
from udpflannel.dataplane.plainio import open_src_pool, open_tun, open_udp

READY_TIMEOUT = 10.0
ACK_TIMEOUT = 5.0
# "1": one worker does TX and RX; "2": one worker per direction. See perf/bench_vxlan.py for the numbers.
WORKERS_ENV = "UDPFLANNEL_WORKERS"
DEFAULT_WORKERS = 1


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
    _tun_fd: int = -1
    _rx: socket.socket | None = None
    _pool: list[socket.socket] = field(default_factory=list)
    _counters: Counters | None = None
    _workers: list[_Worker] = field(default_factory=list)
    _seq: int = 0

    def start(self) -> None:
        if not self.workers:
            self.workers = int(os.environ.get(WORKERS_ENV, DEFAULT_WORKERS))
        if self.workers not in (1, 2):
            raise ValueError(f"{WORKERS_ENV} must be 1 or 2, not {self.workers}")
        try:
            self._tun_fd = open_tun(self.tun_name)
            self._rx = open_udp(self.rx_bind_ip or self.bind_ip, self.rx_port)
            if self.cfg.encap == "vxlan":
                self._pool = open_src_pool(self.bind_ip, self.pool_size)
            self._counters = Counters(self.workers)
            roles = ["both"] if self.workers == 1 else ["tx", "rx"]
            for index, role in enumerate(roles):
                self._workers.append(self._spawn(index, role))
            for w in self._workers:
                self._expect(w, "ready", READY_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, index: int, role: str) -> _Worker:
        assert self._rx is not None and self._counters is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pool_fds = [s.fileno() for s in self._pool] or [self._rx.fileno()]
        spec = {
            "engine": self.cfg.to_json(),
            "role": role,
            "index": index,
            "workers": self.workers,
            "tun_fd": self._tun_fd,
            "rx_fd": self._rx.fileno(),
            "pool_fds": pool_fds,
            "ctrl_fd": theirs.fileno(),
            "counters_fd": self._counters.fd,
        }
        fds = (self._tun_fd, self._rx.fileno(), theirs.fileno(), self._counters.fd, *pool_fds)
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
        self._seq += 1
        msg = json.dumps({"op": "peers", "seq": self._seq, "peers": [p.to_json() for p in peers]}).encode()
        for w in self._workers:
            w.ctrl.send(msg)
        for w in self._workers:
            self._expect(w, "peers_applied", ACK_TIMEOUT, self._seq)

    def stats(self) -> dict[str, int]:
        return self._counters.totals() if self._counters else {}

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
        for s in self._pool:
            s.close()
        self._pool.clear()
        if self._rx is not None:
            self._rx.close()
            self._rx = None
        if self._tun_fd >= 0:
            os.close(self._tun_fd)
            self._tun_fd = -1
        if self._counters is not None:
            self._counters.close()
            self._counters = None
