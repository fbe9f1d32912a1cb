"""Shared fixtures. Every test runs with LOFT_HOME in a temp dir and the HF hub offline.

The builtin SmolLM2 conversion and the tiny random model are built once per session and shared;
tests that write state get their own LOFT_HOME via ``loft_home`` (models/ links to the shared one).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist's workers get COLUMNS=80 from it; the CLI reads COLUMNS when piped, so the
    # suite would see tables cut to 80 columns under `make test` and whole ones without -n.
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        # one BLAS/OpenMP thread per worker (and the processes it starts): with two workers on
        # two cores, two threads each oversubscribe the cores and OpenMP's spin-waits make every
        # small op slower (test_serve_engine.py, two copies at once: 116-170 s vs 168-222 s)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("MKL_NUM_THREADS", "1")
        if "torch" in sys.modules:  # a plugin imported it before the variable was set
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


KINDS = ("unit", "integration")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test is exactly one of unit/integration (pyproject.toml says what each means), so
    `make test-fast` (-m unit) is the inner loop it claims to be; `gpu` tests skip without CUDA."""
    wrong = [
        f"{item.nodeid}: {kinds or 'no unit/integration marker'}"
        for item in items
        if len(kinds := [k for k in KINDS if item.get_closest_marker(k)]) != 1
    ]
    if wrong:
        raise pytest.UsageError(
            "tests need exactly one of @unit/@integration:\n" + "\n".join(wrong)
        )
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason=f"needs CUDA; torch {torch.__version__} sees no GPU")
            for item in gpu:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _session_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("loft_home")
    os.environ["LOFT_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    # the team deployment's run of a suite (tests/test_team.py): tracking and the registry on the
    # PostgreSQL server that test started
    if os.environ.get("LOFT_TEST_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = os.environ["LOFT_TEST_TRACKING_URI"]
    return home


@pytest.fixture
def loft_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _session_home: Path) -> Path:
    """A fresh LOFT_HOME for one test; models/ points at the session's so conversions are shared."""
    from helpers import linked_home

    home = linked_home(tmp_path, _session_home)
    monkeypatch.setenv("LOFT_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight Llama with the SmolLM2 tokenizer and chat template (HF dir)."""
    from loft.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", seed=0)


@pytest.fixture(scope="session")
def smollm2():
    """The builtin SmolLM2-135M-Instruct, converted once per session (ModelInfo)."""
    from loft.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def pg_server():
    """One real PostgreSQL server for the session (tests/pg_server.py)."""
    from pg_server import PgServer

    server = PgServer()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server, request) -> str:
    """A fresh database on the session's PostgreSQL server, for one test."""
    import re

    return pg_server.new_database(re.sub(r"\W", "_", request.node.name)[:60].lower())


@pytest.fixture(scope="session")
def s3_server():
    """One real S3-compatible server (moto's server mode) for the session (tests/s3_server.py)."""
    from s3_server import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request, monkeypatch) -> str:
    """A fresh bucket on the session's S3 server; boto3's credentials and endpoint set as a MinIO
    user sets them."""
    import re

    from s3_server import CREDENTIALS

    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LOFT_S3_ENDPOINT_URL", s3_server.endpoint)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    return s3_server.new_bucket(name)


@pytest.fixture(scope="module")
def live_portal(tmp_path_factory: pytest.TempPathFactory, _session_home: Path):
    """A real `loft portal` process over its own LOFT_HOME (models/ linked to the session's), for
    one test module (tests/browser.py)."""
    from browser import Portal
    from helpers import linked_home

    server = Portal(linked_home(tmp_path_factory.mktemp("portal"), _session_home))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright, one per session (tests/browser.py)."""
    from playwright.sync_api import sync_playwright

    from browser import launch

    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (no cookies) and page for one test."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield page
    context.close()
