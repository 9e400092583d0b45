"""WgPeerConfig survives the JSON control channel unchanged; endpoints print as wg(8) prints them."""

from __future__ import annotations

import json

from udpflannel.dataplane.wg_config import WgPeerConfig, format_endpoint


def test_peer_config_json_round_trip() -> None:
    full = WgPeerConfig(bytes(range(32)), ("fd00:198::2", 51820), ("198.19.2.0/24",), bytes(32 * [7]), 25)
    bare = WgPeerConfig(bytes(32 * [1]), None, ())
    for cfg in (full, bare):
        assert WgPeerConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert bare.to_json()["psk"] is None and bare.to_json()["endpoint"] is None


def test_format_endpoint() -> None:
    assert format_endpoint(("198.18.0.2", 51820)) == "198.18.0.2:51820"
    assert format_endpoint(("fd00:198::2", 51820)) == "[fd00:198::2]:51820"
    assert format_endpoint(None) is None
