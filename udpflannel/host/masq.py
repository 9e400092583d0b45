"""flanneld's masquerade and forward rules (spec/flannel.md): what --ip-masq and --iptables-forward-rules ask
for, as data, applied with iptables/ip6tables or, with net-conf EnableNFTables, as nftables tables
flannel-ipv4/flannel-ipv6; `ensure` is called again every --iptables-resync seconds and puts back what
someone removed. Like flanneld, the agent leaves the rules in place when it stops (pods keep their egress
while it restarts); a start that fails removes them."""

from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)

Net = ipaddress.IPv4Network | ipaddress.IPv6Network

KUBE_MASQ_MARK = "0x4000/0x4000"  # kube-proxy's mark for packets it masquerades itself
POSTROUTING_CHAIN = "FLANNEL-POSTRTG"
FORWARD_CHAIN = "FLANNEL-FWD"
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}
NFT_TABLE = {4: "flannel-ipv4", 6: "flannel-ipv6"}
IPTABLES = {4: "iptables", 6: "ip6tables"}
TIMEOUT = 10.0


class RulesError(RuntimeError):
    """A rule could not be applied; the message names the command and what it said."""


@dataclass(frozen=True, slots=True)
class Family:
    """One address family's rules: the cluster network and our pod subnet in it."""

    network: Net
    pod_subnet: Net

    @property
    def version(self) -> int:
        return self.network.version


def postrouting_rules(f: Family, fully_random: bool = True) -> list[list[str]]:
    """FLANNEL-POSTRTG in iptables words: no NAT inside the cluster network, NAT for what leaves it."""
    net, pod = str(f.network), str(f.pod_subnet)
    masq = ["-j", "MASQUERADE", "--random-fully" if fully_random else "--random"]
    return [
        ["-m", "mark", "--mark", KUBE_MASQ_MARK, "-j", "RETURN"],
        ["-s", pod, "-d", net, "-j", "RETURN"],
        ["-s", net, "-d", pod, "-j", "RETURN"],
        ["!", "-s", net, "-d", pod, "-j", "RETURN"],
        ["-s", net, "!", "-d", MULTICAST[f.version], *masq],
        ["!", "-s", net, "-d", net, *masq],
    ]


def forward_rules(f: Family, accept_iif: str | None = None) -> list[list[str]]:
    """FLANNEL-FWD: the cluster network both ways, and the frames the datapath hands the kernel to
    forward from its tunnel TAP (io/tunnel_tap.py), which carry our own underlay address (IPv6 ones to
    peers over the IPv6 underlay)."""
    rules = [["-s", str(f.network), "-j", "ACCEPT"], ["-d", str(f.network), "-j", "ACCEPT"]]
    if accept_iif:
        rules.append(["-i", accept_iif, "-j", "ACCEPT"])
    return rules


def nft_script(
    f: Family, *, masq: bool, forward: bool, fully_random: bool = True, accept_iif: str | None = None
) -> str:
    """The same logic as one nftables table (created afresh: the script deletes an older one first)."""
    ip = _nft_family(f)
    net, pod, table = str(f.network), str(f.pod_subnet), NFT_TABLE[f.version]
    how = "fully-random" if fully_random else "random"
    lines = [f"table {ip} {table} {{}}", f"delete table {ip} {table}", f"table {ip} {table} {{"]
    if masq:
        lines += [
            "  chain postrtg {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            "    meta mark & 0x4000 == 0x4000 return",
            f"    {ip} saddr {pod} {ip} daddr {net} return",
            f"    {ip} saddr {net} {ip} daddr {pod} return",
            f"    {ip} saddr != {net} {ip} daddr {pod} return",
            f"    {ip} saddr {net} {ip} daddr != {MULTICAST[f.version]} masquerade {how}",
            f"    {ip} saddr != {net} {ip} daddr {net} masquerade {how}",
            "  }",
        ]
    if forward:
        lines += [
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            f"    {ip} saddr {net} accept",
            f"    {ip} daddr {net} accept",
            *([f'    iifname "{accept_iif}" accept'] if accept_iif else []),
            "  }",
        ]
    return "\n".join([*lines, "}", ""])


def _run(argv: list[str], stdin: str | None = None, check: bool = True) -> bool:
    """Run a rule command: True if it succeeded; on failure False, or RulesError when `check`."""
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RulesError(f"{argv[0]}: {exc}") from None
    if check and done.returncode != 0:
        said = " ".join((done.stderr or done.stdout).split()) or f"exit code {done.returncode}"
        raise RulesError(f"`{' '.join(argv)}` failed: {said}")
    return done.returncode == 0


