"""Merge several LoRA adapters of one base model: linear, cat, svd, ties, dare_ties, dare_linear.

Every method works on each adapter's full weight update ``dW = scale * B @ A`` (float64), never
on A and B separately: PEFT's ``add_weighted_adapter`` combines A's and B's on their own for its
non-SVD methods, which adds cross terms ``B_i @ A_j`` that no adapter trained (PEFT #3004). The
pruning and sign election of TIES and DARE are PEFT's own functions (``peft.utils.merge_utils``),
applied to those full updates. What each method writes:

- ``linear``, ``ties``, ``dare_ties``, ``dare_linear``: a full model, base + the combined update,
  computed in fp64, rounded once to fp32, then cast to ``--dtype``.
- ``cat``: a LoRA adapter whose rank is the sum of the ranks: A's stacked, B's scaled by weight and
  scale and placed side by side. Exactly the weighted sum of the adapters.
- ``svd``: the weighted sum truncated to ``rank`` by SVD, as a LoRA adapter; the reconstruction
  error (relative Frobenius norm per module) is reported.

The reference for every method is PEFT itself running all the adapters at once (each B scaled by
its weight), in float64, on the same held-out prompts as ``loft merge`` of one adapter. ``linear``
and ``cat`` must reproduce it within the tolerance or nothing is written (they are exact by
construction); ``svd``, ``ties`` and the DARE methods change the function on purpose, so their
distance from it is reported, not gated.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loft import __version__
from loft.core.errors import ConfigError
from loft.core.paths import atomic_dir, atomic_write_json, loft_home
from loft.export.merge import (
    DEFAULT_TOLERANCE,
    DTYPES,
    TOKENIZER_FILES,
    Adapter,
    Agreement,
    MergeDrift,
    Say,
    _outputs,
    base_of,
    compare,
    load_prompts,
    resolve_adapter,
)

METHODS = ("linear", "cat", "svd", "ties", "dare_ties", "dare_linear")
ADAPTER_METHODS = ("cat", "svd")  # write a LoRA adapter; the others a full model
EXACT_METHODS = ("linear", "cat")  # gated against PEFT running all adapters at once
DENSITY_METHODS = ("ties", "dare_ties", "dare_linear")
PEFT_PREFIX = "base_model.model."


@dataclass
class Lora:
    """One adapter's updates: module path -> (A [r, in], B [out, r]) and its scale."""

    adapter: Adapter
    config: dict[str, Any]
    modules: dict[str, tuple[Any, Any]]
    scale: dict[str, float]

    def delta(self, module: str) -> Any:
        a, b = self.modules[module]
        return self.scale[module] * (b.double() @ a.double())


@dataclass
class CombineReport:
    method: str
    adapters: list[Adapter]
    weights: list[float]
    density: float | None
    rank: int | None
    seed: int
    base_model: dict[str, Any]
    dtype: str
    tolerance: float
    prompt_source: str
    agreement: Agreement  # against PEFT running every adapter at once, weighted
    gated: bool
    kind: str  # "adapter" or "model"
    svd_error: dict[str, float] | None = None
    path: Path | None = None
    registered: str | None = None
    parents: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "adapters": [a.to_dict() for a in self.adapters],
            "weights": self.weights,
            "density": self.density,
            "rank": self.rank,
            "seed": self.seed,
            "base_model": self.base_model,
            "dtype": self.dtype,
            "tolerance": self.tolerance,
            "prompt_source": self.prompt_source,
            "agreement": self.agreement.to_dict(),
            "gated": self.gated,
            "kind": self.kind,
            "svd_error": self.svd_error,
            "path": str(self.path) if self.path else None,
            "registered": self.registered,
            "parents": self.parents,
        }


# ----------------------------------------------------------------------------- recipe


