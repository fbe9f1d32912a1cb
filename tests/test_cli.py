"""Every command's --help works without importing heavy libraries; errors exit with the
documented codes."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from helpers import run_loft
from loft.cli.main import app

runner = CliRunner()


def _commands(group: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    import typer.main

    click_group = typer.main.get_command(group)
    out: list[tuple[str, ...]] = []

    def walk(cmd, path):
        out.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, (*path, name))

    walk(click_group, prefix)
    return out


ALL = _commands(app)


@pytest.mark.unit
def test_command_tree_is_complete():
    names = {" ".join(c) for c in ALL}
    for expected in (
        "train", "demo", "ui", "models list", "models show", "models add", "data validate",
        "data prepare", "data inspect", "runs list", "runs show",
    ):  # fmt: skip
        assert expected in names, expected


@pytest.mark.unit
@pytest.mark.parametrize("cmd", ALL, ids=lambda c: " ".join(c) or "loft")
def test_help_of_every_command(cmd):
    result = runner.invoke(app, [*cmd, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


# What an accidental top-level import would drag into every `loft ... --help` (seconds each).
HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "mlflow", "lm_eval", "pandas")

_HELP_IMPORTS = """
import json, sys
from loft.cli.main import main
for cmd in json.loads(sys.argv[1]):
    try:
        main([*cmd, "--help"])
    except SystemExit as e:
        assert e.code in (0, None), (cmd, e.code)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))))
"""


@pytest.mark.integration
def test_help_of_every_command_imports_no_heavy_library():
    """--help is instant because no command imports torch, transformers, mlflow ... until it runs
    (the startup time itself is measured in bench/overheads.py)."""
    import json

    code = f"HEAVY = {HEAVY!r}\n{_HELP_IMPORTS}"
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps([list(c) for c in ALL])],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.integration
def test_train_with_malformed_data_exits_2_with_file_line_and_no_traceback(tmp_path, loft_home):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": "yo"}]}\n'
        "{not json\n"
        '{"messages": [{"role": "robot", "content": "hi"}]}\n'
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: smollm2-135m-instruct\ndata: {{train: {data}}}\n")
    r = run_loft("train", str(cfg))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"{data}:2:" in r.stderr and f"{data}:3:" in r.stderr
    assert "--skip-invalid" in r.stderr


@pytest.mark.integration
def test_bad_config_exits_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {train: x.jsonl}\ntraining: {lr: fast}\n")
    r = run_loft("train", str(cfg))
    assert r.returncode == 2
    assert "training.lr: got 'fast'" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.integration
def test_debug_shows_traceback_and_keeps_the_exit_code(tmp_path):
    plain = run_loft("train", str(tmp_path / "missing.yaml"))
    debug = run_loft("--debug", "train", str(tmp_path / "missing.yaml"))
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" in debug.stderr and "Traceback" not in plain.stderr
    assert "missing.yaml" in debug.stderr


@pytest.mark.integration
def test_shell_completion_script():
    r = run_loft(
        "--show-completion", "bash", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    )
    assert r.returncode == 0, r.stderr
    assert "_LOFT_COMPLETE" in r.stdout and "complete" in r.stdout


@pytest.mark.integration
def test_usage_error_exits_2():
    r = run_loft("train", "--no-such-flag")
    assert r.returncode == 2


@pytest.mark.integration
@pytest.mark.slow
def test_demo_last_line_is_its_json_contract(loft_home, tmp_path):
    """A short demo (2 tickets, 2 steps on 32 records, no eval split) on the real model: the last
    line is one JSON object."""
    import json

    from loft.cli.demo import EXAMPLE

    train = tmp_path / "tickets.jsonl"
    train.write_text("".join((EXAMPLE / "train.jsonl").read_text().splitlines(True)[:32]))
    r = run_loft(
        "demo", "--n", "2", "-q", "--set", "training.max_steps=2", "--set", f"data.train={train}",
        "--set", "data.eval_fraction=0",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(last) == {"metric", "base", "tuned", "train_s", "total_s", "run_dir"}
    assert last["metric"] == "json_exact_match"
    adapter = Path(last["run_dir"]) / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    # the scores are those of the base model and of the adapter it trained, on its 2 tickets
    from loft.cli.demo import EXAMPLE
    from loft.evaluate import evaluate_generation, load_jsonl_records
    from loft.evaluate.loading import load_target

    records = load_jsonl_records(EXAMPLE / "heldout.jsonl")[:2]
    for key, ref in (("base", "smollm2-135m-instruct"), ("tuned", str(adapter))):
        target = load_target(ref)
        scored = evaluate_generation(
            target.model, target.tokenizer, records, max_new_tokens=32, progress=False
        )
        assert last[key] == round(scored.score, 4), key


def _schema_leaves(model, prefix: str = "") -> dict[str, object]:
    """Every key of a pydantic schema as a dotted path -> its default (a nested model's key ->
    None; a required key -> ...)."""
    from pydantic import BaseModel

    out: dict[str, object] = {}
    for name, field in model.model_fields.items():
        subs = [a for a in typing.get_args(field.annotation) or [field.annotation]
                if isinstance(a, type) and issubclass(a, BaseModel)]  # fmt: skip
        if subs:
            out[prefix + name] = None
            out.update(_schema_leaves(subs[0], f"{prefix}{name}."))
        elif field.is_required():
            out[prefix + name] = ...
        else:
            default = field.get_default(call_default_factory=True)
            out[prefix + name] = getattr(default, "value", default)
    return out


def _reference_in_help(text: str) -> dict[str, str]:
    """The YAML reference under 'The config (YAML) keys' in a help page: dotted key -> value."""
    lines = text.split("The config (YAML) keys", 1)[1].splitlines()[1:]
    while not lines[0].strip():
        lines.pop(0)
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in lines:
        if not line.strip():
            break
        m = re.match(r"^(\s*)([A-Za-z_]\w*):(.*)$", line)
        if m is None:  # a comment continued on its own line
            assert line.strip().startswith("#"), line
            continue
        indent = len(m[1])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [m[2]])
        found[key] = m[3].split("  #")[0].strip()
        stack.append((indent, m[2]))
    return found


@pytest.mark.unit
@pytest.mark.parametrize(("cmd", "schema"), [("train", "TrainConfig"), ("serve", "ServeConfig")])
def test_help_lists_every_config_key_with_its_default(cmd, schema):
    """`loft train --help` and `loft serve --help` list every key of their schema, nested keys in
    place (checked as dotted paths), each with its real default."""
    import yaml

    from loft.core import specs

    result = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    listed = _reference_in_help(result.output)
    leaves = _schema_leaves(getattr(specs, schema))
    assert len(leaves) > 20
    missing = sorted(set(leaves) - set(listed))
    assert not missing, f"keys missing from `loft {cmd} --help`: {missing}"
    for key, default in leaves.items():
        if default is None and not listed[key]:
            continue  # a nested model's header line
        if default is ...:
            assert listed[key] == "<required>", key
        else:
            assert yaml.safe_load(listed[key]) == default, (key, listed[key], default)


@pytest.mark.unit
def test_an_error_naming_brackets_is_printed_as_is(loft_home):
    """Messages quote user input and library errors (gloo's `[/__w/...]`): rich must print them,
    not parse them as markup (a MarkupError instead of the one-line error)."""
    r = run_loft("registry", "show", "no[/x]such[/]", home=loft_home)
    assert r.returncode == 2, r.stderr
    assert "invalid model name 'no[/x]such[/]'" in r.stderr and "Traceback" not in r.stderr
