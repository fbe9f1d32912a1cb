"""Training throughput: loft's path vs stock TRL SFTTrainer + PEFT, same model, data and tokens.

    .venv/bin/python bench/train_throughput.py [--steps 12] [--micro-batch 8]

Both paths train LoRA (r16, all-linear) on the same prepared examples for the same number of
optimizer steps. The data is variable-length chat: multi-turn conversations of 1-8 exchanges
built from the demo's support tickets. Stock TRL gets the pre-tokenized `input_ids` + `labels`,
so both compute the loss on exactly the same tokens, and otherwise keeps its defaults (no
packing, padding to the batch's longest, its own bf16 and checkpointing defaults). Each path
runs in its own child process so peak RSS is per path. Tokens/s counts real, non-padding tokens.
The two losses on the same batch are printed first to show both paths compute the same objective.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from _child import run_child

ROOT = Path(__file__).resolve().parents[1]
TICKETS = ROOT / "examples" / "support_tickets" / "train.jsonl"
DATA = Path(tempfile.gettempdir()) / "loft-bench-multiturn.jsonl"


def write_variable_length_chat(path: Path, seed: int = 0) -> Path:
    """Multi-turn chats of 1-8 ticket exchanges each (~110 to ~650 tokens): the length spread
    of real chat data, where padding to the batch's longest wastes compute."""
    import random

    rng = random.Random(seed)
    recs = [json.loads(line) for line in TICKETS.read_text().splitlines() if line.strip()]
    out, i = [], 0
    while i < len(recs):
        k = rng.randint(1, 8)
        group = recs[i : i + k]
        i += k
        msgs = [group[0]["messages"][0]]  # one system prompt
        for r in group:
            msgs += r["messages"][1:]
        out.append(json.dumps({"messages": msgs}))
    path.write_text("\n".join(out) + "\n")
    return path


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prepared(model_ref: str, max_seq_len: int):
    from loft.core.specs import DataSpec
    from loft.data import prepare_dataset
    from loft.models import load_tokenizer, resolve_model

    info = resolve_model(model_ref)
    tok = load_tokenizer(info)
    spec = DataSpec(train=str(DATA), max_seq_len=max_seq_len, eval_fraction=0.0)
    return info, tok, prepare_dataset(spec, tok, progress=False)


def run_loft(args: argparse.Namespace, q: mp.Queue) -> None:
    from loft.core.config import validate_config
    from loft.train import train

    cfg = validate_config(
        {
            "base_model": args.model,
            "method": "lora",
            "data": {"train": str(DATA), "eval_fraction": 0.0, "max_seq_len": args.max_seq_len},
            "training": {
                "max_steps": args.steps,
                "micro_batch_size": args.micro_batch,
                "lr": 2e-4,
                "save_every": 10_000,
                "eval_every": 10_000,
            },
            "output_dir": tempfile.mkdtemp(prefix="loft-bench-"),
            "tracking": {"experiment": "bench"},
        }
    )
    s = train(cfg, progress=False).summary
    q.put(
        {
            "path": "loft",
            "tokens": s["train_tokens"],
            "seconds": s["train_s"],
            "tokens_per_s": s["train_tokens"] / s["train_s"],
            "final_loss": s["final_train_loss"],
            "peak_rss": _peak_rss(),
            "placement": s.get("placement"),
        }
    )


def run_trl(args: argparse.Namespace, q: mp.Queue) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from loft.models import load_causal_lm

    info, tok, ds = _prepared(args.model, args.max_seq_len)
    train_ds = Dataset.from_dict({"input_ids": ds.train["input_ids"], "labels": ds.train["labels"]})
    model = load_causal_lm(info, dtype=torch.float32)
    out = tempfile.mkdtemp(prefix="trl-bench-")
    cfg = SFTConfig(
        output_dir=out,
        max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch,
        learning_rate=2e-4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        max_length=args.max_seq_len,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),  # required on CPU, else its bf16 default refuses
    )
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    trainer = SFTTrainer(
        model=model, args=cfg, train_dataset=train_ds, processing_class=tok, peft_config=peft_cfg
    )
    counted = {"tokens": 0}
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        counted["tokens"] += sum(len(e["input_ids"]) for e in examples)
        return batch

    trainer.data_collator = counting
    t0 = time.perf_counter()
    result = trainer.train()
    dt = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tail = losses[-10:]
    q.put(
        {
            "path": "trl",
            "tokens": counted["tokens"],
            "seconds": dt,
            "tokens_per_s": counted["tokens"] / dt,
            "final_loss": sum(tail) / len(tail) if tail else result.training_loss,
            "peak_rss": _peak_rss(),
            "placement": f"bf16={cfg.bf16}, gradient_checkpointing={cfg.gradient_checkpointing}",
        }
    )


def same_objective(args: argparse.Namespace, q: mp.Queue) -> None:
    """Loss of the base model on one batch: loft packed (LM head on labelled rows only) vs the
    stock padded forward with transformers' own loss."""
    import torch

    from loft.data.packing import pack_batch, pad_batch
    from loft.models import load_causal_lm
    from loft.train.loss import loss_sum

    info, tok, ds = _prepared(args.model, args.max_seq_len)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in ds.train.select(range(8))]
    model = load_causal_lm(info, dtype=torch.float32).eval()
    with torch.no_grad():
        ls, n = loss_sum(model, pack_batch(rows))
        padded = pad_batch(rows, tok.pad_token_id)
        stock = model(
            input_ids=padded["input_ids"],
            attention_mask=padded["attention_mask"],
            labels=padded["labels"],
        ).loss
    q.put({"loft_loss": float(ls) / n, "stock_loss": float(stock)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--json", action="store_true", help="Print only the result JSON.")
    args = ap.parse_args()
    write_variable_length_chat(DATA)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LOFT_HOME", tempfile.mkdtemp(prefix="loft-bench-home-"))
    # warm the caches (model conversion, dataset prep) outside the timed children
    _prepared(args.model, args.max_seq_len)

    obj = run_child(same_objective, args)
    loft = run_child(run_loft, args)
    trl = run_child(run_trl, args)
    ratio = loft["tokens_per_s"] / trl["tokens_per_s"]
    result = {
        "steps": args.steps,
        "micro_batch": args.micro_batch,
        "same_batch_loss": obj,
        "loft": loft,
        "trl": trl,
        "speedup": round(ratio, 2),
    }
    if args.json:
        print(json.dumps(result))
        return
    rel = abs(obj["loft_loss"] - obj["stock_loss"]) / obj["stock_loss"]
    print(
        f"same batch, base model: loft loss {obj['loft_loss']:.6f}  stock loss "
        f"{obj['stock_loss']:.6f}  (relative diff {rel:.1e})"
    )
    print(
        f"{'path':6} {'tokens':>8} {'seconds':>8} {'tok/s':>8} {'final loss':>10} {'peak RSS':>9}"
    )
    for r in (loft, trl):
        print(
            f"{r['path']:6} {r['tokens']:>8,} {r['seconds']:>8.1f} {r['tokens_per_s']:>8.1f} "
            f"{r['final_loss']:>10.4f} {r['peak_rss'] / 2**30:>8.2f}G   ({r['placement']})"
        )
    print(f"speedup loft / stock TRL: {ratio:.2f}x")
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
