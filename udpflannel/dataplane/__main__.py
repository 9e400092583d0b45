"""`python -m udpflannel.dataplane`: run one vxlan/udp backend for a given lease in this namespace, with peers
fed as JSON lines on stdin. For tests, the lab and benchmarks before (and beside) the full agent.

stdin lines: {"op": "add", "subnet": CIDR, "subnet6": CIDR?, "public_ip": IP, "backend_type": "vxlan",
"backend_data": {...}} / {"op": "remove", "subnet": ..., "subnet6": ...} / {"op": "stats"}.
stdout lines: {"ready": true, "attrs": {...}, "pids": [...], "offloads": {...}} once running;
{"stats": {...}} per stats request; {"applied": n} after each add/remove.
EOF on stdin (or SIGTERM) stops and cleans up.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import signal
import sys
from types import SimpleNamespace

from udpflannel.lease.model import Event, EventType, Lease, LeaseAttrs


def _lease(obj: dict) -> Lease:
    attrs = LeaseAttrs.from_json(
        {
            "PublicIP": obj.get("public_ip"),
            "PublicIPv6": obj.get("public_ipv6"),
            "BackendType": obj.get("backend_type", ""),
            "BackendData": obj.get("backend_data"),
            "BackendV6Data": obj.get("backend_v6_data"),
        }
    )
    subnet = ipaddress.IPv4Network(obj["subnet"]) if obj.get("subnet") else None
    subnet6 = ipaddress.IPv6Network(obj["subnet6"]) if obj.get("subnet6") else None
    return Lease(subnet=subnet, attrs=attrs, ipv6_subnet=subnet6)


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m udpflannel.dataplane", description=__doc__)
    ap.add_argument("--backend", choices=("vxlan", "udp"), required=True)
    ap.add_argument("--iface", required=True)
    ap.add_argument("--public-ip", default="")
    ap.add_argument("--network", required=True, help="IPv4 cluster CIDR")
    ap.add_argument("--network6", default=None, help="IPv6 cluster CIDR (dual-stack)")
    ap.add_argument("--subnet", required=True, help="our IPv4 lease subnet")
    ap.add_argument("--subnet6", default=None)
    ap.add_argument("--subnet-file", required=True, help="state (VtepMAC) is kept beside it")
    ap.add_argument("--vni", type=int, default=1)
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--mtu", type=int, default=None, help="Backend MTU option")
    args = ap.parse_args(argv)

    # Import after argument parsing: the datapath workers are separate interpreters anyway.
    from udpflannel.backend import create_backend
    from udpflannel.host.iface import InterfaceError, select_interface

    try:
        # Dual-stack with an IPv6 address on the underlay: IPv6 rides IPv6, as flanneld's flannel-v6.1.
        iface = select_interface(
            iface=[args.iface], public_ip=args.public_ip, want_ipv6=args.network6 is not None
        )
    except InterfaceError:
        # No IPv6 underlay address: IPv6 inner traffic rides the IPv4 underlay (udpflannel peers only).
        iface = select_interface(iface=[args.iface], public_ip=args.public_ip, want_ipv6=False)
    backend_cfg = SimpleNamespace(type=args.backend, vni=args.vni, port=args.port, mtu=args.mtu)
    config = SimpleNamespace(
        enable_ipv4=True,
        enable_ipv6=args.network6 is not None,
        network=ipaddress.IPv4Network(args.network),
        ipv6_network=ipaddress.IPv6Network(args.network6) if args.network6 else None,
        backend=backend_cfg,
    )
    options = SimpleNamespace(subnet_file=args.subnet_file)
    backend = create_backend(config, options, iface)  # type: ignore[arg-type]
    attrs = backend.lease_attrs()
    lease = _lease({"subnet": args.subnet, "subnet6": args.subnet6, "public_ip": iface.public_ip})
    lease = Lease(subnet=lease.subnet, attrs=attrs, ipv6_subnet=lease.ipv6_subnet)

    def _term(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    backend.start(lease)
    try:
        dp = getattr(backend, "dataplane", None)
        pids = dp.pids() if dp else []
        offloads = dp.offloads() if dp else {}
        _emit(
            {"ready": True, "attrs": attrs.to_json(), "mtu": backend.mtu, "pids": pids, "offloads": offloads}
        )
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            obj = json.loads(line)
            op = obj.get("op")
            if op in ("add", "remove"):
                kind = EventType.ADDED if op == "add" else EventType.REMOVED
                backend.apply([Event(kind, _lease(obj))])
                _emit({"applied": 1})
            elif op == "stats":
                _emit({"stats": backend.stats()})
    except KeyboardInterrupt:
        pass
    finally:
        backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
