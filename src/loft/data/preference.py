"""Preference rows: prompt and completions rendered with the model's chat template.

For each record the prompt is rendered with the generation prompt (P) and each completion as
prompt + completion (Q); both are tokenized (``add_special_tokens=False``: the template writes any
BOS it wants). The completion's tokens are ``Q[len(P):]`` up to and including its closing
end-of-turn token (whitespace the template writes after it, SmolLM2's ``\\n``, is dropped), so
``prompt_ids + completion_ids`` is the rendering of prompt + completion up to that token. Two
things are refused, never warned about (TRL warns and trains on the wrong tokens):

- P is not a token prefix of Q: the template renders the prompt differently when a reply follows
  (or a BPE merge crosses the boundary), so the completion's tokens cannot be told apart;
- the completion does not end with an end-of-turn token: the template's own (found by rendering
  a probe conversation) or ``tokenizer.eos_token_id``. Nothing here looks at pad ids (SmolLM2's
  pad == eos).

A record whose prompt + longest completion is longer than ``data.max_seq_len`` is dropped whole
and counted (``too_long``), never truncated: a cut completion would lose its end-of-turn token and
a cut prompt would score the completion against a question the model never saw.

Rows: paired (dpo, orpo, simpo) ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (int32 lists)
and ``length`` = prompt + chosen + rejected tokens; unpaired (kto) ``prompt_ids``,
``completion_ids``, ``label`` (bool) and ``length`` = prompt + completion tokens. Unpaired rows
from a pair file are derived: chosen with label true, then rejected with label false.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loft.core.errors import DataError
from loft.core.paths import datasets_dir
from loft.core.specs import DataSpec
from loft.data.formats import Record, canonical_json
from loft.data.prepare import (
    MANIFEST,
    PreparedDataset,
    build_report,
    clean_and_split,
    compute_fingerprint,
    length_summary,
    load_prepared,
    no_rows_error,
    progress_bar,
    read_inputs,
    save_prepared,
)
from loft.data.readers import FileResult
from loft.data.template import tokenizer_fingerprint
from loft.data.validate import MAX_SHOWN, Problem

if TYPE_CHECKING:
    import datasets

_PROBE = "loft-end-of-turn-probe"
COMPLETIONS = {True: ("chosen", "rejected"), False: ("completion",)}


def preference_features(paired: bool) -> datasets.Features:
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    cols: dict[str, Any] = {"prompt_ids": ids}
    if paired:
        cols |= {"chosen_ids": ids, "rejected_ids": ids}
    else:
        cols |= {"completion_ids": ids, "label": datasets.Value("bool")}
    cols["length"] = datasets.Value("int32")
    return datasets.Features(cols)


# --------------------------------------------------------------------------------- rendering


def _render(tokenizer: Any, messages: list[dict[str, str]], *, gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """The ids that may close an assistant turn: ``eos_token_id`` and the special token the chat
    template writes right after an assistant message (SmolLM2: ``<|im_end|>``, both)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "preference data is rendered with one",
            hint="Use a model with a chat template (an instruct model).",
        )
    out = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    probe = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": _PROBE},
        {"role": "user", "content": "Hi"},
    ]
    try:
        after = _render(tokenizer, probe, gen=False).split(_PROBE, 1)[1]
    except Exception:  # a template that refuses the probe: eos alone
        return out
    ids = _ids(tokenizer, after)
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(
        getattr(tokenizer, "added_tokens_decoder", {})
    )
    if ids and ids[0] in special:
        out.add(ids[0])
    return out


def _completion_ids(
    prompt_ids: list[int],
    full_ids: list[int],
    tokenizer: Any,
    eot: set[int],
    key: str,
) -> tuple[list[int] | None, Problem | None]:
    n = len(prompt_ids)
    if full_ids[:n] != prompt_ids:
        k = next(
            (i for i, (a, b) in enumerate(zip(prompt_ids, full_ids, strict=False)) if a != b),
            min(n, len(full_ids)),
        )
        alone = tokenizer.decode(prompt_ids[k : k + 3])
        followed = tokenizer.decode(full_ids[k : k + 3])
        return None, (
            key,
            f"the rendered prompt is not a token prefix of prompt + {key}: they differ at "
            f"token {k} ({alone!r} alone, {followed!r} when {key} follows); the chat template "
            "renders the prompt differently when a reply follows, so the completion's tokens "
            "cannot be told apart from the prompt's",
        )
    ids = full_ids[n:]
    while ids and ids[-1] not in eot and not tokenizer.decode(ids[-1:]).strip():
        ids.pop()  # what the template writes after the end-of-turn token (a newline)
    if not ids or ids[-1] not in eot:
        names = ", ".join(sorted(repr(tokenizer.convert_ids_to_tokens(t)) for t in eot))
        tail = tokenizer.decode(full_ids[n:][-5:])
        return None, (
            key,
            f"does not end with an end-of-turn token ({names or 'the tokenizer has none'}) "
            f"once rendered (it ends {tail!r}); a model trained on it would not learn to stop",
        )
    return ids, None


