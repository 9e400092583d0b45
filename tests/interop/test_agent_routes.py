"""Routes to peers via their underlay addresses, through the real agent: host-gw (two `udpflannel run`
processes in two namespaces on one underlay share an embedded lease store and route each other's subnets via
the peer's public IP; routes follow peers that join and leave, come back when removed by hand, and go when
the agents stop; a public IP that is not the interface's own is refused before anything is leased;
dual-stack routes each family via the peer's address of that family), vxlan's DirectRouting, and a
dual-stack vxlan pair's IPv6 transfer through the tunnel TAP with the FORWARD policies at DROP."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
from agent_run import env_file
from tunnel_lab import KERNEL_TUNNEL_TAP

from udpflannel.lab.netns import Lab, Netns
from udpflannel.lab.transfer import SINK, SOURCE
from udpflannel.lease.model import LeaseAttrs
from udpflannel.lease.sqlite import SqliteStore

pytestmark = [pytest.mark.root, pytest.mark.slow]
if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces", allow_module_level=True)

REPO = pathlib.Path(__file__).resolve().parents[2]
NET_CONF = {"Network": "198.19.0.0/16", "Backend": {"Type": "host-gw"}}


def _agent(ns: Netns, root: pathlib.Path, name: str, *extra: str, log=None) -> subprocess.Popen:
    (root / name).mkdir(exist_ok=True)
    cmd = [
        sys.executable, "-c", "import sys; from udpflannel.cli import main; sys.exit(main())",
        "run", "--iface", "eth0",
        f"--sqlite-path={root / 'leases.db'}", f"--net-config-path={root / 'net-conf.json'}",
        f"--subnet-file={root / name / 'subnet.env'}", *extra,
    ]  # fmt: skip
    return ns.popen(
        *cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=log or subprocess.PIPE, text=True
    )


def _wait_route(ns: Netns, present: str | None, absent: str | None = None, seconds: float = 15) -> str:
    """`ip route` once it shows `present` (and not `absent`); bounded."""
    deadline = time.monotonic() + seconds
    while True:
        routes = ns.exec("ip", "route")
        if (present is None or present in routes) and (absent is None or absent not in routes):
            return routes
        if time.monotonic() > deadline:
            raise AssertionError(f"waited for {present!r} / no {absent!r}:\n{routes}")
        time.sleep(0.2)


@dataclass
class Pair:
    """Two agents on one underlay (a 198.18.0.1, b 198.18.0.2), each with its CNI bridge holding its subnet's
    first address, as flannel's CNI plugin would make it (no pods needed)."""

    root: pathlib.Path
    a: Netns
    b: Netns
    env_a: dict[str, str]
    env_b: dict[str, str]
    routes_after: str = ""  # a's `ip route` and `ip -6 route` once both agents have stopped

    def net(self, env: dict[str, str], key: str = "FLANNEL_SUBNET") -> str:
        return str(ipaddress.ip_interface(env[key]).network)

    def gw(self, env: dict[str, str], key: str = "FLANNEL_SUBNET") -> str:
        return env[key].split("/")[0]

    def log_tail(self, name: str = "a") -> str:
        return (self.root / f"{name}.log").read_text()[-3000:]


