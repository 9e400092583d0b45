"""KubeStore through the official client against the API double: node name, podCIDR, flannel's annotations,
the NetworkUnavailable condition, peers by watch, node deletion, 410, an API server restart, RBAC."""

from __future__ import annotations

import ipaddress
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_double import KubeApiDouble

from udpflannel.config import parse_net_conf
from udpflannel.lab.netns import SERVICE_ADDR
from udpflannel.lease.kube import KubeStore
from udpflannel.lease.manager import LeaseManager
from udpflannel.lease.model import EventType, LeaseAttrs
from udpflannel.lease.store import Compacted, Conflict, NotFound, StoreError

# etcd, the API double and their clients run in a namespace of the module's own, on its loopback
# (tests/conftest.py private_net): none of it touches the machine's network.
pytestmark = pytest.mark.usefixtures("private_net")

TOKEN = "test-token"
PREFIX = "flannel.alpha.coreos.com"
NET1 = ipaddress.IPv4Network("198.19.1.0/24")
NET2 = ipaddress.IPv4Network("198.19.2.0/24")
NET6 = ipaddress.IPv6Network("fd00:198:0:1::/64")
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def attrs(n: int) -> LeaseAttrs:
    return LeaseAttrs(
        public_ip=ipaddress.IPv4Address(f"198.18.0.{n}"),
        backend_type="vxlan",
        backend_data={"VNI": 1, "VtepMAC": f"02:00:00:00:00:{n:02x}"},
    )


def write_kubeconfig(path: Path, url: str, token: str) -> str:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "double", "cluster": {"server": url}}],
                "users": [{"name": "agent", "user": {"token": token}}],
                "contexts": [{"name": "double", "context": {"cluster": "double", "user": "agent"}}],
                "current-context": "double",
            }
        )
    )
    return str(path)


def admin_api(double: KubeApiDouble) -> Any:
    """Another API user (an admin, a kubelet) with the full official client."""
    from kubernetes import client

    conf = client.Configuration()
    conf.host = double.url
    conf.api_key = {"authorization": TOKEN}
    conf.api_key_prefix = {"authorization": "Bearer"}
    return client.CoreV1Api(client.ApiClient(conf))


@pytest.fixture
def double() -> Iterator[KubeApiDouble]:
    with KubeApiDouble(bookmark_interval=0.5) as api:
        yield api


@pytest.fixture
def make_store(double: KubeApiDouble, tmp_path: Path) -> Iterator[Callable[..., KubeStore]]:
    stores: list[KubeStore] = []

    def make(node_name: str | None = "node-1", token: str = TOKEN, **kwargs) -> KubeStore:
        kubeconfig = write_kubeconfig(tmp_path / f"kubeconfig-{len(stores)}", double.url, token)
        kwargs.setdefault("retry_for", 3)
        store = KubeStore(node_name, kubeconfig=kubeconfig, **kwargs)
        stores.append(store)
        return store

    try:
        yield make
    finally:
        for store in stores:
            store.close()


def drain(store: KubeStore, after: int, want: int, timeout: float = 5.0) -> list:
    events: list = []
    deadline = time.monotonic() + timeout
    while len(events) < want and time.monotonic() < deadline:
        batch = store.watch(after, timeout=max(0.1, deadline - time.monotonic()))
        events += batch
        after = batch[-1].revision if batch else after
    return events


def test_node_name_from_env_or_pod(double: KubeApiDouble, make_store) -> None:
    double.create_node("node-7", ["198.19.7.0/24"])
    double.add_pod("kube-flannel", "udpflannel-abcde", "node-7")
    assert make_store(None, environ={"NODE_NAME": "node-7"}).node_name == "node-7"
    by_pod = make_store(None, environ={"POD_NAME": "udpflannel-abcde", "POD_NAMESPACE": "kube-flannel"})
    assert by_pod.node_name == "node-7"
    with pytest.raises(StoreError, match="NODE_NAME"):
        make_store(None, environ={})
    with pytest.raises(NotFound):
        make_store(None, environ={"POD_NAME": "gone", "POD_NAMESPACE": "kube-flannel"})