def read_recipe(path: Path) -> dict[str, Any]:
    """A mergekit-style YAML recipe -> keyword arguments of :func:`combine_adapters`.

    ``merge_method``, ``models: [{model: REF, parameters: {weight, density}}]``, optional
    ``base_model`` (checked against the adapters'), ``parameters: {density, rank}`` and
    ``dtype``. Every problem is reported at once, with its key path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping with merge_method and models")
    known = {"merge_method", "models", "base_model", "parameters", "dtype"}
    problems += [
        f"{k}: unknown key (known: {', '.join(sorted(known))})" for k in doc if k not in known
    ]
    method = doc.get("merge_method")
    if method not in METHODS:
        problems.append(f"merge_method: got {method!r}; one of {', '.join(METHODS)}")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        problems.append("parameters: expected a mapping")
        params = {}
    models = doc.get("models")
    refs: list[str] = []
    weights: list[float] = []
    densities: set[float] = set()
    if not isinstance(models, list) or len(models) < 2:
        problems.append("models: expected a list of at least two {model: REF} entries")
        models = []
    for i, m in enumerate(models):
        if not isinstance(m, dict) or not isinstance(m.get("model"), str):
            problems.append(f"models[{i}].model: expected an adapter ref (name:3 or a folder)")
            continue
        refs.append(m["model"])
        p = m.get("parameters") or {}
        w = p.get("weight", 1.0) if isinstance(p, dict) else None
        if not isinstance(w, int | float) or isinstance(w, bool):
            problems.append(f"models[{i}].parameters.weight: expected a number, got {w!r}")
        else:
            weights.append(float(w))
        if isinstance(p, dict) and "density" in p:
            densities.add(p["density"])
    if "density" in params:
        densities.add(params["density"])
    if len(densities) > 1:
        problems.append(
            f"density: one value for all models (got {sorted(densities)}); PEFT's TIES and DARE "
            "prune every update at the same density"
        )
    if problems:
        raise ConfigError(
            f"{path}: {len(problems)} problem(s) in the merge recipe:\n"
            + "\n".join(f"  {p}" for p in problems),
            hint="See `loft merge --help` for the recipe keys.",
        )
    rel = path.parent
    refs = [str(rel / r) if (rel / r).exists() and not Path(r).is_absolute() else r for r in refs]
    return {
        "refs": refs,
        "method": method,
        "weights": weights,
        "density": next(iter(densities), None),
        "rank": params.get("rank"),
        "dtype": doc.get("dtype", "float32"),
        "expect_base": doc.get("base_model"),
    }


# ----------------------------------------------------------------------------- loading


def load_lora(adapter: Adapter) -> Lora:
    """The adapter's A/B per module and scales; refuses what a weighted sum cannot represent."""
    from loft.models.memory import load_tensors, read_json

    cfg = read_json(adapter.path / "adapter_config.json")
    bad = []
    if cfg.get("peft_type", "LORA") != "LORA":
        bad.append(f"peft_type {cfg.get('peft_type')} (only LoRA)")
    if cfg.get("use_dora"):
        bad.append("DoRA (its magnitude vectors do not add up across adapters)")
    if cfg.get("bias", "none") != "none":
        bad.append(f"bias {cfg.get('bias')!r}")
    if cfg.get("modules_to_save"):
        bad.append(f"modules_to_save {cfg.get('modules_to_save')}")
    if cfg.get("alpha_pattern"):
        bad.append("alpha_pattern (per-module alphas)")
    tensors = load_tensors(adapter.path / "adapter_model.safetensors")
    foreign = sorted(k for k in tensors if ".lora_A." not in k and ".lora_B." not in k)
    if foreign:
        bad.append(f"tensors other than LoRA A/B ({foreign[0]}, ...)")
    if bad:
        raise ConfigError(
            f"{adapter.label} cannot be merged with other adapters: {'; '.join(bad)}",
            hint="Merge it alone (`loft merge REF`), or retrain it as a plain LoRA adapter.",
        )
    alpha = float(cfg.get("lora_alpha", 8))
    modules: dict[str, tuple[Any, Any]] = {}
    scale: dict[str, float] = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None or b.shape[1] != a.shape[0]:
            raise ConfigError(f"{adapter.label}: {module} has lora_A without a matching lora_B")
        r = a.shape[0]
        modules[module] = (a, b)
        scale[module] = alpha / (r**0.5 if cfg.get("use_rslora") else r)
    return Lora(adapter, cfg, modules, scale)


def _check_bases(adapters: list[Adapter], expect: str | None) -> Any:
    infos = [base_of(a) for a in adapters]
    shas = {i.sha256 for i in infos}
    if len(shas) > 1:
        names = ", ".join(
            f"{a.label} on {i.name} ({i.sha256[:12]}…)"
            for a, i in zip(adapters, infos, strict=True)
        )
        raise ConfigError(
            f"the adapters belong to different base models: {names}",
            hint="Merge adapters trained on the same base model only.",
        )
    if expect and resolve_base_name(expect) != infos[0].sha256:
        raise ConfigError(
            f"base_model {expect!r} in the recipe is not the adapters' base ({infos[0].name})"
        )
    return infos[0]


def resolve_base_name(name: str) -> str:
    from loft.models import resolve_model

    return resolve_model(str(name)).sha256


