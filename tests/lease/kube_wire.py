"""Wire pieces of the Kubernetes API double (kube_double.py): v1 Status objects, strategic-merge and
JSON-merge patches of Node objects, and the validation errors recorded in testdata/kube/ (10b, 10c)."""

from __future__ import annotations

import base64
import copy
import json
import re
import time
from typing import Any

NODES = "/api/v1/nodes"
POD_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)$")
NODE_PATH = re.compile(r"^/api/v1/nodes/([^/]+)(/status)?$")
SMP = "application/strategic-merge-patch+json"
MERGE_PATCH = "application/merge-patch+json"
# Strategic-merge metadata of core/v1 Node that we use (k8s.io/api/core/v1 types.go patchMergeKey tags).
MERGE_KEYS: dict[tuple[str, ...], str] = {("status", "conditions"): "type", ("status", "addresses"): "type"}
SCALAR_MERGE_LISTS = {("spec", "podCIDRs")}
# Annotation keys: an optional DNS-subdomain prefix and a name part (apimachinery validation.IsQualifiedName).
NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
NAME_PART_MSG = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
    "alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is "
    "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
DEFAULT_NODE_STATUS: dict[str, Any] = {
    "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
    "nodeInfo": {
        k: ""
        for k in [
            "machineID",
            "systemUUID",
            "bootID",
            "kernelVersion",
            "osImage",
            "containerRuntimeVersion",
            "kubeletVersion",
            "kubeProxyVersion",
            "operatingSystem",
            "architecture",
        ]
    },
}
NOT_READY_TAINT = {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}
CONTINUE_EXPIRED = (
    "The provided continue parameter is too old to display a consistent list result. You can start a new "
    "list without the continue parameter, or use the continue token in this response to retrieve the "
    "remainder of the results. Continuing with the provided token results in an inconsistent list - objects "
    "that were created, modified, or deleted between the time the first chunk was returned and now may show "
    "up in the list."
)
VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


class ApiError(Exception):
    """Becomes a v1 Status response."""

    def __init__(
        self, code: int, reason: str, message: str, details: dict | None = None, meta: dict | None = None
    ):
        super().__init__(message)
        self.status = status_object(code, reason, message, details, meta)


def status_object(
    code: int, reason: str, message: str, details: dict | None = None, meta: dict | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": meta or {}, "status": "Failure"}
    out["message"] = message
    out["reason"] = reason
    if details is not None:
        out["details"] = details
    out["code"] = code
    return out


def timestamp(now: float | None = None) -> str:
    """The API's second-precision RFC 3339 form."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now if now is not None else time.time()))


def strategic_merge(orig: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    """Strategic merge patch for the Node fields we use: maps merge (null deletes), conditions/addresses merge
    by type (new entries first, as in 05b), podCIDRs merge as a set of scalars (patch first, 10c)."""
    if not isinstance(patch, dict) or not isinstance(orig, dict) or patch.get("$patch") == "replace":
        if isinstance(patch, dict):
            patch = {k: v for k, v in patch.items() if k != "$patch"}
        return copy.deepcopy(patch)
    out = copy.deepcopy(orig)
    for key, value in patch.items():
        if key.startswith("$"):  # $setElementOrder/... and friends: ordering hints we do not model
            continue
        sub = (*path, key)
        current = out.get(key)
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            # A map the original lacks is merged into an empty one, so nulls and directives never get stored.
            out[key] = strategic_merge(current if isinstance(current, dict) else {}, value, sub)
        elif isinstance(value, list) and isinstance(current, list) and sub in MERGE_KEYS:
            out[key] = _merge_keyed_list(current, value, MERGE_KEYS[sub])
        elif isinstance(value, list) and isinstance(current, list) and sub in SCALAR_MERGE_LISTS:
            out[key] = copy.deepcopy(value) + [x for x in current if x not in value]
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_keyed_list(orig: list, patch: list, key: str) -> list:
    index = {item.get(key): i for i, item in enumerate(orig) if isinstance(item, dict)}
    merged = copy.deepcopy(orig)
    added, deleted = [], set()
    for item in patch:
        if not isinstance(item, dict):
            raise ApiError(400, "BadRequest", f"merge list items must be objects with {key!r}")
        if item.get("$patch") == "delete":
            deleted.add(item.get(key))
        elif item.get(key) in index:
            merged[index[item[key]]] = strategic_merge(merged[index[item[key]]], item)
        else:
            added.append(copy.deepcopy(item))
    return added + [x for x in merged if not (isinstance(x, dict) and x.get(key) in deleted)]


def json_merge(orig: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(orig) if isinstance(orig, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = json_merge(out.get(key), value)
    return out


def pod_cidrs(node: dict) -> list[str]:
    spec = node.get("spec") or {}
    return list(spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []))


def continue_token(rv: int, start: str) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start}, separators=(",", ":"))
    return base64.b64encode(raw.encode()).decode().rstrip("=")


def validate_node(name: str, old: dict, new: dict, main_resource: bool) -> None:
    """The checks of 10b (annotation/label keys) and 10c (podCIDR set once) as a 422 Invalid."""
    causes = []
    for key in (new["metadata"].get("annotations") or {}) | (new["metadata"].get("labels") or {}):
        prefix, _, part = key.rpartition("/")
        if not NAME_PART.match(part) or len(part) > 63 or (prefix and len(prefix) > 253):
            causes.append(
                {"reason": "FieldValueInvalid", "message": f'Invalid value: "{key}": {NAME_PART_MSG}',
                 "field": "metadata.annotations"}
            )  # fmt: skip
    if main_resource:
        before, after = pod_cidrs(old), pod_cidrs(new)
        if before and after != before:
            if len({c.count(":") > 0 for c in after}) < len(after):
                causes.append(
                    {"reason": "FieldValueInvalid", "field": "spec.podCIDRs",
                     "message": f"Invalid value: {json.dumps(after, separators=(',', ':'))}: "
                                "may specify no more than one CIDR for each IP family"}
                )  # fmt: skip
            causes.append(
                {"reason": "FieldValueForbidden", "field": "spec.podCIDRs",
                 "message": 'Forbidden: node updates may not change podCIDR except from "" to valid'}
            )  # fmt: skip
    if causes:
        unique = list(dict.fromkeys(f"{c['field']}: {c['message']}" for c in causes))
        summary = unique[0] if len(unique) == 1 else "[" + ", ".join(unique) + "]"
        raise ApiError(
            422,
            "Invalid",
            f'Node "{name}" is invalid: {summary}',
            {"name": name, "kind": "Node", "causes": causes},
        )


def write_self_signed_cert(directory: str, host: str) -> tuple[str, str]:
    """A throwaway CA-less certificate for IP address `host` (the double's HTTPS); returns (cert.pem,
    key.pem)."""
    import datetime
    import ipaddress
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver-double")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return cert_path, key_path
