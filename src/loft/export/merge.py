"""Merge one LoRA or DoRA adapter into its base model, prove the merge exact, write it atomically.

The merge runs on full-precision weights: the base loads in fp32 (``loft.models.load_causal_lm``),
PEFT's ``merge_and_unload`` folds the adapter in (in float64 arithmetic, rounded once to fp32),
and only then is the result cast to the requested dtype. A QLoRA adapter is therefore merged into
the *dequantised* fp32 base, never into 4-bit weights (merging into NF4 weights re-quantises the
sum and degrades it: PEFT #2321).

Before anything is written, the merged fp32 weights are compared with base + adapter (the
unmerged ``PeftModel`` on the same fp32 weights), both run in float64 arithmetic so that fp32
rounding noise of the two forward passes neither hides a drift nor fails an exact merge, on
held-out prompts: the version's eval split when its prepared dataset is
still in LOFT_HOME, else the shipped probe set (``probes.jsonl``, 20 short prompts), or a file the
user names. Two figures: the largest absolute logit difference over every position of every
prompt, and how many prompts' greedy continuations are token-identical. A merge whose difference is
above the tolerance raises :class:`MergeDrift`; nothing is written or registered.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loft import __version__
from loft.core import crypto
from loft.core.errors import ConfigError, IntegrityError, NotFoundError
from loft.core.paths import atomic_dir, atomic_write_json, datasets_dir, loft_home, read_json_object
from loft.models import ModelInfo, load_causal_lm, load_tokenizer, resolve_adapter_base
from loft.models.manifest import combined_digest, hash_weights
from loft.models.memory import save_model

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_TOLERANCE = 1e-4
PROBES = Path(__file__).with_name("probes.jsonl")
MAX_PROMPTS = 20
NEW_TOKENS = 16
MAX_PROMPT_TOKENS = 128
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
IGNORE_INDEX = -100

Say = Callable[[str], None]


class MergeDrift(IntegrityError):
    """The merged model does not reproduce base + adapter within the tolerance; not written."""


@dataclass
class Adapter:
    """An adapter folder to merge or check, and the registry version it came from (if any)."""

    path: Path
    name: str | None = None  # registered model name
    version: int | None = None
    weights_digest: str = ""
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}" if self.name else str(self.path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "weights_digest": self.weights_digest,
            "path": str(self.path),
        }


@dataclass
class Agreement:
    """Merged vs base + adapter on ``prompts`` prompts."""

    prompts: int
    max_abs_logit_diff: float
    greedy_identical: int
    new_tokens: int

    @property
    def greedy_agreement(self) -> float:
        return self.greedy_identical / self.prompts if self.prompts else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "greedy_agreement": self.greedy_agreement}


@dataclass
class MergeReport:
    adapter: Adapter
    base_model: dict[str, Any]
    dtype: str
    tolerance: float
    prompt_source: str
    fp32: Agreement  # the merge itself, gated by the tolerance
    cast: Agreement | None = None  # after the cast to dtype (reported, not gated)
    path: Path | None = None
    registered: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter.to_dict(),
            "base_model": self.base_model,
            "dtype": self.dtype,
            "tolerance": self.tolerance,
            "prompt_source": self.prompt_source,
            "fp32": self.fp32.to_dict(),
            "cast": self.cast.to_dict() if self.cast else None,
            "path": str(self.path) if self.path else None,
            "registered": self.registered,
        }


# ----------------------------------------------------------------------------- the adapter


def resolve_adapter(ref: str) -> Adapter:
    """An adapter folder (or run dir with ``adapter/``) or a registry ref, verified first."""
    ref = str(ref).strip()
    path = Path(ref).expanduser()
    if ref and path.exists():
        folder = path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path
        return _folder_adapter(folder.resolve())
    from loft import registry

    mv = registry.get_version(ref, verify=True)  # IntegrityError on a tampered version
    if mv.card.get("kind") != "adapter":
        raise ConfigError(
            f"{mv.name}:{mv.version} is a {mv.card.get('kind')} model, not an adapter; there is "
            "nothing to merge or check",
            hint="Pass an adapter version (see `loft registry show NAME`).",
        )
    from loft.registry.card import weights_digest

    lineage = mv.card.get("lineage") or {}
    return Adapter(Path(mv.path), mv.name, mv.version, weights_digest(mv.card), lineage)


def _folder_adapter(folder: Path) -> Adapter:
    if not (folder / "adapter_config.json").is_file():
        raise NotFoundError(
            f"{folder} is not a PEFT adapter folder (no adapter_config.json)",
            hint="Pass an adapter folder, a run dir with adapter/ inside, or a registry ref "
            "such as name:3 or name@champion.",
        )
    if not (folder / "adapter_model.safetensors").is_file():
        raise NotFoundError(
            f"{folder} has no adapter_model.safetensors; loft loads only safetensors",
            hint="Re-save the adapter with `model.save_pretrained(dir)`.",
        )
    lineage = read_json_object(folder / "lineage.json")
    return Adapter(folder, None, None, combined_digest(hash_weights(folder)), lineage)


def base_of(adapter: Adapter) -> ModelInfo:
    """The adapter's base model, refused by name when its weights are not the ones trained on."""
    base = adapter.lineage.get("base_model")
    name, sha = (base.get("name"), base.get("sha256")) if isinstance(base, dict) else (None, None)
    return resolve_adapter_base(
        adapter.label, name, sha, adapter.path,
        hint="Restore the exact base model the adapter was trained on; merging it into other "
        "weights would build a different model.",
    )  # fmt: skip


