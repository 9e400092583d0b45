"""A real etcd (Debian's /usr/bin/etcd, 3.4+) for tests on SERVICE_ADDR (the loopback of the namespace the
lease tests run in, tests/conftest.py private_net), free ports, temp data dir.

Import from test modules and conftest.py in this folder (`from etcd_server import EtcdServer`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from udpflannel.lab.netns import SERVICE_ADDR

ETCD_BINARY = "/usr/bin/etcd"
START_TIMEOUT = 15.0


def etcd_available() -> bool:
    return os.access(ETCD_BINARY, os.X_OK)


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: all bound at once, since a port just released can be handed out again."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind((SERVICE_ADDR, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class EtcdServer:
    """One single-member etcd. start() may be called again after kill()/stop(): same ports, same data dir."""

    data_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="udpflannel-etcd-"))
    client_port: int = 0  # 0: a free port, chosen in __post_init__
    peer_port: int = 0
    extra_args: list[str] = field(default_factory=list)
    tls: tuple[str, str] | None = (
        None  # (cert, key): serve https and require client certificates signed by cert
    )
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        client, peer = _free_ports(2)
        self.client_port = self.client_port or client
        self.peer_port = self.peer_port or peer

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://{SERVICE_ADDR}:{self.client_port}"

    def start(self) -> None:
        peer = f"http://{SERVICE_ADDR}:{self.peer_port}"
        os.makedirs(self.data_dir, exist_ok=True)
        log = open(os.path.join(self.data_dir, "etcd.log"), "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [
                ETCD_BINARY,
                "--name=test",
                f"--data-dir={os.path.join(self.data_dir, 'data')}",
                f"--listen-client-urls={self.endpoint}",
                f"--advertise-client-urls={self.endpoint}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=test={peer}",
                "--log-level=error",
                "--logger=zap",
                *self.extra_args,
                *(self._tls_args() if self.tls else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.data_dir}/etcd.log")
            if self._ready():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"etcd did not become healthy within {START_TIMEOUT}s")

    def _tls_args(self) -> list[str]:
        cert, key = self.tls or ("", "")
        return [f"--cert-file={cert}", f"--key-file={key}", f"--trusted-ca-file={cert}", "--client-cert-auth"]

    def _ready(self) -> bool:
        if self.tls:  # a client certificate is needed for any request: a TCP connect will do
            with socket.socket() as sock:
                return sock.connect_ex((SERVICE_ADDR, self.client_port)) == 0
        try:
            with urllib.request.urlopen(f"{self.endpoint}/version", timeout=1) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False  # not listening yet

    def kill(self) -> None:
        """SIGKILL, as a crash would: the data dir stays for a restart."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
