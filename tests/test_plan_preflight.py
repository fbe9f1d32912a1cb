"""`loft plan CONFIG` on this machine is `loft train`'s pre-flight: the same placement (device,
precision, checkpointing), the same data and step plan, the same number in run_summary.json.
Plans for another target (--gpu, another --device) stay planner arithmetic; `loft plan --list`
prints the presets and the GPU catalogue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import run_cli, run_loft
from loft.core.config import load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "examples" / "support_tickets" / "lora.yaml"


def _chat_file(path: Path, n: int) -> Path:
    """``n`` chats of different lengths, so the step plan's largest micro-batch is a choice."""
    lines = []
    for i in range(n):
        msg = [
            {"role": "user", "content": f"question {i}: " + "why " * (3 + 7 * (i % 5))},
            {"role": "assistant", "content": "because " * (5 + 11 * (i % 7))},
        ]
        lines.append(json.dumps({"messages": msg}) + "\n")
    path.write_text("".join(lines))
    return path


def _tiny_config(tmp_path: Path, tiny_model: Path, **training) -> Path:
    """Precision and checkpointing left on auto: the trainer decides them for this machine."""
    doc = {
        "base_model": str(tiny_model),
        "data": {
            "train": str(_chat_file(tmp_path / "chats.jsonl", 24)),
            "eval_fraction": 0.0,
            "max_seq_len": 256,
        },
        "lora": {"r": 4, "alpha": 8},
        "training": {"max_steps": 5, "micro_batch_size": 4, **training},
        "output_dir": str(tmp_path / "run"),
        "register": False,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _plan_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    code = run_cli("plan", *args, "--json")
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def _placement_parts(placement: str) -> tuple[str, str, bool]:
    """'cpu, bf16 autocast, gradient checkpointing off' -> ('cpu', 'bf16', False)."""
    device, prec, ckpt = (p.strip() for p in placement.split(","))
    return device, "bf16" if prec.startswith("bf16") else "fp32", ckpt.endswith(" on")


def _assert_plan_is_preflight(plan: dict, summary: dict) -> None:
    est = summary["memory_estimate"]
    assert plan["total_bytes"] == est["total_bytes"], (plan["breakdown"], est["breakdown"])
    assert plan["breakdown"] == est["breakdown"]
    device, precision, ckpt = _placement_parts(summary["placement"])
    assert plan["settings"]["precision"] == precision
    assert plan["settings"]["gradient_checkpointing"] is ckpt
    a = plan["assumptions"]
    assert a["this_machine"] is True and a["shape"] == "data"
    assert a["micro_batch_tokens"] == est["micro_batch_tokens"]
    assert a["placement"] == summary["placement"]
    assert (a["device"], a["precision"], a["gradient_checkpointing"]) == (device, precision, ckpt)
    assert a["dataset_fingerprint"] == summary["dataset_fingerprint"]
    assert "step plan" in a["from"]["micro_batch_tokens"]


@pytest.mark.unit
def test_plan_of_a_config_is_what_train_records(tmp_path, tiny_model, loft_home, capsys):
    """A real 1-step train, then the plan of the same config on the same machine: the plan's
    total is the estimate train recorded, for the same placement and micro-batch."""
    path = _tiny_config(tmp_path, tiny_model)
    one_step = ("--set", "training.max_steps=1")
    assert run_cli("train", str(path), "-q", *one_step) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["status"] == "completed"

    plan = _plan_json(capsys, str(path), *one_step)
    _assert_plan_is_preflight(plan, summary)

    # the plan says what it assumed and why, in words, in the table too
    capsys.readouterr()
    assert run_cli("plan", str(path), *one_step) == 0
    text = capsys.readouterr().out
    assert "as `loft train` decides on this machine" in text
    assert "the largest micro-batch of the step plan (1 steps x 4 examples" in text
    assert summary["dataset_fingerprint"][:12] in text


@pytest.mark.unit
def test_plan_config_follows_the_step_plan(tmp_path, tiny_model, loft_home, capsys):
    """The 5-step plan draws more micro-batches than the 1-step one, and the plan's tokens are
    exactly those of the largest of them (the one with the largest estimate, what pre-flight
    computes), not micro_batch x max_seq_len."""
    from loft.planner import estimate
    from loft.train.device import plan_placement
    from loft.train.preflight import run_preflight
    from loft.train.sft import _rows, make_plan

    path = _tiny_config(tmp_path, tiny_model)
    plan = _plan_json(capsys, str(path))
    cfg = load_config(path)
    from loft.data import load_prepared

    rows = _rows(load_prepared(plan["assumptions"]["dataset_fingerprint"]).train)
    steps = make_plan(cfg, len(rows))
    pre = run_preflight(cfg, plan_placement(cfg), rows, steps)
    assert plan["total_bytes"] == pre.estimate.total_bytes
    assert plan["assumptions"]["micro_batch_tokens"] == pre.micro_batch_tokens < 4 * 256
    drawn = [mb for step in range(steps.total_steps) for mb in steps.micro_batches(step)]
    per_mb = {}
    for mb in drawn:  # each drawn micro-batch packed: its tokens and its trained positions
        tokens = sum(len(rows[i]["input_ids"]) for i in mb)
        trained = sum(sum(1 for t in rows[i]["labels"][1:] if t != -100) for i in mb)
        shaped = pre.estimate.settings.with_(seq_len=tokens, logit_fraction=trained / tokens)
        per_mb[tokens] = max(per_mb.get(tokens, 0), estimate(pre.estimate.arch, shaped).total_bytes)
    assert pre.estimate.total_bytes == max(per_mb.values())
    assert per_mb[pre.micro_batch_tokens] == pre.estimate.total_bytes


@pytest.mark.unit
def test_plan_without_data_or_with_shape_flags_says_it_fell_back(tmp_path, tiny_model, capsys):
    from loft.train.device import plan_placement

    path = _tiny_config(tmp_path, tiny_model)
    cfg = load_config(path)
    placement = plan_placement(cfg)
    (tmp_path / "chats.jsonl").unlink()
    plan = _plan_json(capsys, str(path))
    a = plan["assumptions"]
    assert a["this_machine"] is True and a["shape"] == "config"
    assert a["micro_batch_tokens"] == 4 * 256
    assert "not found" in a["from"]["micro_batch_tokens"]
    assert "data.max_seq_len 256" in a["from"]["micro_batch_tokens"]
    # the placement is still the trainer's
    assert a["placement"] == placement.describe()
    assert a["precision"] == placement.precision

    _chat_file(tmp_path / "chats.jsonl", 24)
    flagged = _plan_json(capsys, str(path), "--seq-len", "64")
    f = flagged["assumptions"]
    assert f["shape"] == "config" and f["micro_batch_tokens"] == 4 * 64
    assert "--seq-len given" in f["from"]["micro_batch_tokens"]


@pytest.mark.unit
def test_plan_for_another_target_is_arithmetic_and_says_so(tmp_path, tiny_model, capsys):
    path = _tiny_config(tmp_path, tiny_model)
    plan = _plan_json(capsys, str(path), "--gpu", "h100-sxm")
    a = plan["assumptions"]
    assert a["this_machine"] is False and a["device"] == "cuda"
    assert a["micro_batch_tokens"] == 4 * 256  # micro_batch_size x max_seq_len, no data read
    assert a["from"]["device"].startswith("--gpu h100-sxm")
    assert (a["precision"], a["gradient_checkpointing"]) == ("bf16", True)  # cuda's auto
    assert plan["target"]["device"] == "h100-sxm"


@pytest.mark.unit
def test_plan_refuses_what_train_would_refuse_here(tmp_path, tiny_model, capsys):
    """QLoRA on a machine without CUDA: train refuses before loading; so does its plan, and
    the hint says how to plan it for a GPU instead."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: QLoRA is plannable here")
    path = _tiny_config(tmp_path, tiny_model)
    capsys.readouterr()
    assert run_cli("plan", str(path), "--method", "qlora") == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--gpu" in err and "Traceback" not in err
    plan = _plan_json(capsys, str(path), "--method", "qlora", "--gpu", "a100-80")
    assert plan["settings"]["method"] == "qlora" and plan["assumptions"]["this_machine"] is False


@pytest.mark.integration
@pytest.mark.slow
def test_shipped_config_plan_is_train_preflight(tmp_path, smollm2, loft_home):
    """The README's claim, on the shipped LoRA config and SmolLM2: `loft plan CONFIG --json`
    prints the estimate a real `loft train` of the same config records, with the same
    precision and checkpointing."""
    sets = ["--set", "training.max_steps=1", "--set", "register=false"]
    run = run_loft("train", str(SHIPPED), "-q", *sets, "--set", f"output_dir={tmp_path / 'run'}")
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())

    out = run_loft("plan", str(SHIPPED), "--json", *sets)
    assert out.returncode == 0, out.stderr
    _assert_plan_is_preflight(json.loads(out.stdout), summary)

    # the shipped config as it is (90 steps): still the pre-flight's data-driven estimate
    full = run_loft("plan", str(SHIPPED), "--json")
    assert full.returncode == 0, full.stderr
    a = json.loads(full.stdout)["assumptions"]
    assert a["shape"] == "data" and a["placement"] == summary["placement"]
    assert summary["memory_estimate"]["micro_batch_tokens"] <= a["micro_batch_tokens"] < 8 * 256


# --- loft plan --list ------------------------------------------------------------------------


@pytest.mark.unit
def test_plan_list_prints_presets_and_gpus(capsys):
    from loft.planner import get_preset, gpu_catalogue, preset_names

    capsys.readouterr()
    assert run_cli("plan", "--list") == 0
    text = capsys.readouterr().out
    for name in preset_names():
        assert name in text
    for key in gpu_catalogue():
        assert key in text
    assert "layers" in text and "hidden" in text and "on-demand" in text and "TFLOP/s" in text
    assert "smollm2-135m-instruct = smollm2-135m" not in text  # -instruct names: said once

    listed = _plan_json(capsys, "--list")
    models = {m["name"]: m for m in listed["models"]}
    assert list(models) == preset_names()
    for name, m in models.items():
        arch = get_preset(name)
        assert (m["params"], m["layers"], m["hidden"]) == (
            arch.n_params,
            arch.num_layers,
            arch.hidden_size,
        )
    gpus = {g["key"]: g for g in listed["gpus"]}
    assert set(gpus) == set(gpu_catalogue())
    for key, g in gpu_catalogue().items():
        assert gpus[key]["memory_gb"] == g.memory_gb
        assert gpus[key]["on_demand_usd_h"] == g.on_demand_usd_h


@pytest.mark.unit
def test_plan_list_takes_no_other_arguments(capsys):
    capsys.readouterr()
    assert run_cli("plan", "--list", "--model", "llama-3.1-8b") == 2
    err = capsys.readouterr().err
    assert "--list takes no other arguments" in err and "Traceback" not in err


@pytest.mark.unit
def test_fallback_plan_suggests_fewer_rows_of_the_same_length(tmp_path, tiny_model):
    """Without data the micro-batch is rows x max_seq_len; halving micro_batch_size halves the
    rows (not the row length), exactly as the planner estimates that shape."""
    from loft.planner import estimate
    from loft.train.preflight import preflight_config, suggestions

    path = _tiny_config(tmp_path, tiny_model, gradient_checkpointing=True)
    (tmp_path / "chats.jsonl").unlink()
    pre = preflight_config(load_config(path), capacity_bytes=1 << 20)
    assert pre.shape == "config" and not pre.fits
    changes = dict(suggestions(pre, load_config(path)))
    halved = "--set training.micro_batch_size=2 --set training.grad_accum=2"
    two_rows = pre.estimate.settings.with_(micro_batch=2)
    assert changes[halved] == estimate(pre.estimate.arch, two_rows).total_bytes


@pytest.mark.unit
def test_plan_of_a_distributed_config_is_per_rank(tmp_path, tiny_model, loft_home, monkeypatch):
    """training.distributed plans each rank: fsdp shards (zero_stage 3 over nproc ranks), ddp
    replicates; the ranks on one machine share its RAM, so each rank's capacity is an equal part
    of what is available (LOCAL_WORLD_SIZE inside a rank, nproc before the ranks start)."""
    from loft.train import preflight

    path = _tiny_config(tmp_path, tiny_model)
    monkeypatch.setattr(preflight, "_meminfo", lambda key: 8 << 30)
    monkeypatch.setattr(preflight, "_rss", lambda: 1 << 30)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def plan(*sets: str):
        return preflight.preflight_config(load_config(path, list(sets)))

    one = plan()
    ddp = plan("training.distributed.strategy=ddp", "training.distributed.nproc=2")
    fsdp = plan("training.distributed.strategy=fsdp", "training.distributed.nproc=2")
    assert (one.estimate.settings.n_gpus, one.estimate.settings.zero_stage) == (1, 0)
    assert (ddp.estimate.settings.n_gpus, ddp.estimate.settings.zero_stage) == (2, 0)
    assert (fsdp.estimate.settings.n_gpus, fsdp.estimate.settings.zero_stage) == (2, 3)
    assert ddp.estimate.breakdown == one.estimate.breakdown
    b1, b2 = one.estimate.breakdown, fsdp.estimate.breakdown
    assert b2["trainable"] < b1["trainable"] and b2["optimizer"] < b1["optimizer"]
    assert one.capacity_bytes == 9 << 30 and ddp.capacity_bytes == fsdp.capacity_bytes == 5 << 30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # inside a rank: what the launcher started
    monkeypatch.setenv("WORLD_SIZE", "8")
    ranked = plan("training.distributed.strategy=fsdp")
    assert (ranked.estimate.settings.n_gpus, ranked.capacity_bytes) == (8, 3 << 30)
