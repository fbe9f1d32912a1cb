"""Registered model versions on MLflow's Model Registry, with their files under LOFT_HOME.

MLflow holds names, versions, aliases and tags (same tracking URI as runs); a version's files live
in ``LOFT_HOME/registry/<name>/<version>/`` beside its ``card.json`` and the MLflow version's
``source`` points there. With an object store configured (``loft.registry.objects``: S3, MinIO)
the files are uploaded there too, ``source`` names the bucket, and a machine that lacks a version
downloads a verified copy. mlflow is imported lazily, inside functions.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loft.core.errors import ConfigError, IntegrityError, NotFoundError
from loft.core.paths import atomic_dir, atomic_write_bytes, atomic_write_json, file_lock
from loft.core.safety import check_tree
from loft.registry import card as cards
from loft.registry import evaluations as evals
from loft.registry import objects
from loft.registry.names import check_name, model_dir, parse_ref, sanitise_name, version_dir
from loft.registry.reader import MlflowReader, RegistryReader, fast_reader

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

METRIC_TAG = "loft.metric."
DEGRADED_TAG = "loft.degraded"


@dataclass
class ModelVersion:
    name: str
    version: int
    path: Path
    card: dict[str, Any]
    aliases: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Stable JSON: name, version, aliases, lineage, metrics, files, kind, path, created."""
        files = self.card.get("files") or []
        return {
            "name": self.name,
            "version": self.version,
            "aliases": sorted(self.aliases),
            "kind": self.card.get("kind"),
            "path": str(self.path),
            "created": self.card.get("created"),
            "lineage": _flat_lineage(self.card.get("lineage") or {}),
            "metrics": dict(self.card.get("metrics") or {}),
            "evaluations": evals.entries_of(self.card),
            "weights_digest": cards.weights_digest(self.card),
            "files": [
                {"path": f["path"], "sha256": f["sha256"], "bytes": f["bytes"]} for f in files
            ],
            "bytes": sum(int(f["bytes"]) for f in files),
            "degraded": self.card.get("degraded"),
        }


def _flat_lineage(lin: dict[str, Any]) -> dict[str, Any]:
    base = lin.get("base_model") or {}
    return {
        "base_model": base.get("name"),
        "base_model_sha256": base.get("sha256"),
        "base_model_source": base.get("source"),
        "dataset_fingerprint": lin.get("dataset_fingerprint"),
        "data_report": lin.get("data_report"),
        "config": lin.get("config"),
        "chat_template": lin.get("chat_template"),
        "special_tokens": lin.get("special_tokens"),
        "parent": lin.get("parent"),
        "parents": lin.get("parents") or ([lin["parent"]] if lin.get("parent") else []),
        "study": lin.get("study"),
        "privacy": lin.get("privacy"),
        "run": lin.get("run"),
        "loft_version": lin.get("loft_version"),
        "git_commit": lin.get("git_commit"),
    }


# ----------------------------------------------------------------------------- MLflow access


def client() -> MlflowClient:
    from loft.tracking import mlflow_client, resolve_tracking_uri

    return mlflow_client(resolve_tracking_uri(None))


def reader() -> RegistryReader:
    """Names, versions and aliases: read straight from a SQLite store when there is one (no
    MLflow start-up), else through MLflow's client (see :mod:`loft.registry.reader`)."""
    from loft.tracking import resolve_tracking_uri

    fast = fast_reader(resolve_tracking_uri(None))
    return fast if fast is not None else MlflowReader(client())


def not_registered(name: str) -> NotFoundError:
    return NotFoundError(
        f"model {name!r} is not in the model registry.",
        hint="See registered models with `loft registry list`.",
    )


def _aliases(r: RegistryReader, name: str) -> dict[str, int]:
    aliases = r.aliases(name)
    if aliases is None:
        raise not_registered(name)
    return aliases


def next_version(r: RegistryReader, name: str) -> int:
    """One past every live version and every deleted one (a deleted version keeps its folder
    with a tombstone, so its number is never reused; a folder left by a crash before MLflow
    recorded the version is an orphan and is written over)."""
    deleted = [
        int(p.parent.name)
        for p in model_dir(name).glob(f"*/{TOMBSTONE}")
        if p.parent.name.isdigit()
    ]
    return max([0, *r.versions(name), *deleted]) + 1


def _lock(name: str) -> contextlib.AbstractContextManager[None]:
    return file_lock(model_dir(name) / ".lock")


# ----------------------------------------------------------------------------- register


