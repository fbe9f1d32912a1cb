"""Served requests back into labelling: the model server's audit log (chat requests whose text
was logged with consent, ``log_prompts: true``) as a new dataset version (source ``served``),
which a labelling project then opens for correction or rating. The records come from the same
code as `loft data from-audit` (loft.data.traffic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loft.core import audit
from loft.core.errors import ConfigError


def default_log() -> Path:
    """Where `loft serve` writes its audit log with the default serving config."""
    from loft.core.specs import ServeConfig
    from loft.serve.audit import default_audit_path

    return default_audit_path(ServeConfig())


def import_served(
    dataset: str,
    *,
    logs: list[Path] | None = None,
    model: str | None = None,
    min_score: float | None = None,
    since: str | None = None,
    actor: str,
    context: dict | None = None,
) -> tuple[Any, dict[str, Any]]:
    """A new version of ``dataset`` from served chat requests (default log: the server's):
    ``(the DatasetVersion, what was kept and why the rest was left out)``."""
    from loft.data import catalog, traffic

    paths = list(logs or [default_log()])
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise ConfigError(
            f"no serving audit log at {', '.join(missing)}.",
            hint="Serve with `log_prompts: true` in the serving config so requests are logged "
            "with their text, then import again.",
        )
    harvest = traffic.from_audit(paths, model=model, min_score=min_score, since=since)
    counts = harvest.to_dict()
    if not harvest.records:
        why = ", ".join(f"{n} {reason}" for reason, n in harvest.skipped.most_common()) or "none"
        raise ConfigError(
            f"no served chat request could be imported ({harvest.read} read; left out: {why}).",
            hint="Requests are kept when the server logged their text (log_prompts: true) and "
            "they match the model, minimum rating and time asked for.",
        )
    filters = {"model": model, "min_score": min_score, "since": since}
    version = catalog.add_version(
        dataset, harvest.records,
        source={"kind": "served", **{k: v for k, v in filters.items() if v is not None},
                "kept": counts["kept"], "read": counts["read"]},
        created_by=actor,
    )  # fmt: skip
    audit.append(
        actor, "labelling.import_served", version.ref, {**counts, **filters, **(context or {})}
    )
    return version, counts
