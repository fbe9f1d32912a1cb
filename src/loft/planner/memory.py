"""Peak training memory per device and FLOPs per token, itemised. Pure arithmetic, no torch.

Every constant that is a judgement rather than a law of arithmetic is named here, in one place, so
the calibration suite can tune it against measured peaks; docs/planner.md gives the reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loft.core.errors import ConfigError
from loft.planner.arch import LINEAR_NAMES, TARGET_ALIASES, Arch, Linear
from loft.planner.settings import RunSettings

MIB = 1024**2
GIB = 1024**3

# --- overhead: calibrate against measured peaks -------------------------------------------------
CUDA_CONTEXT_BYTES = 1 * GIB  # CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers
CUDA_ALLOCATOR_FRACTION = 0.10  # caching-allocator fragmentation, share of everything else
# RSS of `loft train` with nothing of the model's size in memory: python + torch + transformers +
# datasets + tokenizer (~465 MiB measured before the model loads), peft (~40), the MLflow tracker
# (~105) and the kernels and thread stacks the first backward maps in (~30); measured on x86-64
# Linux, torch 2.13 CPU, with a 2-layer model whose weights and batches are a few MiB.
CPU_RUNTIME_BYTES = 640 * MIB
CPU_ALLOCATOR_FRACTION = 0.05  # glibc malloc slack, share of everything else
# glibc's dynamic mmap threshold: once PyTorch frees its first large tensor, blocks up to 32 MiB
# come from the heap, and the activations a step frees stay mapped there (the next step reuses only
# part of the space). Measured on SmolLM2-135M LoRA: RSS grows by ~1.6x the saved activations
# without checkpointing, and by the same amount with it (the forward still allocates every layer's
# intermediates); with MALLOC_MMAP_THRESHOLD_ fixed the excess disappears. Share of the
# un-checkpointed activations; gradients and optimizer states allocated later reuse that space.
CPU_HEAP_RETAINED_FRACTION = 0.62
# bf16 autocast on CPU over fp32 weights: every Linear weight is cast to bf16 in the forward and
# again for the backward, and with glibc's retention those copies stay mapped across steps. Fitted
# on SmolLM2-135M LoRA over 16 steps (peak grew ~1 GiB from step 3 to step 16 at 929 and 1835
# tokens per micro-batch, while fp32 runs stayed flat): 3 bf16 copies of the base weights.
CPU_AUTOCAST_WEIGHT_COPIES = 3

# --- activations ---------------------------------------------------------------------------------
NORM_SAVED_COPIES = 2  # an RMSNorm keeps its input and its normalised output (hidden-sized each)
MLP_SAVED_COPIES = 4  # SwiGLU keeps gate, up, silu(gate) and their product (intermediate-sized)
LOSS_FP32_COPIES = 2  # cross-entropy: fp32 upcast/log-softmax kept for backward, then its gradient
ATTN_SCORE_COPIES = 1  # CPU SDPA math path with a padding mask keeps softmax(QK^T): heads x s x s
LORA_INPUT_BYTES = 4  # PEFT feeds each adapter an fp32 copy of its input (cast or dropout)
DROPOUT_MASK_BYTES = 1  # lora_dropout > 0 keeps a bool mask of the input
DORA_OUTPUT_BYTES = 4  # DoRA keeps the base output (fp32) to rescale by the magnitude

# --- weights and states --------------------------------------------------------------------------
ADAPTER_BYTES = 4  # PEFT keeps LoRA/DoRA weights (and so their grads) in fp32
NF4_BYTES = 0.5  # 4-bit NF4 weight
NF4_BLOCK, DOUBLE_QUANT_BLOCK = 64, 256
# double quantisation: an 8-bit absmax per 64 weights, plus an fp32 scale per 256 absmaxes
QUANT_CONSTANT_BYTES = 1 / NF4_BLOCK + 4 / (NF4_BLOCK * DOUBLE_QUANT_BLOCK)
# loft's QLoRA recipe calls peft.prepare_model_for_kbit_training, which upcasts every parameter
# bitsandbytes did not quantise (embeddings, LM head, norms, biases) to fp32
QLORA_UNQUANTISED_BYTES = 4
# ... and so the activations those parameters produce are fp32 too, whatever the compute dtype: the
# embedding output, every residual (the checkpoint boundaries), every norm output (fp32 weight x
# fp32 input), and the outputs of the 4-bit projections fed by them, because bitsandbytes'
# Linear4bit computes in bf16 and returns its input's dtype (the MLP's gate, up, silu(gate) and
# product; MoE router logits). Attention is the exception: SDPA autocasts q, k, v to bf16 and
# keeps those, and its output (bf16) is what o_proj sees.
QLORA_ACTIVATION_BYTES = 4
MASTER_WEIGHT_BYTES = 4  # fp32 master copy for full fine-tuning with bf16/fp16 weights
# optimizer state per trainable parameter; adafactor is factored (rows + columns per matrix)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw-8bit": 2, "paged-adamw-8bit": 2, "sgd": 4}
FSDP_GATHERED_LAYERS = 2  # ZeRO-3/FSDP: the layer being computed plus the one prefetched

BREAKDOWN_KEYS = (
    "weights",
    "quant_constants",
    "trainable",
    "gradients",
    "optimizer",
    "activations",
    "logits",
    "overhead",
)


@dataclass(frozen=True)
class Estimate:
    """Peak memory of one device, itemised in bytes (``breakdown`` in BREAKDOWN_KEYS order)."""

    arch: Arch
    settings: RunSettings
    breakdown: dict[str, int]
    total_bytes: int
    n_params: int
    trainable_params: int
    flops_per_token: float
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total_bytes,
            "breakdown": dict(self.breakdown),
            "n_params": self.n_params,
            "trainable_params": self.trainable_params,
            "flops_per_token": self.flops_per_token,
            "notes": list(self.notes),
            "arch": self.arch.to_dict(),
            "settings": self.settings.to_dict(),
        }


def targeted_linears(arch: Arch, targets: str | tuple[str, ...]) -> list[Linear]:
    """The layer projections an adapter wraps. "all-linear" is every one but the MoE router."""
    mods = arch.linears()
    if targets == "all-linear":
        return [m for m in mods if m.name != "router"]
    known = set(LINEAR_NAMES) | set(TARGET_ALIASES) | {"router", "gate"}
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ConfigError(
            f"lora targets {unknown} are not projections the planner knows",
            hint=f"Use 'all-linear' or names from: {', '.join(sorted(known))}",
        )
    wanted: set[str] = set()
    for t in targets:
        wanted.update(TARGET_ALIASES.get(t, ("router",) if t == "gate" else (t,)))
    return [m for m in mods if m.name in wanted or wanted & set(m.covers)]


def _adapter_params(arch: Arch, mods: list[Linear], rank: int, dora: bool) -> tuple[int, int]:
    """(total, per-token active) adapter parameters over all layers."""
    total = active = 0
    for m in mods:
        per = rank * (m.in_features + m.out_features) + (m.out_features if dora else 0)
        total += per * m.count
        active += per * m.active
    return total * arch.num_layers, active * arch.num_layers


def _stream_bytes(s: RunSettings) -> int:
    """Bytes per element of the hidden states between the projections: the embedding output,
    residuals, norm outputs and MLP intermediates. The compute dtype's, except under QLoRA, whose
    unquantised parameters are fp32 (``QLORA_ACTIVATION_BYTES``)."""
    return QLORA_ACTIVATION_BYTES if s.method == "qlora" else s.compute_bytes


def _layer_activation_bytes(arch: Arch, s: RunSettings, mods: list[Linear]) -> float:
    """Bytes one decoder layer keeps for backward, per token position."""
    b, wide = s.compute_bytes, _stream_bytes(s)
    h, hd = arch.hidden_size, arch.head_dim
    k = min(arch.experts_per_token, arch.num_experts)
    elems = arch.norms_per_layer * NORM_SAVED_COPIES * h
    elems += MLP_SAVED_COPIES * arch.intermediate_size * k
    if arch.num_experts > 1:
        elems += 2 * arch.num_experts  # router logits and routing weights
    out = elems * wide
    # q, k, v (after RoPE) and the attention output, as attention keeps them: the compute dtype
    out += (2 * arch.num_heads + 2 * arch.num_kv_heads) * hd * b
    if s.device == "cpu" and not s.packing:
        out += ATTN_SCORE_COPIES * arch.num_heads * s.seq_len * b
    if s.adapters:
        if s.lora_dropout > 0:  # dropout makes a new fp32 input (and a mask) per module
            per_in = LORA_INPUT_BYTES + DROPOUT_MASK_BYTES
        else:  # a cast copy only when the compute dtype is not the adapter's
            per_in = LORA_INPUT_BYTES if b != ADAPTER_BYTES else 0
        for m in mods:
            per = m.in_features * per_in + s.lora_rank * ADAPTER_BYTES
            if s.method == "dora":
                per += m.out_features * DORA_OUTPUT_BYTES
            out += per * m.active
    return out


def _adafactor_bytes(arch: Arch, s: RunSettings, mods: list[Linear]) -> int:
    """Factored second moments: rows + columns per matrix, fp32."""
    if s.adapters:
        per_layer = sum(m.count * (2 * s.lora_rank + m.in_features + m.out_features) for m in mods)
        return 4 * arch.num_layers * per_layer
    per_layer = sum(m.count * (m.in_features + m.out_features) for m in arch.linears())
    per_layer += arch.layer_other_params
    matrices = (arch.vocab_size + arch.hidden_size) * (1 if arch.tie_embeddings else 2)
    return 4 * (arch.num_layers * per_layer + matrices + arch.hidden_size)


def flops_per_token(arch: Arch, s: RunSettings, trainable_active: int) -> float:
    """Executed FLOPs per trained token.

    N = weights a token multiplies through (active experts, LM head; not the embedding lookup);
    A = 4 * layers * heads * head_dim * seq_len, the forward attention score and mix FLOPs
    (PaLM's count, no causal discount). Full: 6N + 3A. Adapters on a frozen base: 4N (forward and
    input gradients, no weight gradients) + 6 * N_adapter + 3A. Checkpointing adds one more
    forward: + 2N (+ 2 * N_adapter) + A.
    """
    n = arch.matmul_params_per_token
    attn = 4 * arch.num_layers * arch.num_heads * arch.head_dim * s.seq_len
    if s.adapters:
        f = 4 * n + 6 * trainable_active + 3 * attn
        recompute = 2 * n + 2 * trainable_active + attn
    else:
        f = 6 * n + 3 * attn
        recompute = 2 * n + attn
    return float(f + (recompute if s.gradient_checkpointing else 0))


def estimate(arch: Arch, settings: RunSettings) -> Estimate:
    """Peak memory of one device for ``settings`` on ``arch``, itemised; see docs/planner.md."""
    s = settings
    n = arch.n_params
    notes: list[str] = []
    mods = targeted_linears(arch, s.lora_targets) if s.adapters else []
    if s.adapters and not mods:
        raise ConfigError(
            f"lora targets {list(s.lora_targets)} match no projection of this model",
            hint="Projections: " + ", ".join(m.name for m in arch.linears()),
        )
    wide = 2 if s.precision != "fp32" else 4
    quant = 0.0
    if s.method == "full":
        trainable, trainable_active = n, n
        weights = n * wide
        adapter = 0
        grads = n * wide
    else:
        trainable, trainable_active = _adapter_params(arch, mods, s.lora_rank, s.method == "dora")
        adapter = trainable * ADAPTER_BYTES
        grads = trainable * ADAPTER_BYTES
        if s.method == "qlora":
            q = arch.quantizable_params
            weights = q * NF4_BYTES + (n - q) * QLORA_UNQUANTISED_BYTES
            quant = q * QUANT_CONSTANT_BYTES
            if s.device == "cpu":
                notes.append("QLoRA needs a CUDA GPU (bitsandbytes NF4); it cannot run on CPU.")
        else:
            base = wide if s.device == "cuda" else 4  # loft loads the base in fp32 on CPU
            weights = n * base
    if s.optimizer == "adafactor":
        opt = float(_adafactor_bytes(arch, s, mods))
    else:
        opt = float(trainable * OPTIMIZER_STATE_BYTES[s.optimizer])
    if s.optimizer == "sgd":
        notes.append("sgd is budgeted with momentum (one fp32 buffer per trainable parameter).")
    if s.method == "full" and wide == 2:
        opt += trainable * MASTER_WEIGHT_BYTES
    fp32_base = weights >= 4 * n  # bf16 autocast on CPU casts it, every layer on every rank
    shards = s.n_gpus if s.zero_stage > 0 else 1
    gathered = 0.0
    if s.zero_stage == 3 and shards > 1:  # FSDP as loft runs it (train/distributed.shard_model):
        # each decoder layer sharded; embeddings, final norm and an untied LM head replicated
        per_layer = arch.layer_linear_params + arch.layer_other_params
        in_layers = arch.num_layers * per_layer / max(n, 1)

        def shard(total: float, share: float) -> float:
            return total * share / shards + total * (1 - share)

        gathered = FSDP_GATHERED_LAYERS * weights / max(n, 1) * per_layer
        share = 1.0 if s.adapters else in_layers  # adapters sit on the layers' projections
        weights, quant = shard(weights, in_layers), quant / shards  # NF4: layer linears only
        adapter, grads, opt = shard(adapter, share), shard(grads, share), shard(opt, share)
    else:
        if s.zero_stage >= 1:
            opt /= shards
        if s.zero_stage >= 2:
            grads /= shards
    weights += gathered

    tokens = s.tokens_per_micro_batch
    b, wide = s.compute_bytes, _stream_bytes(s)
    layer = _layer_activation_bytes(arch, s, mods)
    ends = 2 * tokens * arch.hidden_size * wide  # embedding output and final norm
    all_layers = arch.num_layers * tokens * layer + ends  # every layer's, as without checkpointing
    if s.gradient_checkpointing:  # each layer's input (the residual stream) + one layer recomputed
        acts = arch.num_layers * tokens * arch.hidden_size * wide + tokens * layer + ends
    else:
        acts = all_layers
    logits = tokens * s.logit_fraction * arch.vocab_size * (b + LOSS_FP32_COPIES * 4)

    parts = {
        "weights": weights,
        "quant_constants": quant,
        "trainable": adapter,
        "gradients": grads,
        "optimizer": opt,
        "activations": acts,
        "logits": logits,
    }
    subtotal = sum(parts.values())
    if s.device == "cuda":
        parts["overhead"] = CUDA_CONTEXT_BYTES + CUDA_ALLOCATOR_FRACTION * subtotal
    else:
        retained = CPU_HEAP_RETAINED_FRACTION * all_layers - (adapter + grads + opt)
        casts = CPU_AUTOCAST_WEIGHT_COPIES * 2 * n if s.precision == "bf16" and fp32_base else 0
        parts["overhead"] = (
            CPU_RUNTIME_BYTES + CPU_ALLOCATOR_FRACTION * subtotal + max(0.0, retained) + casts
        )
    breakdown = {k: int(round(parts[k])) for k in BREAKDOWN_KEYS}
    return Estimate(
        arch=arch,
        settings=s,
        breakdown=breakdown,
        total_bytes=sum(breakdown.values()),
        n_params=n,
        trainable_params=int(trainable),
        flops_per_token=flops_per_token(arch, s, trainable_active),
        notes=tuple(notes),
    )
