"""WireguardBackend for real, in network namespaces: two udpflannel nodes fed each other's leases, and a
wireguard-go node configured from our published BackendData as a flannel node would be."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import pytest

from udpflannel.codec.wireguard import crypto
from udpflannel.lab.netns import Lab, LabError

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "interop"))
from wg_lab import have_wireguard_go, read_line  # noqa: E402

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="needs /dev/net/tun"),
]

PSK = base64.b64encode(bytes(range(7, 39))).decode()


def start(ns, index: int, tmp: pathlib.Path, dual: bool = False, mode: str = "separate") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WIREGUARD_KEY_FILE": str(tmp / f"wgkey{index}")}
    backend = json.dumps({"Type": "wireguard", "PSK": PSK, "PersistentKeepaliveInterval": 0, "Mode": mode})
    cmd = [sys.executable, str(HERE / "wg_backend_runner.py"), "--subnet", f"198.19.{index}.0/24"]
    cmd += ["--backend", backend]
    if dual:
        cmd += ["--subnet6", f"fd00:198:19:{index}::/64"]
    return subprocess.Popen(
        ns.cmd(*cmd),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def send(proc: subprocess.Popen, obj: dict, expect: str) -> dict:
    proc.stdin.write(json.dumps(obj) + "\n")
    proc.stdin.flush()
    return read_line(proc, expect, 15)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_two_nodes_from_leases_and_a_wireguard_go_node() -> None:
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="udpflannel-wgb-") as tmpdir:
        tmp = pathlib.Path(tmpdir)
        hub = lab.switch("hub")
        nodes = []
        for i in (1, 2, 3):
            ns = lab.netns(f"b{i}")
            lab.plug(ns, hub, f"198.18.0.{i}/24", f"p{i}")
            nodes.append(ns)
        procs = []
        try:
            leases = []
            for i in (1, 2):
                proc = start(nodes[i - 1], i, tmp)
                procs.append(proc)
                leases.append(read_line(proc, "ready", 30)["lease"])
            assert leases[0]["Attrs"]["BackendType"] == "wireguard"
            assert leases[0]["Attrs"]["BackendData"]["Port"] == 51820
            assert stat_mode(tmp / "wgkey1") == 0o400
            send(procs[0], {"op": "add", "lease": leases[1]}, "applied")
            send(procs[1], {"op": "add", "lease": leases[0]}, "applied")
            nodes[0].exec("ping", "-c", "3", "-i", "0.2", "-W", "3", "198.19.2.0")
            nodes[1].exec("ping", "-c", "2", "-i", "0.2", "-W", "3", "198.19.1.0")
            shown = send(procs[0], {"op": "show"}, "show")
            assert "interface: flannel-wg" in shown["show"]
            assert "latest handshake:" in shown["show"] and "198.18.0.2:51820" in shown["show"]
            assert shown["stats"]["handshakes"] == 1 and shown["stats"]["wireguard_peers"] == 1
            if have_wireguard_go():
                wireguard_go_peer(lab, nodes[2], procs[0], leases[0], tmp)
            # A crashed worker takes its TUN with it; the next stats/apply call brings the datapath back.
            send(procs[1], {"op": "kill_worker"}, "killed")
            shown = send(procs[1], {"op": "show"}, "show")
            assert shown["stats"]["wireguard_worker_restarts"] == 1
            nodes[0].exec("ping", "-c", "2", "-i", "0.2", "-W", "3", "198.19.2.0")
            # A removed lease takes the peer away: traffic to it is dropped as unknown.
            send(procs[0], {"op": "remove", "lease": leases[1]}, "applied")
            with pytest.raises(LabError):
                nodes[0].exec("ping", "-c", "1", "-W", "1", "198.19.2.0")
        finally:
            for proc in procs:
                stop(proc)
        # stop() removed the devices with their addresses and routes.
        out = nodes[0].exec("ip", "-o", "link", "show")
        assert "flannel-wg" not in out
        assert "198.19.0.0/16" not in nodes[0].exec("ip", "route", "show")


@pytest.mark.parametrize(
    ("mode", "endpoints"),
    [
        # flannel's Mode: two devices, or one carrying both families with IPv4 or IPv6 endpoints.
        ("separate", {"flannel-wg": "198.18.0.2:51820", "flannel-wg-v6": "[fd00:198::2]:51821"}),
        ("auto", {"flannel-wg": "[::ffff:198.18.0.2]:51820"}),
        ("ipv6", {"flannel-wg": "[fd00:198::2]:51820"}),
    ],
)
def test_dual_stack(mode: str, endpoints: dict[str, str]) -> None:
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="udpflannel-wgb-") as tmpdir:
        tmp = pathlib.Path(tmpdir)
        a, b = lab.netns("d1"), lab.netns("d2")
        lab.veth(a, b, "198.18.0.1/24", "198.18.0.2/24")
        a.exec("ip", "addr", "add", "fd00:198::1/64", "dev", "eth0", "nodad")
        b.exec("ip", "addr", "add", "fd00:198::2/64", "dev", "eth0", "nodad")
        procs = [start(a, 1, tmp, dual=True, mode=mode), start(b, 2, tmp, dual=True, mode=mode)]
        try:
            leases = [read_line(p, "ready", 30)["lease"] for p in procs]
            assert leases[0]["Attrs"]["PublicIPv6"] == "fd00:198::1"
            send(procs[0], {"op": "add", "lease": leases[1]}, "applied")
            send(procs[1], {"op": "add", "lease": leases[0]}, "applied")
            a.exec("ping", "-c", "2", "-i", "0.2", "-W", "3", "fd00:198:19:2::")
            a.exec("ping", "-c", "2", "-i", "0.2", "-W", "3", "198.19.2.0")
            shown = send(procs[0], {"op": "show"}, "show")["show"]
            assert shown.count("interface:") == len(endpoints)
            for device, endpoint in endpoints.items():
                assert f"interface: {device}\n" in shown + "\n" and f"endpoint: {endpoint}" in shown, shown
        finally:
            for proc in procs:
                stop(proc)


def stat_mode(path: pathlib.Path) -> int:
    return path.stat().st_mode & 0o777


def wireguard_go_peer(lab: Lab, ns, ours: subprocess.Popen, our_lease: dict, tmp: pathlib.Path) -> None:
    """Node 3 runs wireguard-go configured from our lease as flannel would, and publishes its own lease."""
    ifname = f"{lab.prefix}wgg"
    key = crypto.generate_private_key(os.urandom(32))
    keyfile, pskfile = tmp / "k3", tmp / "psk3"
    keyfile.write_text(base64.b64encode(key).decode())
    pskfile.write_text(PSK)
    ns.popen("wireguard-go", "-f", ifname)
    sock = pathlib.Path("/var/run/wireguard") / f"{ifname}.sock"
    for _ in range(200):
        if sock.exists():
            break
        time.sleep(0.05)
    data = our_lease["Attrs"]["BackendData"]
    ns.exec(
        "wg",
        "set",
        ifname,
        "private-key",
        str(keyfile),
        "listen-port",
        "51820",
        "peer",
        data["PublicKey"],
        "preshared-key",
        str(pskfile),
        "endpoint",
        f"{our_lease['Attrs']['PublicIP']}:{data['Port']}",
        "allowed-ips",
        our_lease["Subnet"],
    )
    ns.exec("ip", "link", "set", ifname, "mtu", "1420", "up")
    ns.exec("ip", "addr", "add", "198.19.3.0/32", "dev", ifname)
    ns.exec("ip", "route", "add", "198.19.0.0/16", "dev", ifname)
    lease3 = {
        "Subnet": "198.19.3.0/24",
        "Attrs": {
            "PublicIP": "198.18.0.3",
            "BackendType": "wireguard",
            "BackendData": {"PublicKey": base64.b64encode(crypto.public_key(key)).decode(), "Port": 51820},
        },
    }
    send(ours, {"op": "add", "lease": lease3}, "applied")
    ns.exec("ping", "-c", "3", "-i", "0.2", "-W", "3", "198.19.1.0")
