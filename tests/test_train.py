"""Training correctness on a tiny random model: packing, loss invariants, LoRA, resume, signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_loft, start_loft
from loft.core.config import load_config, validate_config
from loft.core.errors import ConfigError, HardwareError, TrainingInterrupted
from loft.data.packing import IGNORE_INDEX, pack_batch, pad_batch

ROOT = Path(__file__).resolve().parents[1]

CHATS = [
    ("What colour is the sky?", "Blue."),
    ("Name a prime number.", "Seven is prime."),
    ("Say hello in French.", "Bonjour!"),
    ("What is 2 + 2?", "It is 4."),
    ("Capital of Italy?", "Rome."),
    ("Opposite of hot?", "Cold."),
    ("Largest planet?", "Jupiter is the largest planet."),
    ("A fruit that is yellow?", "A banana."),
    ("How many legs does a spider have?", "Eight."),
    ("Spell cat backwards.", "tac"),
    ("What do bees make?", "Honey."),
    ("Freezing point of water in Celsius?", "Zero degrees."),
]


def write_chat(path: Path, n: int | None = None, repeat: int = 1) -> Path:
    rows = (CHATS * repeat)[: n or len(CHATS) * repeat]
    with path.open("w") as f:
        for i, (q, a) in enumerate(rows):
            q = q if repeat == 1 else f"{q} (variant {i})"
            msg = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msg}) + "\n")
    return path


def tiny_config(tmp_path: Path, tiny_model: Path, **training) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_chat(tmp_path / "chat.jsonl", repeat=2)
    return {
        "base_model": str(tiny_model),
        "method": "lora",
        "data": {"train": str(data), "eval_fraction": 0.1, "max_seq_len": 128, "dedup": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "training": {
            "max_steps": 6,
            "micro_batch_size": 4,
            "lr": 1e-3,
            "save_every": 2,
            "eval_every": 3,
            "precision": "fp32",
            **training,
        },
        "tracking": {"experiment": "tests"},
        "output_dir": str(tmp_path / "run"),
    }


# ---------------------------------------------------------------- packing


@pytest.mark.unit
def test_pack_batch_resets_positions_and_masks_boundaries():
    a = {"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}
    b = {"input_ids": [4, 5], "labels": [4, 5]}
    out = pack_batch([a, b])
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # the first token of b must not be predicted from a's last token
    assert out["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]]
    assert out["num_tokens"] == 5


def _examples(tokenizer, n=4):
    from loft.data import tokenize_conversation

    exs = []
    for q, a in CHATS[:n]:
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        exs.append(tokenize_conversation(msgs, tokenizer, max_seq_len=128))
    return exs


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from loft.models import load_causal_lm, load_tokenizer, resolve_model

    info = resolve_model(str(tiny_model))
    torch.manual_seed(0)
    return load_causal_lm(info).eval(), load_tokenizer(info)


@pytest.mark.unit
@pytest.mark.parametrize("attn", ["sdpa", "loft_packed"])
def test_packed_rows_do_not_attend_across_examples(tiny, attn):
    """Each example's logits inside a packed row equal its logits computed alone, with the stock
    SDPA block mask and with loft's per-example attention."""
    from loft.train.attention import register

    model, tok = tiny
    register()
    model.set_attn_implementation(attn)
    exs = _examples(tok, 3)
    packed = pack_batch(exs)
    extra = {}
    if attn == "loft_packed":
        cu = packed["cu_seq_lens"]
        extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
    try:
        with torch.no_grad():
            # use_cache=False as in training: with a KV cache transformers does not detect packing
            out = model(
                input_ids=packed["input_ids"],
                position_ids=packed["position_ids"],
                use_cache=False,
                **extra,
            )
            logits = out.logits[0]
            start = 0
            for ex in exs:
                n = len(ex["input_ids"])
                alone = model(input_ids=torch.tensor([ex["input_ids"]]), use_cache=False).logits[0]
                torch.testing.assert_close(logits[start : start + n], alone, rtol=1e-4, atol=1e-4)
                start += n
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.unit
@pytest.mark.parametrize("attn", ["sdpa", "loft_packed"])
def test_packed_loss_equals_padded_loss(tiny, attn):
    from loft.train.attention import register
    from loft.train.loss import loss_sum

    model, tok = tiny
    exs = _examples(tok, 4)
    register()
    try:
        with torch.no_grad():
            model.set_attn_implementation(attn)
            lp, n_p = loss_sum(model, pack_batch(exs))
            model.set_attn_implementation("sdpa")
            lq, n_q = loss_sum(model, pad_batch(exs, tok.pad_token_id))
    finally:
        model.set_attn_implementation("sdpa")
    assert n_p == n_q > 0
    assert abs(float(lp) - float(lq)) / float(lq) <= 1e-4