def test_kube_api_url_overrides_the_kubeconfig_server(double: KubeApiDouble, tmp_path: Path) -> None:
    double.create_node("node-1", ["198.19.1.0/24"])
    kubeconfig = write_kubeconfig(tmp_path / "kc", f"http://{SERVICE_ADDR}:1", TOKEN)  # a closed port
    store = KubeStore("node-1", kubeconfig=kubeconfig, kube_api_url=double.url, retry_for=2)
    try:
        assert store.assigned_subnets() == (NET1, None)
    finally:
        store.close()


def test_from_run_options(double: KubeApiDouble, tmp_path: Path) -> None:
    from udpflannel.options import RunOptions

    double.create_node("node-5", ["198.19.5.0/24", "fd00:198:0:5::/64"])
    conf = parse_net_conf(
        '{"Network": "198.19.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:198::/48"}', kube=True
    )
    options = RunOptions(
        kube_subnet_mgr=True,
        kubeconfig_file=write_kubeconfig(tmp_path / "kc", double.url, TOKEN),
        kube_annotation_prefix="example.com",
        set_node_network_unavailable=False,
        net_config=conf,
    )
    store = KubeStore.from_options(options, environ={"NODE_NAME": "node-5"})
    try:
        v4, v6 = store.assigned_subnets()
        assert (str(v4), str(v6)) == ("198.19.5.0/24", "fd00:198:0:5::/64")
        store.create(v4, v6, attrs(5), ttl=600)
        node = double.node("node-5")
        assert node["metadata"]["annotations"]["example.com/public-ip"] == "198.18.0.5"
        assert "conditions" not in node["status"]
        (lease,) = store.list().leases
        assert lease.key == "198.19.5.0-24&fd00:198:0:5::-64"
    finally:
        store.close()


def test_assigned_subnets_from_pod_cidrs(double: KubeApiDouble, make_store) -> None:
    double.create_node("node-1", ["198.19.1.0/24", "fd00:198:0:1::/64"])
    double.create_node("node-2", [])
    double.create_node("node-3", ["10.244.3.0/24"])
    assert make_store("node-1").assigned_subnets() == (NET1, None)
    dual = make_store("node-1", enable_ipv6=True, network=ipaddress.IPv4Network("198.19.0.0/16"))
    assert dual.assigned_subnets() == (NET1, NET6)
    with pytest.raises(StoreError, match="no IPv4 podCIDR"):
        make_store("node-2").assigned_subnets()
    with pytest.raises(StoreError, match=r"10.244.3.0/24 is outside the IPv4 Network 198.19.0.0/16"):
        make_store("node-3", network=ipaddress.IPv4Network("198.19.0.0/16")).assigned_subnets()
    assert make_store("node-1").network_config() is None


