"""backend/wireguard.py decisions: key file rules, what it publishes, peer leases -> worker peers, wg show.
Decisions only (no root); tests/backend/test_wireguard_backend_netns.py runs it for real."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import stat

import pytest

from udpflannel.backend import ExternalInterface, create_backend
from udpflannel.backend.wireguard import (
    KEY_FILE_ENV,
    WgDevice,
    WireguardBackend,
    WireguardError,
    format_wg_show,
    load_or_create_key,
    peer_config,
    plan_devices,
)
from udpflannel.codec.wireguard import crypto
from udpflannel.config import parse_net_conf
from udpflannel.lease.model import Event, EventType, Lease, LeaseAttrs

IFACE = ExternalInterface("eth0", 2, 1500, "198.18.0.1", None, "198.18.0.1", None)
IFACE6 = ExternalInterface("eth0", 2, 1500, "198.18.0.1", "fd00:198::1", "198.18.0.1", "fd00:198::1")
PEER_KEY = crypto.public_key(bytes(range(1, 33)))
PSK_B64 = base64.b64encode(bytes(range(32))).decode()


def _conf(backend: dict, v6: bool = False):
    obj = {"Network": "198.19.0.0/16", "Backend": backend}
    if v6:
        obj |= {"EnableIPv6": True, "IPv6Network": "fd00:198:19::/48"}
    return parse_net_conf(json.dumps(obj))


@pytest.fixture(autouse=True)
def key_file(tmp_path, monkeypatch):
    path = tmp_path / "flannel" / "wgkey"
    monkeypatch.setenv(KEY_FILE_ENV, str(path))
    return path


def _lease(
    subnet: str, ip: str, data, btype: str = "wireguard", subnet6=None, ip6=None, v6data=None
) -> Lease:
    attrs = LeaseAttrs(
        ipaddress.IPv4Address(ip), ipaddress.IPv6Address(ip6) if ip6 else None, btype, data, v6data
    )
    return Lease(ipaddress.IPv4Network(subnet), attrs, ipaddress.IPv6Network(subnet6) if subnet6 else None)


def test_key_created_0400_and_reused(key_file):
    key = load_or_create_key(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o400
    assert base64.b64decode(key_file.read_text().strip()) == key
    assert load_or_create_key(key_file) == key
    assert key[0] & 7 == 0  # clamped like `wg genkey`


@pytest.mark.parametrize("mode", [0o440, 0o404, 0o600 | 0o004, 0o420])
def test_key_refused_when_others_have_access(key_file, mode):
    load_or_create_key(key_file)
    os.chmod(key_file, mode)
    with pytest.raises(WireguardError, match="chmod 0400"):
        load_or_create_key(key_file)


def test_key_file_with_garbage_refused(key_file):
    key_file.parent.mkdir(parents=True)
    key_file.write_text("not a key\n")
    os.chmod(key_file, 0o600)
    with pytest.raises(WireguardError, match="base64 of 32 bytes"):
        load_or_create_key(key_file)


def test_defaults_mtu_and_backend_data(key_file):
    b = create_backend(_conf({"Type": "wireguard"}), None, IFACE)
    assert isinstance(b, WireguardBackend)
    assert (b.mtu, b.overhead, b.keepalive, b.psk) == (1420, 80, 0, None)
    pub = base64.b64encode(crypto.public_key(load_or_create_key(key_file))).decode()
    assert b.lease_attrs().to_json() == {
        "PublicIP": "198.18.0.1",
        "BackendType": "wireguard",
        "BackendData": {"PublicKey": pub, "Port": 51820},
    }


def test_options_and_ipv6_device(key_file):
    conf = _conf(
        {
            "Type": "wireguard",
            "ListenPort": 51000,
            "ListenPortV6": 51001,
            "PSK": PSK_B64,
            "MTU": 9000,
            "PersistentKeepaliveInterval": 25,
        },
        v6=True,
    )
    b = WireguardBackend(conf, None, IFACE6)
    assert (b.mtu, b.keepalive, b.psk) == (8920, 25, bytes(range(32)))
    assert [(d.name, d.port, d.endpoint, d.carries, d.bind) for d in b.devices] == [
        ("flannel-wg", 51000, "ipv4", (4,), "0.0.0.0"),
        ("flannel-wg-v6", 51001, "ipv6", (6,), "::"),
    ]
    attrs = b.lease_attrs().to_json()
    assert attrs["PublicIPv6"] == "fd00:198::1"
    assert attrs["BackendData"]["Port"] == 51000 and attrs["BackendV6Data"]["Port"] == 51001


V4_DEV = WgDevice("flannel-wg", 51820, "ipv4", (4,))
V6_DEV = WgDevice("flannel-wg-v6", 51821, "ipv6", (6,))


def test_peer_config_from_lease():
    data = {"PublicKey": base64.b64encode(PEER_KEY).decode(), "Port": 51999}
    cfg = peer_config(_lease("198.19.2.0/24", "198.18.0.2", data), V4_DEV, bytes(32), 25)
    assert cfg == {
        "public_key": data["PublicKey"],
        "endpoint": ["198.18.0.2", 51999],
        "allowed_ips": ["198.19.2.0/24"],
        "psk": base64.b64encode(bytes(32)).decode(),
        "keepalive": 25,
    }
    # Older flannel publishes no Port: our listen port is assumed.
    old = peer_config(
        _lease("198.19.2.0/24", "198.18.0.2", {"PublicKey": data["PublicKey"]}), V4_DEV, None, 0
    )
    assert old["endpoint"] == ["198.18.0.2", 51820] and old["psk"] is None


@pytest.mark.parametrize(
    ("data", "btype"),
    [
        ({"PublicKey": "short"}, "wireguard"),
        ({"PublicKey": base64.b64encode(b"x" * 31).decode()}, "wireguard"),
        ({}, "wireguard"),
        (None, "wireguard"),
        ({"PublicKey": base64.b64encode(PEER_KEY).decode(), "Port": 70000}, "wireguard"),
        ({"PublicKey": base64.b64encode(PEER_KEY).decode()}, "vxlan"),
    ],
)
def test_unusable_peer_leases_ignored(data, btype):
    assert peer_config(_lease("198.19.2.0/24", "198.18.0.2", data, btype), V4_DEV, None, 0) is None


def _dual_lease():
    data = {"PublicKey": base64.b64encode(PEER_KEY).decode(), "Port": 51820}
    data6 = {**data, "Port": 51821}
    return _lease(
        "198.19.2.0/24", "198.18.0.2", data, subnet6="fd00:198:19:2::/64", ip6="fd00:198::2", v6data=data6
    )


def test_ipv6_peer_uses_public_ipv6():
    cfg = peer_config(_dual_lease(), V6_DEV, None, 0)
    assert cfg["endpoint"] == ["fd00:198::2", 51821] and cfg["allowed_ips"] == ["fd00:198:19:2::/64"]


@pytest.mark.parametrize(
    ("mode", "have_ipv4", "endpoint"),
    [
        ("auto", True, ["::ffff:198.18.0.2", 51820]),  # IPv4 on both sides: preferred, via the v6 socket
        ("auto", False, ["fd00:198::2", 51821]),
        ("ipv4", True, ["198.18.0.2", 51820]),
        ("ipv6", True, ["fd00:198::2", 51821]),
    ],
)
def test_single_device_modes(key_file, mode, have_ipv4, endpoint):
    conf = _conf({"Type": "wireguard", "Mode": mode}, v6=True)
    b = WireguardBackend(conf, None, IFACE6)
    assert [(d.name, d.port, d.carries) for d in b.devices] == [("flannel-wg", 51820, (4, 6))]
    cfg = peer_config(_dual_lease(), b.devices[0], None, 0, have_ipv4=have_ipv4)
    assert cfg["endpoint"] == endpoint
    assert cfg["allowed_ips"] == ["198.19.2.0/24", "fd00:198:19:2::/64"]
    attrs = b.lease_attrs().to_json()
    assert attrs["BackendData"]["Port"] == attrs["BackendV6Data"]["Port"] == 51820


def test_plan_devices_ipv6_only():
    conf = parse_net_conf(
        json.dumps(
            {
                "EnableIPv4": False,
                "EnableIPv6": True,
                "IPv6Network": "fd00:198:19::/48",
                "Backend": {"Type": "wireguard"},
            }
        )
    )
    assert [(d.name, d.carries) for d in plan_devices(conf)] == [("flannel-wg-v6", (6,))]


def test_apply_tracks_peers_without_workers(key_file):
    b = WireguardBackend(_conf({"Type": "wireguard"}), None, IFACE)
    data = {"PublicKey": base64.b64encode(PEER_KEY).decode()}
    peer = _lease("198.19.2.0/24", "198.18.0.2", data)
    b.apply([Event(EventType.ADDED, peer)])
    assert [p["allowed_ips"] for p in b.peer_configs(b.devices[0])] == [["198.19.2.0/24"]]
    b.apply([Event(EventType.REMOVED, peer)])
    assert b.peer_configs(b.devices[0]) == []
    assert b.stats() == {"wireguard_worker_restarts": 0}
    assert b.check()  # nothing started, nothing to restart


def test_format_wg_show():
    stats = {
        "device": "flannel-wg",
        "listen_port": 51820,
        "public_key": "PUB=",
        "drop_replay": 2,
        "drop_decrypt_failed": 0,
        "peers": [
            {
                "public_key": "PEER=",
                "endpoint": "198.18.0.2:51820",
                "allowed_ips": ["198.19.2.0/24"],
                "latest_handshake": 1000.0,
                "rx_bytes": 3 * 1024 * 1024,
                "tx_bytes": 512,
                "persistent_keepalive": 25,
            }
        ],
    }
    text = format_wg_show(stats, now=1065.0)
    assert text.splitlines() == [
        "interface: flannel-wg",
        "  public key: PUB=",
        "  private key: (hidden)",
        "  listening port: 51820",
        "  drops: replay 2",
        "",
        "peer: PEER=",
        "  endpoint: 198.18.0.2:51820",
        "  allowed ips: 198.19.2.0/24",
        "  latest handshake: 1 minute, 5 seconds ago",
        "  transfer: 3.00 MiB received, 512 B sent",
        "  persistent keepalive: every 25 seconds",
    ]
    both = format_wg_show(
        {"flannel-wg": stats, "flannel-wg-v6": {**stats, "device": "flannel-wg-v6"}}, 1065.0
    )
    assert both.count("interface:") == 2
