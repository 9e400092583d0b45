"""The WireGuard datapath worker process around dataplane/wg_engine.py.

`python -m udpflannel.dataplane.wg_worker --tun NAME --port P [--mtu M]`: the worker opens its TUN and UDP
socket, then reads JSON lines on stdin: first {"op": "key", "private_key": b64, "timing": {...}?} (never on
the command line), then any of {"op": "peers", "peers": [...]}, {"op": "stats"}, {"op": "handshake"}
(initiate with every peer now), {"op": "under_load", "on": bool}, {"op": "stop"}. It answers JSON lines on
stdout ({"ready": ...}, {"stats": ...}, {"applied": n}, ...). EOF on stdin (the agent is gone) stops it.
The clock is read here (time.monotonic), once per loop turn.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import select
import signal
import socket
import sys
import time

from udpflannel.codec.wireguard import messages as wgm
from udpflannel.codec.wireguard.batch import SealedBatch, open_batch, seal_batch
from udpflannel.codec.wireguard.events import Reply
from udpflannel.codec.wireguard.session import Device
from udpflannel.codec.wireguard.timers import Timing
from udpflannel.dataplane.wg_engine import (
    BATCH,
    HEADROOM,
    MAX_BATCHES_PER_WAKE,
    WgEngine,
    WgPeerConfig,
)
from udpflannel.io.tun import Tun
from udpflannel.io.udp import UdpSocket

log = logging.getLogger(__name__)


class _Control:
    """JSON lines on a non-blocking fd (stdin), answers on stdout."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        os.set_blocking(fd, False)

    def read(self) -> list[dict] | None:
        """Complete messages waiting; None at EOF (the agent is gone)."""
        try:
            chunk = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return []
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("control: ignoring a line that is not JSON")
        return out


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def parse_timing(obj: dict | None) -> Timing:
    """Shortened timers for tests: {"rekey_after_time": 5, ...}; missing keys keep the spec's values."""
    if not obj:
        return Timing()
    return Timing(**{k: type(getattr(Timing(), k))(v) for k, v in obj.items()})


def run(args: argparse.Namespace) -> int:
    ctrl = _Control(sys.stdin.fileno())
    # The private key arrives first, on stdin (a command line is world-readable in /proc).
    key_msg: dict | None = None
    deadline = time.monotonic() + 30
    while key_msg is None and time.monotonic() < deadline:
        select.select([ctrl.fd], [], [], 1.0)
        msgs = ctrl.read()
        if msgs is None:
            return 1
        for msg in msgs:
            if msg.get("op") == "key":
                key_msg = msg
    if key_msg is None:
        log.error("no private key on stdin within 30 s")
        return 1
    private_key = base64.b64decode(key_msg["private_key"])
    wall_offset = time.time() - time.monotonic()
    tun = Tun.open(args.tun, offload=None if args.offload else False)
    family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
    udp = UdpSocket.open(family, args.bind, args.port, recv_slots=BATCH, headroom=HEADROOM)
    device = Device(
        private_key, timing=parse_timing(key_msg.get("timing")), wall_offset=wall_offset, mtu=args.mtu
    )
    engine = WgEngine(device, tun, udp)
    # Run the codec once, so the first handshake does not pay for first-use costs (the engine's receive
    # arena was allocated with it; UdpSocket's own, unused here, is never made).
    warm_up()
    stopping = False

    def _term(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _term)
    # Ctrl-C reaches the terminal's whole process group: the agent handles it and stops us in order
    # (control socket), so here it would only print a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    emit({"ready": True, "pid": os.getpid(), "tun_offloads": tun.offloads, "udp_offloads": udp.offloads})
    poller = select.poll()
    for fd in (ctrl.fd, tun.fileno(), udp.fileno()):
        poller.register(fd, select.POLLIN)
    try:
        while not stopping:
            deadline = device.next_timer()
            now = time.monotonic()
            wait_ms = 500 if deadline is None else max(0, min(500, int((deadline - now) * 1000) + 1))
            try:
                ready = {fd for fd, _ in poller.poll(wait_ms)}
            except InterruptedError:
                continue
            now = time.monotonic()
            if ctrl.fd in ready and not _control(ctrl, engine, wall_offset, now):
                break
            # Each fd is served until a call finds its queue empty; then the next poll says when more comes.
            for _ in range(MAX_BATCHES_PER_WAKE):
                moved = 0
                if tun.fileno() in ready:
                    moved += engine.tx_once(now)
                    if engine.tx_drained:
                        ready.discard(tun.fileno())
                if udp.fileno() in ready:
                    moved += engine.rx_once(now)
                    if engine.rx_arena.drained:
                        ready.discard(udp.fileno())
                if moved == 0 or not ready - {ctrl.fd}:
                    break
                now = time.monotonic()
            engine.run_timers(now)
    finally:
        udp.close()
        tun.close()
    return 0


