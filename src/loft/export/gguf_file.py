"""Write a merged Llama-family model as GGUF (llama.cpp, Ollama) with the ``gguf`` package's writer.

What llama.cpp needs that a safetensors folder does not say, done as llama.cpp's own
``convert_hf_to_gguf.py`` does for ``LlamaForCausalLM``:

- tensor names mapped to GGUF's (``gguf.get_tensor_name_map``), and the q/k projections' rows
  permuted from Hugging Face's rotate-half RoPE layout to the interleaved pairs llama.cpp rotates;
- the tokenizer: every token by id (byte-level BPE strings), special tokens typed CONTROL, the
  merges, bos/eos/pad ids, the chat template the model was trained with, and llama.cpp's name for
  the pre-tokenizer (``tokenizer.ggml.pre``: read from the base model's own GGUF when loft converted
  it from one, or ``--tokenizer-pre``);
- tensor types: ``f16`` / ``bf16`` / ``q8_0`` / ``q4_0`` for 2-D weights (pure-Python quantisation
  from ``gguf.quants``; a weight whose rows are not a multiple of the 32-value block stays f16),
  norms in f32. K-quants (q4_k_m, ...) are refused: they need llama.cpp's ``llama-quantize``.

After writing, :func:`read_back` re-reads the file (with ``gguf_scan``: the layout
``gguf.GGUFReader`` reads, without its per-element field views) and dequantises every tensor,
reporting the largest error per tensor type against the weights written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError

QUANTS = ("f16", "bf16", "q8_0", "q4_0")
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
ARCHITECTURES = ("LlamaForCausalLM",)
BLOCK = 32


@dataclass
class GgufReport:
    path: Path
    quant: str
    bytes: int
    tensors: int
    tensor_types: dict[str, int]
    max_error: dict[str, float]  # per tensor type: largest |dequantised - written weight|

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "quant": self.quant,
            "bytes": self.bytes,
            "tensors": self.tensors,
            "tensor_types": self.tensor_types,
            "max_error": self.max_error,
        }


def check_quant(quant: str) -> str:
    q = quant.lower()
    if q in K_QUANTS:
        raise ConfigError(
            f"--quant {quant}: K-quants choose their scales with llama.cpp's own quantizer "
            "(importance-weighted, no pure-Python implementation here)",
            hint=f"Export --quant f16, then run `llama-quantize model.gguf out.gguf {q.upper()}`.",
        )
    if q not in QUANTS:
        raise ConfigError(f"--quant {quant!r} is not one of {', '.join(QUANTS)}")
    return q


def tokenizer_pre(base_manifest: dict[str, Any], explicit: str | None) -> str:
    """llama.cpp's pre-tokenizer name: ``explicit``, else the base model's source GGUF's."""
    if explicit:
        return explicit
    src = (base_manifest.get("gguf") or {}).get("path")
    if src and Path(src).is_file():
        from loft.export.gguf_scan import scan

        pre = scan(Path(src)).fields.get("tokenizer.ggml.pre")
        if isinstance(pre, str):
            return pre
    raise ConfigError(
        "cannot tell llama.cpp's pre-tokenizer name for this model's tokenizer (its base was not "
        "converted from a GGUF that records it)",
        hint="Pass --tokenizer-pre NAME (llama.cpp's tokenizer.ggml.pre, e.g. llama-bpe, smollm).",
    )


