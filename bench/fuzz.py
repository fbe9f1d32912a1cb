"""Fuzz loft's input parsers and APIs for a fixed time; print executions, coverage and any crash.

    .venv/bin/python bench/fuzz.py [readers|safetensors|api|all ...] [--seconds 60]

``readers`` and ``safetensors`` are coverage-guided (atheris, libFuzzer underneath), each in a
subprocess of its own: ``readers`` writes each input as a .jsonl, .json, .csv or .parquet file
(the first byte picks which) and reads it with ``loft.data.readers.read_file``, which must give
records or raise DataError; ``safetensors`` checks each input with
``loft.core.safety.check_safetensors_header``, which must return a consistent header or raise
IntegrityError. Both start from a seed corpus of valid files. Any other exception is a crash:
libFuzzer stops, writes the input under ``--artifacts`` (default $TMPDIR/loft-fuzz-crashes/), this
script prints it and exits 1.

``api`` runs schemathesis (tests/api_fuzz.py) against a live serving server (tiny model, keys
on) and the portal, with an admin key and without, all phases, random seeds, until the time is
spent; every failure is printed (no 5xx, documented statuses/bodies, no cross-key access).
The tests run the same checks small and derandomized; this is the long run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("readers", "safetensors", "api")
EXTS = (".jsonl", ".json", ".csv", ".parquet")


# ------------------------------------------------------------------- atheris (child process)


def _seed_corpus(target: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if target == "readers":
        chat = {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        }
        rows = [chat, {"prompt": "a", "completion": "b"}, {"text": "plain"}]
        (folder / "jsonl").write_bytes(b"\x00" + "\n".join(map(json.dumps, rows)).encode())
        (folder / "json").write_bytes(b"\x01" + json.dumps(rows, indent=1).encode())
        (folder / "csv").write_bytes(b'\x02prompt,completion\nhi,yo\n"a,b","c""d"\n')
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "tmp.parquet"
        pq.write_table(pa.table({"prompt": ["hi", "a"], "completion": ["yo", "b"]}), path)
        (folder / "parquet").write_bytes(b"\x03" + path.read_bytes())
        path.unlink()
    else:
        import numpy as np
        from safetensors.numpy import save

        arrays = {"w": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float16)}
        (folder / "st").write_bytes(save(arrays, metadata={"format": "pt"}))


def _child(target: str, seconds: int, artifacts: Path) -> None:
    import atheris

    with atheris.instrument_imports(include=["loft"]):
        from loft.core.errors import DataError, IntegrityError
        from loft.core.safety import check_safetensors_header
        from loft.data.readers import read_file

    work = Path(
        tempfile.mkdtemp(prefix="loft-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )
    os.environ["LOFT_HOME"] = str(work / "home")
    paths = [work / f"input{ext}" for ext in EXTS]

    def readers(data: bytes) -> None:
        if not data:
            return
        path = paths[data[0] % len(EXTS)]
        path.write_bytes(data[1:])
        try:
            result = read_file(path)
        except DataError as e:
            assert e.message.startswith(str(path)), e.message
            return
        for problem in result.problems:
            assert problem.startswith(str(path)), problem

    def safetensors(data: bytes) -> None:
        try:
            tensors = check_safetensors_header(data, len(data), where="input")
        except IntegrityError:
            return
        n = int.from_bytes(data[:8], "little")
        spans = sorted(tuple(t["data_offsets"]) for t in tensors.values())
        assert sum(b - a for a, b in spans) == len(data) - 8 - n

    corpus = work / "corpus"
    _seed_corpus(target, corpus)
    artifacts.mkdir(parents=True, exist_ok=True)
    args = [
        sys.argv[0], str(corpus), f"-max_total_time={seconds}", "-print_final_stats=1",
        "-rss_limit_mb=4096", "-timeout=20", f"-artifact_prefix={artifacts}/{target}-",
        "-max_len=65536",
    ]  # fmt: skip
    atheris.Setup(args, {"readers": readers, "safetensors": safetensors}[target])
    atheris.Fuzz()


def run_atheris(target: str, seconds: int, artifacts: Path) -> bool:
    """Fuzz ``target`` in a subprocess for ``seconds``; print its numbers; True when no crash."""
    cmd = [sys.executable, __file__, "--child", target, "--seconds", str(seconds),
           "--artifacts", str(artifacts)]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 300, cwd=ROOT)
    out = proc.stdout + proc.stderr
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", out)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", out)
    crash = re.search(r"=== Uncaught Python exception: ===.*?(?=\nINFO|\n==\d+==|\Z)", out, re.S)
    artifact = re.findall(r"Test unit written to (\S+)", out)
    execs = int(runs[-1]) if runs else 0
    wall = time.monotonic() - t0
    edges, features = cov[-1] if cov else ("?", "?")
    rate = execs / max(wall, 1e-9)
    print(f"{target}: {execs:,} executions in {wall:.0f} s ({rate:,.0f}/s), "
          f"coverage {edges} edges, {features} features")  # fmt: skip
    if crash or proc.returncode != 0:
        print(f"  CRASH (exit {proc.returncode}):")
        print("  " + (crash.group(0) if crash else out[-3000:]).replace("\n", "\n  "))
        for path in artifact:
            print(f"  input: {path}")
        return False
    return True


# ------------------------------------------------------------------------------ schemathesis


def run_api(seconds: int) -> bool:
    """schemathesis over the serving API and the portal's until ``seconds`` are spent."""
    sys.path.insert(0, str(ROOT / "tests"))
    home = Path(tempfile.mkdtemp(prefix="loft-fuzz-api-"))
    os.environ["LOFT_HOME"] = str(home / "home")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from api_fuzz import bearer, config, fuzz, pin_models, serve_target
    from helpers import serving
    from loft.models.tiny import make_tiny_model
    from portal_client import portal_for

    tiny = make_tiny_model(home / "tiny", seed=0)
    deadline = time.monotonic() + seconds
    ok, rounds, checks = True, 0, 0
    with (
        serve_target(home, tiny) as serve,
        portal_for(home / "home") as portal,
        serving(portal.app) as portal_url,
    ):
        if True:
            runs = [
                ("serve, admin key", serve.doc, serve.url, bearer(serve.keys["admin"])),
                ("serve, beta key, pinned models",
                 pin_models(serve.doc, ["alpha", "alpha:1", "beta", serve.base, "nope"]),
                 serve.url, bearer(serve.keys["beta"])),
                ("serve, no key", serve.doc, serve.url, {}),
                ("portal, admin token", portal.app.openapi(), portal_url, portal.bearer("admin")),
                ("portal, viewer token", portal.app.openapi(), portal_url, portal.bearer("viewer")),
                ("portal, no token", portal.app.openapi(), portal_url, {}),
            ]  # fmt: skip
            while time.monotonic() < deadline:
                for label, doc, url, headers in runs:
                    if time.monotonic() >= deadline:
                        break
                    seed = 1000 + rounds
                    t0 = time.monotonic()
                    out = fuzz(doc, config(url, headers, max_examples=50, seed=seed,
                                           derandomize=False))  # fmt: skip
                    checks += out.checks
                    bad = out.failures or out.errors
                    print(f"api [{label}] seed {seed}: {out.checks:,} checks in "
                          f"{time.monotonic() - t0:.0f} s, "
                          f"{'FAILED' if bad else 'no failures'}")  # fmt: skip
                    if bad:
                        ok = False
                        print("  " + out.report().replace("\n", "\n  "))
                rounds += 1
    print(f"api: {checks:,} checks in {rounds} round(s), {'no failures' if ok else 'FAILURES'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="*", help=f"any of {', '.join(TARGETS)} (default: all)")
    ap.add_argument("--seconds", type=int, default=60, help="per target")
    ap.add_argument(
        "--artifacts", type=Path, default=Path(tempfile.gettempdir()) / "loft-fuzz-crashes",
        help="where a crashing input is written",
    )  # fmt: skip
    ap.add_argument("--child", choices=TARGETS[:2], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.seconds, args.artifacts)
        return 0
    unknown = set(args.targets) - {*TARGETS, "all"}
    if unknown:
        ap.error(f"unknown target(s) {', '.join(sorted(unknown))}; choose from {TARGETS}")
    wanted = args.targets or ["all"]
    targets = TARGETS if "all" in wanted else tuple(dict.fromkeys(wanted))
    ok = True
    for target in targets:
        if target == "api":
            ok &= run_api(args.seconds)
        else:
            ok &= run_atheris(target, args.seconds, args.artifacts)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