def test_create_publishes_flannels_annotations_and_condition(double: KubeApiDouble, make_store) -> None:
    double.create_node("node-1", ["198.19.1.0/24"], labels={"kubernetes.io/hostname": "node-1"})
    store = make_store("node-1")
    lease = store.create(NET1, None, attrs(1), ttl=600)
    node = double.node("node-1")
    assert node["metadata"]["annotations"] == {
        f"{PREFIX}/backend-type": "vxlan",
        f"{PREFIX}/backend-data": '{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}',
        f"{PREFIX}/public-ip": "198.18.0.1",
        f"{PREFIX}/kube-subnet-manager": "true",
    }
    (cond,) = node["status"]["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == ("NetworkUnavailable", "False", "FlannelIsUp")
    assert node["metadata"]["labels"] == {"kubernetes.io/hostname": "node-1"}
    assert lease.revision == int(node["metadata"]["resourceVersion"])
    assert (lease.subnet, lease.attrs, lease.is_reservation) == (NET1, attrs(1), False)
    assert ("PATCH", "/api/v1/nodes/node-1/status") in [(m, p) for m, p, _ in double.requests]
    with pytest.raises(Conflict):
        make_store("node-2").create(NET1, None, attrs(2), ttl=600)
    with pytest.raises(StoreError, match="no node has podCIDR"):
        store.create(NET2, None, attrs(1), ttl=600)
    with pytest.raises(StoreError, match="no reservations"):
        store.reserve(NET1, None, attrs(1))


def test_condition_can_be_left_alone_and_prefix_changed(double: KubeApiDouble, make_store) -> None:
    double.create_node("node-1", ["198.19.1.0/24"])
    store = make_store("node-1", set_node_network_unavailable=False, annotation_prefix="example.com")
    store.create(NET1, None, attrs(1), ttl=600)
    node = double.node("node-1")
    assert "conditions" not in node["status"]
    assert node["metadata"]["annotations"]["example.com/public-ip"] == "198.18.0.1"
    assert make_store("node-2").list().leases == []  # other prefix: no peer
    assert [x.subnet for x in store.list().leases] == [NET1]


def test_renew_and_delete(double: KubeApiDouble, make_store) -> None:
    double.create_node("node-1", ["198.19.1.0/24"])
    store = make_store("node-1")
    lease = store.create(NET1, None, attrs(1), ttl=600)
    wg = LeaseAttrs(public_ip=attrs(1).public_ip, backend_type="wireguard", backend_data={"PublicKey": "x"})
    renewed = store.renew(lease, wg, ttl=600)
    assert renewed.revision > lease.revision and renewed.attrs == wg
    with pytest.raises(Conflict):
        store.renew(lease, attrs(1), ttl=600)  # stale: the node publishes other attributes now
    store.delete(renewed)
    annotations = double.node("node-1")["metadata"].get("annotations") or {}
    assert not any(k.startswith(PREFIX) for k in annotations)
    assert store.list().leases == []
    with pytest.raises(NotFound):
        store.delete(renewed)
    with pytest.raises(NotFound):
        store.renew(renewed, wg, ttl=600)


def test_renew_survives_unrelated_node_updates(double: KubeApiDouble, make_store) -> None:
    """Kubelets update their node all the time; that is not a conflict for our annotations."""
    double.create_node("node-1", ["198.19.1.0/24"])
    store = make_store("node-1")
    lease = store.create(NET1, None, attrs(1), ttl=600)
    kubelet = admin_api(double)
    kubelet.patch_node_status("node-1", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    renewed = store.renew(lease, attrs(1), ttl=600)
    assert renewed.attrs == attrs(1)
    conditions = [c["type"] for c in double.node("node-1")["status"]["conditions"]]
    assert sorted(conditions) == ["NetworkUnavailable", "Ready"]


def test_a_node_annotated_by_flanneld_reads_as_a_peer(double: KubeApiDouble, make_store) -> None:
    recorded = Path(os.environ["UDPFLANNEL_TESTDATA"]) / "kube" / "05a-patch-status-flannel.json"
    if recorded.exists():
        annotations = json.loads(recorded.read_text())["request"]["body"]["metadata"]["annotations"]
    else:
        annotations = {
            f"{PREFIX}/backend-type": "vxlan",
            f"{PREFIX}/backend-data": '{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}',
            f"{PREFIX}/public-ip": "198.18.0.1",
            f"{PREFIX}/kube-subnet-manager": "true",
        }
    double.create_node("node-a", ["198.19.1.0/24"])
    admin_api(double).patch_node_status("node-a", {"metadata": {"annotations": annotations}})
    (peer,) = make_store("node-b").list().leases
    assert (peer.subnet, peer.attrs) == (NET1, attrs(1))


def test_public_ip_overwrite_wins(double: KubeApiDouble, make_store) -> None:
    double.create_node("node-1", ["198.19.1.0/24"])
    admin = admin_api(double)
    admin.patch_node_status(
        "node-1", {"metadata": {"annotations": {f"{PREFIX}/public-ip-overwrite": "198.18.9.9"}}}
    )
    lease = make_store("node-1").create(NET1, None, attrs(1), ttl=600)
    assert str(lease.attrs.public_ip) == "198.18.9.9"
    assert double.node("node-1")["metadata"]["annotations"][f"{PREFIX}/public-ip"] == "198.18.9.9"


def test_unreadable_nodes_are_counted_drops(double: KubeApiDouble, make_store) -> None:
    double.create_node("node-1", [])
    double.create_node("node-2", ["198.19.2.0/24"])
    admin = admin_api(double)
    admin.patch_node_status(
        "node-1", {"metadata": {"annotations": {f"{PREFIX}/kube-subnet-manager": "true"}}}
    )
    bad = {f"{PREFIX}/kube-subnet-manager": "true", f"{PREFIX}/backend-data": "{nope"}
    admin.patch_node_status("node-2", {"metadata": {"annotations": bad}})
    store = make_store("node-3")
    assert store.list().leases == []
    assert store.drops == {"no_pod_cidr": 1, "bad_annotation": 1}


def test_three_nodes_see_each_other_through_the_lease_manager(double: KubeApiDouble, make_store) -> None:
    conf = parse_net_conf('{"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan"}}', kube=True)
    managers = []
    for n in (1, 2, 3):
        double.create_node(f"node-{n}", [f"198.19.{n}.0/24"])
    for n in (1, 2, 3):
        store = make_store(f"node-{n}", network=conf.network)
        manager = LeaseManager(store, conf, attrs(n), ttl=600, renew_margin=60)
        lease = manager.acquire(time.time())
        assert lease.subnet == ipaddress.IPv4Network(f"198.19.{n}.0/24")
        managers.append(manager)
    for n, manager in enumerate(managers, start=1):
        deadline = time.monotonic() + 10
        while len(manager.peers()) < 2 and time.monotonic() < deadline:
            manager.watch_peers(timeout=1)
        peers = {(str(p.subnet), str(p.attrs.public_ip)) for p in manager.peers()}
        want = {(f"198.19.{m}.0/24", f"198.18.0.{m}") for m in (1, 2, 3) if m != n}
        assert peers == want

    # Deleting a node removes its peer from the others.
    double.delete_node("node-3")
    for manager in managers[:2]:
        deadline = time.monotonic() + 10
        while len(manager.peers()) > 1 and time.monotonic() < deadline:
            manager.watch_peers(timeout=1)
        assert {str(p.subnet) for p in manager.peers()} <= {"198.19.1.0/24", "198.19.2.0/24"}
        assert len(manager.peers()) == 1


def test_watch_reports_only_flannel_changes(double: KubeApiDouble, make_store) -> None:
    double.create_node("node-1", ["198.19.1.0/24"])
    double.create_node("node-2", ["198.19.2.0/24"])
    watcher = make_store("node-2")
    rev = watcher.list().revision
    writer = make_store("node-1")
    lease = writer.create(NET1, None, attrs(1), ttl=600)
    (added,) = watcher.watch(rev, timeout=3)
    assert (added.type, added.lease.subnet, added.lease.attrs, added.revision) == (
        EventType.ADDED,
        NET1,
        attrs(1),
        lease.revision,
    )
    # A kubelet-style update and an unrelated label: node events, but no flannel change.
    admin_api(double).patch_node_status(
        "node-1", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    )
    admin_api(double).patch_node("node-1", {"metadata": {"labels": {"example.com/x": "1"}}})
    double.create_node("node-4", ["198.19.4.0/24"])
    assert watcher.watch(added.revision, timeout=1.2) == []
    # Resuming from an older revision reports the same change again (watch is a function of `after`).
    (again,) = watcher.watch(rev, timeout=3)
    assert (again.type, again.lease.key, again.lease.attrs, again.revision) == (
        added.type,
        added.lease.key,
        added.lease.attrs,
        added.revision,
    )
    renewed = writer.renew(lease, attrs(9), ttl=600)
    writer.delete(renewed)
    events = drain(watcher, added.revision, want=2)
    assert [(e.type, e.lease.attrs.public_ip) for e in events] == [
        (EventType.ADDED, attrs(9).public_ip),
        (EventType.REMOVED, attrs(9).public_ip),
    ]


def test_node_deletion_is_a_removed_event(double: KubeApiDouble, make_store) -> None:
    double.create_node("node-1", ["198.19.1.0/24"])
    make_store("node-1").create(NET1, None, attrs(1), ttl=600)
    watcher = make_store("node-2")
    snap = watcher.list()
    assert [x.subnet for x in snap.leases] == [NET1]
    double.delete_node("node-1")
    (removed,) = watcher.watch(snap.revision, timeout=3)
    assert (removed.type, removed.lease.subnet, removed.lease.attrs) == (EventType.REMOVED, NET1, attrs(1))
    assert removed.revision > snap.revision


def test_410_gone_is_compacted(double: KubeApiDouble, make_store) -> None:
    double.create_node("node-1", ["198.19.1.0/24"])
    store = make_store("node-1")
    rev = store.list().revision
    store.create(NET1, None, attrs(1), ttl=600)
    double.compact()
    with pytest.raises(Compacted):
        store.watch(rev, timeout=2)
    snap = store.list()
    assert [x.subnet for x in snap.leases] == [NET1]
    assert store.watch(snap.revision, timeout=0.3) == []


def test_api_server_restart_during_a_watch(double: KubeApiDouble, make_store) -> None:
    """The blocked watch reconnects to the restarted server and sees what happened meanwhile; when the restart
    lost the watch cache, the watcher gets Compacted and a re-list shows the change."""
    double.create_node("node-1", ["198.19.1.0/24"])
    double.create_node("node-2", ["198.19.2.0/24"])
    watcher = make_store("node-2", retry_for=10)
    rev = watcher.list().revision
    result: list = []
    t = threading.Thread(target=lambda: result.append(watcher.watch(rev, timeout=8)))
    t.start()
    time.sleep(0.3)
    double.stop()
    time.sleep(0.5)  # the watch is retrying against a closed port now
    double.start()
    lease = make_store("node-1").create(NET1, None, attrs(1), ttl=600)
    t.join(10)
    assert [(e.type, e.lease.subnet, e.revision) for e in result[0]] == [
        (EventType.ADDED, NET1, lease.revision)
    ]

    double.restart(lose_watch_cache=True)
    with pytest.raises(Compacted):
        watcher.watch(rev, timeout=3)
    assert [x.subnet for x in watcher.list().leases] == [NET1]


def test_missing_rbac_is_a_clear_error(double: KubeApiDouble, make_store) -> None:
    double.create_node("node-1", ["198.19.1.0/24"])
    double.tokens["read-only"] = {("get", "nodes"), ("list", "nodes"), ("watch", "nodes")}
    store = make_store("node-1", token="read-only")
    assert store.assigned_subnets() == (NET1, None)
    with pytest.raises(StoreError, match="rbac"):
        store.create(NET1, None, attrs(1), ttl=600)
    with pytest.raises(StoreError, match="401"):
        make_store("node-1", token="unknown").list()


def test_the_deploy_cluster_role_is_enough(double: KubeApiDouble, make_store) -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "rbac.yaml").read_text()))
    (role,) = [d for d in docs if d and d["kind"] == "ClusterRole"]
    granted = {
        (verb, resource)
        for rule in role["rules"]
        if "" in rule.get("apiGroups", [])
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    double.tokens["deployed"] = granted
    double.create_node("node-1", ["198.19.1.0/24"])
    double.add_pod("kube-flannel", "agent", "node-1")
    store = make_store(None, token="deployed", environ={"POD_NAME": "agent", "POD_NAMESPACE": "kube-flannel"})
    assert store.assigned_subnets() == (NET1, None)
    rev = store.list().revision
    lease = store.create(NET1, None, attrs(1), ttl=600)
    assert [e.lease.subnet for e in store.watch(rev, timeout=3)] == [NET1]
    store.renew(lease, attrs(1), ttl=600)


def test_in_cluster_config_over_https(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No kubeconfig, no URL: the pod's service account (token + CA) and KUBERNETES_SERVICE_HOST/PORT."""
    from kubernetes.config import incluster_config

    with KubeApiDouble(tls_dir=str(tmp_path)) as double:
        double.create_node("node-1", ["198.19.1.0/24"])
        token = tmp_path / "token"
        token.write_text(TOKEN)
        monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
        monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", double.ca_file)
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", SERVICE_ADDR)
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(double.port))
        store = KubeStore("node-1", retry_for=3)
        try:
            assert store.assigned_subnets() == (NET1, None)
            rev = store.list().revision
            store.create(NET1, None, attrs(1), ttl=600)
            assert [e.lease.subnet for e in store.watch(rev, timeout=3)] == [NET1]
        finally:
            store.close()
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
        with pytest.raises(StoreError, match="kubeconfig-file or --kube-api-url"):
            KubeStore("node-1")


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("x\n", "it is a YAML str, not a mapping"),
        ("", "it is empty"),
        ("[1, 2]\n", "it is a YAML list, not a mapping"),
        ("clusters: 5\ncontexts: x\n", "its clusters is not a list of mappings"),
        ("users: [a]\n", "its users is not a list of mappings"),
        ("clusters: []\n", ""),  # the right shape, which the client's loader then refuses (no context)
        ("\tno: yaml: here", "not YAML at line 1"),
    ],
)
def test_a_malformed_kubeconfig_is_a_one_line_store_error(tmp_path: Path, content: str, said: str) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(content)
    with pytest.raises(StoreError, match=f"cannot load kubeconfig {path}: .*give a valid kubeconfig") as err:
        KubeStore("node-1", kubeconfig=str(path))
    assert "\n" not in str(err.value)
    assert said in str(err.value)
    assert "TypeError" not in str(err.value)
