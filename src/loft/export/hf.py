"""``loft export REF --format hf``: a folder plain ``transformers`` loads and generates with.

An adapter is merged first (``loft.export.merge``: fp32, verified against base + adapter, refused
above the tolerance); a full-model version is taken as registered. The folder then gets what
runtimes read and loft's training knew:

- the tokenizer and the exact chat template the model was trained with (the adapter's files);
- a pad token distinct from eos when the base uses eos as pad (SmolLM2 does): a runtime that
  masks pad positions would otherwise drop the closing eos of every answer. An existing special
  token that the chat template never writes is chosen, so no embedding row is added;
- ``generation_config.json`` whose ``eos_token_id`` lists every id that ends an assistant turn
  (eos and the template's end-of-turn token), so ``generate`` stops where training stopped;
- ``loft_card.json`` (the version's lineage card, or the merge's lineage) and ``SHA256SUMS``
  (``sha256sum -c`` format) over every file.

The folder is written atomically; a registry version is verified by sha256 before it is read, so
a tampered version is refused.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError
from loft.core.paths import atomic_dir, atomic_write_json, loft_home, read_json_object
from loft.export.merge import DEFAULT_TOLERANCE, MergeReport, Say, merge_adapter
from loft.models.manifest import list_files, sha256_file

SUMS = "SHA256SUMS"
CARD = "loft_card.json"


@dataclass
class HfExport:
    ref: str
    path: Path
    merge: MergeReport | None
    pad_token: str
    eos_token_ids: list[int]
    files: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "format": "hf",
            "path": str(self.path),
            "merge": self.merge.to_dict() if self.merge else None,
            "pad_token": self.pad_token,
            "eos_token_ids": self.eos_token_ids,
            "files": self.files,
            "bytes": self.bytes,
        }


def export_hf(
    ref: str,
    out: Path,
    *,
    dtype: str = "float32",
    tolerance: float = DEFAULT_TOLERANCE,
    prompts_file: Path | None = None,
    say: Say = lambda _msg: None,
) -> HfExport:
    out = Path(out).expanduser().resolve()
    if out.exists():
        raise ConfigError(f"--out {out} already exists", hint="Pass a new folder for --out.")
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        prepared_model(ref, dtype, tolerance, prompts_file, say, scratch_dir=out.parent) as prep,
        atomic_dir(out) as tmp,
    ):
        for rel in list_files(prep.folder):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(prep.folder / rel, tmp / rel)
        atomic_write_json(tmp / CARD, prep.card)
        write_sums(tmp)
    files = list_files(out)
    size = sum((out / f).stat().st_size for f in files)
    say(f"wrote {out} ({len(files)} files, {size / 2**20:.1f} MiB)")
    return HfExport(str(ref), out, prep.merge, prep.pad_token, prep.eos_token_ids, len(files), size)


@dataclass
class Prepared:
    """A full model in a scratch folder, ready for any export: tokens fixed, card known."""

    folder: Path
    card: dict[str, Any]
    merge: MergeReport | None
    pad_token: str
    eos_token_ids: list[int]
    base_manifest: dict[str, Any]


@contextlib.contextmanager
def prepared_model(
    ref: str,
    dtype: str,
    tolerance: float,
    prompts_file: Path | None,
    say: Say,
    *,
    scratch_dir: Path | None = None,
) -> Iterator[Prepared]:
    """Merge (or take) ``ref``'s full model into a hidden scratch folder in ``scratch_dir`` (the
    export's destination, where its plaintext is going anyway; LOFT_HOME when None), with a pad
    token distinct from eos and end-of-turn eos ids; the folder is removed afterwards. Files of a
    version encrypted at rest are decrypted in memory into it: an export is plaintext by purpose,
    and only where the user asked for it."""
    from loft.core.crypto import is_encrypted, read_plain

    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=scratch_dir or loft_home()))
    try:
        src, card, report = _model_folder(ref, scratch, dtype, tolerance, prompts_file, say)
        folder = scratch / "model"
        folder.mkdir()
        for rel in list_files(src):
            if rel in ("card.json", "MANIFEST.json", SUMS, CARD):
                continue
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            if is_encrypted(src / rel):
                (folder / rel).write_bytes(read_plain(src / rel))
            else:
                shutil.copyfile(src / rel, folder / rel)
        pad, eos = _fix_tokens(folder)
        yield Prepared(folder, card, report, pad, eos, _base_manifest(card))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _base_manifest(card: dict[str, Any]) -> dict[str, Any]:
    """The base model's MANIFEST.json (where loft converted it from), or {}."""
    from loft.models import resolve_model

    lineage = card.get("lineage", card)
    base = lineage.get("base_model") or {}
    name = base.get("name") if isinstance(base, dict) else None
    if not name:
        return {}
    try:
        info = resolve_model(str(name))
    except Exception:  # the base is gone: callers ask for what they need instead
        return {}
    return read_json_object(Path(info.path) / "MANIFEST.json")


