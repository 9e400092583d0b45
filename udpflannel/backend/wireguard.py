"""The wireguard backend: flannel's WireGuard contract (spec/flannel.md) carried by our userspace datapath
(dataplane/wg_worker.py), so a node talks to wireguard-go and kernel WireGuard peers.

It decides: the key (file /run/flannel/wgkey or $WIREGUARD_KEY_FILE, made 0400, refused when others may read
it), BackendData {"PublicKey", "Port"}, MTU (overhead 80), one device per address family ("separate" mode:
flannel-wg on ListenPort with PublicIP endpoints, flannel-wg-v6 on ListenPortV6 with PublicIPv6 endpoints),
and which peer leases are usable. host/ applies addresses and routes; the worker moves the packets.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import os
import pathlib
import select
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from udpflannel.backend import update_peer_map
from udpflannel.codec.wireguard import crypto
from udpflannel.codec.wireguard import messages as wgm
from udpflannel.lease.model import Event, Lease, LeaseAttrs

log = logging.getLogger(__name__)

DEFAULT_KEY_FILE = "/run/flannel/wgkey"
KEY_FILE_ENV = "WIREGUARD_KEY_FILE"
DEVICE_V4 = "flannel-wg"
DEVICE_V6 = "flannel-wg-v6"
READY_TIMEOUT = 20.0
REPLY_TIMEOUT = 10.0


class WireguardError(RuntimeError):
    """The backend cannot start; the message says why and what to do."""


# -- key file -----------------------------------------------------------------------------------------------


def key_file_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE)


def load_or_create_key(path: pathlib.Path, rand: Any = os.urandom) -> bytes:
    """Our private key from `path` (base64, as `wg genkey` writes it); a new one (mode 0400) if missing.

    Refused when group or others have any access: a readable key lets anyone on the host read the traffic.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        key = crypto.generate_private_key(rand(32))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_EXCL, 0o400)
        try:
            os.write(fd, base64.b64encode(key) + b"\n")
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return key
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise WireguardError(
            f"WireGuard key file {path} has mode {stat.S_IMODE(st.st_mode):04o}: group/others must have no "
            f"access (run `chmod 0400 {path}`)"
        )
    text = path.read_text().strip()
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != crypto.KEY_SIZE:
        raise WireguardError(f"WireGuard key file {path} does not hold the base64 of 32 bytes (`wg genkey`)")
    return key


# -- the worker process -------------------------------------------------------------------------------------


