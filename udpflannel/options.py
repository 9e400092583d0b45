"""flanneld's flags as one table, the typed RunOptions they become, and the lease store they select.

One table (FLAGS) drives the command line (cli.py), the FLANNELD_* environment fallback and RunOptions, so a
flag is defined once. Values from the command line and from the environment go through the same converters
(Go's strconv rules for bools), so both give the same errors. open_store() is the one place a Store is built.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from udpflannel.config import NetworkConfig
    from udpflannel.lease.store import Store

ENV_PREFIX = "FLANNELD"
DEFAULT_ETCD_ENDPOINTS = "http://127.0.0.1:4001,http://127.0.0.1:2379"
DEFAULT_NET_CONFIG_PATH = "/etc/kube-flannel/net-conf.json"
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"

# Groups of the table. `leases` takes the STORE flags only; `run` takes them all.
STORE, KUBE, IFACE, RULES, AGENT = (
    "lease store",
    "Kubernetes",
    "interface",
    "masquerade and forward rules",
    "agent",
)


class OptionsError(ValueError):
    """A flag or FLANNELD_* value is unusable; the one-line message names it and the fix."""


class StoreUnavailable(OptionsError):
    """The selected lease store is not part of this build (its module is missing)."""


@dataclass(frozen=True)
class Flag:
    """One flanneld flag: `--name`, its kind (str, int, bool, list), default, help and group."""

    name: str
    kind: str
    default: Any
    help: str
    group: str

    @property
    def dest(self) -> str:
        return "verbosity" if self.name == "v" else self.name.replace("-", "_")

    @property
    def env(self) -> str:
        """flanneld's env name (coreos/pkg/flagutil SetFlagsFromEnv): FLANNELD_ + upper, '-' -> '_'."""
        return f"{ENV_PREFIX}_{self.name.upper().replace('-', '_')}"


# Every flanneld flag of spec/flannel.md with flanneld's defaults, then udpflannel's own.
FLAGS: tuple[Flag, ...] = (
    Flag("etcd-endpoints", "str", DEFAULT_ETCD_ENDPOINTS, "a comma-delimited list of etcd endpoints", STORE),
    Flag("etcd-prefix", "str", "/coreos.com/network", "etcd prefix", STORE),
    Flag("etcd-keyfile", "str", "", "SSL key file used to secure etcd communication", STORE),
    Flag("etcd-certfile", "str", "", "SSL certification file used to secure etcd communication", STORE),
    Flag("etcd-cafile", "str", "", "SSL Certificate Authority file used to secure etcd communication", STORE),
    Flag("etcd-username", "str", "", "username for BasicAuth to etcd", STORE),
    Flag("etcd-password", "str", "", "password for BasicAuth to etcd", STORE),
    Flag(
        "sqlite-path",
        "str",
        "",
        "udpflannel: use the embedded SQLite lease store at PATH (shared by agents on one host); "
        "net-conf then comes from --net-config-path",
        STORE,
    ),
    Flag(
        "kube-subnet-mgr",
        "bool",
        False,
        "contact the Kubernetes API for subnet assignment instead of etcd",
        STORE,
    ),
    Flag("kube-api-url", "str", "", "Kubernetes API server URL (not needed in a pod)", STORE),
    Flag("kubeconfig-file", "str", "", "kubeconfig file location (not needed in a pod)", STORE),
    Flag(
        "kube-annotation-prefix",
        "str",
        "flannel.alpha.coreos.com",
        'Kubernetes annotation prefix; may contain one "/", else one is appended',
        STORE,
    ),
    Flag("net-config-path", "str", DEFAULT_NET_CONFIG_PATH, "path to the network configuration file", STORE),
    Flag(
        "set-node-network-unavailable",
        "bool",
        True,
        "set the node condition NetworkUnavailable=False once ready (Kubernetes mode)",
        KUBE,
    ),
    Flag(
        "iface",
        "list",
        (),
        "interface (name or IP) for inter-host traffic; repeat to try several in order",
        IFACE,
    ),
    Flag(
        "iface-regex",
        "list",
        (),
        "regex matching the interface name or IP; repeatable, tried after --iface",
        IFACE,
    ),
    Flag(
        "iface-can-reach", "str", "", "use the interface that routes to this IP (as `ip route get IP`)", IFACE
    ),
    Flag("public-ip", "str", "", "IPv4 other nodes reach us at (default: the interface's address)", IFACE),
    Flag("public-ipv6", "str", "", "IPv6 other nodes reach us at (default: the interface's address)", IFACE),
    Flag("ip-masq", "bool", False, "masquerade traffic leaving the overlay network", RULES),
    Flag(
        "ip-masq-fully-random-disable",
        "bool",
        False,
        "use --random instead of --random-fully for MASQUERADE",
        RULES,
    ),
    Flag("iptables-resync", "int", 5, "resync period for iptables/nftables rules, in seconds", RULES),
    Flag(
        "iptables-forward-rules", "bool", True, "add ACCEPT rules for the network to the FORWARD chain", RULES
    ),
    Flag(
        "subnet-file",
        "str",
        DEFAULT_SUBNET_FILE,
        "file the subnet env variables (subnet, MTU, ...) go to",
        AGENT,
    ),
    Flag(
        "subnet-lease-renew-margin",
        "int",
        60,
        "renew the lease this many minutes before it expires (1-1439)",
        AGENT,
    ),
    Flag("healthz-ip", "str", "0.0.0.0", "IP the health server listens on", AGENT),
    Flag("healthz-port", "int", 0, "port of the health server (/healthz, /readyz, /metrics); 0 = off", AGENT),
    Flag(
        "ip-blackhole-route",
        "bool",
        False,
        "a blackhole route for our subnet, under any pod or bridge route (setups without cni0, as Canal)",
        AGENT,
    ),
    Flag(
        "persistent-mac",
        "bool",
        False,
        "accepted for flanneld compatibility: keep the VXLAN MAC across reboots",
        AGENT,
    ),
    Flag(
        "v",
        "int",
        0,
        "log level as klog's --v=N: 0 warnings, 1 info, 2 and up debug (same as -v, -vv)",
        AGENT,
    ),
)

