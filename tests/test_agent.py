"""`udpflannel run` end to end in a namespace: lease, subnet.env, health, clean stop, nothing half-done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from udpflannel.lab.netns import Lab, Netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and TUN")

UDPFLANNEL = str(Path(sys.executable).with_name("udpflannel"))


def start_agent(
    ns: Netns,
    tmp: Path,
    *extra: str,
    backend: str = "vxlan",
    subnet_file: Path | None = None,
    conf: dict | None = None,
    **popen,
) -> subprocess.Popen:
    net_conf = {"Network": "198.19.0.0/16", "Backend": {"Type": backend}, **(conf or {})}
    (tmp / "net-conf.json").write_text(json.dumps(net_conf))
    return subprocess.Popen(
        ns.cmd(
            UDPFLANNEL,
            "run",
            "--sqlite-path",
            str(tmp / "leases.db"),
            "--subnet-file",
            str(subnet_file or tmp / "subnet.env"),
            "--net-config-path",
            str(tmp / "net-conf.json"),
            *extra,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def wait_for(path: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def leases(tmp: Path) -> list[dict]:
    out = subprocess.run(
        [UDPFLANNEL, "leases", "--sqlite-path", str(tmp / "leases.db"), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.fixture
def node():
    with Lab() as lab:
        a, b = lab.netns("a"), lab.netns("b")
        lab.veth(a, b, "198.18.0.1/24", "198.18.0.2/24", name_a="eth1", name_b="eth1")
        yield a


@pytest.mark.parametrize(("backend", "dev", "mtu"), [("vxlan", "flannel.1", 1450), ("udp", "flannel0", 1472)])
def test_run_leases_writes_subnet_env_and_stops_clean(
    node: Netns, tmp_path: Path, backend: str, dev: str, mtu: int
) -> None:
    proc = start_agent(node, tmp_path, "--iface", "eth1", "--healthz-port", "9911", backend=backend)
    try:
        wait_for(tmp_path / "subnet.env")
        env = dict(line.split("=", 1) for line in (tmp_path / "subnet.env").read_text().splitlines())
        assert env["FLANNEL_NETWORK"] == "198.19.0.0/16"
        assert env["FLANNEL_MTU"] == str(mtu)
        assert env["FLANNEL_SUBNET"].endswith(".1/24")
        [lease] = leases(tmp_path)
        assert lease["Attrs"]["PublicIP"] == "198.18.0.1"
        assert env["FLANNEL_SUBNET"].rsplit(".", 1)[0] == lease["Subnet"].rsplit(".", 1)[0]
        assert dev in node.exec("ip", "-br", "link")
        assert dev in node.exec("ip", "route", "show", "198.19.0.0/16")
        ready = node.exec(
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:9911/readyz"
        )
        assert ready == "200"
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert dev not in node.exec("ip", "-br", "link"), "the agent left its TUN behind"
    # flannel keeps the lease on a clean stop, so a restart gets the same subnet.
    assert len(leases(tmp_path)) == 1


def test_restart_keeps_subnet(node: Netns, tmp_path: Path) -> None:
    subnets = []
    for _ in range(2):
        proc = start_agent(node, tmp_path, "--iface", "eth1")
        try:
            wait_for(tmp_path / "subnet.env")
            subnets.append([lease["Subnet"] for lease in leases(tmp_path)])
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=15)
        (tmp_path / "subnet.env").unlink()
    assert subnets[0] == subnets[1] and len(subnets[0]) == 1


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (("--iface", "nope0"), {}, "no interface matches --iface nope0"),
        (("--iface", "eth1", "--public-ip", "not-an-ip"), {}, "public-ip"),
        (
            ("--iface", "eth1", "--healthz-port", "9915", "--healthz-ip", "198.18.7.7"),
            {},
            "cannot serve /healthz on 198.18.7.7 port 9915: Cannot assign requested address",
        ),
        (("--iface", "eth1"), {"UDPFLANNEL_WORKERS": "3"}, "UDPFLANNEL_WORKERS must be 1 or 2, not '3'"),
    ],
)
def test_bad_input_exits_2_with_nothing_created(
    node: Netns, tmp_path: Path, args: tuple, env: dict, needle: str
) -> None:
    proc = start_agent(node, tmp_path, *args, env={**os.environ, **env})
    _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    lines = [line for line in err.splitlines() if line.startswith("udpflannel:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "subnet.env").exists()
    assert "flannel" not in node.exec("ip", "-br", "link")
    if (tmp_path / "leases.db").exists():
        assert leases(tmp_path) == []


@pytest.mark.parametrize("where", ["under-a-file", "a-directory"])
def test_unwritable_subnet_file_exits_2_with_nothing_created(node: Netns, tmp_path: Path, where: str) -> None:
    (tmp_path / "plain").write_text("")
    path = tmp_path / "plain" / "subnet.env" if where == "under-a-file" else tmp_path
    proc = start_agent(node, tmp_path, "--iface", "eth1", subnet_file=path)
    _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    lines = [line for line in err.splitlines() if line.startswith("udpflannel:")]
    assert len(lines) == 1 and f"cannot write --subnet-file '{path}'" in lines[0], err
    assert "flannel" not in node.exec("ip", "-br", "link")
    assert leases(tmp_path) == []


@pytest.mark.parametrize("backend", ["vxlan", "wireguard"])
def test_ctrl_c_stops_quietly(node: Netns, tmp_path: Path, backend: str) -> None:
    """Ctrl-C signals the terminal's whole process group, datapath workers included: the agent stops
    them in order, and no worker prints a KeyboardInterrupt traceback."""
    env = {**os.environ, "WIREGUARD_KEY_FILE": str(tmp_path / "wgkey")}
    proc = start_agent(node, tmp_path, "--iface", "eth1", backend=backend, env=env, start_new_session=True)
    try:
        wait_for(tmp_path / "subnet.env")
        time.sleep(0.5)  # the workers are polling
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert "flannel" not in node.exec("ip", "-br", "link")


def _wait_until(check, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("nftables", [False, True], ids=["iptables", "nftables"])
def test_ip_masq_rules_are_kept_in_place(node: Netns, tmp_path: Path, nftables: bool) -> None:
    """--ip-masq and the default --iptables-forward-rules install flanneld's rules for our lease; one that
    someone deletes is back within --iptables-resync; a clean stop leaves them, as flanneld does."""
    conf = {"EnableNFTables": True} if nftables else None
    proc = start_agent(node, tmp_path, "--iface", "eth1", "--ip-masq", "--iptables-resync", "1", conf=conf)
    try:
        wait_for(tmp_path / "subnet.env")
        [lease] = leases(tmp_path)
        subnet = lease["Subnet"]
        if nftables:
            table = ["nft", "list", "table", "ip", "flannel-ipv4"]
            masq = "ip saddr 198.19.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random"
            assert f"ip saddr {subnet} ip daddr 198.19.0.0/16 return" in node.exec(*table)
            node.exec("nft", "delete", "chain", "ip", "flannel-ipv4", "postrtg")
        else:
            table = ["iptables-save"]
            masq = "-A FLANNEL-POSTRTG -s 198.19.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully"
            saved = node.exec(*table)
            assert f"-A FLANNEL-POSTRTG -s {subnet} -d 198.19.0.0/16 -j RETURN" in saved
            assert "-A FLANNEL-FWD -s 198.19.0.0/16 -j ACCEPT" in saved
            node.exec("iptables", "-t", "nat", "-D", *masq.split()[1:])
        assert masq not in node.exec(*table)
        assert _wait_until(lambda: masq in node.exec(*table, check=False)), (
            "the deleted rule did not come back"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "put back" in err
    assert masq in node.exec(*table)


def test_ip_blackhole_route_for_the_lease(node: Netns, tmp_path: Path) -> None:
    proc = start_agent(node, tmp_path, "--iface", "eth1", "--ip-blackhole-route")
    try:
        wait_for(tmp_path / "subnet.env")
        [lease] = leases(tmp_path)
        assert f"blackhole {lease['Subnet']} proto static metric 65535" in node.exec("ip", "route")
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "blackhole" not in node.exec("ip", "route")


def test_metrics_endpoint(node: Netns, tmp_path: Path) -> None:
    proc = start_agent(node, tmp_path, "--iface", "eth1", "--healthz-port", "9912")
    try:
        wait_for(tmp_path / "subnet.env")
        text = node.exec("curl", "-s", "http://127.0.0.1:9912/metrics")
        assert "udpflannel_peers 0" in text
        assert node.exec("curl", "-s", "http://127.0.0.1:9912/healthz") == "ok\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)


def test_two_wireguard_agents_handshake_and_wg_show(tmp_path: Path) -> None:
    with Lab() as lab:
        a, b = lab.netns("a"), lab.netns("b")
        lab.veth(a, b, "198.18.0.1/24", "198.18.0.2/24", name_a="eth1", name_b="eth1")
        procs = []
        try:
            for ns, name in ((a, "a"), (b, "b")):
                d = tmp_path / name
                d.mkdir()
                env = {**os.environ, "WIREGUARD_KEY_FILE": str(d / "wgkey")}
                conf = {"Network": "198.19.0.0/16", "Backend": {"Type": "wireguard"}}
                (d / "net-conf.json").write_text(json.dumps(conf))
                args = ["--sqlite-path", str(tmp_path / "leases.db"), "--subnet-file", str(d / "subnet.env")]
                args += [
                    "--net-config-path",
                    str(d / "net-conf.json"),
                    "--iface",
                    "eth1",
                    "--healthz-port",
                    "9913",
                ]
                procs.append(
                    subprocess.Popen(
                        ns.cmd(UDPFLANNEL, "run", *args), env=env, stderr=subprocess.PIPE, text=True
                    )
                )
            for name in ("a", "b"):
                wait_for(tmp_path / name / "subnet.env")
            assert oct((tmp_path / "a" / "wgkey").stat().st_mode & 0o777) == "0o400"
            subnet_b = next(
                lease["Subnet"] for lease in leases(tmp_path) if lease["Attrs"]["PublicIP"] == "198.18.0.2"
            )
            target = subnet_b.split("/")[0]
            # The first pings may be spent on the handshake and on the peer event reaching the agent.
            ok = any(
                a.exec("ping", "-c", "1", "-W", "1", target, check=False, timeout=5).find(" 0% packet loss")
                >= 0
                for _ in range(15)
            )
            assert ok, f"no reply from {target} over WireGuard"
            shown = a.exec(UDPFLANNEL, "wg", "show", "--healthz-port", "9913")
            assert "interface: flannel-wg" in shown
            assert "endpoint: 198.18.0.2:51820" in shown
            assert "latest handshake:" in shown
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=15)
        assert all(proc.returncode == 0 for proc in procs)


def test_ip_masq_without_the_tool_is_refused_before_leasing(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from udpflannel import agent as agent_mod
    from udpflannel.config import parse_net_conf
    from udpflannel.options import build_options

    monkeypatch.setattr(agent_mod, "missing_tools", lambda versions, nftables: ["iptables"])
    conf = parse_net_conf('{"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan"}}')
    masq = agent_mod.Agent(build_options({"ip-masq": True, "sqlite-path": "/x.db"}, {}), threading.Event())
    with pytest.raises(agent_mod.AgentError, match=r"--ip-masq needs iptables, which this host lacks") as err:
        masq._check_rule_tools(conf)
    assert err.value.code == agent_mod.EXIT_CONFIG
    # The forward rules are on by default: without the tool they are left out, with a warning.
    plain = agent_mod.Agent(build_options({"sqlite-path": "/x.db"}, {}), threading.Event())
    plain._check_rule_tools(conf)
    assert plain._forward_ok is False
