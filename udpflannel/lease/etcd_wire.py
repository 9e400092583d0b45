"""The bytes on the wire to etcd: endpoint URLs, the grpc-gateway's base64 keys and ranges, and lease
values written byte for byte as flanneld writes them."""

from __future__ import annotations

import base64
import json
import re
import urllib.parse

from udpflannel.lease.model import LeaseAttrs


def b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def unb64(data: str) -> bytes:
    return base64.b64decode(data)


def flannel_value(attrs: LeaseAttrs) -> str:
    """A lease value byte for byte as flanneld writes it: Go marshals LeaseAttrs.PublicIPv6 (an *ip.IP6
    without omitempty) as null when unset, right after PublicIP (spec/flannel.md, etcd v3 layout)."""
    obj = attrs.to_json()
    ordered = {"PublicIP": obj.pop("PublicIP"), "PublicIPv6": obj.pop("PublicIPv6", None), **obj}
    return json.dumps(ordered, separators=(",", ":"))


def prefix_end(prefix: str) -> str:
    """etcd's range_end for "every key starting with prefix": the prefix with its last byte incremented."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return b64(bytes(raw))


# A DNS name, an IPv4 address or an IPv6 address (urlsplit has taken the brackets off).
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.%A-Za-z]*")


def parse_endpoint(url: str) -> tuple[str, str, int]:
    """An --etcd-endpoints entry as (scheme, host, port): http(s)://host[:port], or host[:port] (http);
    the port defaults to 2379. ValueError, saying what is expected, for anything else."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    try:
        port = parts.port  # ValueError when not a number or over 65535
    except ValueError:
        port = -1
    if (
        parts.scheme not in ("http", "https")
        or not _HOST.fullmatch(parts.hostname or "")
        or port == -1
        or port == 0
    ):
        raise ValueError(f"etcd endpoint {url!r} is not http(s)://host:port, e.g. http://198.18.0.1:2379")
    return parts.scheme, parts.hostname, port or 2379