FLAGS_BY_NAME: dict[str, Flag] = {f.name: f for f in FLAGS}
STORE_FLAGS: tuple[Flag, ...] = tuple(f for f in FLAGS if f.group == STORE or f.name == "v")


@dataclass(frozen=True)
class RunOptions:
    """Everything `udpflannel run` was told, typed. Field names are the flag names with '_' for '-'.

    net_config is the validated net-conf when it comes from a file (Kubernetes and SQLite modes); None in etcd
    mode, where the agent reads it from the store (`<prefix>/config`, store.network_config()).
    explicit names the flags set on the command line or through FLANNELD_* (the rest are defaults).
    """

    etcd_endpoints: str = DEFAULT_ETCD_ENDPOINTS
    etcd_prefix: str = "/coreos.com/network"
    etcd_keyfile: str = ""
    etcd_certfile: str = ""
    etcd_cafile: str = ""
    etcd_username: str = ""
    etcd_password: str = ""
    sqlite_path: str = ""
    kube_subnet_mgr: bool = False
    kube_api_url: str = ""
    kubeconfig_file: str = ""
    kube_annotation_prefix: str = "flannel.alpha.coreos.com"
    net_config_path: str = DEFAULT_NET_CONFIG_PATH
    set_node_network_unavailable: bool = True
    iface: tuple[str, ...] = ()
    iface_regex: tuple[str, ...] = ()
    iface_can_reach: str = ""
    public_ip: str = ""
    public_ipv6: str = ""
    ip_masq: bool = False
    ip_masq_fully_random_disable: bool = False
    iptables_resync: int = 5
    iptables_forward_rules: bool = True
    subnet_file: str = DEFAULT_SUBNET_FILE
    subnet_lease_renew_margin: int = 60
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    ip_blackhole_route: bool = False
    persistent_mac: bool = False
    verbosity: int = 0
    net_config: NetworkConfig | None = None
    explicit: frozenset[str] = frozenset()

    @property
    def store_kind(self) -> str:
        """Which lease store the flags select: "kube", "sqlite" or "etcd" (flanneld's default)."""
        if self.kube_subnet_mgr:
            return "kube"
        if self.sqlite_path:
            return "sqlite"
        return "etcd"

    @property
    def etcd_endpoint_list(self) -> list[str]:
        return [e.strip() for e in self.etcd_endpoints.split(",") if e.strip()]

    @property
    def renew_margin_seconds(self) -> float:
        return self.subnet_lease_renew_margin * 60.0


