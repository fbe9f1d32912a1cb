"""Preference tuning on a tiny random model: DPO, KTO, ORPO and SimPO on the SFT spine (issue 13).

The losses themselves are checked against TRL's in test_preference_loss.py; here: the model-level
log-probabilities, the first step at ln 2, the cached reference (computed once, reused on resume),
resume equal to an uninterrupted run, init_from, and the guards.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import MemoryTracker
from loft.core.config import validate_config
from loft.core.errors import TrainingDiverged, TrainingInterrupted

PAIRS = [
    ("What colour is the sky?", "Blue.", "Green, usually."),
    ("Name a prime number.", "Seven.", "Eight."),
    ("Say hello in French.", "Bonjour!", "Hola!"),
    ("What is 2 + 2?", "4.", "5."),
    ("Capital of Italy?", "Rome.", "Milan."),
    ("Opposite of hot?", "Cold.", "Warm."),
]


def write_pairs(path: Path, repeat: int = 2) -> Path:
    rows = []
    for i in range(repeat):
        for q, good, bad in PAIRS:
            prompt = [{"role": "user", "content": f"{q} ({i})"}]
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": bad}],
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pref_config(tmp_path: Path, tiny_model: Path, objective: str = "dpo", name="run", **over):
    data = tmp_path / "prefs.jsonl"
    if not data.exists():
        write_pairs(data)
    training = {"max_steps": 6, "micro_batch_size": 2, "lr": 5e-3, "save_every": 2,
                "keep_checkpoints": 5, "precision": "fp32", "warmup_ratio": 0.0,
                **over.pop("training", {})}  # fmt: skip
    cfg = {
        "base_model": str(tiny_model),
        "objective": objective,
        "data": {"train": str(data), "eval_fraction": 0.2, "max_seq_len": 96},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": training,
        "output_dir": str(tmp_path / name),
        "register": False,
        **over,
    }
    return validate_config(cfg)


def adapter(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))


# ------------------------------------------------------------------ log-probabilities


@pytest.mark.unit
def test_packed_completion_logps_equal_each_sequence_scored_alone(tiny_model: Path):
    """Two pairs packed as four sequences: each completion's summed log-probability equals the
    one computed from that sequence's full logits on its own (what TRL's concatenated forward
    computes), so packing and the completion-only LM head change nothing."""
    from loft.models import load_causal_lm, resolve_model
    from loft.train.attention import register
    from loft.train.preference import completion_logps, pack_sequences

    model = load_causal_lm(resolve_model(str(tiny_model))).eval()
    model.set_attn_implementation(register())
    g = torch.Generator().manual_seed(0)
    seqs = [
        (torch.randint(5, 200, (n,), generator=g).tolist(),
         torch.randint(5, 200, (m,), generator=g).tolist())
        for n, m in ((7, 3), (4, 9), (11, 1), (5, 5))
    ]  # fmt: skip
    with torch.no_grad():
        got = completion_logps(model, pack_sequences(seqs))
        for j, (p, c) in enumerate(seqs):
            ids = torch.tensor([p + c])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            want = sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(c))
            assert math.isclose(float(got[j]), want, rel_tol=1e-5, abs_tol=1e-5), (j, got, want)


@pytest.mark.unit
def test_pairs_packed_with_a_shared_prompt_equal_the_prompt_fed_twice(tiny_model: Path):
    """pack_pairs feeds each prompt once (rejected reads it as a prefix): the log-probabilities
    and the LoRA gradients equal those of pack_sequences' prompt + chosen, prompt + rejected
    layout, with fewer tokens fed."""
    from peft import LoraConfig, get_peft_model

    from loft.models import load_causal_lm, resolve_model
    from loft.train.attention import register
    from loft.train.preference import completion_logps, pack_pairs, pack_sequences

    torch.manual_seed(0)
    model = load_causal_lm(resolve_model(str(tiny_model)), dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    model.eval().set_attn_implementation(register())
    g = torch.Generator().manual_seed(1)

    def rand(n: int) -> list[int]:
        return torch.randint(5, 200, (n,), generator=g).tolist()

    pairs = [(rand(p), rand(c), rand(r)) for p, c, r in ((7, 3, 5), (4, 9, 1), (11, 1, 2))]
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    results = []
    for batch in (pack_sequences(seqs), pack_pairs(pairs)):
        model.zero_grad()
        lp = completion_logps(model, batch)
        (lp * torch.arange(1.0, 7.0)).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((lp.detach(), grads, batch["num_tokens"]))
    (want, want_g, fed_twice), (got, got_g, fed_once) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert fed_twice - fed_once == sum(len(p) for p, _, _ in pairs)


# ------------------------------------------------------------------ training


@pytest.mark.unit
def test_dpo_starts_at_ln2_and_learns_to_prefer_chosen(
    tmp_path: Path, tiny_model: Path, loft_home: Path
):
    """A fresh LoRA is its own base: the first step's loss is ln 2 and its margins 0. After a
    few steps the policy prefers the chosen replies (accuracy and margins up)."""
    from loft.train.sft import train

    tracker = MemoryTracker()
    cfg = pref_config(tmp_path, tiny_model, training={"max_steps": 12, "eval_every": 6})
    result = train(cfg, progress=False, tracker=tracker)
    first = tracker.metrics[0][1]
    assert abs(first["train/loss"] - math.log(2)) < 1e-5, first
    assert abs(first["train/rewards/margins"]) < 1e-5
    last = tracker.metrics[-1][1]
    assert last["train/rewards/margins"] > 0.05 and last["train/rewards/accuracies"] >= 0.5
    assert {"eval/rewards/accuracies", "eval/loss", "train/logps/chosen"} <= set(last)
    s = result.summary
    assert s["status"] == "completed" and s["reference"]["kind"] == "base"
    assert s["reference"]["computed_examples"] == 12  # 10 train + 2 eval pairs, once


@pytest.mark.unit
def test_the_reference_pass_keeps_no_autograd_graph(
    tmp_path: Path, tiny_model: Path, loft_home: Path, monkeypatch: pytest.MonkeyPatch
):
    """The reference log-probabilities are computed before the first step without autograd (a
    graph there would only hold activations no backward ever reads)."""
    from loft.train import preference
    from loft.train.sft import train

    calls: list[bool] = []
    real = preference.completion_logps

    def recording(model, batch):
        calls.append(torch.is_grad_enabled())
        return real(model, batch)

    monkeypatch.setattr(preference, "completion_logps", recording)
    cfg = pref_config(tmp_path, tiny_model, training={"max_steps": 1, "eval_every": 1})
    result = train(cfg, progress=False, tracker=MemoryTracker())
    assert result.summary["reference"]["computed_examples"] == 12
    micro = cfg.training.micro_batch_size
    n_ref = math.ceil(10 / micro) + math.ceil(2 / micro)
    assert calls[:n_ref] == [False] * n_ref and True in calls[n_ref:], calls


@pytest.mark.unit
@pytest.mark.parametrize("objective", ["kto", "orpo", "simpo"])
def test_other_objectives_train_and_log_rewards(
    objective: str, tmp_path: Path, tiny_model: Path, loft_home: Path
):
    from loft.train.sft import train

    tracker = MemoryTracker()
    result = train(pref_config(tmp_path, tiny_model, objective), progress=False, tracker=tracker)
    assert result.summary["status"] == "completed"
    losses = [m["train/loss"] for _, m in tracker.metrics]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert "train/rewards/chosen" in tracker.metrics[-1][1]
    assert ("reference" in result.summary) == (objective == "kto")


@pytest.mark.unit
def test_resume_reuses_the_cached_reference_and_ends_where_an_uninterrupted_run_does(
    tmp_path: Path, tiny_model: Path, loft_home: Path
):
    from loft.train.sft import train

    whole = train(
        pref_config(tmp_path, tiny_model, name="whole"), progress=False, tracker=MemoryTracker()
    )
    assert whole.summary["reference"]["cached"] is False  # the first run computes it
    cfg = pref_config(tmp_path, tiny_model, name="stopped")
    with pytest.raises(TrainingInterrupted):
        train(cfg, progress=False, tracker=MemoryTracker(stop_after=3))
    resumed = train(cfg, resume=True, progress=False, tracker=MemoryTracker())
    ref = resumed.summary["reference"]
    assert ref["cached"] is True and ref["computed_examples"] == 0
    assert ref["key"] == whole.summary["reference"]["key"]
    assert resumed.summary["sessions"][-1]["start_step"] == 3
    a, b = adapter(whole), adapter(resumed)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


@pytest.mark.unit
def test_init_from_continues_a_registered_sft_adapter_as_reference_and_parent(
    tmp_path: Path, tiny_model: Path, loft_home: Path
):
    from loft.registry import get_version, register
    from loft.train.sft import train

    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q},
                                     {"role": "assistant", "content": a}]}) + "\n"
            for q, a, _ in PAIRS
        )
    )  # fmt: skip
    sft = validate_config(
        {
            "base_model": str(tiny_model),
            "data": {"train": str(chat), "eval_fraction": 0.0, "max_seq_len": 64},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "training": {"max_steps": 3, "micro_batch_size": 2, "lr": 5e-3, "precision": "fp32"},
            "output_dir": str(tmp_path / "sft"),
            "register": False,
        }
    )
    mv = register(train(sft, progress=False, tracker=MemoryTracker()).run_dir, name="tickets-lora")
    tracker = MemoryTracker()
    cfg = pref_config(
        tmp_path, tiny_model, init_from="tickets-lora:1", register={"name": "tickets-dpo"}
    )
    result = train(cfg, progress=False, tracker=tracker)
    assert result.summary["reference"]["kind"] == "init"
    # the policy starts as the SFT adapter, which is also the reference: loss ln 2 at step 1
    assert abs(tracker.metrics[0][1]["train/loss"] - math.log(2)) < 1e-5
    dpo = get_version(result.summary["registered"])
    assert dpo.card["lineage"]["parent"]["name"] == mv.name
    assert dpo.card["lineage"]["parent"]["version"] == mv.version


# ------------------------------------------------------------------ guards


@pytest.mark.unit
def test_a_nan_loss_stops_before_the_step_with_a_checkpoint_naming_it(
    tmp_path: Path, tiny_model: Path, loft_home: Path, monkeypatch: pytest.MonkeyPatch
):
    from loft.train.preference import PreferenceObjective
    from loft.train.sft import train

    real = PreferenceObjective.loss
    calls = {"n": 0}

    def poisoned(self, model, batch):
        ls, m = real(self, model, batch)
        calls["n"] += 1
        return (ls * float("nan") if calls["n"] == 3 else ls), m  # step 3 (one micro-batch)

    monkeypatch.setattr(PreferenceObjective, "loss", poisoned)
    cfg = pref_config(tmp_path, tiny_model, training={"eval_every": 100})
    with pytest.raises(TrainingDiverged, match=r"step 3/6: the loss is nan") as e:
        train(cfg, progress=False, tracker=MemoryTracker())
    assert "--resume" in e.value.hint
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert ckpt.is_dir()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2  # the weights from before the bad step
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["status"] == "failed"


@pytest.mark.unit
def test_an_optimizer_that_moves_nothing_warns_and_fails_the_final_check(
    tmp_path: Path,
    tiny_model: Path,
    loft_home: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    """Constructed: an optimizer with a zero learning rate (what a wrong schedule, a frozen
    adapter or an lr typo amount to). Margins stay 0 past the warm-up: a warning; the weights
    end where they started: the run fails instead of registering a copy of its start."""
    import loft.train.sft as sft

    def frozen(config, model, total_steps):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)

    monkeypatch.setattr(sft, "_optimizer", frozen)
    cfg = pref_config(tmp_path, tiny_model, training={"eval_every": 100})
    with pytest.raises(TrainingDiverged, match="no trainable weight changed"):
        sft.train(cfg, progress=False, tracker=MemoryTracker())
    err = capsys.readouterr().err
    assert "reward margins have been 0 since the start" in err
    assert "identical to the reference" in err
    assert json.loads((tmp_path / "run/run_summary.json").read_text())["status"] == "failed"


# ------------------------------------------------------------------ evaluation


@pytest.mark.unit
def test_eval_scores_pairs_against_the_base_or_a_baseline(
    tmp_path: Path, tiny_model: Path, loft_home: Path
):
    """`loft eval` on a preference file: preference_accuracy and reward_margin of the DPO model
    against its base (default) and against a baseline version; the default metrics on pairs
    include them, and they are recorded on the version with the reference they were measured
    against."""
    from loft.evaluate.run import evaluate_model
    from loft.registry import get_version, register
    from loft.train.sft import train

    cfg = pref_config(tmp_path, tiny_model, training={"max_steps": 12, "eval_every": 100})
    run = train(cfg, progress=False, tracker=MemoryTracker())
    mv = register(run.run_dir, name="prefs-dpo")
    data = tmp_path / "prefs.jsonl"
    report = evaluate_model(f"{mv.name}:1", data, progress=False)
    assert {"preference_accuracy", "reward_margin", "eval_loss"} <= set(report.candidate)
    assert report.candidate["reward_margin"] > 0  # it learned these pairs
    assert report.candidate["preference_accuracy"] > 0.5
    # against itself as the baseline: every log-ratio is 0
    same = evaluate_model(
        f"{mv.name}:1", data, metrics=["reward_margin"], baseline=f"{mv.name}:1", progress=False
    )
    assert abs(same.candidate["reward_margin"]) < 1e-6
    entries = get_version(f"{mv.name}:1").card["evaluations"]
    refs = {e["on"]["settings"]["reference"] for e in entries if e["metric"] == "reward_margin"}
    assert refs == {str(tiny_model), f"{mv.name}:1"}  # the base by default, then the baseline


@pytest.mark.integration
@pytest.mark.slow
def test_sigkilled_dpo_run_resumes_to_the_uninterrupted_weights(
    tmp_path: Path, tiny_model: Path, loft_home: Path
):
    """A real `loft train` of a DPO config, SIGKILLed after its first checkpoint (no chance to
    save anything), then --resume: it starts at the newest checkpoint, reads the reference
    log-probs the killed process cached (none recomputed), and ends with the adapter of a run
    nothing interrupted (max abs diff <= 1e-6)."""
    import time

    import yaml

    from helpers import run_loft, start_loft
    from loft.train.checkpoint import checkpoint_dirs

    def config(name: str) -> Path:
        training = {"max_steps": 24, "save_every": 3, "eval_every": 1000}
        cfg = pref_config(tmp_path, tiny_model, name=name, training=training)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        return path

    proc = start_loft("train", str(config("killed")), "-q")
    run_dir = tmp_path / "killed"
    deadline = time.monotonic() + 300  # a polling limit, not the assertion
    while not checkpoint_dirs(run_dir):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run wrote no checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    stopped_at = int(checkpoint_dirs(run_dir)[-1].name.removeprefix("step-"))
    assert 3 <= stopped_at < 24, "the run was not stopped mid-way"
    res = run_loft("train", str(tmp_path / "killed.yaml"), "-q", "--resume")
    assert res.returncode == 0, res.stderr
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["sessions"][-1]["start_step"] == stopped_at
    assert summary["reference"]["computed_examples"] == 0 and summary["reference"]["cached"]
    whole = run_loft("train", str(config("whole")), "-q")
    assert whole.returncode == 0, whole.stderr
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


@pytest.mark.unit
def test_invalid_preference_combinations_are_refused_together_with_their_keys(tmp_path: Path):
    from loft.core.errors import ConfigError

    doc = {
        "data": {"train": str(tmp_path / "x.jsonl"), "format": "kto", "train_on_inputs": True},
        "objective": "dpo",
        "preference": {"beta": 0, "reference": "init", "loss_type": "ipo"},
        "training": {"micro_batch_size": 1, "lr": "fast"},
    }
    with pytest.raises(ConfigError) as e:
        validate_config(doc)
    lines = e.value.message.splitlines()
    assert lines[0].endswith("5 problems in config:")
    text = "\n".join(lines)
    for key, words in (
        ("preference.beta", "greater than 0"),
        ("training.lr", "valid number"),
        ("data.format", "needs pairs"),
        ("preference.reference", "needs init_from"),
        ("data.train_on_inputs", "completions only"),
    ):
        assert any(line.strip().startswith(key) and words in line for line in lines), (key, text)
    kto = {**doc, "objective": "kto", "preference": {}, "data": {"train": "x.jsonl"},
           "training": {"micro_batch_size": 1}}  # fmt: skip
    with pytest.raises(ConfigError, match="training.micro_batch_size: got 1: KTO"):
        validate_config(kto)
    orpo = {"data": {"train": "x.jsonl"}, "objective": "orpo", "preference": {"reference": "base"}}
    with pytest.raises(ConfigError, match="preference.reference: got 'base': orpo has no ref"):
        validate_config(orpo)
    with pytest.raises(ConfigError, match="data.format: got 'preference': 'preference' is pref"):
        validate_config({"data": {"train": "x.jsonl", "format": "preference"}})


@pytest.mark.unit
def test_plan_of_a_dpo_config_is_the_estimate_train_records(
    tmp_path: Path, tiny_model: Path, loft_home: Path
):
    """`loft plan CONFIG` for a preference config measures the same micro-batch train does:
    both sequences of every pair, logits on completion positions only."""
    from loft.train.preflight import preflight_config
    from loft.train.sft import train

    cfg = pref_config(tmp_path, tiny_model, training={"max_steps": 2})
    planned = preflight_config(cfg, capacity_bytes=1 << 40)
    assert planned.shape == "data"
    result = train(cfg, progress=False, tracker=MemoryTracker())
    recorded = result.summary["memory_estimate"]
    assert planned.micro_batch_tokens == recorded["micro_batch_tokens"]
    assert planned.estimate.total_bytes == recorded["total_bytes"]
