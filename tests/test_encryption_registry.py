"""Registry files encrypted at rest: register → serve one request → eval → export with a KEK
configured, the version's files encrypted on disk and in S3, consumers decrypting in memory
only, and no plaintext byte of the adapter anywhere under LOFT_HOME or the temp dir (scanned)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import linked_home, make_lora_adapter, run_cli, serving

pytestmark = pytest.mark.integration

WEIGHTS = "adapter_model.safetensors"


def write_kek(path: Path) -> Path:
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


def needles(weights: bytes, n: int = 8) -> list[bytes]:
    """64-byte slices spread over the tensor data of a safetensors file (past its JSON header)."""
    start = 8 + int.from_bytes(weights[:8], "little")
    step = max(1, (len(weights) - start - 64) // n)
    return [weights[i : i + 64] for i in range(start, len(weights) - 64, step)][:n]


def plaintext_hits(roots: list[Path], probes: list[bytes]) -> list[str]:
    """Every file under ``roots`` (symlinks not followed) holding any of ``probes``."""
    hits = []
    for root in roots:
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                p = Path(dirpath) / name
                if p.is_symlink() or not p.is_file():
                    continue
                data = p.read_bytes()
                if any(probe in data for probe in probes):
                    hits.append(str(p))
    return hits


@dataclass
class Setup:
    root: Path
    home: Path
    tmp: Path
    src: Path
    kek: Path
    probes: list[bytes]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, _session_home: Path):
    root = tmp_path_factory.mktemp("enc")
    src = make_lora_adapter(root / "src", tiny_model, seed=7)  # outside the scanned folders
    mp = pytest.MonkeyPatch()
    home = linked_home(root, _session_home)
    tmp = root / "tmpdir"
    tmp.mkdir()
    mp.setenv("LOFT_HOME", str(home))
    mp.setenv("LOFT_KEK_FILE", str(write_kek(root / "kek.bin")))
    mp.setenv("TMPDIR", str(tmp))
    mp.setattr(tempfile, "tempdir", str(tmp))
    probes = needles((src / WEIGHTS).read_bytes())
    try:
        yield Setup(root, home, tmp, src, root / "kek.bin", probes)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def version(setup: Setup):
    from loft import registry

    return registry.register(setup.src, name="secret")


def test_register_encrypts_every_file_but_card_and_tokenizer(setup: Setup, version) -> None:
    from loft import registry
    from loft.core import crypto
    from loft.registry.files import PLAINTEXT

    files = {p.name for p in version.path.iterdir()}
    assert {"card.json", WEIGHTS, "adapter_config.json", "tokenizer.json"} <= files
    kek_id = crypto.load_kek(setup.kek).key_id
    for name in files:
        if name in PLAINTEXT:
            assert not crypto.is_encrypted(version.path / name), name
        else:
            assert crypto.read_header(version.path / name).key_id == kek_id, name
    # the card's digests and sizes are the plaintext's: verify means what it says
    for rec in version.card["files"]:
        plain = (setup.src / rec["path"]).read_bytes()
        assert rec["sha256"] == hashlib.sha256(plain).hexdigest()
        assert rec["bytes"] == len(plain)
    assert registry.verify("secret:1").version == 1
    assert plaintext_hits([setup.src], setup.probes)  # the scan finds plaintext where it is
    assert not plaintext_hits([setup.home, setup.tmp], setup.probes)


def test_a_flipped_byte_in_an_encrypted_file_is_refused(setup: Setup, version) -> None:
    from loft import registry
    from loft.core.errors import IntegrityError

    other = registry.register(setup.src, name="flipped")
    path = other.path / WEIGHTS
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"flipped:1: .*adapter_model\.safetensors"):
        registry.verify("flipped:1")


def test_serve_eval_export_decrypt_in_memory_only(
    setup: Setup, version, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import httpx
    import torch

    from loft.core.specs import ServeConfig
    from loft.evaluate.loading import load_target
    from loft.serve.app import create_app
    from loft.serve.audit import AuditLog
    from loft.serve.engine import make_engine
    from loft.serve.keys import KeyStore
    from loft.serve.metrics import Metrics

    # serve: one request on the encrypted version
    store = KeyStore(setup.home / "keys.db")
    key = store.create("team", ["secret"])[1]
    cfg = ServeConfig(
        base_model=str(tiny_model), device="cpu", max_tokens_limit=8, default_max_tokens=4
    )
    engine = make_engine(cfg)
    engine.start()
    audit = AuditLog(setup.home / "serve" / "audit.jsonl", False)
    try:
        with serving(create_app(cfg, engine, store, audit=audit, metrics=Metrics())) as url:
            r = httpx.post(
                f"{url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "secret:1", "max_tokens": 4, "temperature": 0,
                      "messages": [{"role": "user", "content": "Hello"}]},
                timeout=60,
            )  # fmt: skip
    finally:
        engine.shutdown()
    assert r.status_code == 200, r.text
    from loft.registry.card import weights_digest

    assert r.headers["x-loft-adapter-sha256"] == weights_digest(version.card)

    # eval: the decrypted version is exactly the adapter it was registered from
    enc, plain = load_target("secret:1"), load_target(str(setup.src))
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.equal(enc.model(ids).logits, plain.model(ids).logits)
    assert enc.sha256 == plain.sha256 == weights_digest(version.card)
    data = setup.root / "heldout.jsonl"
    rows = [("Sky?", "Blue."), ("Prime?", "Seven.")]
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in rows))  # fmt: skip
    args = ["--data", str(data), "--metrics", "eval_loss", "--max-new-tokens", "2", "-q"]
    assert run_cli("eval", "secret:1", *args) == 0

    # export (hf): a plaintext model only where --out says, identical to base + adapter
    out = tmp_path_factory.mktemp("exported") / "hf"
    prompts = setup.root / "prompts.txt"
    prompts.write_text("Hello\n")  # one probe keeps the merge check quick
    args = ["--format", "hf", "--out", str(out), "--prompts", str(prompts)]
    assert run_cli("export", "secret:1", *args) == 0
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (exported(ids).logits - plain.model(ids).logits).abs().max().item()
    assert diff < 1e-4

    hits = plaintext_hits([setup.home, setup.tmp], setup.probes)
    assert not hits, f"plaintext adapter bytes on disk: {hits}"
    config = (setup.src / "adapter_config.json").read_bytes()
    assert not plaintext_hits([setup.home / "registry"], [config[:64]])


def test_full_model_version_loads_decrypted(setup: Setup, tiny_model: Path) -> None:
    import torch

    from loft import registry
    from loft.core import crypto
    from loft.evaluate.loading import load_target
    from loft.models import load_causal_lm, resolve_model

    mv = registry.register(tiny_model, name="fullsecret")
    assert crypto.is_encrypted(mv.path / "model.safetensors")
    assert crypto.is_encrypted(mv.path / "config.json")
    got = load_target("fullsecret:1")
    want = load_causal_lm(resolve_model(str(tiny_model))).eval()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(got.model(ids).logits, want(ids).logits)
    assert got.kind == "full"


def test_s3_objects_are_encrypted_and_verified_on_download(
    setup: Setup, s3_server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, _session_home: Path
) -> None:
    from loft import registry
    from loft.core import crypto
    from loft.core.errors import IntegrityError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{setup.root / 's3-mlflow.db'}")
    monkeypatch.setenv("LOFT_REGISTRY_URL", f"s3://{s3_bucket}/registry")
    mv = registry.register(setup.src, name="remote")
    s3 = s3_server.client()
    key = f"registry/remote/{mv.version}/{WEIGHTS}"
    body = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    assert crypto.is_encrypted_bytes(body)
    assert not any(p in body for p in setup.probes)

    second = setup.root / "second"
    second.mkdir()
    monkeypatch.setenv("LOFT_HOME", str(linked_home(second, _session_home)))
    there = registry.get_version(f"remote:{mv.version}")  # downloaded, verified by decrypting
    assert (there.path / WEIGHTS).read_bytes() == body

    bad = bytearray(body)
    bad[-5] ^= 1
    s3.put_object(Bucket=s3_bucket, Key=key, Body=bytes(bad))
    third = setup.root / "third"
    third.mkdir()
    monkeypatch.setenv("LOFT_HOME", str(linked_home(third, _session_home)))
    with pytest.raises(IntegrityError, match=r"adapter_model\.safetensors.*chunk"):
        registry.get_version(f"remote:{mv.version}")
    assert not (third / "home" / "registry" / "remote" / str(mv.version)).exists()


def test_merge_register_keeps_its_scratch_encrypted(
    setup: Setup, version, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from loft import registry
    from loft.core import crypto
    from loft.export.merge import merge_adapter

    seen: list[Path] = []
    real_rmtree = shutil.rmtree

    def checked_rmtree(path, *args, **kwargs):  # look at the scratch before it goes
        for p in Path(path).rglob("*"):
            if p.is_file() and p.name in ("model.safetensors", "config.json"):
                seen.append(p)
                assert crypto.is_encrypted(p), f"plaintext scratch file {p}"
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", checked_rmtree)
    prompts = setup.root / "prompts.txt"
    prompts.write_text("Hello\n")
    report = merge_adapter("secret:1", register=True, name="merged", prompts_file=prompts)
    assert report.registered == "merged:1" and len(seen) == 2
    mv = registry.verify("merged:1")
    assert crypto.is_encrypted(mv.path / "model.safetensors")


def test_vllm_refuses_an_encrypted_version_with_the_reason(version) -> None:
    from loft.registry.compat import vllm_problems

    problems = vllm_problems(version.path)
    assert [p.key for p in problems] == ["encryption"]
    assert "never writes a decrypted copy" in str(problems[0])


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_load_peft_is_peft_from_pretrained(setup: Setup, tiny_model: Path, dora: bool) -> None:
    """Every adapter load goes through loft.models.memory.load_peft: it builds exactly the model
    PEFT's own from_pretrained builds (weights, trainable parameters), encrypted or not."""
    import torch
    from peft import PeftModel

    from loft.core import crypto
    from loft.models import load_causal_lm, resolve_model
    from loft.models.memory import load_peft

    folder = make_lora_adapter(setup.root / f"peft-{dora}", tiny_model, seed=3, use_dora=dora)
    enc = setup.root / f"peft-{dora}-enc"
    enc.mkdir()
    for name in ("adapter_config.json", WEIGHTS):
        crypto.encrypt_to(folder / name, enc / name, crypto.provider())  # type: ignore[arg-type]
    info = resolve_model(str(tiny_model))
    for trainable in (False, True):
        want = PeftModel.from_pretrained(load_causal_lm(info), str(folder), is_trainable=trainable)
        for src in (folder, enc):
            got = load_peft(load_causal_lm(info), src, is_trainable=trainable)
            a, b = want.state_dict(), got.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            grads = [{n for n, p in m.named_parameters() if p.requires_grad} for m in (want, got)]
            assert grads[0] == grads[1] and (len(grads[0]) > 0) == trainable
            assert got.training == want.training