@pytest.mark.unit
def test_loss_sum_matches_transformers_loss(tiny):
    """Projecting only labelled positions gives the same mean loss as the stock full-logits path."""
    from loft.train.loss import loss_sum

    model, tok = tiny
    ex = _examples(tok, 1)[0]
    ids = torch.tensor([ex["input_ids"]])
    labels = torch.tensor([ex["labels"]])
    with torch.no_grad():
        stock = model(input_ids=ids, labels=labels).loss
        ours, n = loss_sum(model, {"input_ids": ids, "labels": labels})
    torch.testing.assert_close(ours / n, stock, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- training runs


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.unit
def test_grad_accumulation_invariance(tmp_path, tiny_model, loft_home):
    from loft.train import train

    results = []
    for mbs, acc in ((8, 1), (4, 2)):
        cfg = tiny_config(
            tmp_path / f"{mbs}x{acc}", tiny_model, micro_batch_size=mbs, grad_accum=acc
        )
        cfg["lora"]["dropout"] = 0.0
        cfg["training"]["max_steps"] = 2
        results.append(train(validate_config(cfg), progress=False).run_dir)
    a, b = _adapter(results[0]), _adapter(results[1])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.unit
def test_lora_run_writes_outputs_and_leaves_base_unchanged(tmp_path, tiny_model, loft_home):
    from loft.models import resolve_model
    from loft.train import train

    before = resolve_model(str(tiny_model)).sha256
    res = train(validate_config(tiny_config(tmp_path, tiny_model)), progress=False)
    assert resolve_model(str(tiny_model)).sha256 == before
    run = res.run_dir
    assert {p.name for p in (run / "adapter").iterdir()} >= {
        "adapter_model.safetensors",
        "adapter_config.json",
        "lineage.json",
        "tokenizer.json",
    }
    s = json.loads((run / "run_summary.json").read_text())
    for key in (
        "run_id", "status", "method", "base_model", "dataset_fingerprint", "train_tokens",
        "steps", "wall_s", "tokens_per_s", "peak_mem_bytes", "final_train_loss", "eval_loss",
        "output_path",
    ):  # fmt: skip
        assert key in s, key
    assert s["status"] == "completed" and s["steps"] == 6 and s["train_tokens"] > 0
    assert s["eval_loss"] is not None
    lineage = json.loads((run / "adapter" / "lineage.json").read_text())
    assert lineage["base_model"]["sha256"] == before
    assert lineage["dataset_fingerprint"] == s["dataset_fingerprint"]
    assert lineage["config"]["method"] == "lora"
    assert (run / "resolved.yaml").is_file()
    # keep_checkpoints=2 of saves at steps 2 and 4
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == [
        "step-00000002",
        "step-00000004",
    ]
    lora = _adapter(run)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())


@pytest.mark.unit
@pytest.mark.parametrize("method", ["full", "dora"])
def test_other_methods_train(tmp_path, tiny_model, loft_home, method):
    from loft.train import train

    cfg = tiny_config(tmp_path, tiny_model, max_steps=2)
    cfg["method"] = method
    res = train(validate_config(cfg), progress=False)
    out = res.run_dir / ("model" if method == "full" else "adapter")
    assert (out / "lineage.json").is_file()
    if method == "full":
        assert (out / "model.safetensors").is_file()


