"""GPU paths, run where CUDA is present and skipped with the reason elsewhere (conftest.py):
QLoRA training steps (bitsandbytes NF4), the torch engine's mixed-adapter batches on CUDA, and the
vLLM serving engine with registered adapters (and the ones it refuses).

On CPU-only machines the refusals are what runs instead (test_train.py: QLoRA refuses before
loading; test_serve_engine.py / test_serve_api.py: the vLLM engine refuses at start).
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import threading
from pathlib import Path

import pytest

from helpers import CHAT_ROWS, linked_home, make_lora_adapter

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


class RecordingTracker:
    """A tracker that keeps every logged metric in memory (no MLflow needed for these checks)."""

    def __init__(self) -> None:
        self.run_id = None
        self.finished_status = None
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def log_params(self, params):
        return None

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path, artifact_path=None):
        return None

    def set_tags(self, tags):
        return None

    def finish(self, status="FINISHED"):
        self.finished_status = status


def test_qlora_trains_a_4bit_base_on_cuda(tmp_path: Path, tiny_model: Path, loft_home: Path):
    """QLoRA loads the base as NF4 (bitsandbytes Linear4bit), trains only the adapter in bf16
    compute, lowers the loss on four memorisable chats and saves a loadable adapter."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install '.[gpu]')")
    import bitsandbytes as bnb
    import torch
    from safetensors.torch import load_file

    import loft.train.sft as sft
    from loft.core.config import validate_config

    data = tmp_path / "chat.jsonl"
    rows = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            for q, a in CHAT_ROWS]  # fmt: skip
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    cfg = validate_config(
        {
            "base_model": str(tiny_model),
            "method": "qlora",
            "data": {"train": str(data), "eval_fraction": 0.0, "max_seq_len": 64, "dedup": False},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "training": {"max_steps": 30, "micro_batch_size": 3, "lr": 3e-3, "save_every": 10},
            "output_dir": str(tmp_path / "run"),
            "register": False,
        }
    )
    built: list[torch.nn.Module] = []
    real_build = sft.build_model

    def capture(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    tracker = RecordingTracker()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sft, "build_model", capture)
        result = sft.train(cfg, progress=False, tracker=tracker)

    (model,) = built
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "the base was not quantised"
    assert all(not p.requires_grad for m in four_bit for p in m.base_layer.parameters())
    s = result.summary
    assert s["status"] == "completed" and s["steps"] == 30
    assert s["placement"].startswith("cuda")
    losses = [m["train/loss"] for _, m in tracker.metrics]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    adapter = load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    assert s["peak_mem_bytes"] > 0 and s["memory_estimate"]["device"] == "cuda"


def test_vllm_engine_serves_base_and_adapter(
    tmp_path: Path, smollm2, _session_home: Path, monkeypatch: pytest.MonkeyPatch
):
    """The vLLM engine on SmolLM2: the base answers a factual prompt, a registered LoRA adapter
    (r8) changes the output, and its first greedy token is PEFT's on the same weights."""
    pytest.importorskip("vllm", reason="the vLLM engine needs vllm (pip install '.[vllm]')")
    import torch
    from peft import PeftModel

    from loft.core.specs import ServeConfig
    from loft.models import load_causal_lm, load_tokenizer
    from loft.registry import register
    from loft.serve.engine import make_engine
    from loft.serve.types import SamplingParams

    home = linked_home(tmp_path, _session_home)
    monkeypatch.setenv("LOFT_HOME", str(home))
    folder = make_lora_adapter(tmp_path / "adapter", smollm2.path, seed=1, r=8)
    mv = register(folder, name="gpu-alpha")
    tok = load_tokenizer(smollm2)
    prompt = tok("The capital of France is", add_special_tokens=False).input_ids

    engine = make_engine(
        ServeConfig(
            base_model=str(smollm2.path),
            engine="vllm",
            dtype="bfloat16",
            adapters=[f"{mv.name}:{mv.version}"],
            gpu_memory_utilization=0.3,
            max_prompt_tokens=64,
            max_tokens_limit=64,
            default_max_tokens=16,
        )
    )
    engine.start()
    try:

        async def complete(model: str) -> tuple[str, list[int]]:
            async with engine.acquire(model) as target:
                params = SamplingParams(max_tokens=8, temperature=0.0)
                deltas = [
                    d async for d in engine.generate(target, prompt, params, threading.Event())
                ]
            return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids]

        async def both():
            return await complete(engine.base.name), await complete(f"{mv.name}:{mv.version}")

        (base_text, _), (tuned_text, tuned_ids) = asyncio.run(both())
        assert f"{mv.name}:{mv.version}" in engine.resident()
        assert engine.queue_depth() == 0
    finally:
        engine.shutdown()
    assert "Paris" in base_text, base_text
    assert tuned_text != base_text

    base = load_causal_lm(smollm2, dtype=torch.bfloat16).to("cuda")
    peft = PeftModel.from_pretrained(base, str(mv.path)).eval()
    with torch.no_grad():
        logits = peft(input_ids=torch.tensor([prompt], device="cuda")).logits[0, -1]
    assert tuned_ids[0] == int(logits.argmax())


def _register_adapters(tmp_path: Path, session_home: Path, monkeypatch, base: Path, **adapters):
    """A fresh LOFT_HOME holding each ``name=(seed, r, use_dora)`` adapter on ``base``."""
    from loft.registry import register

    monkeypatch.setenv("LOFT_HOME", str(linked_home(tmp_path, session_home)))
    out = {}
    for name, (seed, r, dora) in adapters.items():
        folder = make_lora_adapter(tmp_path / name, base, seed=seed, r=r, use_dora=dora)
        out[name] = (folder, register(folder, name=name))
    return out


