"""Pipelines: a job file whose top level is ``stages:``, each stage a job run after the one before
it succeeds (``loft jobs submit retrain.yaml``)::

    stages:
      - kind: train                                  # stages[0]
        config: lora.yaml                            # relative to this file
        set: [training.max_steps=200]
      - kind: eval                                   # stages[1]
        args: ["{registered}", --data, heldout.jsonl]
      - kind: rollout                                # stages[2]
        args: [start, support_tickets, --candidate, "{registered}"]

A stage is ``{kind: train, config: PATH, set: [KEY=VALUE, ...]}`` or ``{kind: K, args: [...]}``
for any other kind (the arguments of ``loft <K's command>``). Every stage is validated when the
pipeline is submitted, as a job of its kind is (a training config as ``loft train`` reads it and
against the planner's memory estimate; a command's arguments as the command parses them), and
every problem is reported at once with its ``FILE:LINE`` and key path (``stages[2].args``).

The first stage is queued with ``spec["then"]`` (the stages after it), ``spec["pipeline"]`` (the
pipeline's id, shared by its stages) and ``spec["stage"]`` (its index). When a stage SUCCEEDS, its
worker queues the next stage in the same transaction as the finish (``JobStore.finish(then=...)``;
dedup key ``pipeline:ID:INDEX`` besides), with the same owner and priority and the finished job
as its ``parent``. A stage that fails or is cancelled stops the pipeline; ``loft jobs retry`` on
it continues the pipeline once it succeeds.

Placeholders in a stage's args are filled from the results of the stages before it:
``{registered}`` (``support_tickets:7``), ``{registered_version}`` (``7``),
``{registered_name}`` (``support_tickets``) and ``{run_dir}``; a training stage produces them. One
with no value when its stage is due (the run before it was not registered) stops the pipeline
there, and the finished stage's row says why (``result.pipeline_stopped``).

A non-training stage runs in the pipeline file's folder (``spec["cwd"]``), so the relative paths
in its args mean what they mean next to the file; a training stage's config path is resolved
when the pipeline is submitted.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from loft.core.errors import ConfigError, LoftError
from loft.jobs.kinds import KINDS, admit_train
from loft.jobs.store import Job, NewJob, new_id

PLACEHOLDERS = ("registered", "registered_version", "registered_name", "run_dir")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")
# what a placeholder looks like while its stage is validated at submit (values come later)
_EXAMPLE = {"registered": "model:1", "registered_version": "1", "registered_name": "model",
            "run_dir": "/run"}  # fmt: skip
_STAGE_KEYS = {"train": ("kind", "config", "set")}
_OTHER_KEYS = ("kind", "args")
HINT = (
    "A pipeline file is `stages:` with a list of stages, each `{kind: train, config: PATH, "
    "set: [KEY=VALUE]}` or `{kind: KIND, args: [...]}` (KIND one of "
    + ", ".join(k for k in KINDS if k != "train")
    + "); placeholders in args: "
    + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
    + "."
)

CheckArgs = Callable[[str, list[str]], None]


def new_pipeline_id() -> str:
    """Sortable like a job id, with a ``p`` in front."""
    return "p" + new_id()[1:]


def _read(path: Path) -> tuple[Any, Any]:
    """(the YAML node tree, the same document as Python values)."""
    try:
        text = path.read_text(encoding="utf-8")
        return yaml.compose(text, Loader=yaml.SafeLoader), yaml.safe_load(text)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the job file ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML ({e})", hint="Fix the YAML syntax.") from None


def is_pipeline(path: str | Path) -> bool:
    """Whether ``path`` is a YAML mapping with a top-level ``stages:`` (else: a training config,
    whose own loader reports its problems)."""
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(doc, dict) and "stages" in doc


def _lines(node: Any, path: str = "") -> dict[str, int]:
    """Each key path of the document (``stages[1].args[0]``) -> its line."""
    out = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                out.update(_lines(value, f"{path}.{key.value}" if path else str(key.value)))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            out.update(_lines(value, f"{path}[{i}]"))
    return out


def load_pipeline(
    path: str | Path,
    *,
    capacities: list[int],
    check_args: CheckArgs,
    max_attempts: int = 3,
) -> list[dict[str, Any]]:
    """Validate every stage of the pipeline file ``path``; the stages as queued jobs will hold
    them: ``{kind, spec, resources, max_attempts, at}``. Raises one ConfigError listing every
    problem (``FILE:LINE stages[i].key: what``). ``check_args(kind, args)`` parses a command's
    arguments as the CLI would (it runs in the file's folder)."""
    path = Path(path).resolve()
    node, doc = _read(path)
    lines = _lines(node) if node is not None else {"": 1}
    problems: list[str] = []

    def problem(key: str, what: str) -> None:
        near = key  # the key's own line, else its nearest enclosing key's
        while near not in lines and near:
            near = re.sub(r"(\.[^.\[]+|\[\d+\])$", "", near) if re.search(r"[.\[]", near) else ""
        problems.append(f"  {path}:{lines.get(near, 1)} {key}: {what}")

    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), list):
        raise ConfigError(f"{path}: no `stages:` list at the top level", hint=HINT)
    for key in doc:
        if key != "stages":
            problem(str(key), "unknown key (a pipeline file has only `stages:`)")
    if not doc["stages"]:
        problem("stages", "no stages")
    stages: list[dict[str, Any]] = []
    trained = False  # a training stage before this one: placeholders have a source
    for i, raw in enumerate(doc["stages"]):
        key = f"stages[{i}]"
        at = f"{path}:{lines.get(key, 1)}"
        stage = _stage(raw, key, at, path.parent, trained, problem, capacities, check_args)
        if stage is not None:
            stage["max_attempts"] = max_attempts
            stages.append(stage)
        trained = trained or (isinstance(raw, dict) and raw.get("kind") == "train")
    if problems:
        raise ConfigError(
            f"{path}: {len(problems)} problem(s) in the pipeline:\n" + "\n".join(problems),
            hint=HINT,
        )
    return stages


