"""The `udpflannel` command: flanneld's flags and defaults, FLANNELD_* precedence, exit codes, leases."""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from udpflannel import __version__, cli, options
from udpflannel.cli import format_leases, main, normalise_argv
from udpflannel.lease.model import Lease, LeaseAttrs
from udpflannel.options import (
    FLAGS,
    RunOptions,
    StoreUnavailable,
    build_options,
    open_store,
)

EXE = Path(sys.executable).with_name("udpflannel")
GOOD_CONF = '{"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan"}}'

# spec/flannel.md, flanneld's flags and defaults, written out here (not derived from the table under test).
FLANNELD_DEFAULTS: dict[str, Any] = {
    "etcd-endpoints": "http://127.0.0.1:4001,http://127.0.0.1:2379",
    "etcd-prefix": "/coreos.com/network",
    "etcd-keyfile": "",
    "etcd-certfile": "",
    "etcd-cafile": "",
    "etcd-username": "",
    "etcd-password": "",
    "kube-subnet-mgr": False,
    "kube-api-url": "",
    "kubeconfig-file": "",
    "kube-annotation-prefix": "flannel.alpha.coreos.com",
    "net-config-path": "/etc/kube-flannel/net-conf.json",
    "iface": (),
    "iface-regex": (),
    "iface-can-reach": "",
    "public-ip": "",
    "public-ipv6": "",
    "subnet-file": "/run/flannel/subnet.env",
    "subnet-lease-renew-margin": 60,
    "ip-masq": False,
    "ip-masq-fully-random-disable": False,
    "iptables-resync": 5,
    "iptables-forward-rules": True,
    "healthz-ip": "0.0.0.0",
    "healthz-port": 0,
    "set-node-network-unavailable": True,
}

# A non-default value for every flag: (command-line / env text, the typed value RunOptions must hold).
SAMPLES: dict[str, tuple[str, Any]] = {
    "etcd-endpoints": ("http://127.0.0.1:23790", "http://127.0.0.1:23790"),
    "etcd-prefix": ("/udpflannel/network", "/udpflannel/network"),
    "etcd-keyfile": ("/k.pem", "/k.pem"),
    "etcd-certfile": ("/c.pem", "/c.pem"),
    "etcd-cafile": ("/ca.pem", "/ca.pem"),
    "etcd-username": ("root", "root"),
    "etcd-password": ("s3cret", "s3cret"),
    "kube-subnet-mgr": ("true", True),
    "kube-api-url": ("https://198.18.0.10:6443", "https://198.18.0.10:6443"),
    "kubeconfig-file": (__file__, __file__),  # a file that exists: the agent checks the path
    "kube-annotation-prefix": ("example.com", "example.com"),
    "net-config-path": ("/etc/net-conf.json", "/etc/net-conf.json"),
    "iface": ("eth1", ("eth1",)),
    "iface-regex": ("^veth.*", ("^veth.*",)),
    "iface-can-reach": ("198.18.0.1", "198.18.0.1"),
    "public-ip": ("198.18.0.5", "198.18.0.5"),
    "public-ipv6": ("fd00:198::5", "fd00:198::5"),
    "subnet-file": ("/tmp/x/subnet.env", "/tmp/x/subnet.env"),
    "subnet-lease-renew-margin": ("30", 30),
    "ip-masq": ("true", True),
    "ip-masq-fully-random-disable": ("1", True),
    "iptables-resync": ("0x10", 16),
    "iptables-forward-rules": ("false", False),
    "healthz-ip": ("198.18.0.1", "198.18.0.1"),
    "healthz-port": ("8471", 8471),
    "set-node-network-unavailable": ("F", False),
    "sqlite-path": ("/tmp/leases.db", "/tmp/leases.db"),
    "ip-blackhole-route": ("true", True),
    "persistent-mac": ("true", True),
    "v": ("2", 2),
}


def field(name: str) -> str:
    return "verbosity" if name == "v" else name.replace("-", "_")