def test_torch_engine_serves_a_mixed_adapter_batch_on_cuda(
    tmp_path: Path, tiny_model: Path, _session_home: Path, monkeypatch: pytest.MonkeyPatch
):
    """Base rows and two adapters (LoRA r4, DoRA r8) decoded together on CUDA: the stacked adapter
    buffers sit on the GPU, and each row's greedy tokens are PEFT's for its adapter alone."""
    import torch
    from peft import PeftModel

    from loft.core.specs import ServeConfig
    from loft.models import load_causal_lm, resolve_model
    from loft.serve.engine import TorchEngine
    from loft.serve.types import SamplingParams

    made = _register_adapters(
        tmp_path, _session_home, monkeypatch, tiny_model, alpha=(1, 4, False), beta=(2, 8, True)
    )
    prompt = [1, 17, 280, 33, 942, 7]
    engine = TorchEngine(
        ServeConfig(
            base_model=str(tiny_model),
            device="cuda",
            dtype="float32",  # token-exact against PEFT (bf16 rounding could flip a near tie)
            max_resident_adapters=2,
            batch_wait_ms=200,  # the four requests start as one batch
        )
    )
    engine.start()
    try:

        async def one(model: str) -> list[int]:
            async with engine.acquire(model) as target:
                params = SamplingParams(max_tokens=6, temperature=0.0)
                return [
                    t
                    async for d in engine.generate(target, prompt, params, threading.Event())
                    for t in d.token_ids
                ]

        base = engine.base.name
        got = asyncio.run(_gather(one("alpha:1"), one(base), one("beta:1"), one(base)))
        layers = list(engine.multilora.layers.values())
        assert layers and all(x.a.is_cuda and x.b.is_cuda and x.m.is_cuda for x in layers)
    finally:
        engine.shutdown()

    def peft_greedy(adapter: Path | None) -> list[int]:
        model = load_causal_lm(resolve_model(str(tiny_model))).to("cuda").eval()
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter)).eval()
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([prompt], device="cuda"),
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=None,
            )
        return out[0, len(prompt) :].tolist()

    want = [peft_greedy(made["alpha"][0]), peft_greedy(None), peft_greedy(made["beta"][0])]
    want.append(want[1])
    for row, (tokens, expected) in enumerate(zip(got, want, strict=True)):
        assert tokens and tokens == expected[: len(tokens)], row  # an EOS may end a row early
    assert want[0] != want[1] and want[2] != want[1]  # both adapters change the output


async def _gather(*coros):
    return await asyncio.gather(*coros)


def test_vllm_engine_refuses_what_it_cannot_serve_and_keeps_serving(
    tmp_path: Path, smollm2, _session_home: Path, monkeypatch: pytest.MonkeyPatch
):
    """A DoRA adapter is a 400 before vLLM sees it; an adapter vLLM's own loader refuses (LoRA on
    a module SmolLM2 lacks) fails in add_lora, its request alone (a 400). The engine then still
    serves the base model and a LoRA adapter."""
    pytest.importorskip("vllm", reason="the vLLM engine needs vllm (pip install '.[vllm]')")
    from safetensors.torch import load_file, save_file

    from loft.core.errors import LoftError, http_status_for
    from loft.core.specs import ServeConfig
    from loft.models import load_tokenizer
    from loft.registry import register
    from loft.serve.engine import make_engine
    from loft.serve.types import SamplingParams

    made = _register_adapters(
        tmp_path, _session_home, monkeypatch, smollm2.path, lora=(1, 8, False), dora=(2, 8, True)
    )
    odd = tmp_path / "odd"
    shutil.copytree(made["lora"][0], odd)
    weights = odd / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k.replace(".q_proj.", ".qq_proj."): v for k, v in tensors.items()}, str(weights))
    register(odd, name="odd")
    tok = load_tokenizer(smollm2)
    prompt = tok("The capital of France is", add_special_tokens=False).input_ids

    engine = make_engine(
        ServeConfig(
            base_model=str(smollm2.path),
            engine="vllm",
            dtype="bfloat16",
            adapters=["lora:1"],
            gpu_memory_utilization=0.3,
            max_prompt_tokens=64,
            max_tokens_limit=64,
            default_max_tokens=16,
        )
    )
    engine.start()
    try:

        async def complete(model: str) -> str:
            async with engine.acquire(model) as target:
                params = SamplingParams(max_tokens=8, temperature=0.0)
                deltas = [
                    d async for d in engine.generate(target, prompt, params, threading.Event())
                ]
            return "".join(d.text for d in deltas)

        async def run():
            refused = {}
            for model in ("dora:1", "odd:1"):
                try:
                    async with engine.acquire(model):
                        refused[model] = None
                except LoftError as e:
                    refused[model] = (http_status_for(e), str(e))
            return refused, await complete(engine.base.name), await complete("lora:1")

        refused, base_text, tuned_text = asyncio.run(run())
    finally:
        engine.shutdown()
    assert refused["dora:1"][0] == 400 and "use_dora" in refused["dora:1"][1]
    assert "engine: torch" in refused["dora:1"][1]
    assert refused["odd:1"][0] == 400 and "vLLM could not load odd:1" in refused["odd:1"][1]
    assert "Paris" in base_text, base_text
    assert tuned_text != base_text
