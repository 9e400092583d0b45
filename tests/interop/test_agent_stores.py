"""`udpflannel run` on the cluster stores, end to end: a real etcd and the Kubernetes API double serve on the
underlay inside a namespace, two vxlan agents lease through them, carry traffic and follow store changes."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pathlib
import re
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from udpflannel.lab.netns import Lab, Netns
from udpflannel.lab.transfer import SINK, SOURCE

pytestmark = [pytest.mark.root, pytest.mark.slow]
if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
    pytest.skip("needs root and /dev/net/tun", allow_module_level=True)

REPO = pathlib.Path(__file__).resolve().parents[2]
UDPFLANNEL = str(pathlib.Path(sys.executable).with_name("udpflannel"))
ETCD_BINARY = "/usr/bin/etcd"
SERVER_IP = "198.18.0.1"  # node 1 also hosts the store, as a control-plane node would
ETCD_URL = f"http://{SERVER_IP}:2379"
ETCD_LOCAL = "http://127.0.0.1:2379"
PREFIX = "/udpflannel.test/network"  # not flannel's default, so --etcd-prefix is exercised
KUBE_PORT = 6443
KUBE_TOKEN = "test-token"  # kube_double.TEST_TOKEN, allowed everything
HEALTH_PORT = 9931
MAC_FILE = "udpflannel-vtep-mac.flannel.1"  # backend/vxlan.py keeps the VtepMAC beside --subnet-file
ANNOTATION = "flannel.alpha.coreos.com/"
# SubnetLen and the Backend MTU differ from the defaults, so subnet.env shows the config came from etcd.
ETCD_NET_CONF = {"Network": "198.19.0.0/16", "SubnetLen": 26, "Backend": {"Type": "vxlan", "MTU": 1400}}
ETCD_MTU = "1350"  # Backend MTU 1400 - VXLAN overhead 50

# The API double as a process inside a namespace, listening on the underlay address; stdin takes admin calls
# as JSON lines, stdout answers them.
KUBE_API = r"""
import json, sys
import kube_double

