"""``loft export REF --format gguf | gguf-lora``: files llama.cpp and Ollama load.

``gguf``: the adapter merged into its base (verified like ``loft merge``) or a full version, as one
GGUF file (``loft.export.gguf_file``), with an Ollama Modelfile beside it (``loft.export.ollama``).
``gguf-lora``: the adapter alone as a llama.cpp LoRA GGUF, for use on the base model's GGUF
(``llama-cli -m base.gguf --lora adapter.gguf``; Ollama's ``ADAPTER``); its q/k ``lora_B`` rows are
permuted like the base's q/k weights. Each export writes ``<stem>.loft_card.json`` (lineage) and
``<stem>.sha256`` (``sha256sum -c`` format) beside its files; every file is written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError
from loft.core.paths import atomic_write_json
from loft.export.gguf_file import GgufReport, check_quant, permute_rope, tokenizer_pre, write_gguf
from loft.export.hf import prepared_model
from loft.export.merge import DEFAULT_TOLERANCE, Say, base_of, resolve_adapter
from loft.models.manifest import sha256_file


@dataclass
class GgufExport:
    ref: str
    format: str
    files: list[Path]
    gguf: GgufReport | None = None
    modelfile: Path | None = None
    modelfile_problem: str | None = None
    lora: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "format": self.format,
            "files": [str(f) for f in self.files],
            "gguf": self.gguf.to_dict() if self.gguf else None,
            "modelfile": str(self.modelfile) if self.modelfile else None,
            "modelfile_problem": self.modelfile_problem,
            "lora": self.lora or None,
        }


def _stem(ref: str, card: dict[str, Any]) -> str:
    name, version = card.get("name"), card.get("version")
    if name and version:
        return f"{name}-{version}"
    merged = card.get("merged_from") or {}
    if merged.get("name"):
        return f"{merged['name']}-{merged['version']}"
    return Path(str(ref)).expanduser().resolve().name or "model"


def _free(paths: list[Path]) -> None:
    taken = [str(p) for p in paths if p.exists()]
    if taken:
        raise ConfigError(
            f"{', '.join(taken)} already exist(s)",
            hint="Pass another --out folder, or remove them.",
        )


def export_gguf(
    ref: str,
    out_dir: Path,
    *,
    quant: str = "q8_0",
    tokenizer_pre_name: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    prompts_file: Path | None = None,
    say: Say = lambda _msg: None,
) -> GgufExport:
    from transformers import AutoTokenizer

    from loft.export.ollama import modelfile

    quant = check_quant(quant)
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with prepared_model(ref, "float32", tolerance, prompts_file, say, scratch_dir=out_dir) as prep:
        pre = tokenizer_pre(prep.base_manifest, tokenizer_pre_name)
        stem = f"{_stem(ref, prep.card)}.{quant}"
        gguf_path, mf_path = out_dir / f"{stem}.gguf", out_dir / f"{stem}.Modelfile"
        card_path, sums = out_dir / f"{stem}.loft_card.json", out_dir / f"{stem}.sha256"
        _free([gguf_path, mf_path, card_path, sums])
        out_dir.mkdir(parents=True, exist_ok=True)
        report = write_gguf(prep.folder, gguf_path, quant, pre=pre, name=stem, say=say)
        files = [gguf_path]
        result = GgufExport(str(ref), "gguf", files, report)
        try:
            text = modelfile(gguf_path.name, AutoTokenizer.from_pretrained(str(prep.folder)))
        except ConfigError as e:
            result.modelfile_problem = str(e)
            say(f"no Modelfile: {e}")
        else:
            _write_text(mf_path, text)
            files.append(mf_path)
            result.modelfile = mf_path
        atomic_write_json(card_path, prep.card)
        files.append(card_path)
    _write_sums(sums, files)
    files.append(sums)
    return result


def export_gguf_lora(
    ref: str, out_dir: Path, *, dtype: str = "f16", say: Say = lambda _msg: None
) -> GgufExport:
    """The adapter alone as llama.cpp's LoRA GGUF (``general.type = adapter``)."""
    import gguf
    import numpy as np

    from loft.models.memory import load_tensors, read_json

    if dtype not in ("f16", "f32"):
        raise ConfigError(f"--quant {dtype}: a GGUF LoRA is written as f16 or f32")
    adapter = resolve_adapter(ref)
    info = base_of(adapter)
    cfg = read_json(adapter.path / "adapter_config.json")
    problems = []
    if cfg.get("use_dora"):
        problems.append("DoRA (llama.cpp's LoRA has no magnitude vectors)")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']}")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias {cfg['bias']!r}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        problems.append("per-module rank or alpha patterns (one alpha per GGUF LoRA)")
    if problems:
        raise ConfigError(
            f"{adapter.label} cannot be a llama.cpp LoRA: {'; '.join(problems)}",
            hint=f"Export the merged model instead: `loft export {ref} --format gguf`.",
        )
    base_cfg = json.loads((Path(info.path) / "config.json").read_text(encoding="utf-8"))
    n_layer, n_head = base_cfg["num_hidden_layers"], base_cfg["num_attention_heads"]
    n_kv = base_cfg.get("num_key_value_heads") or n_head
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        alpha = alpha * r**0.5  # llama.cpp scales by alpha / r; rsLoRA by alpha / sqrt(r)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    label = adapter.label.replace(":", "-") if adapter.name else adapter.path.name
    out_dir = Path(out_dir).expanduser().resolve()
    stem = f"{Path(label).name}.lora-{dtype}"
    path, card_path, sums = (
        out_dir / f"{stem}{s}" for s in (".gguf", ".loft_card.json", ".sha256")
    )
    _free([path, card_path, sums])
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = load_tensors(adapter.path / "adapter_model.safetensors")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    count = 0
    try:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(stem)
        np_dtype = np.float16 if dtype == "f16" else np.float32
        for key in sorted(tensors):
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            a = tensors[key].float().numpy()
            b = tensors[key.replace(".lora_A.", ".lora_B.")].float().numpy()
            if module.endswith("q_proj"):
                b = permute_rope(b, n_head)
            elif module.endswith("k_proj"):
                b = permute_rope(b, n_kv)
            new = names.get_name(module + ".weight", try_suffixes=(".weight",))
            if new is None:
                raise ConfigError(f"{adapter.label}: no GGUF name for the LoRA target {module}")
            w.add_tensor(f"{new}.lora_a", a.astype(np_dtype))
            w.add_tensor(f"{new}.lora_b", b.astype(np_dtype))
            count += 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    say(f"wrote {path} ({count} LoRA modules, rank {r}, alpha {alpha:g})")
    card = {
        "adapter": adapter.to_dict(),
        "lineage": adapter.lineage,
        "base_model": {"name": info.name, "sha256": info.sha256},
        "lora": {"r": r, "alpha": alpha, "modules": count, "dtype": dtype},
    }
    atomic_write_json(card_path, card)
    _write_sums(sums, [path, card_path])
    return GgufExport(str(ref), "gguf-lora", [path, card_path, sums], lora=card["lora"])


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_sums(path: Path, files: list[Path]) -> None:
    _write_text(path, "".join(f"{sha256_file(f)}  {f.name}\n" for f in files))


__all__ = ["GgufExport", "export_gguf", "export_gguf_lora"]
