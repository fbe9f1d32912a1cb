"""Fixed costs of every command: CLI start-up, resolving the base model, logging a metric.

    .venv/bin/python bench/overheads.py [--runs 5] [--steps 500]

Each figure is printed beside the stock path measured in the same run (machines are noisy):

- `loft --help`, a fresh process each time, against a bare interpreter (`python -c pass`) and one
  that imports torch (what an accidental top-level import would cost every command).
- A second `resolve_model("smollm2-135m-instruct")` (the conversion is cached; every file is
  re-verified by sha256), against hashing the same files alone and against `verify=False`.
- `MlflowTracker.log_metrics` per training step (3 metrics, buffered, written in batches) against
  MLflow's own `MlflowClient.log_metric` per value on the same kind of SQLite store.
- `loft registry list` and `show` (names, versions, aliases read straight from the SQLite store)
  against the same listing through MLflow's client in a fresh process.
- `loft data prepare` of an already prepared file (found from the files alone) against loading
  the tokenizer, which the cache check needed before.

The tests check the behaviour behind these numbers (no heavy import at --help, no reconversion,
batched writes); the timings live here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def _median_s(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _process(*argv: str) -> Callable[[], object]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return lambda: subprocess.run(argv, capture_output=True, check=True, env=env)


def cli_startup(runs: int) -> None:
    py = sys.executable
    loft = _median_s(_process(py, "-m", "loft.cli.main", "--help"), runs)
    bare = _median_s(_process(py, "-c", "pass"), runs)
    torch = _median_s(_process(py, "-c", "import torch"), runs)
    print(f"loft --help            {loft * 1e3:8.0f} ms (median of {runs})")
    print(f"  python -c pass       {bare * 1e3:8.0f} ms  -> loft adds {(loft - bare) * 1e3:.0f} ms")
    print(f"  python -c 'import torch' {torch * 1e3:4.0f} ms  -> {torch / loft:.1f}x loft --help")


def model_resolve(runs: int) -> None:
    from loft.models import BUILTIN_NAME, resolve_model
    from loft.models.manifest import sha256_file

    info = resolve_model(BUILTIN_NAME)  # converts on the first use ever; not timed
    files = [p for p in sorted(info.path.iterdir()) if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    again = _median_s(lambda: resolve_model(BUILTIN_NAME), runs)
    hashing = _median_s(lambda: [sha256_file(p) for p in files], runs)
    trusted = _median_s(lambda: resolve_model(BUILTIN_NAME, verify=False), runs)
    print(f"second resolve (verify) {again * 1e3:7.0f} ms for {size / 2**20:.0f} MiB")
    print(f"  sha256 of the files  {hashing * 1e3:8.0f} ms  -> resolve/hash {again / hashing:.2f}x")
    print(f"  verify=False         {trusted * 1e3:8.1f} ms")


def metric_logging(steps: int) -> None:
    from loft.core.specs import TrackingSpec
    from loft.tracking import mlflow_client, open_tracker

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LOFT_HOME"] = tmp
        tracker = open_tracker(TrackingSpec(experiment="bench"), run_name="loft")
        t0 = time.perf_counter()
        for step in range(steps):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4, "tok_s": 300.0}, step=step)
        loft_s = (time.perf_counter() - t0) / steps
        tracker.finish()

        client = mlflow_client(tracker.tracking_uri)
        run = client.create_run(tracker.experiment_id, run_name="stock")
        stock_steps = max(steps // 10, 10)  # one SQLite transaction per value: slow
        t0 = time.perf_counter()
        for step in range(stock_steps):
            for key, value in (("loss", 1.0 / (step + 1)), ("lr", 1e-4), ("tok_s", 300.0)):
                client.log_metric(run.info.run_id, key, value, step=step)
        stock_s = (time.perf_counter() - t0) / stock_steps
        client.set_terminated(run.info.run_id)
    print(f"log_metrics per step   {loft_s * 1e6:8.1f} µs (3 metrics, {steps} steps)")
    print(
        f"  MlflowClient.log_metric x3 {stock_s * 1e6:6.0f} µs ({stock_steps} steps)"
        f"  -> {stock_s / loft_s:.0f}x cheaper"
    )


def small_reads(runs: int) -> None:
    from loft import registry
    from loft.models.tiny import make_tiny_model

    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LOFT_HOME"] = tmp
        tiny = make_tiny_model(Path(tmp) / "tiny", seed=0)
        for _ in range(3):
            registry.register(tiny, name="bench-model")
        listing = _median_s(_process(py, "-m", "loft.cli.main", "registry", "list"), runs)
        show = _median_s(
            _process(py, "-m", "loft.cli.main", "registry", "show", "bench-model:2"), runs
        )
        stock_code = (
            "from loft.registry.reader import MlflowReader; from loft.registry.store import "
            "client; r = MlflowReader(client()); [r.versions(n) for n in r.names()]"
        )
        stock = _median_s(_process(py, "-c", stock_code), runs)
        data = Path(tmp) / "chat.jsonl"
        msgs = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}]
        data.write_text("".join(json.dumps({"messages": msgs}) + "\n" for _ in range(20)))
        prepare = _process(py, "-m", "loft.cli.main", "data", "prepare", str(data))
        prepare()  # the first one tokenizes; the timed ones find it prepared
        hit = _median_s(prepare, runs)
        tok_code = "from loft.models import builtin_tokenizer; builtin_tokenizer()"
        tokenizer = _median_s(_process(py, "-c", tok_code), runs)
    print(f"loft registry list     {listing * 1e3:8.0f} ms, show {show * 1e3:.0f} ms")
    print(f"  via MLflow's client  {stock * 1e3:8.0f} ms  -> {stock / listing:.1f}x slower")
    print(f"loft data prepare (hit) {hit * 1e3:7.0f} ms")
    print(f"  loading the tokenizer {tokenizer * 1e3:6.0f} ms (what a hit cost before)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="repetitions per timed command")
    ap.add_argument("--steps", type=int, default=500, help="training steps of metric logging")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cli_startup(args.runs)
    model_resolve(args.runs)
    metric_logging(args.steps)
    small_reads(args.runs)


if __name__ == "__main__":
    main()
