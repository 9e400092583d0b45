"""The Kubernetes API double against the exchanges recorded from a real kube-apiserver (testdata/kube/), and
the official client against the double."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kube_double import KubeApiDouble
from kube_wire import strategic_merge

# etcd, the API double and their clients run in a namespace of the module's own, on its loopback
# (tests/conftest.py private_net): none of it touches the machine's network.
pytestmark = pytest.mark.usefixtures("private_net")

TESTDATA = Path(os.environ["UDPFLANNEL_TESTDATA"]) / "kube"  # set by tests/conftest.py
TOKEN = "test-token"
# Server-filled fields that differ run to run; everything else must match the recording.
VOLATILE = {"uid", "creationTimestamp", "managedFields"}
# Recorded watches ran 2-5 s; the replay shortens them (the server just closes the stream at the timeout).
WATCH_SECONDS = "1"

assert TESTDATA.is_dir(), f"recorded kube-apiserver exchanges not found at {TESTDATA}"


def recorded(name: str) -> dict[str, Any]:
    return json.loads((TESTDATA / f"{name}.json").read_text())


def project(obj: Any) -> Any:
    """The comparable part of a body: volatile fields dropped, Status causes as a set."""
    if isinstance(obj, dict):
        out = {k: project(v) for k, v in obj.items() if k not in VOLATILE}
        if isinstance(out.get("causes"), list):
            out["causes"] = sorted({json.dumps(c, sort_keys=True) for c in out["causes"]})
        return out
    if isinstance(obj, list):
        return [project(x) for x in obj]
    return obj


def send(double: KubeApiDouble, request: dict[str, Any], token: str | None = TOKEN) -> tuple[int, str, Any]:
    """Replay one recorded request on the wire; watches return their list of events."""
    query = dict(request["query"])
    if query.get("watch") == "true":
        query["timeoutSeconds"] = WATCH_SECONDS
    path = request["path"] + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
    headers = dict(request["headers"])
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    body = request["body"]
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
    conn = http.client.HTTPConnection(double.host, double.port, timeout=10)
    try:
        conn.request(request["method"], path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        content_type = resp.getheader("Content-Type", "")
        if query.get("watch") == "true":
            assert resp.getheader("Transfer-Encoding") == "chunked"
            return resp.status, content_type, [json.loads(line) for line in raw.splitlines() if line.strip()]
        return resp.status, content_type, json.loads(raw)
    finally:
        conn.close()


def replay(double: KubeApiDouble, name: str, token: str | None = TOKEN) -> Any:
    rec = recorded(name)
    status, content_type, body = send(double, rec["request"], token)
    assert status == rec["response"]["status"], (name, body)
    assert content_type == rec["response"]["headers"]["Content-Type"]
    if isinstance(body, list):  # a watch: same events in order; BOOKMARKs may come 0..n times
        want = [e for e in rec["response"]["body"] if e["type"] != "BOOKMARK"]
        got = [e for e in body if e["type"] != "BOOKMARK"]
        assert project(got) == project(want), name
        shape = [e for e in rec["response"]["body"] if e["type"] == "BOOKMARK"]
        for bookmark in (e for e in body if e["type"] == "BOOKMARK"):
            assert set(bookmark["object"]) == set(shape[0]["object"]) if shape else True
            assert list(bookmark["object"]["metadata"]) == ["resourceVersion"]
    else:
        assert project(body) == project(rec["response"]["body"]), name
    return body


def replay_watch_while(double: KubeApiDouble, name: str, during: list[str]) -> None:
    """Open the recorded watch, then replay the writes that happened while it was open."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def watch() -> None:
        try:
            result.append(replay(double, name))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.2)
    for write in during:
        replay(double, write)
    t.join(10)
    if errors:
        raise errors[0]
    assert result, f"{name}: the watch did not finish"


@pytest.fixture
def double() -> Iterator[KubeApiDouble]:
    # The recorded server was at resourceVersion 298 with a watch cache from 262 (testdata/kube/README.md).
    api = KubeApiDouble(rv=298, bookmark_interval=0.3)
    api._oldest = 262
    with api:
        yield api


