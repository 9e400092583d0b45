"""The `udpflannel` command: `run` (flanneld's flags and FLANNELD_* env), `leases`, `version`, and the
subcommands other packages provide (lab, trace). One main(argv) -> exit code; nothing here calls sys.exit.

Exit codes: 0 done, 1 runtime failure (store unreachable, agent error), 2 bad usage or bad configuration (one
line on stderr, nothing created). Invoked with flanneld's flags and no subcommand, `run` is implied, so an
image can swap the flanneld binary for this one without changing its arguments.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from udpflannel import __version__
from udpflannel.options import FLAGS, STORE_FLAGS, Flag, OptionsError, RunOptions, build_options

PROG = "udpflannel"

# Subcommands owned by other packages: name -> (module exposing `main(argv: list[str]) -> int`, summary).
# Imported only when invoked, so `udpflannel run` never pays for them.
EXTERNAL_COMMANDS: dict[str, tuple[str, str]] = {
    "lab": ("udpflannel.lab.cli", "build a network-namespace lab from a containerlab topology, run the demo"),
    "trace": ("udpflannel.trace.cli", "follow one packet hop by hop and dissect its headers"),
    "wg": ("udpflannel.wg_cli", "show the WireGuard devices of a running agent, like `wg show`"),
}


class UsageError(Exception):
    """Bad command line; main prints it as one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse prints usage and exits; we want one line and a code
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# --- parser ---------------------------------------------------------------------------------------------


def _flag_help(flag: Flag) -> str:
    default = flag.default
    if flag.kind == "bool":
        shown = "true" if default else "false"
    elif flag.kind == "list":
        shown = "none"
    else:
        shown = repr(default) if default == "" else str(default)
    return f"{flag.help} [default {shown}; env {flag.env}]"


def _add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag]) -> None:
    groups: dict[str, Any] = {}
    for flag in flags:
        group = groups.get(flag.group)
        if group is None:
            group = groups[flag.group] = parser.add_argument_group(f"{flag.group} flags")
        # SUPPRESS: only flags actually given appear in the namespace; the rest fall back to FLANNELD_*.
        common: dict[str, Any] = {"dest": flag.name, "default": argparse.SUPPRESS, "help": _flag_help(flag)}
        if flag.kind == "bool":
            group.add_argument(f"--{flag.name}", nargs="?", const="true", metavar="true|false", **common)
        elif flag.kind == "list":
            group.add_argument(f"--{flag.name}", action="append", metavar="VALUE", **common)
        elif flag.name == "v":
            group.add_argument("--v", metavar="N", **common)
        else:
            group.add_argument(
                f"--{flag.name}", metavar=flag.kind.upper() if flag.kind == "int" else "VALUE", **common
            )
    parser.add_argument(
        "-v", dest="verbose_count", action="count", default=0, help="more logging: -v info, -vv debug"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="A Flannel-compatible Layer-3 pod network whose datapath runs in userspace.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="run the node agent (takes every flanneld flag)",
        description="Run the node agent. Flags may also come from FLANNELD_<FLAG>; the command line wins.",
        allow_abbrev=False,
    )
    _add_flags(run, FLAGS)
    run.add_argument("--version", action="store_true", help="print the version and exit (as flanneld)")
    leases = sub.add_parser(
        "leases",
        help="list the leases in the store the flags select",
        description="List the subnet leases held in the lease store (same store flags as `run`).",
        allow_abbrev=False,
    )
    _add_flags(leases, STORE_FLAGS)
    leases.add_argument("--json", action="store_true", help="print a JSON array of lease objects")
    sub.add_parser("version", help="print the version", allow_abbrev=False)
    for name, (_module, summary) in EXTERNAL_COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


# Go's flag package takes -flag as well as --flag; argparse only knows --flag for long names.
# `-v` stays the counting short option; klog's `-v=N` becomes `--v=N` below.
_LONG_NAMES = {f.name for f in FLAGS if len(f.name) > 1} | {"json", "version", "help"}


def normalise_argv(argv: Sequence[str]) -> list[str]:
    """Rewrite flanneld spellings argparse does not know: `-ip-masq` -> `--ip-masq`, `-v=2` -> `--v=2`;
    and imply `run` when the first argument is a flag (flanneld has no subcommands)."""
    out = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--"):
            name = arg[1:].partition("=")[0]
            if name in _LONG_NAMES or arg.startswith("-v="):
                arg = "-" + arg
        out.append(arg)
    if out and out[0].startswith("-") and out[0] not in ("-h", "--help", "--version"):
        out.insert(0, "run")
    return out


def _given(ns: argparse.Namespace, flags: Sequence[Flag]) -> dict[str, Any]:
    given = {f.name: getattr(ns, f.name) for f in flags if hasattr(ns, f.name)}
    count = getattr(ns, "verbose_count", 0)
    if count:
        given["v"] = max(count, int(given["v"])) if "v" in given and str(given["v"]).isdigit() else count
    return given


# --- logging --------------------------------------------------------------------------------------------


