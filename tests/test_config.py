"""net-conf.json by flannel's rules (pkg/subnet/config.go, spec/flannel.md): a row per rule and message."""

from __future__ import annotations

import base64
import ipaddress
import json

import pytest

from udpflannel.config import (
    BackendConfig,
    ConfigError,
    NetworkConfig,
    RawNetConf,
    apply_defaults,
    load_net_conf,
    parse_backend,
    parse_net_conf,
    parse_raw,
    validate,
)

N4 = ipaddress.IPv4Network
N6 = ipaddress.IPv6Network
PSK = base64.b64encode(bytes(range(32))).decode()


def conf(**fields: object) -> str:
    return json.dumps(fields)


# (net-conf, expected (subnet_len, subnet_min, subnet_max))
V4_DEFAULTS = [
    pytest.param(conf(Network="198.19.0.0/16"), (24, "198.19.1.0/24", "198.19.255.0/24"), id="/16->/24"),
    pytest.param(conf(Network="198.19.0.0/22"), (24, "198.19.1.0/24", "198.19.3.0/24"), id="/22->/24"),
    pytest.param(conf(Network="198.19.0.0/23"), (25, "198.19.0.128/25", "198.19.1.128/25"), id="/23->/25"),
    pytest.param(conf(Network="198.19.0.0/28"), (30, "198.19.0.4/30", "198.19.0.12/30"), id="/28->/30"),
    pytest.param(conf(Network="198.18.0.0/15"), (24, "198.18.1.0/24", "198.19.255.0/24"), id="/15->/24"),
    pytest.param(
        conf(Network="198.19.0.0/16", SubnetLen=18),
        (18, "198.19.64.0/18", "198.19.192.0/18"),
        id="len=prefix+2",
    ),
    pytest.param(
        conf(Network="198.19.0.0/16", SubnetLen=30), (30, "198.19.0.4/30", "198.19.255.252/30"), id="len=30"
    ),
    pytest.param(
        conf(Network="198.19.0.0/16", SubnetLen=0), (24, "198.19.1.0/24", "198.19.255.0/24"), id="len0"
    ),
    pytest.param(
        conf(Network="198.19.0.0/16", SubnetMin="198.19.10.0", SubnetMax="198.19.20.0"),
        (24, "198.19.10.0/24", "198.19.20.0/24"),
        id="explicit-min-max",
    ),
    pytest.param(
        conf(Network="198.19.0.0/16", SubnetMin="198.19.0.0"),
        (24, "198.19.0.0/24", "198.19.255.0/24"),
        id="min-may-be-first",
    ),
    pytest.param(
        conf(Network="198.19.0.0/16", SubnetMin="0.0.0.0"),
        (24, "198.19.1.0/24", "198.19.255.0/24"),
        id="min0",
    ),
    pytest.param(
        conf(Network="198.19.0.0/16", SubnetMax="::ffff:198.19.9.0"),
        (24, "198.19.1.0/24", "198.19.9.0/24"),
        id="v4-mapped-max",
    ),
    pytest.param(
        conf(Network="198.19.7.7/16"), (24, "198.19.1.0/24", "198.19.255.0/24"), id="host-bits-masked"
    ),
]


@pytest.mark.parametrize(("text", "expected"), V4_DEFAULTS)
def test_ipv4_defaults(text: str, expected: tuple[int, str, str]) -> None:
    cfg = parse_net_conf(text)
    assert (cfg.subnet_len, str(cfg.subnet_min), str(cfg.subnet_max)) == expected
    assert cfg.enable_ipv4 and not cfg.enable_ipv6
    assert cfg.ipv6_network is None and cfg.ipv6_subnet_min is None and cfg.ipv6_subnet_len == 0


