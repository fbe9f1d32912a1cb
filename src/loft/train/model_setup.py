"""Load the base model for a method and make the right parameters trainable (PEFT for adapters)."""

from __future__ import annotations

import math
from typing import Any

import torch

from loft.core.errors import ConfigError
from loft.core.specs import TrainConfig
from loft.models.memory import read_json
from loft.train.device import Placement


def load_dtypes(method: str, placement: Placement) -> tuple[torch.dtype, torch.dtype]:
    """(dtype the base is loaded in, compute dtype) for ``method`` under ``placement``.

    Trained weights stay fp32 (full fine-tuning keeps fp32 master weights under autocast; PEFT
    keeps adapters in fp32). A frozen base on a GPU is loaded in the compute dtype, bf16 or fp16
    (GPUs without native bf16); on a CPU in fp32, which autocast casts per matmul. QLoRA's 4-bit
    matmuls dequantise to the compute dtype.
    """
    compute = placement.autocast_dtype or torch.float32
    frozen_on_gpu = placement.device == "cuda" and method != "full"
    return (compute if frozen_on_gpu else torch.float32), compute


def init_version(config: TrainConfig, info: Any) -> Any:
    """The registered version ``init_from`` names (verified), checked against the method and
    the base model; None without init_from."""
    if not config.init_from:
        return None
    from loft.registry import get_version

    mv = get_version(config.init_from)
    kind = mv.card.get("kind")
    label = f"init_from {mv.name}:{mv.version}"
    adapters = config.method != "full"
    if adapters and kind != "adapter":
        raise ConfigError(
            f"{label} is a full model, and method {config.method} trains an adapter on base_model.",
            hint=f"Set base_model to the full model's folder ({mv.path}) and drop init_from, or "
            "use method full.",
        )
    if not adapters and kind != "full":
        raise ConfigError(
            f"{label} is an adapter; method full continues a full model.",
            hint="Use method lora or dora to continue the adapter, or merge it first.",
        )
    base = (mv.card.get("lineage") or {}).get("base_model") or {}
    if adapters and base.get("sha256") and info.sha256 and base["sha256"] != info.sha256:
        raise ConfigError(
            f"{label} was trained on {base.get('name')} (sha256 {str(base['sha256'])[:12]}), "
            f"not on base_model {info.name} (sha256 {str(info.sha256)[:12]}).",
            hint=f"Set base_model: {base.get('name')}",
        )
    if adapters:
        dora = bool(read_json(mv.path / "adapter_config.json").get("use_dora"))
        if dora != (config.method == "dora"):
            have, want = ("dora" if dora else "lora"), config.method
            raise ConfigError(
                f"{label} is a {have} adapter, and method is {want}.",
                hint=f"Set method: {have} to continue it.",
            )
    return mv


def build_model(
    config: TrainConfig, info: Any, placement: Placement, init: Any = None
) -> torch.nn.Module:
    """The model to train: the base (or ``init``, a registered full model) with a fresh adapter,
    or ``init``'s adapter loaded trainable (its own rank, alpha and targets)."""
    from loft.models import load_causal_lm

    if init is not None and init.card.get("kind") == "full":
        from dataclasses import replace

        info = replace(info, path=init.path)
    method = config.method
    kwargs: dict[str, Any] = {}
    dtype, compute = load_dtypes(method, placement)
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": 0}
    model = load_causal_lm(info, dtype=dtype, **kwargs)
    if config.data.packing:
        from loft.train.attention import register

        model.set_attn_implementation(register())
    if method != "qlora":
        model.to(placement.device)
    model.config.use_cache = False
    if method == "qlora":
        model = prepare_kbit(model, placement)
    elif placement.gradient_checkpointing:
        enable_checkpointing(model)
    if method == "full":
        model.requires_grad_(True)
        return model
    if init is not None:  # decrypted in memory when the version is encrypted at rest
        from loft.models.memory import load_peft

        return load_peft(model, init.path, is_trainable=True)
    from peft import LoraConfig, get_peft_model

    lcfg = config.lora
    peft_config = LoraConfig(
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=lcfg.target_modules,
        use_dora=method == "dora",
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, peft_config)


# Non-reentrant checkpointing: the reentrant mode needs inputs that require grad (PEFT's hook),
# breaks with unused parameters and is deprecated; torch warns when the choice is left implicit.
CHECKPOINT_KWARGS = {"use_reentrant": False}


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing, non-reentrant (transformers 5.x renamed the method)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))


def prepare_kbit(model: torch.nn.Module, placement: Placement) -> torch.nn.Module:
    """PEFT's k-bit preparation (freeze, upcast the unquantised parameters to fp32), with the
    checkpointing mode passed explicitly: given no kwargs, PEFT passes ``{}`` on to transformers,
    whose ``use_reentrant=False`` default then never applies, and torch falls to the reentrant
    mode with a warning that it will become an error."""
    import warnings

    from peft import prepare_model_for_kbit_training

    with warnings.catch_warnings():  # PEFT calls transformers 5's deprecated alias; not ours
        warnings.filterwarnings("ignore", "`gradient_checkpointing_enable` is deprecated")
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=placement.gradient_checkpointing,
            gradient_checkpointing_kwargs=dict(CHECKPOINT_KWARGS),
        )


def param_count(p: torch.Tensor) -> int:
    """Elements a parameter stands for: a bitsandbytes 4-bit parameter stores two weights per
    byte (``numel`` counts the packed bytes); its quant_state keeps the unpacked shape."""
    qs = getattr(p, "quant_state", None)
    shape = getattr(qs, "shape", None)
    if shape is not None:
        return math.prod(shape)
    if getattr(p, "bnb_quantized", False):  # packed into quant_storage elements (uint8 default)
        return p.numel() * 2 * p.element_size()
    return p.numel()


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(param_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(param_count(p) for p in model.parameters())
    return trainable, total
