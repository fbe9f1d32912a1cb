"""What `loft plan --list` shows: the preset models and the GPU catalogue, as plain rows."""

from __future__ import annotations

from typing import Any

from loft.planner.arch import get_preset, preset_info, preset_names
from loft.planner.hardware import gpu_catalogue


def model_rows() -> list[dict[str, Any]]:
    """One row per preset, in presets.yaml's order: its shape and its parameter count (computed
    from the shape, beside the published one)."""
    rows = []
    for name in preset_names():
        info, arch = preset_info(name), get_preset(name)
        rows.append(
            {
                "name": name,
                "aliases": list(info.get("aliases", [])),
                "hf_id": info.get("hf_id"),
                "params": arch.n_params,
                "published_params": info.get("published_params"),
                "layers": arch.num_layers,
                "hidden": arch.hidden_size,
                "heads": arch.num_heads,
                "kv_heads": arch.num_kv_heads,
                "intermediate": arch.intermediate_size,
                "vocab": arch.vocab_size,
                "experts": arch.num_experts,
                "model_type": arch.model_type,
            }
        )
    return rows


def gpu_rows() -> list[dict[str, Any]]:
    """One row per catalogue GPU (gpus.yaml), smallest usable memory first, then cheapest: the
    order `recommended_gpu` is chosen in."""
    gpus = sorted(gpu_catalogue().values(), key=lambda g: (g.usable_gib, g.on_demand_usd_h))
    return [
        {
            "key": g.key,
            "name": g.name,
            "memory_gb": g.memory_gb,
            "usable_gib": g.usable_gib,
            "bf16_tflops": g.bf16_tflops,
            "on_demand_usd_h": g.on_demand_usd_h,
            "spot_usd_h": g.spot_usd_h,
            "purchase_usd": g.purchase_usd,
            "power_kw": g.power_kw,
        }
        for g in gpus
    ]
