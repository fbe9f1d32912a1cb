"""Run directories: ids, resolved config, summary, lineage, and finding a run to resume."""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from loft import __version__
from loft.core.config import dump_yaml
from loft.core.errors import ConfigError, NotFoundError
from loft.core.paths import atomic_write_json, atomic_write_text, runs_dir
from loft.core.specs import TrainConfig

SUMMARY = "run_summary.json"
RESOLVED = "resolved.yaml"
# Keys that name where a run goes or is tracked, not what it trains: excluded from the digest.
_NOT_TRAINING = ("output_dir", "run_name", "tracking", "register", "gate")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _training_doc(doc: dict) -> dict:
    """A config document without what does not change the result: where it goes, and how many
    ranks compute it (a run resumes on any number of ranks)."""
    out = {k: v for k, v in doc.items() if k not in _NOT_TRAINING}
    if isinstance(out.get("training"), dict):
        out["training"] = {k: v for k, v in out["training"].items() if k != "distributed"}
    return out


def config_digest(config: TrainConfig) -> str:
    doc = _training_doc(config.model_dump(mode="json"))
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def write_resolved(run_dir: Path, config: TrainConfig) -> None:
    atomic_write_text(run_dir / RESOLVED, dump_yaml(config))


def read_summary(run_dir: Path) -> dict[str, Any]:
    p = run_dir / SUMMARY
    return json.loads(p.read_text()) if p.is_file() else {}


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(run_dir / SUMMARY, summary)


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"  {prefix}{k}: run has {va!r}, config now has {vb!r}")
    return out


def find_resume_dir(config: TrainConfig) -> Path:
    """The run to resume: ``output_dir`` if set, else the newest unfinished run with this config."""
    if config.output_dir:
        run_dir = Path(config.output_dir)
        if not (run_dir / RESOLVED).is_file():
            raise NotFoundError(
                f"--resume: {run_dir} holds no run (no {RESOLVED}).",
                hint="Drop --resume to start a new run there.",
            )
        check_same(run_dir, config)
        return run_dir
    digest = config_digest(config)
    for run_dir in sorted(runs_dir().iterdir(), key=lambda p: p.name, reverse=True):
        if not (run_dir / RESOLVED).is_file():
            continue
        if read_summary(run_dir).get("status") == "completed":
            continue
        try:
            past = TrainConfig.model_validate(yaml.safe_load((run_dir / RESOLVED).read_text()))
        except Exception:
            continue
        if config_digest(past) == digest:
            return run_dir
    raise NotFoundError(
        f"--resume: no unfinished run under {runs_dir()} was started with this config.",
        hint="Start a new run without --resume, or pass --set output_dir=RUN_DIR to resume "
        "a specific run.",
    )


def check_same(run_dir: Path, config: TrainConfig) -> None:
    past = yaml.safe_load((run_dir / RESOLVED).read_text())
    now = config.model_dump(mode="json")
    diffs = _diff(_training_doc(past), _training_doc(now))
    if diffs:
        raise ConfigError(
            f"--resume: the config differs from the one {run_dir} was started with:\n"
            + "\n".join(diffs),
            hint="Resume with the original config (see its resolved.yaml), or start a new run.",
        )


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def lineage(
    *, config: TrainConfig, model_info: Any, dataset: Any, metrics: dict[str, Any]
) -> dict[str, Any]:
    return {
        "base_model": {
            "name": model_info.name,
            "sha256": model_info.sha256,
            "source": model_info.source,
        },
        "dataset_fingerprint": dataset.fingerprint,
        "config": config.model_dump(mode="json"),
        "metrics": metrics,
        "loft_version": __version__,
        "git_commit": git_commit(),
        "created": now_iso(),
    }