V6_DEFAULTS = [
    pytest.param("fd00:198::/32", None, (64, "fd00:198:0:1::/64", "fd00:198:ffff:ffff::/64"), id="/32->/64"),
    pytest.param("fd00:198::/62", None, (64, "fd00:198:0:1::/64", "fd00:198:0:3::/64"), id="/62->/64"),
    pytest.param(
        "fd00:198::/63", None, (65, "fd00:198:0:0:8000::/65", "fd00:198:0:1:8000::/65"), id="/63->/65"
    ),
    pytest.param("fd00:198::/124", None, (126, "fd00:198::4/126", "fd00:198::c/126"), id="/124->/126"),
    pytest.param("fd00:198::/48", 56, (56, "fd00:198:0:100::/56", "fd00:198:0:ff00::/56"), id="explicit-56"),
]


@pytest.mark.parametrize(("network", "plen", "expected"), V6_DEFAULTS)
def test_ipv6_defaults(network: str, plen: int | None, expected: tuple[int, str, str]) -> None:
    fields: dict[str, object] = {"Network": "198.19.0.0/16", "EnableIPv6": True, "IPv6Network": network}
    if plen is not None:
        fields["IPv6SubnetLen"] = plen
    cfg = parse_net_conf(json.dumps(fields))
    assert (cfg.ipv6_subnet_len, str(cfg.ipv6_subnet_min), str(cfg.ipv6_subnet_max)) == expected
    assert cfg.enable_ipv4 and cfg.enable_ipv6 and cfg.network == N4("198.19.0.0/16")


def test_ipv6_only() -> None:
    cfg = parse_net_conf(conf(EnableIPv4=False, EnableIPv6=True, IPv6Network="fd00:198::/48"))
    assert not cfg.enable_ipv4 and cfg.enable_ipv6
    assert cfg.network is None and cfg.subnet_len == 0 and cfg.subnet_min is None and cfg.subnet_max is None
    assert cfg.ipv6_network == N6("fd00:198::/48")
    # Network given but IPv4 disabled: ignored, not validated (flannel checks it only when EnableIPv4)
    cfg = parse_net_conf(
        conf(EnableIPv4=False, EnableIPv6=True, IPv6Network="fd00:198::/48", Network="198.19.0.0/30")
    )
    assert cfg.network is None


def test_dual_stack_explicit_bounds() -> None:
    cfg = parse_net_conf(
        conf(
            Network="198.19.0.0/16",
            SubnetLen=26,
            SubnetMin="198.19.1.64",
            SubnetMax="198.19.2.192",
            EnableIPv6=True,
            IPv6Network="fd00:198::/48",
            IPv6SubnetLen=64,
            IPv6SubnetMin="fd00:198:0:10::",
            IPv6SubnetMax="fd00:198:0:20::",
        )
    )
    assert (cfg.subnet_min, cfg.subnet_max) == (N4("198.19.1.64/26"), N4("198.19.2.192/26"))
    assert (cfg.ipv6_subnet_min, cfg.ipv6_subnet_max) == (N6("fd00:198:0:10::/64"), N6("fd00:198:0:20::/64"))


