"""Labelling (loft.curate): assignment with overlap, task statuses, agreement against the
textbooks' worked examples, the reviewer's final answers and the exported dataset shapes."""

from __future__ import annotations

import contextlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loft.core import audit
from loft.core.errors import ConfigError, PermissionDeniedError
from loft.curate import questions as qs
from loft.curate.agreement import cohen_kappa, krippendorff_alpha
from loft.curate.export import export
from loft.curate.store import LabellingStore, assign

pytestmark = pytest.mark.unit


# -- agreement: published worked examples --------------------------------------------------------


def test_cohen_kappa_matches_the_textbook_example():
    # Wikipedia's "Cohen's kappa" example: 50 proposals, yes/yes 20, yes/no 5, no/yes 10, no/no 15
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(["x", "y"], ["x", "y"]) == pytest.approx(1.0)
    assert cohen_kappa(["x", "x"], ["x", "x"]) is None  # no variation: undefined


# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers,
# 12 units, values 1-5 with missing data. Published: nominal 0.743, interval 0.849.
_K = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]


def test_krippendorff_alpha_matches_the_published_examples():
    units = [[v for v in unit if v is not None] for unit in zip(*_K, strict=True)]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)
    # section A: two observers, binary data, ten units: alpha = 0.095
    a = [0, 1, 0, 0, 0, 0, 0, 0, 1, 0]
    b = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    assert krippendorff_alpha(list(zip(a, b, strict=True))) == pytest.approx(0.095, abs=5e-4)
    assert krippendorff_alpha([[1], [2]]) is None  # nothing pairable


# -- assignment ----------------------------------------------------------------------------------


def test_round_robin_gives_each_record_n_distinct_annotators_and_even_loads():
    people = ["ann", "bob", "cat"]
    pairs = list(assign(10, people, 2))
    per_record = Counter(r for r, _ in pairs)
    assert set(per_record.values()) == {2}
    for r in range(10):
        assert len({a for rr, a in pairs if rr == r}) == 2
    loads = Counter(a for _, a in pairs)
    assert max(loads.values()) - min(loads.values()) <= 1
    assert sum(loads.values()) == 20


def test_questions_are_checked_all_at_once():
    with pytest.raises(ConfigError) as e:
        qs.parse_questions([
            {"name": "q", "kind": "rating", "scale": 1},
            {"name": "q", "kind": "label", "labels": ["a"]},
            {"name": "Bad", "kind": "vote"},
        ])  # fmt: skip
    for part in ("scale", "used twice", "2-9 distinct labels", "'vote' is not one of"):
        assert part in e.value.message


# -- a project end to end ------------------------------------------------------------------------

