"""`loft export --format gguf | gguf-lora` (issue 14, items 3-4): GGUF files read back by the `gguf`
package, loaded and run by llama.cpp itself (llama-cpp-python, built from source by `make install`),
and an Ollama Modelfile whose template renders what the chat template renders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import run_cli

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "Sky colour?"},
        {"role": "assistant", "content": '{"colour": "blue"}'},
        {"role": "user", "content": "And grass?"},
    ],
]


def go_render(template: str, system: str | None, messages: list[dict[str, str]]) -> str:
    """The subset of Go's text/template a Modelfile TEMPLATE from loft uses, evaluated as Ollama
    does: SYSTEM becomes the first message when the request has none."""
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    head, rest = template.split("{{ range .Messages }}", 1)
    body, tail = rest.rsplit("{{ end }}", 1)
    branches = re.findall(
        r'\{\{ (?:else )?if eq \.Role "(\w+)" \}\}(.*?)(?=\{\{ else if|\{\{ end \}\})', body, re.S
    )
    wrap = {role: text for role, text in branches}
    out = head
    for m in messages:
        out += wrap[m["role"]].replace("{{ .Content }}", m["content"])
    return out + tail


@pytest.mark.unit
def test_modelfile_template_renders_what_the_chat_template_renders(tiny_model: Path):
    from transformers import AutoTokenizer

    from loft.export.ollama import modelfile

    tok = AutoTokenizer.from_pretrained(str(tiny_model))  # SmolLM2's tokenizer and template
    text = modelfile("m.q8_0.gguf", tok)
    assert text.startswith("FROM ./m.q8_0.gguf\n")
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    system = re.search(r'SYSTEM """(.*?)"""', text, re.S)
    system = system.group(1) if system else None
    assert system and "SmolLM" in system  # the default system prompt the template inserts
    for conv in CONVERSATIONS:
        want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert go_render(template, system, conv) == want, conv
    assert re.findall(r'PARAMETER stop "(.*?)"', text) == ["<|im_end|>"]


@pytest.mark.unit
def test_k_quants_and_other_architectures_are_refused_with_the_way_out(tmp_path, tiny_model):
    from loft.core.errors import ConfigError
    from loft.export.gguf_file import check_quant, write_gguf

    with pytest.raises(ConfigError, match="llama-quantize"):
        check_quant("q4_k_m")
    with pytest.raises(ConfigError, match="not one of"):
        check_quant("q3")
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((tiny_model / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        write_gguf(other, tmp_path / "x.gguf", "f16", pre="smollm", name="x")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.integration
@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0", "q4_0"])
def test_gguf_reader_round_trips_every_tensor(tmp_path, tiny_model, quant):
    """Every tensor read back by gguf's own reader, dequantised, close to the weight written
    (q/k rows in llama.cpp's order); the tokenizer and chat template travel in the metadata."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from loft.export.gguf_file import permute_rope, write_gguf

    report = write_gguf(tiny_model, tmp_path / "m.gguf", quant, pre="smollm", name="m")
    bound = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2, "q4_0": 0.2}[quant]
    assert report.tensors == 20 and max(report.max_error.values()) < bound
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    weights = load_file(str(tiny_model / "model.safetensors"))
    q = dequantize(
        reader.get_tensor(_index(reader, "blk.0.attn_q.weight")).data,
        _type(reader, "blk.0.attn_q.weight"),
    )
    want = permute_rope(weights["model.layers.0.self_attn.q_proj.weight"].float().numpy(), 4)
    assert np.abs(q.reshape(want.shape) - want).max() < bound
    assert not np.allclose(want, weights["model.layers.0.self_attn.q_proj.weight"].numpy())
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    field = reader.get_field("tokenizer.chat_template")
    assert bytes(field.parts[field.data[0]]).decode() == tok.chat_template
    tokens = reader.get_field("tokenizer.ggml.tokens")
    assert len(tokens.data) == len(tok)
    _scan_agrees_with_gguf_reader(tmp_path / "m.gguf", reader)
    del torch


def _scan_agrees_with_gguf_reader(path: Path, reader) -> None:
    """loft's fast header scan reads what gguf's own reader reads: every string and number
    field, array lengths, and every tensor's name, type, shape and bytes."""
    import numpy as np
    from gguf.constants import GGUFValueType

    from loft.export.gguf_scan import scan, tensor_data

    index = scan(path, arrays=("tokenizer.ggml.tokens",))
    assert index.fields["tokenizer.ggml.tokens"] == [
        bytes(reader.get_field("tokenizer.ggml.tokens").parts[i]).decode()
        for i in reader.get_field("tokenizer.ggml.tokens").data
    ]
    checked = 0
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "tokenizer.ggml.tokens":
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            assert index.fields[key] == len(field.data), key
        elif field.types[0] == GGUFValueType.STRING:
            assert index.fields[key] == bytes(field.parts[field.data[0]]).decode(), key
        else:
            assert index.fields[key] == field.parts[field.data[0]][0], key
        checked += 1
    assert checked >= 10
    assert [t.name for t in index.tensors] == [t.name for t in reader.tensors]
    for mine, theirs in zip(index.tensors, reader.tensors, strict=True):
        assert mine.type == int(theirs.tensor_type) and mine.shape == tuple(theirs.shape.tolist())
        data = tensor_data(path, mine)
        assert data.dtype == theirs.data.dtype and data.shape == theirs.data.shape, mine.name
        assert np.array_equal(data, theirs.data), mine.name


def _index(reader, name: str) -> int:
    return next(i for i, t in enumerate(reader.tensors) if t.name == name)


