"""WireGuard throughput and cost: wireguard-go<->wireguard-go vs udpflannel<->udpflannel vs
udpflannel<->wireguard-go, in network namespaces joined by a wire-mode veth underlay.

Per pairing: handshake completion time (first ping, which waits for the handshake), then iperf3 with one TCP
stream for 10 s (3 reps; --quick: 1 rep of 3 s), Gbit/s and CPU seconds per GiB moved (both WireGuard
processes, from /proc/<pid>/stat), plus RSS/PSS of our worker. Needs root, wireguard-go, wg and iperf3.

    .venv/bin/python perf/bench_wireguard.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "interop"))
sys.path.insert(0, str(REPO))

from wg_lab import WgLab, WgNode, ping  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAIRINGS = (("wggo", "wggo"), ("ours", "ours"), ("ours", "wggo"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its reaped children (wireguard-go is one process with threads)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB from /proc/<pid>/smaps_rollup."""
    rss = pss = 0
    for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


def iperf(client: WgNode, server: WgNode, seconds: int) -> float:
    """Bits per second received by the server over one TCP stream."""
    srv = server.ns.popen("iperf3", "-s", "-1", "-B", server.overlay_ip)
    try:
        time.sleep(0.3)
        out = client.ns.exec(
            "iperf3", "-c", server.overlay_ip, "-t", str(seconds), "-J", timeout=seconds + 30
        )
    finally:
        srv.wait(timeout=10)
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])


def run_pairing(kind_a: str, kind_b: str, reps: int, seconds: int) -> dict:
    with WgLab() as lab:
        a, b = lab.node(1, kind_a), lab.node(2, kind_b)
        lab.connect(a, b)
        lab.connect(b, a)
        t0 = time.monotonic()
        ping(a, b, count=1, wait=10)
        handshake_ms = (time.monotonic() - t0) * 1000
        pids = [n.proc.pid for n in (a, b) if n.proc is not None]
        rates, cpu_per_gib = [], []
        for _ in range(reps):
            cpu0 = sum(cpu_seconds(p) for p in pids)
            bps = iperf(a, b, seconds)
            cpu = sum(cpu_seconds(p) for p in pids) - cpu0
            gib = bps * seconds / 8 / (1 << 30)
            rates.append(bps / 1e9)
            cpu_per_gib.append(cpu / gib if gib else float("inf"))
        mem = {n.kind + str(n.index): memory_kib(n.proc.pid) for n in (a, b) if n.kind == "ours" and n.proc}
        return {
            "pairing": f"{kind_a}->{kind_b}",
            "gbit_s": rates,
            "gbit_s_median": statistics.median(rates),
            "cpu_s_per_gib_median": statistics.median(cpu_per_gib),
            "handshake_ms": handshake_ms,
            "rss_pss_kib": mem,
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 rep of 3 s per pairing")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_wireguard: needs root (network namespaces)", file=sys.stderr)
        return 2
    missing = [t for t in ("wireguard-go", "wg", "iperf3") if shutil.which(t) is None]
    if missing:
        print(
            f"bench_wireguard: missing {', '.join(missing)} (scripts/setup.sh installs them)", file=sys.stderr
        )
        return 2
    reps, seconds = (1, 3) if args.quick else (3, 10)
    results = [run_pairing(a, b, reps, seconds) for a, b in PAIRINGS]
    print(f"{'pairing':<14} {'Gbit/s (median)':>16} {'CPU-s/GiB':>10} {'handshake ms':>13}  reps")
    for r in results:
        reps_text = " ".join(f"{x:.3f}" for x in r["gbit_s"])
        print(
            f"{r['pairing']:<14} {r['gbit_s_median']:>16.3f} {r['cpu_s_per_gib_median']:>10.1f} "
            f"{r['handshake_ms']:>13.1f}  {reps_text}"
        )
        for name, (rss, pss) in r["rss_pss_kib"].items():
            print(f"{'':<14} {name} worker RSS {rss / 1024:.1f} MiB, PSS {pss / 1024:.1f} MiB")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
