"""The audit trail in PostgreSQL (the team deployment): the same entries, chain and HMACs as
the file, appends from many processes serialised into one chain, and `loft audit verify`
naming the first edited, deleted, inserted or reordered row."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from helpers import run_cli
from loft.core import audit

pytestmark = pytest.mark.integration


@pytest.fixture
def pg_trail(loft_home, pg_url, monkeypatch) -> str:
    monkeypatch.setenv("LOFT_AUDIT_URL", pg_url)
    return pg_url


def _fill(n: int) -> list[dict]:
    return [audit.append(f"user{i % 3}", f"thing.do{i % 2}", f"t{i}", {"i": i}) for i in range(n)]


def _sql(url: str, *statements: str) -> None:
    import psycopg

    with psycopg.connect(url) as conn:  # one transaction
        for statement in statements:
            conn.execute(statement)


def test_entries_chain_read_and_verify_in_the_database(pg_trail, loft_home, capsys):
    entries = _fill(6)
    assert not audit.trail_path().exists()  # nothing in the file
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert all(b["prev"] == a["hash"] for a, b in zip(entries, entries[1:], strict=False))
    assert entries[0]["hash"] == audit.entry_hash(entries[0]) and "hmac" not in entries[0]
    assert audit.read(50) == list(reversed(entries))  # what was hashed is what comes back
    assert [e["seq"] for e in audit.read(2, offset=1, action="thing.do1")] == [4, 2]
    assert [e["seq"] for e in audit.read(50, actor="user0", target="t3")] == [4]
    assert audit.read(5, action="thing.do_") == []  # a prefix, not a LIKE pattern
    assert audit.read(5, since="2999-01-01") == [] and len(audit.read(9, until="2999-01-01")) == 6
    assert audit.head() == entries[-1]
    ok, n, bad, reason = audit.verify()
    assert (ok, n, bad) == (True, 6, None) and reason.startswith("6 entries, chain intact")

    assert run_cli("audit", "log", "--json", "--actor", "user1") == 0
    shown = [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()]
    assert shown == [5, 2]
    assert run_cli("audit", "verify") == 0
    out = capsys.readouterr().out
    assert "(table loft_audit): 6 entries, chain intact" in out
    assert f"newest entry #6: {entries[-1]['hash']}" in out


TAMPER = {
    # each: the SQL, the first bad row and what verify says about it
    "edited": (["UPDATE loft_audit SET actor = 'mallory' WHERE seq = 3"], 3, "hash does not"),
    "deleted": (["DELETE FROM loft_audit WHERE seq = 2"], 2, "seq is 3, expected 2"),
    "inserted": (
        [
            "UPDATE loft_audit SET id = id + 100 WHERE seq >= 4",
            "INSERT INTO loft_audit (id, seq, ts, actor, action, target, details, prev, hash)"
            " SELECT 4, 99, ts, 'mallory', action, target, details, hash, hash"
            " FROM loft_audit WHERE seq = 3",
        ],
        4,
        "seq is 99, expected 4",
    ),
    "reordered": (
        [
            "UPDATE loft_audit SET id = -id WHERE seq IN (2, 3)",
            "UPDATE loft_audit SET id = 5 + id WHERE seq IN (2, 3)",
        ],
        2,
        "seq is 3, expected 2",
    ),
}


@pytest.mark.parametrize("kind", list(TAMPER))
def test_tampered_rows_are_named(pg_trail, kind, capsys):
    _fill(5)
    statements, bad_row, says = TAMPER[kind]
    _sql(pg_trail, *statements)
    ok, _, bad, reason = audit.verify()
    assert (ok, bad) == (False, bad_row) and reason.startswith(f"entry {bad_row}: {says}"), reason
    capsys.readouterr()
    assert run_cli("audit", "verify") == 1
    assert f"BROKEN at entry {bad_row}: {says}" in capsys.readouterr().err


def test_hmac_in_the_database_catches_a_rewritten_chain(pg_trail, tmp_path, monkeypatch):
    key = tmp_path / "audit-hmac.key"
    key.write_bytes(b"\x01" * 32)
    monkeypatch.setenv("LOFT_AUDIT_HMAC_KEY_FILE", str(key))
    entries = _fill(3)
    assert all(e["hmac"] == audit.entry_hmac(key.read_bytes(), e["hash"]) for e in entries)
    assert audit.verify()[3].endswith("HMAC valid on every entry")
    # rewrite entry 2 and re-hash the chain from there, keeping the (now stale) HMACs
    second, third = entries[1], entries[2]
    second = {**second, "actor": "mallory"}
    second["hash"] = audit.entry_hash(second)
    third = {**third, "prev": second["hash"]}
    third["hash"] = audit.entry_hash(third)
    _sql(
        pg_trail,
        f"UPDATE loft_audit SET actor = 'mallory', hash = '{second['hash']}' WHERE seq = 2",
        f"UPDATE loft_audit SET prev = '{second['hash']}', hash = '{third['hash']}' WHERE seq = 3",
    )
    ok, _, bad, reason = audit.verify()
    assert (ok, bad) == (False, 2) and "HMAC does not match" in reason
    monkeypatch.delenv("LOFT_AUDIT_HMAC_KEY_FILE")
    ok, _, _, reason = audit.verify()  # the chain alone is intact: only the key can tell
    assert ok and "HMAC not checked" in reason


def _appender(url: str, home: str, worker: int, n: int, go) -> None:
    import os

    os.environ["LOFT_HOME"] = home
    os.environ["LOFT_AUDIT_URL"] = url
    from loft.core import audit as trail

    trail.head()  # connected (and the table made) before the race starts
    go.wait(30)
    for i in range(n):
        trail.append(f"proc{worker}", "test.append", f"{worker}-{i}")


def test_concurrent_appends_from_processes_keep_one_chain(pg_trail, loft_home):
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Barrier(4)
    args = [(pg_trail, str(loft_home), w, 20, go) for w in range(4)]
    procs = [ctx.Process(target=_appender, args=a) for a in args]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
        assert p.exitcode == 0
    ok, n, bad, reason = audit.verify()
    assert (ok, n, bad) == (True, 80, None), reason
    entries = list(reversed(audit.read(500)))
    assert sorted(e["target"] for e in entries) == sorted(
        f"{w}-{i}" for w in range(4) for i in range(20)
    )
    for w in range(4):  # each worker's appends in its own order
        mine = [int(e["target"].split("-")[1]) for e in entries if e["actor"] == f"proc{w}"]
        assert mine == list(range(20))


def test_the_trail_follows_the_job_queue_to_postgresql(loft_home, pg_url, monkeypatch):
    """No trail setting and the queue on PostgreSQL: a job submitted is audited in the same
    database, and `LOFT_AUDIT_URL=file` keeps the file."""
    import psycopg

    from loft.jobs import JobStore

    monkeypatch.delenv("LOFT_AUDIT_URL", raising=False)
    monkeypatch.setenv("LOFT_JOBS_URL", pg_url)
    job = JobStore().submit("eval", {"args": ["bot:1"]}, owner="ann")
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT actor, action, target FROM loft_audit").fetchall()
    assert rows == [("ann", "job.submit", job.id)]
    assert not audit.trail_path().exists()
    monkeypatch.setenv("LOFT_AUDIT_URL", "file")
    JobStore().cancel(job.id, actor="bob")
    assert [(e["actor"], e["action"]) for e in audit.read(5)] == [("bob", "job.cancel")]