@dataclass
class WgWorkerProcess:
    """Control-plane handle on one wg_worker process: key and peers in, stats out, over its stdin/stdout."""

    tun: str
    port: int
    bind: str
    mtu: int
    private_key: bytes
    proc: subprocess.Popen | None = None
    seq: int = 0
    info: dict = field(default_factory=dict)
    # /metrics (health server thread) and lease events (agent thread) share the pipe: one request at a time.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        cmd = [sys.executable, "-m", "udpflannel.dataplane.wg_worker", "--tun", self.tun]
        cmd += ["--port", str(self.port), "--bind", self.bind, "--mtu", str(self.mtu)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            self._write({"op": "key", "private_key": base64.b64encode(self.private_key).decode()})
            self.info = self._read("ready", READY_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        log.info("wireguard worker for %s: pid %s, offloads %s", self.tun, self.proc.pid, self.info)

    def _write(self, obj: dict) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _read(self, key: str, timeout: float) -> dict:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = self.proc.stdout.readline()
            if not line:
                break
            obj = json.loads(line)
            if key in obj and obj.get("seq", self.seq) == self.seq:
                return obj
        raise WireguardError(
            f"wireguard worker for {self.tun} did not answer {key!r} (exit {self.proc.poll()})"
        )

    def request(self, obj: dict, key: str) -> dict:
        with self.lock:
            if self.proc is None:
                raise WireguardError(f"wireguard worker for {self.tun} is not running")
            self.seq += 1
            self._write({**obj, "seq": self.seq})
            return self._read(key, REPLY_TIMEOUT)

    def stop(self) -> None:
        with self.lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


# -- the backend --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WgDevice:
    """One WireGuard interface of ours: its name, port, which peer address it sends to, what it carries."""

    name: str
    port: int
    endpoint: str  # "ipv4", "ipv6" or "auto" (a peer's PublicIP if both sides have IPv4, else PublicIPv6)
    carries: tuple[int, ...]  # inner address families routed into it

    @property
    def bind(self) -> str:
        # A "::" socket also receives IPv4 (as v4-mapped addresses); an IPv4-only device binds 0.0.0.0.
        return "0.0.0.0" if self.endpoint == "ipv4" else "::"


def plan_devices(config: Any) -> list[WgDevice]:
    """flannel's Mode: "separate" (default) is flannel-wg for IPv4 on ListenPort and flannel-wg-v6 for IPv6
    on ListenPortV6; "auto", "ipv4" and "ipv6" are one flannel-wg carrying both families."""
    b = config.backend
    v4, v6 = bool(getattr(config, "enable_ipv4", True)), bool(getattr(config, "enable_ipv6", False))
    port = int(b.listen_port or wgm.DEFAULT_PORT)
    mode = (getattr(b, "mode", "") or "separate").lower()
    if mode == "separate":
        devices = [WgDevice(DEVICE_V4, port, "ipv4", (4,))] if v4 else []
        if v6:
            devices.append(WgDevice(DEVICE_V6, int(b.listen_port_v6 or wgm.DEFAULT_PORT_V6), "ipv6", (6,)))
        return devices
    carries = tuple(f for f, on in ((4, v4), (6, v6)) if on)
    return [WgDevice(DEVICE_V4, port, mode, carries)] if carries else []


class WireguardBackend:
    type = "wireguard"
    overhead = wgm.MTU_OVERHEAD

    def __init__(self, config: Any, options: Any, iface: Any) -> None:
        self.config = config
        self.options = options
        self.iface = iface
        b = config.backend
        self.mtu = int(b.mtu or iface.mtu) - self.overhead
        self.psk = base64.b64decode(b.psk) if getattr(b, "psk", None) else None
        self.keepalive = int(getattr(b, "persistent_keepalive_interval", 0) or 0)
        self.private_key = load_or_create_key(key_file_path())
        self.public_key = crypto.public_key(self.private_key)
        self.devices = plan_devices(config)
        self.lease: Lease | None = None
        self.peers: dict[str, Lease] = {}
        self.workers: dict[str, WgWorkerProcess] = {}
        self.host: Any = None
        self.restarts = 0
        # The agent thread (start/apply/stop) and the /metrics thread (stats) share the workers.
        self._lock = threading.RLock()

    # -- what we publish

    def _port_for(self, family: int) -> int:
        return next((d.port for d in self.devices if family in d.carries), wgm.DEFAULT_PORT)

    def backend_data(self, family: int) -> dict[str, Any]:
        return {"PublicKey": base64.b64encode(self.public_key).decode(), "Port": self._port_for(family)}

    def lease_attrs(self) -> LeaseAttrs:
        carried = {f for d in self.devices for f in d.carries}
        v4, v6 = 4 in carried, 6 in carried
        return LeaseAttrs(
            public_ip=ipaddress.IPv4Address(self.iface.public_ip) if v4 and self.iface.public_ip else None,
            public_ipv6=ipaddress.IPv6Address(self.iface.public_ipv6)
            if v6 and self.iface.public_ipv6
            else None,
            backend_type=self.type,
            backend_data=self.backend_data(4) if v4 else None,
            backend_v6_data=self.backend_data(6) if v6 else None,
        )

    # -- peers

    def peer_configs(self, device: WgDevice) -> list[dict]:
        """The worker's peer list for one device, from the peer leases we hold."""
        out = []
        for lease in self.peers.values():
            cfg = peer_config(lease, device, self.psk, self.keepalive, have_ipv4=bool(self.iface.public_ip))
            if cfg is not None:
                out.append(cfg)
        return out

    def _push_peers(self) -> None:
        for device in self.devices:
            worker = self.workers.get(device.name)
            if worker is not None:
                worker.request({"op": "peers", "peers": self.peer_configs(device)}, "applied")

    # -- Backend protocol

    def start(self, lease: Lease) -> None:
        with self._lock:
            self._start(lease)

    def _start(self, lease: Lease) -> None:
        from udpflannel.host.links import HostConfig, Route

        self.lease = lease
        subnets = {4: lease.subnet, 6: lease.ipv6_subnet}
        networks = {4: getattr(self.config, "network", None), 6: getattr(self.config, "ipv6_network", None)}
        self.host = HostConfig()
        try:
            self.host.connect()  # the netlink child starts up while the workers do
            active = [d for d in self.devices if any(subnets[f] is not None for f in d.carries)]
            for dev in active:
                worker = WgWorkerProcess(dev.name, dev.port, dev.bind, self.mtu, self.private_key)
                worker.start()
                self.workers[dev.name] = worker
            for dev in active:
                self.host.link_index(dev.name, wait=2.0)
                # No link-local: the kernel's router solicitations and MLD reports would only be dropped
                # (no peer owns ff02::/16) and counted as unknown_peer.
                self.host.no_link_local(dev.name)
                self.host.set_link(dev.name, mtu=self.mtu, up=True)
                for family in dev.carries:
                    subnet, network = subnets[family], networks[family]
                    if subnet is None:
                        continue
                    addr = str(subnet.network_address)
                    self.host.add_address(dev.name, f"{addr}/{32 if family == 4 else 128}")
                    if network is not None:
                        self.host.add_route(Route(str(network), dev.name, src=addr))
            self.host.close()  # the netlink child exits; undo() starts another if there is work left
            self._push_peers()
        except BaseException:
            self._stop()
            raise

    def check(self) -> bool:
        """Restart the datapath if a worker died (its TUN, addresses and routes went with it); True if
        everything was running. Called before each apply and stats, so the agent recovers on its own."""
        with self._lock:
            dead = [w.tun for w in self.workers.values() if w.proc is None or w.proc.poll() is not None]
            if not dead or self.lease is None:
                return True
            log.error("wireguard worker(s) for %s exited: restarting the datapath", ", ".join(dead))
            self.restarts += 1
            lease = self.lease
            self._stop()
            self._start(lease)
            # Peers still hold sessions with the dead worker: handshake now instead of after their timeout.
            for worker in self.workers.values():
                worker.request({"op": "handshake"}, "handshake")
            return False

    def apply(self, events: list[Event]) -> None:
        self.check()
        with self._lock:
            self._apply(events)

    def _apply(self, events: list[Event]) -> None:
        changed = update_peer_map(self.peers, events, self.lease.key if self.lease is not None else None)
        if changed and self.workers:
            self._push_peers()

    def wg_stats(self) -> dict[str, dict]:
        """Per device: the worker's full stats (interface counters, drops, peers), for format_wg_show."""
        self.check()
        out = {}
        for worker in list(self.workers.values()):
            st = worker.request({"op": "stats"}, "stats")["stats"]
            st["device"] = worker.tun
            st["listen_port"] = worker.port
            out[worker.tun] = st
        return out

    def stats(self) -> dict[str, int]:
        """Counters for /metrics, summed over the devices (peers' details are in wg_stats)."""
        total: dict[str, int] = {}
        try:
            per_device = self.wg_stats()
        except Exception as exc:  # metrics must answer even when the datapath cannot be brought back
            log.warning("wireguard stats unavailable: %s", exc)
            return {"wireguard_stats_errors": 1}
        for st in per_device.values():
            for k, v in st.items():
                if isinstance(v, int) and not isinstance(v, bool) and k != "listen_port":
                    total[k] = total.get(k, 0) + v
            total["wireguard_peers"] = total.get("wireguard_peers", 0) + len(st.get("peers", []))
        total["wireguard_worker_restarts"] = self.restarts
        return total

    def stop(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        # The workers first: their TUNs go, and with them the addresses and routes through them, so
        # undo() usually has nothing left to ask netlink for.
        for worker in self.workers.values():
            worker.stop()
        self.workers.clear()
        if self.host is not None:
            self.host.undo()
            self.host = None


def peer_config(
    lease: Lease, device: WgDevice, psk: bytes | None, keepalive: int, have_ipv4: bool = True
) -> dict | None:
    """A peer lease as the worker's peer entry for one of our devices, or None (logged) when unusable."""
    attrs = lease.attrs
    if attrs.backend_type != WireguardBackend.type:
        log.warning("peer %s has backend %r, not wireguard: ignored", lease.key, attrs.backend_type)
        return None
    subnets = {4: lease.subnet, 6: lease.ipv6_subnet}
    allowed = [str(subnets[f]) for f in device.carries if subnets[f] is not None]
    use_v4 = device.endpoint == "ipv4" or (device.endpoint == "auto" and have_ipv4 and attrs.public_ip)
    public_ip = attrs.public_ip if use_v4 else attrs.public_ipv6
    data = attrs.backend_data if use_v4 else (attrs.backend_v6_data or attrs.backend_data)
    if not allowed or public_ip is None:
        return None
    try:
        public_key = base64.b64decode(str(data["PublicKey"]), validate=True)
        port = int(data.get("Port") or device.port)
    except (TypeError, KeyError, ValueError, AttributeError, OverflowError, binascii.Error):  # int(inf)
        log.warning("peer %s: BackendData %r has no usable PublicKey: ignored", lease.key, data)
        return None
    if len(public_key) != crypto.KEY_SIZE or not 0 < port < 65536:
        log.warning("peer %s: bad PublicKey or Port in %r: ignored", lease.key, data)
        return None
    host = str(public_ip)
    if device.bind == "::" and public_ip.version == 4:
        host = f"::ffff:{host}"  # an IPv4 peer reached through our dual-stack socket
    return {
        "public_key": base64.b64encode(public_key).decode(),
        "endpoint": [host, port],
        "allowed_ips": allowed,
        "psk": base64.b64encode(psk).decode() if psk else None,
        "keepalive": keepalive,
    }


# -- `udpflannel wg show` -----------------------------------------------------------------------------------


def _ago(seconds: float) -> str:
    seconds = int(seconds)
    parts = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        n, seconds = divmod(seconds, size)
        if n:
            parts.append(f"{n} {unit}{'s' if n != 1 else ''}")
    return (", ".join(parts) or "0 seconds") + " ago"


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_wg_show(stats: dict, now: float | None = None) -> str:
    """`wg show`-style text for one device's stats (WgEngine.stats plus "device"/"listen_port"), or for a
    {device: stats} mapping as WireguardBackend.wg_stats returns it."""
    if "peers" not in stats:
        return "\n\n".join(format_wg_show(s, now) for s in stats.values())
    now = time.time() if now is None else now
    lines = [
        f"interface: {stats.get('device', '?')}",
        f"  public key: {stats.get('public_key', '')}",
        "  private key: (hidden)",
    ]
    if stats.get("listen_port"):
        lines.append(f"  listening port: {stats['listen_port']}")
    drops = {k[5:]: v for k, v in stats.items() if k.startswith("drop_") and v}
    if drops:
        lines.append("  drops: " + ", ".join(f"{k} {v}" for k, v in sorted(drops.items())))
    for peer in sorted(stats["peers"], key=lambda p: -(p.get("latest_handshake") or 0)):
        lines += ["", f"peer: {peer['public_key']}"]
        if peer.get("endpoint"):
            lines.append(f"  endpoint: {peer['endpoint']}")
        lines.append(f"  allowed ips: {', '.join(peer.get('allowed_ips') or ['(none)'])}")
        if peer.get("latest_handshake"):
            lines.append(f"  latest handshake: {_ago(max(0.0, now - peer['latest_handshake']))}")
        if peer.get("rx_bytes") or peer.get("tx_bytes"):
            lines.append(f"  transfer: {_bytes(peer['rx_bytes'])} received, {_bytes(peer['tx_bytes'])} sent")
        if peer.get("persistent_keepalive"):
            lines.append(f"  persistent keepalive: every {_ago(peer['persistent_keepalive'])[:-4]}")
    return "\n".join(lines)
