"""Plan before you spend: memory, hardware, time and cost of a fine-tune. Pure; never imports torch.

arch = resolve_arch("llama-3.1-8b")
est = estimate(arch, RunSettings(method="qlora", seq_len=2048, micro_batch=4))
plan = recommend(arch, est.settings, gpu="a100-80")
tc = time_and_cost(est, get_gpu("a100-80"), tokens=parse_tokens("50M"), epochs=3)
"""

from loft.planner.arch import (
    Arch,
    Linear,
    arch_from_config,
    arch_from_path,
    get_preset,
    preset_info,
    preset_names,
    resolve_arch,
)
from loft.planner.catalogue import gpu_rows, model_rows
from loft.planner.cost import TimeCost, parse_tokens, time_and_cost
from loft.planner.hardware import (
    CostDefaults,
    Fit,
    Gpu,
    Plan,
    Suggestion,
    cost_defaults,
    fit,
    fits_in,
    get_gpu,
    gpu_catalogue,
    recommend,
    smallest_fitting_gpu,
)
from loft.planner.memory import BREAKDOWN_KEYS, Estimate, estimate, flops_per_token
from loft.planner.settings import RunSettings, parse_targets, settings_from_train_config

__all__ = [
    "BREAKDOWN_KEYS",
    "Arch",
    "CostDefaults",
    "Estimate",
    "Fit",
    "Gpu",
    "Linear",
    "Plan",
    "RunSettings",
    "Suggestion",
    "TimeCost",
    "arch_from_config",
    "arch_from_path",
    "cost_defaults",
    "estimate",
    "fit",
    "fits_in",
    "flops_per_token",
    "get_gpu",
    "get_preset",
    "gpu_catalogue",
    "gpu_rows",
    "model_rows",
    "parse_targets",
    "parse_tokens",
    "preset_info",
    "preset_names",
    "recommend",
    "resolve_arch",
    "settings_from_train_config",
    "smallest_fitting_gpu",
    "time_and_cost",
]
