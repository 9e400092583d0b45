"""SqliteStore specifics beyond the Store contract: the file, its mode, config, the change-log bound."""

from __future__ import annotations

import ipaddress
import sqlite3
import stat
import threading

import pytest
from lease_helpers import FakeClock, node_attrs

from udpflannel.lease.model import EventType, subnet_key
from udpflannel.lease.sqlite import SqliteStore
from udpflannel.lease.store import Compacted, StoreError

NET_A = ipaddress.IPv4Network("198.19.1.0/24")
NET_B = ipaddress.IPv4Network("198.19.2.0/24")


@pytest.fixture
def db(tmp_path):
    return tmp_path / "run" / "udpflannel" / "leases.db"


@pytest.fixture
def open_store(db, fake_clock):
    opened = []

    def make(**kwargs):
        kwargs.setdefault("clock", fake_clock)
        store = SqliteStore(db, **kwargs)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def test_creates_parent_dir_and_file_with_sane_modes(db, open_store):
    open_store()
    assert db.parent.is_dir()
    mode = stat.S_IMODE(db.stat().st_mode)
    assert mode & 0o022 == 0, oct(mode)  # nobody but the owner may write the lease file
    assert mode & 0o600 == 0o600


def test_uses_wal_journal(db, open_store):
    open_store()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("how", ["parent_is_a_file", "path_is_a_dir"])
def test_unwritable_path_gives_a_clear_error(tmp_path, how):
    if how == "parent_is_a_file":
        (tmp_path / "afile").write_text("")
        path = tmp_path / "afile" / "leases.db"
    else:
        path = tmp_path / "adir"
        path.mkdir()
    with pytest.raises(StoreError) as info:
        SqliteStore(path)
    msg = str(info.value)
    assert msg.startswith(f"cannot open lease store {path}: ")
    assert msg.endswith(": pass a writable --sqlite-path")


def test_not_a_database_gives_a_clear_error(tmp_path):
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="pass a writable --sqlite-path"):
        SqliteStore(path)


def test_network_config(open_store):
    store = open_store()
    assert store.network_config() is None
    assert store.assigned_subnets() is None
    store.set_network_config('{"Network": "198.19.0.0/16"}')
    assert open_store().network_config() == '{"Network": "198.19.0.0/16"}'
    seeded = open_store(network_config='{"Network": "198.19.0.0/17"}')
    assert store.network_config() == seeded.network_config() == '{"Network": "198.19.0.0/17"}'


def test_reopen_keeps_leases_and_revision(db, open_store):
    store = open_store()
    lease = store.create(NET_A, None, node_attrs(1), 100)
    store.close()
    again = open_store()
    snap = again.list()
    assert [x.key for x in snap.leases] == [lease.key]
    assert snap.revision == lease.revision


def test_change_log_is_bounded(open_store):
    store = open_store(changes_keep=5)
    rev0 = store.list().revision
    lease = store.create(NET_A, None, node_attrs(1), 100)
    for _ in range(20):
        lease = store.renew(lease, node_attrs(1), 100)
    with pytest.raises(Compacted):
        store.watch(after=rev0, timeout=0)
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM changes").fetchone()[0] == 5
    # The last five changes are still there, in order.
    events = store.watch(after=lease.revision - 5, timeout=0)
    assert [e.revision for e in events] == list(range(lease.revision - 4, lease.revision + 1))
    # Revisions keep growing after trimming (AUTOINCREMENT never reuses them).
    assert store.create(NET_B, None, node_attrs(2), 100).revision == lease.revision + 1


def test_watch_from_a_future_revision_raises_compacted(open_store):
    store = open_store()
    store.create(NET_A, None, node_attrs(1), 100)
    with pytest.raises(Compacted):
        store.watch(after=store.list().revision + 10, timeout=0)


def test_unreadable_row_is_skipped(open_store):
    store = open_store()
    store.create(NET_A, None, node_attrs(1), 100)
    with sqlite3.connect(store.path) as conn:
        conn.execute(
            "INSERT INTO leases (key, value, expiration, revision) VALUES ('junk', '{', NULL, 99)",
        )
    assert [x.key for x in store.list().leases] == [subnet_key(NET_A)]


def test_expiry_swept_by_a_write_is_seen_by_a_watcher(open_store, fake_clock: FakeClock):
    writer = open_store()
    watcher = open_store()
    writer.create(NET_A, None, node_attrs(1), 10)
    rev = watcher.list().revision
    fake_clock.advance(11)
    writer.create(NET_B, None, node_attrs(2), 100)  # this write sweeps the expired lease first
    events = watcher.watch(after=rev, timeout=1)
    assert [(e.type, e.lease.key) for e in events] == [
        (EventType.REMOVED, subnet_key(NET_A)),
        (EventType.ADDED, subnet_key(NET_B)),
    ]


def test_watch_wakes_up_on_a_write_from_another_thread(open_store):
    store = open_store()
    other = open_store()
    rev = store.list().revision
    timer = threading.Timer(0.2, lambda: other.create(NET_A, None, node_attrs(1), 100))
    timer.start()
    try:
        events = store.watch(after=rev, timeout=5)
    finally:
        timer.cancel()
        timer.join()
    assert [e.lease.key for e in events] == [subnet_key(NET_A)]


def test_ttl_must_be_positive(open_store):
    store = open_store()
    with pytest.raises(ValueError):
        store.create(NET_A, None, node_attrs(1), 0)
