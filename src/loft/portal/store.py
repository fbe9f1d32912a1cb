"""The portal's accounts in ``LOFT_HOME/portal.db`` (SQLite, WAL): users, sessions, API tokens.

Nothing secret is stored in the clear: passwords as argon2id hashes (argon2-cffi's defaults),
session ids and API token secrets as their sha256 (they are 256 random bits from ``secrets``,
which no fast hash makes guessable; see loft.serve.keys for the same reasoning). Every change
goes into the audit trail (loft.core.audit) inside the same transaction, with the acting user,
so no change is committed unrecorded.

A session or token is only as good as its user's row at the moment of the request: disabling a
user or changing their role takes effect on their next request.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
import sqlite3
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from loft.core import audit
from loft.core.errors import AuthenticationError, ConfigError, NotFoundError
from loft.core.sqlite import SqliteFile, migrate_component
from loft.portal.roles import ROLE_HELP, ROLES

# portal.db may hold the tables of more than one part of loft (labelling comes later), each
# with its own row in schema_version; these are the accounts' tables.
COMPONENT = "accounts"
SCHEMA_VERSION = 1
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
TOKEN_RE = re.compile(r"^loftp_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
TOUCH_EVERY = timedelta(seconds=60)  # last_seen / last_used are written at most this often
SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id_sha256 TEXT PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users (name),
    csrf_token TEXT NOT NULL,
    created TEXT NOT NULL,
    expires TEXT NOT NULL,
    last_seen TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user);
CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires);
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    user TEXT NOT NULL REFERENCES users (name),
    name TEXT NOT NULL,
    created TEXT NOT NULL,
    last_used TEXT,
    revoked TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS api_tokens_live_name ON api_tokens (user, name)
    WHERE revoked IS NULL
"""
# version -> the statements that bring the schema from the version before it up to it
MIGRATIONS: dict[int, str] = {}

_hasher = PasswordHasher()
_WRONG = "wrong user name or password"


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class User:
    name: str
    role: str
    disabled: bool
    created_at: str
    updated_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Token:
    """A personal API token as stored, without its secret."""

    id: str
    user: str
    name: str
    created: str
    last_used: str | None
    revoked: str | None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": "revoked" if self.revoked else "active"}


@dataclass(frozen=True)
class Session:
    """A live session: whose, its CSRF token, and the sha256 that identifies its row."""

    user: User
    csrf_token: str
    id_sha256: str
    expires: str


def check_name(name: str, what: str = "user name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(
            f"invalid {what} {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. alice, ci-bot).",
        )
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        roles = "; ".join(f"{r} ({ROLE_HELP[r]})" for r in ROLES)
        raise ConfigError(f"unknown role {role!r}; the roles are: {roles}.")
    return role


def check_password(password: str) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        n = len(password) if isinstance(password, str) else 0
        raise ConfigError(
            f"a password needs {MIN_PASSWORD} to {MAX_PASSWORD} characters; this one has {n} "
            "(a passphrase of a few words is long and easy to type)."
        )
    return password


def check_new_user(name: str, role: str, password: str | None = None) -> None:
    """Every problem with a new user's name, role and (when given) password, in one error."""
    checks = [(check_name, name), (check_role, role)]
    if password is not None:
        checks.append((check_password, password))
    problems = []
    for check, value in checks:
        try:
            check(value)
        except ConfigError as e:
            problems.append(e.message)
    if problems:
        raise ConfigError(f"cannot add user {name!r}:\n  " + "\n  ".join(problems))


