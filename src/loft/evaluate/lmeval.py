"""General-capability regression with lm-evaluation-harness, through lm-eval's own HF backend.

``run_lm_eval`` wraps an already-loaded model and tokenizer in ``lm_eval.models.huggingface.HFLM``
and runs ``lm_eval.simple_evaluate`` on a task list; ``regression`` does that for a candidate and a
baseline and records the candidate's results on its registry version.

Offline is the normal case. Two kinds of task work without a network:

- custom task YAMLs over local files (``dataset_path: json`` with ``dataset_kwargs.data_files``),
  found in an include folder (default ``examples/lm_eval``). lm-eval resolves relative data files
  against the process's working directory, so the include folder is copied to a temp dir with every
  relative ``data_files`` path made absolute against its YAML's folder;
- standard tasks (hellaswag, arc_easy, ...) whose dataset is already in the local HF cache.

``check_tasks_available`` refuses, before any model is loaded, a task lm-eval does not know or one
whose data is not on this machine, naming the dataset and how to get it. It never downloads.
"""

from __future__ import annotations

import gc
import glob
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from loft.core.errors import NotFoundError
from loft.evaluate.loading import Target, load_target
from loft.evaluate.run import compare_rows

LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})
YAML_SUFFIXES = (".yaml", ".yml")


def default_include() -> Path | None:
    """``examples/lm_eval`` under the working directory, else the one in this source checkout."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        folder = root / "examples" / "lm_eval"
        if folder.is_dir():
            return folder
    return None


class _PlainLoader(yaml.SafeLoader):
    """Safe YAML that refuses lm-eval's ``!function`` tags (such files are copied unchanged)."""