@pytest.mark.unit
def test_qlora_refuses_on_cpu_before_loading(tmp_path, tiny_model, loft_home, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    import loft.models as models
    from loft.train import train

    def boom(*a, **k):
        raise AssertionError("model was loaded")

    monkeypatch.setattr(models, "resolve_model", boom)
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["method"] = "qlora"
    with pytest.raises(HardwareError, match="CUDA"):
        train(validate_config(cfg), progress=False)


@pytest.mark.unit
def test_resume_refuses_changed_config(tmp_path, tiny_model, loft_home):
    from loft.train import train

    cfg = tiny_config(tmp_path, tiny_model, max_steps=2)
    train(validate_config(cfg), progress=False)
    cfg["training"]["lr"] = 5e-4
    with pytest.raises(ConfigError, match=r"training\.lr"):
        train(validate_config(cfg), resume=True, progress=False)


def _write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


RESUME_STEPS = 40


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model):
    """(config, adapter) of a 40-step run nothing interrupted: what a resumed run must equal."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cfg = tiny_config(root, tiny_model, max_steps=RESUME_STEPS, save_every=3, eval_every=1000)
    r = run_loft("train", str(_write_yaml(root / "ref.yaml", cfg)), "-q")
    assert r.returncode == 0, r.stderr
    run_dir = Path(r.stdout.strip().splitlines()[-1])
    sessions = json.loads((run_dir / "run_summary.json").read_text())["sessions"]
    assert [(s["start_step"], s["steps_run"]) for s in sessions] == [(0, RESUME_STEPS)]
    return cfg, _adapter(run_dir)


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path) -> None:
    from loft.train.checkpoint import checkpoint_dirs

    deadline = time.monotonic() + 300  # a polling limit, not the assertion
    while not checkpoint_dirs(run_dir):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run wrote no checkpoint"
        time.sleep(0.02)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step-"))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT", "SIGTERM"])
def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, loft_home, uninterrupted, sig):
    """Stop a real `loft train` after its first checkpoint (SIGKILL: no chance to save; SIGINT and
    SIGTERM: it saves one and exits 130), then --resume: the run's own record shows the resumed
    process started at the newest checkpoint present when the first one stopped and ran only the
    remaining steps, and the adapter equals the uninterrupted run's (max diff <= 1e-6)."""
    from typer.testing import CliRunner

    from loft.cli.main import app
    from loft.train.checkpoint import checkpoint_dirs

    ref_cfg, ref = uninterrupted
    run_dir = tmp_path / "run"
    cfg_path = _write_yaml(tmp_path / "c.yaml", dict(ref_cfg, output_dir=str(run_dir)))
    proc = start_loft("train", str(cfg_path), "-q")
    _wait_for_checkpoint(proc, run_dir)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    at_stop = checkpoint_dirs(run_dir)  # the process is gone: this is what it left
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert not (run_dir / "adapter").exists()
    (first,) = summary["sessions"]
    assert first["start_step"] == 0 and first["resumed_from"] is None
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
        assert summary["status"] == "running"  # died without a chance to say otherwise
        assert "steps_run" not in first
    else:  # a checkpoint at the step where it stopped, and a clean exit that says how to resume
        assert proc.returncode == 130, err
        assert "Traceback" not in err and "--resume" in err
        assert summary["status"] == first["status"] == "interrupted"
        assert first["steps_run"] == first["end_step"] == _step(at_stop[-1])
    stopped_at = _step(at_stop[-1])
    assert 3 <= stopped_at < RESUME_STEPS, "the run was not stopped mid-way"

    res = run_loft("train", str(cfg_path), "-q", "--resume")
    assert res.returncode == 0, res.stderr
    said = f"at step {_step(at_stop[-1])}/{RESUME_STEPS} from checkpoint {at_stop[-1].name}"
    assert said in res.stderr  # -q hides progress, not where it resumed
    summary = json.loads((run_dir / "run_summary.json").read_text())
    resumed = summary["sessions"][-1]
    assert len(summary["sessions"]) == 2 and summary["status"] == "completed"
    assert resumed["resumed_from"] == at_stop[-1].name
    assert resumed["start_step"] == stopped_at
    assert resumed["steps_run"] == RESUME_STEPS - stopped_at
    assert resumed["end_step"] == summary["steps"] == RESUME_STEPS
    shown = CliRunner().invoke(app, ["runs", "show", str(run_dir)])
    assert f"at step {stopped_at} from {at_stop[-1].name}, ran " in shown.output, shown.output
    out = _adapter(run_dir)
    assert out.keys() == ref.keys()
    diff = max(float((ref[k] - out[k]).abs().max()) for k in ref)
    assert diff <= 1e-6, diff


@pytest.mark.unit
def test_interrupt_is_a_loft_error_that_exits_130():
    from loft.core.errors import LoftError, exit_code_for

    assert issubclass(TrainingInterrupted, LoftError)
    assert exit_code_for(TrainingInterrupted("stopped")) == 130