def register(
    path: str | Path,
    *,
    name: str | None = None,
    parent: str | None = None,
    metrics: dict[str, float] | None = None,
    parents: list[str] | None = None,
    study: dict[str, Any] | None = None,
    actor: str | None = None,
    context: dict[str, Any] | None = None,
) -> ModelVersion:
    """Copy a run's adapter/model (or a bare adapter / HF model folder) into a new version;
    encrypted at rest when a KEK is configured (:mod:`loft.registry.files`), the card's digests
    being those of the plaintext.

    ``parents`` (a merge of several versions) names every parent; the first is ``parent``.
    ``study`` (the hyperparameter study and trial the run won) goes into the lineage. Audited
    as ``registry.register`` by ``actor`` (default the OS user), ``context`` in the details."""
    from mlflow.exceptions import MlflowException

    from loft.core import crypto

    key = crypto.provider()  # a KEK configured: the version's files are stored encrypted
    src = cards.find_source(Path(path))
    check_tree(src.weights_dir, what="the folder to register")  # no symlinks, strict headers
    if name is None:
        raw = (src.resolved or {}).get("run_name") or (src.run_dir or src.weights_dir).name
        name = sanitise_name(str(raw))
    check_name(name)
    parent_ref = None
    parent_refs = None
    if parents:
        parent_refs = []
        for ref in parents:
            pv = get_version(ref, verify=False)
            parent_refs.append({"name": pv.name, "version": pv.version})
        parent_ref = parent_refs[0]
    elif parent:
        pv = get_version(parent, verify=False)
        parent_ref = {"name": pv.name, "version": pv.version}
    entries = [
        *cards.source_entries(src),
        *evals.make_entries(_check_metrics(metrics or {}), on=None, source="declared"),
    ]
    c = client()
    with _lock(name):
        try:
            c.create_registered_model(name, description="Registered by loft.")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = next_version(MlflowReader(c), name)
        final = version_dir(name, version)
        # a folder left by a crash between copying and creating the MLflow version is an orphan
        with atomic_dir(final, overwrite=True) as tmp:
            cards.copy_files(src, tmp, key)
            card = cards.build_card(
                src, tmp, name=name, version=version, parent=parent_ref, evaluations=entries,
                parents=parent_refs, study=study,
            )  # fmt: skip
            atomic_write_json(tmp / cards.CARD, card)  # last: the completion marker
        store = objects.remote()
        try:
            if store is not None:  # files first, card last: the version is whole or absent
                store.upload_version(name, version, final, card)
            mv = c.create_model_version(
                name,
                source=store.uri(name, version) if store else final.as_uri(),
                run_id=_linkable_run(c, src.summary.get("mlflow_run_id")),
                tags=_version_tags(card, final),
                description=f"{card['kind']} registered by loft from {src.weights_dir}",
            )
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
    if int(mv.version) != version:  # another writer bypassed loft's lock
        raise IntegrityError(
            f"MLflow assigned version {mv.version} to {name}, but loft prepared {final}.",
            hint="Register models through loft only, then re-register this one.",
        )
    _audit_register(name, version, card, src, actor, context)
    return ModelVersion(name, version, final, card, [])


def _audit_register(
    name: str, version: int, card: dict[str, Any], src: Any, actor: str | None, context: Any
) -> None:
    from loft.core import audit

    details = {
        "kind": card.get("kind"),
        "source": str(src.weights_dir),
        "parent": (card.get("lineage") or {}).get("parent"),
        "parents": (card.get("lineage") or {}).get("parents"),
        "files": len(card.get("files") or []),
        "weights_digest": cards.weights_digest(card),
    }
    target = f"{name}:{version}"
    audit.append(audit.who(actor), "registry.register", target, {**details, **(context or {})})


def _check_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"metric {key!r} has value {value!r}; metrics must be numbers.")
        out[str(key)] = float(value)
    return out