def test_replays_the_recorded_session(double: KubeApiDouble) -> None:
    """Every recorded exchange, in the recorded order; resourceVersions match exactly because the double's
    counter is bumped wherever the real one moved for objects outside the recording."""
    replay(double, "01-create-node-a")
    replay(double, "02-list-nodes")
    replay(double, "03-get-node-a")
    replay_watch_while(
        double, "04-watch-nodes", ["05a-patch-status-flannel", "04a-create-node-b", "04b-delete-node-b"]
    )
    double.bump(6)
    for name in (
        "05b-patch-status-add-ready",
        "05c-patch-status-message-only",
        "05d-patch-status-noop",
        "05e-patch-status-ignores-spec",
        "07-get-not-found",
        "09-put-stale-conflict",
        "09b-create-duplicate",
        "10a-patch-malformed-json",
        "10b-patch-invalid-annotation-key",
        "10c-patch-podcidr-immutable",
        "10d-patch-wrong-content-type",
        "11a-create-node-b",
        "04c-watch-without-rv",
        "11b-list-limit-1",
        "11c-list-continue",
    ):
        replay(double, name)
    replay(double, "08a-no-token-forbidden", token=None)
    replay(double, "08b-bad-token-unauthorized", token="not-a-known-token")

    # Three label patches of node-b (not recorded as requests; their results are in 06a), then etcd compacts:
    # the watch cache still serves the old resourceVersion.
    double.bump(6)
    for i in range(3):
        req = {
            "method": "PATCH",
            "path": "/api/v1/nodes/node-b",
            "query": {},
            "headers": {"Accept": "application/json", "Content-Type": "application/merge-patch+json"},
            "body": {"metadata": {"annotations": {"example.com/counter": str(i)}}},
        }
        assert send(double, req)[0] == 200
    replay(double, "06a-watch-old-rv-after-compaction-from-cache")

    # After an apiserver restart the cache starts at the current revision (333): old ones are 410 Gone.
    double.bump(12)
    double.restart()
    replay(double, "06b-watch-too-old-rv-410")
    replay(double, "06c-list-continue-expired-410")
    replay(double, "06d-list-exact-old-rv-410")


def test_noop_patch_emits_no_watch_event(double: KubeApiDouble) -> None:
    double.create_node("node-a", ["198.19.1.0/24"])
    patch = {
        "method": "PATCH",
        "path": "/api/v1/nodes/node-a/status",
        "query": {},
        "headers": {"Accept": "application/json", "Content-Type": "application/strategic-merge-patch+json"},
        "body": {"metadata": {"annotations": {"a.example.com/x": "1"}}},
    }
    first = send(double, patch)[2]["metadata"]["resourceVersion"]
    second = send(double, patch)[2]["metadata"]["resourceVersion"]
    assert first == second
    watch = {
        "method": "GET",
        "path": "/api/v1/nodes",
        "query": {"watch": "true", "resourceVersion": str(int(first) - 1)},
        "headers": {"Accept": "application/json"},
        "body": None,
    }
    events = send(double, watch)[2]
    assert [(e["type"], e["object"]["metadata"]["resourceVersion"]) for e in events] == [("MODIFIED", first)]


def test_patch_with_a_stale_resource_version_is_a_conflict(double: KubeApiDouble) -> None:
    node = double.create_node("node-a", ["198.19.1.0/24"])
    double.create_node("node-b", ["198.19.2.0/24"])
    req = {
        "method": "PATCH",
        "path": "/api/v1/nodes/node-a/status",
        "query": {},
        "headers": {"Accept": "application/json", "Content-Type": "application/strategic-merge-patch+json"},
        "body": {"metadata": {"resourceVersion": node["metadata"]["resourceVersion"], "labels": {"x": "1"}}},
    }
    assert send(double, req)[0] == 200
    status, _, body = send(double, req)
    assert (status, body["reason"], body["details"]) == (409, "Conflict", {"name": "node-a", "kind": "nodes"})


def test_rbac_limits_a_token(double: KubeApiDouble) -> None:
    double.tokens["reader"] = {("list", "nodes"), ("get", "nodes")}
    double.create_node("node-a", ["198.19.1.0/24"])
    get = {"method": "GET", "path": "/api/v1/nodes", "query": {}, "headers": {}, "body": None}
    assert send(double, get, token="reader")[0] == 200
    patch = {
        "method": "PATCH",
        "path": "/api/v1/nodes/node-a/status",
        "query": {},
        "headers": {"Content-Type": "application/strategic-merge-patch+json"},
        "body": {},
    }
    status, _, body = send(double, patch, token="reader")
    assert (status, body["reason"], body["details"]) == (403, "Forbidden", {"kind": "nodes"})
    assert 'cannot patch resource "nodes" in subresource "status"' in body["message"]


