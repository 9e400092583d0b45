"""`udpflannel wg show` against a health server in a namespace of the module's own: the wg(8)-like text,
--json, an IPv6 --healthz-ip, and one line on stderr when the port is not an agent's."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from udpflannel.host.health import HealthServer
from udpflannel.lab.netns import SERVICE_ADDR
from udpflannel.wg_cli import main

ADDR6 = "fd00:198::54"
KEY = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
DEVICES = {
    "flannel-wg": {
        "device": "flannel-wg",
        "public_key": KEY,
        "listen_port": 51820,
        "peers": [{"public_key": KEY, "endpoint": "198.18.0.2:51820", "allowed_ips": ["198.19.2.0/24"]}],
    }
}


@pytest.fixture(scope="module", autouse=True)
def _own_network(private_net: str) -> None:
    subprocess.run(["ip", "addr", "add", f"{ADDR6}/128", "dev", "lo", "nodad"], check=True)


@pytest.fixture
def serve() -> Iterator:
    made = []

    def start(host: str, view: object) -> int:
        srv = HealthServer(host, 0, dict, {"/wireguard": lambda: view})
        srv.start()
        made.append(srv)
        return srv.port

    yield start
    for srv in made:
        srv.stop()


@pytest.mark.parametrize("host", [SERVICE_ADDR, ADDR6])
def test_show(serve, capsys: pytest.CaptureFixture[str], host: str) -> None:
    port = serve(host, DEVICES)
    assert main(["show", "--healthz-ip", host, "--healthz-port", str(port)]) == 0
    out = capsys.readouterr().out
    assert "interface: flannel-wg" in out and "endpoint: 198.18.0.2:51820" in out
    assert main(["show", "--healthz-ip", host, "--healthz-port", str(port), "--json"]) == 0
    assert '"listen_port": 51820' in capsys.readouterr().out


@pytest.mark.parametrize("view", [[1, 2], {"flannel-wg": "x"}, "text", {"a": {"no": "peers"}}])
def test_an_answer_that_is_not_wireguard_devices(serve, capsys: pytest.CaptureFixture[str], view) -> None:
    port = serve(SERVICE_ADDR, view)
    assert main(["show", "--healthz-ip", SERVICE_ADDR, "--healthz-port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not answer with WireGuard devices" in err


def test_nothing_listening(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "--healthz-ip", SERVICE_ADDR, "--healthz-port", "9"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the agent running with --healthz-port?" in err
