"""Runtime checks of an adapter before export: can vLLM serve it, and what to change if not.

The rules are :func:`loft.registry.compat.vllm_problems`, the same check ``loft serve`` (engine:
vllm) runs before an adapter's first request; this module adds, for each problem, what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loft.core.errors import ConfigError
from loft.export.merge import Adapter, resolve_adapter
from loft.registry.compat import VLLM_LORA_RANKS, Problem, vllm_problems

_MERGE = "or merge it (`loft merge {ref} --register`) and serve the merged model as a full model"
_FIXES = {
    "use_dora": "retrain with lora.use_dora: false, " + _MERGE,
    "lora_bias": "retrain without lora_bias, " + _MERGE,
    "bias": "retrain with bias 'none', " + _MERGE,
    "modules_to_save": "retrain without modules_to_save, " + _MERGE,
    "trainable_token_indices": "retrain without trainable tokens, " + _MERGE,
    "peft_type": "train a LoRA adapter, " + _MERGE,
    "target_modules": "retrain with target modules that leave out lm_head and embed_tokens, "
    + _MERGE,
    "adapter_model.safetensors": "retrain LoRA on linear layers only, " + _MERGE,
}


class NotServable(ConfigError):
    """vLLM cannot serve this adapter as it is; the report says what to change."""


@dataclass
class VllmReport:
    adapter: Adapter
    max_lora_rank: int | None
    problems: list[tuple[Problem, str]]  # (problem, what to change)

    @property
    def servable(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter.to_dict(),
            "runtime": "vllm",
            "max_lora_rank": self.max_lora_rank,
            "servable": self.servable,
            "problems": [
                {"key": p.key, "message": p.message, "fix": fix} for p, fix in self.problems
            ],
        }


def check_vllm(ref: str, *, max_lora_rank: int | None = None) -> VllmReport:
    """vLLM's verdict on ``ref`` (adapter folder or registry ref, verified first)."""
    if max_lora_rank is not None and max_lora_rank not in VLLM_LORA_RANKS:
        raise ConfigError(
            f"--max-lora-rank {max_lora_rank} is not one vLLM accepts",
            hint=f"Use one of {', '.join(map(str, VLLM_LORA_RANKS))}.",
        )
    adapter = resolve_adapter(ref)
    problems = vllm_problems(adapter.path, max_rank=max_lora_rank)
    return VllmReport(
        adapter, max_lora_rank, [(p, fix_for(p, adapter, max_lora_rank)) for p in problems]
    )


def fix_for(problem: Problem, adapter: Adapter, max_lora_rank: int | None) -> str:
    """What to change so vLLM serves the adapter (or its merged model)."""
    ref = adapter.label
    if problem.key in ("r", "rank_pattern") and "rank" in problem.message:
        bigger = [r for r in VLLM_LORA_RANKS if max_lora_rank is None or r > max_lora_rank]
        start = (
            f"start the server with a larger max_lora_rank (vLLM takes "
            f"{', '.join(map(str, bigger))}), "
            if max_lora_rank is not None and bigger
            else ""
        )
        return f"{start}retrain with a smaller lora.r, " + _MERGE.format(ref=ref)
    if "alpha_pattern" in problem.key or "rank_pattern" in problem.key:
        return "retrain with one rank and alpha for every module, " + _MERGE.format(ref=ref)
    fix = _FIXES.get(problem.key)
    return (fix or "retrain without this option, " + _MERGE).format(ref=ref)


__all__ = ["NotServable", "VllmReport", "check_vllm", "fix_for"]
