"""Side-by-side benchmark of the vxlan and udp datapaths against kernel VXLAN, on the same namespaces.

Scenarios (two namespaces joined by one veth pair in wire mode, 198.18.0.1 <-> 198.18.0.2):
  kernel-kernel   kernel VXLAN on both nodes, set up as flanneld sets up flannel.1
  vxlan-vxlan     udpflannel vxlan on both nodes
  udp-udp         udpflannel udp on both nodes
  vxlan-kernel    udpflannel vxlan on A, kernel VXLAN on B (both directions measured)
All scenarios are set up first, then measured in rounds (each once a round, so a slow spell of the
shared machine falls on all alike; ratios are per round). For each: iperf3 one TCP stream (A->B,
10 s x 3 rounds, or --quick), 64-byte UDP packet rate (perf/udp_flood.py,
sendmmsg: as fast as it goes, then offered rates above what that delivered; the best the receiver counted
is the result, see pps_sweep), CPU-seconds per GiB of every agent process and of the whole machine
(host: iperf3 and the kernel's softirq work included, so kernel VXLAN is charged too), RSS/PSS.
Extra: one vs two worker processes (UDPFLANNEL_WORKERS), one-direction and bidirectional. --profile runs
py-spy on the vxlan workers during one TCP run and prints where the time goes.

Run as root: `.venv/bin/python perf/bench_vxlan.py [--quick] [--profile] [--json out.json]`.
Every address is in 198.18.0.0/15; everything is removed at exit.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from udpflannel.lab import kernel_vxlan  # noqa: E402
from udpflannel.lab.netns import Lab, Netns, exit_on_sigterm  # noqa: E402
from udpflannel.lab.runner import runner_command, start_runner  # noqa: E402
from udpflannel.lab.transfer import read_json_line  # noqa: E402

NETWORK = "198.19.0.0/16"
CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30


@dataclass
class Node:
    ns: Netns
    index: int
    kind: str
    proc: subprocess.Popen | None = None
    pids: list[int] = field(default_factory=list)
    mac: str = ""

    @property
    def public_ip(self) -> str:
        return f"198.18.0.{self.index}"

    @property
    def subnet(self) -> str:
        return f"198.19.{self.index}.0/24"

    @property
    def tun_ip(self) -> str:
        return f"198.19.{self.index}.0"


def _readline(proc: subprocess.Popen, key: str, timeout: float = 20) -> dict:
    return read_json_line(proc, key, timeout, "dataplane runner")


def start_node(ns: Netns, index: int, kind: str, state: pathlib.Path, env: dict[str, str]) -> Node:
    node = Node(ns, index, kind)
    if kind == "kernel":
        node.mac = f"02:5a:00:00:00:{index:02x}"
        kernel_vxlan.add_device(ns, mac=node.mac, local=node.public_ip, address=f"{node.tun_ip}/32")
        return node
    cmd = runner_command(
        kind, network=NETWORK, subnet=node.subnet, subnet_file=state / f"n{index}" / "subnet.env"
    )
    node.proc, ready = start_runner(ns, cmd, env)
    node.pids = [node.proc.pid, *ready["pids"]]
    if kind == "vxlan":
        node.mac = ready["attrs"]["BackendData"]["VtepMAC"]
    return node


def connect(a: Node, b: Node) -> None:
    if a.kind == "kernel":
        kernel_vxlan.add_peer(a.ns, subnet=b.subnet, vtep=b.tun_ip, mac=b.mac, public_ip=b.public_ip)
        return
    btype = "" if b.kind == "udp" else "vxlan"
    data = {"VNI": 1, "VtepMAC": b.mac} if btype else None
    msg = {
        "op": "add",
        "subnet": b.subnet,
        "public_ip": b.public_ip,
        "backend_type": btype,
        "backend_data": data,
    }
    assert a.proc is not None and a.proc.stdin is not None
    a.proc.stdin.write(json.dumps(msg) + "\n")
    a.proc.stdin.flush()
    _readline(a.proc, "applied")


def stop_node(node: Node) -> None:
    if node.proc is None:
        return
    try:
        node.proc.stdin.close()  # type: ignore[union-attr]
        node.proc.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        node.proc.kill()
        node.proc.wait(timeout=5)


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of these processes so far."""
    user = system = 0
    for pid in pids:
        try:
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])  # utime
        system += int(fields[12])  # stime
    return user / CLK_TCK, system / CLK_TCK


