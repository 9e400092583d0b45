"""A small-packet UDP generator and counter for packet-rate benchmarks: sendmmsg and recvmmsg of up to 64
datagrams a call, so neither end is the bottleneck the way one iperf3 sendto per packet is (its sender
spins a whole core at ~0.5 Mpps on these machines, a core the datapath under test then lacks).

  udp_flood.py recv --port P --seconds S         count datagrams for S seconds; prints JSON
  udp_flood.py send --dst A --port P --seconds S [--size 64] [--batch 64] [--rate PPS]

Run each inside a benchmark's network namespace (`ip netns exec`); only addresses the benchmark gives it
are used. The receiver prints {"received": n, "first": t0, "last": t1} (monotonic seconds of the first
and last datagram); the sender prints {"sent": n, "seconds": s, "calls": c}.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import time

import numpy as np

from udpflannel.io.mmsg import IOVEC_DTYPE, MMSGHDR_DTYPE, MmsgArena, sendmmsg

MAX_BATCH = 64
RCVBUF = 8 << 20


def _headers(buf: np.ndarray, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """count mmsghdrs with one iovec each, no name (a connected socket): datagram i is
    buf[i * size : (i + 1) * size]."""
    iov = np.zeros(count, IOVEC_DTYPE)
    iov["base"] = buf.ctypes.data + np.arange(count, dtype=np.uint64) * np.uint64(size)
    iov["len"] = size
    hdrs = np.zeros(count, MMSGHDR_DTYPE)
    hdrs["iov"] = iov.ctypes.data + np.arange(count, dtype=np.uint64) * np.uint64(IOVEC_DTYPE.itemsize)
    hdrs["iovlen"] = 1
    return hdrs, iov


def send(dst: str, port: int, seconds: float, size: int, batch: int, rate: float) -> dict:
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.connect((dst, port))
    batch = max(1, min(batch, MAX_BATCH))
    payload = np.zeros(size * batch, np.uint8)
    hdrs, _iov = _headers(payload, batch, size)  # _iov: kept alive while hdrs point at it
    sent = calls = 0
    start = time.monotonic()
    deadline = start + seconds
    now = start
    while now < deadline:
        got = sendmmsg(sock.fileno(), hdrs, batch)
        calls += 1
        sent += max(got, 0)
        now = time.monotonic()
        if rate > 0:
            ahead = sent / rate - (now - start)
            if ahead > 0:
                time.sleep(ahead)
                now = time.monotonic()
        elif got <= 0:
            select.select([], [sock], [], 0.01)  # the socket's buffer is full: wait for room, bounded
            now = time.monotonic()
    sock.close()
    return {"sent": sent, "seconds": now - start, "calls": calls}


def recv(port: int, seconds: float, family: int) -> dict:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE (root), else the sysctl cap
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    arena = MmsgArena(MAX_BATCH, 2048, control=False)
    received = 0
    first = last = 0.0
    deadline = time.monotonic() + seconds
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        got = arena.recv(sock.fileno())
        if got > 0:
            received += got
            last = now
            if not first:
                first = now
            continue
        select.select([sock], [], [], min(0.05, deadline - now))
    sock.close()
    return {"received": received, "first": first, "last": last}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--seconds", type=float, required=True)
    r.add_argument("--ipv6", action="store_true")
    s = sub.add_parser("send")
    s.add_argument("--dst", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--seconds", type=float, required=True)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--batch", type=int, default=MAX_BATCH)
    s.add_argument("--rate", type=float, default=0.0, help="datagrams per second (0: as fast as it goes)")
    args = ap.parse_args(argv)
    if args.cmd == "recv":
        out = recv(args.port, args.seconds, socket.AF_INET6 if args.ipv6 else socket.AF_INET)
    else:
        out = send(args.dst, args.port, args.seconds, args.size, args.batch, args.rate)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