def _stage(
    raw: Any,
    key: str,
    at: str,
    folder: Path,
    trained: bool,
    problem: Callable[[str, str], None],
    capacities: list[int],
    check_args: CheckArgs,
) -> dict[str, Any] | None:
    """One stage validated (None, with its problems reported, when it is not valid)."""
    if not isinstance(raw, dict):
        problem(key, f"a stage is a mapping with `kind:`, got {type(raw).__name__}")
        return None
    kind = raw.get("kind")
    if kind not in KINDS:
        problem(f"{key}.kind", f"{kind!r} is not a job kind: one of {', '.join(KINDS)}")
        return None
    allowed = _STAGE_KEYS.get(kind, _OTHER_KEYS)
    bad = [k for k in raw if k not in allowed]
    for k in bad:
        problem(
            f"{key}.{k}", f"unknown key for a stage of kind {kind} (it takes {', '.join(allowed)})"
        )
    if kind == "train":
        return _train_stage(raw, key, at, folder, problem, capacities, admit=not bad)
    args = raw.get("args", [])
    if not isinstance(args, list):
        problem(f"{key}.args", f"a list of the command's arguments, got {type(args).__name__}")
        return None
    out: list[str] = []
    for j, a in enumerate(args):
        if isinstance(a, bool) or not isinstance(a, str | int | float):
            problem(f"{key}.args[{j}]", f"an argument is a string, got {a!r} (quote it)")
            continue
        a = str(a)
        for name in _PLACEHOLDER.findall(a):
            if name not in PLACEHOLDERS:
                known = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
                problem(f"{key}.args[{j}]", f"unknown placeholder {{{name}}} (known: {known})")
            elif not trained:
                problem(
                    f"{key}.args[{j}]",
                    f"{{{name}}} comes from a training stage's result, and no stage before "
                    "this one trains",
                )
        out.append(a)
    if bad or len(out) != len(args):
        return None
    example = [_PLACEHOLDER.sub(lambda m: _EXAMPLE.get(m[1], m[0]), a) for a in out]
    try:
        with contextlib.chdir(folder):  # relative paths as the stage will see them
            check_args(kind, example)
    except LoftError as e:
        problem(f"{key}.args", e.message)
        return None
    return {"kind": kind, "spec": {"args": out, "cwd": str(folder)}, "resources": {}, "at": at}


