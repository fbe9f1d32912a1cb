"""The planner's pre-flight estimate is within 15% of the measured peak of real `loft train` runs.

Each case is a fresh `loft train` subprocess (so its peak RSS is its own), run by the same code as
bench/planner_accuracy.py; the bench runs the full matrix and prints the table.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "planner_accuracy.py"


def _bench():
    name = "loft_bench_planner_accuracy"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _check(name: str, root: Path) -> None:
    bench = _bench()
    case = {c.name: c for c in bench.cpu_cases()}[name]
    ok, why = bench.available(case)
    if not ok:
        pytest.skip(why)
    r = bench.run_case(case, root)
    assert r["plan_bytes"] == r["estimate_bytes"], f"{name}: `loft plan CONFIG` != pre-flight"
    parts = ", ".join(f"{k} {v / bench.MIB:.0f}" for k, v in r["breakdown"].items() if v)
    assert abs(r["error"]) <= bench.TOLERANCE, (
        f"{name}: estimate {r['estimate_bytes'] / bench.MIB:.0f} MiB vs measured "
        f"{r['measured_bytes'] / bench.MIB:.0f} MiB ({100 * r['error']:+.1f}%); "
        f"breakdown MiB: {parts}"
    )


@pytest.mark.integration
@pytest.mark.parametrize("name", ["tiny-lora-mb1-short", "tiny-full-mb4-short"])
def test_tiny_model_estimate_within_tolerance(name, tmp_path):
    _check(name, tmp_path)


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_lora_estimate_within_tolerance(tmp_path, smollm2):
    _check("smol-lora-mb4-short", tmp_path)


@pytest.mark.integration
def test_gpu_cases_refuse_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: test_gpu_estimate_within_tolerance runs a GPU case")
    bench = _bench()
    assert bench.gpu_cases()
    for case in bench.gpu_cases():
        ok, why = bench.available(case)
        assert not ok and "CUDA" in why, case.name


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.gpu
def test_gpu_estimate_within_tolerance(tmp_path, smollm2):
    _check("gpu-smol-lora-mb8-long", tmp_path)
