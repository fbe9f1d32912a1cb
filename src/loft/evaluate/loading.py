"""Load what ``loft eval`` measures: a base model, run, adapter, full model or registry version.

A target always comes with its *own* tokenizer: an adapter folder that holds tokenizer files (loft
saves them beside every adapter) is evaluated with that tokenizer and chat template, not the base
model's, so a template changed between training and evaluation cannot go unnoticed. Adapters are
merged into their base for evaluation. Only safetensors weights are ever loaded.

References, in the order they are tried:

- an existing path: a run dir (``adapter/`` or ``model/`` inside), an adapter folder
  (``adapter_config.json``) or a Hugging Face model directory;
- a registry reference ``name@alias``, ``name:3`` (anything with ``@`` or ``:``), verified first;
- a base-model reference (whatever ``loft.models.resolve_model`` accepts), then, if that fails and
  the registry is available, a registered model ``name`` (its latest version).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loft.core.errors import ConfigError, NotFoundError
from loft.core.paths import read_json_object
from loft.models import load_causal_lm, load_tokenizer, resolve_adapter_base, resolve_model
from loft.models.manifest import combined_digest, hash_weights, pickle_files

Kind = Literal["base", "adapter", "full"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class Target:
    """A model ready to evaluate: ``name`` is the resolved id (``name:3``, a path, a base name)."""

    name: str
    model: Any
    tokenizer: Any
    kind: Kind
    sha256: str
    path: Path | None = None
    base_model: str | None = None
    registry_ref: str | None = None  # set when loaded from the registry
    pair_logps: Any = None  # [n, 2] (chosen, rejected) log-probs, when preference metrics ran


def registry_module() -> Any | None:
    """``loft.registry`` when it is installed and exposes ``get_version``; else None."""
    try:
        mod = importlib.import_module("loft.registry")
    except ImportError:
        return None
    return mod if callable(getattr(mod, "get_version", None)) else None


def is_registry_syntax(ref: str) -> bool:
    """``name@alias`` or ``name:version`` (a Windows drive or URL-like path is not)."""
    return ("@" in ref or ":" in ref) and "/" not in ref and "\\" not in ref


def load_target(ref: str) -> Target:
    """Resolve and load ``ref`` (see the module docstring), in eval mode, on CPU in float32."""
    ref = str(ref).strip()
    path = Path(ref).expanduser()
    if ref and path.exists():
        return _load_path(path.resolve(), name=str(path.resolve()))
    registry = registry_module()
    if is_registry_syntax(ref):
        if registry is None:
            raise NotFoundError(
                f"{ref!r} looks like a registry reference (name@alias or name:version) but the "
                "model registry (loft.registry) is not available in this installation",
                hint="Pass a run dir, an adapter folder or a base model name instead.",
            )
        return _load_registry(registry, ref)
    try:
        info = resolve_model(ref)
    except NotFoundError as base_err:
        if registry is None:
            raise
        try:
            return _load_registry(registry, ref)
        except (NotFoundError, ConfigError):  # not a registered name either (or not a valid one)
            raise base_err from None
    return _load_base(info, name=info.name, kind="base")


def _load_registry(registry: Any, ref: str) -> Target:
    version = registry.get_version(ref, verify=True)  # IntegrityError propagates
    name = getattr(version, "name", None)
    number = getattr(version, "version", None)
    resolved = f"{name}:{number}" if name is not None and number is not None else ref
    target = _load_path(Path(version.path), name=resolved)
    target.registry_ref = resolved
    return target


def _load_path(path: Path, *, name: str) -> Target:
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _load_adapter(path, name=name)
    if path.is_dir() and (path / "adapter" / "adapter_config.json").is_file():
        return _load_adapter(path / "adapter", name=name)
    if path.is_dir() and (path / "model" / "config.json").is_file():
        return _load_full(path / "model", name=name)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_full(path, name=name)
    found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) if path.is_dir() else "a file"
    raise NotFoundError(
        f"{path} is not a run dir, adapter folder or model directory (found: {found or 'nothing'})",
        hint="Pass a run dir with adapter/ or model/ inside, a folder with adapter_config.json, "
        "a model directory with config.json, or a registry reference such as name@champion.",
    )


def _load_full(path: Path, *, name: str) -> Target:
    info = resolve_model(str(path))
    trained = (path / "lineage.json").is_file() or (path / "card.json").is_file()
    kind: Kind = "full" if trained else "base"
    return _load_base(info, name=name, kind=kind, base_model=_lineage_base(path)[0])


def _load_base(info: Any, *, name: str, kind: Kind, base_model: str | None = None) -> Target:
    model = load_causal_lm(info).eval()
    return Target(
        name=name,
        model=model,
        tokenizer=load_tokenizer(info),
        kind=kind,
        sha256=info.sha256,
        path=Path(info.path),
        base_model=base_model or (info.name if kind == "base" else None),
    )


_read_json = read_json_object


def _lineage_base(folder: Path) -> tuple[str | None, str | None]:
    """(base model name, its sha256) from loft's ``lineage.json`` or a registry ``card.json``."""
    base = _read_json(folder / "lineage.json").get("base_model")
    if not isinstance(base, dict):
        lineage = _read_json(folder / "card.json").get("lineage")
        base = lineage.get("base_model") if isinstance(lineage, dict) else None
    if isinstance(base, dict):
        return base.get("name"), base.get("sha256")
    return None, None


def _load_adapter(folder: Path, *, name: str) -> Target:
    from loft.models.memory import load_peft

    if not (folder / "adapter_model.safetensors").is_file():
        pickles = ", ".join(pickle_files(folder)) or "none"
        raise NotFoundError(
            f"adapter folder {folder} has no adapter_model.safetensors (pickle files: {pickles}); "
            "loft loads only safetensors because pickle files can run code when loaded",
            hint="Re-save the adapter with `model.save_pretrained(dir)` (safetensors is the "
            "default in PEFT).",
        )
    base_name, base_sha = _lineage_base(folder)
    info = resolve_adapter_base(
        str(folder), base_name, base_sha, folder,
        hint="Evaluate against the exact base model the adapter was trained on.",
    )  # fmt: skip
    has_tokenizer = any((folder / f).is_file() for f in TOKENIZER_FILES)
    tok_info = dataclasses.replace(info, path=folder) if has_tokenizer else info
    tokenizer = load_tokenizer(tok_info)
    base = load_causal_lm(info)
    model = load_peft(base, folder).merge_and_unload().eval()  # decrypted in memory
    return Target(
        name=name,
        model=model,
        tokenizer=tokenizer,
        kind="adapter",
        sha256=combined_digest(hash_weights(folder)),
        path=folder,
        base_model=info.name,
    )