def _train_stage(
    raw: dict[str, Any],
    key: str,
    at: str,
    folder: Path,
    problem: Callable[[str, str], None],
    capacities: list[int],
    admit: bool,
) -> dict[str, Any] | None:
    """A train stage validated as `loft jobs submit CONFIG` validates one (``admit``: run the
    planner too; not when the stage already has a problem)."""
    config, sets = raw.get("config"), raw.get("set", [])
    if not isinstance(config, str) or not config:
        problem(f"{key}.config", "a train stage names its training config (`config: PATH`)")
        return None
    if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
        problem(f"{key}.set", "a list of `KEY=VALUE` overrides, as `loft train --set` takes")
        return None
    for j, s in enumerate([config, *sets]):
        if _PLACEHOLDER.search(s):
            where = f"{key}.config" if j == 0 else f"{key}.set[{j - 1}]"
            problem(where, "placeholders are filled in a stage's args only")
            return None
    target = (folder / config).resolve()
    if not target.is_file():
        problem(f"{key}.config", f"no file {target}")
        return None
    if not admit:
        return None
    try:
        adm = admit_train(target, list(sets), capacities=capacities)
    except LoftError as e:
        problem(f"{key}.config", e.message.replace("\n", "\n    "))
        return None
    return {"kind": "train", "spec": adm.spec, "resources": adm.resources, "at": at}


def first_job(stages: list[dict[str, Any]], *, owner: str, priority: int = 0) -> NewJob:
    """The job that starts a pipeline of (validated) ``stages``, under a fresh pipeline id."""
    first = stages[0]
    spec = {**first["spec"], "pipeline": new_pipeline_id(), "stage": 0, "then": stages[1:],
            "context": {}}  # fmt: skip
    return NewJob(first["kind"], spec, owner, priority, dict(first["resources"]),
                  int(first.get("max_attempts", 3)))  # fmt: skip


def renewed(spec: dict[str, Any]) -> dict[str, Any]:
    """A pipeline's first job under a fresh pipeline id (a schedule starts a new pipeline each
    time it fires); any other spec as it is."""
    return {**spec, "pipeline": new_pipeline_id()} if "then" in spec else spec


def values(result: dict[str, Any]) -> dict[str, str]:
    """What a finished stage's result gives the placeholders of the stages after it."""
    out: dict[str, str] = {}
    registered = result.get("registered")
    if isinstance(registered, str) and ":" in registered:
        name, _, version = registered.rpartition(":")
        out.update(registered=registered, registered_name=name, registered_version=version)
    if result.get("run_dir"):
        out["run_dir"] = str(result["run_dir"])
    return out


def fill(args: list[str], context: dict[str, str]) -> list[str]:
    """``args`` with their placeholders filled; KeyError naming the first one without a value."""

    def one(m: re.Match[str]) -> str:
        if m[1] not in PLACEHOLDERS:
            return m[0]
        if m[1] not in context:
            raise KeyError(m[1])
        return context[m[1]]

    return [_PLACEHOLDER.sub(one, a) for a in args]


def follow_up(job: Job, result: dict[str, Any]) -> tuple[NewJob | None, str | None]:
    """The next stage to queue now that ``job`` SUCCEEDED with ``result``: (the job, None), or
    (None, why the pipeline stops here), or (None, None) when ``job`` is no pipeline's or was
    its last stage."""
    then = job.spec.get("then") or []
    if not then or not job.spec.get("pipeline"):
        return None, None
    pipeline, index = job.spec["pipeline"], int(job.spec.get("stage", 0)) + 1
    context = {**job.spec.get("context", {}), **values(result)}
    stage, rest = then[0], then[1:]
    spec = dict(stage["spec"])
    if "args" in spec:
        try:
            spec["args"] = fill(spec["args"], context)
        except KeyError as e:
            have = ", ".join(f"{{{k}}}" for k in context) or "none"
            return None, (
                f"stages[{index}] ({stage.get('at', '?')}) needs {{{e.args[0]}}}, which no "
                f"stage before it produced (values: {have}; a training stage gives "
                "{registered} only when its run is registered)"
            )
    spec.update(pipeline=pipeline, stage=index, then=rest, context=context)
    return NewJob(
        stage["kind"], spec, job.owner, job.priority, dict(stage.get("resources") or {}),
        int(stage.get("max_attempts", 3)), dedup=f"pipeline:{pipeline}:{index}", parent=job.id,
    ), None  # fmt: skip


def describe(stage: dict[str, Any]) -> str:
    """One line for a stage: its kind and command line (``loft jobs show``)."""
    spec = stage.get("spec", stage)
    if stage.get("kind") == "train":
        sets = "".join(f" --set {s}" for s in spec.get("set", []))
        return f"train {spec.get('config')}{sets}"
    return " ".join([str(stage.get("kind")), *map(str, spec.get("args", []))])


__all__ = [
    "PLACEHOLDERS",
    "describe",
    "fill",
    "first_job",
    "follow_up",
    "is_pipeline",
    "load_pipeline",
    "new_pipeline_id",
    "renewed",
    "values",
]
