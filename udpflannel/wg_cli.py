"""`udpflannel wg show`: the WireGuard view of a running agent (peers, endpoints, latest handshake, transfer),
read from the agent's /wireguard endpoint (the agent must run with --healthz-port)."""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="udpflannel wg", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="peers, endpoints, latest handshake and transfer of every device")
    show.add_argument(
        "--healthz-ip", default="127.0.0.1", help="the agent's --healthz-ip (default 127.0.0.1)"
    )
    show.add_argument("--healthz-port", type=int, required=True, help="the agent's --healthz-port")
    show.add_argument("--json", action="store_true", help="print the raw JSON")
    args = parser.parse_args(argv)

    host = f"[{args.healthz_ip}]" if ":" in args.healthz_ip else args.healthz_ip
    url = f"http://{host}:{args.healthz_port}/wireguard"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            stats = json.load(resp)
    except urllib.error.HTTPError as exc:
        reason = "the agent does not run the wireguard backend" if exc.code == 404 else f"HTTP {exc.code}"
        print(f"udpflannel: {url}: {reason}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        print(
            f"udpflannel: cannot read {url} ({exc}): is the agent running with --healthz-port?",
            file=sys.stderr,
        )
        return 1
    if not isinstance(stats, dict) or not all(isinstance(d, dict) and "peers" in d for d in stats.values()):
        print(
            f"udpflannel: {url} did not answer with WireGuard devices: is that port the agent's?",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    from udpflannel.backend.wireguard import format_wg_show

    print(format_wg_show(stats))
    return 0
