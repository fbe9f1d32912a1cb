"""The audit trail (loft.core.audit): a hash chain that names the first line someone edited,
deleted or moved, and stays one chain when several processes append at once."""

from __future__ import annotations

import hashlib
import json
import multiprocessing

import pytest

from loft.core import audit
from loft.core.errors import IntegrityError


def _fill(n: int) -> list[dict]:
    return [audit.append(f"user{i % 3}", f"thing.do{i % 2}", f"t{i}", {"i": i}) for i in range(n)]


def _lines(path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


@pytest.mark.unit
def test_entries_chain_and_verify(loft_home):
    entries = _fill(5)
    path = loft_home / "audit" / "trail.jsonl"
    assert audit.trail_path() == path
    ok, n, bad, reason = audit.verify()
    assert (ok, n, bad) == (True, 5, None)
    assert reason.startswith("5 entries, chain intact; HMAC not checked")
    first = json.loads(_lines(path)[0])
    assert list(first) == ["seq", "ts", "actor", "action", "target", "details", "prev", "hash"]
    assert first["seq"] == 1 and first["prev"] == "0" * 64
    assert first["ts"].endswith("+00:00")
    # the hash is sha256 over the canonical JSON of the entry without "hash", as documented
    body = {k: v for k, v in first.items() if k != "hash"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert first["hash"] == hashlib.sha256(canon.encode()).hexdigest()
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert all(b["prev"] == a["hash"] for a, b in zip(entries, entries[1:], strict=False))
    assert audit.head() == entries[-1]


@pytest.mark.unit
def test_an_empty_or_missing_trail_verifies(loft_home):
    assert audit.verify() == (True, 0, None, "no audit trail yet")
    assert audit.read(10) == [] and audit.head() is None


def _rewrite(path, lines):
    path.write_text("".join(lines))


@pytest.mark.unit
def test_an_edited_line_is_named(loft_home):
    _fill(6)
    path = audit.trail_path()
    lines = _lines(path)
    lines[3] = lines[3].replace('"target":"t3"', '"target":"t3-edited"')
    _rewrite(path, lines)
    ok, n, bad, reason = audit.verify()
    assert (ok, n, bad) == (False, 4, 4)
    assert reason.startswith("line 4: hash does not match")


@pytest.mark.unit
def test_an_edit_with_a_recomputed_hash_breaks_the_next_line(loft_home):
    _fill(4)
    path = audit.trail_path()
    lines = _lines(path)
    entry = json.loads(lines[1])
    entry["actor"] = "mallory"
    entry["hash"] = audit.entry_hash(entry)
    lines[1] = json.dumps(entry, separators=(",", ":")) + "\n"
    _rewrite(path, lines)
    ok, _, bad, reason = audit.verify()
    assert (ok, bad) == (False, 3)
    assert "line 3" in reason


@pytest.mark.unit
@pytest.mark.parametrize("index", [0, 2])
def test_a_deleted_line_is_named(loft_home, index):
    _fill(5)
    path = audit.trail_path()
    lines = _lines(path)
    del lines[index]
    _rewrite(path, lines)
    ok, _, bad, reason = audit.verify()
    assert (ok, bad) == (False, index + 1)
    assert "was removed" in reason


@pytest.mark.unit
def test_reordered_lines_are_named(loft_home):
    _fill(5)
    path = audit.trail_path()
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    _rewrite(path, lines)
    assert audit.verify()[:3] == (False, 2, 2)


@pytest.mark.unit
def test_a_line_that_is_not_json_is_named(loft_home):
    _fill(3)
    path = audit.trail_path()
    lines = _lines(path)
    lines.insert(1, "garbage\n")
    _rewrite(path, lines)
    ok, _, bad, reason = audit.verify()
    assert (ok, bad) == (False, 2) and "not valid JSON" in reason


@pytest.mark.unit
def test_append_refuses_to_continue_from_a_torn_last_line(loft_home):
    _fill(2)
    path = audit.trail_path()
    with open(path, "a") as f:
        f.write('{"seq":3,"ts":"2026')  # a write cut short
    with pytest.raises(IntegrityError, match="last line is not a complete audit entry"):
        audit.append("alice", "user.add", "bob")
    assert audit.verify()[:3] == (False, 3, 3)
    assert len(_lines(path)) == 3  # nothing appended


@pytest.mark.unit
def test_read_newest_first_with_filters_and_paging(loft_home):
    _fill(12)
    assert [e["seq"] for e in audit.read(3)] == [12, 11, 10]
    assert [e["seq"] for e in audit.read(3, offset=10)] == [2, 1]
    assert [e["seq"] for e in audit.read(50, actor="user1")] == [11, 8, 5, 2]
    assert [e["seq"] for e in audit.read(2, offset=1, action="thing.do0")] == [9, 7]
    assert [e["seq"] for e in audit.read(50, actor="user0", action="thing.do1")] == [10, 4]
    assert audit.read(5, actor="nobody") == []


@pytest.mark.unit
def test_read_pages_across_the_block_boundary(loft_home):
    """Lines longer than the backwards reader's block still come back whole."""
    big = "x" * 70_000
    audit.append("a", "blob", "one", {"blob": big})
    audit.append("a", "blob", "two", {"blob": big})
    assert [e["target"] for e in audit.read(5)] == ["two", "one"]
    assert audit.verify()[0]


def _appender(home: str, worker: int, n: int, go) -> None:
    import os

    os.environ["LOFT_HOME"] = home
    from loft.core import audit as trail

    go.wait(30)  # all start together, once imported, so their appends overlap
    for i in range(n):
        trail.append(f"proc{worker}", "test.append", f"{worker}-{i}")


@pytest.mark.integration
def test_concurrent_appends_from_processes_keep_one_chain(loft_home):
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Barrier(4)
    procs = [ctx.Process(target=_appender, args=(str(loft_home), w, 25, go)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ok, n, bad, reason = audit.verify()
    assert (ok, n, bad) == (True, 100, None), reason
    entries = audit.read(500)
    assert sorted(e["target"] for e in entries) == sorted(
        f"{w}-{i}" for w in range(4) for i in range(25)
    )
    # every worker's own appends are in its own order
    for w in range(4):
        mine = [
            int(e["target"].split("-")[1]) for e in reversed(entries) if e["actor"] == f"proc{w}"
        ]
        assert mine == list(range(25))


@pytest.mark.unit
def test_loft_audit_trail_and_verify_commands(loft_home, capsys):
    """`loft audit trail` shows the newest entries (filtered, as JSON lines with --json) and
    `loft audit verify` exits 0 on an intact chain, 1 naming the first edited line."""
    from helpers import run_cli

    _fill(4)
    assert run_cli("audit", "trail", "--json", "--actor", "user0") == 0  # the hidden old name
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["seq"], e["actor"]) for e in shown] == [(4, "user0"), (1, "user0")]
    assert run_cli("audit", "trail", "-n", "2") == 0
    assert "thing.do1" in capsys.readouterr().out
    assert run_cli("audit", "verify") == 0
    assert "4 entries, chain intact" in capsys.readouterr().out
    path = loft_home / "audit" / "trail.jsonl"
    lines = _lines(path)
    lines[2] = lines[2].replace('"t2"', '"t9"')
    path.write_text("".join(lines))
    assert run_cli("audit", "verify") == 1
    assert "BROKEN at line 3: hash does not match" in capsys.readouterr().err


@pytest.mark.unit
def test_an_inserted_entry_is_named(loft_home):
    """A well-formed entry slipped in between two others (a copy, or one forged with a valid
    hash of its own) breaks the chain where it stands."""
    _fill(4)
    path = audit.trail_path()
    lines = _lines(path)
    forged = json.loads(lines[1])
    forged["actor"] = "mallory"
    forged["hash"] = audit.entry_hash(forged)
    lines.insert(2, json.dumps(forged, separators=(",", ":")) + "\n")
    _rewrite(path, lines)
    ok, n, bad, reason = audit.verify()
    assert (ok, n, bad) == (False, 3, 3)
    assert reason.startswith("line 3: seq is 2, expected 3")


# ----------------------------------------------------------------------------- HMAC


@pytest.fixture
def hmac_key(tmp_path, monkeypatch):
    """A 32-byte key file outside LOFT_HOME, configured through the environment."""
    key = tmp_path / "audit-hmac.key"
    key.write_bytes(bytes(range(32)))
    monkeypatch.setenv("LOFT_AUDIT_HMAC_KEY_FILE", str(key))
    return key


def _rechain(lines: list[str], start: int, edit) -> list[str]:
    """What someone who can write the trail but not read the key can do: edit entry ``start``
    and recompute every hash from there on, so the chain itself is intact."""
    out = lines[:start]
    prev = json.loads(lines[start - 1])["hash"] if start else audit.GENESIS
    for i, line in enumerate(lines[start:]):
        entry = json.loads(line)
        if i == 0:
            edit(entry)
        entry["prev"] = prev
        entry["hash"] = prev = audit.entry_hash(entry)
        out.append(json.dumps(entry, separators=(",", ":")) + "\n")
    return out


@pytest.mark.unit
def test_hmac_signs_each_entry_and_catches_a_chain_rewritten_without_the_key(
    loft_home, hmac_key, monkeypatch
):
    import hmac as hmac_lib

    entries = _fill(4)
    key = hmac_key.read_bytes()
    assert all(
        e["hmac"] == hmac_lib.new(key, e["hash"].encode(), hashlib.sha256).hexdigest()
        for e in entries
    )
    ok, n, bad, reason = audit.verify()
    assert (ok, n, bad) == (True, 4, None) and reason.endswith("HMAC valid on every entry")

    path = audit.trail_path()
    good = _lines(path)
    _rewrite(path, _rechain(good, 1, lambda e: e.update(actor="mallory")))
    # the chain alone cannot tell: without the key it verifies, and says the HMACs went unchecked
    monkeypatch.delenv("LOFT_AUDIT_HMAC_KEY_FILE")
    ok, _, _, reason = audit.verify()
    assert ok and "HMAC not checked: no key configured" in reason
    assert "though 4 entries carry one" in reason
    monkeypatch.setenv("LOFT_AUDIT_HMAC_KEY_FILE", str(hmac_key))
    ok, _, bad, reason = audit.verify()
    assert (ok, bad) == (False, 2) and reason.startswith("line 2: HMAC does not match")

    # dropping the HMACs from the rewritten part does not help, nor does dropping them all
    stripped = [json.dumps({k: v for k, v in json.loads(x).items() if k != "hmac"}) + "\n"
                for x in _rechain(good, 2, lambda e: e.update(target="elsewhere"))]  # fmt: skip
    _rewrite(path, good[:2] + stripped[2:])
    ok, _, bad, reason = audit.verify()
    assert (ok, bad) == (False, 3) and "no HMAC, though entries from 1 on carry one" in reason
    _rewrite(path, stripped)
    ok, _, bad, reason = audit.verify()
    assert not ok and "no entry carries an HMAC although a key is configured" in reason


@pytest.mark.unit
def test_a_trail_begun_before_the_key_verifies_from_its_first_signed_entry(
    loft_home, tmp_path, monkeypatch
):
    _fill(2)
    key = tmp_path / "k"
    key.write_bytes(b"k" * 40)
    monkeypatch.setenv("LOFT_AUDIT_HMAC_KEY_FILE", str(key))
    ok, _, _, reason = audit.verify()
    assert not ok and "the next change will be signed" in reason
    _fill(2)
    ok, n, _, reason = audit.verify()
    assert (ok, n) == (True, 4) and "HMAC valid on entries 3-4" in reason


@pytest.mark.unit
def test_a_key_inside_loft_home_or_too_short_is_refused(loft_home, tmp_path, monkeypatch):
    from loft.core.errors import ConfigError

    inside = loft_home / "audit.key"
    inside.write_bytes(b"x" * 32)
    monkeypatch.setenv("LOFT_AUDIT_HMAC_KEY_FILE", str(inside))
    with pytest.raises(ConfigError, match="inside LOFT_HOME") as e:
        audit.append("alice", "user.add", "bob")
    assert "would prove nothing" in e.value.message
    assert not audit.trail_path().exists()  # nothing written unsigned instead
    (tmp_path / "short").write_bytes(b"x" * 16)
    monkeypatch.setenv("LOFT_AUDIT_HMAC_KEY_FILE", str(tmp_path / "short"))
    with pytest.raises(ConfigError, match="holds 16 bytes; an HMAC key needs at least 32"):
        audit.verify()
    monkeypatch.setenv("LOFT_AUDIT_HMAC_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot be read"):
        audit.append("alice", "user.add", "bob")
    # the deployment file's spelling
    monkeypatch.delenv("LOFT_AUDIT_HMAC_KEY_FILE")
    (loft_home / "settings.yaml").write_text(f"audit: {{hmac_key_file: {inside}}}\n")
    with pytest.raises(ConfigError, match=r"audit.hmac_key_file .* inside LOFT_HOME"):
        audit.hmac_key()


@pytest.mark.unit
def test_where_the_trail_lives(loft_home, monkeypatch):
    """The file by default; the job queue's PostgreSQL database when that is configured and the
    trail's own setting is not; `file` keeps the file; anything else is refused."""
    from loft.core.errors import ConfigError

    monkeypatch.delenv("LOFT_AUDIT_URL", raising=False)
    monkeypatch.delenv("LOFT_JOBS_URL", raising=False)
    assert audit.trail_url() is None and audit.location() == str(audit.trail_path())
    monkeypatch.setenv("LOFT_JOBS_URL", "postgresql://loft:secret@db:5432/loft")
    assert audit.trail_url() == "postgresql://loft:secret@db:5432/loft"
    assert audit.location() == "postgresql://loft:***@db:5432/loft (table loft_audit)"
    monkeypatch.setenv("LOFT_AUDIT_URL", "file")
    assert audit.trail_url() is None
    monkeypatch.setenv("LOFT_AUDIT_URL", "")
    monkeypatch.setenv("LOFT_JOBS_URL", str(loft_home / "jobs.db"))
    assert audit.trail_url() is None
    (loft_home / "settings.yaml").write_text("audit: {url: mysql://x}\n")
    with pytest.raises(ConfigError, match="audit.url .* is 'mysql://x'; expected a postgresql"):
        audit.trail_url()
