"""portal.db itself: WAL, its schema version, a newer database refused, and the permission table
as docs/portal.md shows it."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from loft.core.errors import ConfigError
from loft.portal.roles import ACTIONS, ROLES
from loft.portal.store import SCHEMA_VERSION, PortalStore

pytestmark = pytest.mark.unit

DOCS = Path(__file__).resolve().parents[1] / "docs" / "portal.md"


def test_portal_db_is_wal_with_a_schema_version(loft_home):
    store = PortalStore()
    assert store.count_users() == 0
    conn = sqlite3.connect(loft_home / "portal.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = conn.execute("SELECT component, version FROM schema_version").fetchall()
        assert rows == [("accounts", SCHEMA_VERSION)]
    finally:
        conn.close()
    assert PortalStore().count_users() == 0  # a second opener finds it ready


def test_a_newer_portal_db_is_refused_with_what_to_do(loft_home):
    PortalStore().count_users()
    conn = sqlite3.connect(loft_home / "portal.db")
    with conn:
        conn.execute("UPDATE schema_version SET version = 99 WHERE component = 'accounts'")
    conn.close()
    with pytest.raises(ConfigError, match="schema version 99") as e:
        PortalStore().count_users()
    assert "Upgrade loft" in e.value.hint


# Written out so that a change to ACTIONS must be made here too, on purpose.
#                      admin curator annotator engineer viewer
EXPECTED = {
    "users.manage":       "yes   no      no        no       no",
    "tokens.own":         "yes   yes     yes       yes      yes",
    "audit.view":         "yes   no      no        no       no",
    "datasets.view":      "yes   yes     no        yes      yes",
    "datasets.upload":    "yes   yes     no        no       no",
    "labelling.manage":   "yes   yes     no        no       no",
    "labelling.annotate": "yes   yes     yes       no       no",
    "labelling.review":   "yes   yes     no        no       no",
    "jobs.view":          "yes   yes     no        yes      yes",
    "jobs.submit":        "yes   no      no        yes      no",
    "registry.view":      "yes   yes     no        yes      yes",
    "registry.compare":   "yes   yes     no        yes      no",
    "registry.promote":   "yes   no      no        yes      no",
    "serving.view":       "yes   yes     no        yes      yes",
    "keys.manage":        "yes   no      no        no       no",
}  # fmt: skip


def _roles(row: str) -> frozenset[str]:
    return frozenset(r for r, cell in zip(ROLES, row.split(), strict=True) if cell == "yes")


def test_the_permission_table_is_as_intended():
    assert ROLES == ("admin", "curator", "annotator", "engineer", "viewer")
    assert {action: _roles(row) for action, row in EXPECTED.items()} == ACTIONS


def test_docs_show_the_permission_table_as_it_is():
    """docs/portal.md's table: one row per action, a ✓ under each role that may take it."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        m = re.match(r"^\| `([a-z]+\.[a-z]+)` \|(.*)\|\s*$", line)
        if m:
            cells = [c.strip() for c in m.group(2).split("|")]
            rows[m.group(1)] = frozenset(
                r for r, c in zip(ROLES, cells[:5], strict=True) if c == "✓"
            )
    assert rows == ACTIONS
