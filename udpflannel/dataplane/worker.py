"""The datapath worker process: `python -m udpflannel.dataplane.worker '<json>'`, started by
dataplane/process.py with the TUN fd, the UDP socket fds, a control socket and the counters memfd inherited.

A fresh interpreter, so it carries only numpy and our codecs (no pyroute2, no store clients). It polls the
TUN, the receive socket and the control socket; control messages (peer tables, stop)
are applied between batches.
It exits when told to, when the control socket closes (the agent died), or on SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import sys

from udpflannel.dataplane.counters import Counters
from udpflannel.dataplane.engine import HEADROOM, Engine, EngineConfig
from udpflannel.dataplane.peers import Peer
from udpflannel.io.tun import Tun
from udpflannel.io.udp import UdpSocket

POLL_MS = 500
# A superpacket's first part, held for its rest (dataplane/rx_hold.py), waits this long for it before the
# worker sleeps: the sender sent both in one sendmmsg, so the rest is microseconds behind, if it comes.
HOLD_WAIT_S = 0.0002
# Bound the work done for one readiness event so TX, RX and control all get a turn.
MAX_BATCHES_PER_WAKE = 16


def _handle_control(ctrl: socket.socket, engine: Engine) -> bool:
    """Apply waiting control messages; False means stop."""
    while True:
        try:
            msg = ctrl.recv(1 << 22)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not msg:
            return False  # the agent is gone: stop rather than forward with a stale table
        try:
            obj = json.loads(msg)
        except ValueError:
            continue
        if obj.get("op") == "peers":
            engine.set_peers([Peer.from_json(p) for p in obj.get("peers", [])])
            ctrl.send(json.dumps({"op": "peers_applied", "seq": obj.get("seq", 0)}).encode())
        elif obj.get("op") == "stop":
            return False


def _udp_socket(fd: int, probed: dict) -> UdpSocket:
    """Wrap an inherited socket with the offloads the parent probed (no second probe in the worker)."""
    sock = socket.socket(fileno=fd)
    return UdpSocket(
        sock,
        probed["family"],
        gso=probed["gso"],
        gro=probed["gro"],
        max_segments=probed["max_segments"],
        max_payload=probed["max_payload"],
        recv_slots=probed["recv_slots"],
        headroom=HEADROOM,
    )


def run(spec: dict) -> int:
    cfg = EngineConfig.from_json(spec["engine"])
    role = spec.get("role", "both")
    counters = Counters(spec["workers"], fd=spec["counters_fd"])
    t = spec["tun"]
    tun = Tun.from_fd(t["fd"], t["name"], vnet=t["vnet"], offload_flags=t["offload_flags"])
    rx6_fd = spec.get("rx6_fd")
    fds = {spec["rx_fd"], *spec["pool_fds"], *spec.get("pool6_fds", []), *([rx6_fd] if rx6_fd else [])}
    socks = {fd: _udp_socket(fd, spec["udp"][str(fd)]) for fd in fds}
    rx = socks[spec["rx_fd"]]
    pool = [socks[fd] for fd in spec["pool_fds"]]
    rx6 = socks[rx6_fd] if rx6_fd else None
    pool6 = [socks[fd] for fd in spec.get("pool6_fds", [])]
    ctrl = socket.socket(fileno=spec["ctrl_fd"])
    ctrl.setblocking(False)
    engine = Engine(cfg, tun, rx, pool, counters.row(spec["index"]), rx6=rx6, pool6=pool6)
    engine.hold_runs = True  # a superpacket's two trains as one TUN write (dataplane/rx_hold.py)
    tap = spec.get("tap")
    if tap and role in ("both", "tx"):
        engine.use_tunnel(
            tap["fd"],
            bytes.fromhex(tap["mac"]),
            tap["src_ip"],
            tap["ports"],
            src_ip6=tap.get("src_ip6"),
            ports6=tap.get("ports6") or [],
        )

    stopping = False

    def _term(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _term)
    # Ctrl-C reaches the terminal's whole process group: the agent handles it and stops us in order
    # (control socket), so here it would only print a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    poller = select.poll()
    poller.register(ctrl.fileno(), select.POLLIN)
    if role in ("both", "tx"):
        poller.register(tun.fileno(), select.POLLIN)
    if role in ("both", "rx"):
        poller.register(rx.fileno(), select.POLLIN)
        if rx6 is not None:
            poller.register(rx6.fileno(), select.POLLIN)
    ctrl.send(json.dumps({"op": "ready", "pid": os.getpid()}).encode())
    tun_fd, rx_fd, ctrl_fd = tun.fileno(), rx.fileno(), ctrl.fileno()
    rx6_poll_fd = rx6.fileno() if rx6 is not None else -1
    rx_fds = [fd for fd in (rx_fd, rx6_poll_fd) if fd >= 0] if role in ("both", "rx") else []
    while not stopping:
        try:
            events = poller.poll(POLL_MS)
        except InterruptedError:
            continue
        ready = {fd for fd, _ in events}
        if ctrl_fd in ready and not _handle_control(ctrl, engine):
            break
        # Each fd is served until a call finds its queue empty; then the next poll says when more comes
        # (an empty TUN read costs ~6.5 us, a wake-up at a moderate rate holds one batch each way).
        for _ in range(MAX_BATCHES_PER_WAKE):
            moved = 0
            if tun_fd in ready:
                moved += engine.tx_once()
                if engine.tx_drained:
                    ready.discard(tun_fd)
            if rx_fd in ready:
                moved += engine.rx_once()
                if rx.drained:
                    ready.discard(rx_fd)
            if rx6_poll_fd in ready:
                moved += engine.rx_once(rx6)
                if rx6 is not None and rx6.drained:
                    ready.discard(rx6_poll_fd)
            if moved == 0 or not ready - {ctrl_fd}:
                break
        if engine.holding and select.select(rx_fds, [], [], HOLD_WAIT_S)[0]:
            continue  # its rest (or anything else) is here: receive it now, joined or after it
        engine.flush_held()  # nothing came: the held part is written as it is
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="udpflannel-worker[%(process)d] %(levelname)s %(message)s"
    )
    spec = json.loads(argv[0])
    # A worker must never outlive its agent: the control socket closing is the usual signal, this a backstop.
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    return run(spec)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
