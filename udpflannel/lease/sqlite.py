"""The embedded lease store: one SQLite file shared by the agents on one host, with TTLs and a change log.

Concurrency comes from SQLite itself (WAL, busy_timeout, every write in BEGIN IMMEDIATE), so any number of
processes may open the same file. Watchers poll the `changes` table; expiry is swept inside write transactions
and at list/watch time, so an expired lease shows up as a REMOVED change like a deleted one. No policy here:
which subnet to take is lease/manager.py's business.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from udpflannel.lease.model import (
    Event,
    EventType,
    IPv4Network,
    IPv6Network,
    Lease,
    LeaseAttrs,
    LeaseSnapshot,
    parse_subnet_key,
    subnet_key,
)
from udpflannel.lease.store import Compacted, Conflict, NotFound, StoreError

log = logging.getLogger(__name__)

DEFAULT_CHANGES_KEEP = 10_000
# Seconds SQLite waits for another process's write lock before giving up with "database is locked".
BUSY_TIMEOUT = 10.0
OPEN_RETRY = 0.05  # seconds between tries to open a file another agent is setting up
# How often watch() looks at the change log while it waits: short enough for prompt peer updates, long
# enough that an idle agent costs nothing measurable.
WATCH_POLL_INTERVAL = 0.05
# One watch() answer holds at most this many changes; the caller resumes from the last one.
WATCH_BATCH = 1000

_PUT = "put"
_DELETE = "delete"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expiration REAL,            -- Unix time; NULL = reservation, never expires
    revision INTEGER NOT NULL   -- revision of this key's last change
);
CREATE INDEX IF NOT EXISTS leases_expiration ON leases(expiration) WHERE expiration IS NOT NULL;
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,         -- 'put' or 'delete'
    value TEXT NOT NULL,        -- for a delete: the value the lease had, so REMOVED events carry attributes
    expiration REAL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS config (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value TEXT NOT NULL
);
"""