def _linkable_run(c: MlflowClient, run_id: str | None) -> str | None:
    """The run id when that run is in this store (a run tracked elsewhere is kept as a tag)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        c.get_run(run_id)
    except MlflowException:
        return None
    return run_id


def _version_tags(card: dict[str, Any], path: Path) -> dict[str, str]:
    lin = card["lineage"]
    tags = {
        "loft.kind": card["kind"],
        "loft.base_model": str(lin["base_model"].get("name")),
        "loft.dataset_fingerprint": str(lin.get("dataset_fingerprint")),
        "loft.path": path.as_posix(),
    }
    if lin["run"].get("mlflow_run_id"):
        tags["loft.mlflow_run_id"] = str(lin["run"]["mlflow_run_id"])
    tags.update({f"{METRIC_TAG}{k}": repr(v) for k, v in card["metrics"].items()})
    return tags


# ----------------------------------------------------------------------------- browse


def list_models() -> list[dict[str, Any]]:
    """Each registered model: name, latest version, aliases {alias: version}, n_versions."""
    r = reader()
    return [_model_row(r, name) for name in r.names()]


def list_models_page(limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    """``limit`` rows of :func:`list_models` from ``offset`` (by name), and how many there are:
    only the rows on the page are read."""
    r = reader()
    names = r.names()
    return [_model_row(r, name) for name in names[offset : offset + limit]], len(names)


def _model_row(r: RegistryReader, name: str) -> dict[str, Any]:
    versions = r.versions(name)
    return {
        "name": name,
        "latest": versions[-1] if versions else None,
        "aliases": dict(sorted(_aliases(r, name).items())),
        "n_versions": len(versions),
    }


def resolve(ref: str) -> tuple[str, int, dict[str, int]]:
    """(name, version, aliases of the model) for a reference; NotFoundError when absent."""
    name, alias, version = parse_ref(ref)
    r = reader()
    aliases = _aliases(r, name)
    if alias is not None:
        if alias not in aliases:
            known = ", ".join(f"{a}→{v}" for a, v in sorted(aliases.items())) or "none"
            raise NotFoundError(
                f"model {name!r} has no alias {alias!r} (aliases: {known}).",
                hint=f"Set one with `loft registry alias {name}:VERSION --to {alias}`.",
            )
        return name, aliases[alias], aliases
    versions = r.versions(name)
    if version is None:
        if "champion" in aliases:
            return name, aliases["champion"], aliases
        if not versions:
            raise NotFoundError(f"model {name!r} has no versions.", hint="Register one first.")
        return name, versions[-1], aliases
    if version not in versions:
        raise NotFoundError(
            f"version {version} of {name!r} is not in the model registry.",
            hint=f"See its versions with `loft registry show {name}`.",
        )
    return name, version, aliases


def get_version(ref: str, *, verify: bool = True) -> ModelVersion:
    """The version ``ref`` names; with ``verify`` every file's sha256 is recomputed first."""
    name, version, aliases = resolve(ref)
    root = version_dir(name, version)
    label = f"{name}:{version}"
    store = objects.remote()
    if store is not None:
        _sync(store, name, version, root)
    if not root.is_dir():
        raise IntegrityError(
            f"{label}: its files are missing ({root} does not exist).",
            hint=f"Re-register it, or roll back with `loft registry rollback {name}`.",
        )
    card = cards.read_card(root, ref=label)
    if verify:
        cards.verify_files(root, card, ref=label)
    return ModelVersion(
        name, version, root, card, sorted(a for a, v in aliases.items() if v == version)
    )


def _sync(store: objects.S3Registry, name: str, version: int, root: Path) -> None:
    """This machine's copy of a version from the object store: downloaded (verified) when it is
    missing, its card refreshed when another machine changed it."""
    if not (root / cards.CARD).is_file():
        with _lock(name):
            if not (root / cards.CARD).is_file():
                store.fetch_version(name, version, root)
        return
    remote_card = store.card(name, version)
    if remote_card is not None and remote_card != (root / cards.CARD).read_bytes():
        atomic_write_bytes(root / cards.CARD, remote_card)


def verify(ref: str) -> ModelVersion:
    """Recompute every sha256 of a version; IntegrityError names the first bad file."""
    return get_version(ref, verify=True)


def diff(a: str, b: str) -> dict[str, Any]:
    """Config, data and metric differences between two versions."""
    va, vb = get_version(a, verify=False), get_version(b, verify=False)
    la, lb = va.card.get("lineage") or {}, vb.card.get("lineage") or {}
    fa, fb = _flatten(la.get("config") or {}), _flatten(lb.get("config") or {})
    config = {
        k: {"a": fa.get(k), "b": fb.get(k)}
        for k in sorted(set(fa) | set(fb))
        if fa.get(k) != fb.get(k)
    }
    ra, rb = la.get("data_report") or {}, lb.get("data_report") or {}
    counts = sorted(
        k
        for k in set(ra) | set(rb)
        if isinstance(ra.get(k, rb.get(k)), int) and not isinstance(ra.get(k, rb.get(k)), bool)
    )
    ma, mb = va.card.get("metrics") or {}, vb.card.get("metrics") or {}
    metrics = {}
    for k in sorted(set(ma) | set(mb)):
        x, y = ma.get(k), mb.get(k)
        metrics[k] = {"a": x, "b": y, "delta": (y - x) if x is not None and y is not None else None}
    return {
        "a": f"{va.name}:{va.version}",
        "b": f"{vb.name}:{vb.version}",
        "config": config,
        "data": {
            "fingerprint": {
                "a": la.get("dataset_fingerprint"),
                "b": lb.get("dataset_fingerprint"),
                "same": la.get("dataset_fingerprint") == lb.get("dataset_fingerprint"),
            },
            "report": {
                k: {"a": ra.get(k), "b": rb.get(k)} for k in counts if ra.get(k) != rb.get(k)
            },
        },
        "metrics": metrics,
    }


def _flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------- card updates