def missing_tools(versions: set[int], nftables: bool) -> list[str]:
    """The rule tools the families need that this host lacks (the agent says so before leasing)."""
    tools = {"nft"} if nftables else {IPTABLES[v] for v in versions}
    return sorted(t for t in tools if shutil.which(t) is None)


class Rules:
    """The rules one agent keeps in place for its families (IPv4 and/or IPv6)."""

    def __init__(
        self,
        families: list[Family],
        *,
        masq: bool,
        forward: bool,
        nftables: bool = False,
        fully_random: bool = True,
        accept_iif: str | None = None,
    ) -> None:
        self.families = families
        self.masq, self.forward, self.nftables, self.fully_random = masq, forward, nftables, fully_random
        self.accept_iif = accept_iif  # a device whose forwarded frames FLANNEL-FWD accepts (forward_rules)
        self.repairs = 0  # times ensure() (re)applied the rules, the first time included
        # What the rule dump showed right after we applied, per (tool, table): a resync compares one dump.
        self._applied: dict[tuple[str, str], list[str]] = {}

    @property
    def wanted(self) -> bool:
        return bool(self.families) and (self.masq or self.forward)

    def ensure(self) -> bool:
        """Put every rule in place if any is missing or changed; True when something was (re)applied."""
        changed = False
        for f in self.families:
            changed |= self._ensure_nft(f) if self.nftables else self._ensure_iptables(f)
        if changed:
            self.repairs += 1
        return changed

    def remove(self) -> None:
        """Take our rules out again (a start that failed: nothing half-done)."""
        for f in self.families:
            if self.nftables:
                _run(["nft", "delete", "table", _nft_family(f), NFT_TABLE[f.version]], check=False)
                continue
            tool = _tool(f)
            for table, hook, chain, comment in self._chains():
                _run([tool, "-w", "-t", table, "-D", hook, *_jump(chain, comment)], check=False)
                _run([tool, "-w", "-t", table, "-F", chain], check=False)
                _run([tool, "-w", "-t", table, "-X", chain], check=False)
        self._applied.clear()

    # -- iptables

    def _chains(self) -> list[tuple[str, str, str, str]]:
        out = []
        if self.masq:
            out.append(("nat", "POSTROUTING", POSTROUTING_CHAIN, "flanneld masq"))
        if self.forward:
            out.append(("filter", "FORWARD", FORWARD_CHAIN, "flanneld forward"))
        return out

    def _ensure_iptables(self, f: Family) -> bool:
        tool = _tool(f)
        changed = False
        for table, hook, chain, comment in self._chains():
            key = (tool, table)
            if key in self._applied and _dump(tool, table, chain) == self._applied[key]:
                continue
            rules = (
                postrouting_rules(f, self.fully_random)
                if chain == POSTROUTING_CHAIN
                else forward_rules(f, self.accept_iif)
            )
            base = [tool, "-w", "-t", table]
            # Order matters (RETURNs before MASQUERADE): the chain is rebuilt whole, as flanneld does.
            if not _run([*base, "-N", chain], check=False):
                _run([*base, "-F", chain])
            for r in rules:
                _run([*base, "-A", chain, *r])
            if not _run([*base, "-C", hook, *_jump(chain, comment)], check=False):
                _run([*base, "-A", hook, *_jump(chain, comment)])
            self._applied[key] = _dump(tool, table, chain)
            changed = True
        return changed

    # -- nftables

    def _ensure_nft(self, f: Family) -> bool:
        key = ("nft", NFT_TABLE[f.version])
        listing = ["nft", "list", "table", _nft_family(f), NFT_TABLE[f.version]]
        if key in self._applied and _output(listing) == self._applied[key]:
            return False
        _run(
            ["nft", "-f", "-"],
            stdin=nft_script(
                f,
                masq=self.masq,
                forward=self.forward,
                fully_random=self.fully_random,
                accept_iif=self.accept_iif,
            ),
        )
        self._applied[key] = _output(listing)
        return True


def _tool(f: Family) -> str:
    return IPTABLES[f.version]


def _nft_family(f: Family) -> str:
    return "ip" if f.version == 4 else "ip6"


def _jump(chain: str, comment: str) -> list[str]:
    return ["-m", "comment", "--comment", comment, "-j", chain]


def _output(argv: list[str]) -> list[str]:
    """A command's output lines ([] when it failed, e.g. the table is gone)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return done.stdout.splitlines() if done.returncode == 0 else []


def _dump(tool: str, table: str, chain: str) -> list[str]:
    """Our chain's rules and the jump to it, as `<tool>-save` prints them (one exec for a resync)."""
    return [ln for ln in _output([f"{tool}-save", "-t", table]) if ln.startswith("-A") and chain in ln]