class FakeAgent:
    """Stands in for udpflannel.agent: records the options run_agent was called with."""

    def __init__(self, code: int = 0) -> None:
        self.code = code
        self.calls: list[RunOptions] = []

    def run_agent(self, opts: RunOptions) -> int:
        self.calls.append(opts)
        return self.code


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> FakeAgent:
    fake = FakeAgent()
    module = types.ModuleType("udpflannel.agent")
    module.run_agent = fake.run_agent  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "udpflannel.agent", module)
    return fake


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test process may run inside a flanneld-like environment; none of it may leak into these tests.
    for key in list(__import__("os").environ):
        if key.startswith("FLANNELD_"):
            monkeypatch.delenv(key)


@pytest.fixture
def conf_file(tmp_path: Path) -> Path:
    path = tmp_path / "net-conf.json"
    path.write_text(GOOD_CONF)
    return path


# --- the flag table -------------------------------------------------------------------------------------


def test_every_flanneld_flag_has_flanneld_default() -> None:
    opts = build_options({}, {})
    for name, default in FLANNELD_DEFAULTS.items():
        assert getattr(opts, field(name)) == default, name
    assert opts.explicit == frozenset() and opts.net_config is None and opts.store_kind == "etcd"


def test_table_covers_spec_and_runoptions() -> None:
    names = {f.name for f in FLAGS}
    assert set(FLANNELD_DEFAULTS) <= names
    assert set(SAMPLES) == names  # every flag has a sample below, so every flag is exercised
    assert {field(n) for n in names} == set(options.option_fields())
    for flag in FLAGS:  # the table's defaults and the dataclass defaults are the same numbers
        assert getattr(RunOptions(), flag.dest) == flag.default, flag.name


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_flag_from_command_line_and_env(name: str) -> None:
    text, value = SAMPLES[name]
    given = [text] if name in ("iface", "iface-regex") else text
    from_cli = build_options({name: given}, {})
    env_name = "FLANNELD_" + name.upper().replace("-", "_")
    from_env = build_options({}, {env_name: text})
    assert getattr(from_cli, field(name)) == value
    assert getattr(from_env, field(name)) == value
    assert from_cli.explicit == from_env.explicit == frozenset({name})


