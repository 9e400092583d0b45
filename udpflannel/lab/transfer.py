"""A sha256-checked TCP transfer between two namespaces, the TCP senders' reordering counters, and JSON-line
reading from helper processes: what the interop tests, the benchmarks and the lab use to prove bytes
crossed the overlay intact and in order."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time

from udpflannel.lab.netns import LabError, Netns

# Receiver: accept one connection, hash what arrives, answer "<bytes> <sha256>". IPv4 or IPv6 by address.
SINK = r"""
import hashlib, socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(float(sys.argv[3]))
print("listening", flush=True)
c, _ = s.accept()
c.settimeout(float(sys.argv[3]))
h = hashlib.sha256()
n = 0
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    h.update(d)
    n += len(d)
c.sendall(f"{n} {h.hexdigest()}".encode())
c.close()
"""

# Sender: a 64 KiB pattern varied per chunk (so reordering or duplication changes the hash), then print
# "<sent> <sha256> <seconds> <receiver's bytes> <receiver's sha256>".
SOURCE = r"""
import hashlib, socket, sys, time
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
total = int(sys.argv[3])
seed = hashlib.sha256(b"udpflannel").digest() * 2048
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4]))
h = hashlib.sha256()
sent = 0
i = 0
t0 = time.monotonic()
while sent < total:
    chunk = (i.to_bytes(8, "big") + seed)[: min(len(seed), total - sent)]
    s.sendall(chunk)
    h.update(chunk)
    sent += len(chunk)
    i += 1
s.shutdown(socket.SHUT_WR)
reply = b""
while True:
    d = s.recv(4096)
    if not d:
        break
    reply += d
print(f"{sent} {h.hexdigest()} {time.monotonic() - t0:.3f} {reply.decode()}", flush=True)
"""


def checked_transfer(
    src: Netns, dst: Netns, dst_ip: str, nbytes: int, port: int = 7000, timeout: float = 60
) -> float:
    """Send nbytes over TCP from src to dst_ip (an address inside dst); raise LabError unless both ends saw
    the same length and sha256. Returns the sender's seconds."""
    sink = dst.popen(
        sys.executable, "-c", SINK, dst_ip, str(port), str(timeout), stdout=subprocess.PIPE, text=True
    )
    assert sink.stdout is not None
    ready, _, _ = select.select([sink.stdout], [], [], 10)
    if not ready or sink.stdout.readline().strip() != "listening":
        raise LabError(f"the transfer sink on {dst_ip}:{port} did not start")
    out = src.exec(
        sys.executable, "-c", SOURCE, dst_ip, str(port), str(nbytes), str(timeout), timeout=timeout + 10
    )
    sent, digest, seconds, got_n, got_digest = out.split()
    if not (int(sent) == nbytes == int(got_n) and digest == got_digest):
        raise LabError(
            f"transfer to {dst_ip} corrupted: sent {sent} bytes {digest}, received {got_n} {got_digest}"
        )
    sink.wait(timeout=10)
    return float(seconds)


REORDER_COUNTERS = ("TcpExtTCPSACKReorder", "TcpExtTCPTSReorder", "TcpExtTCPRenoReorder")


def reordering_seen(ns: Netns) -> dict[str, int]:
    """The TCP senders' reordering counters in `ns` that are not 0 (nstat, absolute: a namespace counts
    from its creation; -s: no history file left in /tmp). A sender counts reordering only when a segment it
    took for lost arrives after all, never for a plain loss, so anything here means something on the path
    reordered a flow."""
    out = ns.exec("nstat", "-asz", *REORDER_COUNTERS)
    seen = {line.split()[0]: int(line.split()[1]) for line in out.splitlines() if line.startswith("Tcp")}
    if set(seen) != set(REORDER_COUNTERS):
        raise LabError(f"nstat in {ns.name} did not report {', '.join(REORDER_COUNTERS)}: {out.strip()!r}")
    return {k: v for k, v in seen.items() if v}


def read_json_line(proc: subprocess.Popen, key: str, timeout: float, who: str = "helper") -> dict:
    """The next JSON line on proc's stdout that has `key`, waiting at most `timeout` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        obj = json.loads(line)
        if key in obj:
            return obj
    raise LabError(f"no {key!r} from the {who} (exit code {proc.poll()})")