def host_busy_seconds() -> float:
    """CPU seconds every CPU of the machine has spent busy so far (user, nice, system, irq, softirq: the
    iperf3s and the kernel's packet work included, which a kernel VXLAN node is charged nowhere else)."""
    fields = pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


def memory(pids: list[int]) -> list[dict[str, float]]:
    out = []
    for pid in pids:
        try:
            text = pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        vals = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()[1:] if line.strip()}
        out.append({"pid": pid, "rss_mb": vals.get("Rss", 0) / 1024, "pss_mb": vals.get("Pss", 0) / 1024})
    return out


def iperf_tcp(client: Node, server: Node, seconds: int, bidir: bool = False) -> tuple[float, float, int]:
    """Gbit/s received (sum of both directions with bidir), bytes moved and the sender's TCP retransmits
    (segments a tunnel lost or reordered past fast retransmit; kernel VXLAN has none here)."""
    server.ns.popen("iperf3", "-s", "-1", "-p", "5201")
    time.sleep(0.3)
    args = ["iperf3", "-c", server.tun_ip, "-p", "5201", "-t", str(seconds), "-J"]
    if bidir:
        args.append("--bidir")
    out = json.loads(client.ns.exec(*args, check=False, timeout=seconds + 30) or "{}")
    end = out.get("end", {})
    if "error" in out or "sum_received" not in end:
        print(f"iperf3 failed: {out.get('error', 'no summary')}", file=sys.stderr)
        return 0.0, 0, 0
    retransmits = end.get("sum_sent", {}).get("retransmits", 0)
    if bidir:
        bps = end["sum_received"]["bits_per_second"] + end["sum_received_bidir_reverse"]["bits_per_second"]
        moved = end["sum_received"]["bytes"] + end["sum_received_bidir_reverse"]["bytes"]
        retransmits += end.get("sum_sent_bidir_reverse", {}).get("retransmits", 0)
    else:
        bps, moved = end["sum_received"]["bits_per_second"], end["sum_received"]["bytes"]
    return bps / 1e9, moved, retransmits


def flood_pps(client: Node, server: Node, seconds: int, rate: float = 0) -> tuple[float, float]:
    """64-byte UDP datagrams per second received through the tunnel, and the rate offered, with
    perf/udp_flood.py (sendmmsg at `rate` datagrams/s, 0: as fast as it goes; recvmmsg counting)."""
    flood = [sys.executable, str(REPO / "perf" / "udp_flood.py")]
    recv = server.ns.popen(
        *flood, "recv", "--port", "5202", "--seconds", str(seconds + 2), stdout=subprocess.PIPE, text=True
    )
    time.sleep(0.5)  # the receiver is bound
    sent = json.loads(
        client.ns.exec(
            *flood,
            "send",
            "--dst",
            server.tun_ip,
            "--port",
            "5202",
            "--seconds",
            str(seconds),
            "--rate",
            str(int(rate)),
            timeout=seconds + 30,
        )
    )
    got = json.loads(recv.communicate(timeout=seconds + 30)[0])
    secs = sent["seconds"] or seconds
    return got["received"] / secs, sent["sent"] / secs


def pps_sweep(client: Node, server: Node, seconds: int) -> dict:
    """The packet rate delivered at an unlimited offered rate, then at a few offered rates above it: a
    generator flooding the TUN also takes the CPU the agents need (the TUN drops the excess only after the
    sender paid for it), so the best delivered rate comes below the flood (as RFC 2544 sweeps offered
    load). Kernel VXLAN carries each datagram inside the sender's own call, so the flood is its best."""
    delivered, offered = flood_pps(client, server, seconds)
    sweep = [(offered, delivered)]
    if delivered < 0.95 * offered:
        for factor in (1.2, 1.5, 2.0, 3.0):
            d, o = flood_pps(client, server, seconds, delivered * factor)
            sweep.append((o, d))
    best = max(sweep, key=lambda x: x[1])
    return {
        "udp64_pps": best[1],
        "udp64_offered_pps": best[0],
        "udp64_flood_pps": delivered,
        "udp64_sweep": sweep,
    }


