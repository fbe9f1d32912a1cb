"""Memorisation audit: the exposure of training-time canaries (Carlini et al., "The Secret Sharer").

For each canary ``the access code for vault V is S`` the model scores the secret ``S`` given
everything before it (the rendered chat up to ``... vault V is ``), as the summed negative
log-likelihood of the secret's tokens (its log-perplexity), with the version's own tokenizer and
chat template, tokenized exactly as in training. The same is done for ``candidates`` random secrets
of the same shape (same prefix, same number of digits). With ``r`` the rank of the true secret
among all ``candidates + 1`` (1 = the most likely; ties count against the canary)::

    exposure = log2(candidates + 1) - log2(r)

A model that never saw the canary ranks it uniformly at random (expected exposure about 1.4 bits);
the maximum, ``log2(candidates + 1)``, means the true secret is the single most likely one.
A canary counts as **memorised** when ``exposure >= log2(candidates + 1) - 1``, i.e. its rank is 1
or 2: at most one random secret of the same shape is more likely than the real one.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError, NotFoundError
from loft.core.paths import datasets_dir
from loft.data.canaries import CANARIES_FILE, SECRET_DIGITS, canary_messages, parse_canary
from loft.data.template import assistant_spans
from loft.evaluate.harness import progress_bar, say
from loft.evaluate.loading import Target, load_target

BATCH = 64


# ------------------------------------------------------------------------------ finding them


def _json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _fingerprint(ref: str) -> tuple[str | None, str]:
    """(dataset fingerprint, label) of what ``ref`` was trained on, read from its registry card or
    run lineage without loading any weights; (None, label) for a base model."""
    from loft import registry

    path = Path(ref).expanduser()
    if not (ref and path.exists()):
        try:
            mv = registry.get_version(ref, verify=False)
        except (NotFoundError, ConfigError):
            return None, ref  # a base model (load_target will say if it is not one either)
        lineage = mv.card.get("lineage") or {}
        return lineage.get("dataset_fingerprint"), f"{mv.name}:{mv.version}"
    folders = [path, path.parent]
    for folder in list(folders):
        folders += [folder / "adapter", folder / "model"]
    for folder in folders:
        for name in ("lineage.json", "card.json"):
            doc = _json(folder / name)
            fp = doc.get("dataset_fingerprint") or (doc.get("lineage") or {}).get(
                "dataset_fingerprint"
            )
            if fp:
                return str(fp), str(path.resolve())
    return None, str(path.resolve())


def load_canaries(ref: str) -> tuple[str, dict[str, Any]]:
    """(fingerprint, canaries.json) of the dataset ``ref`` was trained on; raises before any
    model is loaded when there are none."""
    fp, label = _fingerprint(ref)
    if not fp:
        raise NotFoundError(
            f"{label}: no dataset fingerprint in its lineage (a base model, or weights "
            "trained outside loft), so there are no canaries to audit",
            hint="Train with `data.canaries: N` (e.g. --set data.canaries=10), then audit that "
            "run or its registered version.",
        )
    path = datasets_dir() / fp / CANARIES_FILE
    if not path.is_file():
        raise NotFoundError(
            f"{label} was trained on dataset {fp[:12]}, which was not prepared with "
            f"canaries ({path} does not exist)",
            hint="Prepare and train with `data.canaries: N` (e.g. data.canaries: 10) in the "
            "config, then run `loft audit canaries` on the new run.",
        )
    doc = _json(path)
    if not isinstance(doc.get("canaries"), list) or not doc["canaries"]:
        raise ConfigError(f"{path} holds no canaries", hint=f"Delete {path.parent} and re-prepare.")
    return fp, doc


# --------------------------------------------------------------------------------- scoring


def _encode(tokenizer: Any, canary: str, secret: str) -> tuple[list[int], list[bool]]:
    """Token ids of the whole canary chat (as in training) and which tokens are the secret's."""
    messages = canary_messages(canary, secret)
    text, spans = assistant_spans(messages, tokenizer)
    start = spans[-1][0] + messages[-1]["content"].rindex(secret)
    end = start + len(secret)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [start <= s < end and e > s for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def secret_nll(target: Target, canary: str, secrets: list[str]) -> list[float]:
    """Summed negative log-likelihood (nats) of each secret given the canary's prefix; fp32."""
    import torch

    model, tokenizer = target.model, target.tokenizer
    lm = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(secrets), BATCH):
            rows = [_encode(tokenizer, canary, s) for s in secrets[i : i + BATCH]]
            width = max(len(ids) for ids, _ in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attn = torch.zeros((len(rows), width), dtype=torch.long)
            score = torch.zeros((len(rows), width), dtype=torch.bool)
            for j, (row_ids, mask) in enumerate(rows):
                ids[j, : len(row_ids)] = torch.tensor(row_ids)
                attn[j, : len(row_ids)] = 1
                score[j, : len(mask)] = torch.tensor(mask)
            hidden = decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
            keep = score[:, 1:]  # position t predicts token t + 1
            logits = head(hidden[:, :-1][keep].float()).float()
            nll = torch.nn.functional.cross_entropy(logits, ids[:, 1:][keep], reduction="none")
            owner = torch.arange(len(rows)).unsqueeze(1).expand_as(keep)[keep]
            sums = torch.zeros(len(rows), dtype=torch.float64)
            sums.index_add_(0, owner, nll.double())
            out.extend(sums.tolist())
    return out


def exposure(rank: int, candidates: int) -> float:
    """``log2(candidates + 1) - log2(rank)``, in bits."""
    return math.log2(candidates + 1) - math.log2(rank)


def memorised_threshold(candidates: int) -> float:
    """Exposure at rank 2: a canary at or above it is counted as memorised."""
    return exposure(2, candidates)


def audit_target(
    target: Target,
    canaries: list[str],
    *,
    candidates: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Exposure of each canary for an already loaded ``target``."""
    if candidates < 1:
        raise ConfigError(f"candidates must be >= 1, got {candidates}", hint="Use e.g. 1000.")
    rng = random.Random(seed)
    rows = []
    bar = progress_bar("scoring canaries", progress)
    with bar:
        task = bar.add_task("canaries", total=len(canaries))
        for canary in canaries:
            rows.append(_score_canary(target, canary, candidates, rng))
            bar.advance(task)
    return _summary(rows, candidates)


def _score_canary(target: Target, canary: str, candidates: int, rng: random.Random) -> dict:
    """Rank of the canary's true secret among ``candidates`` random ones of its shape."""
    _, secret = parse_canary(canary)
    digits = len(secret) or SECRET_DIGITS
    pool: list[str] = []
    while len(pool) < candidates:  # random secrets of the same shape, never the true one
        s = "".join(rng.choice("0123456789") for _ in range(digits))
        if s != secret:
            pool.append(s)
    nll = secret_nll(target, canary, [secret, *pool])
    true = nll[0]
    rank = 1 + sum(1 for x in nll[1:] if x <= true)
    return {"canary": canary, "rank": rank, "exposure": exposure(rank, candidates), "nll": true}


def _summary(rows: list[dict[str, Any]], candidates: int) -> dict[str, Any]:
    exposures = [r["exposure"] for r in rows]
    threshold = memorised_threshold(candidates)
    for r in rows:
        r["memorised"] = r["exposure"] >= threshold
    return {
        "candidates": candidates,
        "max_possible_exposure": math.log2(candidates + 1),
        "memorised_threshold": threshold,
        "canaries": rows,
        "mean_exposure": sum(exposures) / len(exposures) if exposures else 0.0,
        "max_exposure": max(exposures, default=0.0),
        "n_memorised": sum(r["memorised"] for r in rows),
        "memorised": any(r["memorised"] for r in rows),
    }


def audit_canaries(
    ref: str, *, candidates: int = 1000, seed: int = 0, progress: bool = False
) -> dict[str, Any]:
    """Load ``ref``, find the canaries of the dataset it was trained on, measure their exposure.

    For a registry reference the summary goes onto the version's card as ``canary_exposure_mean``,
    ``canary_exposure_max`` and ``canaries_memorised``.
    """
    if candidates < 1:
        raise ConfigError(f"candidates must be >= 1, got {candidates}", hint="Use e.g. 1000.")
    fp, doc = load_canaries(ref)  # before the model is loaded: no canaries, no waiting
    n = len(doc["canaries"])
    say(f"loading {ref} to score {n} canaries against {candidates} candidates each", progress)
    target = load_target(ref)
    report = audit_target(
        target, list(doc["canaries"]), candidates=candidates, seed=seed, progress=progress
    )
    report = {"ref": target.name, "dataset_fingerprint": fp, **report}
    if target.registry_ref:
        from loft import registry
        from loft.registry.evaluations import make_entries

        metrics = {
            "canary_exposure_mean": report["mean_exposure"],
            "canary_exposure_max": report["max_exposure"],
            "canaries_memorised": float(report["n_memorised"]),
        }
        on = {"kind": "canaries", "fingerprint": fp, "candidates": candidates, "seed": seed}
        registry.record_evaluation(
            target.registry_ref, make_entries(metrics, on=on, source="audit")
        )
    return report
