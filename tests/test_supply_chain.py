"""scripts/supply_chain.py: the allow-list and severity logic on constructed pip-audit reports,
the "not audited" exit when no advisory service answers (never a pretended clean audit), the
SBOM, and (where a service is reachable) the real audit of this environment."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "supply_chain.py"
TODAY = dt.date(2026, 12, 2)

spec = importlib.util.spec_from_file_location("supply_chain", SCRIPT)
sc = importlib.util.module_from_spec(spec)
sys.modules["supply_chain"] = sc
spec.loader.exec_module(sc)

# a report as `pip-audit -f json --aliases on` writes it (ids and versions made up)
REPORT = {
    "dependencies": [
        {"name": "loft", "skip_reason": "Dependency not found on PyPI and could not be audited"},
        {"name": "requests", "version": "2.19.0", "vulns": [
            {"id": "PYSEC-2018-28", "fix_versions": ["2.20.0"], "aliases": ["CVE-2018-18074",
                                                                              "GHSA-x84v-xcm2-53pg"]},
        ]},
        {"name": "jinja2", "version": "3.1.2", "vulns": [
            {"id": "GHSA-h5c8-rqwp-cp95", "fix_versions": ["3.1.3"], "aliases": ["CVE-2024-22195"]},
        ]},
        {"name": "torch", "version": "2.13.0", "vulns": []},
    ],
    "fixes": [],
}  # fmt: skip
SEVERITY = {"PYSEC-2018-28": "CRITICAL", "GHSA-h5c8-rqwp-cp95": "MODERATE"}


def severity(adv) -> str:
    return SEVERITY.get(adv.id, "UNKNOWN")


def allow(tmp_path: Path, text: str) -> list:
    path = tmp_path / "allowlist.toml"
    path.write_text(text)
    return sc.load_allowlist(path)


ALLOW_REQUESTS = """
[[allow]]
id = "CVE-2018-18074"   # an alias matches too
package = "Requests"
reason = "loft never follows redirects with credentials"
expires = 2027-01-31
"""


def test_a_critical_advisory_fails_and_others_are_reported() -> None:
    verdict = sc.judge(REPORT, [], severity, today=TODAY)
    assert verdict.code == sc.FAILED
    assert [a.id for a in verdict.failing] == ["PYSEC-2018-28"]
    assert verdict.audited == 3 and verdict.skipped[0][0] == "loft"
    text = sc.render(verdict, "osv")
    assert "FAIL CRITICAL requests 2.19.0 PYSEC-2018-28" in text
    assert "ok   MODERATE jinja2 3.1.2 GHSA-h5c8-rqwp-cp95" in text
    assert "[fix: 2.20.0]" in text


def test_an_allow_listed_critical_advisory_passes(tmp_path: Path) -> None:
    verdict = sc.judge(REPORT, allow(tmp_path, ALLOW_REQUESTS), severity, today=TODAY)
    assert verdict.code == sc.OK and not verdict.failing
    assert "allowed until 2027-01-31: loft never follows" in sc.render(verdict, "osv")


def test_an_expired_allow_list_entry_no_longer_applies(tmp_path: Path) -> None:
    entries = allow(tmp_path, ALLOW_REQUESTS)
    verdict = sc.judge(REPORT, entries, severity, today=dt.date(2027, 2, 1))
    assert verdict.code == sc.FAILED
    assert "allow-list entry EXPIRED on 2027-01-31" in sc.render(verdict, "osv")


def test_an_entry_for_another_package_does_not_match(tmp_path: Path) -> None:
    entries = allow(tmp_path, ALLOW_REQUESTS.replace('"Requests"', '"urllib3"'))
    assert sc.judge(REPORT, entries, severity, today=TODAY).code == sc.FAILED


def test_unknown_severity_fails_unless_told_to_warn() -> None:
    report = {"dependencies": [REPORT["dependencies"][2]]}
    unknown = lambda adv: "UNKNOWN"  # noqa: E731 (no severity service reachable)
    assert sc.judge(report, [], unknown, today=TODAY).code == sc.FAILED
    assert sc.judge(report, [], unknown, today=TODAY, unknown_fails=False).code == sc.OK


def test_every_dependency_skipped_is_not_a_clean_audit() -> None:
    """What pip-audit writes when PyPI's per-version API answers 404 to everything."""
    report = {"dependencies": [{"name": n, "skip_reason": "Dependency not found on PyPI"}
                               for n in ("torch", "requests")]}  # fmt: skip
    assert sc.judge(report, [], severity, today=TODAY).code == sc.NOT_AUDITED


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[[allow]]\nid = "X"\npackage = "p"\nreason = "r"\n', "missing ['expires']"),
        ('[[allow]]\nid = "X"\npackage = "p"\nreason = "r"\nexpires = "soon"\n', "a date"),
        ('[[allow]]\nid = "X"\npackage = "p"\nreason = " "\nexpires = 2027-01-01\n', "non-empty"),
        (
            '[[allow]]\nid = "X"\npackage = "p"\nreason = "r"\nexpires = 2027-01-01\nby = 1\n',
            "unknown keys ['by']",
        ),  # fmt: skip
        ("[[allow]\n", "not valid TOML"),
    ],
)
def test_a_malformed_allow_list_is_refused(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(sc.InputError, match=re.escape(problem)):
        allow(tmp_path, text)


def test_the_shipped_allow_list_is_valid() -> None:
    for entry in sc.load_allowlist(ROOT / "security" / "allowlist.toml"):
        assert (entry.expires - dt.date.today()).days <= 366, entry


def test_the_script_judges_a_recorded_report(tmp_path: Path) -> None:
    recorded = tmp_path / "audit.json"
    recorded.write_text(json.dumps(REPORT))
    cmd = [sys.executable, str(SCRIPT), "--from-json", str(recorded), "--allowlist",
           str(tmp_path / "none.toml"), "--report", str(tmp_path / "verdict.json")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == sc.FAILED, proc.stdout + proc.stderr  # severities unknown: fail
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert {a["id"] for a in verdict["advisories"] if a["failing"]} == {
        "PYSEC-2018-28",
        "GHSA-h5c8-rqwp-cp95",
    }
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a report"}')
    proc = subprocess.run([*cmd[:2], "--from-json", str(bad)], capture_output=True, text=True)
    assert proc.returncode == sc.BAD_INPUT and "not a pip-audit JSON report" in proc.stderr


def test_the_sbom_is_cyclonedx_json(tmp_path: Path) -> None:
    """The SBOM of a small environment (a bare venv: the same code path as the project's, in
    a second rather than the minute the full environment takes)."""
    import venv

    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    out = tmp_path / "sbom.cdx.json"
    sc.write_sbom(out, python=str(env / "bin" / "python"))
    bom = json.loads(out.read_text())
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"].startswith("1.")
    assert bom["metadata"]["component"]["name"] == "loft"  # from pyproject.toml


def test_the_real_audit_when_a_service_answers(tmp_path: Path) -> None:
    up = {name: sc.probe(name, timeout=5) for name in sc.SERVICES}
    if not any(ok for ok, _ in up.values()):
        proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
        assert proc.returncode == sc.NOT_AUDITED and "NOT AUDITED" in proc.stdout
        pytest.skip("no advisory service reachable: " + "; ".join(s for _, s in up.values()))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--report", str(tmp_path / "v.json")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode in (sc.OK, sc.FAILED), proc.stdout + proc.stderr
    assert json.loads((tmp_path / "v.json").read_text())["audited"] > 50