def _type(reader, name: str):
    return reader.tensors[_index(reader, name)].tensor_type


# ------------------------------------------------------------------ llama.cpp itself


@pytest.fixture(scope="module")
def smollm_adapter(tmp_path_factory, smollm2):
    """A small random LoRA on SmolLM2 (B ~ N(0, 0.01)): it changes the logits, not the language."""
    from loft.models.tiny import make_random_lora

    return make_random_lora(tmp_path_factory.mktemp("gguf") / "adapter", smollm2, r=8)


@pytest.mark.integration
@pytest.mark.slow
def test_llama_cpp_generates_what_transformers_generates(
    tmp_path, loft_home, smollm2, smollm_adapter
):
    """f16 GGUF: every prompt's 32 greedy tokens identical to transformers on the merged model,
    and so is the GGUF LoRA on the base's f16 GGUF. q8_0 is lossy: on this 135M model even
    llama.cpp's own quantizer (llama_model_quantize of the f16 file) keeps only 6 to 11 of 20
    prompts identical for 32 tokens, so loft's q8_0 is checked against llama.cpp's own Q8_0 tensor
    by tensor (within one quantisation step) and runs in llama.cpp; its agreement is printed."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loft.export.verify import CHAT_PROMPTS as PROMPTS
    from loft.export.verify import chat_prompt_ids, identical, llama_greedy, transformers_greedy
    from loft.models import load_causal_lm

    pytest.importorskip("llama_cpp")
    probe = tmp_path / "probe.txt"
    probe.write_text("Hi\n")  # the merge check itself is tested in test_merge.py
    dist = tmp_path / "dist"
    for quant in ("f16", "q8_0"):
        rc = run_cli(
            "export",
            str(smollm_adapter),
            "--format",
            "gguf",
            "--quant",
            quant,
            "--out",
            str(dist),
            "--prompts",
            str(probe),
        )
        assert rc == 0
    assert run_cli("export", str(smollm_adapter), "--format", "gguf-lora", "--out", str(dist)) == 0
    base_dir = tmp_path / "base-gguf"
    assert (
        run_cli(
            "export",
            str(smollm2.path),
            "--format",
            "gguf",
            "--quant",
            "f16",
            "--out",
            str(base_dir),
        )
        != 0
    )  # a model folder is not an adapter
    from loft.core.paths import read_json_object
    from loft.export.gguf_file import tokenizer_pre, write_gguf

    pre = tokenizer_pre(read_json_object(Path(smollm2.path) / "MANIFEST.json"), None)
    assert pre == "smollm"
    base_gguf = write_gguf(
        Path(smollm2.path), tmp_path / "base.f16.gguf", "f16", pre=pre, name="base"
    ).path

    tok = AutoTokenizer.from_pretrained(str(smollm_adapter))
    eos = sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    prompts = chat_prompt_ids(tok, PROMPTS)
    peft = PeftModel.from_pretrained(load_causal_lm(smollm2), str(smollm_adapter)).eval()
    want_lora = transformers_greedy(peft, prompts, eos)
    merged = peft.merge_and_unload().eval()
    want = transformers_greedy(merged, prompts, eos)
    assert want == want_lora  # the merge is exact (sanity of the reference itself)
    del torch, AutoModelForCausalLM

    stem = smollm_adapter.name
    f16 = llama_greedy(dist / f"{stem}.f16.gguf", prompts, eos)
    q8 = llama_greedy(dist / f"{stem}.q8_0.gguf", prompts, eos)
    lora = llama_greedy(base_gguf, prompts, eos, lora=dist / f"{stem}.lora-f16.gguf")
    plain = llama_greedy(base_gguf, prompts, eos)
    own = tmp_path / "own.q8_0.gguf"
    _llama_quantize(dist / f"{stem}.f16.gguf", own)
    theirs = llama_greedy(own, prompts, eos)
    same = {
        k: identical(v, want)
        for k, v in (
            ("f16", f16), ("q8_0", q8), ("llama.cpp q8_0", theirs), ("lora", lora), ("base", plain)
        )
    }  # fmt: skip
    print("identical greedy prompts of 20:", same)
    assert same["f16"] == len(PROMPTS), same
    assert same["lora"] == len(PROMPTS), same
    assert same["base"] < same["lora"], same  # the LoRA is applied, not ignored
    assert min(same["q8_0"], same["llama.cpp q8_0"]) > 0, same
    _same_q8_0(dist / f"{stem}.q8_0.gguf", own)


def _same_q8_0(mine: Path, theirs: Path) -> None:
    """Every Q8_0 tensor of ``mine`` dequantises to within one quantisation step of llama.cpp's."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from loft.export.gguf_scan import scan, tensor_data

    q8 = GGMLQuantizationType.Q8_0
    a = {t.name: t for t in scan(mine).tensors}
    b = {t.name: t for t in scan(theirs).tensors}
    assert a.keys() == b.keys()
    checked = 0
    for name, t in a.items():
        if t.type != q8:
            continue
        assert b[name].type == q8, name
        x, y = dequantize(tensor_data(mine, t), q8), dequantize(tensor_data(theirs, b[name]), q8)
        step = float(np.abs(y).max()) / 127
        assert float(np.abs(x - y).max()) <= 1.5 * step, name
        checked += 1
    assert checked > 200


def _llama_quantize(src: Path, dest: Path) -> None:
    """llama.cpp's own Q8_0 quantizer (what `llama-quantize src dest Q8_0` runs)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert (
        llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(params))
        == 0
    )