@pytest.mark.parametrize(
    ("orig", "patch", "want"),
    [
        # 05b: a new condition goes before the ones the patch does not name.
        (
            {"status": {"conditions": [{"type": "B", "status": "x"}]}},
            {"status": {"conditions": [{"type": "A", "status": "y"}]}},
            {"status": {"conditions": [{"type": "A", "status": "y"}, {"type": "B", "status": "x"}]}},
        ),
        # 05c: an existing condition is updated in place.
        (
            {"status": {"conditions": [{"type": "A", "m": "1"}, {"type": "B", "m": "1"}]}},
            {"status": {"conditions": [{"type": "B", "m": "2"}]}},
            {"status": {"conditions": [{"type": "A", "m": "1"}, {"type": "B", "m": "2"}]}},
        ),
        # null deletes a map key; other keys persist.
        (
            {"metadata": {"annotations": {"a": "1", "b": "2"}}},
            {"metadata": {"annotations": {"a": None, "c": "3"}}},
            {"metadata": {"annotations": {"b": "2", "c": "3"}}},
        ),
        # $patch: delete removes a list entry by its merge key.
        (
            {"status": {"conditions": [{"type": "A"}, {"type": "B"}]}},
            {"status": {"conditions": [{"type": "A", "$patch": "delete"}]}},
            {"status": {"conditions": [{"type": "B"}]}},
        ),
        # 10c: podCIDRs is a merge list of scalars, patch values first.
        (
            {"spec": {"podCIDRs": ["198.19.1.0/24"]}},
            {"spec": {"podCIDRs": ["198.19.9.0/24"]}},
            {"spec": {"podCIDRs": ["198.19.9.0/24", "198.19.1.0/24"]}},
        ),
    ],
)
def test_strategic_merge(orig: dict, patch: dict, want: dict) -> None:
    assert strategic_merge(orig, patch) == want


def _client(double: KubeApiDouble) -> Any:
    from kubernetes import client

    conf = client.Configuration()
    conf.host = double.url
    conf.api_key = {"authorization": TOKEN}
    conf.api_key_prefix = {"authorization": "Bearer"}
    return client.CoreV1Api(client.ApiClient(conf))


def test_official_client_list_patch_watch(double: KubeApiDouble) -> None:
    from kubernetes import watch

    api = _client(double)
    double.create_node("node-a", ["198.19.1.0/24"])
    listing = api.list_node()
    assert [n.metadata.name for n in listing.items] == ["node-a"]
    patched = api.patch_node_status(
        "node-a",
        {
            "metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip": "198.18.0.1"}},
            "status": {
                "conditions": [{"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}]
            },
        },
    )
    assert patched.metadata.annotations == {"flannel.alpha.coreos.com/public-ip": "198.18.0.1"}
    assert [c.type for c in patched.status.conditions] == ["NetworkUnavailable"]
    events = [
        (e["type"], e["raw_object"]["metadata"].get("name"))
        for e in watch.Watch().stream(
            api.list_node,
            resource_version=listing.metadata.resource_version,
            timeout_seconds=1,
            allow_watch_bookmarks=True,
        )
    ]
    assert events[0] == ("MODIFIED", "node-a")
    assert set(events[1:]) <= {("BOOKMARK", None)} and len(events) >= 2  # bookmarks every 0.3 s here


def test_official_client_gets_410_after_a_restart(double: KubeApiDouble) -> None:
    from kubernetes import watch
    from kubernetes.client.rest import ApiException

    api = _client(double)
    double.create_node("node-a", ["198.19.1.0/24"])
    rv = api.list_node().metadata.resource_version
    double.create_node("node-b", ["198.19.2.0/24"])
    double.restart()
    with pytest.raises(ApiException) as info:
        list(watch.Watch().stream(api.list_node, resource_version=rv, timeout_seconds=1))
    assert info.value.status == 410
    with pytest.raises(ApiException) as info:
        api.read_node("node-c")
    assert info.value.status == 404
