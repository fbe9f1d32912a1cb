"""Preference tuning: DPO, ORPO and SimPO on pairs, KTO on labelled completions. Top to bottom.

The objective plugs into the same spine as SFT (``loft.train.sft``: placement, pre-flight, step
plan, checkpoints, signals, tracking, registry); what differs is here:

1. **Data**: ``loft.data.prepare_preference_dataset`` renders prompt and completions with the chat
   template and keeps token ids of prompt, chosen and rejected (or completion and label).
2. **Reference log-probabilities** (DPO, KTO) are computed once, before the first step, from the
   model as it starts — with the adapter disabled (``reference: base``) or as loaded from
   ``init_from`` (``reference: init``) — so no second copy of the model is ever held. They are
   cached beside the prepared dataset under a key of (reference model sha256, precision,
   objective), so later epochs, resumes and re-runs read them instead of recomputing.
3. **Micro-batches**: every pair is packed as prompt + chosen + rejected, padding-free, into one
   row with per-example attention; the rejected completion attends to the prompt's keys and
   values where they already are, so the prompt is fed once, not twice as in TRL's concatenated
   forward (chat prompts are most of a pair's tokens). The LM head runs only on completion
   positions; each completion reduces to the sum of its tokens' log-probabilities.
4. **Losses** are ``loft.train.preference_loss``'s, checked against TRL's on the same tensors.
5. **Guards**: a NaN or infinite loss stops the run before the optimizer steps (the spine),
   reward margins stuck at zero after the warm-up warn that policy and reference are the same
   model, and weights that never moved fail the run's final check.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from loft.core.errors import ConfigError, TrainingDiverged
from loft.core.specs import PAIRED_OBJECTIVES, TrainConfig
from loft.train.attention import BOUNDS_KEY, NAME, PREFIX_KEY
from loft.train.device import Placement
from loft.train.loss import _causal_lm
from loft.train.preference_loss import (
    LossOut,
    PairLogps,
    dpo_loss,
    kto_kl,
    kto_loss,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)

REFERENCE_VERSION = 1
DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "simpo": 2.0, "orpo": 0.1}
# margins this close to 0 for every step after the warm-up: the policy is the reference
DEAD_MARGIN = 1e-6


def reference_kind(config: TrainConfig) -> str | None:
    """None (ORPO, SimPO), "base", "init" or "precomputed"."""
    if config.objective in ("orpo", "simpo"):
        return None
    ref = config.preference.reference
    if ref == "auto":
        return "init" if config.init_from else "base"
    return ref


def pack_sequences(seqs: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
    """(prompt ids, completion ids) pairs -> one padding-free row, and where each completion's
    log-probabilities come from: ``gather`` (positions whose hidden state predicts a completion
    token), ``targets`` (those tokens) and ``segments`` (which sequence each belongs to)."""
    ids: list[int] = []
    pos: list[int] = []
    gather: list[int] = []
    targets: list[int] = []
    segments: list[int] = []
    lengths: list[int] = []
    cu = [0]
    for j, (prompt, completion) in enumerate(seqs):
        start = len(ids)
        ids.extend(prompt)
        ids.extend(completion)
        pos.extend(range(len(prompt) + len(completion)))
        first = start + len(prompt) - 1  # this position predicts the first completion token
        gather.extend(range(first, first + len(completion)))
        targets.extend(completion)
        segments.extend([j] * len(completion))
        lengths.append(len(completion))
        cu.append(len(ids))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "cu_seq_lens": torch.tensor(cu, dtype=torch.int32),
        "seq_bounds": tuple(cu),
        "max_length": max(b - a for a, b in zip(cu, cu[1:], strict=False)),
        "gather": torch.tensor(gather, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        "segments": torch.tensor(segments, dtype=torch.long),
        "lengths": torch.tensor(lengths, dtype=torch.float32),
        "n_seqs": len(seqs),
        "num_tokens": len(ids),
    }


def pack_pairs(pairs: list[tuple[list[int], list[int], list[int]]]) -> dict[str, Any]:
    """(prompt, chosen, rejected) ids -> one padding-free row ``prompt chosen rejected ...``, in
    the layout of ``pack_sequences`` for the 2n sequences (chosen ones first, then rejected), where
    each rejected segment reads its pair's prompt as a shared prefix (``seq_prefix``) and its
    first token is predicted by the prompt's last position, like chosen's. Mathematically the
    same log-probabilities as ``pack_sequences`` of (prompt, chosen) + (prompt, rejected)."""
    n = len(pairs)
    ids: list[int] = []
    pos: list[int] = []
    gather: list[list[int]] = [[] for _ in range(2 * n)]
    targets: list[list[int]] = [[] for _ in range(2 * n)]
    prefix: list[tuple[int, int] | None] = []
    cu = [0]
    for j, (prompt, chosen, rejected) in enumerate(pairs):
        start = len(ids)
        last = start + len(prompt) - 1  # predicts the first token of either completion
        ids.extend([*prompt, *chosen])
        pos.extend(range(len(prompt) + len(chosen)))
        gather[j] = list(range(last, last + len(chosen)))
        cu.append(len(ids))
        prefix.append(None)
        r0 = len(ids)
        ids.extend(rejected)
        pos.extend(range(len(prompt), len(prompt) + len(rejected)))
        gather[n + j] = [last, *range(r0, r0 + len(rejected) - 1)]
        cu.append(len(ids))
        prefix.append((start, start + len(prompt)))
        targets[j], targets[n + j] = list(chosen), list(rejected)
    lengths = [len(t) for t in targets]
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "cu_seq_lens": torch.tensor(cu, dtype=torch.int32),
        "seq_bounds": tuple(cu),
        "seq_prefix": tuple(prefix),
        "max_length": max(b - a for a, b in zip(cu, cu[1:], strict=False)),
        "gather": torch.tensor([g for gs in gather for g in gs], dtype=torch.long),
        "targets": torch.tensor([t for ts in targets for t in ts], dtype=torch.long),
        "segments": torch.tensor(
            [j for j, n_tok in enumerate(lengths) for _ in range(n_tok)], dtype=torch.long
        ),
        "lengths": torch.tensor(lengths, dtype=torch.float32),
        "n_seqs": 2 * n,
        "num_tokens": len(ids),
    }


def completion_logps(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """[n_seqs] summed log-probabilities of each sequence's completion tokens; the LM head runs
    only on the positions that predict them."""
    lm = _causal_lm(model)
    extra: dict[str, Any] = {}
    if lm.config._attn_implementation == NAME:
        cu, longest = batch["cu_seq_lens"], batch["max_length"]
        extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest}
        extra.update(max_length_k=longest, **{BOUNDS_KEY: batch["seq_bounds"]})
        if batch.get("seq_prefix"):
            extra[PREFIX_KEY] = batch["seq_prefix"]
    else:  # one sequence per row would be needed for stock attention: packing is required
        raise ConfigError("preference training runs on packed rows (data.packing: true).")
    out = lm.get_decoder()(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **extra
    )
    hidden = out.last_hidden_state[0, batch["gather"]]
    logits = lm.get_output_embeddings()(hidden)
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return sequence_logps(logits, batch["targets"], batch["segments"], batch["n_seqs"])


def _weights_fingerprint(model: torch.nn.Module) -> list[tuple[float, float]]:
    """Sum and norm (fp64) of every trainable tensor: cheap, and any update changes them."""
    with torch.no_grad():
        return [
            (float(p.double().sum()), float(p.double().norm()))
            for p in model.parameters()
            if p.requires_grad
        ]


class PreferenceObjective:
    """One of dpo, kto, orpo, simpo, for loft.train.sft's loop (same interface as SftObjective)."""

    def __init__(
        self,
        config: TrainConfig,
        tokenizer: Any,
        placement: Placement,
        progress: bool,
        *,
        info: Any,
        init: Any,
    ) -> None:
        from loft.data import prepare_preference_dataset

        self.config, self.placement, self.info, self.init = config, placement, info, init
        self.name = config.objective
        self.paired = self.name in PAIRED_OBJECTIVES
        self.unit = "pairs" if self.paired else "examples"
        pref = config.preference
        self.beta = pref.beta if pref.beta is not None else DEFAULT_BETA[self.name]
        self.dataset = prepare_preference_dataset(
            config.data, tokenizer, paired=self.paired, progress=progress
        )
        self.rows = {"train": _rows(self.dataset.train, self.paired), "eval": []}
        if self.dataset.eval is not None:
            self.rows["eval"] = _rows(self.dataset.eval, self.paired)
        self.ref_kind = reference_kind(config)
        self.ref: dict[str, torch.Tensor] = {}
        self.reference_info: dict[str, Any] = {}
        self._start: list[tuple[float, float]] = []
        self._margins: list[float] = []
        self._warned = False

    # ------------------------------------------------------------------ the spine's interface

    def describe(self, method: str) -> str:
        ref = f", reference {self.ref_kind}" if self.ref_kind else ""
        return f"{self.name} (beta {self.beta:g}{ref}) with {method}"

    def size(self, split: str) -> int:
        return len(self.rows[split])

    def preflight(self, config: TrainConfig, placement: Placement, plan: Any) -> Any:
        """The planner's estimate for the largest micro-batch of sequences the plan draws: every
        pair is its prompt once and both completions, logits only on completion tokens."""
        from dataclasses import replace

        from loft.train.preflight import run_preflight

        rows = [_as_sft_row(r, self.paired) for r in self.rows["train"]]
        pre = run_preflight(config, placement, rows, plan)
        what = "pairs (prompt + chosen + rejected)" if self.paired else "completions"
        return replace(pre, shape_from=f"{pre.shape_from}, as packed {what}")

    def setup(self, model: torch.nn.Module, run_dir: Path, summary: dict) -> None:
        """Reference log-probabilities (cached), and the weights as they start."""
        self._start = _weights_fingerprint(model)
        if self.ref_kind is None:
            return
        key = self.reference_key()
        path = Path(self.dataset.path) / "reference" / f"{key}.safetensors"
        computed = 0
        if path.is_file():
            from safetensors.torch import load_file

            self.ref = load_file(str(path))
        elif self.ref_kind == "precomputed":
            raise ConfigError(
                "preference.reference is 'precomputed', but no reference log-probabilities are "
                f"cached for this dataset and model ({path} does not exist).",
                hint="Run once with reference: base (or init with init_from) to compute them.",
            )
        else:
            self.ref = self._reference_pass(model)
            computed = sum(self.size(s) for s in ("train", "eval"))
            _save_atomic(self.ref, path)
        self.reference_info = {
            "kind": self.ref_kind,
            "key": key,
            "path": str(path),
            "computed_examples": computed,
            "cached": computed == 0,
        }
        summary["reference"] = self.reference_info

    def reference_key(self) -> str:
        """What the cached log-probabilities depend on besides the dataset (their folder)."""
        from loft.registry.card import weights_digest

        init = None
        if self.init is not None and self.ref_kind in ("init", "precomputed"):
            init = weights_digest(self.init.card)
        doc = {
            "version": REFERENCE_VERSION,
            "objective": "paired" if self.paired else "kto",
            "base": self.info.sha256,
            "reference": "init" if init else "base",
            "init": init,
            "precision": self.placement.precision,
            "quantised": self.config.method == "qlora",
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]

    def batch(self, split: str, idx: list[int]) -> dict[str, Any]:
        rows = self.rows[split]
        picked = [rows[i] for i in idx]
        if self.paired:
            packed = pack_pairs([(r["prompt"], r["chosen"], r["rejected"]) for r in picked])
        else:
            packed = pack_sequences([(r["prompt"], r["completion"]) for r in picked])
        b = _to(packed, self.placement.device)
        b["count"] = len(picked)
        if self.ref:
            b["ref"] = self.ref[split][idx].to(self.placement.device)
        if not self.paired:
            n = len(rows)
            # KTO's reference point: each prompt with another example's completion
            kl = [
                (r["prompt"], rows[(i - 1) % n]["completion"])
                for i, r in zip(idx, picked, strict=True)
            ]
            b["kl"] = _to(pack_sequences(kl), self.placement.device)
            b["label"] = torch.tensor([r["label"] for r in picked], device=self.placement.device)
        return b

    def count(self, batch: dict[str, Any]) -> int:
        return batch["count"]

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]):
        """(summed loss over the micro-batch's pairs or examples, {metric: (sum, count)})."""
        logps = completion_logps(model, batch)
        out = self._loss(model, batch, logps)
        return out.loss.sum(), self._metric_sums(batch, logps, out)

    def step_metrics(self, sums: dict[str, tuple[float, float]]) -> dict[str, float]:
        return {k: v / n for k, (v, n) in sums.items() if n}

    def watch(self, done: int, total: int, metrics: dict[str, float], bar: Any) -> None:
        """Warn once when reward margins stay at zero past the warm-up: the policy is the
        reference (a zero learning rate, frozen weights, or a reference that is the policy)."""
        if "rewards/margins" not in metrics or self._warned:
            return
        self._margins.append(abs(metrics["rewards/margins"]))
        t = self.config.training
        after = max(3, math.ceil(t.warmup_ratio * total) + 1, math.ceil(0.1 * total))
        if done >= after and len(self._margins) >= after:
            if max(self._margins) < DEAD_MARGIN:
                self._warned = True
                bar.note(
                    f"[yellow]warning:[/] step {done}: reward margins have been 0 since the start"
                    f" (DPO's loss stays at ln 2 = {math.log(2):.4f}): the policy is identical "
                    "to the reference. Is training.lr 0, are no weights trainable, or is the "
                    "reference the policy itself?",
                    always=True,
                )
            else:
                self._margins = self._margins[-after:]

    def progress(self, metrics: dict[str, float]) -> str:
        acc = metrics.get("rewards/accuracies")
        return f"acc {acc:.2f}" if acc is not None else ""

    def finish(self, model: torch.nn.Module) -> None:
        """Fail the run when no trainable weight changed from where it started."""
        if self._start and _weights_fingerprint(model) == self._start:
            raise TrainingDiverged(
                f"{self.name}: no trainable weight changed in training; the result would equal "
                "its starting point.",
                hint="Check training.lr (and the warm-up), and that the data's pairs differ "
                "(`loft data validate`).",
            )

    # ------------------------------------------------------------------ the objective itself

    def _loss(self, model: torch.nn.Module, batch: dict[str, Any], logps: torch.Tensor) -> LossOut:
        pref, ref = self.config.preference, batch.get("ref")
        if self.paired:
            b = batch["count"]
            lengths = batch["lengths"]
            lp = PairLogps(
                chosen=logps[:b],
                rejected=logps[b:],
                chosen_len=lengths[:b],
                rejected_len=lengths[b:],
                ref_chosen=None if ref is None else ref[:, 0],
                ref_rejected=None if ref is None else ref[:, 1],
            )
            if self.name == "dpo":
                return dpo_loss(
                    lp,
                    beta=self.beta,
                    loss_type=pref.loss_type,
                    label_smoothing=pref.label_smoothing,
                )
            if self.name == "simpo":
                return simpo_loss(
                    lp, beta=self.beta, gamma=pref.simpo_gamma, label_smoothing=pref.label_smoothing
                )
            return orpo_loss(lp, lam=pref.orpo_lambda)
        with torch.no_grad():  # the reference point is not differentiated (as in TRL)
            policy_kl = completion_logps(model, batch["kl"])
        kl = kto_kl(policy_kl, ref[:, 1])
        return kto_loss(
            logps,
            ref[:, 0],
            batch["label"],
            kl,
            beta=self.beta,
            desirable_weight=pref.desirable_weight,
            undesirable_weight=pref.undesirable_weight,
        )

    def _metric_sums(
        self, batch: dict[str, Any], logps: torch.Tensor, out: LossOut
    ) -> dict[str, tuple[float, float]]:
        lengths = batch["lengths"]
        b = batch["count"]
        sums: dict[str, tuple[float, float]] = {}
        lp = logps.detach().float()
        if self.paired:
            rc, rr = out.rewards_chosen.float(), out.rewards_rejected.float()
            sums["rewards/chosen"] = (float(rc.sum()), b)
            sums["rewards/rejected"] = (float(rr.sum()), b)
            sums["rewards/margins"] = (float((rc - rr).sum()), b)
            sums["rewards/accuracies"] = (float((rc > rr).float().sum()), b)
            sums["logps/chosen"] = (float(lp[:b].sum()), b)
            sums["logps/rejected"] = (float(lp[b:].sum()), b)
            sums["completion_length"] = (float(lengths.sum()), 2 * b)
            return sums
        label = batch["label"]
        rc, rr = out.rewards_chosen.float(), out.rewards_rejected.float()
        for name, mask, r in (("chosen", label, rc), ("rejected", ~label, rr)):
            n = int(mask.sum())
            if n:
                sums[f"rewards/{name}"] = (float(r[mask].sum()), n)
                sums[f"logps/{name}"] = (float(lp[mask].sum()), n)
        sums["completion_length"] = (float(lengths.sum()), b)
        return sums

    @torch.no_grad()
    def _reference_pass(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """[n, 2] per split: (chosen, rejected) sums, or (completion, mismatched completion) for
        KTO; from the model as it starts, its adapter disabled for the base reference. Without
        autograd: nothing of this forward is kept for a backward."""
        from rich.progress import Progress

        was_training = model.training
        model.eval()
        disable = getattr(model, "disable_adapter", None)
        use_base = self.ref_kind == "base" and self.init is not None and callable(disable)
        if self.ref_kind == "base" and self.init is not None and not callable(disable):
            raise ConfigError(
                "reference: base with init_from a full model would need a second copy of the "
                "model; use reference: init.",
            )
        ctx = disable() if use_base else _null()
        dtype = self.placement.autocast_dtype
        mbs = max(1, self.config.training.micro_batch_size)
        out: dict[str, torch.Tensor] = {}
        total = sum(self.size(s) for s in ("train", "eval"))
        with ctx, Progress(transient=True, disable=total < 64) as bar:
            task = bar.add_task("reference log-probs", total=total)
            for split in ("train", "eval"):
                n = self.size(split)
                vals = torch.zeros(n, 2, dtype=torch.float32)
                for i in range(0, n, mbs):
                    idx = list(range(i, min(i + mbs, n)))
                    b = self.batch(split, idx)
                    with _autocast(self.placement.device, dtype):
                        lp = completion_logps(model, b).float().cpu()
                        if self.paired:
                            vals[i : i + len(idx), 0] = lp[: len(idx)]
                            vals[i : i + len(idx), 1] = lp[len(idx) :]
                        else:
                            vals[i : i + len(idx), 0] = lp
                            kl = completion_logps(model, b["kl"]).float().cpu()
                            vals[i : i + len(idx), 1] = kl
                    bar.advance(task, len(idx))
                out[split] = vals
        model.train(was_training)
        return out


# ---------------------------------------------------------------------------------- helpers


def _rows(ds: Any, paired: bool) -> list[dict[str, Any]]:
    if paired:
        cols = ds.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
        return [
            {"prompt": r["prompt_ids"], "chosen": r["chosen_ids"], "rejected": r["rejected_ids"]}
            for r in cols
        ]
    cols = ds.select_columns(["prompt_ids", "completion_ids", "label"])
    return [
        {"prompt": r["prompt_ids"], "completion": r["completion_ids"], "label": bool(r["label"])}
        for r in cols
    ]


def _as_sft_row(r: dict[str, Any], paired: bool) -> dict[str, Any]:
    """A row the SFT pre-flight measures: the tokens a micro-batch holds for this example (a
    pair's prompt once, then both completions, as ``pack_pairs`` lays them out) and its trained
    (completion) positions."""
    from loft.data.packing import IGNORE_INDEX

    comps = [*r["chosen"], *r["rejected"]] if paired else r["completion"]
    return {"input_ids": r["prompt"] + comps, "labels": [IGNORE_INDEX] * len(r["prompt"]) + comps}


def _to(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _autocast(device: str, dtype: torch.dtype | None):
    if dtype is None:
        return _null()
    return torch.autocast(device, dtype=dtype)


def _null():
    import contextlib

    return contextlib.nullcontext()


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
