"""The Kubernetes lease store (`--kube-subnet-mgr`): a node's lease is its podCIDR(s) plus flannel's node
annotations, through the official `kubernetes` client (imported only when a KubeStore is built).

Store protocol mapping: the key of a lease is a node's podCIDR, so a lease lives on the node that owns that
subnet (in production, our own node: assigned_subnets() gives its podCIDR and the manager only ever creates
that one). create/renew = patch the node's annotations (and NetworkUnavailable=False) on nodes/status with the
node's resourceVersion as precondition; delete = remove the annotations; list = nodes annotated
kube-subnet-manager=true; watch = a node watch whose resourceVersions are the revisions, reporting only
changes of the flannel view of a node; 410 Gone = Compacted. Kubernetes has no lease expiry: expirations
are nominal (now + ttl), so the manager re-publishes once per TTL, and there are no reservations.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import ipaddress
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from udpflannel.lease.kube_api import (
    BACKOFF_MAX,
    BACKOFF_START,
    NODES,
    SMP,
    NodeApi,
    make_api_client,
    quote,
    raise_for,
)
from udpflannel.lease.model import (
    Event,
    EventType,
    IPv4Network,
    IPv6Network,
    Lease,
    LeaseAttrs,
    LeaseSnapshot,
    subnet_key,
)
from udpflannel.lease.store import Conflict, NotFound, StoreError

log = logging.getLogger(__name__)

DEFAULT_ANNOTATION_PREFIX = "flannel.alpha.coreos.com"
CONDITION_TYPE = "NetworkUnavailable"
CONDITION_REASON = "FlannelIsUp"
CONDITION_MESSAGE = "Flannel is running on this node"  # flannel's text, pkg/subnet/kube/kube.go
NOMINAL_TTL = 24 * 3600.0
PATCH_TRIES = 5  # a patch lost to an unrelated node update (kubelet) is re-read and retried
VIEW_HISTORY = 8  # flannel views remembered per node, to decide whether a watched change is one


@dataclass(frozen=True, slots=True)
class AnnotationKeys:
    """flannel's node annotations under a prefix (--kube-annotation-prefix)."""

    backend_type: str
    backend_data: str
    backend_v6_data: str
    public_ip: str
    public_ipv6: str
    kube_subnet_manager: str
    public_ip_overwrite: str

    @classmethod
    def with_prefix(cls, prefix: str = DEFAULT_ANNOTATION_PREFIX) -> AnnotationKeys:
        return cls(
            *(
                f"{prefix}/{name}"
                for name in (
                    "backend-type",
                    "backend-data",
                    "backend-v6-data",
                    "public-ip",
                    "public-ipv6",
                    "kube-subnet-manager",
                    "public-ip-overwrite",
                )
            )
        )


def pod_cidrs(node: Mapping[str, Any]) -> tuple[IPv4Network | None, IPv6Network | None]:
    """A node's podCIDRs (spec.podCIDRs, else spec.podCIDR) by family; ValueError if malformed."""
    spec = node.get("spec") or {}
    v4: IPv4Network | None = None
    v6: IPv6Network | None = None
    for text in spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []):
        net = ipaddress.ip_network(text, strict=True)
        if isinstance(net, IPv4Network):
            v4 = v4 or net
        else:
            v6 = v6 or net
    return v4, v6


