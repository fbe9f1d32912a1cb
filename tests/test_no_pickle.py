"""Supply chain: nothing in src/ deserializes code. A scan of every module's syntax tree fails,
naming FILE:LINE, on: importing pickle (or a module built on it: cPickle, dill, cloudpickle,
joblib, shelve, marshal); ``torch.load`` without ``weights_only=True``; ``numpy.load`` with
``allow_pickle=True``; ``pandas.read_pickle``; any ``trust_remote_code=`` other than a literal
False; and calls of the builtins ``eval``/``exec``/``compile`` (a method named ``eval``, such as
``model.eval()``, is fine). ``ALLOWED`` would list exceptions with the reason; it is empty.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SRC = Path(__file__).resolve().parents[1] / "src"
PICKLING = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
BUILTINS = {"eval", "exec", "compile", "__import__"}
# "path:line" -> why it is needed (reviewed); keep it empty unless something truly needs one
ALLOWED: dict[str, str] = {}


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def problems_in(source: str, where: str) -> list[str]:
    """Every forbidden construct in ``source`` as ``where:LINE: what``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)

        def say(what: str, line: int = line) -> None:
            found.append(f"{where}:{line}: {what}")

        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLING:
                    say(f"imports {alias.name} (pickle runs code when loading)")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLING:
                say(f"imports from {node.module} (pickle runs code when loading)")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            if name in BUILTINS:
                say(f"calls {name}() (runs code given as data)")
            torch_load = name in ("torch.load", "torch.serialization.load") or (
                name.endswith(".load") and "weights_only" in kw
            )
            if torch_load and not _is_true(kw.get("weights_only")):
                say("torch.load without weights_only=True (unpickles arbitrary objects)")
            if name.split(".")[-1] == "load" and _is_true(kw.get("allow_pickle")):
                say(f"{name}(allow_pickle=True)")
            if name.split(".")[-1] == "read_pickle":
                say(f"calls {name} (unpickles)")
            remote = kw.get("trust_remote_code")
            if remote is not None and not (
                isinstance(remote, ast.Constant) and remote.value is False
            ):
                say(f"{name}(trust_remote_code=...) runs code from a model repository")
    return found


def scan(root: Path = SRC) -> list[str]:
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        for problem in problems_in(path.read_text(encoding="utf-8"), rel):
            if ":".join(problem.split(":")[:2]) not in ALLOWED:
                out.append(problem)
    return out


def test_src_deserializes_no_code() -> None:
    found = scan()
    assert not found, "forbidden in src/ (see tests/test_no_pickle.py):\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("code", "what"),
    [
        ("import pickle", "imports pickle"),
        ("from joblib import load", "imports from joblib"),
        ("import dill as d", "imports dill"),
        ("import torch\ntorch.load(p)", "torch.load without weights_only=True"),
        ("import torch\ntorch.load(p, weights_only=False)", "torch.load without"),
        ("np.load(p, allow_pickle=True)", "np.load(allow_pickle=True)"),
        ("pd.read_pickle(p)", "calls pd.read_pickle"),
        ("AutoModel.from_pretrained(p, trust_remote_code=True)", "trust_remote_code"),
        ("AutoModel.from_pretrained(p, trust_remote_code=flag)", "trust_remote_code"),
        ("eval(text)", "calls eval()"),
        ("exec(code, {})", "calls exec()"),
    ],
)
def test_scan_catches(code: str, what: str) -> None:
    found = problems_in(code, "src/x.py")
    assert len(found) == 1 and what in found[0], found
    assert found[0].startswith(f"src/x.py:{code.count(chr(10)) + 1}: ")


@pytest.mark.parametrize(
    "code",
    [
        "model.eval()",
        "torch.load(p, map_location='cpu', weights_only=True)",
        "AutoTokenizer.from_pretrained(p, trust_remote_code=False)",
        "np.load(p)",
        "import json\njson.loads(s)",
        "safetensors.torch.load(data)",
    ],
)
def test_scan_allows(code: str) -> None:
    assert problems_in(code, "src/x.py") == []
