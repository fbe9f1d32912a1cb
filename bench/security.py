"""Security costs: encryption at rest on load (issue 20's target: at most 10% of load time).

    .venv/bin/python bench/security.py [--runs 7]

``encryption_overhead()``: the SmolLM2-135M-Instruct base (its float32 ``model.safetensors``,
~540 MB) and a LoRA r16 adapter on every linear layer of it, each loaded plaintext and encrypted
(AES-256-GCM, 1 MiB chunks, decrypted in memory; loft.core.crypto), in two ways:

- tensors: ``safetensors.torch.load_file(path)`` against ``safetensors.torch.load(decrypted)``
  (loft.models.memory.load_tensors), the bare cost of getting the weights into memory;
- model: what serving and eval do, ``from_pretrained`` on the folder against
  ``loft.models.memory.load_model`` (base), also followed by one forward pass (a plaintext
  safetensors file is mapped lazily, so its weights are read only when first used; the decrypted
  ones are resident at once), and ``PeftModel.from_pretrained`` against
  ``loft.models.memory.load_peft`` (adapter onto an already loaded base).

Plaintext and encrypted runs alternate, after one warm-up of each (files in the page cache, as
on a server that loads a version it just verified); each figure is the median of ``--runs``.
The copies live in a temp folder that is removed afterwards; the KEK is random and in memory.
Then DP-LoRA's training throughput against the same run without DP (bench/dp_throughput.py's
default section; ``--skip-dp`` leaves it out).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _median_s(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pair(plain: Callable[[], object], enc: Callable[[], object], runs: int) -> tuple[float, float]:
    """Medians of ``plain`` and ``enc``, alternating, after one warm-up of each."""
    plain(), enc()
    a, b = [], []
    for _ in range(runs):
        for fn, out in ((plain, a), (enc, b)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def _row(what: str, plain: float, enc: float) -> str:
    over = (enc - plain) / plain
    return f"{what:<34} {plain * 1e3:9.1f} ms {enc * 1e3:9.1f} ms {over:+8.1%}"


def _allocate(n: int) -> object:
    """``n`` bytes of prefaulted memory, as the decryption allocates them (its floor here)."""
    import mmap

    if not hasattr(mmap, "MAP_POPULATE"):
        return bytearray(n)
    return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)


def _forward(model) -> None:
    """One 16-token forward pass: what a server runs before its first answer, and what makes a
    lazily mapped plaintext model actually read its weights."""
    import torch

    with torch.no_grad():
        model(torch.arange(16).unsqueeze(0))


def _adapter(info, dest: Path) -> Path:
    """A LoRA r16 adapter on every linear layer of the base, random B (as after training)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from loft.models import load_causal_lm

    torch.manual_seed(0)
    model = get_peft_model(
        load_causal_lm(info),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False),
    )
    model.save_pretrained(str(dest))
    return dest


def encryption_overhead(runs: int = 7) -> dict[str, tuple[float, float]]:
    """Print and return {what: (plaintext s, encrypted s)} for the base and a r16 adapter."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loft.core import crypto
    from loft.models import load_causal_lm, resolve_model
    from loft.models.memory import load_model, load_peft, load_tensors

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    info = resolve_model("smollm2-135m-instruct")
    scratch = Path(tempfile.mkdtemp(prefix="loft-bench-security-"))
    kek = scratch / "bench.kek"
    kek.write_bytes(os.urandom(32))
    kek.chmod(0o600)
    key = crypto.load_kek(kek)
    saved = {k: os.environ.pop(k, None) for k in ("LOFT_KEK_FILE", "LOFT_KEY_PROVIDER")}
    os.environ["LOFT_KEK_FILE"] = str(kek)  # what the loaders decrypt with
    try:
        plain_base, enc_base = scratch / "base", scratch / "base-enc"
        plain_base.mkdir()
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copyfile(Path(info.path) / name, plain_base / name)
        enc_base.mkdir()
        for p in plain_base.iterdir():
            crypto.encrypt_to(p, enc_base / p.name, key)
        plain_ad = _adapter(info, scratch / "adapter")
        enc_ad = scratch / "adapter-enc"
        enc_ad.mkdir()
        for p in plain_ad.iterdir():
            if p.is_file():
                crypto.encrypt_to(p, enc_ad / p.name, key)
        weights = "model.safetensors"
        ad_w = "adapter_model.safetensors"
        base = load_causal_lm(info)
        sizes = {
            "base": (plain_base / weights).stat().st_size,
            "adapter": (plain_ad / ad_w).stat().st_size,
        }
        out = {
            "base tensors": _pair(
                lambda: load_file(str(plain_base / weights)),
                lambda: load_tensors(enc_base / weights),
                runs,
            ),
            "base model (from_pretrained)": _pair(
                lambda: AutoModelForCausalLM.from_pretrained(
                    str(plain_base), dtype=torch.float32
                ),
                lambda: load_model(enc_base, [weights], dtype=torch.float32),
                runs,
            ),
            "base model + first forward": _pair(
                lambda: _forward(AutoModelForCausalLM.from_pretrained(
                    str(plain_base), dtype=torch.float32)),
                lambda: _forward(load_model(enc_base, [weights], dtype=torch.float32)),
                runs,
            ),
            "adapter tensors": _pair(
                lambda: load_file(str(plain_ad / ad_w)),
                lambda: load_tensors(enc_ad / ad_w),
                runs,
            ),
            "adapter onto base (PEFT)": _pair(
                lambda: PeftModel.from_pretrained(base, str(plain_ad)).unload(),
                lambda: load_peft(base, enc_ad).unload(),
                runs,
            ),
            "decrypt base only": (0.0, _median_s(lambda: crypto.decrypt_file_buffer(
                enc_base / weights, key), runs)),
            "allocate as much memory": (0.0, _median_s(lambda: _allocate(
                sizes["base"]), runs)),
        }  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        os.environ.pop("LOFT_KEK_FILE", None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    mb = {k: v / 2**20 for k, v in sizes.items()}
    print(f"encryption at rest on load: SmolLM2-135M base ({mb['base']:.0f} MiB fp32) and a LoRA "
          f"r16 adapter ({mb['adapter']:.1f} MiB); median of {runs}, warm page cache")  # fmt: skip
    print(f"{'':<34} {'plaintext':>12} {'encrypted':>12} {'overhead':>8}")
    for what, (p, e) in out.items():
        if p:
            print(_row(what, p, e))
    dec, alloc = out["decrypt base only"][1], out["allocate as much memory"][1]
    print(f"{'decrypt base (file -> memory)':<34} {dec * 1e3:9.1f} ms "
          f"({mb['base'] / dec / 1024:.2f} GiB/s), of which allocating "
          f"{mb['base']:.0f} MiB takes {alloc * 1e3:.0f} ms")  # fmt: skip
    for what in ("base model + first forward", "adapter onto base (PEFT)"):
        p, e = out[what]
        verdict = "within" if (e - p) / p <= 0.10 else "ABOVE"
        print(f"load time, {what}: {(e - p) / p:+.1%}, {verdict} the issue's 10% target")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--skip-dp", action="store_true", help="Skip DP vs non-DP training throughput.")
    args = ap.parse_args(argv)
    encryption_overhead(args.runs)
    if not args.skip_dp:  # the throughput section of bench/dp_throughput.py, same data and steps
        sys.path.insert(0, str(Path(__file__).parent))
        import dp_throughput

        dp_throughput.main([])


if __name__ == "__main__":
    sys.exit(main())
