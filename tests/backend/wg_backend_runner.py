"""Runs WireguardBackend inside a test's network namespace (`ip netns exec ... python wg_backend_runner.py`).

stdin: {"op": "add"|"remove", "lease": <Lease JSON as Lease.to_json()>} / {"op": "show"} /
{"op": "kill_worker"} (simulates a datapath crash) / EOF to stop.
stdout: {"ready": true, "attrs": {...}}, {"applied": 1}, {"show": text, "stats": {...}}.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys

from udpflannel.backend import create_backend
from udpflannel.backend.wireguard import format_wg_show
from udpflannel.config import parse_net_conf
from udpflannel.host.iface import select_interface
from udpflannel.lease.model import Event, EventType, Lease, LeaseAttrs


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def lease_from(obj: dict) -> Lease:
    v6 = obj.get("IPv6Subnet")
    return Lease(
        ipaddress.IPv4Network(obj["Subnet"]),
        LeaseAttrs.from_json(obj["Attrs"]),
        ipaddress.IPv6Network(v6) if v6 else None,
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subnet", required=True)
    ap.add_argument("--subnet6", default=None, help="dual-stack: our IPv6 subnet (fd00:198:19::/48 network)")
    ap.add_argument("--backend", required=True, help="net-conf Backend object as JSON")
    args = ap.parse_args()
    conf = {"Network": "198.19.0.0/16", "Backend": json.loads(args.backend)}
    if args.subnet6:
        conf |= {"EnableIPv6": True, "IPv6Network": "fd00:198:19::/48"}
    config = parse_net_conf(json.dumps(conf))
    iface = select_interface(iface=["eth0"], public_ip="", want_ipv6=bool(args.subnet6))
    backend = create_backend(config, None, iface)
    attrs = backend.lease_attrs()
    subnet6 = ipaddress.IPv6Network(args.subnet6) if args.subnet6 else None
    lease = Lease(ipaddress.IPv4Network(args.subnet), attrs, subnet6)
    backend.start(lease)
    try:
        emit({"ready": True, "lease": lease.to_json()})
        for line in sys.stdin:
            obj = json.loads(line)
            if obj["op"] in ("add", "remove"):
                kind = EventType.ADDED if obj["op"] == "add" else EventType.REMOVED
                backend.apply([Event(kind, lease_from(obj["lease"]))])
                emit({"applied": 1})
            elif obj["op"] == "kill_worker":
                worker = backend.workers["flannel-wg"]
                worker.proc.kill()
                worker.proc.wait(timeout=5)
                emit({"killed": worker.proc.pid})
            elif obj["op"] == "show":
                stats = backend.wg_stats()
                emit({"show": format_wg_show(stats), "stats": backend.stats()})
    finally:
        backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