PAIRS = [
    {"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}
    for i in range(4)
]
QUESTIONS = [
    {"name": "better", "kind": "pairwise", "text": "Which answer is better?"},
    {"name": "quality", "kind": "rating", "scale": 5},
    {"name": "fix", "kind": "correction"},
]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOFT_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def project(home):
    from loft.data import catalog

    catalog.add_version("pairs", PAIRS, source={"kind": "upload", "filename": "p.jsonl"})
    store = LabellingStore()
    p = store.create_project(
        "prefs", "pairs", QUESTIONS, ["ann", "bob"], overlap=2, guidelines="Be kind.",
        suggestions="dataset", actor="cur",
    )  # fmt: skip
    return store, p


def test_create_project_pins_the_version_and_assigns_every_record_to_both(project):
    store, p = project
    assert p.dataset == "pairs:1" and p.layout == "preference" and p.records == 4
    progress = {row["annotator"]: row for row in store.progress("prefs")}
    assert {a: r["pending"] for a, r in progress.items()} == {"ann": 4, "bob": 4}
    assert store.list_projects(10, 0, annotator="ann")[1] == 1
    assert store.list_projects(10, 0, annotator="zed")[1] == 0
    view = store.record_view("prefs", 0)
    assert sorted(r["text"] for r in view["responses"]) == ["bad answer 0", "good answer 0"]
    assert view["suggestions"]["better"]["value"] == 0
    assert view["prompt"] == [{"role": "user", "content": "question 0?"}]
    with pytest.raises(ConfigError, match="overlap 3"):
        store.create_project("x", "pairs", QUESTIONS, ["ann", "bob"], overlap=3, actor="cur")


def test_statuses_drafts_submissions_discards_and_foreign_records(project):
    store, _ = project
    assert store.next_record("prefs", "ann") == 0
    t = store.save("prefs", 0, "ann", {"better": 1}, submit=False, actor="ann")
    assert (t.status, t.answers) == ("draft", {"better": 1})
    with pytest.raises(ConfigError, match="quality: not answered"):
        store.save("prefs", 0, "ann", {"better": 1}, submit=True, actor="ann")
    with pytest.raises(ConfigError, match="quality: expected a whole number from 1 to 5"):
        store.save("prefs", 0, "ann", {"better": 1, "quality": 9}, submit=True, actor="ann")
    t = store.save("prefs", 0, "ann", {"better": 0, "quality": 4}, submit=True, actor="ann")
    assert t.status == "submitted"
    assert store.next_record("prefs", "ann") == 1
    assert store.discard("prefs", 1, "ann", actor="ann").status == "discarded"
    assert store.next_record("prefs", "ann", after=1) == 2
    with pytest.raises(PermissionDeniedError, match="not assigned to zed"):
        store.save("prefs", 0, "zed", {"better": 0, "quality": 4}, submit=True, actor="zed")
    entries = audit.read(50)
    assert [(e["actor"], e["action"], e["target"]) for e in entries[:2]] == [
        ("ann", "labelling.discard", "prefs:1"),
        ("ann", "labelling.submit", "prefs:0"),
    ]


def _label_all(store, answers_of):
    for record in range(4):
        for who in ("ann", "bob"):
            store.save("prefs", record, who, answers_of(who, record), submit=True, actor=who)


def test_agreement_conflicts_review_and_a_preference_export(project):
    from loft.data import catalog

    store, _ = project

    def answers(who, record):  # they disagree on record 3's choice, agree elsewhere
        better = 1 if (who == "bob" and record == 3) else 0
        return {"better": better, "quality": 4 if record % 2 else 2, "fix": ""}

    _label_all(store, answers)
    agreement = store.agreement("prefs")
    assert agreement["better"]["records"] == 4
    assert agreement["better"]["alpha"] == pytest.approx(
        krippendorff_alpha([[0, 0], [0, 0], [0, 0], [0, 1]])
    )
    assert agreement["quality"]["alpha"] == pytest.approx(1.0)
    assert agreement["better"]["kappa"][0]["annotators"] == ["ann", "bob"]
    assert "fix" not in agreement
    conflicts, total = store.conflicts("prefs", 10, 0)
    assert total == 1 and conflicts[0]["record"] == 3
    _, left = store.final_answers("prefs")
    assert left == {"discarded": 0, "conflicts": 1, "unfinished": 0}
    store.resolve("prefs", 3, {"better": 1, "quality": 4, "fix": "better, fixed"}, actor="cur")
    assert store.conflicts("prefs", 10, 0)[1] == 0
    version, counts = export(store, "prefs", "preference", actor="cur")
    assert counts["records"] == 4 and version.layout == "preference"
    assert version.source["project"] == "prefs" and version.parents == ("pairs:1",)
    rows = catalog.read_records(version.ref, 0, 10)
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "good answer 0"}]
    assert rows[3]["chosen"] == [{"role": "assistant", "content": "better, fixed"}]
    assert rows[3]["rejected"] == [{"role": "assistant", "content": "good answer 3"}]
    sft, _ = export(store, "prefs", "sft", actor="cur")
    first = catalog.read_records(sft.ref, 0, 1)[0]
    assert first["messages"][-1] == {"role": "assistant", "content": "good answer 0"}
    kto, _ = export(store, "prefs", "kto", actor="cur")
    labels = [r["label"] for r in catalog.read_records(kto.ref, 0, 10)]
    assert labels == [False, True, False, True]  # ratings 2 and 4 on a 1-5 scale
    assert store.exports("prefs", 10, 0)[1] == 3


