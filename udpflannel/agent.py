"""The node agent behind `udpflannel run`: hold a subnet lease, bring up the backend, keep peers in step.

Order of work (flanneld's): open the store -> net-conf -> interface -> backend -> lease -> backend start ->
subnet.env -> ready; then loop: renew before expiry, re-acquire when lost, feed peer events to the backend.
Anything that fails before the datapath runs is undone, so a failed start leaves no links, routes or leases.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from udpflannel.backend import Backend, BackendUnavailable, create_backend
from udpflannel.config import ConfigError, NetworkConfig
from udpflannel.dataplane.process import check_environment
from udpflannel.host.iface import InterfaceError, select_interface
from udpflannel.host.links import HostConfig, HostError
from udpflannel.host.masq import Family, Rules, RulesError, missing_tools
from udpflannel.lease.manager import LeaseManager
from udpflannel.lease.model import Lease
from udpflannel.lease.store import Store, StoreError
from udpflannel.options import OptionsError, RunOptions, net_config_for, open_store
from udpflannel.subnet import SubnetEnv, prepare_subnet_dir, read_subnet_env, write_subnet_env

log = logging.getLogger("udpflannel.agent")

WATCH_TIMEOUT = 1.0  # seconds: how long one peer watch waits, so SIGTERM is honoured within about a second
CONFIG_RETRY = 5.0  # seconds between reads of an absent etcd <prefix>/config (flanneld waits the same way)
EXIT_CONFIG = 2  # bad config or flags: nothing was created
EXIT_RUNTIME = 1  # the store, the host or the backend failed


class AgentError(RuntimeError):
    """A start-up failure with a one-line message for the user."""

    def __init__(self, message: str, code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int) -> int:
    print(f"udpflannel: {message}", file=sys.stderr)
    return code


def _subnet_file_error(path: str, exc: OSError) -> str:
    return f"cannot write --subnet-file {path!r}: {exc.strerror or exc}: point it at a writable path"


def _wait_for_config(options: RunOptions, store: Store, stop: threading.Event) -> NetworkConfig | None:
    while not stop.is_set():
        try:
            config = net_config_for(options, store)
        except ConfigError as exc:
            raise AgentError(str(exc), EXIT_CONFIG) from None
        if config is not None:
            return config
        log.warning("no network config yet at %s/config: waiting", options.etcd_prefix)
        stop.wait(CONFIG_RETRY)
    return None


class Agent:
    """One node's agent; `run()` blocks until `stop` is set."""

    def __init__(self, options: RunOptions, stop: threading.Event) -> None:
        self.options = options
        self.stop = stop
        self.store: Store | None = None
        self.backend: Backend | None = None
        self.manager: LeaseManager | None = None
        self.lease: Lease | None = None
        self.config: NetworkConfig | None = None
        self._health = None
        self.rules: Rules | None = None  # masquerade / forward rules (host/masq.py), once the lease is known
        self._rules_due = 0.0
        self._forward_ok = True
        self._blackholes: HostConfig | None = None  # --ip-blackhole-route's routes, removed by close()

    def counters(self) -> dict[str, int]:
        backend = self.backend
        out: dict[str, int] = dict(backend.stats()) if backend is not None else {}
        out["peers"] = len(self.manager.peers()) if self.manager is not None else 0
        return out

    def start(self) -> bool:
        """Everything up to a running datapath; False when stopped while waiting for config."""
        opts = self.options
        try:
            self.store = open_store(opts)
        except OptionsError as exc:
            raise AgentError(str(exc), EXIT_CONFIG) from None
        except StoreError as exc:
            raise AgentError(str(exc)) from None
        config = _wait_for_config(opts, self.store, self.stop)
        if config is None:
            return False
        self.config = config
        try:
            iface = select_interface(
                opts.iface,
                opts.iface_regex,
                opts.iface_can_reach,
                opts.public_ip,
                opts.public_ipv6,
                want_ipv4=config.enable_ipv4,
                want_ipv6=config.enable_ipv6,
            )
        except InterfaceError as exc:
            raise AgentError(str(exc), EXIT_CONFIG) from None
        log.info("using interface %s (public IP %s, MTU %d)", iface.name, iface.public_ip, iface.mtu)
        try:
            prepare_subnet_dir(opts.subnet_file)
        except OSError as exc:
            raise AgentError(_subnet_file_error(opts.subnet_file, exc), EXIT_CONFIG) from None
        self._check_rule_tools(config)
        try:
            check_environment()
        except ValueError as exc:
            raise AgentError(str(exc), EXIT_CONFIG) from None
        try:
            backend = create_backend(config, opts, iface)
        except BackendUnavailable as exc:
            raise AgentError(str(exc), EXIT_CONFIG) from None
        if hasattr(backend, "tx_tunnel"):  # its frames need our FORWARD rules (dataplane/tunnel.py)
            backend.tx_tunnel = opts.iptables_forward_rules and self._forward_ok
        self.manager = LeaseManager(
            self.store,
            config,
            backend.lease_attrs(),
            subnet_file_hint=read_subnet_env(opts.subnet_file),
            renew_margin=opts.renew_margin_seconds,
        )
        if opts.healthz_port:
            from udpflannel.host.health import HealthServer

            views = {"/wireguard": backend.wg_stats} if hasattr(backend, "wg_stats") else {}
            try:
                self._health = HealthServer(opts.healthz_ip, opts.healthz_port, self.counters, views)
            except OSError as exc:
                raise AgentError(
                    f"cannot serve /healthz on {opts.healthz_ip} port {opts.healthz_port}: "
                    f"{exc.strerror or exc}: choose another --healthz-port or --healthz-ip",
                    EXIT_CONFIG,
                ) from None
            self._health.start()
        self.lease = self.manager.acquire(time.time())
        log.info("acquired lease %s", self.lease.key)
        try:
            backend.start(self.lease)
            self.backend = backend
            self._set_up_host(self.lease)
            # subnet.env last: the CNI plugin takes it as the word that the node is ready for pods.
            try:
                self._write_subnet_env(iface.mtu)
            except OSError as exc:
                raise AgentError(_subnet_file_error(opts.subnet_file, exc)) from None
        except Exception:
            # Nothing half-done: undo the host changes and give the subnet back before reporting the failure.
            self.backend = None
            if self.rules is not None:
                with contextlib.suppress(Exception):
                    self.rules.remove()
            self._remove_blackholes()
            with contextlib.suppress(Exception):
                backend.stop()
            with contextlib.suppress(StoreError):
                self.manager.release()
            raise
        if self._health is not None:
            self._health.ready.set()
        return True

    def _check_rule_tools(self, config: NetworkConfig) -> None:
        """Before leasing: --ip-masq without iptables (or nft) is an error; forward rules go, with a word."""
        opts = self.options
        if not (opts.ip_masq or opts.iptables_forward_rules):
            return
        versions = {v for v, on in ((4, config.enable_ipv4), (6, config.enable_ipv6)) if on}
        lacking = missing_tools(versions, config.enable_nftables)
        if lacking and opts.ip_masq:
            raise AgentError(
                f"--ip-masq needs {', '.join(lacking)}, which this host lacks: install it or drop --ip-masq",
                EXIT_CONFIG,
            )
        self._forward_ok = not lacking
        if lacking:
            log.warning(
                "%s not found: no FORWARD rules (install it or set --iptables-forward-rules=false)",
                ", ".join(lacking),
            )

    def _set_up_host(self, lease: Lease) -> None:
        """What the node needs for this lease beyond the backend: rules and blackhole routes (a lease
        that replaces another gets them anew)."""
        self._apply_rules(lease)
        self._remove_blackholes()
        self._add_blackholes(lease)

    def _apply_rules(self, lease: Lease) -> None:
        """flanneld's masquerade and forward rules for this lease's subnets (re-checked in loop())."""
        config, opts = self.config, self.options
        assert config is not None
        families = []
        if config.enable_ipv4 and config.network is not None and lease.subnet is not None:
            families.append(Family(config.network, lease.subnet))
        if config.enable_ipv6 and config.ipv6_network is not None and lease.ipv6_subnet is not None:
            families.append(Family(config.ipv6_network, lease.ipv6_subnet))
        self.rules = Rules(
            families,
            masq=opts.ip_masq,
            forward=opts.iptables_forward_rules and self._forward_ok,
            nftables=config.enable_nftables,
            fully_random=not opts.ip_masq_fully_random_disable,
            accept_iif=getattr(getattr(self.backend, "dataplane", None), "tunnel_iif", None),
        )
        if not self.rules.wanted:
            return
        try:
            self.rules.ensure()
        except RulesError as exc:
            raise AgentError(
                f"{exc}: the agent needs CAP_NET_ADMIN to change iptables/nftables rules"
            ) from None
        self._rules_due = time.time() + opts.iptables_resync

    def _add_blackholes(self, lease: Lease) -> None:
        """--ip-blackhole-route: our pod subnets end in a blackhole when no pod route (or bridge) has them."""
        if not self.options.ip_blackhole_route:
            return
        self._blackholes = HostConfig()
        try:
            for subnet in lease.subnets:
                if not self._blackholes.add_blackhole(str(subnet)):
                    log.info("a route to %s exists already: no blackhole route added", subnet)
        except HostError as exc:
            raise AgentError(str(exc)) from None
        finally:
            self._blackholes.close()

    def _remove_blackholes(self) -> None:
        if self._blackholes is not None:
            with contextlib.suppress(Exception):
                self._blackholes.undo()
            self._blackholes = None

    def _resync_rules(self, now: float) -> None:
        if self.rules is None or not self.rules.wanted or now < self._rules_due:
            return
        self._rules_due = now + self.options.iptables_resync
        try:
            if self.rules.ensure():
                log.warning("masquerade/forward rules were changed by someone else: put back")
        except RulesError as exc:
            log.warning("rules resync: %s", exc)

    def _write_subnet_env(self, iface_mtu: int) -> None:
        assert self.config is not None and self.lease is not None and self.backend is not None
        config, lease = self.config, self.lease
        mtu = getattr(self.backend, "mtu", None) or (config.backend.mtu or iface_mtu) - self.backend.overhead
        env = SubnetEnv.for_lease(
            config.network if config.enable_ipv4 else None,
            lease.subnet,
            config.ipv6_network if config.enable_ipv6 else None,
            lease.ipv6_subnet,
            mtu,
            self.options.ip_masq,
        )
        write_subnet_env(self.options.subnet_file, env)
        self._iface_mtu = iface_mtu
        log.info("wrote %s (subnet %s, MTU %d)", self.options.subnet_file, env.subnet, mtu)

    def loop(self) -> None:
        """Renew, re-acquire and apply peer events until stopped."""
        assert self.manager is not None and self.backend is not None
        manager, backend = self.manager, self.backend
        while not self.stop.is_set():
            now = time.time()
            if manager.lost or now >= manager.renew_due(now):
                lease = manager.renew(now)
                if self.lease is not None and lease.key != self.lease.key:
                    log.warning(
                        "our subnet changed from %s to %s: restarting the backend", self.lease.key, lease.key
                    )
                    backend.stop()
                    self.lease = lease
                    backend.start(lease)
                    self._set_up_host(lease)
                    self._write_subnet_env(self._iface_mtu)
                self.lease = lease
            self._resync_rules(now)
            backend.check()  # a crashed datapath worker is back within about a second
            events = manager.watch_peers(timeout=WATCH_TIMEOUT)
            if events:
                for event in events:
                    log.info(
                        "peer %s: %s (%s)", event.type.value, event.lease.key, event.lease.attrs.public_ip
                    )
                backend.apply(events)

    def close(self) -> None:
        if self.backend is not None:
            with contextlib.suppress(Exception):
                self.backend.stop()
            self.backend = None
        self._remove_blackholes()
        if self._health is not None:
            self._health.stop()
            self._health = None
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.close()
            self.store = None


def _install_signals(stop: threading.Event) -> Callable[[], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def run_agent(options: RunOptions, stop: threading.Event | None = None) -> int:
    """`udpflannel run`: returns the process exit code (0 after SIGTERM/SIGINT)."""
    stop = stop or threading.Event()
    restore = _install_signals(stop) if threading.current_thread() is threading.main_thread() else None
    agent = Agent(options, stop)
    try:
        if agent.start():
            agent.loop()
        return 0
    except AgentError as exc:
        return _fail(str(exc), exc.code)
    except StoreError as exc:
        return _fail(str(exc), EXIT_RUNTIME)
    except PermissionError as exc:
        return _fail(
            f"{exc}: udpflannel run needs root (CAP_NET_ADMIN) for TUN devices and routes", EXIT_RUNTIME
        )
    finally:
        agent.close()
        if restore is not None:
            restore()
