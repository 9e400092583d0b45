"""Choose the underlay interface and public IP the way flanneld does (--iface, --iface-regex,
--iface-can-reach, --public-ip, else the interface holding the default route)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from udpflannel.backend import ExternalInterface
from udpflannel.host.netlink import Netlink, NetlinkError


class InterfaceError(RuntimeError):
    """No usable interface; the message names what was looked for and the flag that fixes it."""


@dataclass(frozen=True, slots=True)
class _Link:
    index: int
    name: str
    mtu: int
    v4: tuple[str, ...]
    v6: tuple[str, ...]  # global addresses only


def _links(netlink: Netlink) -> tuple[list[_Link], int | None]:
    """Every link with its addresses, and the index of the default route's link."""
    found = netlink.call("interfaces")
    links = [_Link(idx, name, mtu, tuple(v4), tuple(v6)) for idx, name, mtu, v4, v6 in found["links"]]
    return links, found["default_oif"]


def _matches(link: _Link, spec: str) -> bool:
    return spec == link.name or spec in link.v4 or spec in link.v6


def select_interface(
    iface: Sequence[str] = (),
    iface_regex: Sequence[str] = (),
    iface_can_reach: str = "",
    public_ip: str = "",
    public_ipv6: str = "",
    *,
    want_ipv4: bool = True,
    want_ipv6: bool = False,
) -> ExternalInterface:
    """Pick the underlay interface; raise InterfaceError with a one-line explanation when none fits."""
    if iface_can_reach:
        try:
            ipaddress.ip_address(iface_can_reach)
        except ValueError:
            raise InterfaceError(f"--iface-can-reach {iface_can_reach} is not an IP address") from None
    try:
        with Netlink() as netlink:
            every, default_oif = _links(netlink)
            reach = netlink.call("route_via", dst=iface_can_reach) if iface_can_reach else {}
            reach_oif = reach.get("oif") if isinstance(reach, dict) else None
    except NetlinkError as exc:
        raise InterfaceError(f"cannot read this host's interfaces over netlink: {exc}") from None
    links = [link for link in every if link.name != "lo"]
    chosen: _Link | None = None
    if iface:
        for spec in iface:
            chosen = next((link for link in links if _matches(link, spec)), None)
            if chosen:
                break
        if chosen is None:
            raise InterfaceError(
                f"no interface matches --iface {','.join(iface)}: name an existing interface or IP"
            )
    elif iface_regex:
        for pattern in iface_regex:
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise InterfaceError(f"--iface-regex {pattern!r} is not a valid regex: {exc}") from None
            chosen = next(
                (
                    link
                    for link in links
                    if rx.search(link.name) or any(rx.search(a) for a in link.v4 + link.v6)
                ),
                None,
            )
            if chosen:
                break
        if chosen is None:
            raise InterfaceError(f"no interface matches --iface-regex {','.join(iface_regex)}")
    elif iface_can_reach:
        chosen = next((link for link in links if link.index == reach_oif), None)
        if chosen is None:
            raise InterfaceError(
                f"no route to --iface-can-reach {iface_can_reach}: add a route or use --iface"
            )
    else:
        chosen = next((link for link in links if link.index == default_oif), None)
        if chosen is None:
            raise InterfaceError("no default route to pick the interface from: pass --iface NAME (or an IP)")

    address = chosen.v4[0] if chosen.v4 else None
    address_v6 = chosen.v6[0] if chosen.v6 else None
    pub = public_ip or address
    pub6 = public_ipv6 or address_v6
    if want_ipv4 and not pub:
        raise InterfaceError(f"interface {chosen.name} has no IPv4 address: add one or pass --public-ip")
    if want_ipv6 and not pub6:
        raise InterfaceError(
            f"interface {chosen.name} has no global IPv6 address: add one or pass --public-ipv6"
        )
    return ExternalInterface(
        name=chosen.name,
        index=chosen.index,
        mtu=chosen.mtu,
        address=address,
        address_v6=address_v6,
        public_ip=pub if want_ipv4 else None,
        public_ipv6=pub6 if want_ipv6 else None,
    )