def test_an_unfinished_project_has_nothing_to_export(project):
    store, _ = project
    with pytest.raises(ConfigError, match="4 unfinished"):
        export(store, "prefs", "preference", actor="cur")


def test_served_requests_logged_with_consent_become_a_dataset_version_to_label(home):
    from loft.curate.served import default_log, import_served
    from loft.serve.audit import AuditLog

    with pytest.raises(ConfigError, match="no serving audit log"):
        import_served("served", actor="cur")
    log = AuditLog(default_log(), log_prompts=True)
    log.write(request_id="r1", key="k", endpoint="/v1/chat/completions", model="bot",
              resolved="bot:1", status=200, n=1, completion="Restart it.",
              messages=[{"role": "user", "content": "It froze."}])  # fmt: skip
    AuditLog(default_log(), log_prompts=False).write(
        request_id="r2", key="k", endpoint="/v1/chat/completions", resolved="bot:1", status=200
    )
    version, counts = import_served("served", actor="cur")
    assert (counts["kept"], counts["read"]) == (1, 2)
    assert version.source["kind"] == "served" and version.layout == "sft"
    store = LabellingStore()
    store.create_project(
        "fixes", version.ref, [{"name": "fix", "kind": "correction"}], ["ann"], actor="cur"
    )
    view = store.record_view("fixes", 0)
    assert view["responses"][0]["text"] == "Restart it."
    store.save("fixes", 0, "ann", {"fix": "Hold the power button for 10 s."}, submit=True,
               actor="ann")  # fmt: skip
    from loft.data import catalog

    sft, _ = export(store, "fixes", "sft", actor="cur")
    assert catalog.read_records(sft.ref, 0, 1)[0]["messages"] == [
        {"role": "user", "content": "It froze."},
        {"role": "assistant", "content": "Hold the power button for 10 s."},
    ]
    assert audit.read(5, action="labelling.import_served")[0]["target"] == "served:1"


# -- suggestions from a served model ----------------------------------------------------------


@contextlib.contextmanager
def chat_server():
    """A stand-in for `loft serve`'s chat endpoint on a free loopback port: answers each prompt
    with 'model says: <last user message>' and records the requests (model, key) it got."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({**body, "auth": self.headers.get("Authorization")})
            text = "model says: " + body["messages"][-1]["content"]
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(out.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_served_model_version_prefills_corrections_marked_as_suggestions(home):
    from loft.curate.suggest import suggest
    from loft.data import catalog

    turns = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
             for i in range(3)]  # fmt: skip
    chats = [{"messages": t} for t in turns]
    catalog.add_version("chats", chats, source={"kind": "upload", "filename": "c.jsonl"})
    store = LabellingStore()
    store.create_project("fix", "chats", [{"name": "fix", "kind": "correction"}], ["ann"],
                         actor="cur")  # fmt: skip
    with pytest.raises(ConfigError, match="no model server is configured"):
        suggest(store, "fix", "bot:2", actor="cur")
    with chat_server() as (url, seen):
        done = suggest(store, "fix", "bot:2", url=url, key="sk-1", limit=2, actor="cur")
        assert done == {"model": "bot:2", "suggested": [0, 1], "left": 1}
        assert [(r["model"], r["messages"], r["auth"]) for r in seen] == [
            ("bot:2", [{"role": "user", "content": "q0"}], "Bearer sk-1"),
            ("bot:2", [{"role": "user", "content": "q1"}], "Bearer sk-1"),
        ]
    view = store.record_view("fix", 1)
    assert view["suggestions"] == {"fix": {"value": "model says: q1", "source": "model bot:2"}}
    assert store.record_view("fix", 2)["suggestions"] == {}