host, port = sys.argv[1], int(sys.argv[2])
double = kube_double.KubeApiDouble(port=port, host=host)
double.start()
print(json.dumps({"ok": double.port}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    try:
        if req["op"] == "create_node":
            out = {"ok": double.create_node(req["name"], req["cidrs"])}
        elif req["op"] == "node":
            out = {"ok": double.node(req["name"])}
        elif req["op"] == "delete_node":
            double.delete_node(req["name"])
            out = {"ok": None}
        else:
            out = {"error": "unknown op " + req["op"]}
    except Exception as exc:
        out = {"error": repr(exc)}
    print(json.dumps(out), flush=True)
double.stop()
"""


@dataclass
class Node:
    """One node namespace with its agent's files (subnet.env, VtepMAC file, log)."""

    index: int
    ns: Netns
    dir: pathlib.Path
    proc: subprocess.Popen | None = None

    @property
    def public_ip(self) -> str:
        return f"198.18.0.{self.index}"

    @property
    def subnet_file(self) -> pathlib.Path:
        return self.dir / "subnet.env"

    @property
    def log(self) -> pathlib.Path:
        return self.dir / "agent.log"

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def env(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.subnet_file.read_text().split())

    def overlay_ip(self) -> str:
        """The agent puts its subnet's network address on flannel.1 (flannel's choice too)."""
        return str(ipaddress.ip_interface(self.env()["FLANNEL_SUBNET"]).network.network_address)

    def mac(self) -> str:
        return (self.dir / MAC_FILE).read_text().strip()

    def start(self, *args: str, env: dict[str, str] | None = None) -> None:
        cmd = [UDPFLANNEL, "run", "--v=1", "--iface", "eth1", f"--subnet-file={self.subnet_file}"]
        cmd += [f"--healthz-port={HEALTH_PORT}", *args]
        with open(self.log, "a") as log:
            self.proc = self.ns.popen(*cmd, env={**os.environ, **(env or {})}, stderr=log)

    def metrics(self) -> dict[str, int]:
        text = self.ns.exec("curl", "-s", "--max-time", "2", f"http://127.0.0.1:{HEALTH_PORT}/metrics")
        return {
            name: int(value)
            for line in text.splitlines()
            if line and not line.startswith("#")
            for name, value in [line.rsplit(" ", 1)]
        }

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout=20)


@dataclass
class Cluster:
    lab: Lab
    tmp: pathlib.Path
    nodes: list[Node] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(f"--- node {n.index}\n{n.log_text()[-2500:]}" for n in self.nodes)


def wait_until(check: Callable[[], object], timeout: float, what: str, cluster: Cluster) -> object:
    """Poll `check` until it returns something truthy (bounded); fail with the agents' logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout}s\n{cluster.logs()}")


@contextlib.contextmanager
def two_nodes() -> Iterator[Cluster]:
    """Nodes 198.18.0.1 and .2 on one wire-mode veth (eth1); everything goes with the Lab and temp dir."""
    with tempfile.TemporaryDirectory(prefix="udpflannel-stores-") as tmp, Lab() as lab:
        cluster = Cluster(lab, pathlib.Path(tmp))
        for i in (1, 2):
            (cluster.tmp / f"n{i}").mkdir()
            cluster.nodes.append(Node(i, lab.netns(f"n{i}"), cluster.tmp / f"n{i}"))
        a, b = cluster.nodes
        lab.veth(a.ns, b.ns, "198.18.0.1/24", "198.18.0.2/24", name_a="eth1", name_b="eth1")
        yield cluster


def ping_once(src: Node, ip: str) -> bool:
    proc = subprocess.run(src.ns.cmd("ping", "-c", "1", "-W", "1", ip), capture_output=True, timeout=10)
    return proc.returncode == 0


def check_traffic(cluster: Cluster, nbytes: int = 0) -> None:
    """Pings both ways (the first may wait for the peer event), then a sha256-checked TCP transfer."""
    a, b = cluster.nodes
    for src, dst in ((a, b), (b, a)):
        ip = dst.overlay_ip()
        wait_until(lambda s=src, i=ip: ping_once(s, i), 15, f"ping {src.index} -> {ip}", cluster)
        src.ns.exec("ping", "-c", "3", "-i", "0.2", "-W", "2", ip, timeout=20)
    if nbytes:
        ip = b.overlay_ip()
        sink = b.ns.popen(sys.executable, "-c", SINK, ip, "7000", "30", stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None
        ready, _, _ = select.select([sink.stdout], [], [], 10)
        assert ready and sink.stdout.readline().strip() == "listening"
        out = a.ns.exec(sys.executable, "-c", SOURCE, ip, "7000", str(nbytes), "30", timeout=40)
        sent, digest, _, got_n, got_digest = out.split()
        assert int(sent) == nbytes == int(got_n) and digest == got_digest
        sink.wait(timeout=10)


def stop_agents(cluster: Cluster) -> None:
    codes = [node.stop() for node in cluster.nodes if node.proc is not None]
    assert codes == [0] * len(codes), cluster.logs()
    for node in cluster.nodes:
        assert "flannel.1" not in node.ns.exec("ip", "-br", "link"), "an agent left its TUN behind"


# --- etcd -------------------------------------------------------------------------------------------------


def etcdctl(node: Node, *args: str) -> str:
    return node.ns.exec("etcdctl", f"--endpoints={ETCD_LOCAL}", "--dial-timeout=2s", *args, timeout=10)


def start_etcd(cluster: Cluster) -> Node:
    """A single-member etcd in node 1, serving clients on the underlay address and on loopback."""
    host = cluster.nodes[0]
    data, peer = cluster.tmp / "etcd", "http://127.0.0.1:2380"
    with open(cluster.tmp / "etcd.log", "w") as log:
        host.ns.popen(
            ETCD_BINARY, "--name=n1", f"--data-dir={data}",
            f"--listen-client-urls={ETCD_URL},{ETCD_LOCAL}", f"--advertise-client-urls={ETCD_URL}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=n1={peer}", "--log-level=error", "--logger=zap",
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def healthy() -> bool:
        cmd = host.ns.cmd("etcdctl", f"--endpoints={ETCD_URL}", "--dial-timeout=1s", "endpoint", "health")
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0

    wait_until(healthy, 15, "etcd healthy", cluster)
    return host


def etcd_leases(host: Node) -> dict[str, tuple[str, str]]:
    """PublicIP -> (key, raw value) of every key under <prefix>/subnets/."""
    lines = etcdctl(host, "get", "--prefix", f"{PREFIX}/subnets/").splitlines()
    pairs = list(zip(lines[0::2], lines[1::2], strict=True))
    return {json.loads(value)["PublicIP"]: (key, value) for key, value in pairs}


def flanneld_value(node: Node) -> str:
    """The bytes flanneld v0.2x writes (Go marshals the *ip.IP6 PublicIPv6 as null, spec/flannel.md)."""
    return (
        f'{{"PublicIP":"{node.public_ip}","PublicIPv6":null,"BackendType":"vxlan",'
        f'"BackendData":{{"VNI":1,"VtepMAC":"{node.mac()}"}}}}'
    )


def lease_key(node: Node) -> str:
    """The etcd key the node's subnet.env implies: <prefix>/subnets/<network>-<len>."""
    plen = node.env()["FLANNEL_SUBNET"].split("/")[1]
    return f"{PREFIX}/subnets/{node.overlay_ip()}-{plen}"


@contextlib.contextmanager
def etcd_cluster(config_first: bool) -> Iterator[tuple[Cluster, Node]]:
    with two_nodes() as cluster:
        host = start_etcd(cluster)
        if config_first:
            etcdctl(host, "put", f"{PREFIX}/config", json.dumps(ETCD_NET_CONF))
        for node in cluster.nodes:
            node.start(f"--etcd-endpoints={ETCD_URL}", f"--etcd-prefix={PREFIX}")
        yield cluster, host


def test_etcd_agents_wait_for_config_then_lease_and_carry_traffic() -> None:
    started = time.monotonic()
    with etcd_cluster(config_first=False) as (cluster, host):
        for node in cluster.nodes:
            wait_until(lambda n=node: "waiting" in n.log_text(), 15, f"node {node.index} waiting", cluster)
            assert f"no network config yet at {PREFIX}/config" in node.log_text()
            assert not node.subnet_file.exists() and node.proc is not None and node.proc.poll() is None
        etcdctl(host, "put", f"{PREFIX}/config", json.dumps(ETCD_NET_CONF))
        for node in cluster.nodes:
            wait_until(node.subnet_file.exists, 20, f"node {node.index} subnet.env", cluster)
        leases = etcd_leases(host)
        assert sorted(leases) == ["198.18.0.1", "198.18.0.2"]
        for node in cluster.nodes:
            env = node.env()
            assert env["FLANNEL_NETWORK"] == "198.19.0.0/16" and env["FLANNEL_MTU"] == ETCD_MTU
            assert env["FLANNEL_IPMASQ"] == "false"
            assert env["FLANNEL_SUBNET"].endswith("/26")  # SubnetLen of the etcd config
            key, value = leases[node.public_ip]
            assert key == lease_key(node)
            assert value == flanneld_value(node)
            # flannel's lease TTL is 24 h, carried by an etcd lease on the key.
            lease_id = json.loads(etcdctl(host, "get", key, "-w", "json"))["kvs"][0]["lease"]
            ttl = etcdctl(host, "lease", "timetolive", format(lease_id, "x"))
            granted = int(re.search(r"granted with TTL\((\d+)s\)", ttl).group(1))  # type: ignore[union-attr]
            assert granted == 24 * 3600, ttl
        check_traffic(cluster, nbytes=4_000_000)
        assert [n.metrics()["udpflannel_peers"] for n in cluster.nodes] == [1, 1]
        stop_agents(cluster)
        # flannel keeps the lease on a clean stop (a restart takes the same subnet).
        assert sorted(etcd_leases(host)) == ["198.18.0.1", "198.18.0.2"]
    print(f"etcd: wait-for-config, lease and traffic test took {time.monotonic() - started:.1f}s")


def test_etcd_agent_reacquires_a_deleted_lease() -> None:
    started = time.monotonic()
    with etcd_cluster(config_first=True) as (cluster, host):
        a, b = cluster.nodes
        for node in cluster.nodes:
            wait_until(node.subnet_file.exists, 20, f"node {node.index} subnet.env", cluster)
        check_traffic(cluster)
        old_key, _ = etcd_leases(host)[b.public_ip]
        etcdctl(host, "del", old_key)
        deleted = time.monotonic()
        wait_until(lambda: "lease lost, re-acquiring" in b.log_text(), 15, "node 2 re-acquiring", cluster)
        lease = wait_until(lambda: etcd_leases(host).get(b.public_ip), 15, "node 2 lease again", cluster)
        # The subnet is still free, so the agent takes it again: the node's pods keep their addresses.
        assert lease == (old_key, flanneld_value(b))
        assert lease_key(b) == old_key
        assert f"peer removed: {old_key.rsplit('/', 1)[1]}" in a.log_text()  # node 1 followed it
        check_traffic(cluster, nbytes=1_000_000)
        recovered = time.monotonic() - deleted
        assert [n.metrics()["udpflannel_peers"] for n in cluster.nodes] == [1, 1]
        stop_agents(cluster)
    took = time.monotonic() - started
    print(f"etcd: lease deleted -> traffic again in {recovered:.1f}s; test took {took:.1f}s")


# --- Kubernetes -----------------------------------------------------------------------------------------


@dataclass
class KubeApi:
    """Admin calls to the API double process (create/read/delete Nodes, as other cluster parts would)."""

    proc: subprocess.Popen

    def call(self, op: str, **args: object) -> object:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self) -> object:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        assert ready, "the API double did not answer within 10 s"
        reply = json.loads(self.proc.stdout.readline() or '{"error": "the API double exited"}')
        assert "error" not in reply, reply
        return reply["ok"]


