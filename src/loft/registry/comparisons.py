"""Side-by-side comparisons of model versions and blind pairwise preference votes.

A comparison is the same prompts answered by two or more versions (``name:version``; the answers
come from whatever ``generate(ref, prompt)`` the caller passes: the portal asks a running
``loft serve``). Each prompt and each pair of versions is a voting task. A voter sees the two
answers as "left" and "right" without their versions; which version is left is a hash of the
comparison, the task and the voter, so a reload shows the same sides and no two voters need see
the same order. A vote is ``left``, ``right`` or ``tie``; the versions are revealed after it.

Votes give each version a win rate ((wins + ties / 2) / votes, over every comparison it was in),
written to its card as ``preference`` and as the MLflow version tag ``loft.win_rate``. The
majority choice per task becomes a preference record (prompt/chosen/rejected), which the caller
saves as a dataset version. State lives in ``LOFT_HOME/comparisons.db`` (SQLite, WAL).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError, NotFoundError
from loft.core.sqlite import SqliteFile

SCHEMA_VERSION = 1
MAX_PROMPTS = 50
MAX_PROMPT_CHARS = 4000
MAX_VERSIONS = 6
CHOICES = ("left", "right", "tie")
WIN_RATE_TAG = "loft.win_rate"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    created_by TEXT NOT NULL,
    versions TEXT NOT NULL,
    prompts TEXT NOT NULL,
    max_tokens INTEGER NOT NULL,
    dataset TEXT
);
CREATE TABLE IF NOT EXISTS outputs (
    comparison TEXT NOT NULL REFERENCES comparisons (id),
    prompt INTEGER NOT NULL,
    version TEXT NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (comparison, prompt, version)
);
CREATE TABLE IF NOT EXISTS votes (
    comparison TEXT NOT NULL REFERENCES comparisons (id),
    prompt INTEGER NOT NULL,
    a TEXT NOT NULL,
    b TEXT NOT NULL,
    voter TEXT NOT NULL,
    winner TEXT,
    created TEXT NOT NULL,
    PRIMARY KEY (comparison, prompt, a, b, voter)
);
CREATE INDEX IF NOT EXISTS votes_a ON votes (a);
CREATE INDEX IF NOT EXISTS votes_b ON votes (b)
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Comparison:
    id: str
    created: str
    created_by: str
    versions: list[str]
    prompts: list[str]
    max_tokens: int
    dataset: str | None = None
    outputs: dict[tuple[int, str], str] = field(default_factory=dict)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(itertools.combinations(self.versions, 2))

    @property
    def n_tasks(self) -> int:
        return len(self.prompts) * len(self.pairs)

    def to_dict(self, *, outputs: bool) -> dict[str, Any]:
        """The comparison; with ``outputs`` every answer under its version (only for a caller
        who has finished voting, or it would not be blind)."""
        out: dict[str, Any] = {
            "id": self.id,
            "created": self.created,
            "created_by": self.created_by,
            "versions": list(self.versions),
            "prompts": list(self.prompts),
            "max_tokens": self.max_tokens,
            "dataset": self.dataset,
            "tasks": self.n_tasks,
        }
        if outputs:
            out["outputs"] = [
                {"prompt": p, **{v: self.outputs.get((i, v)) for v in self.versions}}
                for i, p in enumerate(self.prompts)
            ]
        return out


@dataclass(frozen=True)
class Task:
    """One blind vote: a prompt and two answers, ``left`` and ``right``, versions hidden."""

    comparison: str
    prompt_index: int
    pair: int
    prompt: str
    left: str
    right: str
    done: int
    total: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "comparison": self.comparison,
            "prompt_index": self.prompt_index,
            "pair": self.pair,
            "prompt": self.prompt,
            "left": self.left,
            "right": self.right,
            "done": self.done,
            "total": self.total,
        }


class ComparisonStore:
    """Comparisons, their answers and votes in ``LOFT_HOME/comparisons.db``."""

    def __init__(self, path: Path | None = None) -> None:
        if path is None:
            from loft.core.paths import loft_home

            path = loft_home() / "comparisons.db"
        self.path = Path(path)
        self._db = SqliteFile(self.path, self._create, foreign_keys=True)

    def _create(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"{self.path} has comparison schema version {version}; this loft understands "
                f"up to {SCHEMA_VERSION}.",
                hint="Upgrade loft.",
            )
        for statement in filter(str.strip, _SCHEMA.split(";")):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # ------------------------------------------------------------------------- create and read

    def create(
        self,
        versions: list[str],
        prompts: list[str],
        generate: Callable[[str, str, int], str],
        *,
        created_by: str,
        max_tokens: int = 64,
    ) -> Comparison:
        """Resolve ``versions`` (``name:N``, ``name@alias``; at least two different ones), have
        each answer every prompt with ``generate(ref, prompt, max_tokens)``, and store it all."""
        refs = _check(versions, prompts, max_tokens)
        outputs = {
            (i, ref): generate(ref, p, max_tokens) for i, p in enumerate(prompts) for ref in refs
        }
        comp = Comparison(
            secrets.token_hex(6), _now(), created_by, refs, list(prompts), max_tokens, None, outputs
        )
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO comparisons VALUES (?,?,?,?,?,?,NULL)",
                (
                    comp.id,
                    comp.created,
                    created_by,
                    json.dumps(refs),
                    json.dumps(prompts),
                    max_tokens,
                ),
            )
            conn.executemany(
                "INSERT INTO outputs VALUES (?,?,?,?)",
                [(comp.id, i, ref, text) for (i, ref), text in outputs.items()],
            )
        return comp

    def get(self, cid: str) -> Comparison:
        with self._db.transaction() as conn:
            row = conn.execute("SELECT * FROM comparisons WHERE id = ?", (cid,)).fetchone()
            if row is None:
                raise NotFoundError(
                    f"no comparison {cid!r}.", hint="See the comparisons at /compare."
                )
            outs = conn.execute(
                "SELECT prompt, version, text FROM outputs WHERE comparison = ?", (cid,)
            ).fetchall()
        comp = _comparison(row)
        comp.outputs = {(i, v): t for i, v, t in outs}
        return comp

    def list_page(self, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        """Comparisons newest first, each with its vote count."""
        with self._db.transaction() as conn:
            total = conn.execute("SELECT COUNT(*) FROM comparisons").fetchone()[0]
            rows = conn.execute(
                "SELECT c.*, (SELECT COUNT(*) FROM votes v WHERE v.comparison = c.id) "
                "FROM comparisons c ORDER BY created DESC, rowid DESC LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
        out = []
        for row in rows:
            comp = _comparison(row[:7])
            out.append({**comp.to_dict(outputs=False), "votes": row[7]})
        return out, int(total)

    # ------------------------------------------------------------------------- blind votes

    def next_task(self, cid: str, voter: str) -> Task | None:
        """The first task ``voter`` has not voted on, sides shuffled for them; None when done."""
        comp = self.get(cid)
        voted = self._voted(cid, voter)
        for i, prompt in enumerate(comp.prompts):
            for j, (a, b) in enumerate(comp.pairs):
                if (i, a, b) in voted:
                    continue
                left, right = _sides(cid, i, a, b, voter)
                return Task(
                    cid,
                    i,
                    j,
                    prompt,
                    comp.outputs[(i, left)],
                    comp.outputs[(i, right)],
                    len(voted),
                    comp.n_tasks,
                )
        return None

    def finished(self, cid: str, voter: str) -> bool:
        return len(self._voted(cid, voter)) >= self.get(cid).n_tasks

    def _voted(self, cid: str, voter: str) -> set[tuple[int, str, str]]:
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT prompt, a, b FROM votes WHERE comparison = ? AND voter = ?", (cid, voter)
            ).fetchall()
        return {(i, a, b) for i, a, b in rows}

    def vote(self, cid: str, voter: str, prompt: int, pair: int, choice: str) -> dict[str, Any]:
        """Record ``voter``'s choice (left, right or tie) on a task; returns what was hidden:
        ``{left, right, winner}`` (versions; winner None for a tie). A second vote on the same
        task is refused."""
        if choice not in CHOICES:
            raise ConfigError(f"choice {choice!r} is not one of {', '.join(CHOICES)}.")
        comp = self.get(cid)
        if not 0 <= prompt < len(comp.prompts) or not 0 <= pair < len(comp.pairs):
            raise NotFoundError(
                f"comparison {cid} has no task (prompt {prompt}, pair {pair}): it has "
                f"{len(comp.prompts)} prompts and {len(comp.pairs)} pairs."
            )
        a, b = comp.pairs[pair]
        left, right = _sides(cid, prompt, a, b, voter)
        winner = {"left": left, "right": right, "tie": None}[choice]
        try:
            with self._db.transaction() as conn:
                conn.execute(
                    "INSERT INTO votes VALUES (?,?,?,?,?,?,?)",
                    (cid, prompt, a, b, voter, winner, _now()),
                )
        except sqlite3.IntegrityError:
            raise ConfigError(
                f"{voter} has already voted on prompt {prompt + 1}, pair {pair + 1} of "
                f"comparison {cid}.",
                hint="Each voter votes once per task; the next one is on the comparison's page.",
            ) from None
        return {"left": left, "right": right, "winner": winner, "choice": choice}

    # ------------------------------------------------------------------------- results

    def tally(self, cid: str) -> list[dict[str, Any]]:
        """Per version in this comparison: votes, wins, losses, ties and win rate."""
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT a, b, winner FROM votes WHERE comparison = ?", (cid,)
            ).fetchall()
        comp = self.get(cid)
        return [_stats(v, rows) for v in comp.versions]

    def win_rate(self, ref: str) -> dict[str, Any]:
        """``ref``'s record over every comparison: votes, wins, losses, ties, win rate, and the
        same against each opponent."""
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT a, b, winner FROM votes WHERE a = ? OR b = ?", (ref, ref)
            ).fetchall()
        stats = _stats(ref, rows)
        opponents = sorted({a if b == ref else b for a, b, _ in rows})
        stats["against"] = {
            o: {
                k: v
                for k, v in _stats(ref, [r for r in rows if o in r[:2]]).items()
                if k != "version"
            }
            for o in opponents
        }
        return stats

    def record_win_rates(self, refs: list[str]) -> None:
        """Write each version's win rate to its card (``preference``) and MLflow tag."""
        from loft.registry.store import _update_card

        for ref in refs:
            stats = self.win_rate(ref)
            stats.pop("version", None)
            stats["updated"] = _now()
            tag = "" if stats["win_rate"] is None else f"{stats['win_rate']:.4f}"
            _update_card(ref, {"preference": stats}, {WIN_RATE_TAG: tag} if tag else {})

    def preference_records(self, cid: str) -> list[dict[str, Any]]:
        """One record per task whose votes have a majority winner (ties and even splits give
        none): ``{prompt, chosen, rejected}`` as loft's canonical preference rows."""
        comp = self.get(cid)
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT prompt, a, b, winner FROM votes WHERE comparison = ? ORDER BY prompt",
                (cid,),
            ).fetchall()
        counts: dict[tuple[int, str, str], dict[str | None, int]] = {}
        for i, a, b, winner in rows:
            task = counts.setdefault((i, a, b), {})
            task[winner] = task.get(winner, 0) + 1
        records = []
        for (i, a, b), votes in sorted(counts.items()):
            wa, wb = votes.get(a, 0), votes.get(b, 0)
            if wa == wb:
                continue
            chosen, rejected = (a, b) if wa > wb else (b, a)
            records.append(
                {
                    "prompt": [{"role": "user", "content": comp.prompts[i]}],
                    "chosen": [{"role": "assistant", "content": comp.outputs[(i, chosen)]}],
                    "rejected": [{"role": "assistant", "content": comp.outputs[(i, rejected)]}],
                }
            )
        return records

    def votes_count(self, cid: str) -> int:
        with self._db.transaction() as conn:
            return int(
                conn.execute("SELECT COUNT(*) FROM votes WHERE comparison = ?", (cid,)).fetchone()[
                    0
                ]
            )

    def mark_saved(self, cid: str, dataset_ref: str) -> None:
        with self._db.transaction() as conn:
            conn.execute("UPDATE comparisons SET dataset = ? WHERE id = ?", (dataset_ref, cid))