# ---------------------------------------------------------------- config contract


@pytest.mark.unit
def test_config_errors_reported_together_with_did_you_mean(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(
        "base_model: x\nmethod: qlor\ndata: {train: a.jsonl, max_seq_len: -3}\n"
        "training: {learning_rate: 0.1, micro_batch_size: 0}\n"
    )
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "method: got 'qlor'" in msg
    assert "data.max_seq_len: got -3" in msg
    assert "training.learning_rate: unknown key" in msg
    assert "training.micro_batch_size: got 0" in msg
    assert "4 problems" in msg


@pytest.mark.unit
def test_config_typo_did_you_mean(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data: {train: a.jsonl}\ntraining: {epoch: 2}\n")
    with pytest.raises(ConfigError, match=r"did you mean 'training\.epochs'"):
        load_config(p)


@pytest.mark.unit
def test_overrides_and_relative_paths(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {train: data/train.jsonl}\n")
    cfg = load_config(p, ["training.lr=1e-4", "lora.target_modules=[q_proj,v_proj]"])
    assert cfg.training.lr == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.train == str(tmp_path / "data" / "train.jsonl")
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_config(p, ["training.lr"])


@pytest.mark.unit
def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+:\d+: invalid YAML"):
        load_config(p)


@pytest.mark.integration
def test_trained_eos_makes_the_tuned_model_stop(tmp_path, tiny_model, loft_home):
    """The assistant's closing <|im_end|> is a trained label, so a tuned model ends its answer.

    An untrained random model never emits eos within the budget; after fine-tuning on four chats
    it reproduces the answer and stops."""
    from loft.models import load_causal_lm, load_tokenizer, resolve_model
    from loft.train import train

    data = write_chat(tmp_path / "four.jsonl", n=4)
    cfg = tiny_config(tmp_path, tiny_model, max_steps=60, lr=3e-3, save_every=1000)
    cfg.update(method="full")
    cfg["data"].update(train=str(data), eval_fraction=0.0)
    res = train(validate_config(cfg), progress=False)

    tok = load_tokenizer(resolve_model(str(tiny_model)))
    budget = 24

    def answer(model, q):
        msgs = [{"role": "user", "content": q}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=budget, do_sample=False, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )  # fmt: skip
        return out[0, ids.shape[1] :].tolist()

    base = load_causal_lm(resolve_model(str(tiny_model))).eval()
    assert tok.eos_token_id not in answer(base, CHATS[0][0])  # the control: no stop before tuning
    tuned = load_causal_lm(resolve_model(str(res.run_dir / "model"))).eval()
    for q, a in CHATS[:4]:
        new = answer(tuned, q)
        assert new[-1] == tok.eos_token_id and len(new) < budget, tok.decode(new)
        assert tok.decode(new, skip_special_tokens=True).strip() == a


@pytest.mark.unit
def test_run_in_mlflow_has_config_params_step_metrics_system_info_and_artifacts(
    tmp_path, tiny_model, loft_home
):
    """What the README promises a training run records in MLflow."""
    import platform

    from transformers import get_scheduler

    from loft.core.config import flatten
    from loft.tracking import mlflow_client
    from loft.tracking.mlflow_tracker import clean_key, param_value
    from loft.train import train

    cfg = validate_config(tiny_config(tmp_path, tiny_model))  # 6 steps, eval every 3
    res = train(cfg, progress=False)
    s = res.summary
    client = mlflow_client()
    run = client.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == res.run_dir.name

    flat = flatten(cfg.model_dump(mode="json"))
    expected = {clean_key(k): param_value(v) for k, v in flat.items()}
    assert {k: run.data.params.get(k) for k in expected} == expected
    assert run.data.params["dataset.fingerprint"] == s["dataset_fingerprint"]

    def history(name: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}

    loss, lr, tok_s = history("train/loss"), history("train/lr"), history("train/tokens_per_s")
    assert sorted(loss) == sorted(lr) == sorted(tok_s) == list(range(1, 7))
    assert s["final_train_loss"] == pytest.approx(sum(loss.values()) / 6, abs=1e-6)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.training.lr)
    sched = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=6)
    for step in range(1, 7):  # the schedule's value after each optimizer step
        opt.step()
        sched.step()
        assert lr[step] == pytest.approx(sched.get_last_lr()[0])
    assert all(v > 0 for v in tok_s.values())
    eval_loss = history("eval/loss")
    assert sorted(eval_loss) == [3, 6] and eval_loss[6] == pytest.approx(s["eval_loss"])

    tags = run.data.tags
    assert tags["sys.python"] == platform.python_version()
    assert tags["sys.torch"] == torch.__version__
    assert tags["sys.cpu_count"] == str(os.cpu_count())
    assert tags["loft.run_id"] == res.run_dir.name and tags["loft.method"] == "lora"

    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert arts == {"resolved.yaml", "run_summary.json", "lineage.json", "data"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "data")} == {"data/report.json"}


