"""WireGuard throughput and cost: wireguard-go<->wireguard-go vs udpflannel<->udpflannel vs
udpflannel<->wireguard-go, in network namespaces joined by a wire-mode veth underlay.

Per pairing: handshake time (RTT of a first ping, as ping reports it, that has to wait for a fresh
handshake: the initiator's session is dropped before each of 11 tries; median), steady ping RTT, then
iperf3 with one TCP stream for 10 s (3 rounds; --quick: 1 of 3 s), Gbit/s and CPU seconds per GiB
moved (both WireGuard processes, from /proc/<pid>/stat), plus RSS/PSS of our worker. Every pairing is set
up first and the rounds run each once, so a slow spell of the shared machine falls on all alike; ratios
are the median of each round's ratio to wggo->wggo's run of that round. Needs root, wireguard-go, wg and
iperf3.

--micro: our engine alone, in one process, TUN faked by a socketpair and the underlay on the loopback of
a network namespace of its own (198.18.0.1): CPU microseconds per 64 KiB superpacket for TX (split + seal
+ send) and RX (open + GRO + TUN write), the part of the cost that is ours rather than the kernel's or
iperf3's; and of a lone ACK each way (a receiver that keeps up sends one back per superpacket).

    .venv/bin/python perf/bench_wireguard.py [--quick] [--micro] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
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
sys.path.insert(0, str(REPO / "perf"))

from wg_lab import WgLab, WgNode, b64, ping  # noqa: E402

from udpflannel.lab.netns import SERVICE_ADDR, Lab, call_in_netns, exit_on_sigterm  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAIRINGS = (("wggo", "wggo"), ("ours", "ours"), ("ours", "wggo"))
MICRO_ADDR = SERVICE_ADDR  # --micro's underlay: the loopback of a namespace of its own (Lab.private)
HANDSHAKE_TRIES = 11  # a median of 11: one slow minute of a shared machine moves it less


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


def iperf(client: WgNode, server: WgNode, seconds: int) -> tuple[float, int]:
    """Bits per second received by the server over one TCP stream, and the sender's TCP retransmits."""
    srv = server.ns.popen("iperf3", "-s", "-1", "-B", server.overlay_ip)
    try:
        time.sleep(0.3)
        out = client.ns.exec(
            "iperf3", "-c", server.overlay_ip, "-t", str(seconds), "-J", timeout=seconds + 30
        )
    finally:
        srv.wait(timeout=10)
    end = json.loads(out)["end"]
    return float(end["sum_received"]["bits_per_second"]), int(end["sum_sent"].get("retransmits", 0))


def ping_ms(src: WgNode, dst: WgNode, count: int = 1, interval: float = 0.2) -> list[float]:
    """RTTs in ms as ping reports them (lost replies are left out)."""
    out = src.ns.exec(
        "ping", "-c", str(count), "-i", str(interval), "-W", "5", dst.overlay_ip, timeout=30 + count
    )
    return [float(line.split("time=")[1].split()[0]) for line in out.splitlines() if "time=" in line]


def forget_session(lab: WgLab, a: WgNode, b: WgNode) -> None:
    """a drops its peer b (keys and all) and gets it back, so a's next packet to b starts a handshake."""
    if a.kind == "ours":
        a.send({"op": "peers", "peers": []}, "applied")
    else:
        a.ns.exec("wg", "set", a.ifname, "peer", b64(b.public_key), "remove")
    lab.connect(a, b)


def handshake_ms(lab: WgLab, a: WgNode, b: WgNode) -> list[float]:
    """First-ping RTTs, each behind a fresh handshake started by a."""
    rtts = []
    for _ in range(HANDSHAKE_TRIES):
        forget_session(lab, a, b)
        time.sleep(0.2)
        rtts += ping_ms(a, b)
    return rtts


def start_pairing(stop: contextlib.ExitStack, kind_a: str, kind_b: str) -> dict:
    """A pairing's two nodes, connected; its handshake times and steady RTT measured now (quick), its
    throughput later, in rounds with the others (see main)."""
    lab = stop.enter_context(WgLab())
    a, b = lab.node(1, kind_a), lab.node(2, kind_b)
    lab.connect(a, b)
    lab.connect(b, a)
    ping(a, b, count=1, wait=10)
    handshakes = handshake_ms(lab, a, b)
    rtt = ping_ms(a, b, count=20, interval=0.05)
    return {
        "pairing": f"{kind_a}->{kind_b}",
        "nodes": (a, b),
        "gbit_s": [],
        "cpu_s_per_gib": [],
        "retransmits": 0,
        "handshake_ms": handshakes,
        "handshake_ms_median": statistics.median(handshakes) if handshakes else float("nan"),
        "rtt_ms_median": statistics.median(rtt) if rtt else float("nan"),
    }