def tokenize_preference(
    data: dict[str, Any], tokenizer: Any, *, eot_ids: set[int] | None = None
) -> tuple[dict[str, list[int]] | None, list[Problem]]:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` for a canonical pair, or
    ``{"prompt_ids", "completion_ids"}`` for a kto row; or None and (field, reason) problems."""
    eot = end_of_turn_ids(tokenizer) if eot_ids is None else eot_ids
    prompt = data["prompt"]
    prompt_ids = _ids(tokenizer, _render(tokenizer, prompt, gen=True))
    out: dict[str, list[int]] = {"prompt_ids": prompt_ids}
    problems: list[Problem] = []
    for key in COMPLETIONS["chosen" in data]:
        full = _ids(tokenizer, _render(tokenizer, prompt + data[key], gen=False))
        ids, problem = _completion_ids(prompt_ids, full, tokenizer, eot, key)
        if problem is not None:
            problems.append(problem)
        else:
            out[f"{key}_ids"] = ids
    return (None if problems else out), problems


# ---------------------------------------------------------------------------------- preparing


def _rows(
    records: list[Record],
    tokenizer: Any,
    eot: set[int],
    *,
    paired: bool,
    max_seq_len: int,
    label: str,
    progress: bool,
) -> tuple[dict[str, list], int, list[str], int]:
    """(columns, records dropped as too long, problems as ``FILE:LINE: field: reason``, records
    with problems)."""
    cols: dict[str, list] = {k: [] for k in preference_features(paired)}
    too_long = n_bad = 0
    problems: list[str] = []
    with progress_bar(len(records), label, progress) as tick:
        for r in records:
            out, issues = tokenize_preference(r.data, tokenizer, eot_ids=eot)
            tick()
            if out is None:
                problems += [f"{r.loc}: {field}: {why}" for field, why in issues]
                n_bad += 1
                continue
            prompt = out["prompt_ids"]
            sides = [v for k, v in out.items() if k != "prompt_ids"]
            if len(prompt) + max(len(s) for s in sides) > max_seq_len:
                too_long += 1
                continue
            if paired:
                _add(cols, prompt, chosen_ids=out["chosen_ids"], rejected_ids=out["rejected_ids"])
            elif "completion_ids" in out:
                _add(cols, prompt, completion_ids=out["completion_ids"], label=r.data["label"])
            else:  # kto rows derived from a pair
                _add(cols, prompt, completion_ids=out["chosen_ids"], label=True)
                _add(cols, prompt, completion_ids=out["rejected_ids"], label=False)
    return cols, too_long, problems, n_bad


def _add(cols: dict[str, list], prompt: list[int], **row: Any) -> None:
    cols["prompt_ids"].append(prompt)
    for k, v in row.items():
        cols[k].append(v)
    cols["length"].append(len(prompt) + sum(len(v) for v in row.values() if isinstance(v, list)))


def preference_stats(cols: dict[str, list], *, paired: bool) -> dict[str, Any] | None:
    """Row lengths, and prompt / completion tokens (chosen and rejected, or the desirable and
    undesirable counts)."""
    if not cols["length"]:
        return None
    keys = ["chosen_ids", "rejected_ids"] if paired else ["completion_ids"]
    per = {k: sum(len(ids) for ids in cols[k]) for k in keys}
    stats = {
        **length_summary(cols["length"]),
        "prompt_tokens": sum(len(ids) for ids in cols["prompt_ids"]),
        "completion_tokens": sum(per.values()),
        "trained_tokens": sum(per.values()),
    }
    if paired:
        stats |= {"chosen_tokens": per["chosen_ids"], "rejected_tokens": per["rejected_ids"]}
    else:
        desirable = sum(cols["label"])
        stats |= {"desirable": desirable, "undesirable": len(cols["label"]) - desirable}
    return stats


def _prompt_key(r: Record) -> str:
    return canonical_json({"prompt": r.data["prompt"]})


def prepare_preference_dataset(
    spec: DataSpec, tokenizer: Any, *, paired: bool, progress: bool = True
) -> PreparedDataset:
    """Validate, clean, split and tokenize preference data; cached by fingerprint (which holds
    ``paired`` and the file's format) under ``LOFT_HOME/datasets/<fingerprint>``.

    ``paired``: rows of prompt/chosen/rejected ids for dpo, orpo and simpo (a kto file is
    refused); else rows of prompt/completion ids with a label, for kto (from a kto file, or two
    per pair of a preference file). Raises DataError listing every invalid record (unless
    ``spec.skip_invalid``), then every record the chat template cannot render as prompt +
    completion ending in an end-of-turn token (always)."""
    layout = "paired" if paired else "unpaired"
    return prepare_preference_inputs(spec, tokenizer, read_inputs(spec, layout), paired, progress)


def prepare_preference_inputs(
    spec: DataSpec,
    tokenizer: Any,
    inputs: tuple[FileResult, FileResult | None],
    paired: bool,
    progress: bool,
) -> PreparedDataset:
    unused = [
        f"{key}: {value}"
        for key, value in (("train_on_inputs", spec.train_on_inputs), ("canaries", spec.canaries))
        if value
    ]
    if unused:
        raise DataError(
            f"data.{', data.'.join(unused)} is for supervised fine-tuning; preference objectives "
            "never train on prompts and take no canaries",
            hint="Remove the key(s) from the data section.",
        )
    layout = "paired" if paired else "unpaired"
    train_res, eval_res = inputs
    tok_fp = tokenizer_fingerprint(tokenizer)
    fp = compute_fingerprint(spec, train_res, eval_res, tok_fp, layout)
    if (datasets_dir() / fp / MANIFEST).is_file():
        return load_prepared(fp)

    # exact duplicates only: several pairs per prompt are the norm, and near-duplicate
    # detection would take pairs that differ in one reply for copies
    cleaned = clean_and_split(
        spec, train_res, eval_res, near_dups=False, group=_prompt_key, progress=progress
    )
    eot = end_of_turn_ids(tokenizer)
    kw = {"paired": paired, "max_seq_len": spec.max_seq_len, "progress": progress}
    train_rows, t_long, t_bad, t_n = _rows(
        cleaned.train, tokenizer, eot, label="tokenizing train", **kw
    )
    eval_rows, e_long, e_bad, e_n = _rows(
        cleaned.eval, tokenizer, eot, label="tokenizing eval", **kw
    )
    if t_bad or e_bad:
        n = len(cleaned.train) + len(cleaned.eval)
        raise _template_error(t_bad + e_bad, t_n + e_n, n, tokenizer)
    counts = cleaned.counts
    counts["too_long"] = t_long + e_long
    counts["train_records"] = len(train_rows["length"])
    counts["eval_records"] = len(eval_rows["length"])
    if not counts["train_records"]:
        raise no_rows_error(
            train_res.path,
            f"{t_long} longer than max_seq_len={spec.max_seq_len} (prompt + longest completion)",
        )
    stats = {
        "train": preference_stats(train_rows, paired=paired),
        "eval": preference_stats(eval_rows, paired=paired),
    }
    report = build_report(fp, spec, layout, inputs, tokenizer, tok_fp, cleaned, counts, stats)
    save_prepared(fp, report, preference_features(paired), train_rows, eval_rows)
    prepared = load_prepared(fp)
    prepared.report["cached"] = False
    return prepared


def _template_error(problems: list[str], records: int, n: int, tokenizer: Any) -> DataError:
    name = getattr(tokenizer, "name_or_path", "") or "the model"
    lines = [f"{records} of {n} records cannot be rendered for preference training with "]
    lines[0] += f"{name}'s chat template:"
    lines += [f"  {p}" for p in problems[:MAX_SHOWN]]
    if len(problems) > MAX_SHOWN:
        lines.append(f"  … and {len(problems) - MAX_SHOWN} more")
    return DataError(
        "\n".join(lines),
        problems=problems,
        hint="The chat template must render a prompt the same whether or not a reply follows, "
        "and close every assistant turn with its end-of-turn (or eos) token; use a model whose "
        "template does, or fix the chat_template in its tokenizer_config.json.",
    )
