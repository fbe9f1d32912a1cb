"""Resolve a model reference to a verified local Hugging Face directory, list and add models.

A reference is one of:
  1. the builtin name ``smollm2-135m-instruct`` (converted once from its GGUF),
  2. a name added with ``loft models add`` (LOFT_HOME/models/<name>, with MANIFEST.json),
  3. a local directory with config.json and *.safetensors weights,
  4. a hub id ``org/name`` that is already in the local Hugging Face cache (never downloaded).

Only safetensors weights are ever loaded: pickle checkpoints (*.bin, *.pt) can run code on load.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError, HardwareError, IntegrityError, NotFoundError
from loft.core.paths import atomic_dir, models_dir, remove_dir
from loft.models.builtin import BUILTIN_NAME, builtin_dir, ensure_builtin, reconvert_hint
from loft.models.manifest import (
    MANIFEST,
    PICKLE_SUFFIXES,
    combined_digest,
    hash_weights,
    list_files,
    pickle_files,
    read_manifest,
    safetensors_params,
    verify_manifest,
    weight_files,
    write_manifest,
)
from loft.models.memory import read_json

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
REFERENCE_KINDS = (
    f"  - a model name: {BUILTIN_NAME} (builtin) or one added with `loft models add`\n"
    "  - a local directory with config.json and *.safetensors weights\n"
    "  - a hub id org/name that is already in the local Hugging Face cache"
)


@dataclass(frozen=True)
class ModelInfo:
    """A resolved base model: a local HF-format directory and the digests of its weights."""

    name: str
    path: Path
    source: str  # "builtin" | "local" | "hf-cache" | "added"
    sha256: str
    files: dict[str, str] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "source": self.source,
            "sha256": self.sha256,
            "files": dict(self.files),
        }


def resolve_model(ref: str, *, verify: bool = True) -> ModelInfo:
    """Resolve ``ref`` to a local model directory; with ``verify`` recheck the weights' sha256."""
    ref = str(ref).strip()
    if not ref:
        raise _unknown(ref)
    if ref == BUILTIN_NAME:
        path = ensure_builtin()
        return _from_store(BUILTIN_NAME, path, "builtin", verify, hint=reconvert_hint(path))
    stored = models_dir() / ref
    if NAME_RE.match(ref) and ".." not in ref and stored.is_dir():
        return _from_store(ref, stored, "added", verify, hint=_readd_hint(stored, ref))
    local = Path(ref).expanduser()
    if local.exists():
        return _from_local(str(local.resolve()), local.resolve(), "local", verify)
    if HUB_ID_RE.match(ref) and not ref.startswith("."):
        return _from_hf_cache(ref, verify)
    raise _unknown(ref)


def resolve_adapter_base(
    label: str, name: str | None, sha256: str | None, adapter_dir: Path, *, hint: str
) -> ModelInfo:
    """The base model adapter ``label`` was trained on: ``name`` from its lineage, else
    ``adapter_config.json``'s ``base_model_name_or_path``; refused by name when that model's
    weights are not the recorded ``sha256`` (using it would build a different model). ``hint``
    says what to do about a mismatch for the caller's purpose."""
    if not name:
        name = read_json(Path(adapter_dir) / "adapter_config.json").get("base_model_name_or_path")
    if not name:
        raise ConfigError(
            f"{label}: cannot tell which base model this adapter belongs to (no base_model in "
            "its lineage, no base_model_name_or_path in adapter_config.json)",
            hint="Add base_model_name_or_path to adapter_config.json, or register the adapter "
            "from its run dir (`loft registry register PATH`).",
        )
    info = resolve_model(str(name))
    if sha256 and sha256 != info.sha256:
        raise IntegrityError(
            f"adapter {label} was trained on base model {name} with weights sha256 "
            f"{sha256[:12]}…, but {name} now resolves to {info.path} with sha256 "
            f"{info.sha256[:12]}…",
            hint=hint,
        )
    return info


def _from_store(name: str, path: Path, source: str, verify: bool, *, hint: str) -> ModelInfo:
    manifest = read_manifest(path, hint=hint)
    if manifest is None:
        raise IntegrityError(
            f"{path} has no {MANIFEST}: it is incomplete or was not written by loft", hint=hint
        )
    if verify:
        files = verify_manifest(path, manifest, hint=hint)
    else:
        files = {rel: sha for rel, sha in manifest["files"].items() if rel in manifest["weights"]}
    if not files:
        raise IntegrityError(f"{path}/{MANIFEST} lists no *.safetensors weight files", hint=hint)
    return ModelInfo(name, path, source, combined_digest(files), files)