@dataclass
class Scenario:
    """One scenario's two nodes, set up once and measured in every round (see main)."""

    label: str
    a: Node
    b: Node
    env: dict[str, str]
    reverse: bool  # A->B and B->A measured
    bidir: bool  # one bidirectional run instead
    result: dict = field(default_factory=dict)
    samples: dict = field(default_factory=lambda: collections.defaultdict(list))

    @property
    def agents(self) -> list[int]:
        return self.a.pids + self.b.pids

    def directions(self) -> list[tuple[Node, Node, str]]:
        return [(self.a, self.b, "A->B")] + ([(self.b, self.a, "B->A")] if self.reverse else [])


def start_scenario(
    lab: Lab, index: int, spec: tuple, state: pathlib.Path, stop: contextlib.ExitStack
) -> Scenario:
    """Namespaces, veth (wire mode) and both nodes of one scenario, connected and pinged once."""
    label, kind_a, kind_b, env, reverse, bidir = spec
    a_ns, b_ns = lab.netns(f"{index}a"), lab.netns(f"{index}b")
    lab.veth(a_ns, b_ns, "198.18.0.1/16", "198.18.0.2/16")
    for i in (1, 2):
        (state / f"s{index}" / f"n{i}").mkdir(parents=True)
    a = start_node(a_ns, 1, kind_a, state / f"s{index}", env)
    stop.callback(stop_node, a)
    b = start_node(b_ns, 2, kind_b, state / f"s{index}", env)
    stop.callback(stop_node, b)
    connect(a, b)
    connect(b, a)
    a_ns.exec("ping", "-c", "2", "-i", "0.2", "-W", "2", b.tun_ip, timeout=20)
    sc = Scenario(label, a, b, env, reverse, bidir)
    sc.result.update({"label": label, "a": kind_a, "b": kind_b})
    return sc


def measure_tcp(sc: Scenario, seconds: int) -> None:
    """One iperf3 run per direction: throughput, retransmits, CPU-s/GiB of both agents and of each."""
    agents = sc.agents
    for client, server, name in sc.directions():
        u0, s0 = cpu_seconds(agents)
        a0, b0 = sum(cpu_seconds(sc.a.pids)), sum(cpu_seconds(sc.b.pids))
        h0 = host_busy_seconds()
        g, moved, lost = iperf_tcp(client, server, seconds, bidir=sc.bidir)
        h1 = host_busy_seconds()
        u1, s1 = cpu_seconds(agents)
        got = sc.samples[name]
        got.append({"gbps": g, "retransmits": lost})
        if moved:
            got[-1]["host"] = (h1 - h0) / (moved / GIB)
        if agents and moved and u1 + s1 > u0 + s0:
            gib = moved / GIB
            got[-1]["cpu"] = (u1 + s1 - u0 - s0) / gib
            # system time: the syscalls and the kernel's own packet work they carry
            got[-1]["kernel_share"] = (s1 - s0) / (u1 + s1 - u0 - s0)
            # each node's agent processes alone (a kernel VXLAN node has none: 0)
            got[-1]["a"] = (sum(cpu_seconds(sc.a.pids)) - a0) / gib
            got[-1]["b"] = (sum(cpu_seconds(sc.b.pids)) - b0) / gib


def summarize_tcp(sc: Scenario) -> None:
    """The rounds' samples as the result's per-direction lists and medians."""
    for name, runs in sc.samples.items():
        sc.result[f"tcp_gbps_{name}"] = [r["gbps"] for r in runs]
        sc.result[f"retransmits_{name}"] = [r["retransmits"] for r in runs]
        hosted = [r["host"] for r in runs if "host" in r]
        if hosted:
            sc.result[f"host_cpu_s_per_gib_{name}"] = statistics.median(hosted)
        timed = [r for r in runs if "cpu" in r]
        if timed:
            sc.result[f"cpu_s_per_gib_{name}"] = statistics.median(r["cpu"] for r in timed)
            # every round's figure too: the machine has slow spells lasting tens of seconds (README)
            sc.result[f"cpu_s_per_gib_runs_{name}"] = [r["cpu"] for r in timed]
            sc.result[f"kernel_share_{name}"] = statistics.median(r["kernel_share"] for r in timed)
            sc.result[f"cpu_s_per_gib_by_node_{name}"] = {
                n: statistics.median(r[n] for r in timed) for n in ("a", "b")
            }