def _model_folder(ref, scratch, dtype, tolerance, prompts_file, say):
    """(a folder with the full model's files, its card, the merge report or None)."""
    from loft import registry

    path = Path(str(ref)).expanduser()
    if not path.exists():
        mv = registry.get_version(str(ref), verify=True)  # IntegrityError when tampered
        if mv.card.get("kind") == "full":
            if dtype != "float32":
                raise ConfigError(
                    f"--dtype {dtype}: {mv.name}:{mv.version} is a full model, exported as "
                    "registered",
                    hint="Merge its adapter with --dtype instead (`loft merge REF --dtype`).",
                )
            say(f"{mv.name}:{mv.version} is a full model; exporting it as registered")
            return Path(mv.path), mv.card, None
    elif (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ConfigError(
            f"{path} is a model folder, not an adapter or a registered version",
            hint="Register it (`loft registry register PATH`) and export the version.",
        )
    merged = scratch / "merged"
    report = merge_adapter(
        str(ref), dtype=dtype, tolerance=tolerance, out=merged, prompts_file=prompts_file, say=say
    )
    return merged, read_json_object(merged / "lineage.json"), report


def _fix_tokens(folder: Path) -> tuple[str, list[int]]:
    """A pad token distinct from eos, and the end-of-turn eos ids, into tokenizer and configs."""
    from transformers import AutoTokenizer, GenerationConfig

    from loft.data.preference import end_of_turn_ids

    tok = AutoTokenizer.from_pretrained(str(folder))
    eos = sorted(end_of_turn_ids(tok)) if tok.chat_template else [tok.eos_token_id]
    if tok.pad_token_id is None or tok.pad_token_id in eos:
        tok.pad_token = _spare_special(tok, set(eos))
        tok.save_pretrained(str(folder))
    try:
        gen = GenerationConfig.from_pretrained(str(folder))
    except OSError:
        gen = GenerationConfig()
    gen.eos_token_id = eos if len(eos) > 1 else eos[0]
    gen.pad_token_id = tok.pad_token_id
    if tok.bos_token_id is not None:
        gen.bos_token_id = tok.bos_token_id
    gen.save_pretrained(str(folder))
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["pad_token_id"] = tok.pad_token_id
    atomic_write_json(cfg_path, cfg)
    return str(tok.pad_token), eos


def _spare_special(tok: Any, eos: set[int]) -> str:
    """A special token that is not an end of turn and that the chat template never writes."""
    probe = ""
    if tok.chat_template:
        msgs = [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ]
        probe = tok.apply_chat_template(msgs, tokenize=False)
    candidates = [tok.unk_token, *getattr(tok, "all_special_tokens", [])]
    candidates += [t.content for t in getattr(tok, "added_tokens_decoder", {}).values()]
    for token in candidates:
        if not token or token in probe:
            continue
        tid = tok.convert_tokens_to_ids(token)
        if tid is not None and tid not in eos and tid != tok.bos_token_id:
            return token
    raise ConfigError(
        "the tokenizer's pad token is its eos and it has no spare special token to pad with",
        hint="Add a pad token to the base model's tokenizer (and an embedding row) first.",
    )


def write_sums(folder: Path) -> None:
    """``SHA256SUMS`` over every file of ``folder`` (``sha256sum -c`` format)."""
    lines = [f"{sha256_file(folder / rel)}  {rel}\n" for rel in list_files(folder) if rel != SUMS]
    (folder / SUMS).write_text("".join(lines), encoding="utf-8")


__all__ = ["HfExport", "Prepared", "export_hf", "prepared_model", "write_sums"]
