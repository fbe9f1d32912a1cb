"""Every state change made from the CLI (and the Python API under it) is in the audit trail
exactly once, with the acting user and what changed: registrations, alias moves, promotions
passed, refused and forced (with the gate's results), rollbacks, deletions, serving keys, jobs,
users and datasets. Versions are adapter folders written with numpy: nothing is trained."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from helpers import run_cli
from loft.core import audit

pytestmark = pytest.mark.unit

ACTOR = "ops-alice"


def _adapter(folder: Path, seed: int, gate: list[str] | None = None) -> Path:
    """A PEFT-shaped LoRA folder (config + safetensors), enough for the registry to register;
    ``gate`` is the training config's gate, as a trained run records it in lineage.json."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "base_model_name_or_path": "tiny-llama", "r": 2,
           "lora_alpha": 4, "target_modules": ["q_proj"]}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    weight = np.random.default_rng(seed).standard_normal((2, 8)).astype(np.float32)
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": weight},
              str(folder / "adapter_model.safetensors"))  # fmt: skip
    lineage = {"base_model": {"name": "tiny-llama", "sha256": "ab" * 32, "source": "test"}}
    if gate is not None:
        lineage["config"] = {"gate": gate}
    (folder / "lineage.json").write_text(json.dumps(lineage))
    return folder


def _scored(ref: str, value: float) -> None:
    """eval_loss for ``ref`` as `loft eval` records it, all on the same held-out records."""
    from loft import registry
    from loft.registry.evaluations import make_entries, on_data

    on = on_data("/held/out.jsonl", "f" * 64, 4, "eval_loss", {"max_new_tokens": 64})
    registry.record_evaluation(ref, make_entries({"eval_loss": value}, on=on, source="eval"))


class Trail:
    """The entries appended since the last call."""

    def __init__(self) -> None:
        self.seq = 0

    def new(self) -> list[dict]:
        newest = audit.head()
        top = newest["seq"] if newest else 0
        got = list(reversed(audit.read(max(top - self.seq, 1)))) if top > self.seq else []
        self.seq = top
        return got

    def one(self, action: str, target: str | None = None) -> dict:
        """The single entry appended since the last call; it must be ``action`` by ACTOR."""
        got = self.new()
        assert [(e["action"], e["actor"]) for e in got] == [(action, ACTOR)], got
        if target is not None:
            assert got[0]["target"] == target
        return got[0]["details"]


@pytest.fixture
def trail(loft_home: Path, monkeypatch: pytest.MonkeyPatch) -> Trail:
    monkeypatch.setenv("LOFT_USER", ACTOR)
    monkeypatch.setenv("COLUMNS", "200")
    return Trail()


@pytest.fixture(scope="module")
def registry_home(tmp_path_factory: pytest.TempPathFactory, _session_home: Path) -> Path:
    """One LOFT_HOME for the registry tests (each uses its own model name), so MLflow's
    database is created once."""
    from helpers import linked_home

    return linked_home(tmp_path_factory.mktemp("audit_registry"), _session_home)