class KubeStore:
    """Store protocol on Kubernetes Nodes (see the module docstring for the mapping).

    `drops` counts annotated nodes we could not read, by reason (no_pod_cidr, bad_annotation).
    """

    def __init__(
        self,
        node_name: str | None = None,
        *,
        kube_api_url: str | None = None,
        kubeconfig: str | None = None,
        annotation_prefix: str = DEFAULT_ANNOTATION_PREFIX,
        set_node_network_unavailable: bool = True,
        enable_ipv4: bool = True,
        enable_ipv6: bool = False,
        network: IPv4Network | None = None,
        ipv6_network: IPv6Network | None = None,
        request_timeout: float = 10.0,
        retry_for: float = 15.0,
        clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] = os.environ,
        api_client: Any = None,
    ) -> None:
        from kubernetes import watch  # lazily: only Kubernetes mode pays for the client

        self._watch_mod = watch
        client = api_client or make_api_client(kube_api_url, kubeconfig)
        self._api = NodeApi(client, request_timeout, retry_for)
        self._keys = AnnotationKeys.with_prefix(annotation_prefix)
        self._set_condition = set_node_network_unavailable
        self._v4, self._v6 = enable_ipv4, enable_ipv6
        self._network, self._ipv6_network = network, ipv6_network
        self._timeout = request_timeout
        self._retry_for = retry_for
        self._clock = clock
        self._ttl = NOMINAL_TTL
        self._views: dict[str, list[tuple[int, Lease | None]]] = {}
        self.drops: collections.Counter[str] = collections.Counter()
        self.node_name = node_name or self._node_name_from(environ)

    @classmethod
    def from_options(cls, options: Any, environ: Mapping[str, str] = os.environ) -> KubeStore:
        """Build from `udpflannel run` options (options.RunOptions): flanneld's --kube-* flags, and the
        address families and Networks of the net-conf file (options.net_config) to check podCIDRs against."""
        conf = options.net_config
        return cls(
            kube_api_url=options.kube_api_url or None,
            kubeconfig=options.kubeconfig_file or None,
            annotation_prefix=options.kube_annotation_prefix,
            set_node_network_unavailable=options.set_node_network_unavailable,
            enable_ipv4=conf.enable_ipv4 if conf is not None else True,
            enable_ipv6=conf.enable_ipv6 if conf is not None else False,
            network=conf.network if conf is not None else None,
            ipv6_network=conf.ipv6_network if conf is not None else None,
            environ=environ,
        )

    # ---- connection -------------------------------------------------------------------------------------

    def _node_name_from(self, environ: Mapping[str, str]) -> str:
        if environ.get("NODE_NAME"):
            return environ["NODE_NAME"]
        pod, namespace = environ.get("POD_NAME"), environ.get("POD_NAMESPACE")
        if not (pod and namespace):
            raise StoreError("Kubernetes mode needs NODE_NAME, or POD_NAME and POD_NAMESPACE (downward API)")
        path = f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(pod)}"
        body = self._api.call(f"get pod {namespace}/{pod}", "GET", path)
        name = (body.get("spec") or {}).get("nodeName")
        if not name:
            raise StoreError(f"pod {namespace}/{pod} is not scheduled to a node yet (no spec.nodeName)")
        return name

    # ---- the flannel view of a node ---------------------------------------------------------------------

    def _subnets_of(self, node: Mapping[str, Any]) -> tuple[IPv4Network | None, IPv6Network | None] | None:
        """The node's podCIDRs of the enabled families; None when one of them is missing."""
        v4, v6 = pod_cidrs(node)
        v4, v6 = (v4 if self._v4 else None), (v6 if self._v6 else None)
        if (self._v4 and v4 is None) or (self._v6 and v6 is None):
            return None
        return v4, v6

    def _view(self, node: Mapping[str, Any]) -> Lease | None:
        """The lease a node publishes, or None when it is no flannel peer (or unreadable: counted)."""
        meta = node.get("metadata") or {}
        ann = meta.get("annotations") or {}
        if ann.get(self._keys.kube_subnet_manager) != "true":
            return None
        try:
            nets = self._subnets_of(node)
            if nets is None:
                self.drops["no_pod_cidr"] += 1
                return None
            attrs = self._attrs_of(ann)
        except ValueError as exc:
            self.drops["bad_annotation"] += 1
            log.warning("kube: skipping node %s: %s", meta.get("name"), exc)
            return None
        return Lease(
            subnet=nets[0],
            attrs=attrs,
            ipv6_subnet=nets[1],
            expiration=self._clock() + self._ttl,
            revision=int(meta["resourceVersion"]),
        )

    def _attrs_of(self, ann: Mapping[str, str]) -> LeaseAttrs:
        k = self._keys

        def data(key: str) -> Any:
            return json.loads(ann[key]) if ann.get(key) else None

        obj = {
            # public-ip-overwrite is an admin's word on the node's address (flannel #1102): it wins.
            "PublicIP": ann.get(k.public_ip_overwrite) or ann.get(k.public_ip),
            "PublicIPv6": ann.get(k.public_ipv6),
            "BackendType": ann.get(k.backend_type, ""),
            "BackendData": data(k.backend_data),
            "BackendV6Data": data(k.backend_v6_data),
        }
        return LeaseAttrs.from_json(obj)

    def _remember(self, name: str, rv: int, view: Lease | None) -> None:
        history = self._views.setdefault(name, [])
        revs = [r for r, _ in history]
        i = bisect.bisect_left(revs, rv)
        if i < len(history) and history[i][0] == rv:
            return
        history.insert(i, (rv, view))
        del history[:-VIEW_HISTORY]

    def _before(self, name: str, rv: int) -> tuple[bool, Lease | None]:
        """(known, view) of a node just before revision rv, from what list() and watch() have seen."""
        history = self._views.get(name) or []
        i = bisect.bisect_left([r for r, _ in history], rv)
        return (True, history[i - 1][1]) if i else (False, None)

    def _events_for(self, type_: str, node: Mapping[str, Any]) -> list[Event]:
        meta = node.get("metadata") or {}
        name, rv = meta.get("name", ""), int(meta.get("resourceVersion") or 0)
        new = None if type_ == "DELETED" else self._view(node)
        if new is not None and new.revision != rv:
            new = dataclasses.replace(new, revision=rv)
        known, old = self._before(name, rv)
        self._remember(name, rv, new)
        events = []
        if old is not None and (new is None or new.key != old.key):
            events.append(Event(EventType.REMOVED, dataclasses.replace(old, revision=rv), rv))
        if new is not None and (not known or old is None or old.key != new.key or old.attrs != new.attrs):
            events.append(Event(EventType.ADDED, new, rv))
        return events

    # ---- nodes -----------------------------------------------------------------------------------------

    def _get_node(self, name: str) -> dict[str, Any]:
        return self._api.call(f"get node {name}", "GET", f"{NODES}/{quote(name)}")

    def _node_for(self, subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None) -> dict[str, Any] | None:
        """The node whose podCIDRs are this lease key: ours first (the common case), else any."""
        with_key = (subnet, ipv6_subnet)
        try:
            ours = self._get_node(self.node_name)
            if self._subnets_of(ours) == with_key:
                return ours
        except (NotFound, ValueError):
            pass  # our node is gone or has a malformed podCIDR: look at the others
        for node in self._api.call("list nodes", "GET", NODES).get("items") or []:
            try:
                if self._subnets_of(node) == with_key:
                    return node
            except ValueError:
                continue
        return None

    def _patch(self, node: Mapping[str, Any], attrs: LeaseAttrs | None) -> dict[str, Any]:
        """Publish attrs on the node (None: withdraw them), conditional on the resourceVersion we read."""
        k = self._keys
        meta = node.get("metadata") or {}
        ann = meta.get("annotations") or {}
        annotations: dict[str, str | None]
        if attrs is None:
            annotations = dict.fromkeys(
                (
                    k.backend_type,
                    k.backend_data,
                    k.backend_v6_data,
                    k.public_ip,
                    k.public_ipv6,
                    k.kube_subnet_manager,
                )
            )
        else:
            public_ip = ann.get(k.public_ip_overwrite) or (str(attrs.public_ip) if attrs.public_ip else None)
            annotations = {
                k.backend_type: attrs.backend_type,
                k.backend_data: json.dumps(attrs.backend_data, separators=(",", ":")),
                k.backend_v6_data: (
                    json.dumps(attrs.backend_v6_data, separators=(",", ":"))
                    if attrs.backend_v6_data is not None
                    else None
                ),
                k.public_ip: public_ip,
                k.public_ipv6: str(attrs.public_ipv6) if attrs.public_ipv6 else None,
                k.kube_subnet_manager: "true",
            }
        body: dict[str, Any] = {
            "metadata": {"resourceVersion": meta["resourceVersion"], "annotations": annotations}
        }
        if attrs is not None and self._set_condition and not self._condition_is_set(node):
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._clock()))
            body["status"] = {
                "conditions": [
                    {
                        "type": CONDITION_TYPE,
                        "status": "False",
                        "reason": CONDITION_REASON,
                        "message": CONDITION_MESSAGE,
                        "lastTransitionTime": now,
                        "lastHeartbeatTime": now,
                    }
                ]
            }
        name = meta["name"]
        return self._api.call(
            f"patch node {name} status", "PATCH", f"{NODES}/{quote(name)}/status", body, SMP
        )

    @staticmethod
    def _condition_is_set(node: Mapping[str, Any]) -> bool:
        for cond in (node.get("status") or {}).get("conditions") or []:
            if cond.get("type") == CONDITION_TYPE:
                return cond.get("status") == "False" and cond.get("reason") == CONDITION_REASON
        return False

    def _leased(self, node: dict[str, Any], ttl: float) -> Lease:
        lease = self._view(node)
        if lease is None:
            raise StoreError(f"node {node['metadata']['name']} did not keep our annotations")
        return dataclasses.replace(lease, expiration=self._clock() + ttl)

    # ---- Store protocol -------------------------------------------------------------------------------

    def network_config(self) -> str | None:
        return None  # Kubernetes mode reads net-conf.json from its file (--net-config-path)

    def assigned_subnets(self) -> tuple[IPv4Network | None, IPv6Network | None]:
        node = self._get_node(self.node_name)
        try:
            v4, v6 = pod_cidrs(node)
        except ValueError as exc:
            raise StoreError(f"node {self.node_name} has a malformed podCIDR: {exc}") from None
        for enabled, net, network, family in (
            (self._v4, v4, self._network, "IPv4"),
            (self._v6, v6, self._ipv6_network, "IPv6"),
        ):
            if not enabled:
                continue
            if net is None:
                raise StoreError(
                    f"node {self.node_name} has no {family} podCIDR: run kube-controller-manager with "
                    "--allocate-node-cidrs and --cluster-cidr, or set spec.podCIDR(s)"
                )
            if network is not None and not net.subnet_of(network):  # type: ignore[arg-type]
                raise StoreError(
                    f"node {self.node_name} podCIDR {net} is outside the {family} Network {network} of "
                    "net-conf.json: make --cluster-cidr and Network agree"
                )
        return (v4 if self._v4 else None), (v6 if self._v6 else None)

    def list(self) -> LeaseSnapshot:
        body = self._api.call("list nodes", "GET", NODES)
        leases = []
        for node in body.get("items") or []:
            meta = node.get("metadata") or {}
            view = self._view(node)
            self._remember(meta.get("name", ""), int(meta.get("resourceVersion") or 0), view)
            if view is not None:
                leases.append(view)
        return LeaseSnapshot(leases=leases, revision=int(body["metadata"]["resourceVersion"]))

    def create(
        self, subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs, ttl: float
    ) -> Lease:
        key = subnet_key(subnet, ipv6_subnet)
        node = self._node_for(subnet, ipv6_subnet)
        if node is None:
            raise StoreError(f"no node has podCIDR(s) {key}: in Kubernetes mode a subnet is a node's podCIDR")
        if self._view(node) is not None:
            raise Conflict(f"{key} is already published by node {node['metadata']['name']}")
        self._ttl = ttl
        return self._leased(self._patch(node, attrs), ttl)

    def renew(self, lease: Lease, attrs: LeaseAttrs, ttl: float) -> Lease:
        self._ttl = ttl
        for _ in range(PATCH_TRIES):
            node = self._checked_node(lease)
            try:
                return self._leased(self._patch(node, attrs), ttl)
            except Conflict:
                continue  # the node changed between our read and our patch: read it again
        raise Conflict(f"{lease.key}: the node keeps changing under us")

    def delete(self, lease: Lease) -> None:
        for _ in range(PATCH_TRIES):
            node = self._checked_node(lease)
            try:
                self._patch(node, None)
                return
            except Conflict:
                continue
        raise Conflict(f"{lease.key}: the node keeps changing under us")

    def _checked_node(self, lease: Lease) -> dict[str, Any]:
        """The node holding `lease`, if what it publishes is still what `lease` says (else Conflict)."""
        node = self._node_for(lease.subnet, lease.ipv6_subnet)
        current = self._view(node) if node is not None else None
        if node is None or current is None:
            raise NotFound(f"{lease.key} is not published by any node")
        if current.revision != lease.revision and current.attrs != lease.attrs:
            raise Conflict(f"{lease.key} was changed by someone else since revision {lease.revision}")
        return node

    def reserve(
        self, subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs
    ) -> Lease:
        raise StoreError("Kubernetes mode has no reservations: a node's subnet is its podCIDR")

    def watch(self, after: int, timeout: float) -> list[Event]:
        """Changes of the flannel view of nodes after resourceVersion `after`; reconnects with backoff while
        the API server is away; Compacted when it answers 410 Gone."""
        deadline = time.monotonic() + timeout
        delay = BACKOFF_START
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            events = self._watch_once(after, remaining)
            if events:
                return events
            if events is None:
                time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
                delay = min(delay * 2, BACKOFF_MAX)

    def _watch_once(self, after: int, remaining: float) -> list[Event] | None:
        """Events, [] when the stream ended or timed out without any, None when the connection failed."""
        import urllib3

        api_exception = self._api.api_exception
        started = time.monotonic()
        stream = self._watch_mod.Watch().stream(
            self._api.list_nodes,
            resource_version=str(after),
            timeout_seconds=max(1, math.ceil(remaining)),  # the server ends the stream after we stop reading
            allow_watch_bookmarks=True,
            _request_timeout=(min(remaining, self._timeout), remaining),
        )
        try:
            for raw in stream:
                if raw.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                    events = self._events_for(raw["type"], raw.get("raw_object") or {})
                    if events:
                        return events
        except api_exception as exc:
            raise_for("watch nodes", exc)
            log.info("kube watch: %s %s; reconnecting", exc.status, exc.reason)
            return None
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            if time.monotonic() - started >= remaining - 0.01:
                return []
            log.info("kube watch: connection lost (%s); reconnecting", exc)
            return None
        finally:
            stream.close()
        # The server ended the stream before our time was up (restart, proxy timeout): pause, reconnect.
        return [] if time.monotonic() - started >= remaining - 0.01 else None

    def close(self) -> None:
        self._api.close()