# --- converting values ----------------------------------------------------------------------------------


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool, which flanneld uses for --flag=value and FLANNELD_* values."""
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def parse_int(text: str) -> int:
    """Go's strconv.ParseInt(text, 0, 64) for the common spellings: decimal, 0x.., 0o.., 0b.., signs."""
    try:
        return int(text, 0)
    except ValueError:
        try:
            return int(text, 10)  # "08": base 0 refuses leading zeros, Go would read octal; decimal is kinder
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None


def _convert(flag: Flag, raw: Any, source: str) -> Any:
    try:
        if flag.kind == "bool":
            return raw if isinstance(raw, bool) else parse_bool(raw)
        if flag.kind == "int":
            return raw if isinstance(raw, int) else parse_int(raw)
        if flag.kind == "list":
            return tuple(raw)
        return raw
    except ValueError as exc:
        raise OptionsError(f"{source}: {exc}") from None


def _env_value(flag: Flag, environ: Mapping[str, str]) -> Any:
    value = environ.get(flag.env, "")
    if value == "":  # flagutil: an empty variable counts as unset
        return None
    if flag.kind == "list":
        # One variable holds one value in flanneld; interface names and IPs never contain commas, so we
        # also accept a list there (regexes may contain commas: one per variable).
        return [v.strip() for v in value.split(",") if v.strip()] if flag.name == "iface" else [value]
    return value


def build_options(
    given: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    *,
    flags: tuple[Flag, ...] = FLAGS,
) -> RunOptions:
    """Flag values -> RunOptions. `given` maps flag names to raw command-line values (strings, lists for
    repeatable flags, True for a bare bool flag); a flag not given is read from FLANNELD_*, else defaults.
    Flags outside `flags` keep their defaults. Raises OptionsError naming the flag or the variable."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    explicit = set()
    for flag in flags:
        if flag.name in given:
            values[flag.dest] = _convert(flag, given[flag.name], f"--{flag.name}")
            explicit.add(flag.name)
            continue
        env_raw = _env_value(flag, environ)
        if env_raw is not None:
            values[flag.dest] = _convert(flag, env_raw, flag.env)
            explicit.add(flag.name)
    options = RunOptions(**values, explicit=frozenset(explicit))
    check_options(options)
    return options


def _check_ip(name: str, text: str, version: int | None) -> None:
    if not text:
        return
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        addr = None
    if addr is None or (version is not None and addr.version != version):
        kind = f"an IPv{version}" if version else "an IP"
        raise OptionsError(f"--{name} {text!r} is not {kind} address")


def check_options(options: RunOptions) -> None:
    """flanneld's own checks (renew margin) plus the ones it leaves to fail later, with the fix named."""
    margin = options.subnet_lease_renew_margin
    if not 0 < margin < 24 * 60:  # flanneld main.go: the lease lives 24 h
        raise OptionsError(
            f"--subnet-lease-renew-margin {margin} is out of range: use minutes between 1 and 1439"
        )
    if not 0 <= options.healthz_port <= 65535:
        raise OptionsError(
            f"--healthz-port {options.healthz_port} is out of range: use 1-65535, or 0 for off"
        )
    if options.iptables_resync < 1:
        raise OptionsError(f"--iptables-resync {options.iptables_resync} must be at least 1 second")
    _check_ip("public-ip", options.public_ip, 4)
    _check_ip("public-ipv6", options.public_ipv6, 6)
    _check_ip("healthz-ip", options.healthz_ip, None)
    _check_ip("iface-can-reach", options.iface_can_reach, None)
    for pattern in options.iface_regex:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise OptionsError(f"--iface-regex {pattern!r} is not a valid regex: {exc}") from None
    if options.sqlite_path and options.kube_subnet_mgr:
        raise OptionsError("--sqlite-path and --kube-subnet-mgr both select the lease store: use one")
    if options.sqlite_path and "etcd-endpoints" in options.explicit:
        raise OptionsError("--sqlite-path and --etcd-endpoints both select the lease store: use one")
    if options.store_kind == "etcd" and not options.etcd_endpoint_list:
        raise OptionsError("--etcd-endpoints is empty: give at least one http(s)://host:port")
    kubeconfig = options.kubeconfig_file
    if options.store_kind == "kube" and kubeconfig and not os.path.isfile(kubeconfig):
        raise OptionsError(
            f"--kubeconfig-file {kubeconfig!r} is not a file: give the path of a kubeconfig, "
            "or leave it out to use the pod's service account"
        )
    if options.store_kind == "kube" and kubeconfig:
        _check_kubeconfig(kubeconfig)
    if options.store_kind == "etcd":
        try:
            from udpflannel.lease.etcd_wire import parse_endpoint
        except ModuleNotFoundError:
            return  # a build without the etcd store: open_store says so
        for url in options.etcd_endpoint_list:
            try:
                parse_endpoint(url)
            except ValueError as exc:
                raise OptionsError(f"--etcd-endpoints: {exc}") from None


