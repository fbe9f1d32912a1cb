"""Labelling projects in ``LOFT_HOME/portal.db`` (SQLite, WAL), component ``curate``: projects,
one task per record per assigned annotator (status pending, draft, submitted or discarded, with
its answers), the reviewer's final answers, and exports.

Records are not copied: a project pins a dataset version (``name:version``, immutable) and reads
its records through loft.data.catalog. Every change goes into the audit trail with its actor.

Assignment is round robin with overlap (loft.curate.model.assign).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

from loft.core import audit
from loft.core.errors import ConfigError, NotFoundError, PermissionDeniedError
from loft.core.sqlite import SqliteFile, migrate_component
from loft.curate import questions as qs
from loft.curate.agreement import by_question
from loft.curate.model import Project, Task, assign, now_iso, task_of
from loft.curate.questions import Question

COMPONENT = "curate"
SCHEMA_VERSION = 1
SUGGESTIONS = ("none", "dataset")
SCHEMA = """
CREATE TABLE IF NOT EXISTS label_projects (
    name TEXT PRIMARY KEY,
    dataset TEXT NOT NULL,
    layout TEXT NOT NULL,
    records INTEGER NOT NULL,
    guidelines TEXT NOT NULL,
    questions TEXT NOT NULL,
    overlap INTEGER NOT NULL,
    annotators TEXT NOT NULL,
    suggestions TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS label_tasks (
    project TEXT NOT NULL REFERENCES label_projects (name),
    record INTEGER NOT NULL,
    annotator TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    answers TEXT,
    updated_at TEXT,
    PRIMARY KEY (project, record, annotator)
);
CREATE INDEX IF NOT EXISTS label_tasks_mine ON label_tasks (annotator, project, status, record);
CREATE TABLE IF NOT EXISTS label_reviews (
    project TEXT NOT NULL REFERENCES label_projects (name),
    record INTEGER NOT NULL,
    status TEXT NOT NULL,
    answers TEXT,
    reviewer TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (project, record)
);
CREATE TABLE IF NOT EXISTS label_suggestions (
    project TEXT NOT NULL REFERENCES label_projects (name),
    record INTEGER NOT NULL,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (project, record)
);
CREATE TABLE IF NOT EXISTS label_exports (
    project TEXT NOT NULL REFERENCES label_projects (name),
    dataset TEXT NOT NULL,
    shape TEXT NOT NULL,
    records INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    at TEXT NOT NULL
)
"""
MIGRATIONS: dict[int, str] = {}


class LabellingStore:
    """Projects, tasks, reviews and exports in ``portal.db`` (default ``LOFT_HOME/portal.db``).
    Mutating methods take ``actor`` and ``context``, both written to the audit trail."""

    def __init__(self, path: Path | None = None) -> None:
        if path is None:
            from loft.core.paths import loft_home

            path = loft_home() / "portal.db"
        self.path = Path(path)
        self._db = SqliteFile(self.path, self._create_or_migrate, rows=True, foreign_keys=True)

    def connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._db.transaction()

    def _create_or_migrate(self, conn: sqlite3.Connection) -> None:
        migrate_component(
            conn, self.path, COMPONENT, "labelling", SCHEMA, MIGRATIONS, SCHEMA_VERSION
        )

    # -- projects ------------------------------------------------------------------------------

    def create_project(
        self,
        name: str,
        dataset: str,
        questions: Any,
        annotators: list[str],
        *,
        overlap: int = 1,
        guidelines: str = "",
        suggestions: str = "none",
        actor: str,
        context: dict | None = None,
    ) -> Project:
        """A project over dataset version ``dataset`` (``name`` or ``name:version``, pinned to
        the version it names now), its tasks assigned round robin. Every problem at once."""
        from loft.data import catalog

        problems = []
        if not isinstance(name, str) or not qs.NAME_RE.match(name):
            problems.append(f"name {name!r}: use 1-64 lowercase letters, digits, '.', '_', '-'")
        try:
            parsed = qs.parse_questions(questions)
        except ConfigError as e:
            problems.append(e.message)
            parsed = []
        people = list(dict.fromkeys(a.strip() for a in annotators if a and a.strip()))
        if not people:
            problems.append("annotators: name one or more")
        if not isinstance(overlap, int) or not 1 <= overlap <= max(1, len(people)):
            problems.append(
                f"overlap {overlap!r}: each record goes to that many distinct annotators, so it "
                f"must be from 1 to the number of annotators ({len(people)})"
            )
        if suggestions not in SUGGESTIONS:
            problems.append(f"suggestions {suggestions!r}: one of {', '.join(SUGGESTIONS)}")
        version = None
        try:
            version = catalog.get_version(dataset)
        except (NotFoundError, ConfigError) as e:
            problems.append(e.message)
        if version is not None and version.records == 0:
            problems.append(f"dataset {version.ref} has no records")
        if problems:
            raise ConfigError(
                f"cannot create labelling project {name!r}:\n  " + "\n  ".join(problems)
            )
        assert version is not None
        now = now_iso()
        with self.connect() as conn:
            try:
                conn.execute(
                    "INSERT INTO label_projects VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, version.ref, version.layout, version.records, guidelines or "",
                     json.dumps([q.to_dict() for q in parsed]), overlap, json.dumps(people),
                     suggestions, actor, now),
                )  # fmt: skip
            except sqlite3.IntegrityError:
                raise ConfigError(f"a labelling project named {name!r} already exists.") from None
            conn.executemany(
                "INSERT INTO label_tasks (project, record, annotator) VALUES (?, ?, ?)",
                ((name, i, a) for i, a in assign(version.records, people, overlap)),
            )
            audit.append(
                actor, "labelling.project.create", name,
                {"dataset": version.ref, "overlap": overlap, "annotators": people,
                 "questions": [q.name for q in parsed], **(context or {})},
            )  # fmt: skip
            return self._project(conn, name)

    def _project(self, conn: sqlite3.Connection, name: str) -> Project:
        row = conn.execute("SELECT * FROM label_projects WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(
                f"no labelling project named {name!r}.", hint="The /labelling page lists them."
            )
        return Project(
            row["name"], row["dataset"], row["layout"], row["records"], row["guidelines"],
            tuple(Question(**{**q, "labels": tuple(q["labels"])})
                  for q in json.loads(row["questions"])),
            row["overlap"], tuple(json.loads(row["annotators"])), row["suggestions"],
            row["created_by"], row["created_at"],
        )  # fmt: skip

    def get_project(self, name: str) -> Project:
        with self.connect() as conn:
            return self._project(conn, name)

    def list_projects(
        self, limit: int, offset: int, *, annotator: str | None = None
    ) -> tuple[list[Project], int]:
        """A page of projects by name; with ``annotator``, only those with records assigned to
        them."""
        where, args = "", ()
        if annotator is not None:
            where = " WHERE name IN (SELECT DISTINCT project FROM label_tasks WHERE annotator = ?)"
            args = (annotator,)
        with self.connect() as conn:
            names = conn.execute(
                f"SELECT name FROM label_projects{where} ORDER BY name LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
            total = conn.execute(f"SELECT COUNT(*) FROM label_projects{where}", args).fetchone()
            return [self._project(conn, r[0]) for r in names], total[0]

    def is_assigned(self, project: str, annotator: str, record: int | None = None) -> bool:
        sql = "SELECT 1 FROM label_tasks WHERE project = ? AND annotator = ?"
        args: tuple = (project, annotator)
        if record is not None:
            sql, args = sql + " AND record = ?", (*args, record)
        with self.connect() as conn:
            return conn.execute(sql + " LIMIT 1", args).fetchone() is not None

    def progress(self, project: str) -> list[dict[str, Any]]:
        """Per annotator: how many records they have in each status."""
        with self.connect() as conn:
            self._project(conn, project)
            rows = conn.execute(
                "SELECT annotator, status, COUNT(*) FROM label_tasks WHERE project = ? "
                "GROUP BY annotator, status ORDER BY annotator",
                (project,),
            ).fetchall()
        out: dict[str, dict[str, Any]] = {}
        for annotator, status, n in rows:
            row = out.setdefault(
                annotator, {"annotator": annotator, **dict.fromkeys(qs.STATUSES, 0)}
            )
            row[status] = n
        for row in out.values():
            row["assigned"] = sum(row[s] for s in qs.STATUSES)
            row["done"] = row["submitted"] + row["discarded"]
        return list(out.values())

    # -- an annotator's tasks ------------------------------------------------------------------

    def task(self, project: str, record: int, annotator: str) -> Task:
        """``annotator``'s task on ``record``; PermissionDeniedError when it is not theirs."""
        with self.connect() as conn:
            return self._task(conn, project, record, annotator)

    def _task(self, conn: sqlite3.Connection, project: str, record: int, annotator: str) -> Task:
        p = self._project(conn, project)
        row = conn.execute(
            "SELECT * FROM label_tasks WHERE project = ? AND record = ? AND annotator = ?",
            (project, record, annotator),
        ).fetchone()
        if row is None:
            if not 0 <= record < p.records:
                raise NotFoundError(
                    f"project {project!r} has records 0-{p.records - 1}, not {record}."
                )
            raise PermissionDeniedError(
                f"record {record} of project {project!r} is not assigned to {annotator}.",
                hint=f"Open /labelling/{project}/next for your next assigned record.",
            )
        return task_of(row)

    def tasks(
        self, project: str, annotator: str, limit: int, offset: int
    ) -> tuple[list[Task], int]:
        """A page of ``annotator``'s tasks in ``project``, by record."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT * FROM label_tasks WHERE project = ? AND annotator = ? ORDER BY record "
                "LIMIT ? OFFSET ?",
                (project, annotator, limit, offset),
            ).fetchall()
            total = conn.execute(
                "SELECT COUNT(*) FROM label_tasks WHERE project = ? AND annotator = ?",
                (project, annotator),
            ).fetchone()[0]
        return [task_of(r) for r in rows], total

    def next_record(self, project: str, annotator: str, *, after: int = -1) -> int | None:
        """The first record after ``after`` that ``annotator`` has still to do (pending or
        draft), wrapping around; None when all of theirs are done."""
        with self.connect() as conn:
            self._project(conn, project)
            for sql in ("AND record > ? ORDER BY record", "AND record <= ? ORDER BY record"):
                row = conn.execute(
                    "SELECT record FROM label_tasks WHERE project = ? AND annotator = ? AND "
                    f"status IN ('pending', 'draft') {sql} LIMIT 1",
                    (project, annotator, after),
                ).fetchone()
                if row is not None:
                    return row[0]
        return None

    def neighbour(self, project: str, annotator: str, record: int, step: int) -> int | None:
        """The record before (``step`` -1) or after (+1) ``record`` among ``annotator``'s."""
        op, order = (">", "ASC") if step > 0 else ("<", "DESC")
        with self.connect() as conn:
            row = conn.execute(
                f"SELECT record FROM label_tasks WHERE project = ? AND annotator = ? AND "
                f"record {op} ? ORDER BY record {order} LIMIT 1",
                (project, annotator, record),
            ).fetchone()
        return row[0] if row else None

    def record_view(self, project: str, record: int) -> dict[str, Any]:
        """What the labelling page shows: prompt, responses (in display order, each with its
        index), suggestions from the record (marked as such)."""
        from loft.data import catalog

        p = self.get_project(project)
        if not 0 <= record < p.records:
            raise NotFoundError(f"project {project!r} has records 0-{p.records - 1}, not {record}.")
        data = catalog.read_records(p.dataset, record, 1)[0]
        prompt, responses = qs.record_parts(data)
        order = qs.display_order(project, record, len(responses))
        suggested = {
            name: {"value": value, "source": "dataset: the record's chosen response"}
            for name, value in qs.suggestions(p.layout, list(p.questions), len(responses)).items()
        } if p.suggestions == "dataset" else {}  # fmt: skip
        model = self.model_suggestion(project, record)
        if model is not None:
            for q in p.questions:
                if q.kind == "correction":
                    suggested[q.name] = {
                        "value": model["text"],
                        "source": f"model {model['model']}",
                    }
        return {
            "record": record,
            "prompt": prompt,
            "responses": [
                {
                    "index": i,
                    "position": n + 1,
                    "messages": responses[i],
                    "text": qs.response_text(responses[i]),
                }
                for n, i in enumerate(order)
            ],  # fmt: skip
            "suggestions": suggested,
        }

    def save(
        self,
        project: str,
        record: int,
        annotator: str,
        answers: Any,
        *,
        submit: bool,
        actor: str,
        context: dict | None = None,
    ) -> Task:
        """Save ``annotator``'s answers as a draft, or submit them (every question answered)."""
        from loft.data import catalog

        p = self.get_project(project)
        self.task(project, record, annotator)  # theirs, else PermissionDeniedError
        data = catalog.read_records(p.dataset, record, 1)[0]
        n = len(qs.record_parts(data)[1])
        clean = qs.check_answers(list(p.questions), answers, n, complete=submit)
        status = "submitted" if submit else "draft"
        with self.connect() as conn:
            conn.execute(
                "UPDATE label_tasks SET status = ?, answers = ?, updated_at = ? WHERE project = ? "
                "AND record = ? AND annotator = ?",
                (status, json.dumps(clean), now_iso(), project, record, annotator),
            )
            audit.append(
                actor, f"labelling.{'submit' if submit else 'draft'}", f"{project}:{record}",
                {"annotator": annotator, "answers": clean, **(context or {})},
            )  # fmt: skip
            return self._task(conn, project, record, annotator)

    def discard(
        self, project: str, record: int, annotator: str, *, actor: str, context: dict | None = None
    ) -> Task:
        """``annotator`` marks ``record`` unusable (left out of exports unless a reviewer says
        otherwise)."""
        self.task(project, record, annotator)
        with self.connect() as conn:
            conn.execute(
                "UPDATE label_tasks SET status = 'discarded', answers = NULL, updated_at = ? "
                "WHERE project = ? AND record = ? AND annotator = ?",
                (now_iso(), project, record, annotator),
            )
            audit.append(
                actor, "labelling.discard", f"{project}:{record}",
                {"annotator": annotator, **(context or {})},
            )  # fmt: skip
            return self._task(conn, project, record, annotator)

    # -- suggestions from a model -------------------------------------------------------------

    def model_suggestion(self, project: str, record: int) -> dict[str, Any] | None:
        with self.connect() as conn:
            row = conn.execute(
                "SELECT model, text, at FROM label_suggestions WHERE project = ? AND record = ?",
                (project, record),
            ).fetchone()
        return dict(row) if row else None

    def unsuggested(self, project: str, limit: int) -> list[int]:
        """Up to ``limit`` records, by number, that have no model suggestion yet."""
        p = self.get_project(project)
        with self.connect() as conn:
            done = {
                r[0] for r in conn.execute(
                    "SELECT record FROM label_suggestions WHERE project = ?", (project,)
                )
            }  # fmt: skip
        return [r for r in range(p.records) if r not in done][:limit]

    def add_suggestion(self, project: str, record: int, model: str, text: str) -> None:
        with self.connect() as conn:
            conn.execute(
                "INSERT INTO label_suggestions VALUES (?, ?, ?, ?, ?) ON CONFLICT (project, "
                "record) DO UPDATE SET model = excluded.model, text = excluded.text, "
                "at = excluded.at",
                (project, record, model, text, now_iso()),
            )

    # -- agreement, conflicts, review ----------------------------------------------------------

    def _by_record(
        self, conn: sqlite3.Connection, project: str, *, overlapping: bool = False
    ) -> dict[int, list[Task]]:
        """Tasks by record; ``overlapping``: only records with two or more submissions."""
        where = ""
        if overlapping:
            where = (
                " AND record IN (SELECT record FROM label_tasks WHERE project = ? AND status = "
                "'submitted' GROUP BY record HAVING COUNT(*) >= 2)"
            )
        rows = conn.execute(
            f"SELECT * FROM label_tasks WHERE project = ?{where} ORDER BY record, annotator",
            (project, project) if overlapping else (project,),
        )
        out: dict[int, list[Task]] = defaultdict(list)
        for row in rows:
            out[row["record"]].append(task_of(row))
        return out

    def agreement(self, project: str) -> dict[str, Any]:
        """Per question: Krippendorff's alpha over records with two or more submissions
        (interval for ratings, nominal otherwise; a ranking by its first choice; corrections are
        free text and not measured) and Cohen's kappa for each pair of annotators that share
        records."""
        with self.connect() as conn:
            p = self._project(conn, project)
            by_record = self._by_record(conn, project, overlapping=True)
        submissions = [
            [(t.annotator, t.answers) for t in tasks if t.status == "submitted"]
            for tasks in by_record.values()
        ]
        return by_question(list(p.questions), submissions)

    def conflicts(self, project: str, limit: int, offset: int) -> tuple[list[dict], int]:
        """Records whose submissions disagree and that no reviewer has resolved yet, with each
        annotator's answers."""
        with self.connect() as conn:
            p = self._project(conn, project)
            by_record = self._by_record(conn, project, overlapping=True)
            reviewed = {
                r[0] for r in conn.execute(
                    "SELECT record FROM label_reviews WHERE project = ?", (project,)
                )
            }  # fmt: skip
        found = []
        for record, tasks in by_record.items():
            done = [t for t in tasks if t.status == "submitted"]
            if record in reviewed or len(done) < 2:
                continue
            if any(not qs.same(list(p.questions), done[0].answers, t.answers) for t in done[1:]):
                found.append({"record": record, "answers": [t.to_dict() for t in tasks]})
        return found[offset : offset + limit], len(found)

    def resolve(
        self,
        project: str,
        record: int,
        answers: Any,
        *,
        discard: bool = False,
        actor: str,
        context: dict | None = None,
    ) -> dict[str, Any]:
        """A reviewer's final answers for ``record`` (or ``discard``: leave it out)."""
        from loft.data import catalog

        p = self.get_project(project)
        if not 0 <= record < p.records:
            raise NotFoundError(f"project {project!r} has records 0-{p.records - 1}, not {record}.")
        clean = None
        if not discard:
            n = len(qs.record_parts(catalog.read_records(p.dataset, record, 1)[0])[1])
            clean = qs.check_answers(list(p.questions), answers, n, complete=True)
        status = "discarded" if discard else "submitted"
        now = now_iso()
        with self.connect() as conn:
            conn.execute(
                "INSERT INTO label_reviews VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (project, "
                "record) DO UPDATE SET status = excluded.status, answers = excluded.answers, "
                "reviewer = excluded.reviewer, at = excluded.at",
                (project, record, status, json.dumps(clean), actor, now),
            )
            audit.append(
                actor, "labelling.review", f"{project}:{record}",
                {"status": status, "answers": clean, **(context or {})},
            )  # fmt: skip
        return {"record": record, "status": status, "answers": clean, "reviewer": actor, "at": now}

    def final_answers(self, project: str) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        """Each record's final answers (a reviewer's, else the submissions when they all agree)
        and counts of the records left out: discarded, conflicts (unreviewed disagreements),
        unfinished (a task still pending or in draft)."""
        with self.connect() as conn:
            p = self._project(conn, project)
            by_record = self._by_record(conn, project)
            reviews = {
                r["record"]: r for r in conn.execute(
                    "SELECT * FROM label_reviews WHERE project = ?", (project,)
                )
            }  # fmt: skip
        final: dict[int, dict[str, Any]] = {}
        left = {"discarded": 0, "conflicts": 0, "unfinished": 0}
        for record in range(p.records):
            review = reviews.get(record)
            if review is not None:
                if review["status"] == "discarded":
                    left["discarded"] += 1
                else:
                    final[record] = json.loads(review["answers"])
                continue
            tasks = by_record.get(record, [])
            if any(t.status in ("pending", "draft") for t in tasks):
                left["unfinished"] += 1
                continue
            done = [t for t in tasks if t.status == "submitted"]
            if not done:
                left["discarded"] += 1
            elif all(qs.same(list(p.questions), done[0].answers, t.answers) for t in done[1:]):
                final[record] = done[0].answers
            else:
                left["conflicts"] += 1
        return final, left

    def record_export(
        self, project: str, dataset: str, shape: str, records: int, *, actor: str,
        context: dict | None = None,
    ) -> None:  # fmt: skip
        with self.connect() as conn:
            conn.execute(
                "INSERT INTO label_exports VALUES (?, ?, ?, ?, ?, ?)",
                (project, dataset, shape, records, actor, now_iso()),
            )
            audit.append(
                actor, "labelling.export", project,
                {"dataset": dataset, "shape": shape, "records": records, **(context or {})},
            )  # fmt: skip

    def exports(self, project: str, limit: int, offset: int) -> tuple[list[dict], int]:
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT * FROM label_exports WHERE project = ? ORDER BY at DESC, rowid DESC "
                "LIMIT ? OFFSET ?",
                (project, limit, offset),
            ).fetchall()
            total = conn.execute(
                "SELECT COUNT(*) FROM label_exports WHERE project = ?", (project,)
            ).fetchone()[0]
        return [dict(r) for r in rows], total