@contextlib.contextmanager
def kube_cluster() -> Iterator[tuple[Cluster, KubeApi]]:
    with two_nodes() as cluster:
        host = cluster.nodes[0]
        with open(cluster.tmp / "api.log", "w") as log:
            proc = host.ns.popen(
                sys.executable, "-c", KUBE_API, SERVER_IP, str(KUBE_PORT),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                env={**os.environ, "PYTHONPATH": f"{REPO / 'tests' / 'lease'}:{REPO}"},
            )  # fmt: skip
        api = KubeApi(proc)
        try:
            assert api.read() == KUBE_PORT
            conf = cluster.tmp / "net-conf.json"
            conf.write_text(json.dumps({"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan"}}))
            for node in cluster.nodes:
                name = f"node-{node.index}"
                api.call("create_node", name=name, cidrs=[f"198.19.{node.index}.0/24"])
                kubeconfig = node.dir / "kubeconfig"
                kubeconfig.write_text(
                    "apiVersion: v1\nkind: Config\ncurrent-context: t\n"
                    f"clusters: [{{name: t, cluster: {{server: 'http://{SERVER_IP}:{KUBE_PORT}'}}}}]\n"
                    f"users: [{{name: {name}, user: {{token: {KUBE_TOKEN}}}}}]\n"
                    f"contexts: [{{name: t, context: {{cluster: t, user: {name}}}}}]\n"
                )
                node.start(
                    "--kube-subnet-mgr",
                    f"--kubeconfig-file={kubeconfig}",
                    f"--net-config-path={conf}",
                    env={"NODE_NAME": name},
                )
            yield cluster, api
        finally:
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()  # the double stops at end of input; Lab kills it otherwise