class LogfmtFormatter(logging.Formatter):
    """One record per line as logfmt: `time=... level=info logger=udpflannel.x msg="..." key=value`.
    Extra fields passed with `extra={"subnet": ...}` become keys, so logs stay greppable and parseable."""

    _STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    @staticmethod
    def _quote(value: object) -> str:
        text = str(value)
        if text and not any(c in text for c in ' "=\n\t'):
            return text
        return json.dumps(text)

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"time={stamp}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={self._quote(record.getMessage())}",
        ]
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_"):
                parts.append(f"{key}={self._quote(value)}")
        if record.exc_info:
            parts.append(f"exc={self._quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def configure_logging(verbosity: int, stream: IO[str] | None = None) -> None:
    """Quiet by default (warnings); 1 = info, 2+ = debug. Replaces handlers on the udpflannel logger only."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logger = logging.getLogger("udpflannel")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


# --- commands -------------------------------------------------------------------------------------------


def _fail(message: str, code: int = 2) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def load_run_options(given: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> RunOptions:
    """Flags + env -> RunOptions with the net-conf loaded (from the file in Kubernetes and SQLite modes).
    Raises OptionsError or ConfigError; creates nothing."""
    from dataclasses import replace

    from udpflannel.config import load_net_conf

    options = build_options(given, environ)
    if options.store_kind in ("kube", "sqlite"):
        options = replace(
            options, net_config=load_net_conf(options.net_config_path, kube=options.store_kind == "kube")
        )
    return options


def cmd_run(ns: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from udpflannel.config import ConfigError

    if ns.version:
        return cmd_version()
    try:
        options = load_run_options(_given(ns, FLAGS), environ)
    except (OptionsError, ConfigError) as exc:
        return _fail(str(exc))
    configure_logging(options.verbosity)
    log = logging.getLogger("udpflannel.cli")
    log.info("starting", extra={"version": __version__, "store": options.store_kind})
    try:
        from udpflannel.agent import run_agent
    except ModuleNotFoundError as exc:
        if exc.name != "udpflannel.agent":
            raise
        return _fail("the node agent (udpflannel.agent) is not part of this build", 1)
    try:
        return run_agent(options)
    except KeyboardInterrupt:
        return 130


def _expires_in(lease: Any, now: float) -> str:
    if lease.expiration is None:
        return "never (reservation)"
    left = int(lease.expiration - now)
    if left <= 0:
        return "expired"
    hours, rest = divmod(left, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def format_leases(leases: Sequence[Any], now: float) -> str:
    """The `leases` table: one row per lease, sorted by subnet, columns padded to fit."""
    header = ("SUBNET", "IPV6 SUBNET", "PUBLIC IP", "BACKEND", "EXPIRES IN")
    rows = [header]

    def order(lease: Any) -> tuple[int, int, int]:
        v4, v6 = lease.subnet, lease.ipv6_subnet
        return (0 if v4 else 1, int(v4.network_address) if v4 else 0, int(v6.network_address) if v6 else 0)

    for lease in sorted(leases, key=order):
        attrs = lease.attrs
        public = (
            str(attrs.public_ip)
            if attrs.public_ip
            else (str(attrs.public_ipv6) if attrs.public_ipv6 else "-")
        )
        rows.append(
            (
                str(lease.subnet) if lease.subnet else "-",
                str(lease.ipv6_subnet) if lease.ipv6_subnet else "-",
                public,
                attrs.backend_type or "udp",  # flannel's udp backend publishes no BackendType
                _expires_in(lease, now),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def cmd_leases(ns: argparse.Namespace, environ: Mapping[str, str], out: IO[str]) -> int:
    from udpflannel.lease.store import StoreError
    from udpflannel.options import open_store

    try:
        options = build_options(_given(ns, STORE_FLAGS), environ, flags=STORE_FLAGS)
    except OptionsError as exc:
        return _fail(str(exc))
    configure_logging(options.verbosity)
    # Opening a SQLite path creates the file: listing must not invent an empty store at a mistyped path.
    if options.store_kind == "sqlite" and not os.path.exists(options.sqlite_path):
        return _fail(
            f"no lease store at {options.sqlite_path}: check --sqlite-path (agents create it on start)"
        )
    try:
        store = open_store(options)
    except OptionsError as exc:
        return _fail(str(exc))
    except (StoreError, OSError, ValueError) as exc:
        return _fail(f"cannot open the {options.store_kind} lease store: {exc}", 1)
    try:
        snapshot = store.list()
    except StoreError as exc:
        return _fail(f"cannot list leases: {exc}", 1)
    finally:
        store.close()
    if ns.json:
        json.dump([lease.to_json() for lease in snapshot.leases], out, indent=2)
        out.write("\n")
    else:
        out.write(format_leases(snapshot.leases, time.time()))
    return 0


def cmd_version(out: IO[str] | None = None) -> int:
    print(f"{PROG} {__version__}", file=out or sys.stdout)
    return 0


def cmd_external(name: str, argv: list[str]) -> int:
    module_name = EXTERNAL_COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return _fail(f"`{PROG} {name}` is not available in this build ({module_name} is missing)")
    return int(module.main(argv))


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Entry point of the `udpflannel` console script; returns the exit code."""
    args = normalise_argv(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    # External subcommands parse their own arguments.
    if args and args[0] in EXTERNAL_COMMANDS:
        return cmd_external(args[0], args[1:])
    parser = build_parser()
    try:
        ns = parser.parse_args(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if ns.command is None:
        if ns.version:
            return cmd_version()
        parser.print_help(sys.stderr)
        return 2
    if ns.command == "run":
        return cmd_run(ns, environ)
    if ns.command == "leases":
        return cmd_leases(ns, environ, sys.stdout)
    return cmd_version()


if __name__ == "__main__":
    sys.exit(main())