@pytest.mark.unit
def test_auto_precision_and_checkpointing_are_what_the_loop_runs(tmp_path, tiny_model, loft_home):
    """`precision: auto` trains under bf16 autocast exactly where the hardware has native bf16
    (read here from /proc/cpuinfo or CUDA), fp32 otherwise; `gradient_checkpointing: auto` is
    off on CPU and on for a GPU. Checked on the model the loop actually trains."""
    import loft.train.sft as sft

    cfg = tiny_config(tmp_path, tiny_model, max_steps=2)
    cfg["training"].update(precision="auto", gradient_checkpointing="auto")
    if torch.cuda.is_available():
        native_bf16, checkpointing = torch.cuda.is_bf16_supported(), True
    else:
        flags = Path("/proc/cpuinfo").read_text().split()
        native_bf16, checkpointing = "avx512_bf16" in flags or "amx_bf16" in flags, False
    seen: list[torch.dtype] = []
    built: list[torch.nn.Module] = []
    real_build = sft.build_model

    def build_and_watch(*args, **kwargs):
        model = real_build(*args, **kwargs)
        mlp = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp"))
        mlp.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
        built.append(model)
        return model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sft, "build_model", build_and_watch)
        res = sft.train(validate_config(cfg), progress=False)
    (model,) = built
    assert seen and set(seen) == {torch.bfloat16 if native_bf16 else torch.float32}
    assert model.is_activation_checkpointing == checkpointing
    precision = "bf16 autocast" if native_bf16 else "fp32"
    checkpoints = "on" if checkpointing else "off"
    assert res.summary["placement"].endswith(f"{precision}, gradient checkpointing {checkpoints}")


@pytest.mark.integration
def test_quiet_train_still_names_the_version_it_became(tmp_path, tiny_model, loft_home):
    """`loft train -q` as users run it: no progress, no library deprecation notices, but the
    version it became, and losses printed to 4 places."""
    cfg = tiny_config(tmp_path, tiny_model, max_steps=1)
    cfg["register"] = {"name": "quiet-bot"}
    r = run_loft("train", str(_write_yaml(tmp_path / "q.yaml", cfg)), "-q")
    assert r.returncode == 0, r.stderr
    assert "registered as quiet-bot:1" in r.stderr
    assert "step 1/1" not in r.stderr  # -q: no progress
    assert "FutureWarning" not in r.stderr  # PEFT's deprecation notice stays out
    assert re.search(r"train loss \d+\.\d{4}, eval loss (\d+\.\d{4}|-),", r.stdout), r.stdout


@pytest.mark.unit
def test_finished_run_registers_itself_unless_disabled(tmp_path, tiny_model, loft_home):
    from loft.registry import get_version
    from loft.train import train

    cfg = tiny_config(tmp_path / "a", tiny_model, max_steps=1)
    cfg["register"] = {"name": "tiny-chat"}
    s = train(validate_config(cfg), progress=False).summary
    assert s["registered"] == "tiny-chat:1"
    from typer.testing import CliRunner

    from loft.cli.main import app

    shown = CliRunner().invoke(app, ["runs", "show", s["run_dir"]])
    assert "registered           tiny-chat:1" in shown.output, shown.output
    mv = get_version("tiny-chat:1")
    assert mv.to_dict()["lineage"]["dataset_fingerprint"] == s["dataset_fingerprint"]

    cfg = tiny_config(tmp_path / "b", tiny_model, max_steps=1)
    cfg["register"] = False
    assert "registered" not in train(validate_config(cfg), progress=False).summary