def _control(ctrl: _Control, engine: WgEngine, wall_offset: float, now: float) -> bool:
    msgs = ctrl.read()
    if msgs is None:
        return False
    for msg in msgs:
        op = msg.get("op")
        if op == "peers":
            engine.set_peers([WgPeerConfig.from_json(p) for p in msg.get("peers", [])], now)
            emit({"applied": len(engine.device.peers), "seq": msg.get("seq", 0)})
        elif op == "stats":
            emit({"stats": engine.stats(wall_offset), "seq": msg.get("seq", 0)})
        elif op == "handshake":
            # After a restart nobody knows our new sessions: start them now rather than when a peer's
            # 15 s no-reply timer fires.
            for key in list(engine.device.peers):
                engine.send_events(engine.device.initiate(key, now))
            emit({"handshake": len(engine.device.peers), "seq": msg.get("seq", 0)})
        elif op == "under_load":
            engine.device.force_under_load = bool(msg.get("on"))
            emit({"under_load": engine.device.force_under_load, "seq": msg.get("seq", 0)})
        elif op == "stop":
            return False
    return True


def warm_up() -> None:
    """One handshake and one transport message between two throwaway devices, so the first real handshake
    does not pay for first-use costs (crypto contexts, code paths): it is the latency a peer sees."""
    from udpflannel.codec.wireguard import crypto

    keys = [crypto.generate_private_key(os.urandom(32)) for _ in range(2)]
    a, b = Device(keys[0]), Device(keys[1])
    a.add_peer(b.identity.public, endpoint=("198.18.0.2", 1))
    b.add_peer(a.identity.public, endpoint=("198.18.0.1", 1))
    init = a.initiate(b.identity.public, 0.0)
    resp = b.receive_datagram(init[0].data, ("198.18.0.1", 1), 0.0) if init else []
    if resp and isinstance(resp[0], Reply):
        a.receive_datagram(resp[0].data, ("198.18.0.2", 1), 0.0)
    packet = bytes([0x45, 0, 0, 20]) + bytes(16)
    out = bytearray(256)
    sealed = seal_batch(a, b.identity.public, [packet], out, 0.0)
    if isinstance(sealed, SealedBatch):
        open_batch(b, [memoryview(out)[: sealed.sizes[0]]], ("198.18.0.1", 1), 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m udpflannel.dataplane.wg_worker", description=__doc__)
    ap.add_argument("--tun", required=True, help="TUN device name (created, gone when we exit)")
    ap.add_argument("--port", type=int, default=wgm.DEFAULT_PORT)
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--mtu", type=int, default=0, help="TUN MTU: caps WireGuard padding as wireguard-go does")
    ap.add_argument("--no-offload", dest="offload", action="store_false")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="udpflannel-wg[%(process)d] %(levelname)s %(message)s")
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: never outlive the agent
    except (OSError, AttributeError):
        pass
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
