"""DPO throughput and memory: loft's path vs stock TRL DPOTrainer + PEFT, same model, pairs, beta.

    .venv/bin/python bench/dpo_throughput.py [--steps 10] [--micro-batch 8] [--pairs N] [--json]

Both paths train a fresh LoRA (r16, alpha 32, all-linear, dropout 0) on SmolLM2-135M-Instruct with
DPO (sigmoid loss, beta 0.1, reference = the base with the adapter disabled) for the same number
of optimizer steps at the same micro-batch of pairs and the same learning rate.

The pairs are built from examples/support_tickets/train.jsonl, deterministic for ``--seed``: the
prompt is the ticket's system + user turns, chosen is the correct JSON, rejected a plausible wrong
answer (one field changed to another allowed value, or the right JSON wrapped in verbose prose).
By default there are steps x micro-batch of them, so each path trains every pair exactly once (one
epoch, each in its own order) and both count the same tokens; a larger ``--pairs`` only lengthens
loft's reference pass (~1,000 pairs take it minutes on 2 cores). loft prepares them (chat
template; a completion is the reply up to its <|im_end|>) and TRL gets exactly those token ids
(``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``, the columns its own data collator reads), so
both train the same tokens. TRL's own tokenizer pass would add the newline the template writes
after <|im_end|> to every completion, a token loft does not train.

TRL keeps its defaults except what has to be decided for this CPU: its configs turn on bf16 and
gradient checkpointing by default; here both are set to what loft's run uses (its placement,
printed below: bf16 autocast when the CPU has AVX512-BF16 or AMX, no checkpointing on CPU).
transformers refuses bf16 without a GPU unless ``use_cpu=True``; that flag only picks the CPU
device, which is the only one here, and the child checks that every parameter is still on the CPU
and that the base weights stay fp32 under autocast, as loft's do. So TRL pads each micro-batch to
its longest sequence, runs the reference forward (adapter disabled) in every step, and computes
log-probabilities with its fused LM head on completion positions only.

Each path runs in its own child process, so peak RSS is per path. Pair tokens/s counts real tokens
only: prompt + chosen + rejected of every pair trained, once each (no padding; TRL feeds the
prompt twice, which is not counted twice; loft feeds it once, the rejected completion reading it
as a shared prefix). Times are each loop's own: loft's ``train_s`` (its
steps), TRL's from ``on_train_begin`` to the last ``on_step_end``. loft computes the reference
log-probabilities once, before the first step, for the whole file (then caches them): that pass is
timed separately, and the headline ratio charges loft for it pro rata (its time per pair x the
pairs trained; all of it with the default one epoch), which is what a first epoch costs; the ratio
with the reference already cached (a later epoch, a resume, a re-run) is printed beside it.

First, both paths' DPO loss on the same batch with the same weights, in fp32, each through its own
code (loft's PreferenceObjective on a packed row; TRL's data collator and ``compute_loss`` on its
padded batch): with a fresh LoRA (policy = reference, so ln 2 = 0.6931), then after the same
seeded non-zero ``lora_B`` is copied into both models (the reference stays the base).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _child import run_child

ROOT = Path(__file__).resolve().parents[1]
TICKETS = ROOT / "examples" / "support_tickets" / "train.jsonl"
WORK = "LOFT_BENCH_DPO_WORK"  # scratch folder: pairs, LOFT_HOME, outputs; removed at exit
R, ALPHA, BETA = 16, 32, 0.1
LR = 5e-5
PROSE = [
    "Sure! Here is the ticket classified as JSON:\n\n{j}\n\nLet me know if you need anything else.",
    "I've read the ticket carefully. Based on its content, the classification is:\n{j}",
    "Of course. {j} I hope this helps resolve the customer's issue quickly!",
    "Here's my analysis of the support ticket.\n\n```json\n{j}\n```",
]


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` preference pairs from the tickets: chosen = the correct JSON; rejected = one field
    set to another allowed value (half of them) or the correct JSON wrapped in prose."""
    import random

    rng = random.Random(seed)
    recs = [json.loads(line) for line in TICKETS.read_text().splitlines() if line.strip()]
    rng.shuffle(recs)
    out = []
    for rec in recs[:n]:
        system, user, answer = rec["messages"]
        allowed = dict(re.findall(r"(\w+): ([^;]+)", system["content"].split(".", 1)[1]))
        truth = json.loads(answer["content"])
        if rng.random() < 0.5:
            field = rng.choice(sorted(truth))
            wrong = dict(truth)
            wrong[field] = rng.choice([v for v in allowed[field].split("|") if v != truth[field]])
            rejected = json.dumps(wrong, separators=(",", ":"))
        else:
            rejected = rng.choice(PROSE).format(j=answer["content"])
        out.append(
            json.dumps(
                {
                    "prompt": [system, user],
                    "chosen": [answer],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        )
    path.write_text("\n".join(out) + "\n")
    return path


def _data() -> Path:
    return Path(os.environ[WORK]) / "pairs.jsonl"


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def loft_config(args: argparse.Namespace, precision: str = "auto"):
    from loft.core.config import validate_config

    return validate_config(
        {
            "base_model": args.model,
            "method": "lora",
            "objective": "dpo",
            "preference": {"beta": BETA, "loss_type": "sigmoid"},
            "data": {"train": str(_data()), "eval_fraction": 0.0, "max_seq_len": args.max_seq_len},
            "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": "all-linear"},
            "training": {
                "max_steps": args.steps,
                "micro_batch_size": args.micro_batch,
                "lr": LR,
                "precision": precision,
                "save_every": 10_000,
                "eval_every": 10_000,
            },
            "output_dir": tempfile.mkdtemp(prefix="loft-", dir=os.environ[WORK]),
            "tracking": {"experiment": "bench"},
            "register": False,
        }
    )


def _prepared(args: argparse.Namespace):
    from loft.data import prepare_preference_dataset
    from loft.models import load_tokenizer, resolve_model

    info = resolve_model(args.model)
    tok = load_tokenizer(info)
    spec = loft_config(args).data
    return info, tok, prepare_preference_dataset(spec, tok, paired=True, progress=False)


def _trl_trainer(args: argparse.Namespace, model, tok, rows, *, bf16: bool, steps: int):
    """Stock DPOTrainer + PEFT on loft's token ids (its ``_prepare_dataset`` would tokenize the
    conversations again; everything from the collator on is TRL's own)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *_args, **_kwargs):
            return dataset

    train_ds = Dataset.from_dict(
        {
            "prompt_ids": list(rows["prompt_ids"]),
            "chosen_ids": list(rows["chosen_ids"]),
            "rejected_ids": list(rows["rejected_ids"]),
        }
    )
    cfg = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-", dir=os.environ[WORK]),
        max_steps=steps,
        per_device_train_batch_size=args.micro_batch,
        learning_rate=LR,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=args.max_seq_len,
        bf16=bf16,  # TRL's default is True; loft's placement decides (see the docstring)
        activation_checkpointing=False,  # TRL's default is True; loft's is off on CPU
        use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 without it on CPU
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    peft_cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear")
    return PreTokenized(
        model=model, args=cfg, train_dataset=train_ds, processing_class=tok, peft_config=peft_cfg
    )


def run_loft(args: argparse.Namespace, q: mp.Queue) -> None:
    from loft.train import train
    from loft.train.preference import PreferenceObjective
    from loft.train.sft import make_plan

    ref = {}
    setup = PreferenceObjective.setup

    def timed_setup(self, model, run_dir, summary):  # the reference pass, timed
        t0 = time.perf_counter()
        setup(self, model, run_dir, summary)
        ref["seconds"] = time.perf_counter() - t0
        ref["pairs"] = summary["reference"]["computed_examples"]

    PreferenceObjective.setup = timed_setup
    cfg = loft_config(args)
    s = train(cfg, progress=False).summary
    # the pairs its steps trained: the step plan is a pure function of (seed, step)
    _, _, ds = _prepared(args)
    plan = make_plan(cfg, len(ds.train))
    idx = [i for step in range(args.steps) for mb in plan.micro_batches(step) for i in mb]
    length = list(ds.train["length"])
    tokens = sum(length[i] for i in idx)
    fed = sum(length[i] for i in idx)  # the prompt once: pack_pairs shares it
    assert fed == s["train_tokens"], (fed, s["train_tokens"])
    assert ref["pairs"] == len(ds.train), ref  # computed here, not read from a cache
    ref_s = ref["seconds"] * len(idx) / ref["pairs"]  # its share for the pairs trained
    q.put(
        {
            "path": "loft",
            "pairs": len(idx),
            "tokens": tokens,
            "fed_tokens": fed,
            "seconds": s["train_s"],
            "tokens_per_s": tokens / s["train_s"],
            "reference_pass_s": round(ref["seconds"], 2),
            "reference_pass_pairs": ref["pairs"],
            "seconds_with_reference": s["train_s"] + ref_s,
            "tokens_per_s_with_reference": tokens / (s["train_s"] + ref_s),
            "final_loss": s["final_train_loss"],
            "peak_rss": _peak_rss(),
            "placement": s["placement"],
            "load_average": os.getloadavg(),
        }
    )


def run_trl(args: argparse.Namespace, q: mp.Queue) -> None:
    import torch
    from transformers import TrainerCallback

    from loft.models import load_causal_lm
    from loft.train.device import plan_placement

    info, tok, ds = _prepared(args)
    bf16 = plan_placement(loft_config(args)).precision == "bf16"
    model = load_causal_lm(info, dtype=torch.float32)
    trainer = _trl_trainer(args, model, tok, ds.train, bf16=bf16, steps=args.steps)
    devices = {p.device.type for p in trainer.model.parameters()}
    assert devices == {"cpu"} or torch.cuda.is_available(), devices
    counted = {"pairs": 0, "tokens": 0, "fed": 0}
    compute_loss = trainer.compute_loss

    def counting(model, inputs, *a, **k):  # the batches trained, not those prefetched
        if model.training:
            am, cm = inputs["attention_mask"], inputs["completion_mask"]
            n = am.shape[0] // 2  # rows: chosen then rejected, each prompt + completion + padding
            counted["pairs"] += n
            counted["tokens"] += int(am.sum() - (am[:n] - cm[:n]).sum())  # the prompt once
            counted["fed"] += inputs["input_ids"].numel()  # what its forwards see, padding too
        return compute_loss(model, inputs, *a, **k)

    class Clock(TrainerCallback):
        def on_train_begin(self, *_a, **_k):
            self.start = time.perf_counter()

        def on_step_end(self, *_a, **_k):
            self.end = time.perf_counter()

    clock = Clock()
    trainer.compute_loss = counting
    trainer.add_callback(clock)
    trainer.train()
    dt = clock.end - clock.start
    checkpointing = trainer.model.get_base_model().is_activation_checkpointing
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tail = losses[-10:]
    base = trainer.model.get_base_model().model.embed_tokens.weight
    lora = next(p for n, p in trainer.model.named_parameters() if "lora_B" in n)
    assert base.dtype == torch.float32, base.dtype  # autocast casts per op, as loft's does
    q.put(
        {
            "path": "trl",
            "pairs": counted["pairs"],
            "tokens": counted["tokens"],
            "fed_tokens": counted["fed"],
            "seconds": dt,
            "tokens_per_s": counted["tokens"] / dt,
            "final_loss": sum(tail) / len(tail),
            "peak_rss": _peak_rss(),
            "placement": (
                f"device {trainer.args.device}, mixed precision "
                f"{trainer.accelerator.mixed_precision}"
                f", gradient checkpointing {checkpointing}, base {base.dtype}"
                f", adapter {lora.dtype}"
            ),
            "load_average": os.getloadavg(),
        }
    )


def same_loss(args: argparse.Namespace, q: mp.Queue) -> None:
    """DPO loss of one micro-batch through each path's own code, in fp32, with the same weights:
    a fresh LoRA (both ln 2), then the same seeded non-zero lora_B in both models."""
    import torch

    from loft.models import load_causal_lm
    from loft.train.device import plan_placement
    from loft.train.model_setup import build_model
    from loft.train.preference import PreferenceObjective

    info, tok, ds = _prepared(args)
    cfg = loft_config(args, precision="fp32")
    placement = plan_placement(cfg)
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg, info, placement).eval()  # loft's model: packed attention, its LoRA
    obj = PreferenceObjective(cfg, tok, placement, False, info=info, init=None)
    n = args.micro_batch
    obj.rows = {"train": obj.rows["train"][:n], "eval": []}
    obj.ref = obj._reference_pass(model)  # loft's reference pass: the model as it starts
    trainer = _trl_trainer(
        args, load_causal_lm(info, dtype=torch.float32), tok, ds.train[:n], bf16=False, steps=1
    )
    trl_model = trainer.model.eval()
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])

    mine = {k: p for k, p in model.named_parameters() if "lora_" in k}
    theirs = {k: p for k, p in trl_model.named_parameters() if "lora_" in k}
    assert mine.keys() == theirs.keys(), sorted(mine.keys() ^ theirs.keys())[:4]

    def losses() -> tuple[float, float]:
        with torch.no_grad():
            for k, p in mine.items():
                theirs[k].copy_(p)
            ls, _ = obj.loss(model, obj.batch("train", list(range(n))))
            return float(ls) / n, float(trainer.compute_loss(trl_model, inputs))

    fresh = losses()
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for k, p in mine.items():
            if "lora_B" in k:
                p.copy_(torch.randn(p.shape, generator=g) * args.lora_b_std)
    trained = losses()
    q.put(
        {
            "pairs": n,
            "fresh": {"loft": fresh[0], "trl": fresh[1]},
            "random_lora_b": {"loft": trained[0], "trl": trained[1], "std": args.lora_b_std},
        }
    )


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument(
        "--pairs", type=int, help="Pairs in the file; default steps x micro-batch (one epoch)."
    )
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=8, help="Pairs per micro-batch.")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0, help="Seeds the pairs and the random lora_B.")
    ap.add_argument("--lora-b-std", type=float, default=0.02)
    ap.add_argument("--json", action="store_true", help="Print only the result JSON.")
    args = ap.parse_args()
    args.pairs = args.pairs or args.steps * args.micro_batch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = tempfile.mkdtemp(prefix="loft-bench-dpo-")
    os.environ[WORK] = work  # the children inherit it
    # always a fresh LOFT_HOME: a reference cached by an earlier run would not be timed
    os.environ["LOFT_HOME"] = os.path.join(work, "home")
    try:
        _bench(args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench(args: argparse.Namespace) -> None:
    write_pairs(_data(), args.pairs, args.seed)
    # warm the caches (model conversion, dataset prep) outside the timed children
    _prepared(args)

    obj = run_child(same_loss, args)
    loft = run_child(run_loft, args)
    trl = run_child(run_trl, args)
    ratio = loft["tokens_per_s_with_reference"] / trl["tokens_per_s"]
    cached = loft["tokens_per_s"] / trl["tokens_per_s"]
    mem = loft["peak_rss"] / trl["peak_rss"]
    result = {
        "pairs_in_file": args.pairs,
        "steps": args.steps,
        "micro_batch": args.micro_batch,
        "same_batch_loss": obj,
        "loft": loft,
        "trl": trl,
        "speedup": round(ratio, 2),
        "speedup_cached_reference": round(cached, 2),
        "peak_rss_ratio": round(mem, 2),
    }
    if args.json:
        print(json.dumps(result))
        return
    f, t = obj["fresh"], obj["random_lora_b"]
    print(
        f"same batch ({obj['pairs']} pairs, fp32), fresh LoRA: loft {f['loft']:.6f}  TRL "
        f"{f['trl']:.6f}  (ln 2 = {math.log(2):.6f}; relative diff {_rel(f['loft'], f['trl']):.1e})"
    )
    print(
        f"same batch, lora_B ~ N(0, {t['std']}^2) in both: loft {t['loft']:.6f}  TRL "
        f"{t['trl']:.6f}  (relative diff {_rel(t['loft'], t['trl']):.1e})"
    )
    print(
        f"{'path':5} {'pairs':>5} {'tokens':>7} {'fed':>7} {'seconds':>8} {'pair tok/s':>10} "
        f"{'final loss':>10} {'peak RSS':>9}"
    )
    for r in (loft, trl):
        print(
            f"{r['path']:5} {r['pairs']:>5} {r['tokens']:>7,} {r['fed_tokens']:>7,} "
            f"{r['seconds']:>8.1f} {r['tokens_per_s']:>10.1f} {r['final_loss']:>10.4f} "
            f"{r['peak_rss'] / 2**30:>8.2f}G   ({r['placement']})"
        )
    print(
        f"loft's reference pass: {loft['reference_pass_pairs']} pairs in "
        f"{loft['reference_pass_s']:.1f} s; with its share for the {loft['pairs']} pairs trained: "
        f"{loft['seconds_with_reference']:.1f} s, "
        f"{loft['tokens_per_s_with_reference']:.1f} pair tok/s"
    )
    print(f"speedup loft / stock TRL, reference pass included pro rata (one epoch): {ratio:.2f}x")
    print(
        f"speedup loft / stock TRL, reference already cached (later epochs, resumes): {cached:.2f}x"
    )
    print(f"peak RSS loft / stock TRL: {mem:.2f}")
    loads = ", ".join(f"{r['path']} {r['load_average'][0]:.1f}" for r in (loft, trl))
    print(f"load average (1 min) as each path finished: {loads} (on {os.cpu_count()} CPUs)")
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
