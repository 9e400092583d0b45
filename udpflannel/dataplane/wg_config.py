"""How the WireGuard backend describes a peer to its datapath worker (JSON lines on the worker's control
channel), and endpoints written as wg(8) shows them."""

from __future__ import annotations

import base64
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WgPeerConfig:
    """One peer as the worker is told about it by the backend."""

    public_key: bytes
    endpoint: tuple[str, int] | None
    allowed_ips: tuple[str, ...]
    preshared_key: bytes | None = None
    persistent_keepalive: int = 0

    def to_json(self) -> dict:
        return {
            "public_key": base64.b64encode(self.public_key).decode(),
            "endpoint": list(self.endpoint) if self.endpoint else None,
            "allowed_ips": list(self.allowed_ips),
            "psk": base64.b64encode(self.preshared_key).decode() if self.preshared_key else None,
            "keepalive": self.persistent_keepalive,
        }

    @classmethod
    def from_json(cls, obj: dict) -> WgPeerConfig:
        ep = obj.get("endpoint")
        return cls(
            public_key=base64.b64decode(obj["public_key"]),
            endpoint=(str(ep[0]), int(ep[1])) if ep else None,
            allowed_ips=tuple(obj.get("allowed_ips", ())),
            preshared_key=base64.b64decode(obj["psk"]) if obj.get("psk") else None,
            persistent_keepalive=int(obj.get("keepalive") or 0),
        )


def format_endpoint(endpoint: tuple | None) -> str | None:
    """host:port as wg(8) prints it ([v6]:port for IPv6)."""
    if endpoint is None:
        return None
    host, port = endpoint[0], endpoint[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
