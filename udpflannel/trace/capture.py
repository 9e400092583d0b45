"""tcpdump captures inside lab namespaces: start several, wait until each is really listening, stop them all
(also on failure), then read their frames back from the pcap files."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from scapy.utils import RawPcapReader

READY_TIMEOUT = 5.0  # tcpdump needs well under a second to open an interface; 5 s bounds a broken one
STOP_TIMEOUT = 3.0


class CaptureError(RuntimeError):
    """tcpdump could not start on a hop; the message carries its stderr."""


@dataclass(frozen=True, slots=True)
class Frame:
    data: bytes
    time: float  # Unix time from the pcap record
    linktype: int


@dataclass
class Capture:
    """One tcpdump on one interface of one namespace, writing `pcap`."""

    ns: str
    iface: str
    pcap: Path
    bpf: str
    proc: subprocess.Popen | None = None
    stderr: list[str] = field(default_factory=list)
    error: str | None = None  # why this capture never started (the other hops still run)

    def command(self) -> list[str]:
        # -U and --immediate-mode: each packet reaches the file as it arrives, not when a kernel ring block
        # fills (a stopped tcpdump would lose them); -Z root: keep root to write into the lab directory.
        return ["ip", "netns", "exec", self.ns, "tcpdump", "-i", self.iface, "-w", str(self.pcap), "-U", "-n",
                "--immediate-mode",
                "-Z", "root", *self.bpf.split()]  # fmt: skip

    def frames(self) -> list[Frame]:
        if not self.pcap.exists() or self.pcap.stat().st_size == 0:
            return []
        out = []
        with contextlib.closing(RawPcapReader(str(self.pcap))) as reader:
            linktype = int(reader.linktype)
            for data, meta in reader:
                out.append(Frame(bytes(data), meta.sec + meta.usec / 1e6, linktype))
        return out


class CaptureSet:
    """Several captures started together; `with` guarantees every tcpdump is stopped."""

    def __init__(self, captures: list[Capture]) -> None:
        self.captures = captures

    def __enter__(self) -> CaptureSet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = READY_TIMEOUT, *, strict: bool = False) -> None:
        """Start every capture; one that cannot start (device down or missing) gets `error` set, or with
        `strict` raises CaptureError."""
        for cap in self.captures:
            cap.pcap.parent.mkdir(parents=True, exist_ok=True)
            cap.proc = subprocess.Popen(
                cap.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        for cap in self.captures:
            try:
                self._wait_listening(cap, deadline)
            except CaptureError as exc:
                if strict:
                    raise
                cap.error = str(exc)

    @staticmethod
    def _wait_listening(cap: Capture, deadline: float) -> None:
        """tcpdump says "listening on <iface>" on stderr once its socket is open: only then may we send."""
        assert cap.proc is not None and cap.proc.stderr is not None
        fd = cap.proc.stderr.fileno()
        buf = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            if b"listening on" in buf:
                cap.stderr.append(buf.decode(errors="replace").strip())
                return
        cap.stderr.append(buf.decode(errors="replace").strip())
        raise CaptureError(f"tcpdump on {cap.ns}/{cap.iface} did not start: {cap.stderr[-1] or 'no output'}")

    def stop(self) -> None:
        for cap in self.captures:
            if cap.proc is not None and cap.proc.poll() is None:
                # SIGINT: tcpdump flushes and closes the pcap properly.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(cap.proc.pid, signal.SIGINT)
        for cap in self.captures:
            if cap.proc is None:
                continue
            try:
                cap.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(cap.proc.pid, signal.SIGKILL)
                cap.proc.wait(timeout=STOP_TIMEOUT)
            if cap.proc.stderr is not None:
                cap.proc.stderr.close()