# (net-conf, the exact one-line message)
ERRORS = [
    (
        "{",
        "net-conf: not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)",
    ),
    ("", "net-conf: not valid JSON (Expecting value at line 1 column 1): fix the syntax"),
    ('["198.19.0.0/16"]', 'net-conf: must be a JSON object like {"Network": "198.19.0.0/16"}, got list'),
    ('"x"', 'net-conf: must be a JSON object like {"Network": "198.19.0.0/16"}, got str'),
    (
        "{}",
        'net-conf: Network is missing: set it to the cluster CIDR, e.g. "198.19.0.0/16" (or set "EnableIPv4"',
    ),
    (conf(Network=None), "net-conf: Network is missing"),
    (conf(Network="0.0.0.0/0"), "net-conf: Network is missing"),  # flannel's Empty()
    (
        conf(EnableIPv4=False, EnableIPv6=True, IPv6Network="::/0"),
        "net-conf: IPv6Network is missing",
    ),
    (conf(Network=5), 'net-conf: Network must be a string like "198.19.0.0/16", got 5'),
    (conf(Network="198.19.0.0"), "net-conf: Network '198.19.0.0' is not an IPv4 CIDR: use a value like"),
    (
        conf(Network="198.19.0.0/255.255.0.0"),
        "net-conf: Network '198.19.0.0/255.255.0.0' is not an IPv4 CIDR",
    ),
    (conf(Network="fd00:198::/48"), "net-conf: Network 'fd00:198::/48' is not an IPv4 CIDR"),
    (conf(Network="198.19.0.0/33"), "net-conf: Network '198.19.0.0/33' is not an IPv4 CIDR"),
    (
        conf(Network="198.19.0.0/29"),
        "net-conf: Network 198.19.0.0/29 is too small: use a prefix of /28 or shorter",
    ),
    (conf(Network="198.19.0.0/29", SubnetLen=30), "net-conf: Network 198.19.0.0/29 is too small"),
    (
        conf(Network="198.19.0.0/16", SubnetLen=31),
        "net-conf: SubnetLen 31 is too long for Network 198.19.0.0/16: use a value between 18 and 30",
    ),
    (
        conf(Network="198.19.0.0/16", SubnetLen=17),
        "net-conf: SubnetLen 17 is too short for Network 198.19.0.0/16 (it must fit 4 subnets): "
        "use a value between 18 and 30",
    ),
    (conf(Network="198.19.0.0/16", SubnetLen=8), "net-conf: SubnetLen 8 is too short"),
    (conf(Network="198.19.0.0/16", SubnetLen=-1), "net-conf: SubnetLen -1 is negative"),
    (
        conf(Network="198.19.0.0/16", SubnetLen=24.0),
        "net-conf: SubnetLen must be a whole number like 24, got 24.0",
    ),
    (
        conf(Network="198.19.0.0/16", SubnetLen="24"),
        'net-conf: SubnetLen must be a whole number like 24, got "24"',
    ),
    (
        conf(Network="198.19.0.0/16", SubnetLen=True),
        "net-conf: SubnetLen must be a whole number like 24, got true",
    ),
    (
        conf(Network="198.19.0.0/16", SubnetMin="198.20.1.0"),
        "net-conf: SubnetMin 198.20.1.0 is outside Network 198.19.0.0/16: "
        "use an address between 198.19.1.0 and 198.19.255.0",
    ),
    (conf(Network="198.19.0.0/16", SubnetMax="10.0.0.0"), "net-conf: SubnetMax 10.0.0.0 is outside Network"),
    (
        conf(Network="198.19.0.0/16", SubnetMin="198.19.1.5"),
        "net-conf: SubnetMin 198.19.1.5 is not on a /24 boundary (SubnetLen): use 198.19.1.0",
    ),
    (
        conf(Network="198.19.0.0/16", SubnetMax="198.19.9.128"),
        "net-conf: SubnetMax 198.19.9.128 is not on a /24 boundary (SubnetLen): use 198.19.9.0",
    ),
    (
        conf(Network="198.19.0.0/16", SubnetMin="198.19.9.0", SubnetMax="198.19.2.0"),
        "net-conf: SubnetMin 198.19.9.0 is above SubnetMax 198.19.2.0: swap them or widen the range",
    ),
    (conf(Network="198.19.0.0/16", SubnetMin="x"), "net-conf: SubnetMin 'x' is not an IPv4 address"),
    (
        conf(Network="198.19.0.0/16", SubnetMin="fd00::"),
        "net-conf: SubnetMin 'fd00::' is not an IPv4 address",
    ),
    (
        conf(Network="198.19.0.0/16", EnableIPv4="true"),
        'net-conf: EnableIPv4 must be true or false, got "true"',
    ),
    (
        conf(Network="198.19.0.0/16", EnableNFTables=1),
        "net-conf: EnableNFTables must be true or false, got 1",
    ),
    (
        conf(EnableIPv4=False),
        "net-conf: EnableIPv4 and EnableIPv6 are both false: enable at least one",
    ),
    (
        conf(Network="198.19.0.0/16", EnableIPv6=True),
        'net-conf: IPv6Network is missing: set it to the cluster CIDR, e.g. "fd00:198::/48" '
        '(or set "EnableIPv6": false)',
    ),
    (
        conf(Network="198.19.0.0/16", EnableIPv6=True, IPv6Network="198.19.0.0/16"),
        "net-conf: IPv6Network '198.19.0.0/16' is not an IPv6 CIDR",
    ),
    (
        conf(EnableIPv4=False, EnableIPv6=True, IPv6Network="fd00:198::/125"),
        "net-conf: IPv6Network fd00:198::/125 is too small: use a prefix of /124 or shorter",
    ),
    (
        conf(EnableIPv4=False, EnableIPv6=True, IPv6Network="fd00:198::/48", IPv6SubnetLen=127),
        "net-conf: IPv6SubnetLen 127 is too long for IPv6Network fd00:198::/48: "
        "use a value between 50 and 126",
    ),
    (
        conf(EnableIPv4=False, EnableIPv6=True, IPv6Network="fd00:198::/48", IPv6SubnetLen=49),
        "net-conf: IPv6SubnetLen 49 is too short for IPv6Network fd00:198::/48",
    ),
    (
        conf(EnableIPv4=False, EnableIPv6=True, IPv6Network="fd00:198::/48", IPv6SubnetMin="fd00:199::"),
        "net-conf: IPv6SubnetMin fd00:199:: is outside IPv6Network fd00:198::/48",
    ),
    (
        conf(EnableIPv4=False, EnableIPv6=True, IPv6Network="fd00:198::/48", IPv6SubnetMax="fd00:198:0:5::1"),
        "net-conf: IPv6SubnetMax fd00:198:0:5::1 is not on a /64 boundary (IPv6SubnetLen): "
        "use fd00:198:0:5::",
    ),
    (
        conf(EnableIPv4=False, EnableIPv6=True, IPv6Network="fd00:198::/48", IPv6SubnetMin="198.19.0.0"),
        "net-conf: IPv6SubnetMin '198.19.0.0' is not an IPv6 address",
    ),
    (
        conf(Network="198.19.0.0/16", Backend="vxlan"),
        'net-conf: Backend must be an object like {"Type": "vxlan"}',
    ),
    (
        conf(Network="198.19.0.0/16", Backend={}),
        "net-conf: Backend.Type is missing: set it to one of host-gw, udp",
    ),
    (
        conf(Network="198.19.0.0/16", Backend={"Type": "ipsec"}),
        "net-conf: Backend.Type 'ipsec' is not supported: use one of host-gw, udp, vxlan, wireguard",
    ),
    (
        conf(Network="198.19.0.0/16", Backend={"Type": 1}),
        'net-conf: Backend.Type must be a string like "vxlan"',
    ),
    (
        conf(Network="198.19.0.0/16", Backend={"Type": "vxlan", "VNI": 1 << 24}),
        "net-conf: Backend.VNI 16777216 is out of range: use a value between 0 and 16777215",
    ),
    (
        conf(Network="198.19.0.0/16", Backend={"Type": "vxlan", "VNI": -1}),
        "net-conf: Backend.VNI -1 is out of",
    ),
    (
        conf(Network="198.19.0.0/16", Backend={"Type": "vxlan", "Port": 65536}),
        "net-conf: Backend.Port 65536 is out of range: use a port between 1 and 65535",
    ),
    (
        conf(Network="198.19.0.0/16", Backend={"Type": "udp", "Port": "8285"}),
        "net-conf: Backend.Port must be a",
    ),
    (
        conf(Network="198.19.0.0/16", Backend={"Type": "vxlan", "DirectRouting": "yes"}),
        'net-conf: Backend.DirectRouting must be true or false, got "yes"',
    ),
    (
        conf(Network="198.19.0.0/16", Backend={"Type": "vxlan", "MTU": 100}),
        "net-conf: Backend.MTU 100 leaves 50 bytes for pods after the vxlan overhead of 50: use at least 118",
    ),
    (
        conf(
            Network="198.19.0.0/16",
            EnableIPv6=True,
            IPv6Network="fd00:198::/48",
            Backend={"Type": "vxlan", "MTU": 1300},
        ),
        "net-conf: Backend.MTU 1300 leaves 1250 bytes for pods after the vxlan overhead of 50: "
        "use at least 1330",
    ),
    (
        conf(Network="198.19.0.0/16", Backend={"Type": "vxlan", "MTU": 70000}),
        "net-conf: Backend.MTU 70000 is out",
    ),
    (
        conf(Network="198.19.0.0/16", Backend={"Type": "wireguard", "ListenPort": 0x10000}),
        "net-conf: Backend.ListenPort 65536 is out of range",
    ),
    (
        conf(Network="198.19.0.0/16", Backend={"Type": "wireguard", "ListenPortV6": -5}),
        "net-conf: Backend.ListenPortV6 -5 is out of range",
    ),
    (
        conf(Network="198.19.0.0/16", Backend={"Type": "wireguard", "PSK": "c2hvcnQ="}),
        "net-conf: Backend.PSK is not the base64 of 32 bytes: generate one with `wg genpsk`",
    ),
    (
        conf(Network="198.19.0.0/16", Backend={"Type": "wireguard", "PSK": "!" * 44}),
        "net-conf: Backend.PSK is not the base64 of 32 bytes",
    ),
    (
        conf(Network="198.19.0.0/16", Backend={"Type": "wireguard", "PersistentKeepaliveInterval": 70000}),
        "net-conf: Backend.PersistentKeepaliveInterval 70000 is out of range: "
        "use seconds between 0 (off) and 65535",
    ),
    (
        conf(Network="198.19.0.0/16", Backend={"Type": "wireguard", "Mode": "both"}),
        "net-conf: Backend.Mode 'both' is not supported: use one of separate, auto, ipv4, ipv6",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[m[:60] for _, m in ERRORS])
def test_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_net_conf(text)
    text_of = str(info.value)
    assert text_of.startswith(message)
    assert "\n" not in text_of
    assert isinstance(info.value, ValueError)


def test_not_utf8() -> None:
    with pytest.raises(ConfigError, match="not UTF-8"):
        parse_net_conf(b'{"Network": "\xff"}')


def test_bytes_input_and_bom_free_utf8() -> None:
    assert parse_net_conf(b'{"Network": "198.19.0.0/16"}').network == N4("198.19.0.0/16")


CASE_VARIANTS = [
    '{"network": "198.19.0.0/16", "subnetlen": 26, '
    '"backend": {"type": "VxLaN", "vni": 7, "directrouting": true}}',
    '{"NETWORK": "198.19.0.0/16", "SUBNETLEN": 26, '
    '"BACKEND": {"TYPE": "vxlan", "VNI": 7, "DIRECTROUTING": true}}',
    # Go's encoding/json folds Unicode too: LONG S matches s (and KELVIN SIGN matches k, below).
    '{"Network": "198.19.0.0/16", "\u017fubnetLen": 26, '
    '"Backend": {"Type": "vxlan", "VNI": 7, "DirectRouting": true}}',
]


@pytest.mark.parametrize("text", CASE_VARIANTS)
def test_keys_case_insensitive(text: str) -> None:
    cfg = parse_net_conf(text)
    assert cfg.network == N4("198.19.0.0/16") and cfg.subnet_len == 26
    assert (cfg.backend.type, cfg.backend.vni, cfg.backend.direct_routing) == ("vxlan", 7, True)


def test_kelvin_sign_key() -> None:
    backend = parse_backend(
        json.loads('{"Type": "wireguard", "PersistentKeepalive\u0130nterval": 5, "MODE": "IPv6"}')
    )
    # DOTTED CAPITAL I does not fold to i in Go either: the key is unknown and ignored
    assert (backend.persistent_keepalive_interval, backend.mode) == (0, "ipv6")
    raw = parse_raw('{"Network": "198.19.0.0/16", "Bac\u212aend": {"Type": "host-gw"}}')
    assert raw.backend == {"Type": "host-gw"}
    # DOTLESS I folds to I in Python, never in Go: unknown key, ignored
    assert parse_raw('{"Network": "198.19.0.0/16", "\u0131PV6Network": "x"}').ipv6_network is None


def test_last_duplicate_wins_across_case() -> None:
    # Go assigns fields in document order, so the last spelling wins, whatever its case.
    text = '{"Network": "198.18.0.0/16", "network": "198.19.0.0/16", "Network": "198.18.0.0/24"}'
    assert parse_net_conf(text).network == N4("198.18.0.0/24")


def test_unknown_keys_ignored() -> None:
    cfg = parse_net_conf(
        conf(
            Network="198.19.0.0/16",
            Comment="hello",
            SubnetLenX="bad",
            Networks=["x"],
            Backend={"Type": "udp", "VNI": "ignored for udp", "Whatever": [1]},
        )
    )
    assert cfg.backend == BackendConfig(type="udp")
    assert cfg.backend.raw["Whatever"] == [1]


def test_enable_nftables() -> None:
    assert parse_net_conf(conf(Network="198.19.0.0/16", EnableNFTables=True)).enable_nftables is True
    assert parse_net_conf(conf(Network="198.19.0.0/16")).enable_nftables is False


BACKENDS = [
    pytest.param(None, BackendConfig(type="udp"), id="missing->udp"),
    pytest.param({"Type": "udp"}, BackendConfig(type="udp"), id="udp"),
    pytest.param({"Type": "udp", "Port": 9000}, BackendConfig(type="udp", port=9000), id="udp-port"),
    pytest.param({"Type": "udp", "Port": 0}, BackendConfig(type="udp"), id="udp-port0=default"),
    pytest.param({"Type": "vxlan"}, BackendConfig(type="vxlan"), id="vxlan"),
    pytest.param(
        {"Type": "vxlan", "VNI": 4096, "Port": 4789, "MTU": 9000, "DirectRouting": True},
        BackendConfig(type="vxlan", vni=4096, port=4789, mtu=9000, direct_routing=True),
        id="vxlan-all",
    ),
    pytest.param({"Type": "vxlan", "VNI": 0}, BackendConfig(type="vxlan", vni=0), id="vxlan-vni0"),
    pytest.param(
        {"Type": "vxlan", "VNI": 16777215}, BackendConfig(type="vxlan", vni=16777215), id="vxlan-vni-max"
    ),
    pytest.param({"Type": "VXLAN", "MTU": 0}, BackendConfig(type="vxlan"), id="vxlan-upper-mtu0"),
    pytest.param({"Type": "host-gw"}, BackendConfig(type="host-gw"), id="host-gw"),
    pytest.param(
        {"Type": "host-gw", "VNI": "x", "Port": -1}, BackendConfig(type="host-gw"), id="host-gw-ignores"
    ),
    pytest.param({"Type": "wireguard"}, BackendConfig(type="wireguard"), id="wireguard"),
    pytest.param(
        {
            "Type": "wireguard",
            "ListenPort": 51000,
            "ListenPortV6": 51001,
            "PSK": PSK,
            "PersistentKeepaliveInterval": 25,
            "MTU": 1420,
            "Mode": "Auto",
        },
        BackendConfig(
            type="wireguard",
            listen_port=51000,
            listen_port_v6=51001,
            psk=PSK,
            persistent_keepalive_interval=25,
            mtu=1420,
            mode="auto",
        ),
        id="wireguard-all",
    ),
    pytest.param({"Type": "wireguard", "PSK": ""}, BackendConfig(type="wireguard"), id="wireguard-empty-psk"),
    pytest.param({"Type": "wireguard", "ListenPort": 0}, BackendConfig(type="wireguard"), id="wg-port0"),
]


@pytest.mark.parametrize(("backend", "expected"), BACKENDS)
def test_backends(backend: dict[str, object] | None, expected: BackendConfig) -> None:
    fields: dict[str, object] = {"Network": "198.19.0.0/16"}
    if backend is not None:
        fields["Backend"] = backend
    cfg = parse_net_conf(json.dumps(fields))
    assert cfg.backend == expected
    assert cfg.backend.raw == (backend or {})


def test_backend_null_means_missing() -> None:
    assert parse_net_conf(conf(Network="198.19.0.0/16", Backend=None)).backend.type == "udp"


def test_three_steps_are_separate() -> None:
    raw = parse_raw(conf(Network="198.19.0.0/16", SubnetLen=31))
    assert raw == RawNetConf(network=N4("198.19.0.0/16"), subnet_len=31)
    defaulted = apply_defaults(raw)
    # SubnetLen 31 cannot be checked by apply_defaults: it only fills what it can, validate complains
    assert defaulted.subnet_len == 31 and defaulted.subnet_min == ipaddress.IPv4Address("198.19.0.2")
    with pytest.raises(ConfigError, match="too long"):
        validate(defaulted)
    raw = parse_raw(conf(Network="198.19.0.0/29"))
    assert apply_defaults(raw) == raw  # nothing derivable from a /29
    full = apply_defaults(parse_raw(conf(Network="198.19.0.0/16")))
    assert (full.subnet_len, str(full.subnet_min), str(full.subnet_max)) == (24, "198.19.1.0", "198.19.255.0")
    assert isinstance(validate(full), NetworkConfig)


def test_kube_mode_skips_allocation_checks() -> None:
    # flannel's kube subnet manager never runs CheckNetworkConfig: the node's podCIDR is the subnet.
    cfg = parse_net_conf(conf(Network="198.19.0.0/30", Backend={"Type": "vxlan"}), kube=True)
    assert cfg.network == N4("198.19.0.0/30") and cfg.subnet_len == 0 and cfg.subnet_min is None
    cfg = parse_net_conf(conf(Network="198.19.0.0/16", SubnetLen=31), kube=True)
    assert cfg.subnet_len == 31
    with pytest.raises(ConfigError, match="Network is missing"):
        parse_net_conf("{}", kube=True)
    with pytest.raises(ConfigError, match=r"Backend\.Type"):
        parse_net_conf(conf(Network="198.19.0.0/16", Backend={"Type": "nope"}), kube=True)


def test_frozen() -> None:
    cfg = parse_net_conf(conf(Network="198.19.0.0/16"))
    with pytest.raises(AttributeError):
        cfg.subnet_len = 25  # type: ignore[misc]


def test_load_net_conf(tmp_path) -> None:
    path = tmp_path / "net-conf.json"
    path.write_text(conf(Network="198.19.0.0/16", Backend={"Type": "vxlan"}))
    assert load_net_conf(path).backend.type == "vxlan"
    assert load_net_conf(str(path)).network == N4("198.19.0.0/16")


def test_load_net_conf_missing(tmp_path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as info:
        load_net_conf(missing)
    assert str(info.value) == (
        f"net-conf: cannot read {missing}: No such file or directory: "
        "create it or point --net-config-path at it"
    )


def test_load_net_conf_directory(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*: Is a directory: .*--net-config-path"):
        load_net_conf(tmp_path)
