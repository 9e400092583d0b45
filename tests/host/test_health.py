"""The /healthz, /readyz and /metrics endpoints over real HTTP, on the loopback of a namespace the module
makes (tests/conftest.py private_net)."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request

import pytest

from udpflannel.host.health import HealthServer, render_metrics
from udpflannel.lab.netns import SERVICE_ADDR


@pytest.fixture(scope="module", autouse=True)
def _own_network(private_net: str) -> None:
    """Server and client in a namespace of the module's own."""


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{SERVICE_ADDR}:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_render_metrics_groups_drops_by_reason() -> None:
    text = render_metrics({"tx_packets_total": 5, "drop_bad_header": 2, "drop_replay": 1, "peers": 3})
    assert 'udpflannel_drops_total{reason="bad_header"} 2' in text
    assert 'udpflannel_drops_total{reason="replay"} 1' in text
    assert "udpflannel_tx_packets_total 5" in text
    assert "# TYPE udpflannel_peers gauge" in text


@pytest.fixture
def server():
    counters = {"rx_packets_total": 7}
    srv = HealthServer(SERVICE_ADDR, 0, lambda: counters)
    srv.start()
    yield srv, counters
    srv.stop()


def test_endpoints(server) -> None:
    srv, counters = server
    assert get(srv.port, "/healthz") == (200, "ok\n")
    assert get(srv.port, "/readyz")[0] == 503
    srv.ready.set()
    assert get(srv.port, "/readyz") == (200, "ok\n")
    counters["rx_packets_total"] = 9
    assert "udpflannel_rx_packets_total 9" in get(srv.port, "/metrics")[1]
    assert get(srv.port, "/nope")[0] == 404


def test_json_views_and_a_failing_view() -> None:
    def broken() -> object:
        raise RuntimeError("worker gone")

    srv = HealthServer(
        SERVICE_ADDR, 0, dict, {"/wireguard": lambda: {"flannel-wg": {"peers": []}}, "/x": broken}
    )
    srv.start()
    try:
        assert get(srv.port, "/wireguard") == (200, '{"flannel-wg": {"peers": []}}\n')
        code, body = get(srv.port, "/x")
        assert code == 503 and "worker gone" in body
        assert get(srv.port, "/healthz")[0] == 200
    finally:
        srv.stop()


SERVICE_ADDR6 = "fd00:198::53"


@pytest.fixture(scope="module")
def service_addr6() -> str:
    """An IPv6 address on the module namespace's loopback (nodad: usable at once)."""
    subprocess.run(["ip", "addr", "add", f"{SERVICE_ADDR6}/128", "dev", "lo", "nodad"], check=True)
    return SERVICE_ADDR6


def test_an_ipv6_healthz_ip(service_addr6: str) -> None:
    """--healthz-ip takes an IPv6 address, as flanneld's does (the server was IPv4-only: gaierror)."""
    srv = HealthServer(service_addr6, 0, dict)
    srv.start()
    try:
        with urllib.request.urlopen(f"http://[{service_addr6}]:{srv.port}/healthz", timeout=5) as resp:
            assert (resp.status, resp.read()) == (200, b"ok\n")
    finally:
        srv.stop()


def test_a_port_in_use_is_an_oserror_at_construction(server) -> None:
    srv, _ = server
    with pytest.raises(OSError):
        HealthServer(SERVICE_ADDR, srv.port, dict)
