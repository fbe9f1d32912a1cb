"""Export: merge adapters into their base (verified against base + adapter) and runtime checks.

Imports registry, models, data and core only; importing this package is cheap (torch and peft
load inside the functions that need them).
"""

from loft.export.check import NotServable, VllmReport, check_vllm
from loft.export.combine import CombineReport, combine_adapters, read_recipe
from loft.export.merge import MergeDrift, MergeReport, merge_adapter, resolve_adapter

__all__ = [
    "CombineReport",
    "combine_adapters",
    "read_recipe",
    "MergeDrift",
    "MergeReport",
    "NotServable",
    "VllmReport",
    "check_vllm",
    "merge_adapter",
    "resolve_adapter",
]
