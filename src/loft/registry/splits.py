"""Weighted traffic splits: a candidate version takes a share of the requests for a bare name.

A split is registry state beside the aliases: the registered-model tag ``loft.split`` holds
``{"candidate": V, "share": 0.1, "since": ..., "updated": ..., "salt": ..., "meta": {...}}``, so
every machine that shares the tracking store (PostgreSQL in team deployments) routes the same
way. The champion is whatever the bare name routes to without a split (:func:`served_version`);
it keeps ``1 - share``. ``name@alias`` and ``name:N`` never split.

Routing is sticky (:func:`arm`): a request's arm is a pure function of the model name, the split's
``salt`` and the client's route key, candidate iff ``u < share`` for a ``u`` in [0, 1) hashed from
the three. Raising the share keeps every client that was on the candidate there; the salt stays
while the candidate does, and a new candidate draws a new one, so each rollout tries a different
slice of clients first.

Every set and clear is appended to the model's history (``loft registry history``) with
``"event": "split"`` or ``"split-cleared"`` and ``"alias": None``, so alias rollback ignores them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from loft.core.audit import who
from loft.core.errors import ConfigError, IntegrityError, NotFoundError
from loft.registry.aliases import append_history
from loft.registry.names import check_name
from loft.registry.reader import MlflowReader, RegistryReader
from loft.registry.store import _lock, client, get_version, not_registered, reader

log = logging.getLogger("loft.registry")

SPLIT_TAG = "loft.split"
MAX_TAG_CHARS = 5000  # MLflow's registered_model_tags.value is VARCHAR(5000) on PostgreSQL

Arm = Literal["champion", "candidate"]


def served_version(
    aliases: Mapping[str, int], latest: int | None, default_alias: str
) -> int | None:
    """The version a bare name routes to without a split: the default alias, else ``champion``,
    else the latest version (None: the model has no versions)."""
    for alias in (default_alias, "champion"):
        if alias in aliases:
            return aliases[alias]
    return latest


def arm(name: str, split: Mapping[str, Any], key: str) -> Arm:
    """Which arm of ``split`` the client ``key`` is on (sticky: the same answer for the same
    name, salt and key; a client on the candidate stays there while the share grows)."""
    digest = hashlib.sha256(f"{name}|{split['salt']}|{key}".encode()).hexdigest()
    u = int(digest[:12], 16) / 16**12
    return "candidate" if u < float(split["share"]) else "champion"


def routing(name: str, default_alias: str) -> tuple[int, dict[str, Any] | None]:
    """(the version bare ``name`` routes to, its split or None), read together: one
    ``get_registered_model`` through MLflow's client (aliases and tags come in one answer), one
    SQLite connection on the embedded store; the versions only when the model has neither alias.
    A split tag that cannot be read is logged and ignored: every request goes to the champion."""
    r = reader()
    aliases, tags = _facts(r, name)
    version = served_version(aliases, None, default_alias)
    if version is None:
        version = _latest(r, name)
    split = None
    if (raw := tags.get(SPLIT_TAG)) is not None:
        try:
            split = _parse(name, raw)
        except IntegrityError as e:
            log.warning("%s; routing every request for %s to %s:%s", e, name, name, version)
    return version, split


def get_split(name: str) -> dict[str, Any] | None:
    """The split of model ``name`` (candidate, share, since, updated, salt, meta), or None.
    NotFoundError when the model is not registered; IntegrityError when the tag is unreadable."""
    check_name(name)
    _, tags = _facts(reader(), name)
    raw = tags.get(SPLIT_TAG)
    return None if raw is None else _parse(name, raw)


def set_split(
    name: str,
    candidate: int,
    share: float,
    *,
    reason: str = "",
    actor: str | None = None,
    gate: list[dict] | None = None,
    meta: dict | None = None,
) -> dict[str, Any]:
    """Send ``share`` (in [0, 1]) of the requests for bare ``name`` to ``name:candidate``; the
    champion keeps the rest. Changing the share of the same candidate keeps its clients (same
    salt, same ``since``); a new candidate starts a new split. ``meta`` is stored and returned as
    is (a JSON object). Recorded in the model's history; returns the split."""
    check_name(name)
    share = _check_share(name, candidate, share)
    meta = _check_meta(name, meta)
    mv = get_version(f"{name}:{candidate}", verify=False)  # NotFoundError names what exists
    if mv.card.get("kind") != "adapter":
        raise ConfigError(
            f"{name}:{candidate} is a {mv.card.get('kind')} model, not an adapter; the server "
            "splits traffic between adapters of one base model only.",
            hint="Serve a full model on its own: `loft serve --base-model PATH`.",
        )
    default_alias = _default_alias()
    c = client()
    with _lock(name):
        r = MlflowReader(c)
        aliases, tags = _facts(r, name)
        champion = served_version(aliases, None, default_alias)
        if champion is None:
            champion = _latest(r, name)
        if champion == candidate:
            via = next((f"@{a}" for a in (default_alias, "champion") if a in aliases), "latest")
            raise ConfigError(
                f"{name}:{candidate} is the version {name} already routes to ({via}); a split "
                "sends a share of the traffic to another version.",
                hint=f"Split to a newer version (`loft registry show {name}` lists them), or "
                f"move the champion back first (`loft registry rollback {name}`).",
            )
        previous = _parse_or_none(name, tags.get(SPLIT_TAG))
        now = _now()
        same = previous is not None and previous["candidate"] == candidate
        split = {
            "candidate": candidate,
            "share": share,
            "since": previous["since"] if same else now,  # type: ignore[index]
            "updated": now,
            "salt": previous["salt"] if same else secrets.token_hex(8),  # type: ignore[index]
            "meta": meta,
        }
        raw = json.dumps(split, sort_keys=True, ensure_ascii=False)
        if len(raw) > MAX_TAG_CHARS:
            raise ConfigError(
                f"the split of {name} is {len(raw)} characters as JSON, over the {MAX_TAG_CHARS} "
                "a registered-model tag holds in MLflow's database.",
                hint="Keep less in meta (a path or an id instead of the document).",
            )
        c.set_registered_model_tag(name, SPLIT_TAG, raw)
        prev = {k: previous[k] for k in ("candidate", "share")} if previous else None
        append_history(name, _entry("split", candidate, share, reason, actor, gate, prev))
    return split