def _update_card(ref: str, change: dict[str, Any], tags: dict[str, str]) -> ModelVersion:
    """Apply ``change`` to the card under the model's lock; ``evaluations`` entries are appended
    (and ``metrics``, their newest value per metric, follows)."""
    name, version, _ = resolve(ref)
    with _lock(name):
        mv = get_version(f"{name}:{version}", verify=False)
        card = {**mv.card}
        for key, value in change.items():
            if key == "evaluations":
                card[key] = [*evals.entries_of(card), *value]
                card["metrics"] = evals.latest_values(card[key])
            else:
                card[key] = value
        atomic_write_json(mv.path / cards.CARD, card)
        mv.card = card
        if (store := objects.remote()) is not None:
            store.upload_card(name, version, mv.path)
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(name, str(version), key, value)
    return mv


TOMBSTONE = "DELETED.json"


def delete_version(ref: str, *, reason: str = "", actor: str | None = None) -> dict[str, Any]:
    """Delete ``NAME:VERSION``: refused while an alias points at it or a traffic split sends
    requests to it. MLflow forgets the version first (from then on nothing resolves it); its
    folder keeps only ``DELETED.json`` (who, when, why, its digest), so the number is never reused
    and the history stays readable."""
    from datetime import UTC, datetime

    from loft.core.audit import who
    from loft.registry.aliases import append_history

    name, alias, version = parse_ref(ref)
    if version is None:
        raise ConfigError(
            f"{ref!r} names no version; delete takes NAME:VERSION.",
            hint=f"See the versions with `loft registry show {name}`.",
        )
    name, version, aliases = resolve(f"{name}:{version}")
    holding = sorted(a for a, v in aliases.items() if v == version)
    if holding:
        raise ConfigError(
            f"{name}:{version} is what {', '.join('@' + a for a in holding)} points at; deleting "
            "it would break every request for that alias.",
            hint=f"Move the alias first (`loft registry rollback {name}`, or `loft registry "
            f"alias {name}:OTHER --to {holding[0]}`), then delete.",
        )
    from loft.registry.splits import get_split

    split = get_split(name)
    if split is not None and split["candidate"] == version:
        raise ConfigError(
            f"{name}:{version} is the candidate of {name}'s traffic split "
            f"({split['share']:.0%} of the requests for {name}); deleting it would break them.",
            hint=f"End the split first (`loft rollout abort {name}`), then delete.",
        )
    mv = get_version(f"{name}:{version}", verify=False)
    entry = {
        "who": who(actor),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "deleted": version,
        "why": reason,
        "weights_digest": cards.weights_digest(mv.card),
    }
    with _lock(name):
        client().delete_model_version(name, str(version))
        atomic_write_json(mv.path / TOMBSTONE, entry)
        for p in mv.path.iterdir():
            if p.name != TOMBSTONE:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        if (store := objects.remote()) is not None:
            store.upload_card(name, version, mv.path, TOMBSTONE)
            store.delete_files(name, version, keep=TOMBSTONE)
        append_history(name, entry)
    return entry


def versions_built_on(base_model: str) -> list[str]:
    """``name:version`` of every registered version whose lineage names ``base_model``."""
    r = reader()
    out = []
    for name in r.names():
        for version in r.versions(name):
            card = _card(name, version)
            base = ((card.get("lineage") or {}).get("base_model") or {}).get("name")
            if base == base_model:
                out.append(f"{name}:{version}")
    return out


def _card(name: str, version: int) -> dict[str, Any]:
    """A version's card without its files: from the object store when this machine has no copy."""
    root = version_dir(name, version)
    store = objects.remote()
    if store is not None and not (root / cards.CARD).is_file():
        import json

        raw = store.card(name, version)
        return json.loads(raw) if raw else {}
    return cards.read_card(root, ref=f"{name}:{version}")


def record_evaluation(ref: str, entries: list[dict[str, Any]]) -> ModelVersion:
    """Append evaluation entries (see :mod:`loft.registry.evaluations`) to the version's card;
    each metric's newest value also becomes the MLflow model-version tag ``loft.metric.<m>``."""
    entries = [{**e, "value": _check_metrics({e["metric"]: e["value"]})[e["metric"]]}
               for e in entries]  # fmt: skip
    tags = {f"{METRIC_TAG}{e['metric']}": repr(e["value"]) for e in entries}
    if entries:
        tags["loft.metrics_source"] = str(entries[-1]["source"])
    return _update_card(ref, {"evaluations": entries}, tags)


def mark_degraded(ref: str, reason: str) -> None:
    """Flag a version as degraded on its card and as the MLflow version tag ``loft.degraded``."""
    from datetime import UTC, datetime

    flag = {"reason": reason, "when": datetime.now(UTC).isoformat(timespec="seconds")}
    _update_card(ref, {"degraded": flag}, {DEGRADED_TAG: reason or "degraded"})
