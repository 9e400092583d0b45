"""The WireGuard datapath worker: TUN <-> codec/wireguard <-> UDP, one batch at a time, in its own process.

TX: TUN read (superpackets with IFF_VNET_HDR) -> GSO split -> peer lookup (longest prefix over allowed IPs)
-> seal_batch per peer into one preallocated buffer -> one UDP_SEGMENT sendmsg per peer batch.
RX: recvmmsg with UDP_GRO -> open_batch in place (decrypt_into) -> GRO coalesce -> TUN writes.
Handshakes, cookies and timers run here too, since the Noise state lives beside the keys.

`python -m udpflannel.dataplane.wg_worker --tun NAME --port P [--mtu M]`: the worker opens its TUN and UDP
socket, then reads JSON lines on stdin: first {"op": "key", "private_key": b64} (never on the command line),
then {"op": "peers", "peers": [...]}, {"op": "stats"}, {"op": "under_load", "on": bool}, {"op": "stop"}.
It answers JSON lines on stdout ({"ready": ...}, {"stats": ...}, {"applied": n}). EOF on stdin stops it.
The clock is read here (time.monotonic), once per loop turn, and passed to the codec as `now`.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from udpflannel.codec.wireguard import messages as wgm
from udpflannel.codec.wireguard.batch import SealedBatch, open_batch, seal_batch
from udpflannel.codec.wireguard.events import Event, HandshakeCompleted, Reply
from udpflannel.codec.wireguard.session import Device
from udpflannel.codec.wireguard.timers import TimerKind, Timing
from udpflannel.dataplane.peers import NO_PEER, PeerTable
from udpflannel.dataplane.peers import Peer as TableRow
from udpflannel.io.tun import Tun, new_read_arena
from udpflannel.io.udp import UdpSocket
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.gro import coalesce
from udpflannel.packet.gso import split_superpacket
from udpflannel.packet.parse import validate_ip

log = logging.getLogger(__name__)

BATCH = 64  # TUN reads / datagrams per turn
HEADROOM = 32  # in front of every TUN packet: room for the 10-byte virtio header
MAX_BATCHES_PER_WAKE = 16
MAX_ERRORS_LOGGED = 5


@dataclass(frozen=True, slots=True)
class WgPeerConfig:
    """One peer as the worker is told about it by the backend."""

    public_key: bytes
    endpoint: tuple[str, int] | None
    allowed_ips: tuple[str, ...]
    preshared_key: bytes | None = None
    persistent_keepalive: int = 0

    def to_json(self) -> dict:
        return {
            "public_key": base64.b64encode(self.public_key).decode(),
            "endpoint": list(self.endpoint) if self.endpoint else None,
            "allowed_ips": list(self.allowed_ips),
            "psk": base64.b64encode(self.preshared_key).decode() if self.preshared_key else None,
            "keepalive": self.persistent_keepalive,
        }

    @classmethod
    def from_json(cls, obj: dict) -> WgPeerConfig:
        ep = obj.get("endpoint")
        return cls(
            public_key=base64.b64decode(obj["public_key"]),
            endpoint=(str(ep[0]), int(ep[1])) if ep else None,
            allowed_ips=tuple(obj.get("allowed_ips", ())),
            preshared_key=base64.b64decode(obj["psk"]) if obj.get("psk") else None,
            persistent_keepalive=int(obj.get("keepalive") or 0),
        )


@dataclass
class EngineCounters:
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_send_calls: int = 0
    tun_writes: int = 0
    handshakes: int = 0
    drops: Counter = field(default_factory=Counter)  # datapath drops that are not the codec's


class WgEngine:
    """Owns the Device and the peer table; the I/O objects are given (so tests may pass fakes)."""

    def __init__(self, device: Device, tun: Tun, udp: UdpSocket) -> None:
        self.device = device
        self.tun = tun
        self.udp = udp
        self.table = PeerTable([])
        self.row_keys: list[bytes] = []
        self.counters = EngineCounters()
        self.arena = new_read_arena(BATCH, HEADROOM)
        # One peer batch: BATCH messages of at most the TUN MTU plus WireGuard's 32 bytes and padding.
        largest = device.mtu or 65535
        self.out = bytearray(BATCH * (largest + wgm.MESSAGE_TRANSPORT_SIZE + wgm.PADDING_MULTIPLE))
        self._errors_logged = 0

    # -- peers

    def set_peers(self, peers: list[WgPeerConfig], now: float) -> None:
        """Reconcile the device's peers with `peers` (keys kept when a peer stays) and rebuild the table."""
        wanted = {p.public_key: p for p in peers}
        for key in list(self.device.peers):
            if key not in wanted:
                self.device.remove_peer(key)
        rows: list[TableRow] = []
        keys: list[bytes] = []
        for key, cfg in wanted.items():
            peer = self.device.peers.get(key)
            if peer is None:
                peer = self.device.add_peer(
                    key,
                    preshared_key=cfg.preshared_key,
                    endpoint=cfg.endpoint,
                    persistent_keepalive=cfg.persistent_keepalive,
                    allowed_ips=cfg.allowed_ips,
                )
                if cfg.persistent_keepalive:
                    # As wireguard-go when the interval is set: a keepalive now (which starts a handshake).
                    peer.timers.arm(TimerKind.PERSISTENT_KEEPALIVE, now)
            else:
                if cfg.endpoint is not None:
                    peer.endpoint = cfg.endpoint
                peer.handshake.preshared_key = cfg.preshared_key or bytes(32)
                peer.timers.persistent_keepalive_interval = cfg.persistent_keepalive
                peer.set_allowed_ips(cfg.allowed_ips)
            for cidr in cfg.allowed_ips:
                rows.append(TableRow(cidr, cfg.endpoint[0] if cfg.endpoint else "0.0.0.0"))
                keys.append(key)
        self.table = PeerTable(rows)
        self.row_keys = keys

    # -- TX

    def tx_once(self, now: float) -> int:
        read = self.tun.read_batch(BATCH, HEADROOM, self.arena)
        n = read.batch.n
        if n == 0:
            return 0
        try:
            split = read.needs_split()
            if not split.any():
                self._send_batch(read.batch, now)
            else:
                plain = read.batch.take(~split) if (~split).any() else None
                if plain is not None:
                    self._send_batch(plain, now)
                for i in np.flatnonzero(split).tolist():
                    segs = split_superpacket(read.batch.packet(i), read.header(i), 0)
                    if segs.n == 0:
                        self.counters.drops["bad_superpacket"] += 1
                        continue
                    self._send_batch(segs, now)
        except Exception:  # a bug must not stop the datapath: drop the batch, count it
            self._internal_error(n)
        return n

    def _send_batch(self, batch: PacketBatch, now: float) -> None:
        n = batch.n
        peer_rows = self.table.lookup_packets(batch.buf, batch.offset, n)
        unknown = peer_rows == NO_PEER
        if unknown.any():
            self.counters.drops["unknown_peer"] += int(unknown.sum())
        views = batch.views()
        # Group by peer, keeping each peer's packet order.
        keys = self.row_keys
        groups: dict[bytes, list[memoryview]] = {}
        for i, row in enumerate(peer_rows.tolist()):
            if row != NO_PEER:
                groups.setdefault(keys[row], []).append(views[i])
        for key, segs in groups.items():
            self._seal_and_send(key, segs, now)

    def _seal_and_send(self, key: bytes, segs: list[memoryview], now: float) -> None:
        for start in range(0, len(segs), BATCH):
            # BATCH segments of at most the TUN MTU always fit self.out (sized in __init__).
            chunk = segs[start : start + BATCH]
            res = seal_batch(self.device, key, chunk, self.out, now)
            if not isinstance(res, SealedBatch):
                continue  # Queued (handshake on its way) or Drop (counted by the device)
            if res.endpoint is None:
                self.counters.drops["no_endpoint"] += len(chunk)
                continue
            mv = memoryview(self.out)
            out_views, pos = [], 0
            for size in res.sizes:
                out_views.append(mv[pos : pos + size])
                pos += size
            calls_before, sent_before = self.udp.stats.send_calls, self.udp.stats.sent
            self.udp.send_segments(out_views, res.sizes[0], res.endpoint)
            # Datagrams the kernel took, from the socket's own count (one per segment, GSO or not).
            sent = self.udp.stats.sent - sent_before
            self.counters.tx_send_calls += self.udp.stats.send_calls - calls_before
            self.counters.tx_packets += sent
            self.counters.tx_bytes += sum(len(s) for s in chunk)
            if sent < len(chunk):
                self.counters.drops["send_error"] += len(chunk) - sent

    # -- RX

    def rx_once(self, now: float) -> int:
        rcv = self.udp.recv_batch(BATCH)
        b = rcv.batch
        n = b.n
        if n == 0:
            return 0
        try:
            self._receive(rcv, now)
        except Exception:  # a bug must not stop the datapath: drop the batch, count it
            self._internal_error(n)
        return n

    def _receive(self, rcv, now: float) -> None:
        b = rcv.batch
        n = b.n
        views = b.views()
        # Runs of datagrams from one source share one open_batch call (GRO trains always do).
        addr = rcv.src_addr.reshape(n, -1)
        same = np.ones(n, bool)
        same[1:] = (addr[1:] == addr[:-1]).all(axis=1) & (rcv.src_port[1:] == rcv.src_port[:-1])
        starts = [*np.flatnonzero(~same | (np.arange(n) == 0)).tolist(), n]
        rows: list[int] = []
        lengths: list[int] = []
        events: list[Event] = []
        for a, z in itertools.pairwise(starts):
            opened = open_batch(self.device, views[a:z], rcv.source(a), now)
            events.extend(opened.events)
            rows.extend(a + i for i in opened.indices)
            lengths.extend(len(v) for _, v in opened.delivered)
        if events:
            self.send_events(events)
        if not rows:
            return
        inner = self._inner_batch(b, rows, lengths)
        if self.tun.vnet:
            # GRO needs verified L4 checksums: the kernel trusts a coalesced NEEDS_CSUM packet.
            codes = validate_ip(inner, l4_checksum=True)
            bad = int(np.count_nonzero(codes))
            if bad:
                self.counters.drops["bad_inner_packet"] += bad
            writes = coalesce(inner, codes, vnet=True, gro=True)
        else:
            bad = 0
            writes = [(v,) for v in inner.views()]
        ok = self.tun.write_batch(writes)
        self.counters.tun_writes += ok
        if ok < len(writes):
            self.counters.drops["tun_write_error"] += len(writes) - ok
        self.counters.rx_packets += len(rows) - bad
        self.counters.rx_bytes += int(sum(lengths))

    @staticmethod
    def _inner_batch(b: PacketBatch, rows: list[int], lengths: list[int]) -> PacketBatch:
        """The decrypted inner packets as a batch, in place behind the 16-byte transport header."""
        offset = b.offset + wgm.MESSAGE_TRANSPORT_OFFSET_CONTENT
        idx = np.asarray(rows, np.intp)
        buf = b.buf[: len(rows)] if np.array_equal(idx, np.arange(len(rows))) else b.buf[idx]
        return PacketBatch(buf, np.asarray(lengths, np.int32), offset, len(rows))

    # -- handshake traffic and timers

    def send_events(self, events: list[Event]) -> None:
        items = []
        for ev in events:
            if isinstance(ev, HandshakeCompleted):
                self.counters.handshakes += 1
            elif isinstance(ev, Reply) and ev.endpoint is not None:
                items.append((ev.data, (ev.endpoint[0], int(ev.endpoint[1]))))
                if len(ev.data) > wgm.MESSAGE_KEEPALIVE_SIZE and ev.data[0] == wgm.MESSAGE_TRANSPORT_TYPE:
                    self.counters.tx_packets += 1  # a staged packet flushed after a handshake
        if items:
            self.udp.sendmmsg(items)

    def run_timers(self, now: float) -> None:
        deadline = self.device.next_timer()
        if deadline is not None and deadline <= now:
            self.send_events(self.device.handle_timer(now))

    def _internal_error(self, n: int) -> None:
        self.counters.drops["internal_error"] += n
        if self._errors_logged < MAX_ERRORS_LOGGED:
            self._errors_logged += 1
            log.exception("wireguard datapath bug: batch of %d dropped", n)

    # -- stats

    def stats(self, wall_offset: float) -> dict:
        c = self.counters
        drops = {f"drop_{r.value}": v for r, v in self.device.drops.items()}
        drops.update({f"drop_{k}": v for k, v in c.drops.items()})
        peers = []
        for key, peer in self.device.peers.items():
            hs = peer.stats.last_handshake
            peers.append(
                {
                    "public_key": base64.b64encode(key).decode(),
                    "endpoint": f"{peer.endpoint[0]}:{peer.endpoint[1]}" if peer.endpoint else None,
                    "allowed_ips": [str(n) for n in peer.allowed_ips],
                    "latest_handshake": hs + wall_offset if hs is not None else None,
                    "rx_bytes": peer.stats.rx_bytes,
                    "tx_bytes": peer.stats.tx_bytes,
                    "persistent_keepalive": peer.timers.persistent_keepalive_interval,
                }
            )
        return {
            "public_key": base64.b64encode(self.device.identity.public).decode(),
            "tx_packets": c.tx_packets,
            "tx_bytes": c.tx_bytes,
            "rx_packets": c.rx_packets,
            "rx_bytes": c.rx_bytes,
            "tx_send_calls": c.tx_send_calls,
            "tun_writes": c.tun_writes,
            "handshakes": c.handshakes,
            **drops,
            "peers": peers,
        }


# -- the worker process ------------------------------------------------------------------------------------


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
    stopping = False

    def _term(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _term)
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
            for _ in range(MAX_BATCHES_PER_WAKE):
                moved = 0
                if tun.fileno() in ready:
                    moved += engine.tx_once(now)
                if udp.fileno() in ready:
                    moved += engine.rx_once(now)
                if moved == 0:
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
        elif op == "under_load":
            engine.device.force_under_load = bool(msg.get("on"))
            emit({"under_load": engine.device.force_under_load, "seq": msg.get("seq", 0)})
        elif op == "stop":
            return False
    return True


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
