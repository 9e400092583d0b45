"""The Kubernetes API as the Kubernetes lease store (kube.py) uses it: building the official client from a
kubeconfig, the in-cluster service account or --kube-api-url, and the few core/v1 requests we make, with
retry and the mapping of API errors to Store errors."""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from typing import Any

from udpflannel.lease.store import Compacted, Conflict, NotFound, StoreError

log = logging.getLogger(__name__)

NODES = "/api/v1/nodes"
SMP = "application/strategic-merge-patch+json"
BACKOFF_START = 0.05
BACKOFF_MAX = 2.0
RBAC_HINT = "the service account needs deploy/rbac.yaml (nodes get/list/watch, nodes/status patch, pods get)"


def check_kubeconfig_shape(path: str) -> None:
    """A kubeconfig is a YAML mapping whose clusters, contexts and users are lists of mappings; anything
    else gets a StoreError saying so (the client's loader fails on it with a TypeError or AttributeError)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read kubeconfig {path}: {exc}: give a readable kubeconfig file") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        what = getattr(exc, "problem", None) or "unparsable"
        raise StoreError(
            f"cannot load kubeconfig {path}: not YAML{at} ({what}): give a valid kubeconfig"
        ) from None
    if not isinstance(doc, dict):
        shape = "empty" if doc is None else f"a YAML {type(doc).__name__}"
        raise StoreError(
            f"cannot load kubeconfig {path}: it is {shape}, not a mapping with clusters, contexts and users: "
            "give a valid kubeconfig"
        )
    for key in ("clusters", "contexts", "users"):
        items = doc.get(key)
        if items is not None and not (isinstance(items, list) and all(isinstance(i, dict) for i in items)):
            raise StoreError(
                f"cannot load kubeconfig {path}: its {key} is not a list of mappings "
                f"(each with name and {key[:-1]}): give a valid kubeconfig"
            )


def make_api_client(kube_api_url: str | None, kubeconfig: str | None) -> Any:
    """flannel's order: --kubeconfig-file, else the in-cluster service account; --kube-api-url overrides
    the server address of either."""
    from kubernetes import client, config

    if kubeconfig:
        check_kubeconfig_shape(kubeconfig)
        conf = client.Configuration()
        try:
            config.load_kube_config(config_file=kubeconfig, client_configuration=conf)
        except Exception as exc:  # the client's parser raises TypeError and others on odd YAML
            said = " ".join(str(exc).split())  # YAML errors span lines; the agent's error is one
            raise StoreError(
                f"cannot load kubeconfig {kubeconfig}: {type(exc).__name__}: {said}: give a valid kubeconfig"
            ) from None
        if kube_api_url:
            # The kubeconfig loader re-applies its server before every request (refresh_api_key_hook).
            reload = conf.refresh_api_key_hook

            def keep_url(c: Any) -> None:
                if reload is not None:
                    reload(c)
                c.host = kube_api_url

            conf.refresh_api_key_hook = keep_url
            conf.host = kube_api_url
        return client.ApiClient(conf)
    conf = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=conf)
    except config.ConfigException as exc:
        if not kube_api_url:
            raise StoreError(
                f"not running in a pod ({exc}): give --kubeconfig-file or --kube-api-url"
            ) from None
    if kube_api_url:
        conf.host = kube_api_url
    return client.ApiClient(conf)


def raise_for(what: str, exc: Any) -> None:
    """Map an API error to the Store errors; return for the retryable ones."""
    try:
        status = json.loads(exc.body or "{}")
        message = status.get("message") or exc.reason
    except (ValueError, AttributeError):
        message = exc.reason
    code = exc.status
    if code in (401, 403):
        raise StoreError(f"{what}: {code} {message}; {RBAC_HINT}")
    if code == 404:
        raise NotFound(f"{what}: {message}")
    if code == 409:
        raise Conflict(f"{what}: {message}")
    if code == 410:
        raise Compacted(f"{what}: {message}")
    if code and code < 500 and code != 429:
        raise StoreError(f"{what}: {code} {message}")


def quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


class NodeApi:
    """The few core/v1 requests we make, through the official ApiClient's generic request path (auth,
    TLS, token refresh, ApiException). Not CoreV1Api: importing its module alone costs ~22 MB of RSS."""

    def __init__(self, api_client: Any, timeout: float, retry_for: float) -> None:
        from kubernetes.client.exceptions import ApiException

        self._client = api_client
        self._timeout = timeout
        self._retry_for = retry_for
        self.api_exception = ApiException

    def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, Any]] | None = None,
        body: Any = None,
        content_type: str | None = None,
        timeout: Any = None,
    ) -> Any:
        """The urllib3 response, body unread (streams stay streams); ApiException for a non-2xx answer."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        request = self._client.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self._client.call_api(*request, _request_timeout=timeout)
        if not 200 <= resp.status <= 299:
            resp.read()
            raise self.api_exception.from_response(http_resp=resp, body=None, data=None)
        return resp.response

    def list_nodes(self, **kwargs: Any) -> Any:
        """GET /api/v1/nodes in the shape kubernetes.watch.Watch.stream calls it (watch=True etc.)."""
        names = {"resource_version": "resourceVersion", "timeout_seconds": "timeoutSeconds"}
        names["allow_watch_bookmarks"] = "allowWatchBookmarks"
        query = []
        for key, value in sorted(kwargs.items()):
            if key.startswith("_"):
                continue
            query.append((names.get(key, key), str(value).lower() if isinstance(value, bool) else value))
        return self.request("GET", NODES, query=query, timeout=kwargs.get("_request_timeout"))

    def call(
        self, what: str, method: str, path: str, body: Any = None, content_type: str | None = None
    ) -> Any:
        """One API call as raw JSON, retried with backoff on transport errors and 5xx/429 for retry_for."""
        import urllib3

        deadline = time.monotonic() + self._retry_for
        delay = BACKOFF_START
        while True:
            try:
                resp = self.request(method, path, body=body, content_type=content_type, timeout=self._timeout)
                return json.loads(resp.data)
            except self.api_exception as exc:
                raise_for(what, exc)
                last = f"{exc.status} {exc.reason}"
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                last = str(exc)
            if time.monotonic() + delay > deadline:
                raise StoreError(f"Kubernetes API unreachable for {self._retry_for:.0f}s ({what}: {last})")
            log.info("kube: %s failed (%s); retrying in %.2fs", what, last, delay)
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def close(self) -> None:
        self._client.close()