def profile(a: Node, b: Node, args) -> dict[str, list[tuple[str, float]]]:
    """py-spy on each side's worker during one TCP run: inclusive share of the top functions."""
    b.ns.popen("iperf3", "-s", "-1", "-p", "5203")
    time.sleep(0.3)
    client = a.ns.popen("iperf3", "-c", b.tun_ip, "-p", "5203", "-t", str(args.seconds + 2))
    time.sleep(1)
    outs = {}
    with tempfile.TemporaryDirectory(prefix="udpflannel-spy-") as spy_dir:  # py-spy's output, removed after
        spies = []
        for name, node in (("sender", a), ("receiver", b)):
            path = pathlib.Path(spy_dir) / f"{name}.txt"
            spies.append(
                (
                    name,
                    path,
                    subprocess.Popen(
                        [
                            str(REPO / ".venv/bin/py-spy"),
                            "record",
                            "-d",
                            str(args.seconds),
                            "-p",
                            str(node.pids[1]),
                            "-f",
                            "raw",
                            "-o",
                            str(path),
                            "--nonblocking",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    ),
                )
            )
        for name, path, spy in spies:
            spy.wait(timeout=args.seconds + 30)
            inc: collections.Counter = collections.Counter()
            total = 0
            for line in path.read_text().splitlines():
                stack, _, n = line.rpartition(" ")
                total += int(n)
                for fr in {x.split(" (")[0] for x in stack.split(";")}:
                    inc[fr] += int(n)
            skip = {"<module>", "_run_module_as_main", "_run_code", "main", "run"}
            top = [(k, round(v / max(total, 1), 3)) for k, v in inc.most_common(40) if k not in skip]
            outs[name] = top[:20]
        client.wait(timeout=args.seconds + 30)
    return outs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 s runs, 1 repetition")
    ap.add_argument("--profile", action="store_true", help="py-spy the vxlan workers during one TCP run")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--only", nargs="*", help="scenario labels to run")
    args = ap.parse_args(argv)
    exit_on_sigterm()  # a stopped run removes its namespaces and peers too
    if os.geteuid() != 0:
        print("bench needs root (network namespaces)", file=sys.stderr)
        return 2
    args.seconds = 3 if args.quick else 10
    args.reps = 1 if args.quick else 3
    args.pps_seconds = 3 if args.quick else 5
    scenarios = [
        ("kernel-kernel", "kernel", "kernel", {}, False, False),
        ("vxlan-vxlan", "vxlan", "vxlan", {}, False, False),
        ("udp-udp", "udp", "udp", {}, False, False),
        ("vxlan-kernel", "vxlan", "kernel", {}, True, False),
        ("vxlan-vxlan 2 workers", "vxlan", "vxlan", {"UDPFLANNEL_WORKERS": "2"}, False, False),
        ("vxlan-vxlan bidir 1 worker", "vxlan", "vxlan", {"UDPFLANNEL_WORKERS": "1"}, False, True),
        ("vxlan-vxlan bidir 2 workers", "vxlan", "vxlan", {"UDPFLANNEL_WORKERS": "2"}, False, True),
        ("kernel-kernel bidir", "kernel", "kernel", {}, False, True),
    ]
    chosen = [spec for spec in scenarios if not args.only or spec[0] in args.only]
    with contextlib.ExitStack() as stop:
        lab = stop.enter_context(Lab())
        state = pathlib.Path(stop.enter_context(tempfile.TemporaryDirectory(prefix="udpflannel-bench-")))
        running: list[Scenario] = []
        for index, spec in enumerate(chosen):
            print(f"== {spec[0]}: setting up", flush=True)
            try:
                running.append(start_scenario(lab, index, spec, state, stop))
            except Exception as exc:  # one broken scenario must not lose the others' numbers
                print(f"scenario {spec[0]} failed: {exc!r}", file=sys.stderr)
        # Rounds: every scenario once per round, so a slow spell of the shared machine (minutes long)
        # falls on all of them alike, and each run is compared with kernel VXLAN's of the same round.
        for rnd in range(args.reps):
            for sc in running:
                print(f"== round {rnd + 1}/{args.reps}: {sc.label}", flush=True)
                measure_tcp(sc, args.seconds)
        results = []
        for sc in running:
            summarize_tcp(sc)
            if not sc.bidir:
                sc.result.update(pps_sweep(sc.a, sc.b, args.pps_seconds))
            sc.result["memory"] = memory(sc.agents)
            plain = sc.a.kind == sc.b.kind == "vxlan" and not sc.bidir and not sc.env
            if args.profile and plain:
                sc.result["profile"] = profile(sc.a, sc.b, args)
            results.append(sc.result)
            print(json.dumps({k: v for k, v in sc.result.items() if k != "profile"}), flush=True)
    report(results)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def ratio_to_kernel(ours: list[float], kernel: list[float]) -> float | None:
    """Our runs against kernel VXLAN's: the median of the per-round ratios when both ran every round
    (a run and the kernel's of its round lie minutes apart at most), else the ratio of the medians."""
    if not ours or not kernel or not all(kernel):
        return None
    if len(ours) == len(kernel):
        return statistics.median(o / k for o, k in zip(ours, kernel, strict=True))
    return statistics.median(ours) / statistics.median(kernel)


def report(results: list[dict]) -> None:
    by = {r["label"]: r for r in results}
    kernel = by.get("kernel-kernel")
    k_pps = kernel.get("udp64_pps") if kernel else None
    print(
        "\nscenario                TCP Gbit/s: median (runs)   x kernel  retrans  64B kpps  x kernel"
        "  CPU-s/GiB  (kernel)  host  PSS MB"
    )
    for r in results:
        bidir = by.get("kernel-kernel bidir") if "bidir" in r["label"] else None
        base = (bidir or kernel or {}).get("tcp_gbps_A->B", [])
        for key in [k for k in r if k.startswith("tcp_gbps_")]:
            g = statistics.median(r[key])
            runs = " ".join(f"{x:.2f}" for x in r[key])
            x = ratio_to_kernel(r[key], base)
            ratio = "-" if x is None else f"{x:.2f}"
            lost = sum(r.get(key.replace("tcp_gbps_", "retransmits_"), []))
            pps = r.get("udp64_pps")
            pratio = f"{pps / k_pps:.2f}" if (pps and k_pps) else "-"
            cpu = r.get(key.replace("tcp_gbps_", "cpu_s_per_gib_"))
            share = r.get(key.replace("tcp_gbps_", "kernel_share_"))
            host = r.get(key.replace("tcp_gbps_", "host_cpu_s_per_gib_"))
            pss = sum(m["pss_mb"] for m in r.get("memory", []))
            print(
                f"{r['label'] + ' ' + key[9:]:22s} {g:6.2f} ({runs:>14s})  {ratio:>8s}  {lost:7d}"
                f"  {(pps or 0) / 1e3:8.1f}  {pratio:>8s}  {'-' if cpu is None else f'{cpu:.2f}':>9s}"
                f"  {'-' if share is None else f'{share:.0%}':>8s}"
                f"  {'-' if host is None else f'{host:.2f}':>5s}  {pss:6.1f}"
            )
    print("x kernel: the median of each round's ratio to kernel VXLAN's run of that round (bidir to bidir)")
    print(
        "CPU-s/GiB: the agents' processes (kernel: their system-time share); host: every CPU's busy time"
        " (iperf3 and softirq included), per GiB moved"
    )
    print(
        "\nCPU-s/GiB of each node's agent (A sends in A->B; a kernel VXLAN node has none), and of both in"
        " each round:"
    )
    for r in results:
        for key in [k for k in r if k.startswith("cpu_s_per_gib_by_node_")]:
            a, b = r[key]["a"], r[key]["b"]
            runs = " ".join(f"{x:.2f}" for x in r.get(key.replace("_by_node_", "_runs_"), []))
            print(f"  {r['label'] + ' ' + key[22:]:22s} A {a:.2f}  B {b:.2f}  (rounds: {runs})")
    print("\n64-byte packet rate, kpps delivered at each offered rate (the table shows the best):")
    for r in results:
        if r.get("udp64_sweep"):
            steps = ", ".join(f"{o / 1e3:.0f} -> {d / 1e3:.0f}" for o, d in r["udp64_sweep"])
            print(f"  {r['label']:22s} {steps}")
    for r in results:
        if "profile" in r:
            for side, rows in r["profile"].items():
                print(f"\nprofile ({side} worker, inclusive share of samples):")
                for name, share in rows:
                    print(f"  {share:6.1%} {name}")


if __name__ == "__main__":
    sys.exit(main())
