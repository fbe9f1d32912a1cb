"""Training recipes. ``train(config)`` runs supervised fine-tuning (full / lora / dora / qlora)."""

from loft.train.sft import RunResult, train

__all__ = ["RunResult", "train"]
