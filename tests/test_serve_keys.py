"""API keys: hashing at rest, authentication, allow-lists, rate limits and the `loft keys` CLI."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from helpers import run_cli
from loft.core.errors import AuthenticationError, ConfigError, NotFoundError, RateLimitedError
from loft.serve.keys import KeyRecord, KeyStore, RateLimiter, parse_expires, parse_rate

pytestmark = pytest.mark.unit

KEY_RE = re.compile(r"^loft-[0-9a-f]{8}-[A-Za-z0-9_-]{43}$")


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_round_trip_and_default_path(loft_home: Path) -> None:
    store = KeyStore()
    record, key = store.create("ci", ["support-bot"], rate="60/min")
    assert KEY_RE.match(key) and key.split("-")[1] == record.id
    assert (loft_home / "keys.db").is_file()
    got = store.authenticate(key)
    assert got == record
    assert got.rate_limit == (60, 60.0)
    # a second instance (another process, in effect) reads the same file
    assert KeyStore(loft_home / "keys.db").authenticate(key).name == "ci"
    assert [r.name for r in store.list_keys()] == ["ci"]


def test_only_the_salted_hash_is_stored(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "sub" / "keys.db"
    store = KeyStore(db)
    record, key = store.create("alice", ["*"])
    store.list_keys()
    blob = b"".join(p.read_bytes() for p in db.parent.iterdir())  # db, -wal and -shm
    assert key.encode() not in blob
    assert key.split("-", 2)[2].encode() not in blob
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        salt, digest = conn.execute("SELECT salt, hash FROM keys").fetchone()
    assert len(bytes.fromhex(salt)) == 16 and len(digest) == 64
    assert "hash" not in record.to_dict() and "salt" not in record.to_dict()


def test_bad_keys_are_rejected_alike(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    _, key = store.create("ci", ["a"])
    prefix, secret = key[:13], key[14:]  # the secret itself may contain '-'
    wrong_secret = prefix + "-" + ("A" if secret[0] != "A" else "B") + secret[1:]
    unknown = "loft-" + ("0" * 8 if key[5:13] != "0" * 8 else "1" * 8) + "-" + secret
    messages = []
    for bad in (wrong_secret, unknown):
        with pytest.raises(AuthenticationError) as e:
            store.authenticate(bad)
        messages.append(e.value.message)
    assert messages[0] == messages[1] == "invalid API key"
    for bad in (None, "", "Bearer nope", "loft-XYZ-abc"):
        with pytest.raises(AuthenticationError, match="missing|malformed"):
            store.authenticate(bad)
    # a wrong secret after a good one (cached) is still rejected
    store.authenticate(key)
    with pytest.raises(AuthenticationError, match="invalid"):
        store.authenticate(wrong_secret)


def test_revoked_key_rejected_at_once_here_and_within_5s_elsewhere(tmp_path: Path) -> None:
    clock = Clock()
    store = KeyStore(tmp_path / "keys.db", clock=clock)
    server = KeyStore(tmp_path / "keys.db", clock=clock)  # a server in another process
    _, key = store.create("ci", ["a"])
    store.authenticate(key)
    server.authenticate(key)
    revoked = store.revoke("ci")
    assert revoked.revoked and revoked.status() == "revoked"
    with pytest.raises(AuthenticationError, match="revoked"):
        store.authenticate(key)
    server.authenticate(key)  # still cached there
    clock.t += 5.0
    with pytest.raises(AuthenticationError, match="revoked"):
        server.authenticate(key)
    assert store.list_keys() == []
    assert [r.status() for r in store.list_keys(include_revoked=True)] == ["revoked"]
    # the name is free again once revoked
    store.create("ci", ["a"])


def test_expired_key_rejected(tmp_path: Path) -> None:
    clock = Clock()
    store = KeyStore(tmp_path / "keys.db", clock=clock)
    record, key = store.create("temp", ["a"], expires="45m")
    assert record.expires == "2023-11-14T22:58:20+00:00"
    store.authenticate(key)
    clock.t += 45 * 60
    with pytest.raises(AuthenticationError, match="expired"):
        store.authenticate(key)
    assert store.list_keys()[0].status(now=clock.t) == "expired"


def test_revoke_unknown_names_known_keys(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    rec, _ = store.create("alice", ["a"])
    store.create("bob", ["a"])
    with pytest.raises(NotFoundError, match="'carol'.*alice, bob"):
        store.revoke("carol")
    assert store.revoke(rec.id).name == "alice"  # by id too
    with pytest.raises(NotFoundError):
        store.revoke("alice")


def test_allow_lists() -> None:
    some = KeyRecord("00000000", "k", ["support-bot", "sql-bot"])
    assert some.allows("support-bot", is_base=False)
    assert not some.allows("other", is_base=False)
    assert not some.allows("base", is_base=True)
    every = KeyRecord("00000001", "k", ["*"])
    assert every.allows("anything", is_base=False) and not every.allows("b", is_base=True)
    base_only = KeyRecord("00000002", "k", [], include_base=True)
    assert base_only.allows("b", is_base=True) and not base_only.allows("x", is_base=False)


def test_create_validation_reports_every_problem(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    with pytest.raises(ConfigError) as e:
        store.create("bad name!", ["ok", "../evil"], rate="lots", expires="soon")
    msg = str(e.value)
    assert "invalid key name 'bad name!'" in msg
    assert "'../evil'" in msg
    assert "invalid rate 'lots'" in msg and "60/min" in msg
    assert "invalid expiry 'soon'" in msg and "30d" in msg
    with pytest.raises(ConfigError, match="reach nothing.*--metrics"):
        store.create("ci", [])
    with pytest.raises(ConfigError, match="alone"):
        store.create("ci", ["*", "a"])
    store.create("ci", [], include_base=True)
    with pytest.raises(ConfigError, match="already exists"):
        store.create("ci", ["a"])


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("60/min", (60, 60.0)),
        ("10/s", (10, 1.0)),
        ("1000/hour", (1000, 3600.0)),
        ("5 / sec", (5, 1.0)),
        ("2/second", (2, 1.0)),
        ("3/minute", (3, 60.0)),
        ("3/m", (3, 60.0)),
        ("4/h", (4, 3600.0)),
        ("4/hr", (4, 3600.0)),
        ("7/day", (7, 86400.0)),
        ("7/d", (7, 86400.0)),
    ],
)
def test_parse_rate(text: str, want: tuple[int, float]) -> None:
    assert parse_rate(text) == want


@pytest.mark.parametrize("text", ["", "60", "0/min", "-1/s", "60/fortnight", "x/min", "1.5/s"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="COUNT/UNIT"):
        parse_rate(text)


def test_parse_expires() -> None:
    assert parse_expires("2w", now=0.0) == "1970-01-15T00:00:00+00:00"
    assert parse_expires("12h", now=0.0) == "1970-01-01T12:00:00+00:00"
    for bad in ("0d", "30", "3y", "d"):
        with pytest.raises(ConfigError, match="m \\(minutes\\)"):
            parse_expires(bad, now=0.0)


def test_rate_limiter_token_bucket() -> None:
    clock = Clock(100.0)
    limiter = RateLimiter(clock=clock)
    rec = KeyRecord("0000000a", "ci", ["*"], rate="3/s")
    for _ in range(3):
        limiter.check(rec)
    with pytest.raises(RateLimitedError) as e:
        limiter.check(rec)
    assert e.value.retry_after == pytest.approx(1 / 3)
    clock.t += 1 / 3
    limiter.check(rec)  # one token refilled
    with pytest.raises(RateLimitedError):
        limiter.check(rec)
    clock.t += 100.0  # refills only up to capacity
    for _ in range(3):
        limiter.check(rec)
    with pytest.raises(RateLimitedError):
        limiter.check(rec)
    # another key has its own bucket; a key without a rate is never limited
    limiter.check(KeyRecord("0000000b", "other", ["*"], rate="3/s"))
    for _ in range(1000):
        limiter.check(KeyRecord("0000000c", "free", ["*"]))


def test_rate_limiter_is_thread_safe() -> None:
    limiter = RateLimiter(clock=Clock())
    rec = KeyRecord("0000000a", "ci", ["*"], rate="50/min")
    allowed = []

    def hammer() -> None:
        for _ in range(20):
            try:
                limiter.check(rec)
                allowed.append(1)
            except RateLimitedError:
                pass

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(allowed) == 50


def test_cli_create_list_revoke(loft_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(
        "keys", "create", "--name", "ci", "--adapters", "support-bot,sql-bot", "--rate", "60/min"
    )
    assert code == 0
    out, err = capsys.readouterr()
    key = out.splitlines()[-1]
    assert KEY_RE.match(key)
    assert "only time the key is shown" in err.replace("\n", " ")
    assert KeyStore().authenticate(key).adapters == ["support-bot", "sql-bot"]

    assert run_cli("keys", "create", "--name", "all", "--adapters", "*", "--base", "--json") == 0
    created = json.loads(capsys.readouterr().out)
    assert KEY_RE.match(created["key"]) and created["include_base"] is True

    assert run_cli("keys", "list", "--json") == 0
    listed = capsys.readouterr().out
    assert key not in listed and created["key"] not in listed
    assert [k["name"] for k in json.loads(listed)] == ["ci", "all"]

    assert run_cli("keys", "list") == 0
    table = capsys.readouterr().out
    assert "ci" in table and "active" in table and key not in table

    assert run_cli("keys", "revoke", "ci") == 0
    assert "revoked key ci" in capsys.readouterr().out
    with pytest.raises(AuthenticationError, match="revoked"):
        KeyStore().authenticate(key)
    assert run_cli("keys", "list", "--all", "--json") == 0
    statuses = {k["name"]: k["status"] for k in json.loads(capsys.readouterr().out)}
    assert statuses == {"ci": "revoked", "all": "active"}


def test_cli_db_option_and_exit_codes(
    loft_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "elsewhere" / "k.db")
    assert run_cli("keys", "create", "--name", "x", "--adapters", "a", "--db", db) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    assert KeyStore(Path(db)).authenticate(key).name == "x"
    assert not (loft_home / "keys.db").exists()

    assert run_cli("keys", "create", "--name", "y", "--rate", "fast", "--db", db) == 2
    err = capsys.readouterr().err
    assert "invalid rate 'fast'" in err and "reach nothing" in err
    assert run_cli("keys", "revoke", "nobody", "--db", db) == 2
    assert "active keys: x" in capsys.readouterr().err
    assert run_cli("keys", "--help") == 0
    for cmd in ("create", "list", "revoke"):
        assert run_cli("keys", cmd, "--help") == 0


def test_metrics_scope_alone_is_a_valid_key(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    record, key = store.create("prometheus", [], metrics=True)
    assert record.metrics and not record.allows("anything", is_base=False)
    got = KeyStore(tmp_path / "keys.db").authenticate(key)
    assert got.metrics is True and got.to_dict()["metrics"] is True
    _, plain = store.create("app", ["a"])
    assert store.authenticate(plain).metrics is False


def test_last_used_is_written_at_most_once_a_minute(tmp_path: Path) -> None:
    """A server (one KeyStore) records a key's last use; `keys list` (another) reads it. Requests
    within a minute of the last write do not write again."""
    clock = Clock()
    server = KeyStore(tmp_path / "keys.db", clock=clock)
    cli = KeyStore(tmp_path / "keys.db")
    record, key = server.create("ci", ["a"])
    assert cli.list_keys()[0].last_used is None
    assert record.created == "2023-11-14T22:13:20+00:00"

    def last_used() -> str | None:
        return cli.list_keys()[0].last_used

    server.authenticate(key)
    assert last_used() == "2023-11-14T22:13:20+00:00"
    clock.t += 59  # many requests within the minute: no write
    for _ in range(5):
        server.authenticate(key)
    assert last_used() == "2023-11-14T22:13:20+00:00"
    clock.t += 1  # a minute after the last write: written again
    server.authenticate(key)
    assert last_used() == "2023-11-14T22:14:20+00:00"
    assert cli.list_keys()[0].to_dict()["last_used"] == "2023-11-14T22:14:20+00:00"


def test_a_version_1_store_is_migrated_keeping_its_keys(tmp_path: Path) -> None:
    """keys.db files written by loft before last_used and the metrics scope keep working."""
    import hashlib
    import sqlite3

    db = tmp_path / "keys.db"
    salt, key = "00" * 16, "loft-0123abcd-" + "s" * 43
    digest = hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest()
    with sqlite3.connect(db) as conn:
        conn.executescript(
            "CREATE TABLE keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, salt TEXT NOT NULL, "
            "hash TEXT NOT NULL, adapters TEXT NOT NULL, include_base INTEGER NOT NULL, "
            "rate TEXT, created TEXT NOT NULL, expires TEXT, revoked TEXT);"
            "CREATE UNIQUE INDEX keys_active_name ON keys(name) WHERE revoked IS NULL;"
            "PRAGMA user_version = 1;"
        )
        conn.execute(
            "INSERT INTO keys VALUES (?,?,?,?,?,?,?,?,?,?)",
            ("0123abcd", "old", salt, digest, '["a"]', 0, None, "2024-01-01T00:00:00+00:00",
             None, None),
        )  # fmt: skip
    store = KeyStore(db)
    record = store.authenticate(key)
    assert record.name == "old" and record.adapters == ["a"] and record.metrics is False
    listed = store.list_keys()[0]
    assert listed.created == "2024-01-01T00:00:00+00:00" and listed.last_used is not None
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    store.create("new", [], metrics=True)
    assert [r.name for r in KeyStore(db).list_keys()] == ["old", "new"]


def test_cli_create_warns_about_unregistered_adapters_and_still_creates(
    loft_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_cli("keys", "create", "--name", "early", "--adapters", "not-yet-registered")
    assert code == 0
    out, err = capsys.readouterr()
    key = out.splitlines()[-1]
    assert KEY_RE.match(key)
    err = " ".join(err.split())
    assert "warning: no registered model is named 'not-yet-registered'" in err
    assert "created anyway" in err
    assert KeyStore().authenticate(key).adapters == ["not-yet-registered"]
    assert run_cli("keys", "create", "--name", "every", "--adapters", "*") == 0
    assert "warning" not in capsys.readouterr().err


def test_cli_list_shows_created_last_used_and_metrics(
    loft_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = KeyStore()
    _, key = store.create("used", ["*"])
    store.create("prom", [], metrics=True)
    store.authenticate(key)
    assert run_cli("keys", "list", "--json") == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["used"]["last_used"] and rows["prom"]["last_used"] is None
    assert rows["prom"]["metrics"] is True and rows["used"]["metrics"] is False
    assert run_cli("keys", "list") == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if "name" in line)
    for col in ("created", "last", "metrics"):
        assert col in header, table
    created = rows["used"]["created"][:16].replace("T", " ")
    assert created in table and "never" in table
