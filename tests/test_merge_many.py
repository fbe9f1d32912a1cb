"""`loft merge A B --method ...` (issue 14, item 2): several LoRA adapters of one base merged on
their full updates. Expected weights here come from PEFT's own merge of each adapter alone
(``merge_and_unload``), so loft's update arithmetic is checked against PEFT, not against itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import make_lora_adapter, run_cli


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_adapters(tmp_path: Path, tiny_model: Path) -> tuple[Path, Path]:
    a = make_lora_adapter(tmp_path / "a", tiny_model, seed=11, r=4)
    b = make_lora_adapter(tmp_path / "b", tiny_model, seed=12, r=8)  # ranks may differ
    return a, b


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _merged_alone(base_dir: Path, adapter: Path) -> dict:
    """PEFT's merge of one adapter, fp64: {param name: weight}."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).double()
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _updates(base_dir: Path, adapters: list[Path]) -> tuple[dict, list[dict]]:
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).double()
    w0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
    deltas = []
    for a in adapters:
        merged = _merged_alone(base_dir, a)
        deltas.append({k: merged[k] - w0[k] for k in w0 if not torch.equal(merged[k], w0[k])})
    return w0, deltas


@pytest.mark.integration
def test_linear_and_cat_equal_the_weighted_sum_of_peft_merges(
    tmp_path, loft_home, tiny_model, two_adapters
):
    """linear writes base + 0.7 dW_a + 0.3 dW_b (each dW from PEFT's own merge of that adapter);
    cat writes an adapter of rank 4 + 8 that PEFT merges into the same weights."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loft.export.combine import combine_adapters

    a, b = two_adapters
    w0, (da, db) = _updates(tiny_model, [a, b])
    want = {k: w0[k] + 0.7 * da.get(k, 0) + 0.3 * db.get(k, 0) for k in set(da) | set(db)}
    assert want

    lin = combine_adapters(
        [str(a), str(b)], method="linear", weights=[0.7, 0.3], out=tmp_path / "lin"
    )
    assert lin.kind == "model" and lin.gated and lin.agreement.max_abs_logit_diff <= 1e-4
    assert lin.agreement.greedy_identical == lin.agreement.prompts == 20
    got = _weights(tmp_path / "lin")
    for k, w in want.items():
        assert float((got[k].double() - w).abs().max()) < 1e-6, k

    cat = combine_adapters([str(a), str(b)], method="cat", weights=[0.7, 0.3], out=tmp_path / "cat")
    assert cat.kind == "adapter" and cat.agreement.max_abs_logit_diff <= 1e-4
    cfg = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert cfg["r"] == 12
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).double()
    merged = PeftModel.from_pretrained(base, str(tmp_path / "cat")).merge_and_unload().state_dict()
    for k, w in want.items():
        assert float((merged[k] - w).abs().max()) < 1e-6, k
    lineage = json.loads((tmp_path / "cat" / "lineage.json").read_text())
    assert [m["path"] for m in lineage["merged_from"]] == [str(a), str(b)]


@pytest.mark.integration
def test_ties_merge_is_registered_with_both_parents(
    tmp_path, loft_home, tiny_model, two_adapters, capsys
):
    """`loft merge a:1 b:1 --method ties --weights 0.6,0.4 --density 0.5 --register --name`: a full
    version with both adapters as parents, whose update is PEFT's TIES of the two full updates."""
    import torch
    from peft.utils.merge_utils import ties

    from loft import registry

    a, b = two_adapters
    registry.register(a, name="ties-a")
    registry.register(b, name="ties-b")
    capsys.readouterr()
    rc = run_cli(
        "merge", "ties-a:1", "ties-b:1", "--method", "ties", "--weights", "0.6,0.4",
        "--density", "0.5", "--register", "--name", "ties-ab",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "registered as ties-ab:1 (parents: ties-a:1, ties-b:1)" in out
    mv = registry.get_version("ties-ab:1")
    assert mv.card["kind"] == "full"
    assert mv.card["lineage"]["parents"] == [
        {"name": "ties-a", "version": 1}, {"name": "ties-b", "version": 1},
    ]  # fmt: skip
    assert mv.card["lineage"]["parent"] == {"name": "ties-a", "version": 1}
    assert run_cli("registry", "show", "ties-ab:1") == 0
    assert "parents:  ties-a:1, ties-b:1" in capsys.readouterr().out

    w0, (da, db) = _updates(tiny_model, [a, b])
    got = _weights(Path(mv.path))
    weights = torch.tensor([0.6, 0.4], dtype=torch.float64)
    for k in sorted(set(da) | set(db))[:6]:
        want = w0[k] + ties([da[k], db[k]], weights, 0.5)
        assert float((got[k].double() - want).abs().max()) < 1e-6, k
        linear = w0[k] + 0.6 * da[k] + 0.4 * db[k]
        assert float((got[k].double() - linear).abs().max()) > 1e-4  # TIES is not linear
    assert not list(loft_home.glob(".combine-*"))


@pytest.mark.integration
def test_svd_reports_its_reconstruction_error(tmp_path, loft_home, tiny_model, two_adapters):
    from loft.export.combine import combine_adapters

    a, b = two_adapters
    exact = combine_adapters([str(a), str(b)], method="svd", rank=12, out=tmp_path / "r12")
    assert exact.svd_error["max"] < 1e-6  # rank 4 + 8 holds the sum exactly
    assert exact.agreement.max_abs_logit_diff < 1e-4
    lossy = combine_adapters([str(a), str(b)], method="svd", rank=2, out=tmp_path / "r2")
    assert lossy.svd_error["max"] > 0.1 and not lossy.gated
    assert lossy.agreement.max_abs_logit_diff > 1e-3
    assert json.loads((tmp_path / "r2" / "adapter_config.json").read_text())["r"] == 2


@pytest.mark.integration
def test_a_mergekit_recipe_gives_what_the_flags_give(tmp_path, loft_home, tiny_model, two_adapters):
    import torch

    a, b = two_adapters
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "merge_method: dare_linear\n"
        "models:\n"
        "  - model: a\n    parameters: {weight: 0.5}\n"
        "  - model: b\n    parameters: {weight: 0.5}\n"
        "parameters: {density: 0.7}\n"
    )
    assert (
        run_cli("merge", "--recipe", str(recipe), "--out", str(tmp_path / "r"), "--seed", "3") == 0
    )
    flags = ("merge", str(a), str(b), "--method", "dare_linear", "--weights", "0.5,0.5")
    assert run_cli(*flags, "--density", "0.7", "--seed", "3", "--out", str(tmp_path / "f")) == 0
    x, y = _weights(tmp_path / "r"), _weights(tmp_path / "f")
    assert all(torch.equal(x[k], y[k]) for k in x)  # the same seeded DARE pruning