def test_kube_agents_annotate_nodes_carry_traffic_and_drop_deleted_node() -> None:
    started = time.monotonic()
    with kube_cluster() as (cluster, api):
        a, b = cluster.nodes
        for node in cluster.nodes:
            wait_until(node.subnet_file.exists, 20, f"node {node.index} subnet.env", cluster)
            env = node.env()
            assert env["FLANNEL_SUBNET"] == f"198.19.{node.index}.1/24"  # the podCIDR, not a random pick
            assert env["FLANNEL_NETWORK"] == "198.19.0.0/16" and env["FLANNEL_MTU"] == "1450"
            obj = api.call("node", name=f"node-{node.index}")
            ann = obj["metadata"]["annotations"]  # type: ignore[index]
            assert ann[ANNOTATION + "backend-type"] == "vxlan"
            assert json.loads(ann[ANNOTATION + "backend-data"]) == {"VNI": 1, "VtepMAC": node.mac()}
            assert ann[ANNOTATION + "public-ip"] == node.public_ip
            assert ann[ANNOTATION + "kube-subnet-manager"] == "true"
            [cond] = [c for c in obj["status"]["conditions"] if c["type"] == "NetworkUnavailable"]  # type: ignore[index]
            assert (cond["status"], cond["reason"]) == ("False", "FlannelIsUp")
        check_traffic(cluster, nbytes=2_000_000)
        assert [n.metrics()["udpflannel_peers"] for n in cluster.nodes] == [1, 1]
        unknown_peer = 'udpflannel_drops_total{reason="unknown_peer"}'
        before = a.metrics().get(unknown_peer, 0)

        api.call("delete_node", name="node-2")
        deleted = time.monotonic()
        wait_until(lambda: a.metrics()["udpflannel_peers"] == 0, 10, "node 1 dropping the peer", cluster)
        gone = time.monotonic() - deleted
        assert "peer removed: 198.19.2.0-24" in a.log_text()
        # Node 2's subnet has no peer now: packets to it are dropped and counted, not sent.
        assert not ping_once(a, "198.19.2.0")
        assert a.metrics().get(unknown_peer, 0) > before, a.metrics()
        # Node 2's agent lost its own Node object: it must say so and stop, leaving nothing behind.
        assert b.proc is not None and b.proc.wait(timeout=30) != 0
        assert 'udpflannel: get node node-2: nodes "node-2" not found' in b.log_text()
        assert "flannel.1" not in b.ns.exec("ip", "-br", "link")
        b.proc = None
        stop_agents(cluster)
    took = time.monotonic() - started
    print(f"kube: node deleted -> peer gone in {gone * 1000:.0f} ms; test took {took:.1f}s")
