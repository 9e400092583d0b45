"""net-conf.json: parsing, defaults and validation by flannel's rules (pkg/subnet/config.go, spec/flannel.md).

Three steps, kept apart (flannel's CheckNetworkConfig fills defaults and validates in one call):
parse_raw (JSON -> RawNetConf, types checked) -> apply_defaults (fills what flannel derives) -> validate
(-> NetworkConfig, or ConfigError with a one-line message naming the field and the fix). No I/O except
load_net_conf, which reads the file.

Keys match case-insensitively, as Go's encoding/json does, and unknown keys are ignored. Where flannel takes a
JSON null or a zero (SubnetLen 0, SubnetMin "0.0.0.0", Port 0, MTU 0) as "not set", so do we.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import json
import os
from dataclasses import dataclass, field
from typing import Any

from udpflannel.subnet import backend_overhead

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network
IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address

BACKEND_TYPES = ("host-gw", "udp", "vxlan", "wireguard")
DEFAULT_BACKEND_TYPE = "udp"  # flannel's parseBackendType: no Backend object means udp
WIREGUARD_MODES = ("separate", "auto", "ipv4", "ipv6")
VNI_MAX = (1 << 24) - 1
MIN_INNER_MTU_V4 = 68  # RFC 791: every IPv4 link must carry 68 bytes
MIN_INNER_MTU_V6 = 1280  # RFC 8200 section 5
WG_KEY_LEN = 32


@dataclass(frozen=True)
class _Family:
    """flannel's CheckNetworkConfig constants and names for one address family (no v4/v6 copies of code)."""

    attr: str  # RawNetConf/NetworkConfig field prefix: "" or "ipv6_"
    names: tuple[str, ...]  # Network, SubnetLen, SubnetMin, SubnetMax as spelled in net-conf
    version: int
    bits: int
    longest: int  # longest SubnetLen: a subnet must hold a tunnel and a bridge address
    default: int  # default SubnetLen when the network holds at least 4 of them
    longest_network: int  # longest Network prefix flannel can split into 4
    example: str


_V4_NAMES = ("Network", "SubnetLen", "SubnetMin", "SubnetMax")
_V6_NAMES = ("IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax")
_V4 = _Family("", _V4_NAMES, 4, 32, 30, 24, 28, '"198.19.0.0/16"')
_V6 = _Family("ipv6_", _V6_NAMES, 6, 128, 126, 64, 124, '"fd00:198::/48"')
_FAMILIES = (_V4, _V6)
_TOP_FIELDS = ("EnableIPv4", "EnableIPv6", "EnableNFTables", "Backend", *_V4.names, *_V6.names)


class ConfigError(ValueError):
    """net-conf is unusable; the one-line message names the field and says how to fix it."""


@dataclass(frozen=True)
class BackendConfig:
    """The Backend object of net-conf. Options of other backend types are ignored, as flannel does."""

    type: str = DEFAULT_BACKEND_TYPE
    vni: int = 1
    port: int | None = None  # None: the backend's default (vxlan 8472, udp 8285)
    mtu: int | None = None  # None: the underlay interface's MTU
    direct_routing: bool = False
    listen_port: int = 51820
    listen_port_v6: int = 51821
    psk: str | None = None  # base64 of 32 bytes
    persistent_keepalive_interval: int = 0  # seconds, 0 = off
    mode: str = "separate"
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class NetworkConfig:
    """A validated net-conf. Fields of a disabled family are None (lengths 0).

    subnet_min/subnet_max are the first and last allocatable subnets, as networks of length subnet_len.
    In Kubernetes mode the allocation fields are filled when flannel's defaults allow and never checked
    (flannel does not run CheckNetworkConfig there: the node's podCIDR is the subnet).
    """

    enable_ipv4: bool
    enable_ipv6: bool
    network: IPv4Network | None
    subnet_len: int
    subnet_min: IPv4Network | None
    subnet_max: IPv4Network | None
    ipv6_network: IPv6Network | None
    ipv6_subnet_len: int
    ipv6_subnet_min: IPv6Network | None
    ipv6_subnet_max: IPv6Network | None
    enable_nftables: bool
    backend: BackendConfig