def _absolute_files(value: Any, base: Path) -> Any:
    """``data_files`` (a path, a list, or split -> path(s)) with relative paths made absolute."""
    if isinstance(value, str):
        if "://" in value or Path(value).is_absolute():
            return value
        return str((base / value).resolve())
    if isinstance(value, list):
        return [_absolute_files(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _absolute_files(v, base) for k, v in value.items()}
    return value


def _resolve_yaml(src: Path, dst: Path) -> None:
    try:
        cfg = yaml.load(src.read_text(encoding="utf-8"), Loader=_PlainLoader)  # noqa: S506
    except yaml.YAMLError:
        return  # custom tags or not a mapping we understand: keep the copy as it is
    kwargs = cfg.get("dataset_kwargs") if isinstance(cfg, dict) else None
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        return
    kwargs["data_files"] = _absolute_files(kwargs["data_files"], src.parent)
    dst.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


@contextmanager
def resolved_include(include_path: str | Path | None) -> Iterator[Path | None]:
    """A temp copy of ``include_path`` whose YAMLs name their data files by absolute path."""
    if include_path is None:
        yield None
        return
    src = Path(include_path).expanduser().resolve()
    if not src.is_dir():
        raise NotFoundError(
            f"lm-eval include folder {src} does not exist",
            hint="Pass --lm-eval-include DIR, a folder of task YAMLs (see examples/lm_eval).",
        )
    tmp = Path(tempfile.mkdtemp(prefix="loft-lmeval-"))
    try:
        dst = tmp / "tasks"
        shutil.copytree(src, dst)
        for path in sorted(src.rglob("*")):
            if path.suffix in YAML_SUFFIXES and path.is_file():
                _resolve_yaml(path, dst / path.relative_to(src))
        yield dst
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _task_manager(tasks: Sequence[str], include: Path | None) -> Any:
    """An lm-eval TaskManager; the include folder alone when it holds every task (much faster)."""
    from lm_eval.tasks import TaskManager

    if include is not None:
        only = TaskManager(include_path=str(include), include_defaults=False)
        if all(t in only.task_index for t in tasks):
            return only
    return TaskManager(include_path=str(include) if include else None)


def _leaf_configs(tm: Any, name: str, depth: int = 0) -> list[tuple[str, dict[str, Any], Path]]:
    """(task name, config, folder of its YAML) for every task ``name`` stands for."""
    from lm_eval.tasks._index import Kind

    entry = tm.task_index.get(name)
    if entry is None or depth > 8:
        return []
    folder = Path(entry.yaml_path).parent if entry.yaml_path else Path.cwd()
    cfg = dict(entry.cfg or {})
    if entry.kind == Kind.TAG:
        members = [n for n, e in tm.task_index.items() if name in e.tags]
        return [leaf for m in members for leaf in _leaf_configs(tm, m, depth + 1)]
    if entry.kind == Kind.GROUP:
        items = cfg.get("task") or []
        leaves: list[tuple[str, dict[str, Any], Path]] = []
        for item in items if isinstance(items, list) else [items]:
            if isinstance(item, str):
                leaves += _leaf_configs(tm, item, depth + 1)
            elif isinstance(item, dict) and isinstance(item.get("task"), str):
                sub = _leaf_configs(tm, item["task"], depth + 1)
                leaves += sub or [(item["task"], item, folder)]
        return leaves
    return [(name, cfg, folder)]


def _hf_caches() -> tuple[Path, Path]:
    import datasets.config
    from huggingface_hub import constants

    return Path(datasets.config.HF_DATASETS_CACHE), Path(constants.HF_HUB_CACHE)


def _in_hf_cache(dataset_id: str) -> bool:
    """Whether ``dataset_id`` has a prepared copy (Arrow files under ``org___name/``) or a hub
    snapshot holding at least one file in the local caches; an empty folder left by an
    interrupted download is neither."""
    datasets_cache, hub_cache = _hf_caches()
    prepared = dataset_id.replace("/", "___").lower()
    if datasets_cache.is_dir():
        for p in datasets_cache.iterdir():
            if p.name.lower() == prepared and p.is_dir() and next(p.rglob("*.arrow"), None):
                return True
    snapshots = hub_cache / f"datasets--{dataset_id.replace('/', '--')}" / "snapshots"
    return any(f.is_file() for f in snapshots.glob("*/**/*"))  # is_file follows the blob link


def _flat_files(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [f for v in value for f in _flat_files(v)]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _flat_files(v)]
    return []


def _missing_data(task: str, cfg: dict[str, Any], folder: Path) -> str | None:
    """Why ``task``'s data is not on this machine, or None when it is (or cannot be told)."""
    dataset = cfg.get("dataset_path")
    if not isinstance(dataset, str) or not dataset:
        return None
    if dataset in LOCAL_BUILDERS:
        kwargs = cfg.get("dataset_kwargs") or {}
        files = _flat_files(kwargs.get("data_files")) if isinstance(kwargs, dict) else []
        for f in files:
            path = f if Path(f).is_absolute() or "://" in f else str(folder / f)
            if "://" not in path and not glob.glob(path):
                return f"task {task!r} reads data file {path}, which does not exist"
        return None
    if Path(dataset).expanduser().exists() or _in_hf_cache(dataset):
        return None
    name = cfg.get("dataset_name")
    load = f"'{dataset}'" + (f", '{name}'" if name else "")
    return (
        f"task {task!r} needs the Hugging Face dataset {dataset!r}"
        + (f" (config {name!r})" if name else "")
        + " and it is not in the local HF datasets cache; on a connected machine run "
        f'`python -c "import datasets; datasets.load_dataset({load})"` and copy '
        "~/.cache/huggingface to this machine"
    )


def _check(tm: Any, tasks: Sequence[str]) -> None:
    unknown = [t for t in tasks if t not in tm.task_index]
    if unknown:
        near = sorted({n for t in unknown for n in tm.all_tasks if t.lower() in n.lower()})[:8]
        raise NotFoundError(
            f"unknown lm-eval task(s): {', '.join(unknown)}"
            + (f" (similar: {', '.join(near)})" if near else ""),
            hint="Name a task lm-eval ships (`lm-eval ls tasks`) or one defined by a task YAML "
            "in the folder passed as --lm-eval-include (default examples/lm_eval).",
        )
    problems = [
        p for t in tasks for leaf in _leaf_configs(tm, t) if (p := _missing_data(*leaf)) is not None
    ]
    if problems:
        raise NotFoundError(
            "lm-eval task data is not available offline:\n"
            + "\n".join(f"  {p}" for p in dict.fromkeys(problems)),
            hint="Get the data into ~/.cache/huggingface (or HF_DATASETS_CACHE) as above, or "
            "write a custom task YAML over local files (dataset_path: json, dataset_kwargs: "
            "{data_files: ...}) and pass its folder with --lm-eval-include.",
        )


def check_tasks_available(tasks: Sequence[str], include_path: str | Path | None = None) -> None:
    """Raise NotFoundError when a task is unknown or its data is not on this machine."""
    with resolved_include(include_path) as include:
        _check(_task_manager(tasks, include), tasks)


def _flatten_results(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"task": {"acc,none": 0.5, ...}}`` -> ``{"task/acc": 0.5}`` (no stderrs)."""
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric in ("alias", "sample_len") or metric.endswith("_stderr"):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            suffix = "" if filt in ("", "none") else f"_{filt}"
            out[f"{task}/{metric}{suffix}"] = float(value)
    return out


@contextmanager
def _quiet_lm_eval(progress: bool) -> Iterator[None]:
    """lm-eval as a library: no log chatter, its bars only with ``progress``, and none of the
    run metadata loft discards (a `git describe` that prints `fatal: not a git repository`
    outside a checkout, and torch's environment report, which shells out to pip)."""
    import functools

    import lm_eval.evaluator as evaluator
    import tqdm

    saved = (evaluator.get_git_commit_hash, evaluator.add_env_info, tqdm.tqdm.__init__)
    log = logging.getLogger("lm_eval")
    level = log.level
    evaluator.get_git_commit_hash = lambda: None
    evaluator.add_env_info = lambda storage: None
    log.setLevel(logging.ERROR)
    if not progress:  # lm-eval makes its own bars, some with disable=False spelled out

        @functools.wraps(saved[2])
        def silent(self: Any, *args: Any, **kwargs: Any) -> None:
            saved[2](self, *args, **{**kwargs, "disable": True})

        tqdm.tqdm.__init__ = silent
    try:
        yield
    finally:
        evaluator.get_git_commit_hash, evaluator.add_env_info, tqdm.tqdm.__init__ = saved
        log.setLevel(level)


def _evaluate(
    target: Target,
    tasks: Sequence[str],
    tm: Any,
    limit: int | None,
    batch_size: int,
    progress: bool = False,
) -> dict[str, float]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with _quiet_lm_eval(progress):
        hflm = HFLM(pretrained=target.model, tokenizer=target.tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=hflm,
            tasks=list(tasks),
            task_manager=tm,
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
        )
    if not results:
        raise NotFoundError(f"lm-eval returned no results for {', '.join(tasks)}")
    return _flatten_results(results)


def _run(
    target_or_ref: Target | str,
    tasks: Sequence[str],
    tm: Any,
    limit: int | None,
    batch_size: int,
    progress: bool = False,
) -> tuple[Target, dict[str, float]]:
    if isinstance(target_or_ref, Target):
        return target_or_ref, _evaluate(target_or_ref, tasks, tm, limit, batch_size, progress)
    target = load_target(target_or_ref)
    try:
        return target, _evaluate(target, tasks, tm, limit, batch_size, progress)
    finally:
        model, target.model = target.model, None
        del model
        gc.collect()


def run_lm_eval(
    target_or_ref: Target | str,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, float]:
    """Run lm-eval ``tasks`` on a loaded Target or a MODEL_REF; ``{"task/metric": value}``.

    Tasks are checked (known, data on this machine) before a reference is loaded.
    """
    with resolved_include(include_path) as include:
        tm = _task_manager(tasks, include)
        _check(tm, tasks)
        return _run(target_or_ref, tasks, tm, limit, batch_size, progress)[1]


def regression(
    candidate_ref: Target | str,
    baseline_ref: Target | str | None,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """lm-eval ``tasks`` on candidate and baseline: rows {metric, candidate, baseline, delta}.

    A candidate loaded from the registry gets its results recorded on its version, one
    evaluation entry per ``task/metric`` on the basis ``lm-eval <task>, limit``.
    """
    with resolved_include(include_path) as include:
        tm = _task_manager(tasks, include)
        _check(tm, tasks)
        cand, cand_metrics = _run(candidate_ref, tasks, tm, limit, batch_size, progress)
        base_metrics = None
        if baseline_ref is not None:
            base_metrics = _run(baseline_ref, tasks, tm, limit, batch_size, progress)[1]
    if cand.registry_ref:
        from loft import registry
        from loft.registry.evaluations import make_entries

        def on(metric: str) -> dict[str, Any]:
            return {"kind": "lm-eval", "task": metric.rpartition("/")[0], "limit": limit}

        entries = make_entries(cand_metrics, on=None, source="lm-eval", on_for=on)
        registry.record_evaluation(cand.registry_ref, entries)
    return compare_rows(cand_metrics, base_metrics)


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (order kept, duplicates dropped)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return list(dict.fromkeys(t.strip() for t in items if t.strip()))


__all__ = [
    "check_tasks_available",
    "default_include",
    "parse_tasks",
    "regression",
    "resolved_include",
    "run_lm_eval",
]