def test_full_flanneld_command_line(agent: FakeAgent, conf_file: Path, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"  # with --kube-subnet-mgr the agent reads it before starting
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    argv = ["run"]
    for name, (text, _) in SAMPLES.items():
        if name in ("sqlite-path", "net-config-path", "kubeconfig-file"):
            continue  # --sqlite-path conflicts with --kube-subnet-mgr; net-conf comes from conf_file
        argv.append(f"--{name}={text}")
    argv += ["--net-config-path", str(conf_file), "--iface", "198.18.0.3", f"--kubeconfig-file={kubeconfig}"]
    assert main(argv, {}) == 0
    (opts,) = agent.calls
    assert opts.kubeconfig_file == str(kubeconfig)
    for name, (_, value) in SAMPLES.items():
        if name == "iface":
            assert opts.iface == ("eth1", "198.18.0.3")  # repeatable, in order
        elif name not in ("sqlite-path", "net-config-path", "kubeconfig-file"):
            assert getattr(opts, field(name)) == value, name
    assert opts.store_kind == "kube"
    assert opts.net_config is not None and opts.net_config.backend.type == "vxlan"


# --- precedence -----------------------------------------------------------------------------------------

PRECEDENCE = [
    # (argv, env, expected subnet_file)
    ([], {}, "/run/flannel/subnet.env"),
    ([], {"FLANNELD_SUBNET_FILE": "/env/subnet.env"}, "/env/subnet.env"),
    (["--subnet-file", "/cli/subnet.env"], {"FLANNELD_SUBNET_FILE": "/env/subnet.env"}, "/cli/subnet.env"),
    (["--subnet-file=/cli/subnet.env"], {}, "/cli/subnet.env"),
    ([], {"FLANNELD_SUBNET_FILE": ""}, "/run/flannel/subnet.env"),  # empty counts as unset (flagutil)
    ([], {"flanneld_subnet_file": "/lower"}, "/run/flannel/subnet.env"),  # names are upper case only
]


@pytest.mark.parametrize(("argv", "env", "expected"), PRECEDENCE)
def test_command_line_beats_env(
    agent: FakeAgent, argv: list[str], env: dict[str, str], expected: str
) -> None:
    assert main(["run", *argv], env) == 0
    assert agent.calls[0].subnet_file == expected


BOOLS = [
    (["--ip-masq"], {}, True),
    (["--ip-masq=true"], {}, True),
    (["--ip-masq=false"], {}, False),
    (["--ip-masq=0"], {}, False),
    (["--ip-masq", "false"], {}, False),
    (["-ip-masq"], {}, True),  # Go's flag package takes one dash too
    ([], {"FLANNELD_IP_MASQ": "true"}, True),
    ([], {"FLANNELD_IP_MASQ": "TRUE"}, True),
    (["--ip-masq=false"], {"FLANNELD_IP_MASQ": "true"}, False),
]


@pytest.mark.parametrize(("argv", "env", "expected"), BOOLS)
def test_bool_flags(agent: FakeAgent, argv: list[str], env: dict[str, str], expected: bool) -> None:
    assert main(["run", *argv], env) == 0
    assert agent.calls[0].ip_masq is expected


def test_iface_repeatable_and_env(agent: FakeAgent) -> None:
    assert main(["run", "--iface", "eth1", "--iface=198.18.0.2", "--iface-regex", "^e"], {}) == 0
    assert agent.calls[-1].iface == ("eth1", "198.18.0.2") and agent.calls[-1].iface_regex == ("^e",)
    assert main(["run"], {"FLANNELD_IFACE": "eth1,eth2", "FLANNELD_IFACE_REGEX": "^(a|b){1,2}$"}) == 0
    assert agent.calls[-1].iface == ("eth1", "eth2") and agent.calls[-1].iface_regex == ("^(a|b){1,2}$",)
    assert main(["run", "--iface", "eth9"], {"FLANNELD_IFACE": "eth1"}) == 0
    assert agent.calls[-1].iface == ("eth9",)


@pytest.mark.parametrize(
    ("argv", "env", "level"),
    [
        ([], {}, 0),
        (["-v"], {}, 1),
        (["-vv"], {}, 2),
        (["-v", "-v", "-v"], {}, 3),
        (["--v=2"], {}, 2),
        (["-v=2"], {}, 2),
        ([], {"FLANNELD_V": "1"}, 1),
        (["-vv", "--v=1"], {}, 2),
    ],
)
def test_verbosity(agent: FakeAgent, argv: list[str], env: dict[str, str], level: int) -> None:
    assert main(["run", *argv], env) == 0
    assert agent.calls[0].verbosity == level


def test_flanneld_style_invocation_implies_run(agent: FakeAgent) -> None:
    assert normalise_argv(["-ip-masq", "-etcd-prefix=/x", "--iface", "-v"]) == [
        "run",
        "--ip-masq",
        "--etcd-prefix=/x",
        "--iface",
        "-v",
    ]
    assert normalise_argv(["leases", "-json"]) == ["leases", "--json"]
    assert normalise_argv(["--version"]) == ["--version"]
    assert main(["--ip-masq", "-healthz-port=8471"], {}) == 0
    assert agent.calls[0].ip_masq and agent.calls[0].healthz_port == 8471


# --- errors: one line, exit 2, nothing created ----------------------------------------------------------

BAD_FLAGS = [
    (["--healthz-port", "abc"], {}, "udpflannel: --healthz-port: 'abc' is not a whole number"),
    ([], {"FLANNELD_HEALTHZ_PORT": "abc"}, "udpflannel: FLANNELD_HEALTHZ_PORT: 'abc' is not a whole number"),
    (["--ip-masq=maybe"], {}, "udpflannel: --ip-masq: 'maybe' is not true or false"),
    ([], {"FLANNELD_IP_MASQ": "yes"}, "udpflannel: FLANNELD_IP_MASQ: 'yes' is not true or false"),
    (["--subnet-lease-renew-margin=0"], {}, "udpflannel: --subnet-lease-renew-margin 0 is out of range"),
    (
        ["--subnet-lease-renew-margin=1440"],
        {},
        "udpflannel: --subnet-lease-renew-margin 1440 is out of range",
    ),
    (["--healthz-port=70000"], {}, "udpflannel: --healthz-port 70000 is out of range"),
    (["--iptables-resync=0"], {}, "udpflannel: --iptables-resync 0 must be at least 1 second"),
    (["--public-ip=fd00::1"], {}, "udpflannel: --public-ip 'fd00::1' is not an IPv4 address"),
    (["--public-ipv6=198.18.0.1"], {}, "udpflannel: --public-ipv6 '198.18.0.1' is not an IPv6 address"),
    (["--healthz-ip=localhost"], {}, "udpflannel: --healthz-ip 'localhost' is not an IP address"),
    (["--iface-regex=("], {}, "udpflannel: --iface-regex '(' is not a valid regex"),
    (["--etcd-endpoints="], {}, "udpflannel: --etcd-endpoints is empty"),
    (["--etcd-endpoints=::::"], {}, "udpflannel: --etcd-endpoints: etcd endpoint '::::' is not http(s)://"),
    (
        [],
        {"FLANNELD_ETCD_ENDPOINTS": "http://198.18.0.1:2379,http://198.18.0.2:99999"},
        "udpflannel: --etcd-endpoints: etcd endpoint 'http://198.18.0.2:99999' is not http(s)://",
    ),
    (["--etcd-endpoints=ftp://198.18.0.1:2379"], {}, "udpflannel: --etcd-endpoints: etcd endpoint 'ftp:"),
    (["--sqlite-path=/x.db", "--kube-subnet-mgr"], {}, "udpflannel: --sqlite-path and --kube-subnet-mgr"),
    (
        ["--kube-subnet-mgr", "--kubeconfig-file=/nonexistent/kubeconfig"],
        {},
        "udpflannel: --kubeconfig-file '/nonexistent/kubeconfig' is not a file",
    ),
    (["--etcd-endpoints=http://x y:2379"], {}, "udpflannel: --etcd-endpoints: etcd endpoint 'http://x y"),
    (
        ["--sqlite-path=/x.db"],
        {"FLANNELD_ETCD_ENDPOINTS": "http://127.0.0.1:1"},
        "udpflannel: --sqlite-path and",
    ),
    (["--bogus"], {}, "udpflannel: unrecognized arguments: --bogus"),
    (["--healthz-port"], {}, "udpflannel run: argument --healthz-port: expected one argument"),
]


@pytest.mark.parametrize(("argv", "env", "message"), BAD_FLAGS)
def test_bad_flags(agent: FakeAgent, capsys: pytest.CaptureFixture[str], argv, env, message: str) -> None:
    assert main(["run", *argv], env) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert agent.calls == []


def test_a_malformed_kubeconfig_is_bad_config(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Found before the agent starts: exit 2 and one line, as for any bad flag."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("- a\n- b\n")
    assert main(["run", "--kube-subnet-mgr", f"--kubeconfig-file={kubeconfig}"], {}) == 2
    err = capsys.readouterr().err
    said = f"udpflannel: --kubeconfig-file: cannot load kubeconfig {kubeconfig}: it is a YAML list"
    assert err.startswith(said)
    assert err.count("\n") == 1
    assert agent.calls == []


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ('{"EnableIPv4": false}', "udpflannel: net-conf: EnableIPv4 and EnableIPv6 are both false"),
        ("not json", "udpflannel: net-conf: not valid JSON"),
        (
            '{"Network": "198.19.0.0/16", "Backend": {"Type": "ipip"}}',
            "udpflannel: net-conf: Backend.Type 'ipip'",
        ),
        (None, "udpflannel: net-conf: cannot read"),
    ],
)
@pytest.mark.parametrize("mode", ["--sqlite-path", "--kube-subnet-mgr"])
def test_bad_config_exits_2_and_creates_nothing(
    agent: FakeAgent,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    conf: str | None,
    message: str,
    mode: str,
) -> None:
    path = tmp_path / "net-conf.json"
    if conf is not None:
        path.write_text(conf)
    before = _tree(tmp_path)
    argv = ["run", "--net-config-path", str(path), "--subnet-file", str(tmp_path / "run" / "subnet.env")]
    argv += ["--sqlite-path", str(tmp_path / "db" / "leases.db")] if mode == "--sqlite-path" else [mode]
    assert main(argv, {}) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert _tree(tmp_path) == before  # no subnet file, no store file, no directories
    assert agent.calls == []


