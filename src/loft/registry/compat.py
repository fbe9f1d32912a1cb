"""Can vLLM serve this adapter folder? One pure check, before vLLM ever sees the folder.

``loft serve`` (engine: vllm) runs it before an adapter is first used, and ``loft export --check
vllm`` reports it; both need the same answer. An adapter vLLM refuses must never reach it inside a
request: vLLM loads a ``LoRARequest`` lazily inside its engine step, and a load that fails there
fails the step, and with it the engine, for every client (vLLM #10546, #11727).

What vLLM's LoRA loader takes (``vllm/lora/peft_helper.py`` and ``lora_model.py``, vLLM 0.8 to
today): PEFT LoRA adapters without DoRA, without trained biases and without ``modules_to_save``;
rank at most the server's ``max_lora_rank`` (one of ``VLLM_LORA_RANKS``); one scale,
``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), applied to every module, so per-module rank or
alpha patterns that change the scale are served wrong; and only ``lora_A.weight`` /
``lora_B.weight`` tensors of linear layers (LoRA on ``embed_tokens`` or ``lm_head`` only for some
model families in some versions).

Reads ``adapter_config.json`` and the safetensors header only: no torch, no vLLM.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Every max_lora_rank vLLM >= 0.8 accepts (LoRAConfig's possible_max_ranks; later versions also
# take 1, which 0.8 refuses, so 1 is left out: a rank-1 adapter is served with max_lora_rank 8).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)

_PREFIX = "base_model.model."
_HEAD_MODULES = {"lm_head", "embed_out"}  # output projections PEFT wraps as Linear layers
# PEFT options vLLM's loader refuses or silently drops (the adapter would then be served wrong).
_FEATURES = {
    "use_dora": "vLLM does not serve DoRA adapters (it refuses their magnitude vectors)",
    "lora_bias": "a trained bias in the LoRA B matrix, which vLLM does not load",
    "modules_to_save": "full trained copies of these modules, which vLLM does not load",
    "trainable_token_indices": "trained token embeddings, which not every vLLM version loads",
    "fan_in_fan_out": "Conv1D layers, which vLLM does not take LoRA on",
    "layer_replication": "replicated layers, which vLLM ignores (outputs would be wrong)",
    "target_parameters": "raw parameters (MoE experts), which vLLM does not take LoRA on",
    "use_qalora": "QA-LoRA pools its inputs, which vLLM does not (outputs would be wrong)",
    "alora_invocation_tokens": "activated LoRA (aLoRA), which not every vLLM version serves",
}


@dataclass(frozen=True)
class Problem:
    """One reason vLLM cannot serve an adapter: the config key (or file) at fault, and why."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def vllm_problems(folder: Path, *, max_rank: int | None = None) -> list[Problem]:
    """Every reason vLLM cannot serve the PEFT adapter in ``folder`` (empty: it can).

    ``max_rank`` is the server's ``max_lora_rank``; None checks against the largest rank vLLM
    supports at all.
    """
    from loft.core.crypto import is_encrypted

    folder = Path(folder)
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    problems: list[Problem] = []
    encrypted = [p.name for p in (cfg_path, weights) if is_encrypted(p)]
    if encrypted:
        return [
            Problem(
                "encryption",
                f"{' and '.join(encrypted)} are encrypted at rest; vLLM reads adapters from "
                "files by path, and loft never writes a decrypted copy to disk",
            )
        ]
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [Problem(cfg_path.name, f"missing in {folder}: not a PEFT adapter folder")]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [Problem(cfg_path.name, f"unreadable ({e})")]
    if not isinstance(cfg, dict):
        return [Problem(cfg_path.name, "holds no JSON object")]

    if cfg.get("peft_type") != "LORA":
        problems.append(
            Problem("peft_type", f"{cfg.get('peft_type')!r}; vLLM serves LoRA adapters only")
        )
    for key, why in _FEATURES.items():
        if cfg.get(key):
            problems.append(Problem(key, f"{_show(cfg[key])}; {why}"))
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        problems.append(
            Problem("bias", f"{bias!r}; trained biases, which vLLM does not load (needs 'none')")
        )
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            problems.append(Problem(key, "missing; vLLM requires it in adapter_config.json"))
    r = cfg.get("r")
    if not _number(r) or r <= 0:
        if "r" in cfg:
            problems.append(Problem("r", f"{r!r} is not a positive rank"))
        r = None

    try:
        names = _tensor_names(weights)
    except FileNotFoundError:
        problems.append(Problem(weights.name, f"missing in {folder}"))
        names = []
    except (OSError, ValueError) as e:
        problems.append(Problem(weights.name, f"unreadable safetensors header ({e})"))
        names = []
    modules, odd, heads = _modules(names)
    told = [".lora_magnitude_vector"] if cfg.get("use_dora") else []  # reported above already
    told += [".bias"] if cfg.get("lora_bias") or bias not in (None, "none") else []
    odd = [k for k in odd if not any(t in k for t in told)]
    if odd:
        problems.append(
            Problem(
                weights.name,
                f"{_few(odd)}: not LoRA A/B matrices of linear layers (embedding LoRA, DoRA "
                "magnitudes, biases or full module copies), which vLLM does not load",
            )
        )
    if heads:
        problems.append(
            Problem(
                "target_modules",
                f"LoRA on {_few(heads)}: vLLM takes LoRA on the output head only for some model "
                "families and versions",
            )
        )

    if r is not None:
        problems += _rank_problems(cfg, int(r), modules, max_rank)
    return problems


