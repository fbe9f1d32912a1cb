"""`loft plan`: memory, hardware, time and cost of a fine-tune before it runs. Parses, calls
loft.planner (or, for a training config on this machine, loft.train.preflight), prints.

A preset or config.json plan, and any plan for another target (--gpu, or a --device this machine
does not have), is arithmetic and never imports torch. A training config planned for this machine
runs `loft train`'s own pre-flight: its placement (torch decides cuda/bf16) and its data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

PLAN_HELP = """Estimate peak memory per GPU, the smallest GPU that fits, and time and cost.

Either name a model and the run's settings:

  loft plan --model llama-3.1-8b --method qlora --seq-len 2048 --micro-batch 4 --gpu a100-80
  loft plan --model ./my-model-dir --method full --gpus 4 --zero 3 --tokens 50M --epochs 3

or give a loft training config (flags override it):

  loft plan train.yaml                           # this machine: the estimate `loft train` makes
  loft plan train.yaml --gpu rtx-4090 --tokens 20M

A config without --gpu is planned for this machine exactly as `loft train` will run it: the same
device, precision and checkpointing, and the largest micro-batch its step plan draws from the
prepared data (the number train's pre-flight prints and records). --micro-batch/--seq-len, a
missing data file, --gpu, another --device, --optimizer, --gpus or --zero plan by arithmetic
instead; the output says what it assumed and why.

--model takes a planner preset (llama-3.1-8b, qwen2.5-7b, mistral-7b, mixtral-8x7b, phi-3-mini,
gemma-2-9b, smollm2-135m, ...), a directory with a config.json, or a loft model name.
`loft plan --list` prints every preset and GPU. See docs/planner.md for the formulas.
"""


def _params(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _loft_model_path(ref: str) -> str:
    from loft.models import resolve_model

    return str(resolve_model(ref, verify=False).path)


# flags that are config keys: on this machine they become --set overrides, so the trainer's
# placement and data preparation see them
_CONFIG_KEYS = {
    "method": "method",
    "lora_rank": "lora.r",
    "lora_targets": "lora.target_modules",
    "precision": "training.precision",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "packing": "data.packing",
}
# flags for what `loft train` does not do on one machine: they make the plan hypothetical
_PLANNER_ONLY = {"optimizer": "adamw", "n_gpus": 1, "zero_stage": 0}


def _settings(config: Path | None, sets: list[str], device: str | None, flags: dict[str, Any]):
    from loft.core.errors import ConfigError
    from loft.planner import RunSettings, settings_from_train_config

    dev = device or "cuda"
    cfg = None
    if config is not None:
        from loft.core.config import load_config

        cfg = load_config(config, sets)
        base = settings_from_train_config(cfg, device=dev)
    else:
        if sets:
            raise ConfigError("--set needs a CONFIG.yaml", hint="Use the flags, e.g. --rank 32.")
        cpu = dev == "cpu"
        base = RunSettings(
            device=dev, precision="fp32" if cpu else "bf16", gradient_checkpointing=not cpu
        )
    changes = {k: v for k, v in flags.items() if v is not None}
    return base.with_(**changes), cfg


def _arith_assumptions(
    cfg: Any, gpu: str | None, device: str | None, flags: dict[str, Any], s: Any
) -> dict[str, Any]:
    """What an arithmetic plan assumed, and from where (flags, the config, planner defaults)."""
    if gpu:
        dev_from = f"--gpu {gpu}: planner arithmetic for that GPU, not this machine"
    elif cfg is not None and device:
        dev_from = f"--device {device}: not this machine's device, planner arithmetic"
    elif cfg is not None:
        dev_from = (
            "planner default (cuda): --optimizer, --gpus or --zero describe a setup "
            "`loft train` does not run here"
        )
    elif device:
        dev_from = f"--device {device}"
    else:
        dev_from = "planner default (cuda)"

    def origin(flag: str, key: str, value: Any) -> str:
        if flags.get(flag) is not None:
            return "--" + {"gradient_checkpointing": "checkpointing"}.get(flag, flag)
        if cfg is None:
            return f"planner default for {s.device}"
        if value == "auto":
            return f"{key} auto in the config: the planner's default for {s.device}"
        return f"{key} {str(value).lower()} in the config"

    t = cfg.training if cfg is not None else None
    given = {
        "micro_batch": "--micro-batch" if flags.get("micro_batch") else None,
        "seq_len": "--seq-len" if flags.get("seq_len") else None,
    }
    if cfg is not None:
        mb_from = given["micro_batch"] or "training.micro_batch_size"
        seq_from = given["seq_len"] or "data.max_seq_len"
    else:
        mb_from = given["micro_batch"] or "default micro-batch"
        seq_from = given["seq_len"] or "default seq_len"
    return {
        "this_machine": False,
        "device": s.device,
        "precision": s.precision,
        "gradient_checkpointing": s.gradient_checkpointing,
        "micro_batch_tokens": s.tokens_per_micro_batch,
        "shape": "config" if cfg is not None else "flags",
        "dataset_fingerprint": None,
        "from": {
            "device": dev_from,
            "precision": origin("precision", "training.precision", t and t.precision),
            "gradient_checkpointing": origin(
                "gradient_checkpointing",
                "training.gradient_checkpointing",
                t and t.gradient_checkpointing,
            ),
            "micro_batch_tokens": f"{mb_from} {s.micro_batch} x {seq_from} {s.seq_len}",
        },
    }


def _machine_overrides(flags: dict[str, Any], model: str | None) -> list[str]:
    import json

    out = []
    for key, path in _CONFIG_KEYS.items():
        value = flags.get(key)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = list(value)
        out.append(f"{path}={json.dumps(value)}")
    if model is not None:
        local = Path(model).expanduser()
        out.append(f"base_model={json.dumps(str(local.resolve()) if local.exists() else model)}")
    return out


def _machine_plan(config: Path, sets: list[str], flags: dict[str, Any], model: str | None):
    """The plan `loft train CONFIG` makes here: its pre-flight, with where each assumption came
    from. Imports torch (the placement is torch's view of this machine)."""
    from loft.core.config import load_config
    from loft.core.errors import HardwareError
    from loft.planner import Plan, fits_in, smallest_fitting_gpu
    from loft.train.preflight import (
        local_ranks,
        placement_reasons,
        preflight_config,
        suggestions,
    )

    cfg = load_config(config, [*sets, *_machine_overrides(flags, model)])
    try:
        pre = preflight_config(
            cfg, micro_batch=flags["micro_batch"], seq_len=flags["seq_len"], progress=True
        )
    except HardwareError as e:
        hint = (e.hint + "\n" if e.hint else "") + (
            f"To plan it for another machine: loft plan {config} --gpu a100-80 (or --device cuda)."
        )
        raise HardwareError(e.message, hint=hint) from None
    est = pre.estimate
    best = smallest_fitting_gpu(est) if pre.device == "cuda" else None
    plan = Plan(
        estimate=est,
        target=fits_in(est, pre.capacity_bytes, device=pre.device),
        recommended_gpu=best.key if best else None,
    )
    reasons = placement_reasons(cfg, pre.placement)
    assumptions = {
        "this_machine": True,
        "device": pre.device,
        "precision": est.settings.precision,
        "gradient_checkpointing": est.settings.gradient_checkpointing,
        "placement": pre.placement.describe(),
        "micro_batch_tokens": pre.micro_batch_tokens,
        "ranks_here": local_ranks(cfg),  # the ranks this machine's capacity is shared by
        "shape": pre.shape,
        "dataset_fingerprint": pre.dataset_fingerprint,
        "from": {**reasons, "micro_batch_tokens": pre.shape_from},
    }
    fixes = [] if pre.fits else suggestions(pre, cfg)
    fix_rows = [
        {"change": c, "total_bytes": t, "fits": t <= pre.capacity_bytes, "settings": None}
        for c, t in fixes
    ]
    return plan, assumptions, fix_rows, cfg


def _report(
    ref: str, plan: Any, gpu: str | None, tc: Any, assumptions: dict[str, Any], fixes: Any
) -> dict[str, Any]:
    est = plan.estimate
    return {
        "model": est.arch.name or ref,
        "arch": est.arch.to_dict(),
        "settings": est.settings.to_dict(),
        "assumptions": assumptions,
        "n_params": est.n_params,
        "trainable_params": est.trainable_params,
        "flops_per_token": est.flops_per_token,
        "total_bytes": est.total_bytes,
        "breakdown": est.breakdown,
        "notes": list(est.notes),
        "gpu": gpu,
        "n_gpus": est.settings.n_gpus,
        "target": plan.target.to_dict() if plan.target else None,
        "fits": plan.fits,
        "recommended_gpu": plan.recommended_gpu,
        "suggestions": fixes if fixes is not None else [s.to_dict() for s in plan.suggestions],
        "hours": tc.hours if tc else None,
        "cost": tc.cost if tc else None,
        "time_cost": tc.to_dict() if tc else None,
    }


def _print(r: dict[str, Any]) -> None:
    from rich.table import Table

    from loft.cli.output import console, human_size

    s, a = r["settings"], r["assumptions"]
    targets = (
        s["lora_targets"] if isinstance(s["lora_targets"], str) else ",".join(s["lora_targets"])
    )
    adapter = f", rank {s['lora_rank']} on {targets}" if s["method"] != "full" else ""
    if a["shape"] == "data":
        shape = f"largest micro-batch {a['micro_batch_tokens']:,} tokens"
    else:
        shape = f"micro-batch {s['micro_batch']} x {s['seq_len']} tokens"
    console.print(
        f"[bold]{r['model']}[/] ({_params(r['n_params'])} params): {s['method']}{adapter}, "
        f"{s['precision']}, {s['optimizer']}, {shape}, "
        f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
        f"{s['n_gpus']} x {s['device']} (ZeRO {s['zero_stage']})"
    )
    where = (
        "as `loft train` decides on this machine"
        if a["this_machine"]
        else "planner arithmetic, not this machine's pre-flight"
    )
    console.print(f"assumed ({where}):", markup=False)
    ckpt = "on" if a["gradient_checkpointing"] else "off"
    prec = "bf16 autocast" if a["this_machine"] and a["precision"] == "bf16" else a["precision"]
    tokens = f"{a['micro_batch_tokens']:,} tokens per micro-batch"
    for label, key in (
        (f"device {a['device']}", "device"),
        (f"precision {prec}", "precision"),
        (f"checkpointing {ckpt}", "gradient_checkpointing"),
        (tokens, "micro_batch_tokens"),
    ):
        console.print(f"  {label:<30} {a['from'][key]}", markup=False, soft_wrap=True)
    if a.get("dataset_fingerprint"):
        console.print(f"  {'prepared dataset':<30} {a['dataset_fingerprint'][:12]}", markup=False)
    table = Table(title="peak memory per device")
    table.add_column("item")
    table.add_column("size", justify="right")
    for key, value in r["breakdown"].items():
        table.add_row(key, human_size(value))
    table.add_row("[bold]total[/]", f"[bold]{human_size(r['total_bytes'])}[/]")
    console.print(table)
    console.print(
        f"trainable params {_params(r['trainable_params'])}, "
        f"{r['flops_per_token'] / 1e9:.2f} GFLOP per token"
    )
    for note in r["notes"]:
        console.print(f"note: {note}", markup=False)
    t = r["target"]
    if t:
        verdict = "[green]fits[/]" if t["fits"] else "[red]does not fit[/]"
        what = " available here" if a["this_machine"] else ""
        ranks = a.get("ranks_here", 1)
        if t["device"] == "cpu" and ranks > 1:  # the ranks share this machine's RAM
            what = f" available here to each of {ranks} ranks"
        console.print(
            f"on {t['device']} ({human_size(t['capacity_bytes'])}{what}): {verdict}, "
            f"headroom {'-' if t['headroom_bytes'] < 0 else ''}"
            f"{human_size(abs(t['headroom_bytes']))}"
        )
    if r["settings"]["device"] == "cuda":
        best = r["recommended_gpu"] or "none in the catalogue"
        console.print(f"smallest fitting GPU (x{r['n_gpus']}): [bold]{best}[/]")
    if r["suggestions"]:
        console.print("to make it fit, in order (each on top of the ones before):")
        for sg in r["suggestions"]:
            mark = "fits" if sg["fits"] else "still too big"
            console.print(
                f"  - {sg['change']}: {human_size(sg['total_bytes'])} ({mark})", markup=False
            )
    tc = r["time_cost"]
    if tc:
        be = tc["break_even_utilisation"]
        console.print(
            f"time: {tc['tokens']:,} tokens on {tc['n_gpus']} x {tc['gpu']} "
            f"at MFU {tc['mfu']:.2f}: "
            f"[bold]{tc['hours']:.1f} h[/] ({tc['gpu_hours']:.1f} GPU-hours)\n"
            f"cost: on-demand ${tc['on_demand_usd']:,.2f}, spot ${tc['spot_usd']:,.2f}, "
            f"on-prem ${tc['on_prem_usd']:,.2f} (${tc['on_prem_usd_per_gpu_hour']:.2f}/GPU-h); "
            f"owning breaks even at {'never' if be is None else f'{be:.0%}'} utilisation"
        )


def _list(as_json: bool) -> None:
    """The preset models and the GPU catalogue; each table fits 80 columns (so nothing folds
    when piped); aliases follow the models' table, every field is in --json."""
    from rich.table import Table

    from loft.cli.output import console, print_json
    from loft.planner import gpu_rows, model_rows

    models, gpus = model_rows(), gpu_rows()
    if as_json:
        print_json({"models": models, "gpus": gpus})
        return
    mt = Table(title="preset models (--model NAME)")
    mt.add_column("model", no_wrap=True)
    for col in ("params", "layers", "hidden", "heads (kv)", "vocab"):
        mt.add_column(col, justify="right", no_wrap=True)
    for m in models:
        experts = f" ({m['experts']} experts)" if m["experts"] > 1 else ""
        mt.add_row(
            m["name"],
            _params(m["params"]) + experts,
            str(m["layers"]),
            f"{m['hidden']:,}",
            f"{m['heads']} ({m['kv_heads']})",
            f"{m['vocab']:,}",
        )
    console.print(mt)
    other = [
        f"{a} = {m['name']}"
        for m in models
        for a in m["aliases"]
        if a not in (f"{m['name']}-instruct", f"{m['name']}-it")
    ]
    console.print(
        "aliases: each model's -instruct (gemma: -it) name, and " + ", ".join(other), markup=False
    )
    gt = Table(title="GPU catalogue (--gpu KEY): per GPU; prices are inputs in gpus.yaml")
    gt.add_column("gpu", no_wrap=True)
    for col in ("memory\nGB", "usable\nGiB", "bf16\nTFLOP/s", "on-demand\n$/h", "spot\n$/h"):
        gt.add_column(col, justify="right", no_wrap=True)
    gt.add_column("purchase\n$", justify="right", no_wrap=True)
    for g in gpus:
        gt.add_row(
            g["key"],
            f"{g['memory_gb']:g}",
            f"{g['usable_gib']:.1f}",
            f"{g['bf16_tflops']:g}",
            f"{g['on_demand_usd_h']:.2f}",
            f"{g['spot_usd_h']:.2f}",
            f"{g['purchase_usd']:,.0f}",
        )
    console.print(gt)


def register(root: typer.Typer) -> None:
    @root.command("plan", help=PLAN_HELP)
    def plan_cmd(
        config: Path | None = typer.Argument(None, help="A loft training config (YAML)."),
        model: str | None = typer.Option(None, "--model", "-m", help="Preset, model dir or name."),
        method: str | None = typer.Option(None, help="full | lora | dora | qlora."),
        seq_len: int | None = typer.Option(None, "--seq-len", help="Tokens per row."),
        micro_batch: int | None = typer.Option(None, "--micro-batch", help="Rows per step."),
        rank: int | None = typer.Option(None, "--rank", help="LoRA/DoRA rank."),
        targets: str | None = typer.Option(
            None, "--targets", help="all-linear, or module names: q_proj,v_proj."
        ),
        precision: str | None = typer.Option(None, help="bf16 | fp16 | fp32."),
        optimizer: str | None = typer.Option(
            None, help="adamw | adamw-8bit | paged-adamw-8bit | sgd | adafactor."
        ),
        checkpointing: bool | None = typer.Option(
            None, "--checkpointing/--no-checkpointing", help="Gradient checkpointing."
        ),
        packing: bool | None = typer.Option(None, "--packing/--no-packing"),
        gpus: int | None = typer.Option(None, "--gpus", help="Number of GPUs."),
        gpu: str | None = typer.Option(None, "--gpu", help="Catalogue GPU, e.g. a100-80."),
        zero: int | None = typer.Option(None, "--zero", help="ZeRO stage 0-3 (3 = FSDP)."),
        tokens: str | None = typer.Option(None, "--tokens", help="Dataset tokens: 50M, 1.2B."),
        dataset: str | None = typer.Option(
            None, "--dataset", help="Prepared dataset fingerprint (instead of --tokens)."
        ),
        epochs: float | None = typer.Option(None, "--epochs", help="Default 1 (or the config's)."),
        mfu: float | None = typer.Option(None, "--mfu", help="Default from gpus.yaml."),
        device: str | None = typer.Option(
            None, "--device", help="cuda | cpu. Default: this machine's for a config, else cuda."
        ),
        set_: list[str] = typer.Option(
            [], "--set", "-s", help="Override a config key: --set lora.r=32 (repeatable)."
        ),
        list_: bool = typer.Option(
            False, "--list", help="List the preset models and the GPU catalogue, then exit."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        from loft.cli.output import print_json
        from loft.core.errors import ConfigError
        from loft.planner import get_gpu, parse_targets, parse_tokens, recommend, resolve_arch
        from loft.planner.cost import time_and_cost

        flags = {
            "method": method,
            "seq_len": seq_len,
            "micro_batch": micro_batch,
            "lora_rank": rank,
            "lora_targets": parse_targets(targets) if targets is not None else None,
            "precision": precision,
            "optimizer": optimizer,
            "gradient_checkpointing": checkpointing,
            "packing": packing,
            "n_gpus": gpus,
            "zero_stage": zero,
        }
        if list_:
            others = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
            if config is not None or model or gpu or tokens or dataset or device or set_ or others:
                raise ConfigError(
                    "--list takes no other arguments (only --json)",
                    hint="Run `loft plan --list`, then plan with --model NAME --gpu KEY.",
                )
            _list(as_json)
            return
        if device is not None and device not in ("cuda", "cpu"):
            raise ConfigError(f"--device: got {device!r}; choose cuda or cpu")
        if tokens is not None and dataset is not None:
            raise ConfigError("give --tokens or --dataset, not both")
        n_tokens = parse_tokens(tokens) if tokens is not None else None
        if dataset is not None:
            from loft.planner.cost import dataset_tokens

            n_tokens = dataset_tokens(dataset)
        target = get_gpu(gpu) if gpu is not None else None  # unknown: an error before any work
        hypothetical = gpu is not None or any(
            flags[k] not in (None, default) for k, default in _PLANNER_ONLY.items()
        )
        this_machine = False
        if config is not None and not hypothetical:
            from loft.train.preflight import machine_device

            this_machine = device is None or device == machine_device()
        fixes = None
        if this_machine:
            assert config is not None
            plan, assumptions, fixes, cfg = _machine_plan(config, set_, flags, model)
            ref, cfg_epochs = cfg.base_model, float(cfg.training.epochs)
        else:
            settings, cfg = _settings(config, set_, device, flags)
            cfg_epochs = float(cfg.training.epochs) if cfg is not None else 1.0
            ref = model or (cfg.base_model if cfg is not None else None)
            if ref is None:
                raise ConfigError(
                    "name a model with --model, or give a training config",
                    hint="e.g. loft plan --model llama-3.1-8b --method qlora",
                )
            arch = resolve_arch(ref, resolve_path=_loft_model_path)
            if target is None and settings.device == "cpu":
                from loft.core.procs import ram_bytes

                plan = recommend(arch, settings, capacity_bytes=ram_bytes() or None)
            else:
                plan = recommend(arch, settings, gpu=target)
            assumptions = _arith_assumptions(cfg, gpu, device, flags, settings)
        tc = None
        est = plan.estimate
        timing_gpu = target or (get_gpu(plan.recommended_gpu) if plan.recommended_gpu else None)
        if n_tokens is not None and est.settings.device == "cuda" and timing_gpu is not None:
            ep = epochs if epochs is not None else cfg_epochs
            tc = time_and_cost(est, timing_gpu, tokens=n_tokens, epochs=ep, mfu=mfu)
        report = _report(ref, plan, target.key if target else None, tc, assumptions, fixes)
        if as_json:
            print_json(report)
        else:
            _print(report)