def test_bad_config_subprocess(tmp_path: Path) -> None:
    path = tmp_path / "net-conf.json"
    path.write_text('{"Network": "198.19.0.0/16", "SubnetLen": 31}')
    proc = subprocess.run(
        [
            str(EXE),
            "run",
            "--sqlite-path",
            str(tmp_path / "s.db"),
            "--subnet-file",
            str(tmp_path / "sub.env"),
        ],
        env={"FLANNELD_NET_CONFIG_PATH": str(path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        "udpflannel: net-conf: SubnetLen 31 is too long for Network 198.19.0.0/16: "
        "use a value between 18 and 30\n"
    )
    assert proc.stdout == ""
    assert _tree(tmp_path) == ["net-conf.json"]


# --- run ------------------------------------------------------------------------------------------------


def test_run_passes_options_and_exit_code(
    monkeypatch: pytest.MonkeyPatch, agent: FakeAgent, conf_file: Path
) -> None:
    agent.code = 3
    code = main(["run", "--sqlite-path", "/nonexistent/leases.db", "--net-config-path", str(conf_file)], {})
    assert code == 3
    (opts,) = agent.calls
    assert opts.store_kind == "sqlite" and opts.sqlite_path == "/nonexistent/leases.db"
    assert opts.net_config.network == ipaddress.ip_network("198.19.0.0/16")
    assert opts.explicit == frozenset({"sqlite-path", "net-config-path"})
    with pytest.raises(AttributeError):
        opts.ip_masq = True  # type: ignore[misc]


def test_etcd_mode_reads_no_file(agent: FakeAgent) -> None:
    # In etcd mode the net-conf lives in the store (<prefix>/config): the agent reads it from there.
    assert main(["run", "--net-config-path", "/nonexistent.json"], {}) == 0
    assert agent.calls[0].net_config is None and agent.calls[0].store_kind == "etcd"


def test_kube_mode_skips_allocation_checks(agent: FakeAgent, tmp_path: Path) -> None:
    path = tmp_path / "net-conf.json"
    path.write_text('{"Network": "198.19.0.0/30"}')  # too small for etcd/SQLite allocation, fine in kube mode
    assert main(["run", "--kube-subnet-mgr", "--net-config-path", str(path)], {}) == 0
    assert agent.calls[0].net_config.network == ipaddress.ip_network("198.19.0.0/30")


def test_run_without_agent_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "udpflannel.agent", None)  # makes the import fail as if missing
    assert main(["run"], {}) == 1
    assert (
        capsys.readouterr().err == "udpflannel: the node agent (udpflannel.agent) is not part of this build\n"
    )


# --- version and help -----------------------------------------------------------------------------------


def test_version_subprocess() -> None:
    proc = subprocess.run([str(EXE), "--version"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, f"udpflannel {__version__}\n")


@pytest.mark.parametrize("argv", [["--version"], ["version"], ["run", "--version"]])
def test_version_in_process(capsys: pytest.CaptureFixture[str], agent: FakeAgent, argv: list[str]) -> None:
    assert main(argv, {}) == 0
    assert capsys.readouterr().out == f"udpflannel {__version__}\n"
    assert agent.calls == []


def test_run_help_lists_every_flag() -> None:
    proc = subprocess.run([str(EXE), "run", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in FLAGS:
        assert f"--{flag.name}" in proc.stdout, flag.name
        assert flag.env in proc.stdout, flag.env  # argparse wraps at spaces, never inside a name
    assert "-v " in proc.stdout or "-v\n" in proc.stdout


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([], {}) == 2
    err = capsys.readouterr().err
    assert "run" in err and "leases" in err and "version" in err


def test_external_command_dispatch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[list[str]] = []
    module = types.ModuleType("fake_trace_cli")
    module.main = lambda argv: seen.append(argv) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_trace_cli", module)
    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "trace", ("fake_trace_cli", "trace"))
    assert main(["trace", "--x", "1"], {}) == 7 and seen == [["--x", "1"]]
    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "trace", ("udpflannel.no_such_module", "trace"))
    assert main(["trace"], {}) == 2
    assert "not available in this build" in capsys.readouterr().err


# --- stores and leases ----------------------------------------------------------------------------------


def test_open_store_selection(tmp_path: Path) -> None:
    from udpflannel.lease.etcd import EtcdStore
    from udpflannel.lease.sqlite import SqliteStore

    store = open_store(build_options({"sqlite-path": str(tmp_path / "s.db")}, {}))
    try:
        assert isinstance(store, SqliteStore)
    finally:
        store.close()
    store = open_store(build_options({"etcd-endpoints": "http://127.0.0.1:2"}, {}))
    try:
        assert isinstance(store, EtcdStore)
    finally:
        store.close()


def test_net_config_for(tmp_path: Path) -> None:
    from udpflannel.config import ConfigError, parse_net_conf
    from udpflannel.lease.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "s.db")
    try:
        etcd_mode = build_options({}, {})
        assert options.net_config_for(etcd_mode, store) is None  # nothing stored yet: the agent waits
        store.set_network_config('{"Network": "198.19.0.0/17", "Backend": {"Type": "host-gw"}}')
        got = options.net_config_for(etcd_mode, store)
        assert got is not None and got.subnet_max == ipaddress.ip_network("198.19.127.0/24")
        from_file = RunOptions(net_config=parse_net_conf(GOOD_CONF))
        assert options.net_config_for(from_file, store) is from_file.net_config  # the file wins
        store.set_network_config('{"Network": "198.19.0.0/29"}')
        with pytest.raises(ConfigError, match="too small"):
            options.net_config_for(etcd_mode, store)
    finally:
        store.close()


def test_missing_store_module(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "udpflannel.lease.kube", None)
    with pytest.raises(StoreUnavailable, match="Kubernetes lease store is not available in this build"):
        open_store(build_options({"kube-subnet-mgr": True}, {}))
    assert main(["leases", "--kube-subnet-mgr"], {}) == 2
    assert capsys.readouterr().err.startswith("udpflannel: the Kubernetes lease store is not available")


def test_kube_store_built_from_options(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[RunOptions] = []

    class KubeStore:
        @classmethod
        def from_options(cls, opts: RunOptions) -> str:
            made.append(opts)
            return "kube-store"

    module = types.ModuleType("udpflannel.lease.kube")
    module.KubeStore = KubeStore  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "udpflannel.lease.kube", module)
    opts = build_options({"kube-subnet-mgr": True, "kube-api-url": "https://198.18.0.10:6443"}, {})
    assert open_store(opts) == "kube-store" and made == [opts]


def lease(subnet: str | None, v6: str | None, ip: str, btype: str, exp: float | None) -> Lease:
    return Lease(
        subnet=ipaddress.IPv4Network(subnet) if subnet else None,
        ipv6_subnet=ipaddress.IPv6Network(v6) if v6 else None,
        attrs=LeaseAttrs(public_ip=ipaddress.IPv4Address(ip), backend_type=btype),
        expiration=exp,
    )


def test_format_leases() -> None:
    now = 1_000_000.0
    table = format_leases(
        [
            lease("198.19.12.0/24", None, "198.18.0.12", "vxlan", now + 3 * 3600 + 125),
            lease("198.19.2.0/24", "fd00:198:0:2::/64", "198.18.0.2", "", now + 61),
            lease("198.19.3.0/24", None, "198.18.0.3", "wireguard", None),
            lease("198.19.4.0/24", None, "198.18.0.4", "host-gw", now - 1),
        ],
        now,
    )
    assert table == (
        "SUBNET          IPV6 SUBNET        PUBLIC IP    BACKEND    EXPIRES IN\n"
        "198.19.2.0/24   fd00:198:0:2::/64  198.18.0.2   udp        1m01s\n"
        "198.19.3.0/24   -                  198.18.0.3   wireguard  never (reservation)\n"
        "198.19.4.0/24   -                  198.18.0.4   host-gw    expired\n"
        "198.19.12.0/24  -                  198.18.0.12  vxlan      3h02m\n"
    )


@pytest.fixture
def sqlite_db(tmp_path: Path):
    from udpflannel.lease.sqlite import SqliteStore

    path = tmp_path / "leases.db"
    store = SqliteStore(path)
    try:
        store.create(
            ipaddress.IPv4Network("198.19.5.0/24"),
            None,
            LeaseAttrs(
                public_ip=ipaddress.IPv4Address("198.18.0.5"), backend_type="vxlan", backend_data={"VNI": 1}
            ),
            3600,
        )
        store.reserve(
            ipaddress.IPv4Network("198.19.1.0/24"), None, LeaseAttrs(ipaddress.IPv4Address("198.18.0.1"))
        )
    finally:
        store.close()
    return path


def test_leases_table_and_json(sqlite_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["leases", "--sqlite-path", str(sqlite_db)], {}) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SUBNET", "IPV6", "SUBNET", "PUBLIC", "IP", "BACKEND", "EXPIRES", "IN"]
    assert lines[1].split()[:4] == ["198.19.1.0/24", "-", "198.18.0.1", "udp"]
    assert lines[2].split()[:4] == ["198.19.5.0/24", "-", "198.18.0.5", "vxlan"]
    assert re.search(r"(59m[0-5]\ds|1h00m)$", lines[2]) and len(lines) == 3
    assert main(["leases", "--json"], {"FLANNELD_SQLITE_PATH": str(sqlite_db)}) == 0
    data = json.loads(capsys.readouterr().out)
    by_subnet = {d["Subnet"]: d for d in data}
    assert by_subnet["198.19.5.0/24"]["Attrs"] == {
        "PublicIP": "198.18.0.5",
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1},
    }
    assert by_subnet["198.19.1.0/24"]["Expiration"] is None