# ----------------------------------------------------------------------------- prompts


def load_prompts(adapter: Adapter, tokenizer: Any, prompts_file: Path | None) -> tuple[list, str]:
    """[(ids for logits, ids to continue greedily)] and where they came from."""
    if prompts_file is not None:
        return _text_prompts(_read_prompt_file(Path(prompts_file)), tokenizer), str(prompts_file)
    fingerprint = adapter.lineage.get("dataset_fingerprint")
    if isinstance(fingerprint, str) and (datasets_dir() / fingerprint).is_dir():
        rows = _eval_rows(fingerprint)
        if rows:
            return rows, f"eval split of dataset {fingerprint[:12]}"
    return _text_prompts(_read_prompt_file(PROBES), tokenizer), "loft probe set"


def _read_prompt_file(path: Path) -> list[str]:
    """Prompts from a .jsonl of {"prompt": ...} objects (or {"messages": [...]}, first user
    message) or from a text file with one prompt a line."""
    if not path.is_file():
        raise NotFoundError(f"prompts file {path} does not exist")
    out: list[str] = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            out.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{i}: not valid JSON ({e})") from None
        text = row.get("prompt") if isinstance(row, dict) else None
        if text is None and isinstance(row, dict) and isinstance(row.get("messages"), list):
            text = next(
                (m.get("content") for m in row["messages"] if m.get("role") == "user"), None
            )
        if not isinstance(text, str):
            raise ConfigError(
                f"{path}:{i}: expected a 'prompt' string or 'messages' with a user turn"
            )
        out.append(text)
    if not out:
        raise ConfigError(f"prompts file {path} holds no prompts")
    return out[:MAX_PROMPTS]


def _text_prompts(texts: list[str], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    out = []
    for text in texts:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        ids = list(ids)[-MAX_PROMPT_TOKENS:]
        out.append((ids, ids))
    return out


def _eval_rows(fingerprint: str) -> list[tuple[list[int], list[int]]]:
    from loft.data.prepare import load_prepared

    ev = load_prepared(fingerprint).eval
    if ev is None or len(ev) == 0:
        return []
    out = []
    for row in ev.select(range(min(MAX_PROMPTS, len(ev)))):
        if "input_ids" in row:  # sft: the whole row for logits, its prompt part to continue
            ids = list(row["input_ids"])[:MAX_PROMPT_TOKENS]
            labels = list(row.get("labels") or [])
            cut = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(ids))
            out.append((ids, ids[: max(cut, 1)]))
        elif "prompt_ids" in row:  # preference layouts
            ids = list(row["prompt_ids"])[-MAX_PROMPT_TOKENS:]
            out.append((ids, ids))
    return out


# ----------------------------------------------------------------------------- comparing