def permute_rope(w: Any, n_head: int) -> Any:
    """Hugging Face's rotate-half row order -> llama.cpp's interleaved pairs (per head)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    model_dir: Path, dest: Path, quant: str, *, pre: str, name: str, say=lambda _m: None
) -> GgufReport:
    """``model_dir`` (a full HF Llama folder) -> ``dest`` (.gguf), written atomically, read back."""
    import gguf
    import numpy as np
    from safetensors import safe_open
    from transformers import AutoTokenizer

    quant = check_quant(quant)
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"GGUF export supports {', '.join(ARCHITECTURES)}; this model is {arch}",
            hint="Export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py.",
        )
    n_head, n_kv = (
        cfg["num_attention_heads"],
        cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
    )
    hidden, n_layer = cfg["hidden_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    tok = AutoTokenizer.from_pretrained(str(model_dir))

    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    try:
        w.add_name(name)
        w.add_context_length(cfg.get("max_position_embeddings", 2048))
        w.add_embedding_length(hidden)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
        if theta:
            w.add_rope_freq_base(float(theta))
        w.add_vocab_size(cfg["vocab_size"])
        w.add_file_type(
            {
                "f16": gguf.LlamaFileType.MOSTLY_F16,
                "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
            }[quant]
        )
        _add_tokenizer(w, tok, model_dir, cfg["vocab_size"], pre)

        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
        written: dict[str, Any] = {}
        files = sorted(model_dir.glob("*.safetensors"))
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    data = st.get_tensor(key).float().numpy()
                    if key.endswith("q_proj.weight"):
                        data = permute_rope(data, n_head)
                    elif key.endswith("k_proj.weight"):
                        data = permute_rope(data, n_kv)
                    new = names.get_name(key, try_suffixes=(".weight", ".bias"))
                    if new is None:
                        raise ConfigError(f"{f.name}: no GGUF name for tensor {key} ({arch})")
                    qtype, raw = _encode(data, quant, gguf, np)
                    w.add_tensor(new, raw, raw_dtype=qtype)
                    written[new] = data
        say(f"writing {dest.name} ({quant}, {len(written)} tensors)")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    types, errors = read_back(dest, written)
    return GgufReport(dest, quant, dest.stat().st_size, len(written), types, errors)


def _encode(data: Any, quant: str, gguf: Any, np: Any) -> tuple[Any, Any]:
    T = gguf.GGMLQuantizationType
    if data.ndim < 2:
        return T.F32, data.astype(np.float32)
    if quant == "f16" or (quant in ("q8_0", "q4_0") and data.shape[-1] % BLOCK):
        return T.F16, data.astype(np.float16)
    qtype = {"bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]
    return qtype, gguf.quants.quantize(data.astype(np.float32), qtype)


def _add_tokenizer(w: Any, tok: Any, model_dir: Path, vocab_size: int, pre: str) -> None:
    import gguf

    backend = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = backend.get("model") or {}
    decoder = (backend.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise ConfigError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and Llama 3 "
            f"use); this one is {model.get('type')} with a {decoder} decoder"
        )
    added = dict(tok.added_tokens_decoder)
    reverse = {i: t for t, i in tok.get_vocab().items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.chat_template = tok.chat_template  # the template the model was trained with
    special.add_to_gguf(w, quiet=True)


def read_back(path: Path, written: dict[str, Any]) -> tuple[dict[str, int], dict[str, float]]:
    """Every tensor of ``path`` dequantised and compared with what was written: counts and the
    largest absolute error per tensor type."""
    import numpy as np
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    from loft.export.gguf_scan import scan, tensor_data

    types: dict[str, int] = {}
    errors: dict[str, float] = {}
    seen = set()
    for t in scan(path).tensors:
        qtype = GGMLQuantizationType(t.type)
        kind = qtype.name
        values = dequantize(tensor_data(path, t), qtype).astype(np.float32)
        want = written[t.name]
        err = float(np.abs(values.reshape(want.shape) - want).max())
        types[kind] = types.get(kind, 0) + 1
        errors[kind] = max(errors.get(kind, 0.0), err)
        seen.add(t.name)
    missing = sorted(set(written) - seen)
    if missing:
        raise ConfigError(f"{path}: tensors missing after writing: {', '.join(missing[:5])}")
    return types, errors


__all__ = [
    "QUANTS",
    "GgufReport",
    "check_quant",
    "permute_rope",
    "read_back",
    "tokenizer_pre",
    "write_gguf",
]
