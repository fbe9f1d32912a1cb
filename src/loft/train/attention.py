"""Per-example attention for packed rows (the varlen idea of flash-attn, on any device).

transformers handles a packed row on SDPA by building one block-diagonal L x L mask; with a mask,
SDPA on CPU takes its math path, which materialises the L x L attention weights per layer for
backward (for 8 packed chat examples of ~110 tokens: ~90 MB per layer, ~2.7 GB for SmolLM2's 30
layers) and computes attention for every pair of examples only to mask it away. Here each example
gets its own causal SDPA call with no mask, so the fused (flash) kernel runs and memory is per
example. Registered with transformers' AttentionInterface; the trainer selects it when packing.

On CUDA with flash-attn installed, the whole row is one ``flash_attn_varlen_func`` call (one
kernel launch per layer instead of one per example). The example boundaries travel twice: as the
int32 ``cu_seq_lens_q`` tensor on the device (what the varlen kernel reads) and as
``loft_seq_bounds``, a tuple of Python ints made by the collator on the CPU, which the per-example
path slices by. Reading boundaries out of a CUDA tensor (``.tolist()``) would stall the GPU in every
layer of every step.

A segment can also read a shared prefix placed earlier in the row (``loft_seq_prefix``: per
segment, ``(start, end)`` of its prefix or None): a preference pair is packed as prompt + chosen +
rejected, the rejected segment attending to the prompt's keys and values, so the prompt is fed
once per pair instead of twice. Such rows take the per-example path (varlen kernels have no
shared prefix).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

NAME = "loft_packed"
BOUNDS_KEY = "loft_seq_bounds"
PREFIX_KEY = "loft_seq_prefix"

_HALF = (torch.float16, torch.bfloat16)
_flash: list[Callable[..., torch.Tensor] | None] = []  # resolved once: the kernel, or None


def flash_varlen() -> Callable[..., torch.Tensor] | None:
    """flash-attn's varlen kernel when the package is installed (GPU extra), else None."""
    if not _flash:
        fn = None
        if importlib.util.find_spec("flash_attn") is not None:
            try:
                from flash_attn import flash_attn_varlen_func as fn
            except ImportError:  # installed for another torch/CUDA build: use SDPA instead
                fn = None
        _flash.append(fn)
    return _flash[0]


def use_flash(query: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """The varlen kernel for this call, or None: CUDA, fp16/bf16 inputs and flash-attn present."""
    if not query.is_cuda or query.dtype not in _HALF:
        return None
    return flash_varlen()


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [B, H, L, D], key/value [B, Hkv, L, D] -> output [B, L, H, D].

    With ``cu_seq_lens_q`` (cumulative example lengths of a B=1 packed row) attention is causal
    within each example only. Without it the row is one causal sequence; a padding mask is not
    supported here (the trainer uses SDPA for padded batches).
    """
    if attention_mask is not None:
        raise ValueError(f"{NAME} attention takes no mask; use 'sdpa' for padded batches")
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        out = F.scaled_dot_product_attention(
            query, key, value, dropout_p=p, scale=scaling, is_causal=True, enable_gqa=gqa
        )
        return out.transpose(1, 2).contiguous(), None
    prefixes = kwargs.get(PREFIX_KEY)
    flash = None if prefixes else use_flash(query)
    if flash is not None and query.shape[0] == 1:
        longest = kwargs.get("max_length_q")
        if longest is None:  # one sync; the trainer always passes it
            longest = int((cu[1:] - cu[:-1]).max())
        out = flash(
            query[0].transpose(0, 1),  # [L, H, D]
            key[0].transpose(0, 1),
            value[0].transpose(0, 1),
            cu_seqlens_q=cu,
            cu_seqlens_k=cu,
            max_seqlen_q=longest,
            max_seqlen_k=longest,
            dropout_p=p,
            softmax_scale=scaling,
            causal=True,
        )
        return out.unsqueeze(0), None
    bounds = kwargs.get(BOUNDS_KEY)
    if bounds is None:
        bounds = cu.tolist()  # a sync on CUDA: the trainer passes the CPU bounds instead
    segments = zip(bounds[:-1], bounds[1:], prefixes or [None] * (len(bounds) - 1), strict=True)
    parts = []
    for s, e, prefix in segments:
        q, k, v, mask = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None
        if prefix is not None:  # keys and values of the prefix, then the segment's own
            ps, pe = prefix
            k = torch.cat([key[:, :, ps:pe], k], dim=2)
            v = torch.cat([value[:, :, ps:pe], v], dim=2)
            mask = _after_prefix(e - s, pe - ps, query.device)
        parts.append(
            F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=p,
                scale=scaling,
                is_causal=mask is None,
                enable_gqa=gqa,
            )  # fmt: skip
        )
    out = torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _after_prefix(length: int, prefix: int, device: torch.device) -> torch.Tensor:
    """[length, prefix + length] bool: every query sees the whole prefix, then itself causally."""
    own = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    seen = torch.ones(length, prefix, dtype=torch.bool, device=device)
    return torch.cat([seen, own], dim=1)


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)
    return NAME
