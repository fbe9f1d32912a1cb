"""`loft data from-audit`: served chat requests, rated by their clients, back into training
records (issue 17: retraining on data curated from production traffic)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli


def _served(
    audit, rid: str, *, status: int = 200, n: int = 1, resolved: str = "bot:1",
    endpoint: str = "/v1/chat/completions", answer: str = '{"ok": true}',
) -> None:  # fmt: skip
    audit.write(request_id=rid, key="k", endpoint=endpoint, model="bot", resolved=resolved,
                status=status, n=n, prompt="<rendered>", completion=answer,
                messages=[{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"ticket {rid}"}])  # fmt: skip


def _rated(audit, about: str, score: float) -> None:
    audit.write(request_id=f"fb-{about}", key="k", endpoint="/v1/feedback", resolved="bot:1",
                status=200, about=about, score=score)  # fmt: skip


@pytest.mark.unit
def test_rated_chat_requests_become_records_and_the_rest_say_why(tmp_path: Path, capsys) -> None:
    from loft.data.traffic import from_audit
    from loft.serve.audit import AuditLog

    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, log_prompts=True)
    _served(audit, "good")
    _rated(audit, "good", 1.0)
    _rated(audit, "good", 0.6)  # rated twice: the mean, 0.8, counts
    _served(audit, "bad")
    _rated(audit, "bad", 0.2)
    _served(audit, "unrated")
    _served(audit, "failed", status=500)
    _served(audit, "two", n=2)
    _served(audit, "other", resolved="cat:3")
    _served(audit, "text", endpoint="/v1/completions")
    AuditLog(path, log_prompts=False).write(request_id="quiet", endpoint="/v1/chat/completions",
                                            resolved="bot:1", status=200)  # fmt: skip
    audit.close()

    got = from_audit([path], model="bot", min_score=0.5)
    assert got.records == [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "ticket good"},
        {"role": "assistant", "content": '{"ok": true}'},
    ]}]  # fmt: skip
    assert got.read == 7 and dict(got.skipped) == {
        "rated below 0.5": 1, "not rated": 1, "failed request": 1, "several choices": 1,
        "another model": 1, "no text logged (log_prompts off)": 1,
    }  # fmt: skip
    assert len(from_audit([path]).records) == 4  # every answered one-choice chat request

    out = tmp_path / "curated.jsonl"
    assert run_cli("data", "from-audit", str(path), "--out", str(out), "--min-score", "0.5") == 0
    assert "wrote 1 records" in capsys.readouterr().err
    assert json.loads(out.read_text())["messages"][-1]["role"] == "assistant"
    assert run_cli("data", "validate", str(out)) == 0  # what a retraining reads
    assert run_cli("data", "from-audit", str(tmp_path / "nope.jsonl"), "--out", str(out)) == 2
    assert run_cli("data", "from-audit", str(path), "--out", str(out), "--min-score", "2") == 2
