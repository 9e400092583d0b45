"""Network namespaces and veth links for the lab, tests and benchmarks, with guaranteed cleanup.

Every name carries a per-run prefix so parallel runs never collide, and every address handed out here is in
198.18.0.0/15 (the safety rule of DESIGN.md). Uses the `ip` command: it is what a reader would type by hand.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import secrets
import shlex
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

SAFE_RANGE_V4 = ipaddress.ip_network("198.18.0.0/15")
SAFE_RANGE_V6 = ipaddress.ip_network("fd00:198::/32")
SWITCH_DEV = "br0"  # the bridge inside a switch namespace (Lab.switch, a topology's `kind: bridge`)
SERVICE_ADDR = "198.18.0.1"  # the loopback address of a Lab.private namespace: tests' own servers listen here
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


def check_safe_address(addr: str) -> None:
    """Refuse any address outside the project's test ranges (DESIGN.md, test and lab safety)."""
    ip = ipaddress.ip_interface(addr).ip
    rng = SAFE_RANGE_V4 if ip.version == 4 else SAFE_RANGE_V6
    if ip not in rng:
        raise LabError(f"address {addr} is outside {rng}: tests and the lab may only use that range")


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30, input: str | None = None) -> str:
    """Run a command, return its stdout; raise LabError with stderr on failure."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise LabError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def run_prefix() -> str:
    """A short per-run prefix for namespace and link names (link names have 15 characters at most)."""
    return "u" + secrets.token_hex(2)


def exit_on_sigterm() -> None:
    """Make SIGTERM (timeout(1), a CI runner's stop) raise SystemExit, as Ctrl-C raises KeyboardInterrupt,
    so `with Lab()` blocks and finally clauses remove what they made instead of leaving namespaces, links and
    peer processes behind. For the main thread of a lab or benchmark command."""

    def _raise(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """The calling thread inside netns `name` for the block, then back where it was: the sockets it opens
    and the threads and processes it starts meanwhile belong to that namespace."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {name} failed")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back failed")
    finally:
        os.close(home)


def call_in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run fn in a short-lived thread that joined netns `name`: sockets and TUN devices it creates belong to
    that namespace and stay usable from any thread afterwards. The calling thread's namespace is untouched."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            with in_netns(name):
                box["value"] = fn()
        except BaseException as exc:  # handed back to the caller below
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=30)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


@dataclass
class Netns:
    """One network namespace; `exec` runs a command inside it."""

    name: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def exec(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        return run(self.cmd(*args), check=check, timeout=timeout)

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        """Start a background process inside the namespace; it is killed when the namespace is removed."""
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(self.cmd(*args), start_new_session=True, **kwargs)
        self.processes.append(proc)
        return proc

    def stop_processes(self, timeout: float = 5) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.processes:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        self.processes.clear()


class Lab:
    """A set of namespaces and links made for one test/lab run; close() (or `with`) removes all of it."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or run_prefix()
        self.namespaces: dict[str, Netns] = {}

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def netns(self, short: str) -> Netns:
        """Create namespace `<prefix>-<short>` with loopback up."""
        name = f"{self.prefix}-{short}"
        run(["ip", "netns", "add", name])
        ns = Netns(name)
        self.namespaces[short] = ns
        ns.exec("ip", "link", "set", "lo", "up")
        ns.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
        ns.exec("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", check=False)
        return ns

    def private(self, short: str) -> Netns:
        """A namespace of its own with SERVICE_ADDR on its loopback, for the servers and clients of one test
        or benchmark process (see in_netns): their traffic never leaves it."""
        ns = self.netns(short)
        ns.exec("ip", "addr", "add", f"{SERVICE_ADDR}/32", "dev", "lo")
        return ns

    def veth(
        self,
        a: Netns,
        b: Netns,
        addr_a: str | None,
        addr_b: str | None,
        *,
        name_a: str = "eth0",
        name_b: str = "eth0",
        mtu: int = 1500,
        wire_mode: bool = True,
    ) -> None:
        """Join two namespaces with a veth pair; an end whose address is None stays unaddressed (a switch
        port). Wire mode (`ethtool -K tx off gro on`) makes frames look as they do on a real NIC: fully
        checksummed and <= MTU (spec/fastpath.md, veth checksum trap)."""
        for addr in (addr_a, addr_b):
            if addr is not None:
                check_safe_address(addr)
        tmp_a, tmp_b = f"{self.prefix}{secrets.token_hex(2)}", f"{self.prefix}{secrets.token_hex(2)}"
        run(["ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b])
        try:
            run(["ip", "link", "set", tmp_a, "netns", a.name])
            run(["ip", "link", "set", tmp_b, "netns", b.name])
        except LabError:
            run(["ip", "link", "del", tmp_a], check=False)
            raise
        for ns, tmp, name, addr in ((a, tmp_a, name_a, addr_a), (b, tmp_b, name_b, addr_b)):
            ns.exec("ip", "link", "set", tmp, "name", name)
            ns.exec("ip", "link", "set", name, "mtu", str(mtu))
            if addr is not None:
                ns.exec("ip", "addr", "add", addr, "dev", name)
            ns.exec("ip", "link", "set", name, "up")
            if wire_mode:
                ns.exec("ethtool", "-K", name, "tx", "off", "gro", "on")

    def switch(self, short: str) -> Netns:
        """A namespace holding one Linux bridge, SWITCH_DEV, for `plug` to attach namespaces to."""
        ns = self.netns(short)
        make_switch(ns)
        return ns

    def plug(self, ns: Netns, switch: Netns, addr: str, port: str, *, name: str = "eth0") -> None:
        """Give `ns` an interface `name` (address `addr`) on `switch`'s bridge, through its port `port`."""
        self.veth(ns, switch, addr, None, name_a=name, name_b=port)
        switch.exec("ip", "link", "set", port, "master", SWITCH_DEV)

    def close(self) -> None:
        for ns in self.namespaces.values():
            ns.stop_processes()
        for ns in self.namespaces.values():
            # Deleting the namespace removes every link inside it (veth peers go with their other end).
            for pid in run(["ip", "netns", "pids", ns.name], check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", ns.name], check=False)
        self.namespaces.clear()


def make_switch(ns: Netns) -> None:
    """Make SWITCH_DEV, a Linux bridge, in `ns` and bring it up."""
    ns.exec("ip", "link", "add", SWITCH_DEV, "type", "bridge")
    ns.exec("ip", "link", "set", SWITCH_DEV, "up")


def leftover_namespaces(prefix: str) -> list[str]:
    """Namespaces whose name starts with `prefix-` (for tests that check cleanup)."""
    out = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{prefix}-")]
