"""Base-model store: resolve a reference to a verified local HF directory; tiny test models."""

from loft.models.builtin import BUILTIN_NAME, builtin_tokenizer
from loft.models.store import (
    ModelInfo,
    add_model,
    describe_model,
    list_models,
    load_causal_lm,
    load_tokenizer,
    remove_model,
    resolve_adapter_base,
    resolve_model,
    validate_name,
)

__all__ = [
    "BUILTIN_NAME",
    "ModelInfo",
    "add_model",
    "builtin_tokenizer",
    "describe_model",
    "list_models",
    "load_causal_lm",
    "load_tokenizer",
    "remove_model",
    "resolve_adapter_base",
    "resolve_model",
    "validate_name",
]
