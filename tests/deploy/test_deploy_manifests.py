"""deploy/: the RBAC objects and the kube-flannel-style DaemonSet are consistent with each other, with
what the Kubernetes store calls, and with the CLI and config parsers they feed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from udpflannel.cli import _given, build_parser, load_run_options, normalise_argv
from udpflannel.config import parse_net_conf
from udpflannel.options import FLAGS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def objects(name: str) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d}


@pytest.fixture(scope="module")
def rbac() -> dict[str, dict[str, Any]]:
    return objects("rbac.yaml")


@pytest.fixture(scope="module")
def ds_objects() -> dict[str, dict[str, Any]]:
    return objects("kube-udpflannel.yml")


def test_cluster_role_grants_what_the_kube_store_uses(rbac) -> None:
    granted = {
        (verb, resource)
        for rule in rbac["ClusterRole"]["rules"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    # spec/flannel.md, Kubernetes mode: pods get; nodes get/list/watch; nodes/status patch. Nothing more.
    assert granted == {
        ("get", "pods"),
        ("get", "nodes"),
        ("list", "nodes"),
        ("watch", "nodes"),
        ("patch", "nodes/status"),
    }


def test_binding_ties_the_role_to_the_daemonsets_service_account(rbac, ds_objects) -> None:
    binding, account = rbac["ClusterRoleBinding"], rbac["ServiceAccount"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": rbac["ClusterRole"]["metadata"]["name"],
    }
    (subject,) = binding["subjects"]
    assert (subject["kind"], subject["name"], subject["namespace"]) == (
        "ServiceAccount",
        account["metadata"]["name"],
        account["metadata"]["namespace"],
    )
    ds = ds_objects["DaemonSet"]
    assert (
        ds["metadata"]["namespace"]
        == account["metadata"]["namespace"]
        == rbac["Namespace"]["metadata"]["name"]
    )
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_agent_runs_in_kube_mode_with_the_node_identity(ds_objects, tmp_path: Path) -> None:
    pod = ds_objects["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    (agent,) = pod["containers"]
    # The ConfigMap is mounted at /etc/kube-flannel/, the default --net-config-path; here it is a temp file.
    net_conf = tmp_path / "net-conf.json"
    net_conf.write_text(ds_objects["ConfigMap"]["data"]["net-conf.json"])
    argv = normalise_argv([*agent["command"][1:], *agent["args"], f"--net-config-path={net_conf}"])
    ns = build_parser().parse_args(argv)
    assert ns.command == "run"
    options = load_run_options(_given(ns, FLAGS), environ={})
    assert (options.store_kind, options.ip_masq, options.set_node_network_unavailable) == ("kube", True, True)
    assert options.net_config is not None and str(options.net_config.network) == "10.244.0.0/16"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent["env"]}
    assert env == {
        "NODE_NAME": "spec.nodeName",
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
    }
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert {"/run/flannel", "/etc/kube-flannel/", "/dev/net/tun"} <= mounts
    port = options.healthz_port
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert set(agent["securityContext"]["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    volumes = {v["name"] for v in pod["volumes"]}
    for container in [*pod["initContainers"], agent]:
        assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes


def test_config_map_holds_flannels_net_conf_and_cni_conflist(ds_objects) -> None:
    data = ds_objects["ConfigMap"]["data"]
    conf = parse_net_conf(data["net-conf.json"], kube=True)
    assert conf.enable_ipv4 and str(conf.network) == "10.244.0.0/16"
    conflist = json.loads(data["cni-conf.json"])
    assert conflist["name"] == "cbr0"
    assert [p["type"] for p in conflist["plugins"]] == ["flannel", "portmap"]
    assert conflist["plugins"][0]["delegate"] == {"hairpinMode": True, "isDefaultGateway": True}
    pod = ds_objects["DaemonSet"]["spec"]["template"]["spec"]
    install = next(c for c in pod["initContainers"] if c["name"] == "install-cni")
    assert install["args"] == ["-f", "/etc/kube-flannel/cni-conf.json", "/etc/cni/net.d/10-flannel.conflist"]
