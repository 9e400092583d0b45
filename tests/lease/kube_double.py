"""An in-process Kubernetes API double for Nodes (and Pods to find a pod's node), following the wire contract
recorded from a real kube-apiserver in testdata/kube/ closely enough that the official client talks to it
unchanged: list (paging), get, create, put, delete, watch (resourceVersion, bookmarks, 410), strategic-merge
and JSON-merge PATCH of nodes and nodes/status, bearer-token auth (401/403), v1 Status objects for errors.

Not modelled: field/label selectors, json-patch, server-side apply, a consistent snapshot behind list pages
(later pages are cut from the current state), and admission beyond the not-ready taint.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import copy
import json
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kube_wire import (
    CONTINUE_EXPIRED,
    DEFAULT_NODE_STATUS,
    MERGE_PATCH,
    NODE_PATH,
    NODES,
    NOT_READY_TAINT,
    POD_PATH,
    SMP,
    VERBS,
    ApiError,
    continue_token,
    json_merge,
    status_object,
    strategic_merge,
    timestamp,
    validate_node,
    write_self_signed_cert,
)

from udpflannel.lab.netns import SERVICE_ADDR

TEST_TOKEN = "test-token"  # the default token, allowed everything


@dataclass
class _Change:
    rv: int
    type: str
    obj: dict


@dataclass
class KubeApiDouble:
    """The API state plus its HTTP server. Tokens: token -> allowed (verb, resource) pairs, None = all.

    Admin methods (create_node, delete_node, add_pod, compact, bump) act directly, as other cluster
    components would; `requests` records (method, path, query) of every HTTP request.
    """

    tokens: dict[str, set[tuple[str, str]] | None] = field(default_factory=lambda: {TEST_TOKEN: None})
    bookmark_interval: float | None = 1.0
    rv: int = 100
    nodes: dict[str, dict] = field(default_factory=dict)
    pods: dict[tuple[str, str], dict] = field(default_factory=dict)
    requests: list[tuple[str, str, dict]] = field(default_factory=list)
    _history: list[_Change] = field(default_factory=list)
    _oldest: int = 100  # watch/list from below this resourceVersion is 410 Gone
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _conns: set[socket.socket] = field(default_factory=set)
    _epoch: int = 0
    port: int = 0
    host: str = SERVICE_ADDR  # the loopback of the test's own namespace (tests/conftest.py private_net)
    tls_dir: str | None = None  # serve HTTPS with a self-signed certificate written here (ca_file)
    ca_file: str | None = None
    _key_file: str = ""

    # ---- lifecycle -------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_dir else 'http'}://{self.host}:{self.port}"

    def start(self) -> None:
        """Listen on `host` (a free port first, the same port on a restart)."""
        double = self

        class Handler(_Handler):
            api = double

        server = ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        if self.tls_dir is not None:
            if self.ca_file is None:
                self.ca_file, self._key_file = write_self_signed_cert(self.tls_dir, self.host)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.ca_file, self._key_file)
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and cut every open connection (watches included), as a dying apiserver would."""
        with self._cond:
            self._epoch += 1
            self._cond.notify_all()
            conns = list(self._conns)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)

    def restart(self, *, lose_watch_cache: bool = True) -> None:
        """Stop and start again on the same port. A restarted apiserver's watch cache begins at the current
        revision, so older resourceVersions get 410 (testdata 06a vs 06b)."""
        self.stop()
        if lose_watch_cache:
            self.compact()
        self.start()

    def __enter__(self) -> KubeApiDouble:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- admin ---------------------------------------------------------------------------------------------

    def bump(self, n: int = 1) -> None:
        """Other objects changed: the global resourceVersion skips numbers, as on a real server."""
        with self._cond:
            self.rv += n

    def compact(self) -> None:
        with self._cond:
            self._oldest = self.rv
            self._history.clear()

    def create_node(self, name: str, pod_cidrs: Iterable[str] = (), labels: dict | None = None) -> dict:
        cidrs = list(pod_cidrs)
        spec: dict[str, Any] = {"podCIDR": cidrs[0], "podCIDRs": cidrs} if cidrs else {}
        body = {
            "metadata": {"name": name, "labels": labels or {"kubernetes.io/hostname": name}},
            "spec": spec,
        }
        return self._create_node(body)

    def delete_node(self, name: str) -> None:
        self._delete_node(name)

    def add_pod(self, namespace: str, name: str, node_name: str) -> None:
        with self._cond:
            self.pods[(namespace, name)] = {
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4())},
                "spec": {"nodeName": node_name},
                "status": {},
            }

    def node(self, name: str) -> dict:
        with self._cond:
            return copy.deepcopy(self.nodes[name])

    # ---- operations ----------------------------------------------------------------------------------------

    def _record(self, type_: str, obj: dict) -> None:
        self._history.append(_Change(self.rv, type_, copy.deepcopy(obj)))
        self._cond.notify_all()

    def _create_node(self, body: Any) -> dict:
        if not isinstance(body, dict) or not (body.get("metadata") or {}).get("name"):
            raise ApiError(400, "BadRequest", "name or generateName is required")
        with self._cond:
            name = body["metadata"]["name"]
            if name in self.nodes:
                raise ApiError(
                    409, "AlreadyExists", f'nodes "{name}" already exists', {"name": name, "kind": "nodes"}
                )
            self.rv += 1
            meta = {
                "name": name,
                "uid": str(uuid.uuid4()),
                "resourceVersion": str(self.rv),
                "creationTimestamp": timestamp(),
            }
            for key in ("labels", "annotations"):
                if body["metadata"].get(key):
                    meta[key] = dict(body["metadata"][key])
            spec = copy.deepcopy(body.get("spec") or {})
            if spec.get("podCIDR") and not spec.get("podCIDRs"):
                spec["podCIDRs"] = [spec["podCIDR"]]
            status = strategic_merge(copy.deepcopy(DEFAULT_NODE_STATUS), body.get("status") or {})
            if not any(c.get("type") == "Ready" for c in status.get("conditions") or []):
                # TaintNodesByCondition admission (01-create-node-a.json).
                spec.setdefault("taints", []).append(dict(NOT_READY_TAINT))
            node = {"kind": "Node", "apiVersion": "v1", "metadata": meta, "spec": spec, "status": status}
            self.nodes[name] = node
            self._record("ADDED", node)
            return copy.deepcopy(node)

    def _delete_node(self, name: str) -> dict:
        with self._cond:
            node = self._get_node(name)
            del self.nodes[name]
            self.rv += 1
            node["metadata"]["resourceVersion"] = str(self.rv)  # DELETED carries a new rv (04b)
            self._record("DELETED", node)
            return {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {"name": name, "kind": "nodes", "uid": node["metadata"]["uid"]},
            }

    def _get_node(self, name: str) -> dict:
        if name not in self.nodes:
            raise ApiError(404, "NotFound", f'nodes "{name}" not found', {"name": name, "kind": "nodes"})
        return copy.deepcopy(self.nodes[name])

    def _conflict(self, name: str) -> ApiError:
        return ApiError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on nodes "{name}": the object has been modified; '
            "please apply your changes to the latest version and try again",
            {"name": name, "kind": "nodes"},
        )

    def _store_update(self, name: str, old: dict, new: dict) -> dict:
        """Keep server-owned fields, write if anything changed (a no-op bumps nothing, 05d)."""
        for key in ("name", "uid", "creationTimestamp"):
            new["metadata"][key] = old["metadata"][key]
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        new["kind"], new["apiVersion"] = "Node", "v1"
        if new == old:
            return old
        self.rv += 1
        new["metadata"]["resourceVersion"] = str(self.rv)
        self.nodes[name] = new
        self._record("MODIFIED", new)
        return copy.deepcopy(new)

    def _patch_node(self, name: str, body: bytes, content_type: str, status: bool) -> dict:
        media = content_type.split(";")[0].strip()
        if media not in (SMP, MERGE_PATCH):
            raise ApiError(415, "UnsupportedMediaType", "415: Unsupported Media Type", {})
        try:
            patch = json.loads(body)
        except ValueError:
            raise ApiError(400, "BadRequest", "unexpected end of JSON input") from None
        if not isinstance(patch, dict):
            raise ApiError(
                400, "BadRequest", "json: cannot unmarshal into Go value of type map[string]interface {}"
            )
        with self._cond:
            old = self._get_node(name)
            want_rv = (patch.get("metadata") or {}).get("resourceVersion")
            if want_rv is not None and want_rv != old["metadata"]["resourceVersion"]:
                raise self._conflict(name)  # resourceVersion in a patch is a precondition
            new = (strategic_merge if media == SMP else json_merge)(old, patch)
            if status:
                new["spec"] = copy.deepcopy(old["spec"])  # the status subresource ignores spec (05e)
            else:
                new["status"] = copy.deepcopy(old["status"])
            validate_node(name, old, new, main_resource=not status)
            return self._store_update(name, old, new)

    def _put_node(self, name: str, body: Any) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
        with self._cond:
            old = self._get_node(name)
            if (body.get("metadata") or {}).get("resourceVersion") != old["metadata"]["resourceVersion"]:
                raise self._conflict(name)
            new = copy.deepcopy(body)
            new["status"] = copy.deepcopy(old["status"])
            validate_node(name, old, new, main_resource=True)
            return self._store_update(name, old, new)

    def _list_nodes(self, query: dict[str, str]) -> dict:
        with self._cond:
            rv, start = self.rv, ""
            if query.get("continue"):
                token = json.loads(base64.b64decode(query["continue"] + "=" * (-len(query["continue"]) % 4)))
                rv, start = int(token["rv"]), token["start"]
                if rv < self._oldest:
                    raise ApiError(
                        410,
                        "Expired",
                        CONTINUE_EXPIRED,
                        meta={"continue": continue_token(-1, start)},
                    )
            elif (
                query.get("resourceVersionMatch") == "Exact"
                and int(query.get("resourceVersion", 0)) < self._oldest
            ):
                raise ApiError(410, "Expired", "The resourceVersion for the provided list is too old.")
            names = sorted(n for n in self.nodes if n >= start)
            limit = int(query.get("limit") or 0)
            page, rest = (names[:limit], names[limit:]) if limit else (names, [])
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if rest:
                meta["continue"] = continue_token(rv, page[-1] + "\u0000")
                meta["remainingItemCount"] = len(rest)
            items = []
            for name in page:
                item = copy.deepcopy(self.nodes[name])
                del item["kind"], item["apiVersion"]  # list items carry none (02-list-nodes.json)
                items.append(item)
            return {"kind": "NodeList", "apiVersion": "v1", "metadata": meta, "items": items}

    # ---- watch ------------------------------------------------------------------------------------------

    def _next_changes(
        self, cursor: int, epoch: int, deadline: float, bookmark_at: float | None
    ) -> tuple[list[_Change] | None, int]:
        """Wait for changes after `cursor`: them, [] when a bookmark is due, None when the watch must end."""
        with self._cond:
            while self._epoch == epoch:
                revs = [c.rv for c in self._history]
                fresh = self._history[bisect.bisect_right(revs, cursor) :]
                if fresh:
                    return fresh, self.rv
                now = time.monotonic()
                if now >= deadline:
                    break
                if bookmark_at is not None and now >= bookmark_at:
                    return [], self.rv
                self._cond.wait(min(deadline, bookmark_at or deadline) - now)
            return None, self.rv

    def _watch(self, handler: _Handler, query: dict[str, str]) -> None:
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks") == "true" and self.bookmark_interval is not None
        handler.start_chunked()
        with self._cond:
            epoch = self._epoch
            rv_text = query.get("resourceVersion") or "0"
            if rv_text == "0":
                # No resourceVersion: the current state as synthetic ADDED events first (04c).
                pending = [("ADDED", copy.deepcopy(n)) for _, n in sorted(self.nodes.items())]
                cursor = self.rv
            else:
                after = int(rv_text)
                if after < self._oldest:
                    gone = status_object(
                        410, "Expired", f"too old resource version: {after} ({self._oldest})"
                    )  # 06b: HTTP 200 with one ERROR event, then the stream ends
                    pending, cursor = [("ERROR", gone)], None
                else:
                    pending, cursor = [], after
        next_bookmark = time.monotonic() + (self.bookmark_interval or 0)
        try:
            for type_, obj in pending:
                handler.send_event(type_, obj)
            while cursor is not None:
                fresh, current_rv = self._next_changes(
                    cursor, epoch, deadline, next_bookmark if bookmarks else None
                )
                if fresh is None:
                    break
                if fresh:
                    for change in fresh:
                        handler.send_event(change.type, change.obj)
                    cursor = fresh[-1].rv
                else:
                    handler.send_event(
                        "BOOKMARK",
                        {"kind": "Node", "apiVersion": "v1", "metadata": {"resourceVersion": str(current_rv)},
                         "spec": {}, "status": copy.deepcopy(DEFAULT_NODE_STATUS)},
                    )  # fmt: skip
                    next_bookmark = time.monotonic() + (self.bookmark_interval or 0)
            handler.end_chunked()
        except OSError:
            pass  # the client went away, or stop() cut the connection


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: KubeApiDouble

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.api._cond:
            self.api._conns.add(self.connection)

    def finish(self) -> None:
        with self.api._cond:
            self.api._conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    # -- framing

    def send_json(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_chunked(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def send_event(self, type_: str, obj: dict) -> None:
        line = json.dumps({"type": type_, "object": obj}, separators=(",", ":")).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.flush()

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- dispatch

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _authorize(self, verb: str, resource: str) -> None:
        auth = self.headers.get("Authorization", "")
        scheme, _, credential = auth.partition(" ")
        # The apiserver takes the scheme in any case (in-cluster clients send "bearer").
        token = credential.strip() if scheme.lower() == "bearer" else None
        if token is None:
            user = "system:anonymous"
            allowed: set[tuple[str, str]] | None = set()
        elif token not in self.api.tokens:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        else:
            user, allowed = "system:serviceaccount:test:udpflannel", self.api.tokens[token]
        if allowed is not None and (verb, resource) not in allowed:
            base, _, sub = resource.partition("/")
            what = f'resource "{base}"' + (f' in subresource "{sub}"' if sub else "")
            raise ApiError(
                403,
                "Forbidden",
                f'{resource} is forbidden: User "{user}" cannot {verb} {what} in API group "" '
                "at the cluster scope",
                {"kind": base},
            )

    def _dispatch(self, method: str) -> None:
        parts = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        api = self.api
        api.requests.append((method, parts.path, query))
        try:
            if parts.path == NODES:
                verb = "watch" if method == "GET" and query.get("watch") in ("true", "1") else VERBS[method]
                verb = "list" if verb == "get" else verb
                self._authorize(verb, "nodes")
                if verb == "watch":
                    api._watch(self, query)
                elif method == "GET":
                    self.send_json(200, api._list_nodes(query))
                elif method == "POST":
                    self.send_json(201, api._create_node(self._json(body)))
                else:
                    raise ApiError(
                        405, "MethodNotAllowed", f"the server does not allow this method: {method}"
                    )
            elif match := NODE_PATH.match(parts.path):
                name, status = match.group(1), bool(match.group(2))
                self._authorize(VERBS[method], "nodes/status" if status else "nodes")
                if method == "GET":
                    with api._cond:
                        node = api._get_node(name)
                    self.send_json(200, node)
                elif method == "PATCH":
                    content_type = self.headers.get("Content-Type", "")
                    self.send_json(200, api._patch_node(name, body, content_type, status))
                elif method == "PUT":
                    self.send_json(200, api._put_node(name, self._json(body)))
                elif method == "DELETE" and not status:
                    self.send_json(200, api._delete_node(name))
                else:
                    raise ApiError(
                        405, "MethodNotAllowed", f"the server does not allow this method: {method}"
                    )
            elif (match := POD_PATH.match(parts.path)) and method == "GET":
                self._authorize("get", "pods")
                pod = api.pods.get((match.group(1), match.group(2)))
                if pod is None:
                    raise ApiError(
                        404,
                        "NotFound",
                        f'pods "{match.group(2)}" not found',
                        {"name": match.group(2), "kind": "pods"},
                    )
                self.send_json(200, pod)
            else:
                raise ApiError(404, "NotFound", "the server could not find the requested resource", {})
        except ApiError as exc:
            self.send_json(exc.status["code"], exc.status)

    @staticmethod
    def _json(body: bytes) -> Any:
        try:
            return json.loads(body)
        except ValueError:
            raise ApiError(400, "BadRequest", "unexpected end of JSON input") from None