def test_registry_changes_from_the_cli_are_each_audited_once(
    registry_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    monkeypatch.setenv("LOFT_HOME", str(registry_home))
    monkeypatch.setenv("LOFT_USER", ACTOR)
    monkeypatch.setenv("COLUMNS", "200")
    trail = Trail()
    trail.new()
    from loft.registry import history

    for seed in (1, 2):
        assert run_cli("registry", "register", str(_adapter(tmp_path / f"a{seed}", seed)),
                       "--name", "bot") == 0  # fmt: skip
        details = trail.one("registry.register", f"bot:{seed}")
        assert details["kind"] == "adapter" and len(details["weights_digest"]) == 64
    # bot:3's training config names no gate
    assert run_cli("registry", "register", str(_adapter(tmp_path / "a3", 3, [])), "-n", "bot") == 0
    trail.one("registry.register", "bot:3")

    assert run_cli("registry", "alias", "bot:1", "--to", "champion", "--reason", "first") == 0
    details = trail.one("registry.alias", "bot@champion")
    assert (details["from"], details["to"], details["why"]) == (None, 1, "first")

    _scored("bot:1", 1.0)
    _scored("bot:2", 2.0)
    assert trail.new() == []  # evaluations are measurements, not state changes of the trail
    gate = tmp_path / "gate.yaml"
    gate.write_text("gate:\n  - eval_loss <= champion + 0.02\n")

    # refused: nothing moves, and the refusal is recorded with each check
    assert run_cli("registry", "promote", "bot:2", "--gate", str(gate)) == 3
    refused = trail.one("registry.promote_refused", "bot:2")
    assert (refused["from"], refused["to"], refused["passed"], refused["forced"]) == (
        1, 2, False, False,
    )  # fmt: skip
    (check,) = refused["gate"]
    assert check["expr"] == "eval_loss <= champion + 0.02" and not check["passed"]
    assert check["value"] == 2.0 and check["threshold"] == pytest.approx(1.02)
    assert refused["gate_source"] == str(gate)

    # forced past the failing gate: by whom, why, and the checks that failed
    assert run_cli("registry", "promote", "bot:2", "--gate", str(gate), "--force",
                   "--reason", "hotfix") == 0  # fmt: skip
    forced = trail.one("registry.promote", "bot:2")
    assert (forced["forced"], forced["passed"], forced["why"]) == (True, False, "hotfix")
    assert [c["passed"] for c in forced["gate"]] == [False]

    # --force with no gate file and a config gate without checks: forced, not "gate passed"
    assert run_cli("registry", "promote", "bot:3", "--force") == 0
    forced = trail.one("registry.promote", "bot:3")
    assert (forced["forced"], forced["passed"], forced["gate"]) == (True, True, [])
    assert forced["why"] == "forced (the gate has no checks)"

    assert run_cli("registry", "rollback", "bot", "--reason", "bad answers") == 0
    back = trail.one("registry.rollback", "bot@champion")
    assert (back["from"], back["to"], back["why"]) == (3, 2, "bad answers")

    assert run_cli("registry", "delete", "bot:3", "--yes", "--reason", "unused") == 0
    gone = trail.one("registry.delete", "bot:3")
    assert gone["why"] == "unused" and len(gone["weights_digest"]) == 64

    # the model's history shows the refusal and the forced moves the same way
    events = [(h.get("event"), h.get("to"), h.get("forced"), h.get("passed"))
              for h in history("bot")]  # fmt: skip
    assert events[1:4] == [("promote-refused", 2, False, False), (None, 2, True, False),
                           (None, 3, True, True)]  # fmt: skip
    capsys.readouterr()
    assert run_cli("registry", "history", "bot") == 0
    out = capsys.readouterr().out
    assert "champion: 2 REFUSED by the gate, stays 1" in out
    assert "gate FAIL: eval_loss <= champion + 0.02" in out and out.count("forced") >= 2
    # a refusal is not a move: rolling back walks over it
    from loft.registry.aliases import previous_version

    assert previous_version("bot", "champion") == 1


def test_keys_jobs_schedules_users_and_datasets_are_each_audited_once(
    trail: Trail, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    assert run_cli("keys", "create", "--name", "ci", "--adapters", "bot", "--rate", "5/min") == 0
    created = trail.new()
    assert [(e["action"], e["actor"]) for e in created] == [("key.create", ACTOR)]
    kid = created[0]["target"]
    assert created[0]["details"]["adapters"] == ["bot"] and created[0]["details"]["via"] == "cli"
    assert "loft-" not in json.dumps(created)  # never the secret
    assert run_cli("keys", "revoke", "ci") == 0
    assert trail.one("key.revoke", kid)["name"] == "ci"

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    assert run_cli("jobs", "submit", "--kind", "data-validate", "--owner", "bob", "--json",
                   "--", str(data)) == 0  # fmt: skip
    submitted = trail.new()
    assert [(e["action"], e["actor"]) for e in submitted] == [("job.submit", ACTOR)]
    job_id = submitted[0]["target"]
    details = submitted[0]["details"]
    assert (details["kind"], details["owner"], details["args"]) == ("data-validate", "bob",
                                                                    [str(data)])  # fmt: skip
    assert run_cli("jobs", "cancel", job_id) == 0
    assert trail.one("job.cancel", job_id)["status"] == "ADMITTED"
    assert run_cli("jobs", "cancel", job_id) == 0  # already cancelled: nothing changes
    assert trail.new() == []
    assert run_cli("jobs", "retry", job_id) == 0
    trail.one("job.retry", job_id)
    assert run_cli("schedule", "add", "nightly", "--every", "1d", "--kind", "data-validate",
                   "--owner", "bob", "--", str(data)) == 0  # fmt: skip
    assert trail.one("schedule.add", "nightly")["trigger"] == "every 1d"
    assert run_cli("schedule", "remove", "nightly") == 0
    trail.one("schedule.remove", "nightly")

    monkeypatch.setattr(sys, "stdin", io.StringIO("a long enough password\n"))
    assert run_cli("users", "add", "carol", "--role", "annotator", "--password-stdin") == 0
    assert trail.one("user.add", "carol") == {"role": "annotator", "via": "cli"}
    assert run_cli("users", "set-role", "carol", "curator") == 0
    assert trail.one("user.set_role", "carol")["to"] == "curator"

    from loft.data.catalog import add_version

    source = {"kind": "upload", "filename": "c.jsonl"}
    add_version("chats", [{"text": "one"}, {"text": "two"}], source=source)
    assert trail.one("dataset.version", "chats:1")["records"] == 2


def test_audit_log_filters(trail: Trail, capsys: pytest.CaptureFixture):
    """`loft audit log`: --actor, --action (a prefix), --target, --since/--until, paging."""
    for i, (actor, action) in enumerate(
        [("ann", "registry.alias"), ("bob", "registry.promote"), ("ann", "job.submit"),
         ("bob", "registry.promote_refused"), ("ann", "key.create")]
    ):  # fmt: skip
        audit.append(actor, action, f"t{i % 2}", {"i": i})

    def log(*args: str) -> list[int]:
        capsys.readouterr()
        assert run_cli("audit", "log", "--json", *args) == 0
        return [json.loads(line)["details"]["i"] for line in capsys.readouterr().out.splitlines()]

    assert log() == [4, 3, 2, 1, 0]
    assert log("--action", "registry.") == [3, 1, 0]
    assert log("--action", "registry.promote") == [3, 1]
    assert log("--actor", "ann", "--action", "registry") == [0]
    assert log("--target", "t1") == [3, 1]
    assert log("-n", "2", "--offset", "1") == [3, 2]
    today = audit.read(1)[0]["ts"][:10]
    assert log("--since", today) == [4, 3, 2, 1, 0]
    assert log("--until", today) == []
    assert log("--since", "2999-01-01T00:00:00+02:00") == []
    capsys.readouterr()
    assert run_cli("audit", "log", "--since", "yesterday") == 2
    assert "not an ISO 8601 date" in capsys.readouterr().err
    assert run_cli("audit", "log", "--actor", "nobody") == 0
    assert "no entries match" in capsys.readouterr().out
    assert run_cli("audit", "log", "--action", "job.") == 0
    out = capsys.readouterr().out
    assert "job.submit" in out and "key.create" not in out
    assert run_cli("audit", "--help") == 0
    commands = [line.split()[1] for line in capsys.readouterr().out.splitlines()
                if line.startswith("│ ") and len(line.split()) > 1]  # fmt: skip
    assert "log" in commands and "trail" not in commands  # the old name works, unlisted


def test_the_portal_records_each_change_once_as_its_user(registry_home: Path, tmp_path: Path):
    """The same package functions record the portal's changes: one entry each, the signed-in
    user as actor, where it came from in the details (no second entry from the view)."""
    from portal_client import portal_for

    with portal_for(registry_home) as p:
        for seed in (1, 2):
            run_cli("registry", "register", str(_adapter(tmp_path / f"a{seed}", seed)), "-n", "web")
        run_cli("registry", "alias", "web:1", "--to", "champion")
        _scored("web:1", 1.0)
        _scored("web:2", 2.0)
        trail = Trail()
        trail.new()
        client, headers = p.as_role("engineer")

        def one(action: str, target: str) -> dict:
            got = trail.new()
            assert [(e["action"], e["actor"], e["target"]) for e in got] == [
                (action, "engineer", target)
            ], got
            assert got[0]["details"]["via"] == "token" and "ip" in got[0]["details"]
            return got[0]["details"]

        gate = {"gate": ["eval_loss <= champion + 0.02"]}
        url = "/api/registry/web/2/promote"
        assert client.post(url, json=gate, headers=headers).status_code == 409
        assert one("registry.promote_refused", "web:2")["gate"][0]["passed"] is False
        forced = client.post(url, json={**gate, "force": True, "reason": "x"}, headers=headers)
        assert forced.status_code == 200
        assert one("registry.promote", "web:2")["forced"] is True
        r = client.post("/api/registry/web/rollback", json={"alias": "champion"}, headers=headers)
        assert r.status_code == 200
        assert one("registry.rollback", "web@champion")["to"] == 1
        page = client.get("/registry/web/2", headers=headers).text  # its history, both kinds
        assert '2 <span class="bad">refused by the gate</span> (stays 1)' in page
        assert '→ 2 <span class="bad">forced</span>' in page

        admin, admin_headers = p.as_role("admin")
        r = admin.post("/api/serving/keys", json={"name": "k", "adapters": ["web"]},
                       headers=admin_headers)  # fmt: skip
        assert r.status_code == 201
        got = trail.new()
        assert [(e["action"], e["actor"]) for e in got] == [("key.create", "admin")]
        kid = got[0]["target"]
        assert admin.delete(f"/api/serving/keys/{kid}", headers=admin_headers).status_code < 300
        got = trail.new()
        assert [(e["action"], e["actor"], e["target"]) for e in got] == [
            ("key.revoke", "admin", kid)
        ]