def test_leases_missing_sqlite_file_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["leases", "--sqlite-path", str(tmp_path / "typo.db")], {}) == 2
    assert capsys.readouterr().err.startswith(f"udpflannel: no lease store at {tmp_path / 'typo.db'}")
    assert _tree(tmp_path) == []


def test_leases_rejects_run_only_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["leases", "--ip-masq"], {}) == 2
    assert "unrecognized arguments: --ip-masq" in capsys.readouterr().err


# --- logging --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verbosity", "level"), [(0, logging.WARNING), (1, logging.INFO), (5, logging.DEBUG)]
)
def test_logging_levels_and_logfmt(verbosity: int, level: int) -> None:
    import io

    stream = io.StringIO()
    cli.configure_logging(verbosity, stream)
    log = logging.getLogger("udpflannel.test")
    try:
        assert logging.getLogger("udpflannel").level == level
        log.warning('lease "lost"', extra={"subnet": "198.19.1.0/24", "tries": 3})
        line = stream.getvalue().strip()
        assert " level=warning logger=udpflannel.test " in line
        assert 'msg="lease \\"lost\\""' in line and "subnet=198.19.1.0/24 tries=3" in line
        assert line.startswith("time=") and line.split()[0].endswith("Z")
        log.debug("hidden unless -vv")
        assert ("hidden" in stream.getvalue()) is (level == logging.DEBUG)
    finally:
        cli.configure_logging(0)