@contextlib.contextmanager
def agent_pair(conf: dict, tmp_prefix: str, ipv6: bool = False) -> Iterator[Pair]:
    """Run two agents with net-conf `conf`; at exit stop them, check they exited 0, remove everything."""
    with Lab() as lab, tempfile.TemporaryDirectory(prefix=tmp_prefix) as tmp, ExitStack() as stack:
        root = pathlib.Path(tmp)
        (root / "net-conf.json").write_text(json.dumps(conf))
        a, b = lab.netns("a"), lab.netns("b")
        lab.veth(a, b, "198.18.0.1/16", "198.18.0.2/16")
        if ipv6:
            for ns, ip6 in ((a, "fd00:198::1/64"), (b, "fd00:198::2/64")):
                ns.exec("ip", "-6", "addr", "add", ip6, "dev", "eth0", "nodad")
        logs = {n: stack.enter_context(open(root / f"{n}.log", "w")) for n in ("a", "b")}
        # -v: every route the agents add and every peer they judge is in their logs, for a failure's message
        procs = [_agent(a, root, "a", "-v", log=logs["a"]), _agent(b, root, "b", "-v", log=logs["b"])]
        try:
            deadline = time.monotonic() + 30
            envs = [env_file(root / n / "subnet.env", deadline) for n in ("a", "b")]
            for ns, env in zip((a, b), envs, strict=True):
                ns.exec("ip", "link", "add", "cni0", "type", "bridge")
                ns.exec("ip", "addr", "add", env["FLANNEL_SUBNET"], "dev", "cni0")
                if ipv6:
                    ns.exec("ip", "-6", "addr", "add", env["FLANNEL_IPV6_SUBNET"], "dev", "cni0", "nodad")
                ns.exec("ip", "link", "set", "cni0", "up")
            pair = Pair(root, a, b, envs[0], envs[1])
            yield pair
        finally:
            for p in procs:
                p.terminate()
            codes = [p.wait(timeout=20) for p in procs]
        assert codes == [0, 0], (root / "a.log").read_text()[-2000:]
        pair.routes_after = a.exec("ip", "route") + a.exec("ip", "-6", "route")


def test_two_agents_route_each_others_subnets_via_their_public_ips() -> None:
    with agent_pair(NET_CONF, "udpflannel-hostgw-") as pair:
        a, b, env_a, env_b = pair.a, pair.b, pair.env_a, pair.env_b
        assert env_a["FLANNEL_MTU"] == env_b["FLANNEL_MTU"] == "1500"  # no encapsulation
        net_b = pair.net(env_b)
        _wait_route(a, f"{net_b} via 198.18.0.2 dev eth0")
        _wait_route(b, f"{pair.net(env_a)} via 198.18.0.1 dev eth0")
        # From pod subnet to pod subnet: both directions take the host-gw routes.
        a.exec("ping", "-c", "3", "-i", "0.2", "-W", "2", "-I", pair.gw(env_a), pair.gw(env_b), timeout=20)

        # Peers come and go through the store; one of another backend type is not routed.
        store = SqliteStore(pair.root / "leases.db")
        try:
            joined = store.create(
                ipaddress.IPv4Network("198.19.200.0/24"),
                None,
                LeaseAttrs(public_ip=ipaddress.IPv4Address("198.18.0.3"), backend_type="host-gw"),
                ttl=600,
            )
            other = store.create(
                ipaddress.IPv4Network("198.19.201.0/24"),
                None,
                LeaseAttrs(public_ip=ipaddress.IPv4Address("198.18.0.4"), backend_type="vxlan"),
                ttl=600,
            )
            _wait_route(a, "198.19.200.0/24 via 198.18.0.3 dev eth0")
            store.delete(joined)
            routes = _wait_route(a, None, "198.19.200.0/24")
            assert "198.19.201.0/24" not in routes
            store.delete(other)
            # Leases no route can be made of: via our own address (a stale lease of ours) is skipped, the
            # kernel refuses the others; the agent says so and keeps going.
            for third, gateway in ((210, "0.0.0.0"), (211, "198.18.0.1"), (212, "224.0.0.1")):
                attrs = LeaseAttrs(public_ip=ipaddress.IPv4Address(gateway), backend_type="host-gw")
                store.create(ipaddress.IPv4Network(f"198.19.{third}.0/24"), None, attrs, ttl=600)
            time.sleep(2)  # the agent's watch delivers them within about a second
            routes = a.exec("ip", "route")
            assert not any(f"198.19.{third}.0/24" in routes for third in (210, 211, 212)), routes
            a.exec("ping", "-c", "1", "-W", "2", "-I", pair.gw(env_a), pair.gw(env_b), timeout=10)
        finally:
            store.close()

        # A route removed by hand is put back by the agent's check (every 10 s, as flanneld's).
        a.exec("ip", "route", "del", net_b)
        _wait_route(a, f"{net_b} via 198.18.0.2 dev eth0", seconds=20)
        assert "removed or changed: put back" in (pair.root / "a.log").read_text()
    # Stopped: the routes to peers are gone, cni0's own route stays.
    assert "via 198.18." not in pair.routes_after and "dev cni0" in pair.routes_after