def _from_local(name: str, path: Path, source: str, verify: bool) -> ModelInfo:
    where = "Hugging Face cache entry" if source == "hf-cache" else "directory"
    if not path.is_dir():
        raise NotFoundError(
            f"{path} is a file, not a model directory",
            hint="Pass the directory that holds config.json and *.safetensors, "
            "or a name from `loft models list`.",
        )
    if not (path / "config.json").is_file():
        raise NotFoundError(
            f"{where} {path} has no config.json, so it is not a Hugging Face model directory "
            f"(found: {', '.join(sorted(p.name for p in path.iterdir())[:8]) or 'nothing'})",
            hint="Point at the directory written by `save_pretrained`, or see `loft models list`.",
        )
    if not weight_files(path):
        pickles = pickle_files(path)
        if pickles:
            raise NotFoundError(
                f"{where} {path} has only pickle weights ({', '.join(pickles)}) and no "
                "*.safetensors; loft loads only safetensors because pickle files can run code "
                "when loaded",
                hint=(
                    'If you trust the files, convert them once: `python -c "from transformers '
                    "import AutoModelForCausalLM as M; "
                    f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\"` "
                    f"then `loft models add {path}-safetensors --name NAME`."
                ),
            )
        raise NotFoundError(
            f"{where} {path} has config.json but no *.safetensors weight files",
            hint="Save the model with `model.save_pretrained(dir)` (safetensors is the default).",
        )
    hint = f"Re-create or re-copy {path}; it no longer matches its {MANIFEST}."
    manifest = read_manifest(path, hint=hint)
    if manifest is not None and verify:
        files = verify_manifest(path, manifest, hint=hint)
    elif manifest is not None:  # verify=False: trust what the manifest recorded
        files = {rel: sha for rel, sha in manifest["files"].items() if rel in manifest["weights"]}
    else:
        files = hash_weights(path)
    return ModelInfo(name, path, source, combined_digest(files), files)


def _hf_home() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HOME)


def _from_hf_cache(ref: str, verify: bool) -> ModelInfo:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(ref, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        raise NotFoundError(
            f"'{ref}' is not in the local Hugging Face cache (HF_HOME={_hf_home()}) and loft "
            "never downloads at run time",
            hint=(
                f"On a connected machine run `huggingface-cli download {ref}`, copy the cache "
                "here, or `loft models add /path/to/dir --name NAME`."
            ),
        ) from None
    return _from_local(ref, snapshot, "hf-cache", verify)


def _available_names() -> list[str]:
    return [m["name"] for m in list_models()]


def _unknown(ref: str) -> NotFoundError:
    names = ", ".join(_available_names())
    return NotFoundError(
        f"no model '{ref}': it is not a known model name, an existing directory, or a hub id "
        f"(org/name).\nAvailable models: {names}\nA model reference is one of:\n{REFERENCE_KINDS}",
        hint="See them with `loft models list`, or add one with "
        "`loft models add /path/to/dir --name NAME`.",
    )


def _readd_hint(path: Path, name: str) -> str:
    return (
        f"Remove it with `rm -rf {path}` and add it again: `loft models add SRC_DIR --name {name}`."
    )


def _store_entry(name: str, path: Path, source: str) -> dict[str, Any]:
    manifest: dict[str, Any] | None
    try:
        manifest = read_manifest(path, hint="")
    except IntegrityError:
        manifest = None
    complete = manifest is not None
    return {
        "name": name,
        "source": source,
        "path": str(path),
        "converted": complete,
        "params": safetensors_params(path) if complete else None,
        "size_bytes": sum((path / r).stat().st_size for r in weight_files(path))
        if complete
        else None,
        "sha256": manifest.get("sha256") if manifest else None,
    }


def list_models() -> list[dict[str, Any]]:
    """The builtin model (converted or not) and every model added with ``add_model``.

    Cheap: reads manifests and safetensors headers only; nothing is hashed or loaded.
    """
    out = [_store_entry(BUILTIN_NAME, builtin_dir(), "builtin")]
    root = models_dir()
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or d.name == BUILTIN_NAME or not d.is_dir():
            continue
        if (d / MANIFEST).is_file():
            out.append(_store_entry(d.name, d, "added"))
    return out


def validate_name(name: str) -> str:
    """A model name: lowercase letters, digits, '.', '_', '-', at most 64 characters."""
    if not NAME_RE.match(name) or ".." in name or name == BUILTIN_NAME:
        why = "is the builtin model's name" if name == BUILTIN_NAME else "is not a valid name"
        raise ConfigError(
            f"model name {name!r} {why}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, with no path separators and no '..'",
            hint="For example: `loft models add ./my-model --name my-model`.",
        )
    return name


def add_model(path: str | Path, name: str) -> ModelInfo:
    """Copy a local HF model dir into LOFT_HOME/models/<name>, atomically, with a MANIFEST.json.

    Pickle weight files are not copied; the copied weights are re-hashed and must match the source.
    """
    validate_name(name)
    src = Path(path).expanduser()
    if not src.exists():
        raise NotFoundError(
            f"no directory {src} to add as model '{name}'",
            hint="Pass the directory that holds config.json and *.safetensors.",
        )
    src = src.resolve()
    source = _from_local(str(src), src, "local", True)
    final = models_dir() / name
    exists = ConfigError(
        f"a model named '{name}' already exists at {final}",
        hint=f"Choose another --name, or remove it first with `rm -rf {final}`.",
    )
    if final.exists():
        raise exists
    try:
        with atomic_dir(final) as tmp:
            for rel in list_files(src):
                if Path(rel).suffix in PICKLE_SUFFIXES:
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, tmp / rel)
            manifest = write_manifest(
                tmp, name=name, source="added", extra={"source_path": str(src)}
            )
            copied = {r: manifest["files"][r] for r in manifest["weights"]}
            if copied != source.files:
                raise IntegrityError(
                    f"copying {src} to {final}: the copied weights' sha256 differ from the source "
                    "(the source changed during the copy, or the disk is failing)",
                    hint=f"Run `loft models add {src} --name {name}` again.",
                )
    except FileExistsError:
        raise exists from None
    return ModelInfo(name, final, "added", combined_digest(copied), copied)


