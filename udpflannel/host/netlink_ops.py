"""The netlink child of host/netlink.py: reads one JSON request a line from stdin, runs it with pyroute2,
writes one JSON answer a line ({"ok": result} or {"error": message, "code": errno}) to stdout.

Results are plain data; the meaning (what to record, what to undo, which error to raise) stays with the
callers in host/links.py and host/iface.py.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import sys
import time
from collections.abc import Callable
from typing import Any

IFA_F_NODAD = 0x02  # linux/if_addr.h
RTNH_F_ONLINK = 4  # as flanneld's `via <subnet>.0 onlink`
RTN_BLACKHOLE = 6  # linux/rtnetlink.h
BLACKHOLE_METRIC = 65535  # --ip-blackhole-route: the last resort for our pod subnet, never in a route's way
AF_INET, AF_INET6 = 2, 10


class NoSuchLink(LookupError):
    code = errno.ENODEV


def interfaces(ipr: Any) -> dict[str, Any]:
    """Every link with its IPv4 and global IPv6 addresses, and the link of the default route."""
    addrs: dict[int, tuple[list[str], list[str]]] = {}
    for a in ipr.get_addr():
        v4, v6 = addrs.setdefault(a["index"], ([], []))
        ip = a.get_attr("IFA_ADDRESS")
        if a["family"] == AF_INET:
            v4.append(ip)
        elif not ipaddress.IPv6Address(ip).is_link_local:
            v6.append(ip)
    links = []
    for link in ipr.get_links():
        v4, v6 = addrs.get(link["index"], ([], []))
        links.append([link["index"], link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_MTU"), v4, v6])
    return {"links": links, "default_oif": _default_oif(ipr)}


def _default_oif(ipr: Any) -> int | None:
    for family in (AF_INET, AF_INET6):
        for r in ipr.get_default_routes(family=family):
            oif = r.get_attr("RTA_OIF")
            if oif:
                return int(oif)
    return None


def route_via(ipr: Any, dst: str) -> dict[str, Any]:
    """How the kernel reaches `dst`: {"oif": link index, "gateway": address or None}; {} without a route."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        routes = ipr.route("get", dst=dst)
    except NetlinkError:
        return {}
    if not routes:
        return {}
    return {"oif": routes[0].get_attr("RTA_OIF"), "gateway": routes[0].get_attr("RTA_GATEWAY")}


def link_index(ipr: Any, name: str, wait: float = 0.0) -> int:
    """Index of link `name`, waiting up to `wait` seconds for it to appear (a TUN a worker opens)."""
    deadline = time.monotonic() + wait
    while True:
        found = ipr.link_lookup(ifname=name)
        if found:
            return int(found[0])
        if time.monotonic() >= deadline:
            raise NoSuchLink(f"link {name} does not exist")
        time.sleep(0.02)


def link_mtu(ipr: Any, name: str) -> int:
    return int(ipr.get_links(link_index(ipr, name))[0].get_attr("IFLA_MTU"))


def set_link(ipr: Any, name: str, attrs: dict[str, int], up: bool) -> None:
    """MTU and queue length (attrs), then the state."""
    idx = link_index(ipr, name)
    if attrs:
        ipr.link("set", index=idx, **attrs)
    ipr.link("set", index=idx, state="up" if up else "down")


def address(ipr: Any, cmd: str, name: str, cidr: str) -> None:
    """cmd "add" or "del" one address; IPv6 without duplicate address detection (a point-to-point TUN:
    a tentative address cannot be a route's preferred source, and nothing else can own it)."""
    iface = ipaddress.ip_interface(cidr)
    extra = {"flags": IFA_F_NODAD} if cmd == "add" and iface.version == 6 else {}
    idx = link_index(ipr, name)
    ipr.addr(cmd, index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen, **extra)


def route(ipr: Any, cmd: str, dst: str, dev: str, gateway: str | None, onlink: bool, src: str | None) -> None:
    """cmd "replace" or "del" the route to `dst` through `dev`."""
    net = ipaddress.ip_network(dst)
    args: dict[str, Any] = {
        "dst": str(net),
        "oif": link_index(ipr, dev),
        "family": AF_INET6 if net.version == 6 else AF_INET,
    }
    if gateway:
        args["gateway"] = gateway
    if onlink:
        args["flags"] = RTNH_F_ONLINK
    if src:
        args["prefsrc"] = src
    ipr.route(cmd, **args)


def blackhole(ipr: Any, cmd: str, dst: str) -> None:
    """cmd "add" (never "replace": that could swap out a bridge's connected route) or "del" a blackhole
    route, at a metric below every real route to the prefix (a cni0 bridge's connected route still wins)."""
    net = ipaddress.ip_network(dst)
    family = AF_INET6 if net.version == 6 else AF_INET
    ipr.route(cmd, dst=str(net), type=RTN_BLACKHOLE, priority=BLACKHOLE_METRIC, family=family)


OPS: dict[str, Callable[..., Any]] = {
    f.__name__: f for f in (interfaces, route_via, link_index, link_mtu, set_link, address, route, blackhole)
}


def serve(ipr: Any, requests: Any, answers: Any) -> None:
    for line in requests:
        req = json.loads(line)
        try:
            answer = {"ok": OPS[req["op"]](ipr, **req["args"])}
        except Exception as exc:  # every failure goes back to the caller, who names what it was doing
            code = getattr(exc, "code", None)
            answer = {"error": str(exc), "code": code if isinstance(code, int) else None}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def main() -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        serve(ipr, sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