def _rank_problems(
    cfg: dict[str, Any], r: int, modules: list[str], max_rank: int | None
) -> list[Problem]:
    out = []
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    ranks = {m: int(_pattern_value(rank_pattern, m, r)) for m in modules}
    top = max([r, *ranks.values()])
    cap = max_rank if max_rank is not None else VLLM_LORA_RANKS[-1]
    if top > cap:
        limit = "this server's max_lora_rank" if max_rank is not None else "what vLLM supports"
        key = "r" if r == top else "rank_pattern"
        out.append(Problem(key, f"rank {top} is above {limit} ({cap})"))
    alpha = cfg.get("lora_alpha", r)
    if not _number(alpha):
        return [*out, Problem("lora_alpha", f"{alpha!r} is not a number")]
    rslora = bool(cfg.get("use_rslora"))

    def scale(rank: float, a: float) -> float:
        return a / math.sqrt(rank) if rslora else a / rank

    uniform = scale(r, alpha)
    differ = [
        m
        for m in modules
        if not math.isclose(
            scale(ranks[m], float(_pattern_value(alpha_pattern, m, alpha))), uniform, rel_tol=1e-6
        )
    ]
    if differ:
        key = ", ".join(k for k in ("rank_pattern", "alpha_pattern") if cfg.get(k))
        out.append(
            Problem(
                key,
                f"{_few(differ)} have their own LoRA scale, but vLLM applies "
                f"lora_alpha/r = {uniform:g} to every module (outputs would be wrong)",
            )
        )
    return out


def _tensor_names(path: Path) -> list[str]:
    """Tensor names from a safetensors file's header, checked strictly (loft.core.safety)."""
    from loft.core.errors import IntegrityError
    from loft.core.safety import read_safetensors_header

    try:
        return list(read_safetensors_header(path))
    except IntegrityError as e:
        raise ValueError(e.message.split(": not a valid safetensors file: ", 1)[-1]) from None


def _modules(names: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(modules with LoRA A/B on linear layers, tensors vLLM would not load, output heads)."""
    modules: set[str] = set()
    odd, heads = [], set()
    for key in names:
        name = key.removeprefix(_PREFIX)
        for suffix in (".lora_A.weight", ".lora_B.weight"):
            if name.endswith(suffix):
                module = name.removesuffix(suffix)
                if module.rpartition(".")[2] in _HEAD_MODULES:
                    heads.add(module)
                else:
                    modules.add(module)
                break
        else:
            odd.append(key)
    return sorted(modules), odd, sorted(heads)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name or its suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _show(value: Any) -> str:
    return "true" if value is True else json.dumps(value)


def _few(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown if len(items) <= n else f"{shown} and {len(items) - n} more"


__all__ = ["VLLM_LORA_RANKS", "Problem", "vllm_problems"]
