"""Shared test helpers (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

CHAT_ROWS = [("Sky colour?", "Blue."), ("A prime?", "Seven."), ("Hi?", "Hello!")]


def run_cli(*args: str) -> int:
    """Run `loft ARGS` in-process through the real entry point; return its exit code."""
    from loft.cli.main import main

    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def loft_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "loft.cli.main", *args]


def _env(home: Path | None, extra: dict[str, str] | None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(extra or {})}
    if home is not None:
        env["LOFT_HOME"] = str(home)
    return env


def run_loft(
    *args: str,
    home: Path | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run `loft ARGS` as users do, in a new process; LOFT_HOME from ``home`` or the test's."""
    return subprocess.run(
        loft_argv(*args), capture_output=True, text=True, cwd=cwd, env=_env(home, env),
        timeout=timeout,
    )  # fmt: skip


def start_loft(
    *args: str, home: Path | None = None, env: dict[str, str] | None = None, **popen: object
) -> subprocess.Popen[str]:
    """Start `loft ARGS` in its own process group (so a test can stop exactly what it started);
    stdout and stderr are pipes unless given."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(
        loft_argv(*args), text=True, env=_env(home, env), start_new_session=True, **popen
    )


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process this test started and everything it started in turn, by pid; the tree
    is collected before any kill, so no grandchild is orphaned out of reach."""
    kill_pids([*descendants(proc.pid), proc.pid] if proc.poll() is None else [])
    if proc.poll() is None:
        proc.wait(timeout=30)


def kill_pids(pids: list[int]) -> None:
    """SIGKILL each of ``pids`` still running (processes a test started and collected itself)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def linked_home(root: Path, session_home: Path) -> Path:
    """``root/home`` as a LOFT_HOME whose models/ links to the session's, so the builtin model's
    conversion and the tiny model are shared."""
    home = root / "home"
    home.mkdir()
    shared = session_home / "models"
    shared.mkdir(exist_ok=True)
    (home / "models").symlink_to(shared, target_is_directory=True)
    return home


def trained_tiny_home(root: Path, session_home: Path, tiny_model: Path, repeat: int = 1):
    """A LOFT_HOME under ``root`` (models/ linked to the session's) and the config of one tiny
    one-step LoRA run on a small chat file, not registered. Returns (home, run_dir, data, cfg)."""
    home = linked_home(root, session_home)
    data = root / "chat.jsonl"
    lines = []
    for i, (q, a) in enumerate(CHAT_ROWS * repeat):
        q = f"{q} ({i})" if repeat > 1 else q
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        lines.append(json.dumps({"messages": msgs}) + "\n")
    data.write_text("".join(lines))
    cfg = {
        "base_model": str(tiny_model),
        "data": {"train": str(data), "eval_fraction": 0.0, "max_seq_len": 64, "dedup": False},
        "lora": {"r": 2, "alpha": 4},
        "training": {"max_steps": 1, "micro_batch_size": 2, "precision": "fp32"},
        "output_dir": str(root / "run"),
        "register": False,
    }
    return home, root / "run", data, cfg


def make_lora_adapter(
    folder: Path, base_dir: Path, *, seed: int, r: int = 4, use_dora: bool = False
) -> Path:
    """A PEFT LoRA adapter on ``base_dir`` with random (non-zero) A and B, saved like loft's
    trainer saves one (safetensors, tokenizer files, lineage.json naming the base and its sha256),
    so it changes the model's output and the registry records which base it belongs to."""
    import torch
    from peft import LoraConfig, get_peft_model

    from loft.core.paths import atomic_write_json
    from loft.models import load_causal_lm, load_tokenizer, resolve_model

    info = resolve_model(str(base_dir))
    torch.manual_seed(seed)
    model = load_causal_lm(info)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules="all-linear",
        init_lora_weights=False,
        use_dora=use_dora,
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # scale B up so two adapters' greedy outputs surely differ
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    peft_model.save_pretrained(str(folder))
    load_tokenizer(info).save_pretrained(str(folder))
    lineage = {"base_model": {"name": info.name, "sha256": info.sha256, "source": info.source}}
    atomic_write_json(folder / "lineage.json", lineage)
    return folder


def vllm_engine_without_vllm(config):
    """A ``VllmEngine`` set up as ``start()`` sets it up, minus vLLM itself (not installed on CPU
    machines): base, tokenizer, adapter cache, max_lora_rank 16. Enough for ``acquire`` to run the
    adapter checks; nothing can be generated."""
    from loft.models import load_tokenizer, resolve_model
    from loft.serve.adapters import base_target, cache_for
    from loft.serve.vllm_engine import VllmEngine

    eng = VllmEngine(config)
    info = resolve_model(config.base_model)
    eng.tokenizer = load_tokenizer(info)
    eng.base = base_target(info)
    eng.cache = cache_for(config, eng.base, load_slot=eng._load_slot, unload_slot=lambda slot: None)
    eng._max_rank = 16
    return eng


class MemoryTracker:
    """A tracker keeping every logged metric in memory (no MLflow); with ``stop_after`` it sends
    this process SIGINT once that step is logged, as Ctrl-C does to a real run (the loop then
    saves a checkpoint and stops)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.run_id = None
        self.stop_after = stop_after
        self.metrics: list[tuple[int, dict]] = []
        self.finished_status: str | None = None

    @property
    def losses(self) -> list[float]:
        return [m["train/loss"] for _, m in self.metrics]

    def log_params(self, params) -> None:
        return None

    def log_metrics(self, metrics, step) -> None:
        self.metrics.append((step, dict(metrics)))
        if step == self.stop_after:
            os.kill(os.getpid(), signal.SIGINT)

    def log_artifact(self, path, artifact_path=None) -> None:
        return None

    def set_tags(self, tags) -> None:
        return None

    def finish(self, status="FINISHED") -> None:
        self.finished_status = status


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port`` within ``timeout`` s."""
    import socket
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


@contextlib.contextmanager
def serving(app, timeout: float = 30):
    """Run an ASGI ``app`` (``loft.serve.app.create_app``) with uvicorn on a free port of
    127.0.0.1 in a daemon thread of this process; yields its base URL, stops it on exit."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
