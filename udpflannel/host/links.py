"""Links, addresses and routes of the namespace the agent runs in, via pyroute2; every change is recorded so
undo() removes exactly what we added and nothing else (the TUN itself vanishes with the worker's fd).

Backends decide what the host needs; this module only applies it. No iptables here.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

IFA_F_NODAD = 0x02  # linux/if_addr.h


class HostError(RuntimeError):
    """A netlink change failed; the message names the object and the kernel's error."""


@dataclass(frozen=True, slots=True)
class Route:
    dst: str  # CIDR
    dev: str
    gateway: str | None = None
    onlink: bool = False
    src: str | None = None


@dataclass
class HostConfig:
    """Applies link/address/route changes and remembers them for undo()."""

    _addresses: list[tuple[str, str]] = field(default_factory=list)
    _routes: list[Route] = field(default_factory=list)
    _ipr: Any = None

    def _ip(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute  # heavy import: control plane only, after the workers are forked

            self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def link_index(self, name: str, wait: float = 0.0) -> int:
        """Index of link `name`; waits up to `wait` seconds for it to appear (a TUN opened by a worker)."""
        deadline = time.monotonic() + wait
        while True:
            found = self._ip().link_lookup(ifname=name)
            if found:
                return int(found[0])
            if time.monotonic() >= deadline:
                raise HostError(f"link {name} does not exist")
            time.sleep(0.02)

    def link_mtu(self, name: str) -> int:
        link = self._ip().get_links(self.link_index(name))[0]
        return int(link.get_attr("IFLA_MTU"))

    def set_link(
        self,
        name: str,
        *,
        mtu: int | None = None,
        up: bool = True,
        txqlen: int | None = None,
        gso_max_size: int | None = None,
    ) -> None:
        """MTU, queue length and state; gso_max_size caps TUN superpackets (best effort on old kernels)."""
        kwargs: dict[str, Any] = {}
        if mtu is not None:
            kwargs["mtu"] = mtu
        if txqlen is not None:
            kwargs["txqlen"] = txqlen
        idx = self.link_index(name)
        try:
            if kwargs:
                self._ip().link("set", index=idx, **kwargs)
            if gso_max_size is not None:
                try:
                    self._ip().link("set", index=idx, gso_max_size=gso_max_size)
                except Exception as exc:  # old kernels: superpackets are then sent in chunks
                    log.info("gso_max_size not set on %s: %s", name, exc)
            self._ip().link("set", index=idx, state="up" if up else "down")
        except Exception as exc:  # pyroute2 raises NetlinkError; keep the message, name the link
            raise HostError(f"setting link {name} {kwargs} up={up}: {exc}") from exc

    def no_link_local(self, name: str) -> None:
        """No IPv6 link-local address on `name` (addr_gen_mode none), so the kernel sends no router
        solicitations or MLD reports into a tunnel that has no use for them. Set before the link goes up;
        harmless where IPv6 is disabled."""
        path = f"/proc/sys/net/ipv6/conf/{name}/addr_gen_mode"
        try:
            with open(path, "w") as f:
                f.write("1\n")
        except OSError as exc:
            log.info("could not turn off IPv6 link-local on %s: %s", name, exc)

    def add_address(self, dev: str, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        idx = self.link_index(dev)
        extra: dict[str, Any] = {}
        if iface.version == 6:
            # No duplicate address detection on a point-to-point TUN: a tentative address cannot be a route's
            # preferred source (EINVAL), and nothing else can own it.
            extra["flags"] = IFA_F_NODAD
        try:
            self._ip().addr(
                "add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen, **extra
            )
        except Exception as exc:
            if getattr(exc, "code", None) != errno.EEXIST:
                raise HostError(f"adding address {cidr} to {dev}: {exc}") from exc
            return  # already there (a restart): not ours to remove later
        self._addresses.append((dev, cidr))

    def add_route(self, route: Route) -> None:
        try:
            self._ip().route("replace", **self._route_args(route))
        except Exception as exc:
            raise HostError(f"adding route {route}: {exc}") from exc
        if route not in self._routes:
            self._routes.append(route)

    def del_route(self, route: Route) -> None:
        try:
            self._ip().route("del", **self._route_args(route))
        except Exception as exc:
            if getattr(exc, "code", None) not in (errno.ESRCH, errno.ENODEV, errno.ENOENT):
                raise HostError(f"removing route {route}: {exc}") from exc
        if route in self._routes:
            self._routes.remove(route)

    def _route_args(self, route: Route) -> dict[str, Any]:
        net = ipaddress.ip_network(route.dst)
        args: dict[str, Any] = {
            "dst": str(net),
            "oif": self.link_index(route.dev),
            "family": 10 if net.version == 6 else 2,
        }
        if route.gateway:
            args["gateway"] = route.gateway
        if route.onlink:
            args["flags"] = 4  # RTNH_F_ONLINK, as flanneld's `via <subnet>.0 onlink`
        if route.src:
            args["prefsrc"] = route.src
        return args

    def undo(self) -> None:
        """Remove every route and address we added, newest first; a link that is already gone is fine."""
        for route in reversed(list(self._routes)):
            try:
                self.del_route(route)
            except HostError:
                self._routes.remove(route)
        for dev, cidr in reversed(self._addresses):
            iface = ipaddress.ip_interface(cidr)
            try:
                idx = self.link_index(dev)
                self._ip().addr("del", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            except Exception:  # the link went away with its addresses: nothing left to remove
                pass
        self._addresses.clear()
        self.close()
