"""Many LoRA/DoRA adapters resident over one base model; each row of a batch picks its own.

Every targeted ``nn.Linear`` is wrapped once. The wrapper keeps all resident adapters stacked in
slots: ``A`` as ``[slots * r, in]`` and ``B`` (pre-multiplied by the adapter's scaling) as
``[slots * r, out]``. A forward computes ``x @ A_all.T`` for every slot at once, zeroes the columns
that belong to other rows' adapters with a per-row mask, and adds ``(..) @ B_all`` to the base
output — two dense matmuls per layer, no per-adapter Python loop and no weight copies. Only slots
up to the highest one the batch uses are computed (the cache fills the lowest free slot first).
Slot 0 means "no adapter" and is never computed, so base-model rows get an exact zero delta.

PEFT's own mixed-adapter batches (``adapter_names=``) loop over adapters inside every layer; on
SmolLM2-135M with 8 adapters in a batch of 16 they ran at 0.45x base-model throughput on CPU (see
bench/serve_throughput.py for the figures of this implementation).

DoRA: ``y = m / ||W + s·BA||_row ⊙ (x Wᵀ + s·x Aᵀ Bᵀ)`` (+ bias). The per-row norm depends only on
weights, so it is computed once at load time and applied as a per-slot output scale.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loft.core.errors import ConfigError, NotFoundError

_PREFIX = "base_model.model."
# PEFT features that change more than Linear layers; an adapter using them cannot be served here.
_UNSUPPORTED = {
    "modules_to_save": "trains full copies of some modules (modules_to_save)",
    "trainable_token_indices": "trains token embeddings (trainable_token_indices)",
    "lora_bias": "trains a bias in the LoRA B matrix (lora_bias)",
    "fan_in_fan_out": "uses fan_in_fan_out (Conv1D layers)",
    "layer_replication": "replicates layers (layer_replication)",
    "target_parameters": "targets raw parameters (target_parameters)",
    "use_qalora": "is QA-LoRA, which pools the adapter's input (use_qalora)",
    "alora_invocation_tokens": "is an activated LoRA, on only after given tokens (aLoRA)",
}


@dataclass
class ModuleDelta:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r], already multiplied by the scaling
    magnitude: torch.Tensor | None = None  # DoRA: [out]


@dataclass
class AdapterWeights:
    """One adapter read from a PEFT folder, ready to copy into a slot."""

    modules: dict[str, ModuleDelta]
    rank: int
    dora: bool


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name or its suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(folder: Path, *, label: str) -> AdapterWeights:
    """Read a PEFT adapter folder; refuse what mixed-adapter serving cannot run."""
    from loft.models.memory import load_tensors, read_json

    cfg_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights_path.is_file():
        raise NotFoundError(
            f"{label}: {folder} is not a PEFT adapter (needs adapter_config.json and "
            "adapter_model.safetensors).",
            hint="Serve registered adapters; a full fine-tune is served as base_model instead.",
        )
    cfg = read_json(cfg_path)  # decrypted in memory when encrypted at rest
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(
            f"{label}: adapter type {cfg.get('peft_type')!r} cannot be served; loft serves LoRA "
            "and DoRA adapters.",
            hint="Train with method lora or dora.",
        )
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ConfigError(
                f"{label}: the adapter {what}; mixed-adapter serving supports adapters on Linear "
                "layers only.",
                hint="Merge it into a full model (`loft eval` loads such adapters merged) or "
                "retrain without that option.",
            )
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    rslora, dora = bool(cfg.get("use_rslora")), bool(cfg.get("use_dora"))
    tensors = load_tensors(weights_path)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = key.removeprefix(_PREFIX)
        for suffix, part in (
            (".lora_A.weight", "a"),
            (".lora_B.weight", "b"),
            (".lora_magnitude_vector.weight", "m"),
            (".lora_magnitude_vector", "m"),
        ):
            if name.endswith(suffix):
                modules.setdefault(name.removesuffix(suffix), {})[part] = value
                break
        else:
            raise ConfigError(
                f"{label}: unexpected tensor {key!r} in {weights_path.name}; only LoRA A/B "
                "matrices (and DoRA magnitudes) of Linear layers can be served.",
                hint="Embedding LoRA and extra trained modules are not supported by loft serve.",
            )
    out: dict[str, ModuleDelta] = {}
    max_rank = 0
    for module, parts in sorted(modules.items()):
        if "a" not in parts or "b" not in parts:
            raise ConfigError(f"{label}: {module} has only part of its LoRA weights.")
        a, b = parts["a"], parts["b"]
        mr = int(_pattern_value(cfg.get("rank_pattern") or {}, module, r))
        ma = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha))
        if a.shape[0] != mr or b.shape[1] != mr:
            raise ConfigError(
                f"{label}: {module} has rank {a.shape[0]} but its config says {mr}.",
                hint="The adapter files are inconsistent; re-save the adapter.",
            )
        scale = ma / math.sqrt(mr) if rslora else ma / mr
        out[module] = ModuleDelta(a=a.float(), b=b.float() * scale, magnitude=parts.get("m"))
        max_rank = max(max_rank, mr)
    if not out:
        raise ConfigError(f"{label}: the adapter has no LoRA weights.")
    return AdapterWeights(out, max_rank, dora)


class RowState:
    """Which slot each row of the current batch uses; set by the engine before every forward."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None  # [batch] long, 0 = no adapter
        self.hi = 0  # highest slot any row uses: slots above it are not computed
        self.any_dora = False
        self._masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    @property
    def any_adapter(self) -> bool:
        return self.hi > 0

    def set(self, slots: list[int], *, dora_slots: set[int], device: torch.device) -> None:
        self.slots = torch.tensor(slots, dtype=torch.long, device=device)
        self.hi = max(slots, default=0)
        self.any_dora = any(s in dora_slots for s in slots)
        self._masks.clear()

    def mask(self, rank: int, dtype: torch.dtype) -> torch.Tensor:
        """[batch, 1, hi * rank]: 1 on the columns of each row's own slot (slots 1..hi)."""
        assert self.slots is not None
        key = (rank, self.slots.device)
        m = self._masks.get(key)
        if m is None or m.dtype != dtype:
            cols = torch.arange(rank, (self.hi + 1) * rank, device=self.slots.device) // rank
            m = (cols[None, :] == self.slots[:, None]).to(dtype)[:, None, :]
            self._masks[key] = m
        return m


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, n_slots: int, rank: int, state: RowState) -> None:
        super().__init__()
        self.base = base
        self.state = state
        self.n_slots = n_slots
        w = base.weight
        like = {"dtype": w.dtype, "device": w.device}  # the stacks live beside the base weights
        self.register_buffer("a", torch.zeros(n_slots * rank, w.shape[1], **like), False)
        self.register_buffer("b", torch.zeros(n_slots * rank, w.shape[0], **like), False)
        self.register_buffer("m", torch.ones(n_slots, w.shape[0], **like), False)
        self.rank = rank
        self.filled: set[int] = set()
        self.dora: set[int] = set()

    def grow(self, rank: int) -> None:
        """Re-lay the stacks for a larger rank (zero-padded: exact for the smaller adapters)."""
        if rank <= self.rank:
            return
        a = self.a.new_zeros(self.n_slots, rank, self.a.shape[1])
        b = self.b.new_zeros(self.n_slots, rank, self.b.shape[1])
        a[:, : self.rank] = self.a.view(self.n_slots, self.rank, -1)
        b[:, : self.rank] = self.b.view(self.n_slots, self.rank, -1)
        self.a, self.b, self.rank = a.view(-1, a.shape[-1]), b.view(-1, b.shape[-1]), rank

    def fill(self, slot: int, delta: ModuleDelta) -> None:
        w = self.base.weight
        r = delta.a.shape[0]
        if delta.a.shape[1] != w.shape[1] or delta.b.shape[0] != w.shape[0]:
            raise ConfigError(
                f"LoRA shapes A{tuple(delta.a.shape)} B{tuple(delta.b.shape)} do not fit a "
                f"Linear of shape {tuple(w.shape)}: the adapter was made for another model."
            )
        self.grow(r)
        rows = slice(slot * self.rank, (slot + 1) * self.rank)
        self.a[rows].zero_()
        self.b[rows].zero_()
        self.a[rows][:r] = delta.a.to(w.device, w.dtype)
        self.b[rows][:r] = delta.b.t().to(w.device, w.dtype)
        self.m[slot] = 1.0
        if delta.magnitude is not None:
            full = w.float() + (delta.b.to(w.device) @ delta.a.to(w.device)).float()
            norm = torch.linalg.norm(full, dim=1)
            self.m[slot] = (delta.magnitude.to(w.device).float() / norm).to(w.dtype)
            self.dora.add(slot)
        self.filled.add(slot)

    def clear(self, slot: int) -> None:
        rows = slice(slot * self.rank, (slot + 1) * self.rank)
        self.a[rows].zero_()
        self.b[rows].zero_()
        self.m[slot] = 1.0
        self.filled.discard(slot)
        self.dora.discard(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if not st.any_adapter or not self.filled:
            return self.base(x)
        rows = slice(self.rank, (st.hi + 1) * self.rank)  # slots 1..hi: views, never copies
        delta = ((x @ self.a[rows].t()) * st.mask(self.rank, x.dtype)) @ self.b[rows]
        if st.any_dora and self.dora:
            y = nn.functional.linear(x, self.base.weight)
            scale = self.m[st.slots][:, None, :]
            y = (y + delta) * scale
            return y if self.base.bias is None else y + self.base.bias
        return self.base(x) + delta


class MultiLora:
    """The wrapped model and its slots (1..capacity; 0 means "no adapter")."""

    def __init__(self, model: nn.Module, capacity: int) -> None:
        self.model = model
        self.n_slots = capacity + 1
        self.state = RowState()
        self.layers: dict[str, MultiLoraLinear] = {}
        self.dora_slots: set[int] = set()

    def _layer(self, name: str, rank: int, label: str) -> MultiLoraLinear:
        layer = self.layers.get(name)
        if layer is not None:
            return layer
        try:
            module = self.model.get_submodule(name)
        except AttributeError:
            raise ConfigError(
                f"{label}: targets module {name!r}, which the base model does not have: the "
                "adapter was made for another model architecture."
            ) from None
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"{label}: {name} is a {type(module).__name__}, not a Linear layer.")
        parent_name, _, child = name.rpartition(".")
        layer = MultiLoraLinear(module, self.n_slots, rank, self.state)
        setattr(self.model.get_submodule(parent_name), child, layer)
        self.layers[name] = layer
        return layer

    def check(self, weights: AdapterWeights, *, label: str) -> None:
        """Refuse an adapter whose modules or shapes do not belong to this base model."""
        for name, delta in weights.modules.items():
            try:
                module = self.layers[name].base if name in self.layers else None
                module = module or self.model.get_submodule(name)
            except AttributeError:
                raise ConfigError(
                    f"{label}: targets module {name!r}, which the base model does not have: the "
                    "adapter was made for another model architecture."
                ) from None
            w = getattr(module, "weight", None)
            if w is None or w.dim() != 2 or tuple(w.shape) != (delta.b.shape[0], delta.a.shape[1]):
                raise ConfigError(
                    f"{label}: {name} expects a weight of shape "
                    f"{(delta.b.shape[0], delta.a.shape[1])}, the base model has "
                    f"{None if w is None else tuple(w.shape)}: the adapter was made for "
                    "another base model."
                )

    def load(self, slot: int, weights: AdapterWeights, *, label: str) -> None:
        self.check(weights, label=label)
        for name, delta in weights.modules.items():
            self._layer(name, weights.rank, label).fill(slot, delta)
        if weights.dora:
            self.dora_slots.add(slot)

    def unload(self, slot: int) -> None:
        for layer in self.layers.values():
            if slot in layer.filled:
                layer.clear(slot)
        self.dora_slots.discard(slot)

    def set_rows(self, slots: list[int], device: torch.device) -> None:
        self.state.set(slots, dora_slots=self.dora_slots, device=device)
