"""Tiny random-weight Llama models with the real SmolLM2 tokenizer, for fast tests on CPU.

They share SmolLM2's vocabulary, special tokens and chat template, so every data, training and
serving path runs end to end in seconds; only the weights are random (seeded, deterministic).
"""

from __future__ import annotations

from pathlib import Path

from loft.core.errors import ConfigError
from loft.core.paths import atomic_dir
from loft.models.builtin import builtin_tokenizer, builtin_tokenizer_dir
from loft.models.manifest import MANIFEST, write_manifest

__all__ = ["builtin_tokenizer", "builtin_tokenizer_dir", "make_random_lora", "make_tiny_model"]


def make_tiny_model(
    dest: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 2048,
) -> Path:
    """Write a random-weight LlamaForCausalLM + SmolLM2 tokenizer into ``dest`` and return it.

    The directory is built in a temp dir and renamed; MANIFEST.json (written last) marks it
    complete, and an existing complete ``dest`` is returned as is.
    """
    dest = Path(dest)
    if (dest / MANIFEST).is_file():
        return dest
    if dest.exists():
        raise ConfigError(
            f"{dest} exists but is not a complete tiny model (no {MANIFEST})",
            hint=f"Remove it with `rm -rf {dest}` or choose another destination.",
        )
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = builtin_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rope_theta=100000.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    tok.model_max_length = max_position_embeddings
    try:
        with atomic_dir(dest) as tmp:
            model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            write_manifest(
                tmp,
                name=dest.name,
                source="tiny",
                extra={"seed": seed, "tokenizer": str(builtin_tokenizer_dir())},
            )
    except OSError:
        if not (dest / MANIFEST).is_file():  # another process published it meanwhile: use theirs
            raise
    return dest


def make_random_lora(folder: Path, info, *, r: int = 8, seed: int = 0, b_std: float = 0.01) -> Path:
    """A PEFT LoRA (all-linear, alpha 2r) on the model ``info`` with random A and B ~ N(0, b_std),
    saved as loft's trainer saves one (safetensors, tokenizer, lineage.json naming the base and its
    sha256). A small ``b_std`` moves the logits without breaking the language: for export and
    merge checks that compare greedy outputs across runtimes."""
    import torch
    from peft import LoraConfig, get_peft_model

    from loft.core.paths import atomic_write_json
    from loft.models.store import load_causal_lm, load_tokenizer

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(load_causal_lm(info), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std)
    model.save_pretrained(str(folder))
    load_tokenizer(info).save_pretrained(str(folder))
    base = {"name": info.name, "sha256": info.sha256, "source": info.source}
    atomic_write_json(Path(folder) / "lineage.json", {"base_model": base})
    return Path(folder)