# ----------------------------------------------------------------------------- the math


def combined_delta(
    loras: list[Lora], module: str, method: str, weights: list[float], density: float | None
) -> Any:
    """The combined fp64 update of one module (zeros for adapters that do not touch it)."""
    import torch
    from peft.utils import merge_utils

    a, b = next(lo.modules[module] for lo in loras if module in lo.modules)
    shape = (b.shape[0], a.shape[1])
    deltas = [
        lo.delta(module) if module in lo.modules else torch.zeros(shape, dtype=torch.float64)
        for lo in loras
    ]
    w = torch.tensor(weights, dtype=torch.float64)
    if method in ("linear", "cat", "svd"):
        return merge_utils.task_arithmetic(deltas, w)
    if method == "ties":
        return merge_utils.ties(deltas, w, density)
    if method == "dare_ties":
        return merge_utils.dare_ties(deltas, w, density)
    return merge_utils.dare_linear(deltas, w, density)


def cat_adapter(loras: list[Lora], modules: list[str], weights: list[float]) -> dict[str, Any]:
    """Stacked A's and weighted, scaled B's: sum_i w_i s_i B_i A_i exactly, at scale 1."""
    import torch

    out: dict[str, Any] = {}
    for module in modules:
        some = next(lo for lo in loras if module in lo.modules)
        d_in, d_out = some.modules[module][0].shape[1], some.modules[module][1].shape[0]
        a_parts, b_parts = [], []
        for lo, w in zip(loras, weights, strict=True):
            r = _rank(lo)
            if module in lo.modules:
                a, b = lo.modules[module]
                a_parts.append(a.double())
                b_parts.append(b.double() * (w * lo.scale[module]))
            else:
                a_parts.append(torch.zeros(r, d_in, dtype=torch.float64))
                b_parts.append(torch.zeros(d_out, r, dtype=torch.float64))
        out[f"{module}.lora_A.weight"] = torch.cat(a_parts, 0).float().contiguous()
        out[f"{module}.lora_B.weight"] = torch.cat(b_parts, 1).float().contiguous()
    return out