def test_a_public_ip_that_is_not_the_interfaces_is_refused() -> None:
    """flanneld's host-gw refuses NAT: peers route to the public IP directly, so it must be ours."""
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="udpflannel-hostgw-") as tmp:
        root = pathlib.Path(tmp)
        (root / "net-conf.json").write_text(json.dumps(NET_CONF))
        a, b = lab.netns("a"), lab.netns("b")
        lab.veth(a, b, "198.18.0.1/16", "198.18.0.2/16")
        proc = _agent(a, root, "a", "--public-ip=198.18.0.9")
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 2
        assert (
            err.strip()
            .splitlines()[-1]
            .startswith("udpflannel: host-gw: public IP 198.18.0.9 is not the address of eth0 (198.18.0.1)")
        ), err
        assert not (root / "a" / "subnet.env").exists()
        store = SqliteStore(root / "leases.db")
        try:
            assert store.list().leases == []
        finally:
            store.close()
        assert "via" not in a.exec("ip", "route")


def test_dual_stack_routes_each_family_via_the_peers_address_of_that_family() -> None:
    conf = {**NET_CONF, "EnableIPv6": True, "IPv6Network": "fd00:198:100::/56"}
    with agent_pair(conf, "udpflannel-hostgw-", ipv6=True) as pair:
        a, b, env_a, env_b = pair.a, pair.b, pair.env_a, pair.env_b
        v6 = "FLANNEL_IPV6_SUBNET"
        for ns, net, gw in ((a, pair.net(env_b, v6), "fd00:198::2"), (b, pair.net(env_a, v6), "fd00:198::1")):
            deadline = time.monotonic() + 15
            while f"{net} via {gw} dev eth0" not in ns.exec("ip", "-6", "route"):
                assert time.monotonic() < deadline, ns.exec("ip", "-6", "route")
                time.sleep(0.2)
        _wait_route(a, f"{pair.net(env_b)} via 198.18.0.2 dev eth0")
        a.exec("ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "-I", pair.gw(env_a, v6), pair.gw(env_b, v6))
    assert "via fd00:198::" not in pair.routes_after and "via 198.18." not in pair.routes_after


def test_vxlan_direct_routing_routes_peers_on_the_link_and_tunnels_the_rest() -> None:
    """flannel's vxlan DirectRouting: a peer the kernel reaches with no gateway gets `<subnet> via <its IP>`
    (no encapsulation); a peer behind a router keeps the tunnel."""
    conf = {"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": True}}
    with agent_pair(conf, "udpflannel-direct-") as pair:
        a, b, env_a, env_b = pair.a, pair.b, pair.env_a, pair.env_b
        a.exec("ip", "route", "add", "198.18.250.0/24", "via", "198.18.0.2")  # the far peer's network
        assert env_a["FLANNEL_MTU"] == "1450"  # still vxlan's: the tunnel carries the other peers
        net_b = pair.net(env_b)
        _wait_route(a, f"{net_b} via 198.18.0.2 dev eth0")
        _wait_route(b, f"{pair.net(env_a)} via 198.18.0.1 dev eth0")
        a.exec("ping", "-c", "3", "-i", "0.2", "-W", "2", "-I", pair.gw(env_a), pair.gw(env_b), timeout=20)
        assert "dev eth0" in a.exec("ip", "route", "get", pair.gw(env_b))  # the kernel's route, not flannel.1
        store = SqliteStore(pair.root / "leases.db")
        try:
            far = LeaseAttrs(
                public_ip=ipaddress.IPv4Address("198.18.250.9"),
                backend_type="vxlan",
                backend_data={"VNI": 1, "VtepMAC": "02:00:00:00:00:09"},
            )
            store.create(ipaddress.IPv4Network("198.19.200.0/24"), None, far, ttl=600)
            time.sleep(2)  # the agent's watch delivers it within about a second
        finally:
            store.close()
        routes = a.exec("ip", "route")
        assert "198.19.200.0/24" not in routes and f"{net_b} via 198.18.0.2" in routes
        assert "dev flannel.1" in a.exec("ip", "route", "get", "198.19.200.5")  # tunnelled
    assert f"{net_b} via" not in pair.routes_after and "flannel.1" not in pair.routes_after


