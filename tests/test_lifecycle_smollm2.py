"""The issue-4 lifecycle on the real SmolLM2-135M: train → registered → eval table → gated
promotion (a worse version refused, the failing check named) → rollback → tamper refused."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from pathlib import Path

import pytest

from helpers import run_loft

ROOT = Path(__file__).resolve().parents[1]
TICKETS = ROOT / "examples" / "support_tickets"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _loft(*args: str) -> subprocess.CompletedProcess:
    return run_loft(*args, env={"COLUMNS": "200"})


def test_train_register_eval_promote_rollback_tamper(tmp_path: Path, loft_home: Path):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join((TICKETS / "heldout.jsonl").read_text().splitlines(True)[:4]))
    train = tmp_path / "train.jsonl"  # 4 steps of 8 see 32 records: 64 are enough (and 6 eval)
    train.write_text("".join((TICKETS / "train.jsonl").read_text().splitlines(True)[:64]))
    runs = []
    for lr, canaries in (("1e-3", 3), ("1e-9", 0)):  # a real tune; a deliberately worse one
        r = _loft(
            "train", str(TICKETS / "lora.yaml"), "-q", "--set", f"data.train={train}",
            "--set", "data.eval_fraction=0.1", "--set", "register.name=support_tickets-lora",
            "--set", "training.max_steps=4", "--set", f"training.lr={lr}",
            "--set", "training.eval_every=4", "--set", "training.save_every=100",
            "--set", f"data.canaries={canaries}",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        runs.append(Path(r.stdout.strip().splitlines()[-1]))

    listed = json.loads(_loft("registry", "list", "--json").stdout)
    assert [m["name"] for m in listed] == ["support_tickets-lora"]
    shown = json.loads(_loft("registry", "show", "support_tickets-lora:1", "--json").stdout)
    assert shown["lineage"]["base_model"] == "smollm2-135m-instruct"
    assert shown["lineage"]["dataset_fingerprint"]
    v1 = Path(shown["path"])
    assert {f["path"] for f in shown["files"]} >= {"adapter_model.safetensors", "tokenizer.json"}
    for f in shown["files"]:
        assert f["sha256"] == hashlib.sha256((v1 / f["path"]).read_bytes()).hexdigest(), f

    r = _loft(
        "eval", "support_tickets-lora:1", "--data", str(heldout),
        "--metrics", "eval_loss,json_exact_match", "--baseline", "smollm2-135m-instruct",
        "--max-new-tokens", "24", "-q",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "eval_loss" in r.stdout and "json_exact_match" in r.stdout
    r = _loft("eval", "support_tickets-lora:2", "--data", str(heldout), "--metrics", "eval_loss")
    assert r.returncode == 0, r.stderr

    gate = tmp_path / "gate.yaml"
    gate.write_text("gate:\n  - eval_loss <= champion + 0.02\n")
    assert (
        _loft("registry", "promote", "support_tickets-lora:1", "--gate", str(gate)).returncode == 0
    )
    r = _loft("registry", "promote", "support_tickets-lora:2", "--gate", str(gate))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "eval_loss <= champion + 0.02" in r.stdout + r.stderr
    assert _loft("registry", "promote", "support_tickets-lora:2", "--force").returncode == 0
    assert _loft("registry", "rollback", "support_tickets-lora").returncode == 0
    champ = json.loads(_loft("registry", "show", "support_tickets-lora@champion", "--json").stdout)
    assert champ["version"] == 1

    # memorisation audit of the canaries inserted into v1's training data (4 steps: not memorised)
    r = _loft("audit", "canaries", "support_tickets-lora:1", "--candidates", "20", "--json")
    assert r.returncode == 0, r.stderr
    audit = json.loads(r.stdout)
    assert len(audit["canaries"]) == 3 and audit["candidates"] == 20
    for c in audit["canaries"]:  # the rank among 21 secrets, and the exposure it means
        assert c["rank"] in range(1, 22)
        assert c["exposure"] == pytest.approx(math.log2(21) - math.log2(c["rank"]))
        assert c["memorised"] == (c["rank"] <= 2)
    card = json.loads(_loft("registry", "show", "support_tickets-lora:1", "--json").stdout)
    exposures = [c["exposure"] for c in audit["canaries"]]
    assert card["metrics"]["canary_exposure_max"] == pytest.approx(max(exposures))
    assert card["metrics"]["canary_exposure_mean"] == pytest.approx(sum(exposures) / 3)

    # continuous evaluation of what the champion serves: healthy, then a gate it cannot meet
    ok, bad = tmp_path / "ok.yaml", tmp_path / "bad.yaml"
    ok.write_text("gate:\n  - eval_loss <= 100\n")
    bad.write_text("gate:\n  - eval_loss <= 0.0001\n")
    watch = ("watch", "support_tickets-lora@champion", "--data", str(heldout), "--gate")
    assert _loft(*watch, str(ok)).returncode == 0
    assert _loft(*watch, str(bad)).returncode == 3
    shown = json.loads(_loft("registry", "show", "support_tickets-lora:1", "--json").stdout)
    assert shown["degraded"]

    adapter = Path(champ["path"]) / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[len(data) // 2] ^= 0x01
    adapter.write_bytes(bytes(data))
    for args in (
        ("registry", "verify", "support_tickets-lora:1"),
        ("eval", "support_tickets-lora:1", "--data", str(heldout), "--metrics", "eval_loss"),
    ):
        r = _loft(*args)
        assert r.returncode != 0 and "adapter_model.safetensors" in r.stderr, r.stderr
