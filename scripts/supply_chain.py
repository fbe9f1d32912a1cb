"""Audit the installed environment for known advisories and write its bill of materials.

    .venv/bin/python scripts/supply_chain.py [--sbom sbom.cdx.json] [--report audit.json]
        [--allowlist security/allowlist.toml] [--service auto|osv|pypi|esms]
        [--unknown-severity fail|warn] [--from-json PIP_AUDIT_JSON]

1. The SBOM: ``cyclonedx-py environment`` over this interpreter's environment (CycloneDX JSON),
   when ``--sbom`` is given. Offline; always written, whatever the audit finds.
2. Which advisory service answers: ``auto`` probes OSV (it also gives severities), then PyPI's
   per-version JSON API (what pip-audit's default uses), then ecosyste.ms. pip-audit counts a
   PyPI 404 as "package not on PyPI" and skips it, so a proxy that blocks the per-version API
   would make it report a clean audit of nothing; this script probes first and, when no
   service answers, says so and exits 3 instead of pretending. A run where pip-audit skipped
   every dependency is also "not audited" (exit 3).
3. ``pip-audit -f json`` over the environment (``python -m pip_audit``), or a recorded report
   (``--from-json``). Each advisory's severity comes from OSV (GHSA's CRITICAL/HIGH/MODERATE/LOW)
   when OSV answers; otherwise it is unknown.
4. The verdict: an advisory fails the run when it is CRITICAL (or of unknown severity, unless
   ``--unknown-severity warn``) and not on the allow-list. Every advisory is printed.

The allow-list (security/allowlist.toml) has one ``[[allow]]`` table per accepted advisory:
``id`` (the advisory or any alias: GHSA-/PYSEC-/CVE-), ``package``, ``reason`` and ``expires``
(a date; after it the entry no longer applies, so every exception is re-examined).

Exit codes: 0 audited and nothing to fail on; 1 a failing advisory; 2 bad input (allow-list,
recorded report); 3 not audited (no advisory service reachable, or every dependency skipped).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OK, FAILED, BAD_INPUT, NOT_AUDITED = 0, 1, 2, 3
SERVICES = ("osv", "pypi", "esms")
OSV_QUERY = "https://api.osv.dev/v1/query"
OSV_VULN = "https://api.osv.dev/v1/vulns/{id}"
PYPI_VERSION = "https://pypi.org/pypi/{name}/{version}/json"
ESMS = "https://advisories.ecosyste.ms/api/v1/advisories?ecosystem=pypi&package_name=pip"
ALLOW_KEYS = {"id", "package", "reason", "expires"}


class InputError(Exception):
    """A malformed allow-list or recorded report (exit 2)."""


@dataclass(frozen=True)
class Allowed:
    id: str
    package: str
    reason: str
    expires: dt.date


@dataclass
class Advisory:
    package: str
    version: str
    id: str
    aliases: list[str]
    fix_versions: list[str]
    severity: str = "UNKNOWN"  # CRITICAL, HIGH, MODERATE, LOW or UNKNOWN
    allowed: Allowed | None = None
    expired: Allowed | None = None  # an allow-list entry that matched but has expired

    def ids(self) -> set[str]:
        return {self.id, *self.aliases}


@dataclass
class Verdict:
    advisories: list[Advisory] = field(default_factory=list)
    failing: list[Advisory] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (package, why)
    audited: int = 0

    @property
    def code(self) -> int:
        if self.audited == 0:
            return NOT_AUDITED
        return FAILED if self.failing else OK


# ----------------------------------------------------------------------------- allow-list


def load_allowlist(path: Path | None) -> list[Allowed]:
    """The entries of ``path`` (none when it does not exist); InputError naming each problem."""
    if path is None or not path.is_file():
        return []
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML: {e}") from None
    problems, out = [], []
    if set(doc) - {"allow"}:
        problems.append(f"{path}: unknown top-level keys {sorted(set(doc) - {'allow'})}")
    for i, entry in enumerate(doc.get("allow", [])):
        where = f"{path}: allow[{i}]"
        missing, unknown = ALLOW_KEYS - set(entry), set(entry) - ALLOW_KEYS
        if missing or unknown:
            said = [f"missing {sorted(missing)}"] * bool(missing)
            said += [f"unknown keys {sorted(unknown)}"] * bool(unknown)
            problems.append(f"{where}: {', '.join(said)} (keys: {', '.join(sorted(ALLOW_KEYS))})")
            continue
        if not isinstance(entry["expires"], dt.date) or isinstance(entry["expires"], dt.datetime):
            problems.append(f"{where}: expires must be a date such as 2026-06-30")
            continue
        if not all(
            isinstance(entry[k], str) and entry[k].strip() for k in ("id", "package", "reason")
        ):
            problems.append(f"{where}: id, package and reason must be non-empty strings")
            continue
        out.append(Allowed(entry["id"].strip(), _norm(entry["package"]), entry["reason"].strip(),
                           entry["expires"]))  # fmt: skip
    if problems:
        raise InputError("\n".join(problems))
    return out


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


# ---------------------------------------------------------------------------- the verdict


def parse_report(doc: Any) -> tuple[list[Advisory], list[tuple[str, str]], int]:
    """(advisories, skipped (package, why), audited dependency count) of a pip-audit JSON report."""
    if not isinstance(doc, dict) or not isinstance(doc.get("dependencies"), list):
        raise InputError("not a pip-audit JSON report (no 'dependencies' list)")
    advisories, skipped, audited = [], [], 0
    for dep in doc["dependencies"]:
        if "skip_reason" in dep:
            skipped.append((dep.get("name", "?"), str(dep["skip_reason"])))
            continue
        audited += 1
        for v in dep.get("vulns", []):
            advisories.append(Advisory(
                package=_norm(dep["name"]), version=str(dep.get("version", "?")), id=v["id"],
                aliases=list(v.get("aliases", [])), fix_versions=list(v.get("fix_versions", [])),
            ))  # fmt: skip
    return advisories, skipped, audited


def judge(
    doc: Any,
    allow: list[Allowed],
    severity_of: Callable[[Advisory], str],
    *,
    today: dt.date,
    unknown_fails: bool = True,
) -> Verdict:
    """Which advisories of the pip-audit report ``doc`` fail the run."""
    advisories, skipped, audited = parse_report(doc)
    verdict = Verdict(advisories, [], skipped, audited)
    for adv in advisories:
        adv.severity = severity_of(adv)
        for entry in allow:
            if entry.package == adv.package and entry.id in adv.ids():
                if entry.expires >= today:
                    adv.allowed = entry
                else:
                    adv.expired = entry
        fails = adv.severity == "CRITICAL" or (adv.severity == "UNKNOWN" and unknown_fails)
        if fails and adv.allowed is None:
            verdict.failing.append(adv)
    return verdict


def render(verdict: Verdict, service: str) -> str:
    lines = [f"advisory service: {service}; {verdict.audited} dependencies audited, "
             f"{len(verdict.skipped)} skipped, {len(verdict.advisories)} advisories"]  # fmt: skip
    for adv in sorted(verdict.advisories, key=lambda a: (a.package, a.id)):
        state = "FAIL" if adv in verdict.failing else "ok  "
        note = ""
        if adv.allowed:
            note = f" (allowed until {adv.allowed.expires}: {adv.allowed.reason})"
        elif adv.expired:
            note = f" (allow-list entry EXPIRED on {adv.expired.expires})"
        fix = f"fix: {', '.join(adv.fix_versions)}" if adv.fix_versions else "no fix yet"
        aka = f" aka {', '.join(adv.aliases)}" if adv.aliases else ""
        lines.append(f"  {state} {adv.severity:<8} {adv.package} {adv.version} {adv.id}{aka} "
                     f"[{fix}]{note}")  # fmt: skip
    for name, why in verdict.skipped:
        lines.append(f"  skipped {name}: {why}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ network helpers


def _get(url: str, timeout: float, data: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers={"User-Agent": "loft-supply-chain"})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (fixed https URLs)
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (urllib.error.URLError, OSError, TimeoutError):
        return 0, b""


def probe(service: str, timeout: float = 10.0) -> tuple[bool, str]:
    """Whether ``service`` answers an advisory query from here, and what it answered."""
    pip_version = metadata.version("pip")
    if service == "osv":
        query = {"package": {"name": "pip", "ecosystem": "PyPI"}, "version": pip_version}
        status, _ = _get(OSV_QUERY, timeout, json.dumps(query).encode())
        url = OSV_QUERY
    elif service == "pypi":
        url = PYPI_VERSION.format(name="pip", version=pip_version)
        status, _ = _get(url, timeout)
    else:
        url = ESMS
        status, _ = _get(url, timeout)
    return status == 200, f"{url} -> {status or 'unreachable'}"


def osv_severity(adv: Advisory, timeout: float = 10.0) -> str:
    """GHSA's severity of ``adv`` (or an alias) from OSV's database_specific; else UNKNOWN."""
    for vid in sorted(adv.ids(), key=lambda i: not i.startswith("GHSA-")):
        status, body = _get(OSV_VULN.format(id=vid), timeout)
        if status != 200:
            continue
        sev = (json.loads(body).get("database_specific") or {}).get("severity")
        if isinstance(sev, str) and sev.upper() in ("CRITICAL", "HIGH", "MODERATE", "LOW"):
            return sev.upper()
    return "UNKNOWN"


def write_sbom(path: Path, python: str = sys.executable) -> None:
    """A CycloneDX JSON SBOM of ``python``'s environment at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "cyclonedx_py", "environment", "--of", "JSON", "-o", str(path),
           "--pyproject", str(ROOT / "pyproject.toml"), python]  # fmt: skip
    if python != sys.executable:  # cyclonedx-py runs from this environment, inspects that one
        cmd[0] = sys.executable
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def run_pip_audit(service: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pip_audit", "-f", "json", "--desc", "off", "--aliases", "on",
           "-s", service, "--progress-spinner", "off", "--skip-editable"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: vulnerabilities found
        raise RuntimeError(f"pip-audit failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sbom", type=Path, help="write a CycloneDX JSON SBOM here")
    ap.add_argument("--report", type=Path, help="write the verdict as JSON here")
    ap.add_argument("--allowlist", type=Path, default=ROOT / "security" / "allowlist.toml")
    ap.add_argument("--service", choices=("auto", *SERVICES), default="auto")
    ap.add_argument("--unknown-severity", choices=("fail", "warn"), default="fail")
    ap.add_argument("--from-json", type=Path, help="judge a recorded pip-audit JSON report")
    args = ap.parse_args(argv)

    if args.sbom:
        write_sbom(args.sbom)
        print(f"SBOM (CycloneDX JSON) written to {args.sbom}")
    try:
        allow = load_allowlist(args.allowlist)
        if args.from_json:
            service = f"recorded report {args.from_json}"
            doc = json.loads(args.from_json.read_text(encoding="utf-8"))
        else:
            tried = []
            service = ""
            for name in SERVICES if args.service == "auto" else (args.service,):
                up, said = probe(name)
                tried.append(f"  {name}: {said}")
                if up:
                    service = name
                    break
            if not service:
                print("NOT AUDITED: no advisory service is reachable from here, so no advisory "
                      "check was made (this is not a clean result):\n" + "\n".join(tried) +
                      "\nRun it where https://api.osv.dev or PyPI's per-version JSON API is "
                      "reachable (e.g. CI with network access).")  # fmt: skip
                return NOT_AUDITED
            doc = run_pip_audit(service)
        osv_up = service == "osv" or (not args.from_json and probe("osv")[0])
        verdict = judge(
            doc, allow, osv_severity if osv_up else (lambda adv: "UNKNOWN"),
            today=dt.date.today(), unknown_fails=args.unknown_severity == "fail",
        )  # fmt: skip
    except (InputError, json.JSONDecodeError) as e:
        print(f"bad input: {e}", file=sys.stderr)
        return BAD_INPUT
    print(render(verdict, service))
    if args.report:
        args.report.write_text(json.dumps({
            "service": service, "code": verdict.code, "audited": verdict.audited,
            "skipped": verdict.skipped,
            "advisories": [{**{k: getattr(a, k) for k in ("package", "version", "id", "aliases",
                                                            "fix_versions", "severity")},
                            "allowed": a.allowed is not None, "failing": a in verdict.failing}
                           for a in verdict.advisories],
        }, indent=1))  # fmt: skip
    if verdict.code == NOT_AUDITED:
        print("NOT AUDITED: pip-audit skipped every dependency (the service did not know them).")
    elif verdict.failing:
        print(f"FAILED: {len(verdict.failing)} advisory(ies) critical or of unknown severity and "
              f"not on the allow-list ({args.allowlist}).")  # fmt: skip
    else:
        print("passed: no critical advisory outside the allow-list.")
    return verdict.code


if __name__ == "__main__":
    sys.exit(main())
