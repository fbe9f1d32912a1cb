"""Gates (parse, load with FILE:LINE, evaluate against a champion) and ROUGE-L. Pure: no torch."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from loft.core.errors import ConfigError, NotFoundError
from loft.evaluate.gates import Check, evaluate_gate, load_gate, parse_gate
from loft.evaluate.rouge import lcs_length, rouge_l

# ---------------------------------------------------------------- parsing


@pytest.mark.unit
def test_parse_gate_absolute_and_relative():
    checks = parse_gate(
        [
            "exact_match >= 0.8",
            "eval_loss <= champion + 0.02",
            "hellaswag>=champion-0.01",
            "rouge_l > champion",
            "perplexity < 1e3",
            "json_exact_match == 1",
        ]
    )
    assert checks[0] == Check("exact_match >= 0.8", "exact_match", ">=", 0.8)
    assert (checks[1].metric, checks[1].op, checks[1].relative) == ("eval_loss", "<=", True)
    assert checks[1].offset == pytest.approx(0.02)
    assert checks[2].metric == "hellaswag" and checks[2].offset == pytest.approx(-0.01)
    assert checks[3].relative and checks[3].offset == 0.0 and checks[3].op == ">"
    assert checks[4].value == 1000.0 and not checks[4].relative
    assert checks[5].op == "=="


@pytest.mark.unit
def test_parse_gate_reports_every_bad_expression_with_its_index():
    with pytest.raises(ConfigError) as e:
        parse_gate(
            ["exact_match >= 0.8", "loss => 1", "rouge_l >= champ + 1", "x >= nan", 3],
            source="cfg.gate",
        )
    msg = str(e.value)
    assert "4 bad gate expression(s)" in msg
    assert "cfg.gate[1]: cannot parse 'loss => 1'" in msg
    assert "cfg.gate[2]" in msg and "'champ + 1'" in msg
    assert "cfg.gate[3]" in msg
    assert "cfg.gate[4]: expected a string" in msg
    assert "cfg.gate[0]" not in msg
    assert "champion + X" in msg  # the hint shows the syntax


@pytest.mark.unit
def test_load_gate_good(tmp_path):
    path = tmp_path / "gate.yaml"
    path.write_text(
        "# promotion gate\ngate:\n  - exact_match >= 0.8\n  - eval_loss <= champion + 0.02\n"
    )
    checks = load_gate(path)
    assert [c.metric for c in checks] == ["exact_match", "eval_loss"]


@pytest.mark.unit
def test_load_gate_names_file_and_line_of_each_bad_item(tmp_path):
    path = tmp_path / "gate.yaml"
    path.write_text(
        "base_model: x\n"  # a training config may hold the gate among other keys
        "gate:\n"
        "  - exact_match >= 0.8\n"
        "  - eval_loss <== 2\n"
        "\n"
        "  - rouge_l >= champion * 2\n"
        "  - 0.5\n"
    )
    with pytest.raises(ConfigError) as e:
        load_gate(path)
    msg = str(e.value)
    assert f"{path}:4: 'eval_loss <== 2'" in msg
    assert f"{path}:6:" in msg and "'champion * 2'" in msg
    assert f"{path}:7: expected a string" in msg
    assert f"{path}:3" not in msg


@pytest.mark.unit
def test_load_gate_structure_errors(tmp_path):
    with pytest.raises(NotFoundError):
        load_gate(tmp_path / "missing.yaml")
    no_key = tmp_path / "a.yaml"
    no_key.write_text("checks:\n  - a >= 1\n")
    with pytest.raises(ConfigError, match="no top-level `gate:`"):
        load_gate(no_key)
    not_list = tmp_path / "b.yaml"
    not_list.write_text("\ngate: exact_match >= 1\n")
    with pytest.raises(ConfigError, match=rf"{not_list}:2: `gate:` must be a list"):
        load_gate(not_list)
    bad_yaml = tmp_path / "c.yaml"
    bad_yaml.write_text("gate:\n  - a >= 1\n - [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_gate(bad_yaml)


# ---------------------------------------------------------------- evaluation


@pytest.mark.unit
def test_evaluate_gate_absolute():
    checks = parse_gate(["exact_match >= 0.8", "eval_loss < 1.5"])
    ok = evaluate_gate(checks, {"exact_match": 0.85, "eval_loss": 1.2}, None)
    assert ok.passed
    bad = evaluate_gate(checks, {"exact_match": 0.75, "eval_loss": 1.2}, None)
    assert not bad.passed
    assert [r.expr for r in bad.failed] == ["exact_match >= 0.8"]
    assert bad.failed[0].reason == "0.75 < 0.8"
    rows = bad.to_dicts()
    assert rows[0] == {
        "expr": "exact_match >= 0.8",
        "metric": "exact_match",
        "value": 0.75,
        "threshold": 0.8,
        "passed": False,
        "reason": "0.75 < 0.8",
    }
    assert rows[1]["passed"] is True


@pytest.mark.unit
def test_evaluate_gate_relative_to_champion():
    checks = parse_gate(["eval_loss <= champion + 0.02", "exact_match >= champion - 0.01"])
    champion = {"eval_loss": 1.0, "exact_match": 0.9}
    res = evaluate_gate(checks, {"eval_loss": 1.015, "exact_match": 0.895}, champion)
    assert res.passed
    assert res.checks[0].threshold == pytest.approx(1.02)
    assert res.checks[1].threshold == pytest.approx(0.89)
    assert "champion 1 + 0.02" in res.checks[0].reason
    worse = evaluate_gate(checks, {"eval_loss": 1.05, "exact_match": 0.95}, champion)
    assert not worse.passed
    assert [r.metric for r in worse.failed] == ["eval_loss"]
    assert worse.failed[0].reason.startswith("1.05 > 1.02")


@pytest.mark.unit
def test_relative_checks_pass_without_a_champion_but_absolute_ones_still_apply():
    checks = parse_gate(["eval_loss <= champion + 0.02", "exact_match >= 0.8"])
    res = evaluate_gate(checks, {"eval_loss": 9.0, "exact_match": 0.5}, None)
    first, second = res.checks
    assert first.passed and first.reason == "no champion yet" and first.threshold is None
    assert not second.passed
    assert not res.passed


@pytest.mark.unit
def test_missing_metric_fails_naming_what_is_present():
    checks = parse_gate(["rouge_l >= 0.3", "eval_loss <= champion"])
    res = evaluate_gate(checks, {"eval_loss": 1.0, "exact_match": 0.5}, {"exact_match": 0.4})
    r0, r1 = res.checks
    assert not r0.passed and r0.value is None
    assert "'rouge_l' was not measured" in r0.reason
    assert "eval_loss, exact_match" in r0.reason
    # the champion never measured eval_loss: refuse rather than guess
    assert not r1.passed and "champion has no recorded 'eval_loss'" in r1.reason


@pytest.mark.unit
def test_nan_value_fails_and_empty_gate_passes():
    res = evaluate_gate(parse_gate(["eval_loss <= 2"]), {"eval_loss": math.nan}, None)
    assert not res.passed
    assert evaluate_gate([], {"a": 1.0}, None).passed


@pytest.mark.integration
def test_gates_and_rouge_import_no_torch():
    code = "import sys, loft.evaluate.gates, loft.evaluate.rouge; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# ---------------------------------------------------------------- ROUGE-L


@pytest.mark.unit
def test_lcs_length():
    assert lcs_length(["a", "b", "c", "d"], ["a", "c", "d"]) == 3
    assert lcs_length([], ["a"]) == 0
    assert lcs_length(["x", "y", "z"], ["z", "y", "x"]) == 1


@pytest.mark.unit
@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("the cat sat on the mat", "the cat sat on the mat", 1.0),
        # LCS "the cat on the mat" = 5 of 6 tokens each: P = R = 5/6 = F1
        ("the cat on mat the mat", "the cat sat on the mat", 10 / 12),
        # LCS "the cat" = 2: P = 2/4, R = 2/6, F1 = 2PR/(P+R) = 0.4
        ("the cat was found", "the cat sat on the mat", 0.4),
        ("completely different words", "the cat sat", 0.0),
        ("", "the cat", 0.0),
        ("the cat", "", 0.0),
        ("  A  b\n", "A b", 1.0),
        ("a b", "A B", 0.0),  # tokens compare exactly
    ],
)
def test_rouge_l_hand_checked(pred, ref, expected):
    assert rouge_l(pred, ref) == pytest.approx(expected)


@pytest.mark.unit
def test_a_metric_with_no_value_says_what_was_meant_or_how_to_measure_it():
    present = {"eval_loss": 1.0, "json_exact_match": 0.5}

    def reason(expr: str) -> str:
        (row,) = evaluate_gate(parse_gate([expr]), present, None).checks
        assert not row.passed
        return row.reason

    assert "did you mean 'eval_loss'?" in reason("eval_los <= 1")
    assert "did you mean 'json_exact_match'?" in reason("json_exact_mach >= 0.5")
    assert "`loft eval REF --data FILE --metrics rouge_l`" in reason("rouge_l >= 0.1")
    assert "--lm-eval hellaswag" in reason("hellaswag/acc_norm >= 0.3")
    assert "`loft audit canaries REF`" in reason("canary_exposure_max <= 5")
    odd = reason("vibes >= 3")
    assert "none of loft's metrics" in odd and "--metrics vibes" not in odd
