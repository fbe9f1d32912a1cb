"""Preference pairs for the support-ticket task from a trained SFT model's own mistakes.

For each ticket of a chat file (train.jsonl, heldout.jsonl) the model answers greedily, with
loft's own generation harness (``loft.evaluate.generate``: the model's chat template, left-padded
batches, stop at end-of-turn). Every answer that is not exactly the reference JSON string becomes
a pair:

    {"prompt": [system, user],
     "chosen": [{"role": "assistant", "content": <the reference JSON>}],
     "rejected": [{"role": "assistant", "content": <the model's own answer>}]}

Each rejected answer is one of: ``wrong`` (valid JSON, a field's value differs), ``malformed``
(no JSON object can be parsed: cut off, prose) or ``verbose`` (the right object, wrapped in
something else: a fence, trailing text). Answers that differ from the reference only in
whitespace or are empty are skipped and counted (a pair needs two different, non-empty replies).

``--samples K --temperature T`` adds, for every prompt, K sampled answers (seeded per prompt from
``--seed``), kept when wrong in the same sense and not already a rejected answer for that prompt.
Without it (the default) the output depends only on the model and the input files.

    python examples/support_tickets/make_prefs.py support_tickets-lora:1

writes train_prefs.jsonl and heldout_prefs.jsonl beside this script (``--out-dir`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KINDS = ("wrong", "malformed", "verbose")
CHUNK = 256  # prompts per generate() call (it batches them by length within a call)


def classify(pred: str, ref: str) -> str | None:
    """None when ``pred`` is the reference (up to whitespace); else why it is rejected:
    ``empty``, ``wrong``, ``malformed`` or ``verbose``."""
    from loft.evaluate import parse_json_object

    if not pred.strip():
        return "empty"
    if "".join(pred.split()) == "".join(ref.split()):
        return None
    parsed = parse_json_object(pred)
    if parsed is None:
        return "malformed"
    if parsed != parse_json_object(ref):
        return "wrong"
    return "verbose"


def make_pairs(
    records: list[dict[str, Any]], answers: list[list[str]]
) -> tuple[list[dict[str, Any]], Counter]:
    """Pairs for each record's distinct rejected answers (in the order given), and counts of
    what each answer was (``ok``, ``empty``, a kind, ``duplicate``)."""
    from loft.evaluate.harness import split_record

    pairs: list[dict[str, Any]] = []
    counts: Counter = Counter()
    for i, (rec, preds) in enumerate(zip(records, answers, strict=True)):
        prompt, ref = split_record(rec, i)
        seen: set[str] = set()
        for pred in preds:
            kind = classify(pred, ref)
            if kind is None or kind == "empty":
                counts[kind or "ok"] += 1
                continue
            key = " ".join(pred.split())
            if key in seen:
                counts["duplicate"] += 1
                continue
            seen.add(key)
            counts[kind] += 1
            pairs.append(
                {
                    "prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
                    "chosen": [{"role": "assistant", "content": ref}],
                    "rejected": [{"role": "assistant", "content": pred}],
                }
            )
    return pairs, counts


def sample_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    *,
    k: int,
    temperature: float,
    seed: int,
    max_new_tokens: int,
    label: str = "",
) -> list[list[str]]:
    """K answers per prompt sampled at ``temperature`` (no top-k/top-p cut), with the same
    rendering and stop tokens as ``loft.evaluate.generate``. loft's harness generates greedily
    only, so this calls ``model.generate`` itself: one call per prompt (its K answers, no
    padding), seeded with ``seed * 1_000_003 + i``, so prompt i's answers do not depend on the
    others."""
    import torch
    from transformers import GenerationConfig

    from loft.data.preference import end_of_turn_ids
    from loft.evaluate.harness import render_prompts

    eos = sorted(end_of_turn_ids(tokenizer))
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        num_return_sequences=k,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
    )
    out: list[list[str]] = []
    model.eval()
    t0 = time.time()
    with torch.inference_mode():
        for i, text in enumerate(render_prompts(tokenizer, prompts)):
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            torch.manual_seed(seed * 1_000_003 + i)
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
            )
            out.append(tokenizer.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True))
            if (i + 1) % CHUNK == 0 or i + 1 == len(prompts):
                print(
                    f"  {label}: {i + 1}/{len(prompts)} sampled x{k}, {time.time() - t0:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="SFT model: registry ref (support_tickets-lora:1) or run dir.")
    p.add_argument("--train", type=Path, default=HERE / "train.jsonl")
    p.add_argument("--heldout", type=Path, default=HERE / "heldout.jsonl")
    p.add_argument("--out-dir", type=Path, default=HERE)
    p.add_argument("--max-new-tokens", type=int, default=32, help="As `loft demo` scores.")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples", type=int, default=0, help="Sampled answers per prompt (0: none).")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="Seeds the sampled answers.")
    args = p.parse_args(argv)

    from loft.evaluate import generate, json_exact_match, load_jsonl_records
    from loft.evaluate.harness import split_record
    from loft.evaluate.loading import load_target

    target = load_target(args.model)
    print(f"model {target.name} (sha256 {target.sha256[:12]})", file=sys.stderr)
    summary: dict[str, Any] = {"model": target.name, "sha256": target.sha256}
    for split, src in (("train", args.train), ("heldout", args.heldout)):
        records = load_jsonl_records(src)
        prompts = [split_record(r, i)[0] for i, r in enumerate(records)]
        t0 = time.time()
        greedy: list[str] = []
        for start in range(0, len(prompts), CHUNK):  # in chunks, to say how far it got
            greedy += generate(
                target.model,
                target.tokenizer,
                prompts[start : start + CHUNK],
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                progress=False,
            )
            print(
                f"  {split}: {len(greedy)}/{len(prompts)} answered, {time.time() - t0:.0f}s",
                file=sys.stderr,
                flush=True,
            )
        answers = [[g] for g in greedy]
        if args.samples:
            sampled = sample_answers(
                target.model,
                target.tokenizer,
                prompts,
                k=args.samples,
                temperature=args.temperature,
                seed=args.seed,
                max_new_tokens=args.max_new_tokens,
                label=split,
            )
            answers = [[g, *s] for g, s in zip(greedy, sampled, strict=True)]
        pairs, counts = make_pairs(records, answers)
        out = args.out_dir / f"{split}_prefs.jsonl"
        write_jsonl(out, pairs)
        refs = [split_record(r, i)[1] for i, r in enumerate(records)]
        exact = sum(json_exact_match(g, r) for g, r in zip(greedy, refs, strict=True))
        line = {
            "split": split,
            "records": len(records),
            "greedy_json_exact_match": round(exact / len(records), 4),
            "pairs": len(pairs),
            "prompts_with_pairs": len({json.dumps(p["prompt"]) for p in pairs}),
            **{k: counts.get(k, 0) for k in (*KINDS, "empty", "duplicate")},
            "seconds": round(time.time() - t0, 1),
            "file": str(out),
        }
        summary[split] = line
        print(
            f"{out}: {len(pairs)} pairs from {len(records)} tickets "
            f"(greedy json exact match {exact:.0f}/{len(records)}; "
            + ", ".join(f"{k} {counts.get(k, 0)}" for k in (*KINDS, "empty", "duplicate"))
            + f"; {line['seconds']:.0f}s)"
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
