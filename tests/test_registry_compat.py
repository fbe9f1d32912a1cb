"""`loft.registry.compat.vllm_problems`: what vLLM's LoRA loader would refuse or serve wrong, read
from an adapter folder's config and safetensors header alone (shared by `loft serve` on vLLM and
`loft export --check vllm`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import make_lora_adapter
from loft.registry.compat import VLLM_LORA_RANKS, vllm_problems

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A plain LoRA r4 (alpha 8) on every linear layer of the tiny model, as loft trains one."""
    return make_lora_adapter(tmp_path_factory.mktemp("compat") / "lora", tiny_model, seed=1, r=4)


def variant(lora: Path, dest: Path, **config) -> Path:
    """A copy of ``lora`` with ``config`` merged into its adapter_config.json."""
    shutil.copytree(lora, dest)
    path = dest / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return dest


def with_tensors(lora: Path, dest: Path, extra: dict[str, tuple[int, ...]]) -> Path:
    """A copy of ``lora`` whose weights file also holds ``extra`` (name -> shape) tensors."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(lora, dest)
    weights = dest / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors.update({name: torch.zeros(shape) for name, shape in extra.items()})
    save_file(tensors, str(weights))
    return dest


def keys(problems) -> list[str]:
    return [p.key for p in problems]


def test_a_plain_lora_adapter_passes(lora: Path):
    assert vllm_problems(lora) == []
    assert vllm_problems(lora, max_rank=8) == []
    # rsLoRA is one uniform scale too
    assert vllm_problems(variant(lora, lora.parent / "rs", use_rslora=True)) == []


def test_dora_is_refused_naming_use_dora(tiny_model: Path, tmp_path: Path):
    dora = make_lora_adapter(tmp_path / "dora", tiny_model, seed=2, r=8, use_dora=True)
    problems = vllm_problems(dora)
    assert keys(problems) == ["use_dora"]  # its magnitude tensors are not reported again
    assert "DoRA" in str(problems[0]) and str(problems[0]).startswith("use_dora: true")


@pytest.mark.parametrize(
    ("config", "key", "words"),
    [
        ({"bias": "all"}, "bias", "'all'"),
        ({"bias": "lora_only"}, "bias", "biases"),
        ({"lora_bias": True}, "lora_bias", "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save", '["lm_head"]'),
        ({"peft_type": "IA3"}, "peft_type", "LoRA adapters only"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication", "replicated"),
        ({"use_qalora": True}, "use_qalora", "QA-LoRA"),
    ],
)
def test_each_unsupported_option_is_named(lora: Path, tmp_path: Path, config, key, words):
    problems = vllm_problems(variant(lora, tmp_path / "v", **config))
    assert keys(problems) == [key]
    assert words in problems[0].message


def test_rank_above_the_servers_max_or_what_vllm_supports(lora: Path, tmp_path: Path):
    (p,) = vllm_problems(lora, max_rank=2)
    assert (p.key, p.message) == ("r", "rank 4 is above this server's max_lora_rank (2)")
    big = variant(lora, tmp_path / "big", r=1024, lora_alpha=2048)
    (p,) = vllm_problems(big)
    assert (p.key, p.message) == ("r", f"rank 1024 is above what vLLM supports ({512})")
    assert VLLM_LORA_RANKS[-1] == 512
    # a per-module rank above the limit names rank_pattern (the scale stays uniform here)
    pattern = variant(
        lora, tmp_path / "pattern", rank_pattern={"q_proj": 16}, alpha_pattern={"q_proj": 32}
    )
    assert vllm_problems(pattern) == []
    (p,) = vllm_problems(pattern, max_rank=8)
    assert (p.key, p.message) == (
        "rank_pattern",
        "rank 16 is above this server's max_lora_rank (8)",
    )


def test_per_module_scale_is_refused_because_vllm_applies_one(lora: Path, tmp_path: Path):
    """vLLM scales every module by lora_alpha / r: a pattern that changes it would be served
    wrong, so it is named (with the modules it changes)."""
    (p,) = vllm_problems(variant(lora, tmp_path / "a", alpha_pattern={"q_proj": 32}))
    assert p.key == "alpha_pattern"
    assert "model.layers.0.self_attn.q_proj, model.layers.1.self_attn.q_proj" in p.message
    assert "lora_alpha/r = 2" in p.message
    (p,) = vllm_problems(variant(lora, tmp_path / "r", rank_pattern={"down_proj": 2}))
    assert p.key == "rank_pattern" and "down_proj" in p.message


def test_tensors_vllm_would_not_load_are_named(lora: Path, tmp_path: Path):
    head = with_tensors(
        lora,
        tmp_path / "head",
        {
            "base_model.model.lm_head.lora_A.weight": (4, 64),
            "base_model.model.lm_head.lora_B.weight": (128, 4),
        },
    )
    (p,) = vllm_problems(head)
    assert p.key == "target_modules" and "lm_head" in p.message
    emb = with_tensors(
        lora,
        tmp_path / "emb",
        {
            "base_model.model.model.embed_tokens.lora_embedding_A": (4, 128),
            "base_model.model.model.embed_tokens.lora_embedding_B": (64, 4),
        },
    )
    (p,) = vllm_problems(emb)
    assert p.key == "adapter_model.safetensors"
    assert "embed_tokens.lora_embedding_A" in p.message and "not LoRA A/B" in p.message


def test_missing_or_broken_files_are_problems_not_crashes(lora: Path, tmp_path: Path):
    assert keys(vllm_problems(tmp_path / "nowhere")) == ["adapter_config.json"]
    broken = variant(lora, tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"\x10")
    assert keys(vllm_problems(broken)) == ["adapter_model.safetensors"]
    (broken / "adapter_model.safetensors").unlink()
    assert "missing" in vllm_problems(broken)[0].message
    (broken / "adapter_config.json").write_text("{not json")
    assert keys(vllm_problems(broken)) == ["adapter_config.json"]