def _outputs(model: Any, prompts: list, tokenizer: Any) -> tuple[list[Any], list[list[int]]]:
    """(logits per prompt, in the model's dtype; greedy continuation per prompt)."""
    import torch
    from transformers import GenerationConfig

    gen = GenerationConfig(
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    logits, greedy = [], []
    with torch.no_grad():
        for full, prompt in prompts:
            ids = torch.tensor([full])
            logits.append(model(input_ids=ids).logits[0].double())
            p = torch.tensor([prompt])
            out = model.generate(
                input_ids=p, attention_mask=torch.ones_like(p), generation_config=gen
            )
            greedy.append(out[0, len(prompt) :].tolist())
    return logits, greedy


def compare(ref: tuple[list, list], got: tuple[list, list]) -> Agreement:
    diff = max(float((a - b).abs().max()) for a, b in zip(ref[0], got[0], strict=True))
    same = sum(a == b for a, b in zip(ref[1], got[1], strict=True))
    return Agreement(len(ref[0]), diff, same, NEW_TOKENS)


def merge_peft(peft_model: Any) -> Any:
    """The merge step itself: fold the adapter into the (fp32) base weights."""
    return peft_model.merge_and_unload()


# ----------------------------------------------------------------------------- merge


def merge_adapter(
    ref: str,
    *,
    dtype: str = "float32",
    tolerance: float = DEFAULT_TOLERANCE,
    out: Path | None = None,
    register: bool = False,
    name: str | None = None,
    prompts_file: Path | None = None,
    say: Say = lambda _msg: None,
) -> MergeReport:
    """Merge ``ref``'s adapter into its base, verify, write (``out``) and/or register it."""
    import torch

    from loft.models.memory import load_peft

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if tolerance < 0:
        raise ConfigError(f"--tolerance {tolerance} is negative")
    adapter = resolve_adapter(ref)
    if register and not (name or adapter.name):
        raise ConfigError(
            f"{adapter.label} is not a registered version, so there is no model to add the "
            "merged version to",
            hint="Pass --name NAME to register the merged model under that name.",
        )
    if out is not None and Path(out).exists():
        raise ConfigError(f"--out {out} already exists", hint="Pass a new folder for --out.")
    info = base_of(adapter)
    say(f"loading {info.name} (fp32) and adapter {adapter.label}")
    has_tok = any((adapter.path / f).is_file() for f in TOKENIZER_FILES)
    tokenizer = load_tokenizer(dataclasses.replace(info, path=adapter.path) if has_tok else info)
    prompts, source = load_prompts(adapter, tokenizer, prompts_file)
    peft_model = load_peft(load_causal_lm(info), adapter.path)  # decrypted in memory
    # Compare in float64: the fp32 base and adapter weights upcast exactly, so the figure is the
    # merge's own error, not the fp32 rounding noise of two differently ordered forward passes
    # (about 1e-4 on logits of size 10, which would hide a small drift or refuse an exact merge).
    peft_model.double()
    say(f"base + adapter on {len(prompts)} prompts ({source})")
    reference = _outputs(peft_model, prompts, tokenizer)
    say("merging (fp32 weights, never quantised ones)")
    merged = merge_peft(peft_model).eval()
    merged.float().double()  # exactly the fp32 weights that will be written, evaluated in fp64
    fp32 = compare(reference, _outputs(merged, prompts, tokenizer))
    merged.float()
    report = MergeReport(
        adapter,
        {"name": info.name, "sha256": info.sha256, "source": info.source},
        dtype,
        tolerance,
        source,
        fp32,
    )
    say(
        f"merged vs base + adapter: max |logit diff| {fp32.max_abs_logit_diff:.3g}, greedy "
        f"identical {fp32.greedy_identical}/{fp32.prompts}"
    )
    if not fp32.max_abs_logit_diff <= tolerance:  # NaN is refused too
        raise MergeDrift(
            f"merging {adapter.label} drifted: max |logit diff| {fp32.max_abs_logit_diff:.3g} "
            f"against base + adapter is above the tolerance {tolerance:g} (greedy identical on "
            f"{fp32.greedy_identical}/{fp32.prompts} prompts); nothing was written or registered",
            hint="Check the adapter loads and runs with `loft eval`; a QLoRA or quantised base "
            "must be the exact fp32 weights the adapter was trained on.",
        )
    if dtype != "float32":
        merged = merged.to(getattr(torch, dtype))
        report.cast = compare(reference, _outputs(merged, prompts, tokenizer))
        say(
            f"after the cast to {dtype}: max |logit diff| {report.cast.max_abs_logit_diff:.3g}, "
            f"greedy identical {report.cast.greedy_identical}/{report.cast.prompts}"
        )
    _write(merged, tokenizer, report, out, register, name, say)
    return report


def _write(
    merged: Any,
    tokenizer: Any,
    report: MergeReport,
    out: Path | None,
    register: bool,
    name: str | None,
    say: Say,
) -> None:
    adapter = report.adapter
    scratch = None
    if out is None:
        if not register:
            raise ConfigError("nothing to do: pass --out DIR, --register, or both")
        scratch = Path(tempfile.mkdtemp(prefix=".merge-", dir=loft_home()))
        out = scratch / "model"
    out = Path(out).expanduser().resolve()
    key = crypto.provider() if scratch is not None else None
    try:
        with atomic_dir(out) as tmp:
            if key is not None:  # only registered: the scratch copy is encrypted too
                save_model(merged, tmp, key)
            else:
                merged.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            atomic_write_json(tmp / "lineage.json", _lineage(report))  # last
        say(f"wrote {out}")
        report.path = None if scratch else out
        if register:
            from loft import registry

            parent = adapter.label if adapter.name else None
            mv = registry.register(out, name=name or adapter.name, parent=parent)
            report.registered = f"{mv.name}:{mv.version}"
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _lineage(report: MergeReport) -> dict[str, Any]:
    lin = report.adapter.lineage
    return {
        "base_model": report.base_model,
        "dataset_fingerprint": lin.get("dataset_fingerprint"),
        "config": lin.get("config"),
        "merged_from": report.adapter.to_dict(),
        "merge": {
            "method": "peft merge_and_unload, fp32",
            "dtype": report.dtype,
            "tolerance": report.tolerance,
            "prompt_source": report.prompt_source,
            "fp32": report.fp32.to_dict(),
            "cast": report.cast.to_dict() if report.cast else None,
        },
        "loft_version": __version__,
    }


__all__ = [
    "DEFAULT_TOLERANCE",
    "DTYPES",
    "Adapter",
    "Agreement",
    "MergeDrift",
    "MergeReport",
    "base_of",
    "merge_adapter",
    "resolve_adapter",
]
