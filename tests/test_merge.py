"""`loft merge` and `loft export --check vllm` (issue 14): an exact fp32 merge proved against base +
adapter, a drifting merge refused with nothing written, the merged version registered with its
adapter as parent and loadable by plain transformers; vLLM's verdict on LoRA and DoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import make_lora_adapter, run_cli

PROMPTS = ["Sky colour?", "A prime?", "Hi?", "Name a fruit.", "What is 2 + 2?"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the tiny model's ops are too small to share, and on a loaded machine two
    threads waiting on each other make each merge several times slower (about 70 s against 9 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _peft_logits(base_dir: Path, adapter: Path, tokenizer, texts: list[str]):
    """Logits of base + adapter (unmerged PeftModel on the fp32 weights), computed here
    independently, in float64 as loft compares them (so fp32 rounding noise is not measured)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval().double()
    return _logits(model, tokenizer, texts)


def _logits(model, tokenizer, texts: list[str]):
    import torch

    with torch.no_grad():
        return [model(**tokenizer(t, return_tensors="pt")).logits[0].double() for t in texts]


@pytest.mark.integration
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_matches_base_plus_adapter(tmp_path, loft_home, tiny_model, dora):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loft.export import merge_adapter

    adapter = make_lora_adapter(tmp_path / "adapter", tiny_model, seed=1, use_dora=dora)
    out = tmp_path / "merged"
    report = merge_adapter(str(adapter), out=out)

    assert report.prompt_source == "loft probe set"
    assert report.fp32.prompts == 20
    assert report.fp32.max_abs_logit_diff <= 1e-4
    assert report.fp32.greedy_identical == 20
    # the folder on disk, loaded by plain transformers, is base + adapter
    tok = AutoTokenizer.from_pretrained(str(out))
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert next(merged.parameters()).dtype == torch.float32
    merged.double()
    assert not any(n for n, _ in merged.named_parameters() if "lora" in n)
    want = _peft_logits(tiny_model, adapter, tok, PROMPTS)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    for got, ref, plain in zip(
        _logits(merged, tok, PROMPTS), want, _logits(base, tok, PROMPTS), strict=True
    ):
        assert float((got - ref).abs().max()) <= 1e-4
        assert float((plain - ref).abs().max()) > 1e-2  # the adapter changes the model
    assert tok.chat_template  # the adapter's chat template travels with the model
    lineage = json.loads((out / "lineage.json").read_text())
    from loft.models.manifest import combined_digest, hash_weights

    assert lineage["merged_from"]["weights_digest"] == combined_digest(hash_weights(adapter))
    assert lineage["merge"]["fp32"]["max_abs_logit_diff"] == report.fp32.max_abs_logit_diff


@pytest.mark.integration
def test_drifting_merge_is_refused_and_nothing_written(
    tmp_path, loft_home, tiny_model, monkeypatch
):
    import torch

    from loft import registry
    from loft.export import merge as merge_mod

    adapter = make_lora_adapter(tmp_path / "adapter", tiny_model, seed=2)
    registry.register(adapter, name="drift-bot")
    real = merge_mod.merge_peft

    def drifting(peft_model):
        merged = real(peft_model)
        with torch.no_grad():  # what a lossy merge (into quantised weights, say) does
            merged.model.layers[0].mlp.down_proj.weight.add_(0.05)
        return merged

    monkeypatch.setattr(merge_mod, "merge_peft", drifting)
    out = tmp_path / "out" / "merged"
    assert run_cli("merge", "drift-bot:1", "--register", "--out", str(out)) == 1
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == [] if (tmp_path / "out").exists() else True
    assert registry.list_models() == [
        {"name": "drift-bot", "latest": 1, "aliases": {}, "n_versions": 1}
    ]
    assert not list(loft_home.glob(".merge-*"))


