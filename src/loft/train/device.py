"""What this machine can run: device, precision, checkpointing; refusals happen before any load."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loft.core.errors import HardwareError
from loft.core.specs import TrainConfig

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" | "cuda"
    precision: str  # "bf16" | "fp16" | "fp32": the autocast (compute) precision
    gradient_checkpointing: bool
    precision_note: str = ""  # why, when it is not what the user might expect (run header)
    deterministic: bool = False  # deterministic algorithms (bit-exact resume on GPU)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for fp32 (no autocast)."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def grad_scaler(self) -> bool:
        """fp16 autocast needs loss scaling: its gradients underflow without it."""
        return self.precision == "fp16"

    def describe(self) -> str:
        prec = {
            "bf16": "bf16 autocast",
            "fp16": "fp16 autocast with a gradient scaler",
            "fp32": "fp32",
        }[self.precision]
        if self.precision_note:
            prec += f" ({self.precision_note})"
        ckpt = "on" if self.gradient_checkpointing else "off"
        det = ", deterministic algorithms" if self.deterministic else ""
        return f"{self.device}, {prec}, gradient checkpointing {ckpt}{det}"


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX): autocast is a speedup."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() == "arm64"  # Apple silicon has bf16
    return " avx512_bf16" in flags or " amx_bf16" in flags


@dataclass(frozen=True)
class GpuCapability:
    name: str
    major: int  # compute capability
    minor: int

    @property
    def native_bf16(self) -> bool:
        """bf16 tensor cores: Ampere (8.x) and later. Older GPUs (T4 7.5, V100 7.0) emulate
        bf16, which torch.cuda.is_bf16_supported() counts unless including_emulation=False."""
        return self.major >= 8


def gpu_capability() -> GpuCapability:
    import torch

    dev = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(dev)
    return GpuCapability(torch.cuda.get_device_name(dev), major, minor)


def choose_precision(
    requested: str, *, gpu: GpuCapability | None, cpu_bf16: bool
) -> tuple[str, str]:
    """(precision, note) for ``training.precision`` on this hardware; HardwareError when the
    config asks for what the hardware cannot do natively.

    auto: bf16 where the hardware has it natively (GPUs from Ampere on; CPUs with AVX512-BF16 or
    AMX). Elsewhere fp16 with a gradient scaler on a GPU (its tensor cores have fp16), fp32 on a
    CPU. Emulated bf16 is never chosen: on a T4 or V100 it runs several times slower than fp16.
    """
    if gpu is not None:
        where = f"this GPU ({gpu.name}, compute capability {gpu.major}.{gpu.minor})"
        native = gpu.native_bf16
    else:
        where, native = "this CPU", cpu_bf16
    if requested == "fp32":
        return "fp32", ""
    if requested == "fp16":
        if gpu is None:
            raise HardwareError(
                "training.precision is 'fp16', which loft runs on CUDA GPUs only (fp16 autocast "
                "on a CPU is slower than fp32).",
                hint="Use `--set training.precision=auto` (bf16 where the CPU has it, else fp32).",
            )
        return "fp16", ""
    if requested == "bf16":
        if not native:
            alt = "fp16" if gpu is not None else "fp32"
            raise HardwareError(
                f"training.precision is 'bf16' but {where} has no native bf16 support "
                "(emulated bf16 is several times slower).",
                hint=f"Use `--set training.precision={alt}` (or auto).",
            )
        return "bf16", ""
    if native:
        return "bf16", ""
    if gpu is not None:
        return "fp16", f"{gpu.name} has no native bf16"
    return "fp32", ""


def plan_placement(config: TrainConfig) -> Placement:
    """Decide device, precision and checkpointing from the config and the hardware.

    Raises HardwareError (before anything is loaded) when the config asks for what is not here.
    """
    import torch

    cuda = torch.cuda.is_available()
    t = config.training
    if config.method == "qlora":
        if not cuda:
            raise HardwareError(
                "method 'qlora' needs a CUDA GPU (bitsandbytes NF4 kernels) and this machine has "
                "none; nothing was loaded.",
                hint="Use `--set method=lora` on this machine, or run on a GPU host with "
                "`pip install -e '.[gpu]'`.",
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise HardwareError(
                "method 'qlora' needs bitsandbytes, which is not installed.",
                hint="Install the GPU extra: pip install -e '.[gpu]'",
            ) from None
    gpu = gpu_capability() if cuda else None
    precision, note = choose_precision(t.precision, gpu=gpu, cpu_bf16=cpu_supports_bf16())
    # auto checkpointing: on for GPUs (memory is the constraint there); off on CPU, where RAM is
    # plentiful for the models that train at useful speed and recomputation costs ~30% throughput.
    # Under privacy it stays off: recomputation bypasses Opacus' per-example gradient hooks.
    gc = t.gradient_checkpointing
    gc = (cuda and config.privacy is None) if gc == "auto" else bool(gc)
    return Placement(
        device="cuda" if cuda else "cpu",
        precision=precision,
        gradient_checkpointing=gc,
        precision_note=note,
        deterministic=t.deterministic,
    )


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    # Linux: VmHWM, this address space's peak. ru_maxrss would do, except that Linux carries it
    # across execve: a `loft train` started from a large process (a test runner, a job worker)
    # would report its parent's peak from the moment of the fork.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if platform.system() == "Darwin" else rss * 1024)


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# cuBLAS picks reduction splits per call unless its workspace is fixed; torch checks this variable
# when deterministic algorithms are on and refuses CUDA matmuls without it.
CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def determinism(placement: Placement) -> Iterator[None]:
    """Deterministic algorithms for the duration of a run that asked for them
    (training.deterministic); the process's previous settings come back afterwards.

    Entered before the model is built: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it creates its
    handle, at the first CUDA matmul. An op with no deterministic kernel then raises at its first
    use, which the trainer reports as :func:`determinism_error`.
    """
    if not placement.deterministic:
        yield
        return
    import torch

    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]
        if before[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def determinism_error(e: BaseException, placement: Placement) -> HardwareError | None:
    """The user-facing error for an op that has no deterministic kernel, or None."""
    text = str(e)
    if not placement.deterministic or "deterministic" not in text:
        return None
    return HardwareError(
        f"training.deterministic is on, but an operation of this run has no deterministic "
        f"kernel on {placement.device}: {text.splitlines()[0]}",
        hint="Set training.deterministic=false (resume then matches to rounding, not bit for "
        "bit), or change the option that selects the op (e.g. data.packing).",
    )