def measure_pairing(r: dict, seconds: int) -> None:
    """One iperf3 run of a pairing: Gbit/s, CPU-s/GiB of both WireGuard processes, retransmits."""
    a, b = r["nodes"]
    pids = [n.proc.pid for n in (a, b) if n.proc is not None]
    cpu0 = sum(cpu_seconds(p) for p in pids)
    bps, lost = iperf(a, b, seconds)
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    gib = bps * seconds / 8 / (1 << 30)
    r["retransmits"] += lost
    r["gbit_s"].append(bps / 1e9)
    r["cpu_s_per_gib"].append(cpu / gib if gib else float("inf"))


def finish_pairing(r: dict) -> dict:
    a, b = r.pop("nodes")
    r["gbit_s_median"] = statistics.median(r["gbit_s"])
    r["cpu_s_per_gib_median"] = statistics.median(r.pop("cpu_s_per_gib"))
    r["rss_pss_kib"] = {
        n.kind + str(n.index): memory_kib(n.proc.pid) for n in (a, b) if n.kind == "ours" and n.proc
    }
    return r


def run_micro(rounds: int, per_round: int = 4) -> dict:
    """run_micro_in a namespace made for it (and removed after)."""
    with Lab() as lab:
        return run_micro_in(lab.private("micro").name, rounds, per_round)