def clear_split(
    name: str, *, reason: str = "", actor: str | None = None, gate: list[dict] | None = None
) -> dict[str, Any] | None:
    """Send every request for bare ``name`` to the champion again. Returns the split that was
    removed (recorded in the history), or None when there was none (nothing is recorded)."""
    check_name(name)
    c = client()
    with _lock(name):
        _, tags = _facts(MlflowReader(c), name)
        if SPLIT_TAG not in tags:
            return None
        previous = _parse_or_none(name, tags[SPLIT_TAG])  # an unreadable one is removed too
        c.delete_registered_model_tag(name, SPLIT_TAG)
        cand = previous["candidate"] if previous else None
        share = previous["share"] if previous else None
        append_history(name, _entry("split-cleared", cand, share, reason, actor, gate, None))
    return previous


# ----------------------------------------------------------------------------- helpers


def _facts(r: RegistryReader, name: str) -> tuple[dict[str, int], dict[str, str]]:
    got = r.aliases_and_tags(name)
    if got is None:
        raise not_registered(name)
    return got


def _default_alias() -> str:
    """The alias a bare name follows on a server with the default config (``serve.default_alias``;
    a server configured otherwise checks nothing more: a split to its own champion is harmless)."""
    from loft.core.specs import ServeConfig

    return str(ServeConfig.model_fields["default_alias"].default)


def _latest(r: RegistryReader, name: str) -> int:
    versions = r.versions(name)
    if not versions:
        raise NotFoundError(f"model {name!r} has no versions.", hint="Register one first.")
    return versions[-1]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _entry(
    event: str, candidate: int | None, share: float | None, reason: str, actor: str | None,
    gate: list[dict] | None, previous: dict[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    """A history entry with the keys of an alias move (``alias`` None: no alias moved)."""
    return {
        "who": who(actor),
        "when": _now(),
        "event": event,
        "alias": None,
        "from": None,
        "to": candidate,
        "share": share,
        "previous": previous,
        "why": reason,
        "gate": gate,
        "forced": False,
        "rollback": False,
    }


def _check_share(name: str, candidate: int, share: Any) -> float:
    if isinstance(share, bool) or not isinstance(share, int | float) or not math.isfinite(share):
        raise ConfigError(
            f"share {share!r} for {name}:{candidate} is not a number; it is the candidate's "
            "fraction of the requests, in [0, 1].",
            hint="For example 0.1 for 10%.",
        )
    if not 0.0 <= share <= 1.0:
        pct = f" ({share:g} looks like a percentage: pass {share / 100:g})" if share <= 100 else ""
        raise ConfigError(
            f"share {share:g} for {name}:{candidate} is outside [0, 1]{pct}; it is the "
            "candidate's fraction of the requests.",
            hint="For example 0.1 for 10%.",
        )
    return float(share)


def _check_meta(name: str, meta: Any) -> dict[str, Any]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ConfigError(f"meta of the split of {name} must be a JSON object (a dict).")
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"meta of the split of {name} is not plain JSON: {e}.",
            hint="Keep strings, numbers, booleans, None, lists and dicts in it.",
        ) from None
    return meta


def _parse(name: str, raw: str) -> dict[str, Any]:
    """The split in tag ``raw``; IntegrityError saying what is wrong and how to reset it."""
    problem = None
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        doc, problem = None, f"is not JSON ({e})"
    if problem is None:
        if not isinstance(doc, dict):
            problem = "is not a JSON object"
        elif not isinstance(doc.get("candidate"), int) or isinstance(doc["candidate"], bool):
            problem = f"has candidate {doc.get('candidate')!r}, not a version number"
        elif isinstance(doc.get("share"), bool) or not isinstance(doc.get("share"), int | float):
            problem = f"has share {doc.get('share')!r}, not a number"
        elif not 0.0 <= doc["share"] <= 1.0:
            problem = f"has share {doc['share']!r}, outside [0, 1]"
        elif not isinstance(doc.get("salt"), str) or not doc["salt"]:
            problem = "has no salt"
        elif not isinstance(doc.get("meta", {}), dict):
            problem = "has a meta that is not a JSON object"
    if problem is not None:
        raise IntegrityError(
            f"the traffic split of {name} (MLflow registered-model tag {SPLIT_TAG}) {problem}.",
            hint=f"Remove it with loft.registry.clear_split({name!r}) (or delete the tag in "
            "MLflow), then set it again.",
        )
    return {
        "candidate": doc["candidate"],
        "share": float(doc["share"]),
        "since": doc.get("since"),
        "updated": doc.get("updated", doc.get("since")),
        "salt": doc["salt"],
        "meta": doc.get("meta") or {},
    }


def _parse_or_none(name: str, raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        return _parse(name, raw)
    except IntegrityError as e:
        log.warning("%s; it is replaced", e)
        return None
