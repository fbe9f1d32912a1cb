"""Export: merge adapters (one, or several by linear/cat/svd/ties/dare), write models for other
runtimes (hf, gguf with an Ollama Modelfile, gguf-lora), each verified, and runtime checks (vLLM).

Imports registry, models, data and core only; importing this package is cheap (torch, peft and
gguf load inside the functions that need them).
"""

from loft.export.check import NotServable, VllmReport, check_vllm
from loft.export.combine import CombineReport, combine_adapters, read_recipe
from loft.export.gguf_export import GgufExport, export_gguf, export_gguf_lora
from loft.export.hf import HfExport, export_hf
from loft.export.merge import MergeDrift, MergeReport, merge_adapter, resolve_adapter

__all__ = [
    "CombineReport",
    "GgufExport",
    "HfExport",
    "MergeDrift",
    "MergeReport",
    "NotServable",
    "VllmReport",
    "check_vllm",
    "combine_adapters",
    "export_gguf",
    "export_gguf_lora",
    "export_hf",
    "merge_adapter",
    "read_recipe",
    "resolve_adapter",
]