@pytest.mark.integration
def test_merge_register_adds_a_full_version_with_the_adapter_as_parent(
    tmp_path, loft_home, tiny_model, capsys
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loft import registry

    adapter = make_lora_adapter(tmp_path / "adapter", tiny_model, seed=3)
    av = registry.register(adapter, name="merge-bot")
    capsys.readouterr()
    assert run_cli("merge", "merge-bot:1", "--register", "--dtype", "bfloat16") == 0
    out = capsys.readouterr().out
    assert "registered as merge-bot:2" in out

    mv = registry.get_version("merge-bot:2")
    assert mv.card["kind"] == "full"
    assert mv.card["lineage"]["parent"] == {"name": "merge-bot", "version": 1}
    assert mv.card["lineage"]["base_model"]["sha256"] == av.card["lineage"]["base_model"]["sha256"]
    model = AutoModelForCausalLM.from_pretrained(str(mv.path))
    assert str(next(model.parameters()).dtype) == "torch.bfloat16"
    assert AutoTokenizer.from_pretrained(str(mv.path)).chat_template
    assert not list(loft_home.glob(".merge-*"))  # the scratch copy is gone


@pytest.mark.integration
def test_merge_refuses_an_adapter_of_another_base(tmp_path, loft_home, tiny_model):
    from loft.core.errors import IntegrityError
    from loft.export import merge_adapter

    adapter = make_lora_adapter(tmp_path / "adapter", tiny_model, seed=4)
    lineage = json.loads((adapter / "lineage.json").read_text())
    lineage["base_model"]["sha256"] = "0" * 64
    (adapter / "lineage.json").write_text(json.dumps(lineage))
    with pytest.raises(IntegrityError, match="was trained on base model"):
        merge_adapter(str(adapter), out=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.integration
def test_export_check_vllm_refuses_dora_and_passes_lora(tmp_path, loft_home, tiny_model, capsys):
    lora = make_lora_adapter(tmp_path / "lora", tiny_model, seed=5)
    dora = make_lora_adapter(tmp_path / "dora", tiny_model, seed=5, use_dora=True)

    assert run_cli("export", str(lora), "--check", "vllm") == 0
    assert "vLLM can serve" in capsys.readouterr().out

    assert run_cli("export", str(dora), "--check", "vllm") == 2
    out = capsys.readouterr().out
    assert "use_dora" in out and "change: retrain with lora.use_dora: false" in out

    assert run_cli("export", str(dora), "--check", "vllm", "--json") == 2
    report = json.loads(capsys.readouterr().out)
    assert report["servable"] is False
    assert [p["key"] for p in report["problems"]] == ["use_dora"]
    assert all(p["fix"] for p in report["problems"])

    assert run_cli("export", str(lora), "--check", "vllm", "--max-lora-rank", "8") == 0
    assert run_cli("export", str(lora), "--check", "vllm", "--max-lora-rank", "3") == 2


@pytest.mark.integration
def test_merge_verifies_on_the_versions_eval_split(tmp_path, loft_home, tiny_model):
    from helpers import CHAT_ROWS
    from loft.core.specs import DataSpec
    from loft.data.prepare import prepare_dataset
    from loft.export import merge_adapter
    from loft.models import load_tokenizer, resolve_model

    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in CHAT_ROWS
    ]
    data, held_out = tmp_path / "chat.jsonl", tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held_out.write_text(data.read_text().replace("?", "? (held out)"))
    spec = DataSpec(train=str(data), eval=str(held_out), max_seq_len=64, dedup=False, pii="off")
    prepared = prepare_dataset(spec, load_tokenizer(resolve_model(str(tiny_model))), progress=False)
    adapter = make_lora_adapter(tmp_path / "adapter", tiny_model, seed=6)
    lineage = json.loads((adapter / "lineage.json").read_text())
    lineage["dataset_fingerprint"] = prepared.fingerprint
    (adapter / "lineage.json").write_text(json.dumps(lineage))

    report = merge_adapter(str(adapter), out=tmp_path / "merged")
    assert report.prompt_source == f"eval split of dataset {prepared.fingerprint[:12]}"
    assert report.fp32.prompts == len(CHAT_ROWS)
    assert report.fp32.max_abs_logit_diff <= 1e-4
    assert report.fp32.greedy_identical == len(CHAT_ROWS)


@pytest.mark.integration
def test_hf_export_loads_in_plain_transformers_and_stops_at_end_of_turn(
    tmp_path, loft_home, tiny_model, capsys
):
    """`loft export REF --format hf`: the merged model, the adapter's chat template, a pad token
    that is not eos (SmolLM2's tokenizer pads with eos), generation_config eos ids that include
    the template's end-of-turn token, the lineage card and SHA256SUMS that check; a tampered
    version is refused."""
    import hashlib

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from loft import registry

    adapter = make_lora_adapter(tmp_path / "adapter", tiny_model, seed=5)
    av = registry.register(adapter, name="hf-bot")
    src_tok = AutoTokenizer.from_pretrained(str(adapter))
    assert src_tok.pad_token_id == src_tok.eos_token_id  # the case this export fixes
    out = tmp_path / "dist" / "hf"
    assert run_cli("export", "hf-bot:1", "--format", "hf", "--out", str(out)) == 0
    assert f"exported hf-bot:1 as hf to {out}" in capsys.readouterr().out

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    gen = GenerationConfig.from_pretrained(str(out))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert im_end in eos and tok.eos_token_id in eos
    assert tok.pad_token_id is not None and tok.pad_token_id not in eos
    assert model.config.pad_token_id == gen.pad_token_id == tok.pad_token_id
    assert tok.chat_template == src_tok.chat_template
    msgs = [{"role": "user", "content": "Hi"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not hasattr(ids, "shape") else ids
    model.generate(input_ids=ids, max_new_tokens=4)  # loads and runs with its own config

    card = json.loads((out / "loft_card.json").read_text())
    assert card["merged_from"]["name"] == "hf-bot" and card["merged_from"]["version"] == 1
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == len([p for p in out.rglob("*") if p.is_file()]) - 1
    for line in sums:
        digest, rel = line.split("  ", 1)
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest, rel

    # a tampered version is refused before anything is written
    weights = Path(av.path) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    again = tmp_path / "dist" / "again"
    assert run_cli("export", "hf-bot:1", "--format", "hf", "--out", str(again)) != 0
    assert not again.exists()