def remove_model(name: str) -> Path:
    """Delete a stored model (one added with ``add_model``, or the builtin's conversion, which
    the next use converts again); returns the folder it was in. Local directories and the Hugging
    Face cache are not loft's to delete. The folder goes first to a hidden name, so an
    interrupted removal never leaves a half model that looks complete."""
    final = models_dir() / name
    if not (NAME_RE.match(name) and ".." not in name and final.is_dir()):
        raise NotFoundError(
            f"no stored model {name!r} in {models_dir()}",
            hint="`loft models list` shows the models loft stores; a local directory or a hub "
            "id is not loft's to remove.",
        )
    remove_dir(final)
    return final


def describe_model(info: ModelInfo) -> dict[str, Any]:
    """ModelInfo plus a summary of config.json and the tokenizer files (no weights loaded)."""
    cfg = _read_json(info.path / "config.json")
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    tok_cfg = _read_json(info.path / "tokenizer_config.json")
    special = _read_json(info.path / "special_tokens_map.json")
    heads = text.get("num_attention_heads")
    return {
        **info.to_dict(),
        "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
        "model_type": cfg.get("model_type"),
        "hidden_size": text.get("hidden_size"),
        "num_hidden_layers": text.get("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": text.get("num_key_value_heads", heads),
        "vocab_size": text.get("vocab_size"),
        "max_position_embeddings": text.get("max_position_embeddings"),
        "tie_word_embeddings": cfg.get("tie_word_embeddings", text.get("tie_word_embeddings")),
        "dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
        "params": safetensors_params(info.path),
        "size_bytes": sum((info.path / r).stat().st_size for r in info.files),
        "chat_template": (info.path / "chat_template.jinja").is_file()
        or bool(tok_cfg.get("chat_template")),
        "pad_token": _token(tok_cfg.get("pad_token") or special.get("pad_token")),
        "eos_token": _token(tok_cfg.get("eos_token") or special.get("eos_token")),
    }


_read_json = read_json  # decrypted in memory for a registered version encrypted at rest


def _token(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(info: ModelInfo) -> Any:
    """The model's tokenizer; pad_token falls back to eos_token when the model defines none."""
    from transformers import AutoTokenizer

    from loft.core.crypto import is_encrypted

    kwargs: dict[str, Any] = {}
    if is_encrypted(info.path / "config.json"):  # a registered full model, encrypted at rest
        from loft.models.memory import model_config

        kwargs["config"] = model_config(info.path)
    tok = AutoTokenizer.from_pretrained(str(info.path), **kwargs)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _encrypted_weights(folder: Path) -> bool:
    from loft.core.crypto import is_encrypted

    return any(is_encrypted(folder / rel) for rel in ["config.json", *weight_files(folder)])


def load_causal_lm(
    info: ModelInfo, *, dtype: Any = None, device: str = "cpu", **kwargs: Any
) -> Any:
    """AutoModelForCausalLM from ``info.path`` (safetensors only), float32 unless ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HardwareError(
            f"device {device!r} was requested but torch {torch.__version__} sees no CUDA GPU",
            hint="Use device 'cpu', or install a CUDA build of torch on a machine with a GPU.",
        )
    kwargs.setdefault("use_safetensors", True)
    if _encrypted_weights(info.path):
        from loft.models.memory import load_model

        model = load_model(info.path, weight_files(info.path), dtype=dtype or torch.float32,
                           **kwargs)  # fmt: skip
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(info.path), dtype=dtype or torch.float32, **kwargs
        )
    if "device_map" not in kwargs and device != "cpu":
        model.to(device)
    return model