def test_vxlan_direct_routing_dual_stack_routes_ipv6_subnets_via_the_peers_ipv6() -> None:
    conf = {
        "Network": "198.19.0.0/16",
        "EnableIPv6": True,
        "IPv6Network": "fd00:198:100::/56",
        "Backend": {"Type": "vxlan", "DirectRouting": True},
    }
    with agent_pair(conf, "udpflannel-direct-", ipv6=True) as pair:
        a, env_a, env_b = pair.a, pair.env_a, pair.env_b
        v6 = "FLANNEL_IPV6_SUBNET"
        want = f"{pair.net(env_b, v6)} via fd00:198::2 dev eth0"
        deadline = time.monotonic() + 15
        while want not in a.exec("ip", "-6", "route"):
            assert time.monotonic() < deadline, a.exec("ip", "-6", "route") + pair.log_tail()
            time.sleep(0.2)
        a.exec("ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "-I", pair.gw(env_a, v6), pair.gw(env_b, v6))
        assert "dev eth0" in a.exec("ip", "-6", "route", "get", pair.gw(env_b, v6))
    assert "via fd00:198::2" not in pair.routes_after


def test_vxlan_dual_stack_sends_ipv6_through_the_tunnel_tap_past_forward_drop() -> None:
    """IPv6 over the IPv6 underlay (flannel-v6.1's frames): TCP superpackets leave through the tunnel TAP,
    whose forwarded frames FLANNEL-FWD accepts in ip6tables as in iptables, so a checked transfer crosses
    with both FORWARD policies at DROP (a node with Docker)."""
    conf = {"Network": "198.19.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:198:100::/56",
            "Backend": {"Type": "vxlan"}}  # fmt: skip
    with agent_pair(conf, "udpflannel-dual-", ipv6=True) as pair:
        a, b, env_a, env_b = pair.a, pair.b, pair.env_a, pair.env_b
        for ns in (a, b):
            ns.exec("iptables", "-P", "FORWARD", "DROP")
            ns.exec("ip6tables", "-P", "FORWARD", "DROP")
        v6 = "FLANNEL_IPV6_SUBNET"
        dst = pair.gw(env_b, v6)
        deadline = time.monotonic() + 15  # the peer arrives through the store's watch
        while subprocess.run(a.cmd("ping", "-6", "-c", "1", "-W", "1", dst), capture_output=True).returncode:
            assert time.monotonic() < deadline, a.exec("ip", "-6", "route")
            time.sleep(0.2)
        sink = b.popen(sys.executable, "-c", SINK, dst, "7000", "60", stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
        out = a.exec(sys.executable, "-c", SOURCE, dst, "7000", str(20_000_000), "60", timeout=90)
        sent, digest, _, got_n, got_digest = out.split()
        assert sent == got_n and digest == got_digest
        rule = "-i flannel.1-tx -j ACCEPT"
        assert (rule in a.exec("ip6tables", "-S", "FLANNEL-FWD")) is KERNEL_TUNNEL_TAP
        assert (rule in a.exec("iptables", "-S", "FLANNEL-FWD")) is KERNEL_TUNNEL_TAP
        assert env_a[v6] != env_b[v6]