def _check(versions: list[str], prompts: list[str], max_tokens: int) -> list[str]:
    """Every problem with a new comparison at once; the versions resolved to ``name:N``."""
    from loft.registry.store import resolve

    problems: list[str] = []
    refs: list[str] = []
    for v in versions:
        try:
            name, number, _ = resolve(v)
        except (ConfigError, NotFoundError) as e:
            problems.append(e.message)
            continue
        if f"{name}:{number}" not in refs:
            refs.append(f"{name}:{number}")
    if len(refs) < 2 and not problems:
        problems.append(
            f"{', '.join(versions) or 'no versions'}: compare at least two different versions"
        )
    if len(refs) > MAX_VERSIONS:
        problems.append(f"{len(refs)} versions: compare at most {MAX_VERSIONS} at once")
    if not prompts:
        problems.append("no prompts: give at least one")
    if len(prompts) > MAX_PROMPTS:
        problems.append(f"{len(prompts)} prompts: at most {MAX_PROMPTS} per comparison")
    for i, p in enumerate(prompts, start=1):
        if not p.strip():
            problems.append(f"prompt {i} is empty")
        elif len(p) > MAX_PROMPT_CHARS:
            problems.append(f"prompt {i} has {len(p)} characters, over {MAX_PROMPT_CHARS}")
    if not 1 <= max_tokens <= 1024:
        problems.append(f"max_tokens {max_tokens}: between 1 and 1024")
    if problems:
        raise ConfigError(
            "cannot compare:\n  " + "\n  ".join(problems),
            hint="Name versions as NAME:VERSION or NAME@ALIAS (e.g. bot:3, bot@champion).",
        )
    return refs


def _sides(cid: str, prompt: int, a: str, b: str, voter: str) -> tuple[str, str]:
    """(left, right) for ``voter``: a coin flip fixed by the comparison, task and voter."""
    flip = hashlib.sha256(f"{cid}|{prompt}|{a}|{b}|{voter}".encode()).digest()[0] & 1
    return (b, a) if flip else (a, b)


def _stats(ref: str, rows: list[tuple[str, str, str | None]]) -> dict[str, Any]:
    mine = [(a, b, w) for a, b, w in rows if ref in (a, b)]
    wins = sum(1 for _, _, w in mine if w == ref)
    ties = sum(1 for _, _, w in mine if w is None)
    losses = len(mine) - wins - ties
    rate = (wins + ties / 2) / len(mine) if mine else None
    return {
        "version": ref,
        "votes": len(mine),
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "win_rate": rate,
    }


def _comparison(row: Any) -> Comparison:
    cid, created, by, versions, prompts, max_tokens, dataset = row
    return Comparison(
        cid, created, by, json.loads(versions), json.loads(prompts), max_tokens, dataset
    )