def svd_adapter(deltas: dict[str, Any], rank: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Rank-``rank`` factors of each update (B = U S, A = V^T) and the relative errors."""
    import torch

    out: dict[str, Any] = {}
    errors: dict[str, float] = {}
    for module, d in deltas.items():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        k = min(rank, s.shape[0])
        b, a = u[:, :k] * s[:k], vh[:k]
        norm = float(torch.linalg.matrix_norm(d))
        errors[module] = float(torch.linalg.matrix_norm(d - b @ a)) / norm if norm else 0.0
        if k < rank:  # pad to the uniform rank the config names
            a = torch.cat([a, torch.zeros(rank - k, a.shape[1], dtype=a.dtype)], 0)
            b = torch.cat([b, torch.zeros(b.shape[0], rank - k, dtype=b.dtype)], 1)
        out[f"{module}.lora_A.weight"] = a.float().contiguous()
        out[f"{module}.lora_B.weight"] = b.float().contiguous()
    return out, errors


def _rank(lora: Lora) -> int:
    ranks = {a.shape[0] for a, _ in lora.modules.values()}
    if len(ranks) != 1:
        raise ConfigError(
            f"{lora.adapter.label} has per-module ranks {sorted(ranks)}; cat needs one rank per "
            "adapter",
            hint="Use --method svd or linear for it.",
        )
    return ranks.pop()


# ----------------------------------------------------------------------------- combine


def combine_adapters(
    refs: list[str],
    *,
    method: str,
    weights: list[float] | None = None,
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
    tolerance: float = DEFAULT_TOLERANCE,
    out: Path | None = None,
    register: bool = False,
    name: str | None = None,
    prompts_file: Path | None = None,
    expect_base: str | None = None,
    say: Say = lambda _msg: None,
) -> CombineReport:
    """Merge ``refs`` (two or more adapters of one base) by ``method``; verify, write, register."""
    import torch

    from loft.models import load_causal_lm, load_tokenizer
    from loft.models.memory import load_peft

    problems = _argument_problems(refs, method, weights, density, rank, dtype, tolerance)
    if problems:
        raise ConfigError(
            f"{len(problems)} problem(s) with this merge:\n"
            + "\n".join(f"  {p}" for p in problems),
            hint="See `loft merge --help`.",
        )
    weights = [float(w) for w in (weights or [1.0] * len(refs))]
    adapters = [resolve_adapter(r) for r in refs]
    if register and not name:
        raise ConfigError(
            "merging several adapters makes a new model; name it for the registry",
            hint="Pass --name NAME with --register.",
        )
    if out is not None and Path(out).exists():
        raise ConfigError(f"--out {out} already exists", hint="Pass a new folder for --out.")
    info = _check_bases(adapters, expect_base)
    loras = [load_lora(a) for a in adapters]
    modules = sorted(set().union(*(lo.modules for lo in loras)))
    rank = rank or max(_rank_max(lo) for lo in loras)
    say(
        f"{method} of {', '.join(a.label for a in adapters)} on {info.name} "
        f"({len(modules)} modules)"
    )

    has_tok = any((adapters[0].path / f).is_file() for f in TOKENIZER_FILES)
    tokenizer = load_tokenizer(
        dataclasses.replace(info, path=adapters[0].path) if has_tok else info
    )
    prompts, source = load_prompts(adapters[0], tokenizer, prompts_file)

    say(f"reference: PEFT running all {len(adapters)} adapters at once, weighted ({source})")
    reference = _outputs(_peft_all(load_causal_lm(info), adapters, weights), prompts, tokenizer)

    torch.manual_seed(seed)  # DARE's random pruning
    kind = "adapter" if method in ADAPTER_METHODS else "model"
    svd_error = None
    if method == "cat":
        tensors = cat_adapter(loras, modules, weights)
        r_out = sum(_rank(lo) for lo in loras)
    else:
        deltas = {m: combined_delta(loras, m, method, weights, density) for m in modules}
        if method == "svd":
            tensors, errors = svd_adapter(deltas, rank)
            r_out = rank
            svd_error = {
                "max": max(errors.values()),
                "mean": sum(errors.values()) / len(errors),
                "worst_module": max(errors, key=errors.__getitem__),
            }
            say(
                f"svd to rank {rank}: relative error max {svd_error['max']:.3g}, "
                f"mean {svd_error['mean']:.3g}"
            )
    scratch = Path(tempfile.mkdtemp(prefix=".combine-", dir=loft_home()))
    try:
        if kind == "adapter":
            folder = scratch / "adapter"
            folder.mkdir()
            _save_adapter(folder, loras[0].config, tensors, r_out, modules)
            candidate = load_peft(load_causal_lm(info), folder)
        else:
            candidate = load_causal_lm(info).eval()
            with torch.no_grad():
                for m, d in deltas.items():
                    p = candidate.get_parameter(m.removeprefix(PEFT_PREFIX) + ".weight")
                    p.copy_((p.double() + d).float())
        candidate.double()
        agreement = compare(reference, _outputs(candidate, prompts, tokenizer))
        candidate.float()
        gated = method in EXACT_METHODS
        report = CombineReport(
            method, adapters, weights, density if method in DENSITY_METHODS else None,
            rank if method == "svd" else None, seed,
            {"name": info.name, "sha256": info.sha256, "source": info.source},
            dtype, tolerance, source, agreement, gated, kind, svd_error,
        )  # fmt: skip
        say(
            f"{method} vs all adapters at once: max |logit diff| "
            f"{agreement.max_abs_logit_diff:.3g}, "
            f"greedy identical {agreement.greedy_identical}/{agreement.prompts}"
            + ("" if gated else " (reported: this method changes the function by design)")
        )
        if gated and not agreement.max_abs_logit_diff <= tolerance:
            raise MergeDrift(
                f"the {method} merge drifted: max |logit diff| {agreement.max_abs_logit_diff:.3g} "
                f"against the adapters run together is above the tolerance {tolerance:g}; "
                "nothing was written or registered",
                hint="Check each adapter alone with `loft merge REF --out DIR`.",
            )
        if kind == "model" and dtype != "float32":
            candidate = candidate.to(getattr(torch, dtype))
        _write(
            candidate,
            folder if kind == "adapter" else None,
            tokenizer,
            report,
            out,
            register,
            name,
            say,
            scratch,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def _rank_max(lora: Lora) -> int:
    return max(a.shape[0] for a, _ in lora.modules.values())


def _argument_problems(refs, method, weights, density, rank, dtype, tolerance) -> list[str]:
    problems = []
    if len(refs) < 2:
        problems.append(f"--method {method} merges two or more adapters; got {len(refs)}")
    if method not in METHODS:
        problems.append(f"--method: got {method!r}; one of {', '.join(METHODS)}")
    if weights is not None and len(weights) != len(refs):
        problems.append(f"--weights: {len(weights)} value(s) for {len(refs)} adapters")
    if method in DENSITY_METHODS:
        if density is None:
            problems.append(f"--density: {method} needs the fraction of each update to keep")
        elif not 0 < density <= 1:
            problems.append(f"--density: got {density}; a fraction in (0, 1]")
    elif density is not None:
        problems.append(f"--density: {method} prunes nothing (only ties, dare_ties, dare_linear)")
    if rank is not None and (method != "svd" or rank < 1):
        problems.append(f"--rank: got {rank}; only for --method svd, a positive integer")
    if dtype not in DTYPES:
        problems.append(f"--dtype: got {dtype!r}; one of {', '.join(DTYPES)}")
    elif dtype != "float32" and method in ADAPTER_METHODS:
        problems.append(f"--dtype: {method} writes an adapter (fp32), not a model to cast")
    if tolerance < 0:
        problems.append(f"--tolerance: got {tolerance}; not negative")
    return problems


def _peft_all(base: Any, adapters: list[Adapter], weights: list[float]) -> Any:
    """PEFT's own forward with every adapter active at once, each B scaled by its weight (fp64)."""
    import torch
    from peft.tuners.lora import LoraLayer

    from loft.models.memory import add_peft, load_peft

    names = [f"a{i}" for i in range(len(adapters))]
    model = load_peft(base, adapters[0].path, adapter_name=names[0])  # decrypted in memory
    for n, a in zip(names[1:], adapters[1:], strict=True):
        add_peft(model, a.path, adapter_name=n)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                for n, w in zip(names, weights, strict=True):
                    if n in layer.lora_B:
                        layer.lora_B[n].weight.mul_(w)
    model.base_model.set_adapter(names)
    return model.eval().double()


def _save_adapter(
    folder: Path, first: dict[str, Any], tensors: dict[str, Any], rank: int, modules: list[str]
) -> None:
    """The combined adapter in the scratch folder: encrypted when a KEK is configured."""
    from loft.core import crypto
    from loft.models.memory import save_tensors

    key = crypto.provider()
    cfg = {
        k: v
        for k, v in first.items()
        if k not in ("rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_dropout")
    }
    targets = sorted({m.removeprefix(PEFT_PREFIX) for m in modules})
    cfg.update(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        use_dora=False,
        lora_dropout=0.0,
        target_modules=targets,
    )
    save_tensors(folder / "adapter_model.safetensors", tensors, key)
    text = json.dumps(cfg, indent=2).encode()
    if key is None:
        (folder / "adapter_config.json").write_bytes(text)
    else:
        crypto.write_encrypted(folder / "adapter_config.json", text, key)


def _write(
    candidate: Any,
    adapter_folder: Path | None,
    tokenizer: Any,
    report: CombineReport,
    out: Path | None,
    register: bool,
    name: str | None,
    say: Say,
    scratch: Path,
) -> None:
    if out is None and not register:
        raise ConfigError("nothing to do: pass --out DIR, --register, or both")
    from loft.core import crypto
    from loft.models.memory import save_model

    target = Path(out).expanduser().resolve() if out is not None else scratch / "out"
    key = crypto.provider() if out is None else None  # only registered: keep it encrypted
    with atomic_dir(target) as tmp:
        if adapter_folder is not None:
            for f in adapter_folder.iterdir():
                if out is not None and crypto.is_encrypted(f):  # --out: plaintext, as asked
                    (tmp / f.name).write_bytes(crypto.read_plain(f))
                else:
                    shutil.copyfile(f, tmp / f.name)
        elif key is not None:
            save_model(candidate, tmp, key)
        else:
            candidate.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / "lineage.json", _lineage(report))  # last
    if out is not None:
        report.path = target
        say(f"wrote {target}")
    report.parents = [a.label for a in report.adapters if a.name]
    if register:
        from loft import registry

        mv = registry.register(target, name=name, parents=report.parents)
        report.registered = f"{mv.name}:{mv.version}"


def _lineage(report: CombineReport) -> dict[str, Any]:
    first = report.adapters[0].lineage
    return {
        "base_model": report.base_model,
        "dataset_fingerprint": None,
        "config": first.get("config"),
        "merged_from": [a.to_dict() for a in report.adapters],
        "merge": {
            k: v
            for k, v in report.to_dict().items()
            if k not in ("adapters", "path", "registered", "parents", "base_model")
        },
        "loft_version": __version__,
    }


__all__ = ["ADAPTER_METHODS", "METHODS", "CombineReport", "combine_adapters", "read_recipe"]
