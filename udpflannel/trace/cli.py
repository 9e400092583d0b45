"""`udpflannel trace`: follow one packet through a running lab, or dissect the frames of a pcap file."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from udpflannel.lab.runtime import STATE_ROOT


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "trace",
        help="follow one packet hop by hop through a lab, or dissect a pcap",
        description="Send one ICMP echo from a pod to a pod on another node of a running lab (`udpflannel "
        "lab up`), capture it at every hop and dissect outer and inner headers. With --pcap, dissect the "
        "frames of a capture file instead (no root needed).",
    )
    parser.add_argument("--lab", metavar="PREFIX", help="which lab (default: the newest under --state-root)")
    parser.add_argument("--state-root", type=Path, default=STATE_ROOT)
    parser.add_argument("--from", dest="src", metavar="POD", help="source pod, e.g. node1-p0")
    parser.add_argument("--to", dest="dst", metavar="POD", help="destination pod on another node")
    parser.add_argument("--pcap", type=Path, help="dissect this capture file instead of tracing a lab")
    parser.add_argument("--count", type=_positive, default=10, help="with --pcap: how many frames to show")
    parser.add_argument(
        "--backend", help='with --pcap: net-conf Backend JSON, e.g. \'{"Type":"vxlan","Port":4789}\''
    )
    parser.set_defaults(func=cmd_trace)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} frames: show at least 1")
    return value


def _error(message: str, code: int) -> int:
    print(f"udpflannel trace: {message}", file=sys.stderr)
    return code


def cmd_trace(args: argparse.Namespace) -> int:
    if args.pcap is not None:
        return dissect_pcap(args.pcap, args.count, args.backend)
    if os.geteuid() != 0:
        return _error("needs root (it captures inside the lab's network namespaces)", 2)
    from udpflannel.lab.netns import LabError
    from udpflannel.lab.runtime import LabState, find_labs
    from udpflannel.trace.capture import CaptureError
    from udpflannel.trace.tracer import trace

    labs = [args.state_root / args.lab] if args.lab else find_labs(args.state_root)
    if not labs:
        return _error(f"no lab under {args.state_root}; start one with `udpflannel lab up`", 1)
    try:
        state = LabState.load(labs[-1])
        result = trace(state, args.src, args.dst)
    except (LabError, ValueError, CaptureError) as exc:
        return _error(str(exc), 1)
    print(result.format())
    print(f"pcaps: {result.hops[0].pcap.parent}")
    return 0 if result.ok else 1


def dissect_pcap(path: Path, count: int, backend: str | None) -> int:
    import json

    from scapy.error import Scapy_Exception
    from scapy.utils import RawPcapReader

    from udpflannel.config import ConfigError
    from udpflannel.trace.dissect import dissect, encap_ports

    try:
        ports = encap_ports(json.loads(backend) if backend else None)
    except (ValueError, ConfigError) as exc:
        return _error(f"--backend: {exc}", 2)
    try:
        reader = RawPcapReader(str(path))
    except (OSError, EOFError) as exc:
        return _error(f"cannot read {path}: {exc}", 1)
    except Scapy_Exception as exc:
        return _error(f"cannot read {path}: {exc}: give a pcap or pcapng file (tcpdump -w, tshark -w)", 1)
    with reader:
        start = None
        for i, (data, meta) in enumerate(reader):
            if i >= count:
                break
            t = meta.sec + meta.usec / 1e6
            start = t if start is None else start
            d = dissect(bytes(data), int(reader.linktype), ports)
            print(f"frame {i + 1}  +{(t - start) * 1e3:.3f} ms  {d.length} bytes")
            print(d.format())
            print()
    return 0


def main(argv: list[str]) -> int:
    """`udpflannel trace ...` as cli.py dispatches it: parse our own arguments, run, return the exit code."""
    parser = argparse.ArgumentParser(prog="udpflannel", allow_abbrev=False)
    add_parser(parser.add_subparsers())
    try:
        args = parser.parse_args(["trace", *argv])
    except SystemExit as exc:
        return int(exc.code or 0)
    return int(args.func(args))