class SqliteStore:
    """Store protocol (udpflannel/lease/store.py) on a SQLite file.

    `clock` gives the Unix time used for expirations (tests pass a fake one); watch() timeouts use the
    monotonic clock because they bound real waiting. One instance may be used from several threads.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        clock: Callable[[], float] = time.time,
        network_config: str | None = None,
        *,
        changes_keep: int = DEFAULT_CHANGES_KEEP,
    ) -> None:
        if changes_keep < 1:
            raise ValueError("changes_keep must be at least 1")
        self.path = Path(path)
        self._clock = clock
        self._changes_keep = changes_keep
        self._lock = threading.Lock()
        self._conn = self._open()
        if network_config is not None:
            self.set_network_config(network_config)

    # -- opening -----------------------------------------------------------------------------------------

    def _fail(self, reason: object) -> StoreError:
        return StoreError(f"cannot open lease store {self.path}: {reason}: pass a writable --sqlite-path")

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            # Create the file ourselves so its mode is ours (0644: leases are not secret, and `udpflannel
            # leases` may run unprivileged); SQLite gives the -wal/-shm files the same mode.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.close(fd)
        except OSError as exc:
            raise self._fail(exc.strerror or exc) from None
        deadline = time.monotonic() + BUSY_TIMEOUT
        while True:
            conn: sqlite3.Connection | None = None
            try:
                # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so the write lock is taken up
                # front and two writers never deadlock upgrading read locks.
                conn = sqlite3.connect(
                    self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
                )
                conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise sqlite3.OperationalError(f"journal_mode is {mode}, WAL is not available")
                conn.execute("PRAGMA synchronous = NORMAL")
                # Under the write lock, so agents starting together create the schema once.
                conn.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nCOMMIT;")
                return conn
            except sqlite3.Error as exc:
                if conn is not None:
                    conn.close()
                # Turning a new file to WAL while another agent holds its write lock fails at once,
                # without the busy timeout (agents starting together on one file): try again, bounded.
                if "locked" in str(exc) and time.monotonic() < deadline:
                    time.sleep(OPEN_RETRY)
                    continue
                raise self._fail(exc) from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- transactions ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _txn(self, begin: str) -> Iterator[sqlite3.Connection]:
        """One transaction on our connection; any SQLite failure becomes a StoreError naming the file."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute(begin)
            except sqlite3.Error as exc:
                raise StoreError(f"lease store {self.path}: {exc}") from None
            try:
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise StoreError(f"lease store {self.path}: {exc}") from None
            except BaseException:
                _rollback(conn)
                raise

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A BEGIN IMMEDIATE transaction (the write lock up front), with expired leases swept first."""
        with self._txn("BEGIN IMMEDIATE") as conn:
            self._sweep(conn, self._clock())
            yield conn

    def _read(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A read transaction: everything read in it belongs to one snapshot."""
        return self._txn("BEGIN")

    def _has_expired(self) -> bool:
        with self._read() as conn:
            row = conn.execute(
                "SELECT 1 FROM leases WHERE expiration IS NOT NULL AND expiration <= ? LIMIT 1",
                (self._clock(),),
            ).fetchone()
        return row is not None

    def _sweep_if_needed(self) -> None:
        # A read-only probe first: watch() polls often, and taking the write lock on every poll would make
        # idle agents contend with each other for nothing.
        if self._has_expired():
            with self._write():
                pass

    def _sweep(self, conn: sqlite3.Connection, now: float) -> None:
        rows = conn.execute(
            "SELECT key, value, expiration FROM leases WHERE expiration IS NOT NULL AND expiration <= ?"
            " ORDER BY expiration, key",
            (now,),
        ).fetchall()
        for key, value, expiration in rows:
            conn.execute("DELETE FROM leases WHERE key = ?", (key,))
            self._log_change(conn, key, _DELETE, value, expiration)

    def _log_change(
        self, conn: sqlite3.Connection, key: str, kind: str, value: str, expiration: float | None
    ) -> int:
        cur = conn.execute(
            "INSERT INTO changes (key, kind, value, expiration) VALUES (?, ?, ?, ?)",
            (key, kind, value, expiration),
        )
        rev = int(cur.lastrowid or 0)
        self._trim(conn, rev, self._changes_keep)
        return rev

    def _trim(self, conn: sqlite3.Connection, current: int, keep: int) -> None:
        """Drop change rows older than the last `keep`; remember the newest dropped revision."""
        cut = current - keep
        if cut <= self._compacted(conn):
            return
        conn.execute("DELETE FROM changes WHERE revision <= ?", (cut,))
        conn.execute(
            "INSERT INTO meta (name, value) VALUES ('compacted', ?)"
            " ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (cut,),
        )

    @staticmethod
    def _compacted(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT value FROM meta WHERE name = 'compacted'").fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _revision(conn: sqlite3.Connection) -> int:
        # sqlite_sequence keeps the highest revision ever handed out, even after the rows are trimmed.
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return int(row[0]) if row else 0

    # -- Store protocol ----------------------------------------------------------------------------------

    def network_config(self) -> str | None:
        with self._read() as conn:
            row = conn.execute("SELECT value FROM config WHERE id = 1").fetchone()
        return str(row[0]) if row else None

    def set_network_config(self, text: str) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO config (id, value) VALUES (1, ?)"
                " ON CONFLICT(id) DO UPDATE SET value = excluded.value",
                (text,),
            )

    def assigned_subnets(self) -> tuple[IPv4Network | None, IPv6Network | None] | None:
        return None  # the embedded store never dictates a subnet: the manager chooses

    def list(self) -> LeaseSnapshot:
        self._sweep_if_needed()
        # One read transaction so the leases and the revision belong to the same snapshot.
        with self._read() as conn:
            rows = conn.execute("SELECT key, value, expiration, revision FROM leases ORDER BY key").fetchall()
            revision = self._revision(conn)
        leases = [lease for row in rows if (lease := self._lease_from_row(*row)) is not None]
        return LeaseSnapshot(leases=leases, revision=revision)

    def create(
        self,
        subnet: IPv4Network | None,
        ipv6_subnet: IPv6Network | None,
        attrs: LeaseAttrs,
        ttl: float,
    ) -> Lease:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        key = subnet_key(subnet, ipv6_subnet)
        value = attrs.dumps()
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM leases WHERE key = ?", (key,)).fetchone():
                raise Conflict(f"subnet {key} is already leased")
            expiration = self._clock() + ttl
            rev = self._log_change(conn, key, _PUT, value, expiration)
            conn.execute(
                "INSERT INTO leases (key, value, expiration, revision) VALUES (?, ?, ?, ?)",
                (key, value, expiration, rev),
            )
        return Lease(subnet=subnet, ipv6_subnet=ipv6_subnet, attrs=attrs, expiration=expiration, revision=rev)

    def renew(self, lease: Lease, attrs: LeaseAttrs, ttl: float) -> Lease:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        key = lease.key
        value = attrs.dumps()
        with self._write() as conn:
            row = conn.execute(
                "SELECT value, expiration, revision FROM leases WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                raise NotFound(f"lease {key} is gone")
            old_value, old_expiration, old_rev = row
            if old_rev != lease.revision:
                raise Conflict(f"lease {key} changed (revision {old_rev}, we hold {lease.revision})")
            reservation = old_expiration is None
            if reservation and not _same_owner(old_value, attrs):
                raise Conflict(f"subnet {key} is reserved for another PublicIP")
            expiration = None if reservation else self._clock() + ttl
            rev = self._log_change(conn, key, _PUT, value, expiration)
            conn.execute(
                "UPDATE leases SET value = ?, expiration = ?, revision = ? WHERE key = ?",
                (value, expiration, rev, key),
            )
        return Lease(
            subnet=lease.subnet,
            ipv6_subnet=lease.ipv6_subnet,
            attrs=attrs,
            expiration=expiration,
            revision=rev,
        )

    def delete(self, lease: Lease) -> None:
        key = lease.key
        with self._write() as conn:
            row = conn.execute(
                "SELECT value, expiration, revision FROM leases WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                raise NotFound(f"lease {key} is gone")
            value, expiration, rev = row
            if rev != lease.revision:
                raise Conflict(f"lease {key} changed (revision {rev}, we hold {lease.revision})")
            conn.execute("DELETE FROM leases WHERE key = ?", (key,))
            self._log_change(conn, key, _DELETE, value, expiration)

    def reserve(
        self, subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs
    ) -> Lease:
        """Reserve a subnet for attrs.public_ip. A lease or reservation held by the same PublicIP becomes
        this reservation; one held by another PublicIP is a Conflict (an admin must delete it first)."""
        key = subnet_key(subnet, ipv6_subnet)
        value = attrs.dumps()
        with self._write() as conn:
            row = conn.execute("SELECT value FROM leases WHERE key = ?", (key,)).fetchone()
            if row is not None and not _same_owner(row[0], attrs):
                raise Conflict(f"subnet {key} is held by another PublicIP")
            rev = self._log_change(conn, key, _PUT, value, None)
            conn.execute(
                "INSERT INTO leases (key, value, expiration, revision) VALUES (?, ?, NULL, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value, expiration = NULL,"
                " revision = excluded.revision",
                (key, value, rev),
            )
        return Lease(subnet=subnet, ipv6_subnet=ipv6_subnet, attrs=attrs, expiration=None, revision=rev)

    def watch(self, after: int, timeout: float) -> list[Event]:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            self._sweep_if_needed()
            events = self._changes_after(after)
            if events:
                return events
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            time.sleep(min(WATCH_POLL_INTERVAL, remaining))

    def _changes_after(self, after: int) -> list[Event]:
        with self._read() as conn:
            compacted = self._compacted(conn)
            current = self._revision(conn)
            rows = conn.execute(
                "SELECT revision, key, kind, value, expiration FROM changes WHERE revision > ?"
                " ORDER BY revision LIMIT ?",
                (after, WATCH_BATCH),
            ).fetchall()
        if after < compacted:
            raise Compacted(f"revision {after} is compacted (oldest kept change: {compacted + 1})")
        if after > current:
            # A revision this file never had (the file was replaced): resuming would silently lose events.
            raise Compacted(f"revision {after} is newer than the store's {current}: re-list")
        events = []
        for rev, key, kind, value, expiration in rows:
            lease = self._lease_from_row(key, value, expiration, rev)
            if lease is None:
                continue
            etype = EventType.ADDED if kind == _PUT else EventType.REMOVED
            events.append(Event(type=etype, lease=lease, revision=rev))
        return events

    # -- maintenance -------------------------------------------------------------------------------------

    def compact(self, keep: int) -> None:
        """Keep only the last `keep` changes (tests use this to provoke Compacted)."""
        if keep < 0:
            raise ValueError("keep must not be negative")
        with self._write() as conn:
            self._trim(conn, self._revision(conn), keep)

    def revision(self) -> int:
        with self._read() as conn:
            return self._revision(conn)

    def _lease_from_row(self, key: str, value: str, expiration: float | None, revision: int) -> Lease | None:
        # The file is shared with other processes and hand edits: a row we cannot read is skipped, not fatal.
        try:
            v4, v6 = parse_subnet_key(key)
            attrs = LeaseAttrs.loads(value)
        except ValueError as exc:
            log.warning("lease store %s: skipping unreadable lease %r: %s", self.path, key, exc)
            return None
        return Lease(subnet=v4, ipv6_subnet=v6, attrs=attrs, expiration=expiration, revision=revision)


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite may have rolled back already (e.g. after SQLITE_FULL); then there is nothing left to undo.
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")


def _same_owner(value: str, attrs: LeaseAttrs) -> bool:
    """Whether a stored lease value belongs to the node publishing `attrs` (same PublicIP, else IPv6)."""
    try:
        held = LeaseAttrs.loads(value)
    except ValueError:
        return False
    if held.public_ip is not None or attrs.public_ip is not None:
        return held.public_ip == attrs.public_ip
    return held.public_ipv6 == attrs.public_ipv6
