"""The etcd v3 lease store: flannel's key layout (`<prefix>/config`, `<prefix>/subnets/<key>`) over etcd's
grpc-gateway JSON API, through the etcd3gw client (imported only when an EtcdStore is built).

Expiry is etcd's: a lease key carries an etcd lease of the requested TTL and etcd deletes it; a key without an
etcd lease is a reservation. Every call retries across the endpoints with backoff while etcd is away.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from udpflannel.lease.etcd_wire import b64, flannel_value, parse_endpoint, prefix_end, unb64
from udpflannel.lease.model import (
    Event,
    EventType,
    IPv4Network,
    IPv6Network,
    Lease,
    LeaseAttrs,
    LeaseSnapshot,
    parse_subnet_key,
    subnet_key,
)
from udpflannel.lease.store import Compacted, Conflict, NotFound, StoreError

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/coreos.com/network"
# etcd >= 3.4 serves the gateway at /v3/ (3.3: /v3beta/); we support 3.4+ and skip the discovery round trip.
API_PATH = "/v3/"
BACKOFF_START = 0.05
BACKOFF_MAX = 1.0


class _AuthExpired(Exception):
    """The watch stream refused our auth token (simple tokens expire): log in again and reconnect."""


class EtcdStore:
    """Store protocol on etcd v3 (see udpflannel/lease/store.py for the contract of each method).

    `drops` counts records under the subnets prefix we could not read, by reason (bad_key, bad_value): a
    foreign or corrupt key is skipped, never fatal.
    """

    def __init__(
        self,
        endpoints: list[str],
        prefix: str = DEFAULT_PREFIX,
        cafile: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        username: str | None = None,
        password: str | None = None,
        *,
        request_timeout: float = 5.0,
        retry_for: float = 15.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not endpoints:
            raise ValueError("etcd store needs at least one endpoint")
        import etcd3gw  # lazily: only etcd mode pays for requests + etcd3gw

        self._etcd3gw = etcd3gw
        self._endpoints = list(endpoints)
        self._clients = []
        for url in self._endpoints:
            scheme, host, port = parse_endpoint(url)
            self._clients.append(
                etcd3gw.Etcd3Client(
                    host=host,
                    port=port,
                    protocol=scheme,
                    ca_cert=cafile,
                    cert_key=keyfile,
                    cert_cert=certfile,
                    timeout=request_timeout,
                    api_path=API_PATH,
                )
            )
        # requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override a session's CA file (psf/requests#3829):
        # --etcd-cafile is passed with every request instead.
        self._verify: dict[str, Any] = {"verify": cafile} if cafile else {}
        self._current = 0
        self._prefix = prefix.rstrip("/")
        self._subnets = f"{self._prefix}/subnets/"
        self._username = username
        self._password = password
        self._request_timeout = request_timeout
        self._retry_for = retry_for
        self._clock = clock
        self.drops: collections.Counter[str] = collections.Counter()

    # ---- transport ------------------------------------------------------------------------------------

    def _authenticate(self, client: Any) -> None:
        """etcd's gateway wants the token of /v3/auth/authenticate in the Authorization header."""
        client.session.headers.pop("Authorization", None)
        resp = client.post(
            client.get_url("auth/authenticate"),
            json={"name": self._username, "password": self._password},
            **self._verify,
        )
        client.session.headers["Authorization"] = resp["token"]

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One unary call, failing over between endpoints with backoff for up to retry_for seconds."""
        exc_mod = self._etcd3gw.exceptions
        deadline = time.monotonic() + self._retry_for
        delay = BACKOFF_START
        reauthed = False
        while True:
            client = self._clients[self._current]
            try:
                if self._username and "Authorization" not in client.session.headers:
                    self._authenticate(client)
                return client.post(client.get_url(path), json=payload, **self._verify)
            except (
                exc_mod.ConnectionFailedError,
                exc_mod.ConnectionTimeoutError,
                exc_mod.InternalServerError,  # leader changes, "request timed out": retry
            ) as exc:
                last = f"{self._endpoints[self._current]}: {exc.detail_text or exc}"
            except exc_mod.Etcd3Exception as exc:
                detail = exc.detail_text or str(exc)
                # Simple auth tokens expire after a few minutes of idleness: log in again once.
                if self._username and "token" in detail and not reauthed:
                    reauthed = True
                    client.session.headers.pop("Authorization", None)
                    continue
                raise StoreError(f"etcd {path} failed: {detail}") from None
            self._current = (self._current + 1) % len(self._clients)
            if time.monotonic() + delay > deadline:
                raise StoreError(
                    f"etcd unreachable for {self._retry_for:.0f}s ({last}); check --etcd-endpoints"
                )
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _grant(self, ttl: float) -> tuple[int, int]:
        resp = self._post("lease/grant", {"TTL": max(1, math.ceil(ttl)), "ID": 0})
        if resp.get("error"):
            raise StoreError(f"etcd refused a lease of {ttl}s: {resp['error']}")
        return int(resp["ID"]), int(resp["TTL"])

    def _revoke(self, lease_id: int) -> None:
        """Best effort: an unrevoked lease only lingers until its TTL runs out."""
        try:
            self._post("kv/lease/revoke", {"ID": lease_id})
        except StoreError as exc:
            log.debug("etcd: could not revoke lease %x: %s", lease_id, exc)

    def _expiration(self, lease_id: int, cache: dict[int, float] | None = None) -> float | None:
        """Unix time at which an etcd lease runs out (None for no lease: a reservation)."""
        if lease_id == 0:
            return None
        if cache is not None and lease_id in cache:
            return cache[lease_id]
        resp = self._post("kv/lease/timetolive", {"ID": lease_id})
        # TTL -1: the lease is gone and etcd is deleting its keys right now.
        expiration = self._clock() + max(0, int(resp.get("TTL", -1)))
        if cache is not None:
            cache[lease_id] = expiration
        return expiration

    def _range(self, key: str) -> dict[str, Any] | None:
        kvs = self._post("kv/range", {"key": b64(key)}).get("kvs") or []
        return kvs[0] if kvs else None

    def _txn(self, compare: dict[str, Any], success: dict[str, Any], key: str) -> dict[str, Any]:
        """A one-compare, one-op transaction whose failure branch reads the key (to tell NotFound from
        Conflict, and to recognise our own write when a retried request had in fact been applied)."""
        return self._post(
            "kv/txn",
            {"compare": [compare], "success": [success], "failure": [{"request_range": {"key": b64(key)}}]},
        )

    @staticmethod
    def _failure_kv(resp: dict[str, Any]) -> dict[str, Any] | None:
        for op in resp.get("responses") or []:
            kvs = (op.get("response_range") or {}).get("kvs") or []
            if kvs:
                return kvs[0]
        return None

    # ---- decoding -------------------------------------------------------------------------------------

    def _key(self, subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None) -> str:
        return self._subnets + subnet_key(subnet, ipv6_subnet)

    def _decode_key(self, raw_key: str) -> tuple[IPv4Network | None, IPv6Network | None] | None:
        key = unb64(raw_key).decode(errors="replace")
        try:
            return parse_subnet_key(key[len(self._subnets) :])
        except ValueError:
            self.drops["bad_key"] += 1
            log.warning("etcd: skipping %r: not a subnet key", key)
            return None

    def _decode_kv(
        self, kv: dict[str, Any], cache: dict[int, float] | None = None, *, timed: bool = True
    ) -> Lease | None:
        nets = self._decode_key(kv["key"])
        if nets is None:
            return None
        try:
            attrs = LeaseAttrs.loads(unb64(kv.get("value", "")))
        except ValueError as exc:
            self.drops["bad_value"] += 1
            log.warning("etcd: skipping %s: %s", subnet_key(*nets), exc)
            return None
        return Lease(
            subnet=nets[0],
            attrs=attrs,
            ipv6_subnet=nets[1],
            expiration=self._expiration(int(kv.get("lease", 0)), cache) if timed else None,
            revision=int(kv["mod_revision"]),
        )

    # ---- Store protocol -------------------------------------------------------------------------------

    def network_config(self) -> str | None:
        kv = self._range(f"{self._prefix}/config")
        return unb64(kv.get("value", "")).decode() if kv else None

    def assigned_subnets(self) -> tuple[IPv4Network | None, IPv6Network | None] | None:
        return None  # with etcd every node picks its own subnet

    def list(self) -> LeaseSnapshot:
        resp = self._post("kv/range", {"key": b64(self._subnets), "range_end": prefix_end(self._subnets)})
        cache: dict[int, float] = {}
        leases = [lease for kv in resp.get("kvs") or [] if (lease := self._decode_kv(kv, cache)) is not None]
        return LeaseSnapshot(leases=leases, revision=int(resp["header"]["revision"]))

    def create(
        self, subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs, ttl: float
    ) -> Lease:
        key = self._key(subnet, ipv6_subnet)
        lease_id, granted = self._grant(ttl)
        now = self._clock()
        resp = self._txn(
            {"key": b64(key), "result": "EQUAL", "target": "VERSION", "version": 0},
            {"request_put": {"key": b64(key), "value": b64(flannel_value(attrs)), "lease": lease_id}},
            key,
        )
        if resp.get("succeeded"):
            revision = int(resp["header"]["revision"])
        else:
            kv = self._failure_kv(resp)
            if kv is None or int(kv.get("lease", 0)) != lease_id:
                self._revoke(lease_id)
                raise Conflict(f"{key} is already taken")
            revision = int(kv["mod_revision"])  # our own put, applied by an attempt whose answer was lost
        return Lease(subnet, attrs, ipv6_subnet, expiration=now + granted, revision=revision)

    def reserve(
        self, subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs
    ) -> Lease:
        """A free key, or one held by the same PublicIP (its lease becomes a reservation), else Conflict."""
        key = self._key(subnet, ipv6_subnet)
        kv = self._range(key)
        put = {"request_put": {"key": b64(key), "value": b64(flannel_value(attrs))}}
        if kv is None:
            compare = {"key": b64(key), "result": "EQUAL", "target": "VERSION", "version": 0}
        else:
            try:
                holder = LeaseAttrs.loads(unb64(kv.get("value", ""))).public_ip
            except ValueError:
                holder = None
            if holder is None or holder != attrs.public_ip:
                raise Conflict(f"{key} is held by {holder}")
            compare = {
                "key": b64(key),
                "result": "EQUAL",
                "target": "MOD",
                "mod_revision": int(kv["mod_revision"]),
            }
        resp = self._txn(compare, put, key)
        if not resp.get("succeeded"):
            raise Conflict(f"{key} changed while reserving it")
        if kv is not None and int(kv.get("lease", 0)):
            self._revoke(int(kv["lease"]))  # detached by the put: the key no longer expires
        return Lease(subnet, attrs, ipv6_subnet, expiration=None, revision=int(resp["header"]["revision"]))

    def renew(self, lease: Lease, attrs: LeaseAttrs, ttl: float) -> Lease:
        key = self._subnets + lease.key
        kv = self._range(key)
        if kv is None:
            raise NotFound(f"{key} is gone")
        if int(kv["mod_revision"]) != lease.revision:
            raise Conflict(f"{key} changed since revision {lease.revision}")
        old_lease_id = int(kv.get("lease", 0))
        if old_lease_id == 0:
            # A reservation stays one, and only the node with its PublicIP may take it (flannel #1329).
            stored = LeaseAttrs.loads(unb64(kv.get("value", "")))
            if stored.public_ip != attrs.public_ip:
                raise Conflict(f"{key} is reserved for {stored.public_ip}")
            new_id, granted = 0, None
        else:
            # A fresh etcd lease (rather than a keepalive) lets the TTL change and keeps the CAS a single txn.
            new_id, granted = self._grant(ttl)
        now = self._clock()
        put: dict[str, Any] = {"key": b64(key), "value": b64(flannel_value(attrs))}
        if new_id:
            put["lease"] = new_id
        resp = self._txn(
            {"key": b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": lease.revision},
            {"request_put": put},
            key,
        )
        if resp.get("succeeded"):
            revision = int(resp["header"]["revision"])
        else:
            current = self._failure_kv(resp)
            if current is None or not new_id or int(current.get("lease", 0)) != new_id:
                if new_id:
                    self._revoke(new_id)
                if current is None:
                    raise NotFound(f"{key} is gone")
                raise Conflict(f"{key} changed since revision {lease.revision}")
            revision = int(current["mod_revision"])
        if old_lease_id:
            self._revoke(old_lease_id)  # detached from the key by the put, so this deletes nothing
        expiration = now + granted if granted is not None else None
        return Lease(lease.subnet, attrs, lease.ipv6_subnet, expiration=expiration, revision=revision)

    def delete(self, lease: Lease) -> None:
        key = self._subnets + lease.key
        resp = self._txn(
            {"key": b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": lease.revision},
            {"request_delete_range": {"key": b64(key), "prev_kv": True}},
            key,
        )
        if not resp.get("succeeded"):
            if self._failure_kv(resp) is None:
                raise NotFound(f"{key} is gone")
            raise Conflict(f"{key} changed since revision {lease.revision}")
        for op in resp.get("responses") or []:
            for prev in (op.get("response_delete_range") or {}).get("prev_kvs") or []:
                if int(prev.get("lease", 0)):
                    self._revoke(int(prev["lease"]))

    def watch(self, after: int, timeout: float) -> list[Event]:
        """Open a watch from revision after+1 and return the first batch of readable events; when etcd is
        away, keep reconnecting with backoff until the timeout (etcd keeps history, so nothing is lost)."""
        deadline = time.monotonic() + timeout
        delay = BACKOFF_START
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            events = self._watch_once(after, remaining)
            if events is not None:
                return events
            self._current = (self._current + 1) % len(self._clients)
            time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 2, BACKOFF_MAX)

    def _watch_once(self, after: int, remaining: float) -> list[Event] | None:
        """[] on timeout, the events, or None when the connection failed or ended early (retry)."""
        import requests  # etcd3gw's transport; already imported with it

        client = self._clients[self._current]
        request = {
            "create_request": {
                "key": b64(self._subnets),
                "range_end": prefix_end(self._subnets),
                "start_revision": after + 1,
                "prev_kv": True,
            }
        }
        started = time.monotonic()
        try:
            if self._username and "Authorization" not in client.session.headers:
                self._authenticate(client)
            resp = client.session.post(
                client.get_url("watch"),
                json=request,
                stream=True,
                timeout=(min(remaining, self._request_timeout), remaining),
                **self._verify,
            )
        except (requests.RequestException, self._etcd3gw.exceptions.Etcd3Exception) as exc:
            log.info("etcd watch: %s unreachable (%s); retrying", self._endpoints[self._current], exc)
            return None
        try:
            if resp.status_code != 200:
                body = resp.text[:300]
                if self._username and "token" in body:
                    client.session.headers.pop("Authorization", None)  # expired: log in again, retry
                    return None
                if resp.status_code >= 500:
                    log.info("etcd watch: HTTP %d (%s); retrying", resp.status_code, body)
                    return None
                raise StoreError(f"etcd watch failed: HTTP {resp.status_code}: {body}")
            for line in resp.iter_lines():
                if not line.strip():
                    continue
                events = self._watch_message(line, after)
                if events:
                    return events
        except _AuthExpired:
            client.session.headers.pop("Authorization", None)
            return None
        except requests.RequestException as exc:
            # requests reports a read timeout inside a stream as a ConnectionError: tell them apart by time.
            if time.monotonic() - started >= remaining - 0.01:
                return []
            log.info("etcd watch: connection lost (%s); reconnecting", exc)
            return None
        finally:
            resp.close()
        return None  # the server ended the stream (etcd stopping): reconnect

    def _watch_message(self, line: bytes, after: int) -> list[Event]:
        try:
            msg = json.loads(line)
        except ValueError:
            self.drops["bad_watch_message"] += 1
            return []
        if "error" in msg:
            err = msg["error"]
            text = str(err.get("message", err) if isinstance(err, dict) else err)
            if self._username and "token" in text:
                raise _AuthExpired(text)
            raise StoreError(f"etcd watch failed: {text}")
        result = msg.get("result") or {}
        if int(result.get("compact_revision", 0)):
            raise Compacted(
                f"etcd compacted history up to {result['compact_revision']}; asked for {after + 1}"
            )
        if result.get("canceled"):
            reason = str(result.get("cancel_reason", "no reason given"))
            if self._username and "token" in reason:
                raise _AuthExpired(reason)
            raise StoreError(f"etcd canceled the watch: {reason}")
        events: list[Event] = []
        cache: dict[int, float] = {}
        for raw in result.get("events") or []:
            kv = raw.get("kv") or {}
            if raw.get("type") == "DELETE":
                nets = self._decode_key(kv.get("key", ""))
                if nets is None:
                    continue
                prev = raw.get("prev_kv")
                old = self._decode_kv(prev, timed=False) if prev else None
                lease = Lease(
                    nets[0],
                    old.attrs if old else LeaseAttrs(),
                    nets[1],
                    expiration=None,
                    revision=int(kv["mod_revision"]),
                )
                events.append(Event(EventType.REMOVED, lease, lease.revision))
            else:
                added = self._decode_kv(kv, cache)
                if added is not None:
                    events.append(Event(EventType.ADDED, added, added.revision))
        return events

    def compact(self, revision: int) -> None:
        """Drop history before `revision` (what an operator's `etcdctl compact` does); watches from older
        revisions then raise Compacted."""
        self._post("kv/compaction", {"revision": revision, "physical": True})

    def close(self) -> None:
        for client in self._clients:
            client.session.close()
