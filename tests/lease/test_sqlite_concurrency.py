"""Several agent processes on one SQLite lease file at the same moment (separate interpreters, real locks)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from lease_helpers import net_conf, node_attrs

from udpflannel.lease.sqlite import SqliteStore

HERE = Path(__file__).resolve().parent
PROCS = 8
START_TIMEOUT = 30.0  # seconds for every child to import and reach the start line

# Each child waits for the "go" file, so all of them hit the store together, then prints its result as JSON.
CHILD = r"""
import ipaddress, json, logging, os, random, sys, time
sys.path.insert(0, sys.argv[1])
from lease_helpers import net_conf, node_attrs
from udpflannel.lease.manager import LeaseManager
from udpflannel.lease.sqlite import SqliteStore

db, go, n, mode = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
races = []
class Count(logging.Handler):
    def emit(self, record):
        if "lost a race" in record.getMessage():
            races.append(1)
log = logging.getLogger("child")
log.addHandler(Count())
log.setLevel(logging.INFO)
store = SqliteStore(db)
print("ready", flush=True)
deadline = time.monotonic() + 30
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.005)
if mode == "manager":
    # Same seed everywhere: every child picks the same subnet first, the worst case for races.
    conf = net_conf("198.19.0.0/24", 28)
    m = LeaseManager(store, conf, node_attrs(n), rng=random.Random(0), log=log)
    lease = m.acquire(time.time())
    print(json.dumps({"key": lease.key, "ip": str(lease.attrs.public_ip), "races": len(races)}))
else:
    from udpflannel.lease.store import Conflict
    try:
        lease = store.create(ipaddress.IPv4Network("198.19.7.0/24"), None, node_attrs(n), 3600)
        print(json.dumps({"won": True, "rev": lease.revision}))
    except Conflict:
        print(json.dumps({"won": False}))
store.close()
"""


def run_children(tmp_path: Path, mode: str) -> list[dict]:
    db = tmp_path / "shared" / "leases.db"
    go = tmp_path / "go"
    SqliteStore(db).close()  # the schema exists before the race; creating it concurrently is tested below
    env = {**os.environ, "PYTHONPATH": str(HERE.parent.parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(HERE), str(db), str(go), str(n), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in range(1, PROCS + 1)
    ]
    try:
        for proc in procs:  # every child has its store open and waits at the start line
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        go.write_text("")
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=START_TIMEOUT + 30)
            assert proc.returncode == 0, err
            results.append(json.loads(out))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_eight_processes_acquire_distinct_subnets(tmp_path):
    results = run_children(tmp_path, "manager")
    keys = [r["key"] for r in results]
    assert len(set(keys)) == PROCS, keys
    listed = SqliteStore(tmp_path / "shared" / "leases.db")
    try:
        leases = listed.list().leases
    finally:
        listed.close()
    assert sorted(x.key for x in leases) == sorted(keys)
    assert {str(x.attrs.public_ip) for x in leases} == {
        str(node_attrs(n).public_ip) for n in range(1, PROCS + 1)
    }
    conf = net_conf("198.19.0.0/24", 28)
    for lease in leases:
        assert lease.subnet is not None and lease.subnet.subnet_of(conf.network)
        assert lease.subnet != next(conf.network.subnets(new_prefix=28))
    # How many creates lost a race depends on scheduling (on 2 cores the children may well run one after
    # another), so it is reported, not asserted; lost races are tested deterministically in test_manager.py.
    print(f"lost races across {PROCS} processes: {sum(r['races'] for r in results)}")


def test_eight_processes_race_for_one_subnet_one_wins(tmp_path):
    results = run_children(tmp_path, "create")
    assert sum(r["won"] for r in results) == 1
    listed = SqliteStore(tmp_path / "shared" / "leases.db")
    try:
        [lease] = listed.list().leases
        assert listed.watch(after=0, timeout=0)[-1].revision == lease.revision
    finally:
        listed.close()


def test_concurrent_schema_creation(tmp_path):
    """Agents starting together on a fresh file all come up (schema and WAL set up under the write lock)."""
    db = tmp_path / "fresh" / "leases.db"
    script = (
        "import sys; from udpflannel.lease.sqlite import SqliteStore; "
        "s = SqliteStore(sys.argv[1]); print(s.list().revision); s.close()"
    )
    env = {**os.environ, "PYTHONPATH": str(HERE.parent.parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for _ in range(PROCS)
    ]
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            assert out.strip() == b"0"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_opening_a_file_another_agent_holds_locked_waits_for_it(tmp_path):
    """Turning a new file to WAL while another connection holds its write lock fails at once in SQLite,
    without the busy timeout (what made one of two agents starting together exit): the store tries again
    until the lock is gone."""
    db = tmp_path / "leases.db"
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE setting_up (x)")
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    started = time.monotonic()
    try:
        store = SqliteStore(db)
        assert time.monotonic() - started >= 0.25  # it did wait for the lock
        assert store.list().revision == 0
        store.close()
    finally:
        release.join()
        other.close()