def run_micro_in(netns: str, rounds: int, per_round: int = 4) -> dict:
    """Two engines in this process: TUN = SOCK_SEQPACKET socketpair (one message per read, with the
    virtio header), underlay = UDP with GSO/GRO on the loopback of `netns`. CPU time of this thread per
    superpacket."""
    import socket

    from micro import tcp_superpacket

    from udpflannel.codec.wireguard import crypto
    from udpflannel.codec.wireguard.session import Device
    from udpflannel.dataplane.wg_engine import WgEngine, WgPeerConfig
    from udpflannel.dataplane.wg_worker import warm_up
    from udpflannel.io.tun import Tun
    from udpflannel.io.udp import UdpSocket
    from udpflannel.packet.vnet import VIRTIO_NET_HDR_F_NEEDS_CSUM, VnetHdr

    mtu, mss, segments = 1420, 1368, 44
    made: list[socket.socket | UdpSocket] = []

    def engine(index: int) -> tuple[WgEngine, socket.socket]:
        outside, inside = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (outside, inside):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        inside.setblocking(False)
        outside.setblocking(False)
        udp = call_in_netns(netns, lambda: UdpSocket.open(socket.AF_INET, MICRO_ADDR, 0))
        made.extend((outside, inside, udp))
        device = Device(crypto.generate_private_key(os.urandom(32)), mtu=mtu)
        return WgEngine(device, Tun.from_fd(inside.fileno(), f"micro{index}", vnet=True), udp), outside

    def drain(sock: socket.socket) -> int:
        got = 0
        for _ in range(100_000):
            try:
                got += len(sock.recv(1 << 17))
            except BlockingIOError:
                break
        return got

    try:
        (a, a_tun), (b, b_tun) = engine(1), engine(2)
        for x, y, subnet in ((a, b, "198.19.2.0/24"), (b, a, "198.19.1.0/24")):
            key = y.device.identity.public
            x.set_peers([WgPeerConfig(key, (MICRO_ADDR, y.udp.address[1]), (subnet,))], time.monotonic())
        warm_up()
        pkt, hdr = tcp_superpacket(segments * mss, mss=mss)
        frame = hdr.encode() + pkt
        a_tun.send(frame)  # the first one waits for the handshake
        for _ in range(50):
            now = time.monotonic()
            a.tx_once(now)
            b.rx_once(now)
            a.rx_once(now)
            b.rx_once(now)
            a.run_timers(now)
            if drain(b_tun):
                break
            time.sleep(0.002)
        tx = rx = 0.0
        delivered = 0
        for i in range(rounds + 10):
            for _ in range(per_round):
                a_tun.send(frame)
            t0 = time.thread_time()
            a.tx_once(time.monotonic())
            t1 = time.thread_time()
            for _ in range(16):
                if b.rx_once(time.monotonic()) == 0:
                    break
            t2 = time.thread_time()
            if i >= 10:  # the first rounds warm caches up
                tx += t1 - t0
                rx += t2 - t1
                delivered += drain(b_tun)
            else:
                drain(b_tun)
        # A lone pure ACK (what a receiver that keeps up sends back for each superpacket), as the TUN hands
        # it over (NEEDS_CSUM), through A's send and B's receive one at a time.
        ack = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 20, 16).encode() + tcp_superpacket(0, mss=mss)[0]
        ack_tx, ack_rx = [], []
        for i in range(rounds + 10):
            a_tun.send(ack)
            t0 = time.thread_time()
            a.tx_once(time.monotonic())
            t1 = time.thread_time()
            b.rx_once(time.monotonic())
            t2 = time.thread_time()
            if drain(b_tun) and i >= 10:
                ack_tx.append(t1 - t0)
                ack_rx.append(t2 - t1)
    finally:
        for obj in made:
            obj.close()
    n = rounds * per_round
    gib = n * len(pkt) / (1 << 30)
    result = {
        "superpacket_bytes": len(pkt),
        "segments": segments,
        "tx_us_per_superpacket": tx / n * 1e6,
        "rx_us_per_superpacket": rx / n * 1e6,
        "tx_cpu_s_per_gib": tx / gib,
        "rx_cpu_s_per_gib": rx / gib,
        # TUN writes carry a 10-byte virtio header each: count bytes, compare to what was injected
        "delivered_fraction": delivered / (n * len(pkt)),
        "lone_ack_tx_us": statistics.median(ack_tx) * 1e6 if ack_tx else float("nan"),
        "lone_ack_rx_us": statistics.median(ack_rx) * 1e6 if ack_rx else float("nan"),
    }
    print(
        f"TX {result['tx_us_per_superpacket']:.0f} us per {len(pkt)}-byte superpacket "
        f"({result['tx_us_per_superpacket'] / segments:.2f} us/segment, {result['tx_cpu_s_per_gib']:.2f} "
        f"CPU-s/GiB); RX {result['rx_us_per_superpacket']:.0f} us ({result['rx_cpu_s_per_gib']:.2f} "
        f"CPU-s/GiB); delivered {result['delivered_fraction']:.3f} of the bytes sent; a lone ACK: TX "
        f"{result['lone_ack_tx_us']:.0f} us, RX {result['lone_ack_rx_us']:.0f} us (median)"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 rep of 3 s per pairing")
    ap.add_argument("--micro", action="store_true", help="our engine alone, in-process")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    exit_on_sigterm()  # a stopped run removes its namespaces and peers too
    if os.geteuid() != 0:
        print("bench_wireguard: needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.micro:
        result = run_micro(rounds=100 if args.quick else 400)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
        return 0
    missing = [t for t in ("wireguard-go", "wg", "iperf3") if shutil.which(t) is None]
    if missing:
        print(
            f"bench_wireguard: missing {', '.join(missing)} (scripts/setup.sh installs them)", file=sys.stderr
        )
        return 2
    reps, seconds = (1, 3) if args.quick else (3, 10)
    with contextlib.ExitStack() as stop:
        running = [start_pairing(stop, a, b) for a, b in PAIRINGS]
        # Rounds: each pairing once a round, so a slow spell of the shared machine falls on all alike.
        for _ in range(reps):
            for r in running:
                measure_pairing(r, seconds)
        results = [finish_pairing(r) for r in running]
    base = results[0]["gbit_s"]
    print(
        f"{'pairing':<14} {'Gbit/s (median)':>16} {'x wggo':>7} {'CPU-s/GiB':>10} {'retrans':>8} "
        f"{'handshake ms':>13} {'RTT ms':>7}  reps"
    )
    for r in results:
        reps_text = " ".join(f"{x:.3f}" for x in r["gbit_s"])
        # the median of each round's ratio to wggo->wggo's run of that round
        r["ratio_vs_wggo"] = statistics.median(
            x / y if y else float("nan") for x, y in zip(r["gbit_s"], base, strict=True)
        )
        print(
            f"{r['pairing']:<14} {r['gbit_s_median']:>16.3f} {r['ratio_vs_wggo']:>7.2f} "
            f"{r['cpu_s_per_gib_median']:>10.1f} {r['retransmits']:>8d} {r['handshake_ms_median']:>13.2f} "
            f"{r['rtt_ms_median']:>7.2f}  {reps_text}"
        )
        for name, (rss, pss) in r["rss_pss_kib"].items():
            print(f"{'':<14} {name} worker RSS {rss / 1024:.1f} MiB, PSS {pss / 1024:.1f} MiB")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