def _check_kubeconfig(path: str) -> None:
    """A malformed kubeconfig is bad configuration (exit 2), found before anything is set up."""
    from udpflannel.lease.store import StoreError

    try:
        from udpflannel.lease.kube_api import check_kubeconfig_shape

        check_kubeconfig_shape(path)
    except ModuleNotFoundError:
        return  # a build without the kube store (no PyYAML): open_store says so
    except StoreError as exc:
        raise OptionsError(f"--kubeconfig-file: {exc}") from None


def option_fields() -> list[str]:
    """RunOptions fields that come from flags (for tests and docs)."""
    return [f.name for f in fields(RunOptions) if f.name not in ("net_config", "explicit")]


# --- the lease store ------------------------------------------------------------------------------------


def _import_store(module_name: str, class_name: str, kind: str) -> Any:
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the store exists but one of its dependencies is missing: a real error
        raise StoreUnavailable(
            f"the {kind} lease store is not available in this build: "
            "use --sqlite-path PATH for the embedded store"
        ) from None
    return getattr(module, class_name)


def net_config_for(options: RunOptions, store: Store) -> NetworkConfig | None:
    """The net-conf to run with: the file's (RunOptions.net_config) or, in etcd mode, the store's
    `<prefix>/config` parsed by the same rules. None while the store holds none yet (flanneld waits and
    retries then). Raises config.ConfigError for a bad one."""
    if options.net_config is not None:
        return options.net_config
    from udpflannel.config import parse_net_conf

    text = store.network_config()
    return None if text is None else parse_net_conf(text)


def open_store(options: RunOptions) -> Store:
    """Build the lease store the flags select (see RunOptions.store_kind). The caller closes it.

    SQLite: SqliteStore(path). etcd: EtcdStore(endpoints, prefix, TLS files, credentials).
    Kubernetes: KubeStore.from_options(options) (the kube store reads the flags it needs itself).
    Raises StoreUnavailable when the store's module is not in this build.
    """
    kind = options.store_kind
    if kind == "sqlite":
        store_cls = _import_store("udpflannel.lease.sqlite", "SqliteStore", "SQLite")
        return store_cls(options.sqlite_path)
    if kind == "etcd":
        store_cls = _import_store("udpflannel.lease.etcd", "EtcdStore", "etcd")
        return store_cls(
            options.etcd_endpoint_list,
            options.etcd_prefix,
            cafile=options.etcd_cafile or None,
            certfile=options.etcd_certfile or None,
            keyfile=options.etcd_keyfile or None,
            username=options.etcd_username or None,
            password=options.etcd_password or None,
        )
    store_cls = _import_store("udpflannel.lease.kube", "KubeStore", "Kubernetes")
    return store_cls.from_options(options)