@dataclass(frozen=True)
class RawNetConf:
    """net-conf as written, types checked, nothing derived. None means "not set" (missing, null or zero)."""

    enable_ipv4: bool = True
    enable_ipv6: bool = False
    network: IPv4Network | None = None
    subnet_len: int | None = None
    subnet_min: IPv4Address | None = None
    subnet_max: IPv4Address | None = None
    ipv6_network: IPv6Network | None = None
    ipv6_subnet_len: int | None = None
    ipv6_subnet_min: IPv6Address | None = None
    ipv6_subnet_max: IPv6Address | None = None
    enable_nftables: bool = False
    backend: dict[str, Any] | None = None


# --- step 1: parse --------------------------------------------------------------------------------------


def _fold(key: str) -> str:
    """Go's encoding/json matches keys with Unicode simple case folding. The only non-ASCII runes that fold
    to ASCII letters are LONG S (s) and KELVIN SIGN (k, which str.lower already maps); dotless i does not."""
    return key.translate(_LONG_S).lower()


_LONG_S = {0x017F: "s"}


class _Object(dict):
    """A JSON object that remembers its key order with duplicates (Go: the last duplicate wins)."""

    pairs: list[tuple[str, Any]]


def _object_hook(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    obj.pairs = pairs
    return obj


def _fields(obj: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The values of the known fields `names` (by folded key; last one wins); unknown keys are dropped."""
    wanted = {_fold(n): n for n in names}
    pairs = obj.pairs if isinstance(obj, _Object) else list(obj.items())
    out: dict[str, Any] = {}
    for key, value in pairs:
        name = wanted.get(_fold(key))
        if name is not None:
            out[name] = value
    return out


def _describe(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, dict | list) else type(value).__name__


def _get_bool(where: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"net-conf: {where} must be true or false, got {_describe(value)}")
    return value


def _get_int(where: str, value: Any, *, example: str = "24") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"net-conf: {where} must be a whole number like {example}, got {_describe(value)}")
    return value


def _get_str(where: str, value: Any, example: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"net-conf: {where} must be a string like {example}, got {_describe(value)}")
    return value


def _parse_cidr(where: str, value: Any, version: int) -> IPv4Network | IPv6Network | None:
    example = '"198.19.0.0/16"' if version == 4 else '"fd00:198::/48"'
    text = _get_str(where, value, example)
    if text is None:
        return None
    addr, sep, plen = text.partition("/")
    try:
        if not sep or not plen.isdigit():
            raise ValueError(text)
        # Go's net.ParseCIDR masks the host bits (10.1.2.3/16 -> 10.1.0.0/16): so do we.
        net = ipaddress.ip_network(f"{addr}/{int(plen)}", strict=False)
    except ValueError:
        net = None
    if net is None or net.version != version:
        raise ConfigError(
            f"net-conf: {where} {text!r} is not an IPv{version} CIDR: use a value like {example}"
        )
    # flannel's IP4Net.Empty(): 0.0.0.0/0 (and ::/0) reads as "no network"
    return None if net.prefixlen == 0 and int(net.network_address) == 0 else net


def _parse_addr(where: str, value: Any, version: int) -> IPv4Address | IPv6Address | None:
    example = '"198.19.1.0"' if version == 4 else '"fd00:198:0:1::"'
    text = _get_str(where, value, example)
    if text is None:
        return None
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        addr = None
    if version == 4 and isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # Go's ParseIP + To4 accepts ::ffff:a.b.c.d
    if addr is None or addr.version != version:
        raise ConfigError(
            f"net-conf: {where} {text!r} is not an IPv{version} address: use a value like {example}"
        )
    # flannel reads the zero address as "not set"
    return None if int(addr) == 0 else addr


def parse_raw(text: str | bytes) -> RawNetConf:
    """JSON text -> RawNetConf. Checks JSON syntax and field types; derives nothing."""
    try:
        obj = json.loads(text, object_pairs_hook=_object_hook)
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"net-conf: not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8"
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"net-conf: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): fix the syntax"
        ) from None
    if not isinstance(obj, dict):
        raise ConfigError(
            f'net-conf: must be a JSON object like {{"Network": "198.19.0.0/16"}}, got {type(obj).__name__}'
        )
    f = _fields(obj, _TOP_FIELDS)
    backend = f.get("Backend")
    if backend is not None and not isinstance(backend, dict):
        raise ConfigError(
            f'net-conf: Backend must be an object like {{"Type": "vxlan"}}, got {_describe(backend)}'
        )
    families: dict[str, Any] = {}
    for fam in _FAMILIES:
        net_name, len_name, min_name, max_name = fam.names
        subnet_len = _get_int(len_name, f.get(len_name), example=str(fam.default))
        if subnet_len is not None and subnet_len < 0:
            raise ConfigError(
                f"net-conf: {len_name} {subnet_len} is negative: use a prefix length, or leave it out"
            )
        families[f"{fam.attr}network"] = _parse_cidr(net_name, f.get(net_name), fam.version)
        families[f"{fam.attr}subnet_len"] = subnet_len or None  # flannel: 0 means "use the default"
        families[f"{fam.attr}subnet_min"] = _parse_addr(min_name, f.get(min_name), fam.version)
        families[f"{fam.attr}subnet_max"] = _parse_addr(max_name, f.get(max_name), fam.version)
    return RawNetConf(
        enable_ipv4=_get_bool("EnableIPv4", f.get("EnableIPv4"), True),
        enable_ipv6=_get_bool("EnableIPv6", f.get("EnableIPv6"), False),
        enable_nftables=_get_bool("EnableNFTables", f.get("EnableNFTables"), False),
        backend=backend,
        **families,
    )


# --- step 2: defaults -----------------------------------------------------------------------------------


def _default_subnet_len(network: IPv4Network | IPv6Network, fam: _Family) -> int | None:
    """flannel: the default length (/24, /64) when the network holds 4 of them, else prefix + 2; None when
    the network is too small for any default (validate reports it)."""
    if network.prefixlen > fam.longest_network:
        return None
    return fam.default if network.prefixlen <= fam.default - 2 else network.prefixlen + 2


def _default_range(network: IPv4Network | IPv6Network, subnet_len: int, bits: int) -> tuple[Any, Any] | None:
    """flannel: min = the second subnet (the first would put a node on the network address),
    max = the last one."""
    if not network.prefixlen <= subnet_len <= bits:
        return None
    size = 1 << (bits - subnet_len)
    cls = type(network.network_address)
    return cls(int(network.network_address) + size), cls(int(network.broadcast_address) + 1 - size)


def apply_defaults(raw: RawNetConf) -> RawNetConf:
    """Fill SubnetLen/Min/Max (and the IPv6 twins) as flannel does, where they can be derived."""
    out = raw
    for fam in _FAMILIES:
        network = getattr(raw, f"{fam.attr}network")
        subnet_len = getattr(raw, f"{fam.attr}subnet_len")
        if network is None:
            continue
        if subnet_len is None:
            subnet_len = _default_subnet_len(network, fam)
            out = dataclasses.replace(out, **{f"{fam.attr}subnet_len": subnet_len})
        rng = None if subnet_len is None else _default_range(network, subnet_len, fam.bits)
        if rng is None:
            continue
        for key, value in zip(("subnet_min", "subnet_max"), rng, strict=True):
            if getattr(out, f"{fam.attr}{key}") is None:
                out = dataclasses.replace(out, **{f"{fam.attr}{key}": value})
    return out


# --- step 3: validate -----------------------------------------------------------------------------------


def _check_family(
    fam: _Family,
    network: IPv4Network | IPv6Network | None,
    subnet_len: int | None,
    subnet_min: IPv4Address | IPv6Address | None,
    subnet_max: IPv4Address | IPv6Address | None,
) -> tuple[int, Any, Any]:
    """flannel's CheckNetworkConfig for one address family; returns (subnet_len, min net, max net)."""
    net_name, len_name, min_name, max_name = fam.names
    bits, longest, longest_network = fam.bits, fam.longest, fam.longest_network
    if network is None:
        fix = 'set "EnableIPv4": false for IPv6-only' if fam.attr == "" else 'set "EnableIPv6": false'
        raise ConfigError(
            f"net-conf: {net_name} is missing: set it to the cluster CIDR, e.g. {fam.example} (or {fix})"
        )
    shortest = network.prefixlen + 2  # at least 4 subnets: the first is never handed out
    if shortest > longest or (subnet_len is None and network.prefixlen > longest_network):
        raise ConfigError(
            f"net-conf: {net_name} {network} is too small: use a prefix of /{longest_network} or shorter"
        )
    if subnet_len is None:  # pragma: no cover - apply_defaults always fills it when the network fits
        raise ConfigError(f"net-conf: {len_name} is missing: use a value between {shortest} and {longest}")
    if subnet_len > longest:
        raise ConfigError(
            f"net-conf: {len_name} {subnet_len} is too long for {net_name} {network}: "
            f"use a value between {shortest} and {longest}"
        )
    if subnet_len < shortest:
        raise ConfigError(
            f"net-conf: {len_name} {subnet_len} is too short for {net_name} {network} "
            f"(it must fit 4 subnets): use a value between {shortest} and {longest}"
        )
    first, last = _default_range(network, subnet_len, bits)  # type: ignore[misc]
    nets = []
    for name, addr in ((min_name, subnet_min), (max_name, subnet_max)):
        assert addr is not None  # apply_defaults filled it
        if addr not in network:
            raise ConfigError(
                f"net-conf: {name} {addr} is outside {net_name} {network}: "
                f"use an address between {first} and {last}"
            )
        aligned = ipaddress.ip_network(f"{addr}/{subnet_len}", strict=False)
        if aligned.network_address != addr:
            raise ConfigError(
                f"net-conf: {name} {addr} is not on a /{subnet_len} boundary ({len_name}): "
                f"use {aligned.network_address}"
            )
        nets.append(aligned)
    # flannel does not check this; an empty range would only fail later, at allocation time
    if nets[0].network_address > nets[1].network_address:
        raise ConfigError(
            f"net-conf: {min_name} {nets[0].network_address} is above {max_name} {nets[1].network_address}: "
            "swap them or widen the range"
        )
    return subnet_len, nets[0], nets[1]


def _soft_family(
    network: Any, subnet_len: int | None, subnet_min: Any, subnet_max: Any
) -> tuple[int, Any, Any]:
    """Kubernetes mode: keep what can be expressed, check nothing about allocation."""
    if network is None or subnet_len is None or subnet_min is None or subnet_max is None:
        return 0, None, None
    try:
        return (
            subnet_len,
            ipaddress.ip_network(f"{subnet_min}/{subnet_len}", strict=False),
            ipaddress.ip_network(f"{subnet_max}/{subnet_len}", strict=False),
        )
    except ValueError:
        return 0, None, None


_BACKEND_FIELDS = {
    "vxlan": ("VNI", "Port", "MTU", "DirectRouting"),
    "udp": ("Port",),
    "wireguard": ("ListenPort", "ListenPortV6", "PSK", "PersistentKeepaliveInterval", "MTU", "Mode"),
    "host-gw": (),
}


_PORT_FIX = "use a port between 1 and 65535"
# Integer options: field, range, whether 0 means "not set" (Go's zero value), example, fix.
_INT_OPTIONS: dict[str, tuple[str, int, int, bool, str, str]] = {
    "VNI": ("vni", 0, VNI_MAX, False, "1", f"use a value between 0 and {VNI_MAX}"),
    "Port": ("port", 1, 65535, True, "8472", _PORT_FIX),
    "MTU": ("mtu", 1, 65535, True, "1450", "use a value up to 65535, or leave it out"),
    "ListenPort": ("listen_port", 1, 65535, True, "51820", _PORT_FIX),
    "ListenPortV6": ("listen_port_v6", 1, 65535, True, "51821", _PORT_FIX),
    "PersistentKeepaliveInterval": (
        "persistent_keepalive_interval",
        0,
        65535,
        False,
        "25",
        "use seconds between 0 (off) and 65535",
    ),
}


def parse_backend(obj: dict[str, Any] | None) -> BackendConfig:
    """The Backend object -> BackendConfig, with flannel's per-type defaults and our range checks."""
    if obj is None:
        return BackendConfig(type=DEFAULT_BACKEND_TYPE, raw={})
    type_text = _get_str("Backend.Type", _fields(obj, ("Type",)).get("Type"), '"vxlan"')
    choices = ", ".join(BACKEND_TYPES)
    if not type_text:
        raise ConfigError(f"net-conf: Backend.Type is missing: set it to one of {choices}")
    btype = type_text.lower()  # flannel's backend manager lower-cases the type
    if btype not in _BACKEND_FIELDS:
        raise ConfigError(f"net-conf: Backend.Type {type_text!r} is not supported: use one of {choices}")
    kw: dict[str, Any] = {"type": btype, "raw": dict(obj)}
    for name, value in _fields(obj, _BACKEND_FIELDS[btype]).items():
        where = f"Backend.{name}"
        if name in _INT_OPTIONS:
            dest, lo, hi, zero_unset, example, fix = _INT_OPTIONS[name]
            number = _get_int(where, value, example=example)
            if number is None or (zero_unset and number == 0):
                continue  # keep the default
            if not lo <= number <= hi:
                raise ConfigError(f"net-conf: {where} {number} is out of range: {fix}")
            kw[dest] = number
        elif name == "DirectRouting":
            kw["direct_routing"] = _get_bool(where, value, False)
        elif name == "PSK":
            kw["psk"] = _psk(value)
        elif name == "Mode" and (mode := _get_str(where, value, '"separate"')) is not None:
            if mode.lower() not in WIREGUARD_MODES:
                modes = ", ".join(WIREGUARD_MODES)
                raise ConfigError(f"net-conf: {where} {mode!r} is not supported: use one of {modes}")
            kw["mode"] = mode.lower()
    return BackendConfig(**kw)


def _psk(value: Any) -> str | None:
    text = _get_str("Backend.PSK", value, '"<base64 of 32 bytes, from `wg genpsk`>"')
    if not text:
        return None
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != WG_KEY_LEN:
        raise ConfigError(
            "net-conf: Backend.PSK is not the base64 of 32 bytes: generate one with `wg genpsk`"
        )
    return text


def _check_mtu(backend: BackendConfig, enable_ipv6: bool) -> None:
    if backend.mtu is None:
        return
    overhead = backend_overhead(backend.type)
    floor = MIN_INNER_MTU_V6 if enable_ipv6 else MIN_INNER_MTU_V4
    if backend.mtu - overhead < floor:
        raise ConfigError(
            f"net-conf: Backend.MTU {backend.mtu} leaves {backend.mtu - overhead} bytes for pods after the "
            f"{backend.type} overhead of {overhead}: use at least {floor + overhead}"
        )


def validate(raw: RawNetConf, *, kube: bool = False) -> NetworkConfig:
    """Check a defaulted RawNetConf by flannel's rules (plus a few it forgets) and build the NetworkConfig.

    kube=True follows flannel's Kubernetes mode, which never runs CheckNetworkConfig: SubnetLen/Min/Max are
    kept when they make sense and not checked, but Network must still be there (the podCIDR must lie in it).
    """
    if not raw.enable_ipv4 and not raw.enable_ipv6:
        raise ConfigError("net-conf: EnableIPv4 and EnableIPv6 are both false: enable at least one")
    backend = parse_backend(raw.backend)
    families: dict[str, Any] = {}
    for fam in _FAMILIES:
        enabled = raw.enable_ipv4 if fam.attr == "" else raw.enable_ipv6
        network = getattr(raw, f"{fam.attr}network") if enabled else None
        args = [getattr(raw, f"{fam.attr}{key}") for key in ("subnet_len", "subnet_min", "subnet_max")]
        result: tuple[int, Any, Any] = (0, None, None)
        if enabled:
            result = _soft_family(network, *args) if kube and network else _check_family(fam, network, *args)
        families.update(
            zip(
                [f"{fam.attr}{k}" for k in ("network", "subnet_len", "subnet_min", "subnet_max")],
                (network, *result),
                strict=True,
            )
        )
    _check_mtu(backend, raw.enable_ipv6)
    return NetworkConfig(
        enable_ipv4=raw.enable_ipv4,
        enable_ipv6=raw.enable_ipv6,
        enable_nftables=raw.enable_nftables,
        backend=backend,
        **families,
    )


def parse_net_conf(text: str | bytes, *, kube: bool = False) -> NetworkConfig:
    """net-conf JSON text -> NetworkConfig (parse -> apply_defaults -> validate); raises ConfigError."""
    return validate(apply_defaults(parse_raw(text)), kube=kube)


def load_net_conf(path: str | os.PathLike[str], *, kube: bool = False) -> NetworkConfig:
    """Read and parse the net-conf file; a missing or unreadable file is a ConfigError naming the path."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"net-conf: cannot read {os.fspath(path)}: {reason}: create it or point --net-config-path at it"
        ) from None
    return parse_net_conf(data, kube=kube)
