"""A run's settings as the estimator sees them, and the mapping from loft's training config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from loft.core.errors import ConfigError

if TYPE_CHECKING:
    from loft.core.specs import TrainConfig

METHODS = ("full", "lora", "dora", "qlora")
PRECISIONS = ("bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit", "sgd", "adafactor")
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class RunSettings:
    """What a run does, as far as memory and FLOPs are concerned.

    ``precision`` is the compute (autocast) precision; QLoRA stores its base in NF4 and computes in
    bf16 (its hidden states between projections are fp32: see ``memory.QLORA_ACTIVATION_BYTES``).
    ``lora_targets`` is "all-linear" (every decoder projection, not the LM head, as PEFT does) or
    short module names (q_proj, v_proj, ...; fused and Mixtral names are understood).
    ``packing`` False means ``micro_batch`` rows padded to ``seq_len`` (without data, the worst
    case a batch can reach; pre-flight gives a micro-batch's rows and its longest example); either
    way a micro-batch holds ``micro_batch * seq_len`` token positions. ``zero_stage`` 3 is
    FSDP full sharding. ``logit_fraction`` is the share of positions whose logits are materialised:
    1.0 (full logits) by default; loft's trainer projects only the positions whose next token is
    trained, on every device, and pre-flight passes that share of its micro-batch. ``grad_accum``
    does not change memory; it is kept so a suggestion that halves ``micro_batch`` can keep the
    effective batch.
    """

    method: str = "lora"
    lora_rank: int = 16
    lora_targets: str | tuple[str, ...] = "all-linear"
    lora_dropout: float = 0.05
    precision: str = "bf16"
    optimizer: str = "adamw"
    micro_batch: int = 1
    seq_len: int = 2048
    packing: bool = True
    gradient_checkpointing: bool = True
    grad_accum: int = 1
    n_gpus: int = 1
    zero_stage: int = 0
    device: str = "cuda"
    logit_fraction: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, list):
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        problems = []
        for key, allowed in (
            ("method", METHODS),
            ("precision", PRECISIONS),
            ("optimizer", OPTIMIZERS),
            ("device", DEVICES),
        ):
            if getattr(self, key) not in allowed:
                problems.append(f"{key}: got {getattr(self, key)!r}; choose one of {allowed}")
        for key in ("lora_rank", "micro_batch", "seq_len", "grad_accum", "n_gpus"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                problems.append(f"{key}: got {getattr(self, key)!r}; must be an integer >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"zero_stage: got {self.zero_stage!r}; choose 0, 1, 2 or 3")
        if not 0.0 < self.logit_fraction <= 1.0:
            problems.append(f"logit_fraction: got {self.logit_fraction!r}; must be in (0, 1]")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout: got {self.lora_dropout!r}; must be in [0, 1)")
        if isinstance(self.lora_targets, tuple) and not self.lora_targets:
            problems.append("lora_targets: name at least one module, or use 'all-linear'")
        if isinstance(self.lora_targets, str) and self.lora_targets != "all-linear":
            problems.append(
                f"lora_targets: got {self.lora_targets!r}; use 'all-linear' or a list of names"
            )
        if problems:
            raise ConfigError(
                f"{len(problems)} problem{'s' if len(problems) > 1 else ''} in run settings:\n"
                + "\n".join(f"  {p}" for p in problems)
            )

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def adapters(self) -> bool:
        return self.method != "full"

    @property
    def compute_bytes(self) -> int:
        """Bytes per activation element in the compute dtype: 2 under bf16/fp16 autocast (and
        for QLoRA), else 4."""
        return 2 if self.precision != "fp32" or self.method == "qlora" else 4

    def with_(self, **changes: Any) -> RunSettings:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["lora_targets"], tuple):
            d["lora_targets"] = list(d["lora_targets"])
        return d


def parse_targets(value: str | list[str] | tuple[str, ...]) -> str | tuple[str, ...]:
    """'all-linear', 'q_proj,v_proj' or a list -> the RunSettings form."""
    if isinstance(value, str):
        if value.strip() == "all-linear":
            return "all-linear"
        value = [v for v in value.split(",")]
    return tuple(v.strip() for v in value if v.strip())


def settings_from_train_config(
    cfg: TrainConfig, *, device: str, world: int | None = None
) -> RunSettings:
    """loft's TrainConfig on ``device`` ("cuda" or "cpu") -> RunSettings, resolving loft's "auto"s
    as the planner's defaults for a device it cannot inspect (another target than this machine).

    precision auto: bf16 on cuda, fp32 on cpu. gradient_checkpointing auto: on for cuda, off for
    cpu. loft's optimizer is torch AdamW with fp32 states. For this machine, the trainer's own
    placement decides instead (it autocasts to bf16 on a CPU with native bf16):
    ``loft.train.preflight.run_settings`` overrides precision and checkpointing from it.

    ``training.distributed`` sets the devices: ``world`` ranks (default nproc x nodes), each
    running whole micro-batches; fsdp is ``zero_stage`` 3 over them, ddp replicates (0).
    """
    t = cfg.training
    d = t.distributed
    if d.strategy == "none":
        world = 1
    elif world is None:
        world = d.nproc * d.nodes
    precision = {"auto": "bf16" if device == "cuda" else "fp32"}.get(t.precision, t.precision)
    ckpt = t.gradient_checkpointing
    return RunSettings(
        method=str(cfg.method),
        lora_rank=cfg.lora.r,
        lora_targets=parse_targets(cfg.lora.target_modules),
        lora_dropout=cfg.lora.dropout,
        precision=precision,
        optimizer="adamw",
        micro_batch=t.micro_batch_size,
        seq_len=cfg.data.max_seq_len,
        packing=cfg.data.packing,
        gradient_checkpointing=device == "cuda" if ckpt == "auto" else bool(ckpt),
        grad_accum=t.grad_accum,
        n_gpus=world,
        zero_stage=3 if d.strategy == "fsdp" and world > 1 else 0,
        device=device,
    )
