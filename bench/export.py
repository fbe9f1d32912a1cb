"""Merge and export on SmolLM2-135M-Instruct: times, file sizes, and agreement with transformers.

    .venv/bin/python bench/export.py [--prompts 20] [--json]

A LoRA (r16, all-linear, B ~ N(0, 0.01): it moves the logits, not the language; made by
``loft.models.tiny.make_random_lora``) on the builtin model in a temporary LOFT_HOME is exported
through loft's own code paths: ``loft merge`` (fp32, verified on its 20 probes), ``--format hf``,
``--format gguf`` at f16, q8_0 and q4_0, and ``--format gguf-lora``. Each GGUF is run by
llama.cpp (llama-cpp-python, the ``export`` extra) on the same chat prompts as transformers runs
the merged model (32 greedy tokens, stopping at the end of turn), and the number of prompts whose
tokens are identical is printed; the GGUF LoRA runs on the base model's f16 GGUF. llama.cpp's own
Q8_0 quantizer (``llama_model_quantize`` of loft's f16 file) is measured beside loft's q8_0 as the
stock reference.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=20, help="Chat prompts compared (max 20).")
    ap.add_argument("--json", action="store_true", help="Print only the result JSON.")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="loft-bench-export-"))
    os.environ["LOFT_HOME"] = str(work / "home")
    try:
        from loft.export.verify import CHAT_PROMPTS

        result = run(work, CHAT_PROMPTS[: args.prompts])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{'export':22} {'seconds':>8} {'size MiB':>9} {'identical':>10}  (of {result['prompts']})"
    )
    for row in result["rows"]:
        same = "" if row["identical"] is None else f"{row['identical']}/{result['prompts']}"
        print(f"{row['what']:22} {row['seconds']:>8.1f} {row['mib']:>9.1f} {same:>10}")
    m = result["merge"]
    print(
        f"merge check: max |logit diff| {m['max_abs_logit_diff']:.3g}, greedy identical "
        f"{m['greedy_identical']}/{m['prompts']} (16 tokens, loft's probes)"
    )
    print(json.dumps(result), file=sys.stderr)


def run(work: Path, prompts_text: list[str]) -> dict:
    import llama_cpp
    from transformers import AutoTokenizer

    from loft.core.paths import read_json_object
    from loft.export.gguf_export import export_gguf, export_gguf_lora
    from loft.export.gguf_file import tokenizer_pre, write_gguf
    from loft.export.hf import export_hf
    from loft.export.merge import merge_adapter
    from loft.export.verify import chat_prompt_ids, identical, llama_greedy, transformers_greedy
    from loft.models import load_causal_lm, resolve_model
    from loft.models.tiny import make_random_lora

    info = resolve_model("smollm2-135m-instruct")
    adapter = make_random_lora(work / "adapter", info, r=16)
    dist = work / "dist"
    rows = []

    def size(paths) -> float:
        return sum(Path(p).stat().st_size for p in paths) / 2**20

    merge, s = timed(lambda: merge_adapter(str(adapter), out=work / "merged"))
    rows.append(
        {
            "what": "merge (fp32, verified)",
            "seconds": s,
            "mib": size((work / "merged").glob("*.safetensors")),
            "identical": None,
        }
    )
    hf, s = timed(lambda: export_hf(str(adapter), dist / "hf"))
    rows.append({"what": "hf", "seconds": s, "mib": hf.bytes / 2**20, "identical": None})

    tok = AutoTokenizer.from_pretrained(str(work / "merged"))
    eos = sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    prompts = chat_prompt_ids(tok, prompts_text)
    want = transformers_greedy(
        load_causal_lm(resolve_model(str(work / "merged"))).eval(), prompts, eos
    )

    files = {}
    for quant in ("f16", "q8_0", "q4_0"):
        res, s = timed(lambda q=quant: export_gguf(str(adapter), dist, quant=q))
        files[quant] = res.gguf.path
        got = identical(llama_greedy(res.gguf.path, prompts, eos), want)
        rows.append(
            {"what": f"gguf {quant}", "seconds": s, "mib": size([res.gguf.path]), "identical": got}
        )
    own = work / "llama.cpp-q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    _, s = timed(
        lambda: llama_cpp.llama_model_quantize(
            str(files["f16"]).encode(), str(own).encode(), ctypes.byref(params)
        )
    )
    rows.append(
        {
            "what": "llama.cpp's own q8_0",
            "seconds": s,
            "mib": size([own]),
            "identical": identical(llama_greedy(own, prompts, eos), want),
        }
    )

    pre = tokenizer_pre(read_json_object(Path(info.path) / "MANIFEST.json"), None)
    base_gguf = write_gguf(
        Path(info.path), work / "base.f16.gguf", "f16", pre=pre, name="base"
    ).path
    lora, s = timed(lambda: export_gguf_lora(str(adapter), dist))
    got = identical(llama_greedy(base_gguf, prompts, eos, lora=lora.files[0]), want)
    rows.append(
        {
            "what": "gguf-lora f16 (+ base)",
            "seconds": s,
            "mib": size([lora.files[0]]),
            "identical": got,
        }
    )
    base_only = identical(llama_greedy(base_gguf, prompts, eos), want)
    rows.append(
        {
            "what": "base f16 (no adapter)",
            "seconds": 0.0,
            "mib": size([base_gguf]),
            "identical": base_only,
        }
    )
    for r in rows:
        r["seconds"] = round(r["seconds"], 1)
        r["mib"] = round(r["mib"], 1)
    return {"prompts": len(prompts), "rows": rows, "merge": merge.fp32.to_dict()}


if __name__ == "__main__":
    main()
