"""Routes to peers via their underlay addresses, through the real agent: host-gw (two `udpflannel run`
processes in two namespaces on one underlay share an embedded lease store and route each other's subnets via
the peer's public IP; routes follow peers that join and leave, come back when removed by hand, and go when
the agents stop; a public IP that is not the interface's own is refused before anything is leased;
dual-stack routes each family via the peer's address of that family), and vxlan's DirectRouting."""

from __future__ import annotations

import ipaddress
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack

import pytest

from udpflannel.lab.netns import Lab, Netns
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


def _env_file(path: pathlib.Path, deadline: float) -> dict[str, str]:
    while time.monotonic() < deadline:
        if path.exists():
            return dict(line.split("=", 1) for line in path.read_text().split())
        time.sleep(0.1)
    logs = "\n".join(p.read_text()[-1500:] for p in path.parents[1].glob("*.log"))
    raise AssertionError(f"{path} never appeared; agent logs:\n{logs}")


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


def test_two_agents_route_each_others_subnets_via_their_public_ips() -> None:
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="udpflannel-hostgw-") as tmp, ExitStack() as stack:
        root = pathlib.Path(tmp)
        (root / "net-conf.json").write_text(json.dumps(NET_CONF))
        a, b = lab.netns("a"), lab.netns("b")
        lab.veth(a, b, "198.18.0.1/16", "198.18.0.2/16")
        logs = {n: stack.enter_context(open(root / f"{n}.log", "w")) for n in ("a", "b")}
        procs = [_agent(a, root, "a", log=logs["a"]), _agent(b, root, "b", log=logs["b"])]
        try:
            deadline = time.monotonic() + 30
            env_a = _env_file(root / "a" / "subnet.env", deadline)
            env_b = _env_file(root / "b" / "subnet.env", deadline)
            assert env_a["FLANNEL_MTU"] == env_b["FLANNEL_MTU"] == "1500"  # no encapsulation
            net_a = ipaddress.ip_interface(env_a["FLANNEL_SUBNET"]).network
            net_b = ipaddress.ip_interface(env_b["FLANNEL_SUBNET"]).network
            # The CNI bridge as flannel's CNI plugin makes it: the subnet's first address (no pods here).
            for ns, env in ((a, env_a), (b, env_b)):
                ns.exec("ip", "link", "add", "cni0", "type", "bridge")
                ns.exec("ip", "addr", "add", env["FLANNEL_SUBNET"], "dev", "cni0")
                ns.exec("ip", "link", "set", "cni0", "up")
            _wait_route(a, f"{net_b} via 198.18.0.2 dev eth0")
            _wait_route(b, f"{net_a} via 198.18.0.1 dev eth0")
            gw_a, gw_b = env_a["FLANNEL_SUBNET"].split("/")[0], env_b["FLANNEL_SUBNET"].split("/")[0]
            # From pod subnet to pod subnet: both directions take the host-gw routes.
            a.exec("ping", "-c", "3", "-i", "0.2", "-W", "2", "-I", gw_a, gw_b, timeout=20)

            # Peers come and go through the store; one of another backend type is not routed.
            store = SqliteStore(root / "leases.db")
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
            finally:
                store.close()

            # A route removed by hand is put back by the agent's check (every 10 s, as flanneld's).
            a.exec("ip", "route", "del", str(net_b))
            _wait_route(a, f"{net_b} via 198.18.0.2 dev eth0", seconds=20)
            assert "removed or changed: put back" in (root / "a.log").read_text()
        finally:
            for p in procs:
                p.terminate()
            codes = [p.wait(timeout=20) for p in procs]
        assert codes == [0, 0], (root / "a.log").read_text()[-2000:]
        # Stopped: the routes to peers are gone (cni0's own route stays).
        assert "via 198.18." not in a.exec("ip", "route") and "via 198.18." not in b.exec("ip", "route")


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
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="udpflannel-hostgw-") as tmp, ExitStack() as stack:
        root = pathlib.Path(tmp)
        conf = {**NET_CONF, "EnableIPv6": True, "IPv6Network": "fd00:198:100::/56"}
        (root / "net-conf.json").write_text(json.dumps(conf))
        a, b = lab.netns("a"), lab.netns("b")
        lab.veth(a, b, "198.18.0.1/16", "198.18.0.2/16")
        for ns, ip6 in ((a, "fd00:198::1/64"), (b, "fd00:198::2/64")):
            ns.exec("ip", "-6", "addr", "add", ip6, "dev", "eth0", "nodad")
        logs = {n: stack.enter_context(open(root / f"{n}.log", "w")) for n in ("a", "b")}
        procs = [_agent(a, root, "a", log=logs["a"]), _agent(b, root, "b", log=logs["b"])]
        try:
            deadline = time.monotonic() + 30
            env_a = _env_file(root / "a" / "subnet.env", deadline)
            env_b = _env_file(root / "b" / "subnet.env", deadline)
            for ns, env in ((a, env_a), (b, env_b)):
                ns.exec("ip", "link", "add", "cni0", "type", "bridge")
                ns.exec("ip", "addr", "add", env["FLANNEL_SUBNET"], "dev", "cni0")
                ns.exec("ip", "-6", "addr", "add", env["FLANNEL_IPV6_SUBNET"], "dev", "cni0", "nodad")
                ns.exec("ip", "link", "set", "cni0", "up")
            net6_b = ipaddress.ip_interface(env_b["FLANNEL_IPV6_SUBNET"]).network
            net6_a = ipaddress.ip_interface(env_a["FLANNEL_IPV6_SUBNET"]).network
            for ns, net, gw in ((a, net6_b, "fd00:198::2"), (b, net6_a, "fd00:198::1")):
                deadline = time.monotonic() + 15
                while f"{net} via {gw} dev eth0" not in ns.exec("ip", "-6", "route"):
                    assert time.monotonic() < deadline, ns.exec("ip", "-6", "route")
                    time.sleep(0.2)
            net_b = ipaddress.ip_interface(env_b["FLANNEL_SUBNET"]).network
            _wait_route(a, f"{net_b} via 198.18.0.2 dev eth0")
            src6 = env_a["FLANNEL_IPV6_SUBNET"].split("/")[0]
            dst6 = env_b["FLANNEL_IPV6_SUBNET"].split("/")[0]
            a.exec("ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "-I", src6, dst6, timeout=20)
        finally:
            for p in procs:
                p.terminate()
            codes = [p.wait(timeout=20) for p in procs]
        assert codes == [0, 0], (root / "a.log").read_text()[-2000:]
        assert "via fd00:198::" not in a.exec("ip", "-6", "route")


def test_vxlan_direct_routing_routes_peers_on_the_link_and_tunnels_the_rest() -> None:
    """flannel's vxlan DirectRouting: a peer the kernel reaches with no gateway gets `<subnet> via <its IP>`
    (no encapsulation); a peer behind a router keeps the tunnel."""
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="udpflannel-direct-") as tmp, ExitStack() as stack:
        root = pathlib.Path(tmp)
        conf = {"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": True}}
        (root / "net-conf.json").write_text(json.dumps(conf))
        a, b = lab.netns("a"), lab.netns("b")
        lab.veth(a, b, "198.18.0.1/16", "198.18.0.2/16")
        a.exec("ip", "route", "add", "198.18.250.0/24", "via", "198.18.0.2")  # the far peer's network
        logs = {n: stack.enter_context(open(root / f"{n}.log", "w")) for n in ("a", "b")}
        procs = [_agent(a, root, "a", log=logs["a"]), _agent(b, root, "b", log=logs["b"])]
        try:
            deadline = time.monotonic() + 30
            env_a = _env_file(root / "a" / "subnet.env", deadline)
            env_b = _env_file(root / "b" / "subnet.env", deadline)
            assert env_a["FLANNEL_MTU"] == "1450"  # still vxlan's: the tunnel carries the other peers
            for ns, env in ((a, env_a), (b, env_b)):
                ns.exec("ip", "link", "add", "cni0", "type", "bridge")
                ns.exec("ip", "addr", "add", env["FLANNEL_SUBNET"], "dev", "cni0")
                ns.exec("ip", "link", "set", "cni0", "up")
            net_a = ipaddress.ip_interface(env_a["FLANNEL_SUBNET"]).network
            net_b = ipaddress.ip_interface(env_b["FLANNEL_SUBNET"]).network
            _wait_route(a, f"{net_b} via 198.18.0.2 dev eth0")
            _wait_route(b, f"{net_a} via 198.18.0.1 dev eth0")
            gw_a, gw_b = env_a["FLANNEL_SUBNET"].split("/")[0], env_b["FLANNEL_SUBNET"].split("/")[0]
            a.exec("ping", "-c", "3", "-i", "0.2", "-W", "2", "-I", gw_a, gw_b, timeout=20)
            assert "dev eth0" in a.exec("ip", "route", "get", gw_b)  # the kernel's route, not flannel.1
            store = SqliteStore(root / "leases.db")
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
        finally:
            for p in procs:
                p.terminate()
            codes = [p.wait(timeout=20) for p in procs]
        assert codes == [0, 0], (root / "a.log").read_text()[-2000:]
        assert f"{net_b} via" not in a.exec("ip", "route")