class PortalStore:
    """Users, sessions and API tokens in a SQLite file (WAL), default ``LOFT_HOME/portal.db``.
    Safe across threads and processes. Mutating methods take ``actor`` (who acts) and
    ``context`` (e.g. ``{"via": "web", "ip": ...}``), both written to the audit trail."""

    def __init__(self, path: Path | None = None) -> None:
        if path is None:
            from loft.core.paths import loft_home

            path = loft_home() / "portal.db"
        self.path = Path(path)
        self._db = SqliteFile(self.path, self._create_or_migrate, rows=True, foreign_keys=True)
        self._dummy_hash: str | None = None

    # -- the database --------------------------------------------------------------------------

    def connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A connection in a transaction (committed on success, rolled back on error)."""
        return self._db.transaction()

    def _create_or_migrate(self, conn: sqlite3.Connection) -> None:
        migrate_component(
            conn, self.path, COMPONENT, "portal accounts", SCHEMA, MIGRATIONS, SCHEMA_VERSION
        )

    @staticmethod
    def _audit(
        actor: str, action: str, target: str, details: dict[str, Any], context: dict | None
    ) -> None:
        audit.append(actor, action, target, {**details, **(context or {})})

    # -- users ---------------------------------------------------------------------------------

    def count_users(self, *, enabled_admins: bool = False) -> int:
        sql = "SELECT COUNT(*) FROM users"
        if enabled_admins:
            sql += " WHERE role = 'admin' AND disabled = 0"
        with self.connect() as conn:
            return conn.execute(sql).fetchone()[0]

    def list_users(self, limit: int = 50, offset: int = 0) -> tuple[list[User], int]:
        """A page of users by name, and how many there are in all."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT * FROM users ORDER BY name LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
            total = conn.execute("SELECT COUNT(*) FROM users").fetchone()[0]
        return [_user(r) for r in rows], total

    def get_user(self, name: str) -> User:
        with self.connect() as conn:
            return self._get(conn, name)

    def _get(self, conn: sqlite3.Connection, name: str) -> User:
        row = conn.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(
                f"no portal user named {name!r}.",
                hint="List them with `loft users list`; add one with "
                "`loft users add NAME --role ROLE`.",
            )
        return _user(row)

    def add_user(
        self, name: str, role: str, password: str, *, actor: str, context: dict | None = None
    ) -> User:
        check_new_user(name, role, password)
        digest = _hasher.hash(password)
        now = _iso(_now())
        with self.connect() as conn:
            try:
                conn.execute(
                    "INSERT INTO users (name, role, password_hash, disabled, created_at, "
                    "updated_at) VALUES (?, ?, ?, 0, ?, ?)",
                    (name, role, digest, now, now),
                )
            except sqlite3.IntegrityError:
                raise ConfigError(
                    f"a user named {name!r} already exists.",
                    hint=f"Pick another name, or change theirs: loft users set-role {name} ROLE",
                ) from None
            self._audit(actor, "user.add", name, {"role": role}, context)
            return self._get(conn, name)

    def set_role(self, name: str, role: str, *, actor: str, context: dict | None = None) -> User:
        check_role(role)
        with self.connect() as conn:
            user = self._get(conn, name)
            if user.role == role:
                return user
            if user.role == "admin" and not user.disabled:
                self._keep_an_admin(conn, name, f"make {name!r} a {role}")
            conn.execute(
                "UPDATE users SET role = ?, updated_at = ? WHERE name = ?",
                (role, _iso(_now()), name),
            )
            self._audit(actor, "user.set_role", name, {"from": user.role, "to": role}, context)
            return self._get(conn, name)

    def set_disabled(
        self, name: str, disabled: bool, *, actor: str, context: dict | None = None
    ) -> User:
        """Disable (its sessions end now; its tokens stop working until it is enabled again)
        or enable a user."""
        with self.connect() as conn:
            user = self._get(conn, name)
            if user.disabled == disabled:
                return user
            if disabled and user.role == "admin":
                self._keep_an_admin(conn, name, f"disable {name!r}")
            conn.execute(
                "UPDATE users SET disabled = ?, updated_at = ? WHERE name = ?",
                (int(disabled), _iso(_now()), name),
            )
            if disabled:
                conn.execute("DELETE FROM sessions WHERE user = ?", (name,))
            self._audit(actor, "user.disable" if disabled else "user.enable", name, {}, context)
            return self._get(conn, name)

    def set_password(
        self, name: str, password: str, *, actor: str, context: dict | None = None
    ) -> User:
        """A new password; the user's sessions end (their API tokens stay)."""
        check_password(password)
        digest = _hasher.hash(password)
        with self.connect() as conn:
            self._get(conn, name)
            conn.execute(
                "UPDATE users SET password_hash = ?, updated_at = ? WHERE name = ?",
                (digest, _iso(_now()), name),
            )
            ended = conn.execute("DELETE FROM sessions WHERE user = ?", (name,)).rowcount
            self._audit(actor, "user.passwd", name, {"sessions_ended": ended}, context)
            return self._get(conn, name)

    @staticmethod
    def _keep_an_admin(conn: sqlite3.Connection, name: str, what: str) -> None:
        others = conn.execute(
            "SELECT COUNT(*) FROM users WHERE role = 'admin' AND disabled = 0 AND name != ?",
            (name,),
        ).fetchone()[0]
        if not others:
            raise ConfigError(
                f"cannot {what}: {name!r} is the only enabled admin, and the portal would have "
                "no one to manage it.",
                hint="Make another user an admin first: loft users set-role OTHER admin",
            )

    # -- sessions ------------------------------------------------------------------------------

    def login(
        self, name: str, password: str, *, hours: float, context: dict | None = None
    ) -> tuple[str, Session]:
        """Check a password and open a session: ``(session id, session)``. The session id
        goes into the cookie and is never stored. A wrong name and a wrong password fail alike
        (same message, and an argon2 verification either way)."""
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
        if row is None:
            self._verify(self._dummy(), password)  # the time a real check takes
            self._audit(
                "anonymous", "auth.login_failed", name[:64], {"reason": "unknown user"}, context
            )
            raise AuthenticationError(_WRONG)
        if not self._verify(row["password_hash"], password):
            self._audit(
                "anonymous", "auth.login_failed", name, {"reason": "wrong password"}, context
            )
            raise AuthenticationError(_WRONG)
        user = _user(row)
        if user.disabled:
            self._audit("anonymous", "auth.login_failed", name, {"reason": "disabled"}, context)
            raise AuthenticationError(
                f"the account {name!r} is disabled.", hint="Ask an admin to enable it."
            )
        session_id = secrets.token_urlsafe(32)
        now = _now()
        session = Session(
            user, secrets.token_urlsafe(32), _sha256(session_id), _iso(now + timedelta(hours=hours))
        )
        with self.connect() as conn:
            conn.execute("DELETE FROM sessions WHERE expires <= ?", (_iso(now),))
            if _hasher.check_needs_rehash(row["password_hash"]):
                conn.execute(
                    "UPDATE users SET password_hash = ? WHERE name = ?",
                    (_hasher.hash(password), name),
                )
            conn.execute(
                "INSERT INTO sessions (id_sha256, user, csrf_token, created, expires, last_seen) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    session.id_sha256,
                    name,
                    session.csrf_token,
                    _iso(now),
                    session.expires,
                    _iso(now),
                ),
            )
            self._audit(name, "auth.login", name, {"expires": session.expires}, context)
        return session_id, session

    def session(self, session_id: str) -> Session:
        """The live session for a cookie's session id, else AuthenticationError (HTTP 401)."""
        digest = _sha256(session_id)
        now = _now()
        with self.connect() as conn:
            row = conn.execute(
                "SELECT s.csrf_token, s.expires, s.last_seen, u.* FROM sessions s "
                "JOIN users u ON u.name = s.user WHERE s.id_sha256 = ?",
                (digest,),
            ).fetchone()
            expired = row is not None and datetime.fromisoformat(row["expires"]) <= now
            if expired:  # deleted, and committed before the error below
                conn.execute("DELETE FROM sessions WHERE id_sha256 = ?", (digest,))
            elif row is not None and now - datetime.fromisoformat(row["last_seen"]) >= TOUCH_EVERY:
                conn.execute(
                    "UPDATE sessions SET last_seen = ? WHERE id_sha256 = ?", (_iso(now), digest)
                )
        if row is None:
            raise AuthenticationError("not signed in (no such session: it ended or expired).")
        if expired:
            raise AuthenticationError("the session expired; sign in again.")
        if row["disabled"]:  # disabling deletes sessions; this covers a race with it
            raise AuthenticationError(f"the account {row['name']!r} is disabled.")
        return Session(_user(row), row["csrf_token"], digest, row["expires"])

    def logout(self, session: Session, *, context: dict | None = None) -> None:
        with self.connect() as conn:
            conn.execute("DELETE FROM sessions WHERE id_sha256 = ?", (session.id_sha256,))
            self._audit(session.user.name, "auth.logout", session.user.name, {}, context)

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = _hasher.hash(secrets.token_urlsafe(16))
        return self._dummy_hash

    @staticmethod
    def _verify(digest: str, password: str) -> bool:
        try:
            return _hasher.verify(digest, password)
        except (VerificationError, InvalidHashError):
            return False

    # -- API tokens ----------------------------------------------------------------------------

    def create_token(
        self, user: str, name: str, *, actor: str, context: dict | None = None
    ) -> tuple[Token, str]:
        """A new token for ``user``: its record and the secret (shown once, never stored)."""
        check_name(name, "token name")
        now = _iso(_now())
        with self.connect() as conn:
            self._get(conn, user)
            for _ in range(20):
                token_id = secrets.token_hex(4)
                secret = f"loftp_{token_id}_{secrets.token_urlsafe(32)}"
                try:
                    conn.execute(
                        "INSERT INTO api_tokens (id, secret_sha256, user, name, created) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (token_id, _sha256(secret), user, name, now),
                    )
                    break
                except sqlite3.IntegrityError as e:
                    if "api_tokens.id" not in str(e):
                        raise ConfigError(
                            f"{user!r} already has a live token named {name!r}.",
                            hint="Pick another name, or revoke that token first.",
                        ) from None
            else:  # pragma: no cover - 20 collisions of 32 random bits
                raise ConfigError("could not find a free token id; try again.")
            self._audit(actor, "token.create", token_id, {"user": user, "name": name}, context)
            return _token(
                conn.execute("SELECT * FROM api_tokens WHERE id = ?", (token_id,)).fetchone()
            ), secret

    def list_tokens(
        self, user: str, limit: int = 50, offset: int = 0, *, include_revoked: bool = True
    ) -> tuple[list[Token], int]:
        where = "user = ?" + ("" if include_revoked else " AND revoked IS NULL")
        with self.connect() as conn:
            rows = conn.execute(
                f"SELECT * FROM api_tokens WHERE {where} "
                "ORDER BY revoked IS NOT NULL, created DESC, id LIMIT ? OFFSET ?",
                (user, limit, offset),
            ).fetchall()
            total = conn.execute(f"SELECT COUNT(*) FROM api_tokens WHERE {where}", (user,))
            return [_token(r) for r in rows], total.fetchone()[0]

    def revoke_token(
        self, user: str, token_id: str, *, actor: str, context: dict | None = None
    ) -> Token:
        """Revoke one of ``user``'s tokens (another user's id is 'not found', as an unknown one)."""
        with self.connect() as conn:
            row = conn.execute(
                "SELECT * FROM api_tokens WHERE id = ? AND user = ?", (token_id, user)
            ).fetchone()
            if row is None:
                raise NotFoundError(
                    f"{user!r} has no API token with id {token_id!r}.",
                    hint="The tokens page (or GET /api/tokens) lists ids.",
                )
            if row["revoked"]:
                return _token(row)
            conn.execute("UPDATE api_tokens SET revoked = ? WHERE id = ?", (_iso(_now()), token_id))
            self._audit(
                actor, "token.revoke", token_id, {"user": user, "name": row["name"]}, context
            )
            return _token(
                conn.execute("SELECT * FROM api_tokens WHERE id = ?", (token_id,)).fetchone()
            )

    def token_user(self, secret: str) -> tuple[User, Token]:
        """The user and token for a live token's secret, else AuthenticationError (HTTP 401)."""
        m = TOKEN_RE.match(secret.strip())
        if m is None:
            raise AuthenticationError(
                "malformed API token.",
                hint="Send 'Authorization: Bearer loftp_<id>_<secret>' as shown when it was "
                "created (the tokens page creates one).",
            )
        with self.connect() as conn:
            row = conn.execute(
                "SELECT t.id AS token_id, t.secret_sha256, t.name AS token_name, t.created AS "
                "token_created, t.last_used, t.revoked, u.* FROM api_tokens t JOIN users u "
                "ON u.name = t.user WHERE t.id = ?",
                (m.group(1),),
            ).fetchone()
            digest = row["secret_sha256"] if row else "0" * 64
            if not hmac.compare_digest(_sha256(m.group(0)), digest) or row is None:
                raise AuthenticationError("invalid API token.")
            if row["revoked"]:
                raise AuthenticationError(f"API token {row['token_name']!r} was revoked.")
            if row["disabled"]:
                raise AuthenticationError(f"the account {row['name']!r} is disabled.")
            now = _now()
            last = row["last_used"]
            if last is None or now - datetime.fromisoformat(last) >= TOUCH_EVERY:
                conn.execute(
                    "UPDATE api_tokens SET last_used = ? WHERE id = ?", (_iso(now), row["token_id"])
                )
                last = _iso(now)
        token = Token(
            row["token_id"], row["name"], row["token_name"], row["token_created"], last, None
        )
        return _user(row), token


def _user(row: sqlite3.Row) -> User:
    return User(
        row["name"], row["role"], bool(row["disabled"]), row["created_at"], row["updated_at"]
    )


def _token(row: sqlite3.Row) -> Token:
    return Token(
        row["id"], row["user"], row["name"], row["created"], row["last_used"], row["revoked"]
    )
