"""Exports: a labelling project's final answers as a new dataset version that `loft train`
reads, with the project in its lineage (source ``{"kind": "labelling", "project": ...}``,
parents ``[the project's dataset version]``).

Shapes (each record's final answers: a reviewer's, else the submissions when all agree):

- ``sft``: ``messages`` = the prompt + one assistant turn: the correction when one was given,
  else the response chosen (pairwise) or ranked first (ranking), else the record's response.
- ``preference``: ``prompt/chosen/rejected`` from a pairwise or ranking question: the chosen (or
  first-ranked) response, with its correction applied, against each other response.
- ``kto``: ``prompt/completion/label`` from a rating (above the scale's middle is desirable,
  below it undesirable, the middle itself left out) or a label question (``desirable``: the
  labels that count as desirable).
"""

from __future__ import annotations

from typing import Any

from loft.core.errors import ConfigError
from loft.curate import questions as qs
from loft.curate.store import LabellingStore, Project

SHAPES = ("sft", "preference", "kto")
_CHUNK = 1000


def _best(questions: tuple, answers: dict[str, Any], n: int) -> tuple[int, list[int]]:
    """The index of the preferred response and the others, best first."""
    for q in questions:
        if q.kind == "pairwise" and q.name in answers:
            best = answers[q.name]
            return best, [i for i in range(n) if i != best]
        if q.kind == "ranking" and q.name in answers:
            order = answers[q.name]
            return order[0], order[1:]
    return 0, list(range(1, n))


def _corrected(p: Project, answers: dict[str, Any], response: list[dict]) -> list[dict]:
    for q in p.questions:
        text = answers.get(q.name)
        if q.kind == "correction" and isinstance(text, str) and text.strip():
            return [{"role": "assistant", "content": text.strip()}]
    return response


def shape_records(
    p: Project,
    record: dict[str, Any],
    answers: dict[str, Any],
    shape: str,
    *,
    question: str | None = None,
    desirable: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The canonical records one labelled record becomes in ``shape`` (none, one or more)."""
    prompt, responses = qs.record_parts(record)
    if not responses:
        return []
    best, others = _best(p.questions, answers, len(responses))
    chosen = _corrected(p, answers, responses[best])
    if shape == "sft":
        return [{"messages": prompt + chosen}]
    if shape == "preference":
        q = p.question(question, qs.CHOICE_KINDS)
        if q.name not in answers:
            return []
        best, others = _best((q,), answers, len(responses))
        chosen = _corrected(p, answers, responses[best])
        return [{"prompt": prompt, "chosen": chosen, "rejected": responses[i]} for i in others]
    q = p.question(question, ("rating", "label"))
    value = answers.get(q.name)
    if value is None:
        return []
    if q.kind == "rating":
        middle = (q.scale + 1) / 2
        if value == middle:
            return []
        label = value > middle
    else:
        label = value in desirable
    return [{"prompt": prompt, "completion": chosen, "label": label}]


def export(
    store: LabellingStore,
    project: str,
    shape: str,
    *,
    dataset: str | None = None,
    question: str | None = None,
    desirable: list[str] | None = None,
    actor: str,
    context: dict | None = None,
) -> tuple[Any, dict[str, int]]:
    """Write the project's final answers as a new version of ``dataset`` (default
    ``<project>-<shape>``): ``(the DatasetVersion, counts of what was left out)``."""
    from loft.data import catalog

    p = store.get_project(project)
    if shape not in SHAPES:
        raise ConfigError(f"unknown export shape {shape!r}; one of: {', '.join(SHAPES)}.")
    wanted = tuple(desirable or ())
    if shape == "preference":
        p.question(question, qs.CHOICE_KINDS)
    elif shape == "kto":
        q = p.question(question, ("rating", "label"))
        if q.kind == "label" and not set(wanted) & set(q.labels):
            raise ConfigError(
                f"a KTO export from label question {q.name!r} needs the labels that count as "
                f"desirable (some of {', '.join(q.labels)}).",
                hint='e.g. {"shape": "kto", "desirable": ["good"]}',
            )
    final, left = store.final_answers(project)
    rows: list[dict[str, Any]] = []
    for start in range(0, p.records, _CHUNK):
        chunk = [r for r in range(start, min(p.records, start + _CHUNK)) if r in final]
        if not chunk:
            continue
        records = catalog.read_records(p.dataset, start, min(_CHUNK, p.records - start))
        for r in chunk:
            rows.extend(
                shape_records(p, records[r - start], final[r], shape,
                              question=question, desirable=wanted)
            )  # fmt: skip
    if not rows:
        raise ConfigError(
            f"project {project!r} has nothing to export as {shape} yet: "
            f"{len(final)} records are final; left out: "
            + ", ".join(f"{n} {why}" for why, n in left.items())
            + ".",
            hint="Records are final once every annotator submitted the same answers or a "
            "reviewer resolved them (the review page lists the disagreements).",
        )
    version = catalog.add_version(
        dataset or f"{project}-{shape}",
        rows,
        source={"kind": "labelling", "project": project, "shape": shape},
        parents=[p.dataset],
        created_by=actor,
    )
    store.record_export(project, version.ref, shape, version.records, actor=actor, context=context)
    return version, {"records": len(final), **left}