@pytest.mark.integration
def test_bad_merges_are_refused_by_name(tmp_path, loft_home, tiny_model, two_adapters, capsys):
    a, b = two_adapters
    capsys.readouterr()
    # every argument problem at once
    assert run_cli("merge", str(a), str(b), "--method", "ties", "--weights", "1,2,3") == 2
    err = capsys.readouterr().err
    assert "--weights: 3 value(s) for 2 adapters" in err and "--density: ties needs" in err
    # a DoRA adapter cannot enter a weighted sum
    dora = make_lora_adapter(tmp_path / "dora", tiny_model, seed=13, use_dora=True)
    assert (
        run_cli("merge", str(a), str(dora), "--method", "linear", "--out", str(tmp_path / "x")) == 2
    )
    assert "DoRA" in capsys.readouterr().err
    # adapters of different base models
    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model, other_base)
    _perturb(other_base)
    other = make_lora_adapter(tmp_path / "other", other_base, seed=14)
    assert (
        run_cli("merge", str(a), str(other), "--method", "cat", "--out", str(tmp_path / "y")) == 2
    )
    err = capsys.readouterr().err
    assert "different base models" in err and str(other) in err
    # recipe problems with their key paths
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: slerp\nmodels:\n  - model: 3\n  - {model: b}\nextra: 1\n")
    assert run_cli("merge", "--recipe", str(bad), "--out", str(tmp_path / "z")) == 2
    err = capsys.readouterr().err
    for want in ("merge_method: got 'slerp'", "models[0].model", "extra: unknown key"):
        assert want in err, want
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))


def _perturb(model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = next(model_dir.glob("*.safetensors"))
    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 0.01
    save_file(tensors, str(path), metadata={"format": "pt"})
    (model_dir / "MANIFEST.json").unlink(missing_ok=True)  # another model, not a corrupted copy
