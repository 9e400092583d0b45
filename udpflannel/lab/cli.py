"""`udpflannel lab up|down|status|demo`: the argparse wiring for the netns lab (cli.py registers it)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from udpflannel.lab import topology
from udpflannel.lab.netns import LabError, exit_on_sigterm
from udpflannel.lab.runtime import STATE_ROOT, LabState, agent_alive, down, find_labs, tunnel_device, up

LEASE_TIMEOUT_HELP = "seconds to wait for every lease"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:  # (nan fails this too)
        raise argparse.ArgumentTypeError(f"{text} seconds: give a time between 0 and 3600")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from udpflannel.lab.demo import DEFAULT_TOPOLOGY

    parser = subparsers.add_parser(
        "lab",
        help="a udpflannel cluster in network namespaces, built from a containerlab topology",
        description="Build a udpflannel cluster from network namespaces on this host (root needed). "
        f"Lab state lives under {STATE_ROOT}/<prefix>/ until `lab down`.",
    )
    parser.add_argument("--state-root", type=Path, default=STATE_ROOT, help="where labs keep their state")
    sub = parser.add_subparsers(dest="lab_command", metavar="{up,down,status,demo}")
    sub.required = True
    p_up = sub.add_parser("up", help="build the lab and start one agent per node")
    p_up.add_argument("topology", nargs="?", type=Path, default=DEFAULT_TOPOLOGY, help="containerlab file")
    p_up.add_argument("--lease-timeout", type=_seconds, default=20.0, help=LEASE_TIMEOUT_HELP)
    p_up.set_defaults(func=cmd_up)
    p_down = sub.add_parser("down", help="stop the agents and remove every namespace and file of the lab(s)")
    p_down.add_argument("prefix", nargs="?", help="the lab to remove (default: every lab under --state-root)")
    p_down.set_defaults(func=cmd_down)
    p_status = sub.add_parser("status", help="show the labs, their nodes, agents, leases and pods")
    p_status.set_defaults(func=cmd_status)
    p_demo = sub.add_parser("demo", help="up, leases, ping matrix, iperf3, a packet trace, summary, down")
    p_demo.add_argument("topology", nargs="?", type=Path, default=DEFAULT_TOPOLOGY, help="containerlab file")
    p_demo.add_argument("--lease-timeout", type=_seconds, default=20.0, help=LEASE_TIMEOUT_HELP)
    p_demo.set_defaults(func=cmd_demo)
    return parser


def _need_root() -> int | None:
    if os.geteuid() != 0:
        print("udpflannel lab: needs root (it creates network namespaces and veth links)")
        return 2
    return None


def cmd_up(args: argparse.Namespace) -> int:
    if (code := _need_root()) is not None:
        return code
    try:
        topo = topology.load(args.topology)
        labrun = up(topo, root=args.state_root, lease_timeout=args.lease_timeout)
    except OSError as exc:
        where = str(exc.filename or "")
        hint = ": give a writable --state-root" if where.startswith(str(args.state_root)) else ""
        print(f"udpflannel lab up: {exc.strerror or exc}: {where}{hint}", file=sys.stderr)
        return 1
    except (topology.TopologyError, LabError, subprocess.SubprocessError) as exc:
        print(f"udpflannel lab up: {exc}", file=sys.stderr)
        return 1
    missing = [n.name for n in labrun.state.nodes.values() if n.subnet is None]
    if missing:
        print(f"udpflannel lab up: no lease for {', '.join(missing)}; removing the lab", file=sys.stderr)
        labrun.close()
        return 1
    print(format_status(labrun.state))
    print(
        f"\nnext: `udpflannel trace` follows a packet; `udpflannel lab down {labrun.state.prefix}` removes it"
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if (code := _need_root()) is not None:
        return code
    dirs = [args.state_root / args.prefix] if args.prefix else find_labs(args.state_root)
    if args.prefix and not dirs[0].exists():
        print(f"udpflannel lab down: no lab {args.prefix} under {args.state_root}", file=sys.stderr)
        return 1
    if not dirs:
        print(f"udpflannel lab down: no labs under {args.state_root}")
        return 0
    for directory in dirs:
        removed = down(directory)
        print(f"lab {directory.name}: removed {len(removed)} things: {', '.join(removed)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    labs = find_labs(args.state_root)
    if not labs:
        print(f"no labs under {args.state_root}")
        return 0
    for directory in labs:
        try:
            print(format_status(LabState.load(directory)))
        except LabError as exc:
            print(f"lab {directory.name}: {exc}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if (code := _need_root()) is not None:
        return code
    from udpflannel.lab.demo import run_demo

    exit_on_sigterm()  # a stopped demo takes its lab down, as after Ctrl-C
    return run_demo(args.topology, root=args.state_root, lease_timeout=args.lease_timeout).exit_code


def format_status(state: LabState) -> str:
    age = time.time() - state.created
    lines = [
        f"lab {state.prefix}: {state.name}, backend {state.backend}, network {state.network}, up {age:.0f} s",
        f"  state {state.dir}  topology {state.topology}",
    ]
    for node in state.nodes.values():
        agent = f"agent pid {node.pid} {'running' if agent_alive(state, node) else 'EXITED'}"
        tunnel = tunnel_device(node.ns) or "no tunnel device"
        lines.append(
            f"  {node.name:<8} {node.public_ip:<13} {agent:<26} lease {node.subnet or 'NONE':<16} {tunnel}"
        )
        for pod in node.pods:
            lines.append(f"    pod {pod.name:<12} {pod.ip:<13} ns {pod.ns}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`udpflannel lab ...` as cli.py dispatches it: parse our own arguments, run, return the exit code."""
    parser = argparse.ArgumentParser(prog="udpflannel", allow_abbrev=False)
    add_parser(parser.add_subparsers())
    try:
        args = parser.parse_args(["lab", *argv])
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return int(exc.code or 0)
    return int(args.func(args))
