"""Load the base model for a method and make the right parameters trainable (PEFT for adapters)."""

from __future__ import annotations

from typing import Any

import torch

from loft.core.specs import TrainConfig
from loft.train.device import Placement


def build_model(config: TrainConfig, info: Any, placement: Placement) -> torch.nn.Module:
    from loft.models import load_causal_lm

    method = config.method
    kwargs: dict[str, Any] = {}
    dtype = torch.float32
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": 0}
        dtype = torch.bfloat16
    elif placement.device == "cuda" and method != "full" and placement.autocast_bf16:
        dtype = torch.bfloat16  # frozen base in bf16; PEFT keeps adapter weights in fp32
    model = load_causal_lm(info, dtype=dtype, **kwargs)
    if config.data.packing:
        from loft.train.attention import register

        model.set_attn_implementation(register())
    if method != "qlora":
        model.to(placement.device)
    model.config.use_cache = False
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=placement.gradient_checkpointing
        )
    elif placement.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "full":
        model.requires_grad_(True)
        return model
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


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
