"""The typed config schema. Defaults live here and nowhere else.

Key names are a contract: scripts outside the repo write them (see the training config in README).
Unknown keys are rejected; every problem is reported at once by ``loft.core.config``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=True)


class Method(StrEnum):
    full = "full"
    lora = "lora"
    dora = "dora"
    qlora = "qlora"


DataFormat = Literal["auto", "chat", "sharegpt", "alpaca", "completion", "preference", "kto"]
Objective = Literal["sft", "dpo", "kto", "orpo", "simpo"]
PAIRED_OBJECTIVES = ("dpo", "orpo", "simpo")
REFERENCE_OBJECTIVES = ("dpo", "kto")  # ORPO and SimPO have no reference model
PREFERENCE_FORMATS = ("preference", "kto")


class DataSpec(Strict):
    train: str = Field(description="Path to the training file (jsonl, json, csv, parquet).")
    eval: str | None = Field(
        None, description="Optional held-out file; else eval_fraction of train."
    )
    eval_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of train held out for eval when eval is null."
    )
    format: DataFormat = Field("auto", description="Record format; auto detects it.")
    column_map: dict[str, str] = Field(
        default_factory=dict, description="Rename columns: {file column: loft field}."
    )
    max_seq_len: int = Field(
        1024, ge=16, le=1_048_576, description="Longest example in tokens (after the template)."
    )
    packing: bool = Field(True, description="Pack rows padding-free; no attention across examples.")
    train_on_inputs: bool = Field(
        False, description="Also train on prompt tokens, not only assistant replies."
    )
    skip_invalid: bool = Field(False, description="Train on the valid records instead of stopping.")
    dedup: bool = Field(True, description="Remove exact and near duplicates (MinHash).")
    near_dup_threshold: float = Field(
        0.9, gt=0.0, le=1.0, description="Similarity at which two records count as duplicates."
    )
    pii: Literal["report", "redact", "off"] = Field(
        "report", description="report PII found, redact (replace) it, or off (no scan)."
    )
    canaries: int = Field(
        0, ge=0, le=10_000, description="Random canary records inserted for a memorisation audit."
    )


class LoraSpec(Strict):
    r: int = Field(16, ge=1, le=4096, description="Adapter rank.")
    alpha: float = Field(32, gt=0, description="Scaling: updates are multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="all-linear, or a list of module names."
    )

    @field_validator("target_modules")
    @classmethod
    def _nonempty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return v


class DistributedSpec(Strict):
    """Data-parallel training: ``loft train`` starts ``nproc`` ranks under torchrun on this machine,
    or ``nodes`` × ``nproc`` ranks on a Ray cluster (``--launcher ray``), or runs as one rank when
    a launcher started it. The global batch is the single-process one."""

    strategy: Literal["none", "ddp", "fsdp"] = Field(
        "none",
        description="none: one process; ddp: every rank holds the model, gradients are summed; "
        "fsdp: FSDP2 shards each decoder layer's weights, gradients and optimizer state.",
    )
    nproc: int = Field(
        1, ge=1, le=1024, description="Ranks on this machine (one per GPU on CUDA); > 1 needs ddp "
        "or fsdp.",
    )  # fmt: skip
    nodes: int = Field(
        1, ge=1, le=1024, description="Machines; > 1 needs --launcher ray, which runs nodes × "
        "nproc ranks spread over the Ray cluster's nodes (the run directory on a filesystem "
        "they all see).",
    )  # fmt: skip
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Collectives' backend; auto: nccl on CUDA, gloo on CPU."
    )
    max_restarts: int = Field(
        0, ge=0, le=100, description="torchrun (or Ray Train) restarts every rank this often after "
        "a failure; each restart resumes from the run's newest checkpoint.",
    )  # fmt: skip


class TrainingSpec(Strict):
    epochs: float = Field(1, gt=0, description="Passes over the training split (may be 0.5).")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps; overrides epochs."
    )
    micro_batch_size: int = Field(8, ge=1, description="Examples per forward/backward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup."
    )
    warmup_ratio: float = Field(
        0.03, ge=0.0, lt=1.0, description="Share of the steps spent warming up."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip gradients to this norm; null: no clipping."
    )
    seed: int = Field(42, description="Seeds data order, initialisation and dropout.")
    save_every: int = Field(50, ge=1, description="Save a checkpoint every N steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept on disk.")
    eval_every: int = Field(50, ge=1, description="Compute eval loss every N steps.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="auto: on for GPUs, off on CPUs."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 where the hardware has it natively (Ampere+ GPUs, AVX512-BF16/AMX "
        "CPUs), else fp16 with a gradient scaler on a GPU, fp32 on a CPU. fp16: CUDA only.",
    )
    deterministic: bool = Field(
        False,
        description="Deterministic algorithms (torch.use_deterministic_algorithms, "
        "CUBLAS_WORKSPACE_CONFIG): a resumed GPU run is bit-exact with an uninterrupted one, at "
        "some speed; a CPU run is deterministic without it.",
    )
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="Ranks and how they share the model."
    )


class PreferenceSpec(Strict):
    """Parameters of the preference objectives (``objective`` other than sft)."""

    beta: float | None = Field(
        None,
        gt=0,
        description="DPO/KTO: weight of the KL penalty against the reference (default 0.1); "
        "SimPO: reward scale (default 2.0); not used by ORPO.",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="DPO only: sigmoid (DPO), ipo (IPO) or hinge (SLiC)."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="DPO/SimPO: assumed share of flipped labels (cDPO)."
    )
    reference: Literal["auto", "base", "init", "precomputed"] = Field(
        "auto",
        description="DPO/KTO reference: base (adapter disabled), init (the init_from model), "
        "precomputed (only the cached log-probs, never a model pass); auto: init with init_from, "
        "else base.",
    )
    desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of desirable examples.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of undesirable examples.")
    orpo_lambda: float = Field(0.1, gt=0, description="ORPO: weight of the odds-ratio term.")
    simpo_gamma: float = Field(
        0.5, ge=0, description="SimPO: target reward margin, as a ratio of beta (gamma / beta)."
    )


# delta when privacy.delta is not given: 1e-5, or 1/(10 N) for a training split of N > 10,000
DEFAULT_DELTA = 1e-5


class PrivacySpec(Strict):
    """Differentially private LoRA (DP-SGD through Opacus): every example's gradient is clipped
    to ``max_grad_norm``, Gaussian noise of ``noise_multiplier`` x ``max_grad_norm`` is added to
    each step's sum, and examples join a step by Poisson sampling at rate global batch / N.
    Give ``epsilon`` (the noise is then computed for the run's steps) or ``noise_multiplier``
    (the epsilon it spends is then accounted)."""

    epsilon: float | None = Field(
        None, gt=0, description="Target epsilon for the whole run; the noise multiplier is chosen "
        "by Opacus' RDP accountant to spend it over the run's steps.",
    )  # fmt: skip
    delta: float | None = Field(
        None, gt=0, lt=1, description="delta of (epsilon, delta)-DP; must be below 1/N (N: "
        "training examples). Default 1e-5, or 1/(10 N) when N > 10,000.",
    )  # fmt: skip
    max_grad_norm: float = Field(
        1.0, gt=0, description="Per-example gradient clipping bound (replaces "
        "training.max_grad_norm, which is not applied under privacy).",
    )  # fmt: skip
    noise_multiplier: float | None = Field(
        None, gt=0, description="Noise std / max_grad_norm; instead of epsilon.",
    )  # fmt: skip


class TrackingSpec(Strict):
    uri: str | None = Field(
        None, description="MLflow URI; default MLFLOW_TRACKING_URI or LOFT_HOME."
    )
    experiment: str = Field("default", description="MLflow experiment name.")


class RegisterSpec(Strict):
    name: str | None = Field(None, description="Default: run_name, else <train folder>-<method>.")
    parent: str | None = Field(None, description="Registry ref this run continues from.")


# `register` is a contract key; it shadows ABCMeta.register on the class, which loft never uses.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class TrainConfig(Strict):
    base_model: str = Field(
        "smollm2-135m-instruct",
        description="Builtin or added model, local HF dir, or cached hub id.",
    )
    method: Method = Field(Method.lora, description="qlora needs CUDA.")
    objective: Objective = Field(
        "sft",
        description="sft (supervised), or preference tuning: dpo, orpo, simpo (pairs), kto "
        "(completions labelled desirable or not).",
    )
    init_from: str | None = Field(
        None,
        description="NAME:VERSION of a registered model to continue from (e.g. an SFT adapter "
        "before DPO); it becomes the new version's parent.",
    )
    preference: PreferenceSpec = Field(
        default_factory=PreferenceSpec, description="Preference objectives' parameters."
    )
    data: DataSpec = Field(description="The dataset.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter shape (not for full).")
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    output_dir: str | None = Field(None, description="Default LOFT_HOME/runs/<run_id>.")
    run_name: str | None = Field(
        None, description="Run id, default generated; also the registered name."
    )
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    register: RegisterSpec | bool = Field(
        default_factory=RegisterSpec,
        description="Register the result as a version; false: do not.",
    )
    gate: list[str] = Field(
        default_factory=list, description="Promotion checks, e.g. 'eval_loss <= champion + 0.02'."
    )
    privacy: PrivacySpec | None = Field(
        None, description="Differentially private LoRA (DP-SGD); null: off."
    )

    @field_validator("register")
    @classmethod
    def _register_true(cls, v: RegisterSpec | bool) -> RegisterSpec | bool:
        return RegisterSpec() if v is True else v

    @model_validator(mode="wrap")
    @classmethod
    def _combinations(cls, data: Any, handler: Any) -> TrainConfig:
        """Combinations of keys that cannot run together, reported with the field problems
        (pydantic runs an "after" validator only once every field is valid)."""
        try:
            cfg, errors = handler(data), []
        except ValidationError as e:
            cfg, errors = None, e.errors()
        if cfg is not None:
            combos = combination_problems(lambda path: _attr_path(cfg, path))
        elif isinstance(data, dict):
            combos = combination_problems(lambda path: _raw_path(data, path))
        else:
            combos = []
        if not errors and not combos:
            return cfg
        details = [_detail(e["type"], e["loc"], e["msg"], e.get("input")) for e in errors]
        details += [
            _detail("combination", tuple(key.split(".")), msg, _raw_path(data, key))
            for key, msg in combos
        ]
        raise ValidationError.from_exception_data(cls.__name__, details)

    @property
    def is_preference(self) -> bool:
        return self.objective != "sft"


def _detail(kind: str, loc: tuple, msg: str, value: Any) -> InitErrorDetails:
    # the message goes in as a context value, so braces in it are never read as a template
    return InitErrorDetails(
        type=PydanticCustomError(kind, "{msg}", {"msg": msg}), loc=loc, input=value
    )


def _attr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _raw_path(doc: Any, path: str) -> Any:
    """The value at ``path`` in an unvalidated config dict, or the schema's default."""
    model: Any = TrainConfig
    value: Any = doc
    for part in path.split("."):
        field = model.model_fields.get(part) if model is not None else None
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif field is not None and not field.is_required():
            value = field.get_default(call_default_factory=True)
        else:
            return None
        ann = field.annotation if field is not None else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if isinstance(value, BaseModel):
            value = value.model_dump()
    return value


def combination_problems(get: Callable[[str], Any]) -> list[tuple[str, str]]:
    """(key path, problem) for each combination of keys that cannot run together; ``get``
    reads a key path (a validated config, or a raw one with the schema's defaults)."""
    out: list[tuple[str, str]] = []
    obj, fmt, ref = get("objective"), get("data.format"), get("preference.reference")
    if obj == "sft" and fmt in PREFERENCE_FORMATS:
        out.append(
            (
                "data.format",
                f"{fmt!r} is preference data; set objective to dpo, orpo or simpo (pairs) or kto "
                "(or use chat, sharegpt, alpaca or completion records for sft)",
            )
        )
    elif obj in PAIRED_OBJECTIVES and fmt == "kto":
        out.append(
            (
                "data.format",
                f"objective {obj} needs pairs (prompt/chosen/rejected), but 'kto' rows are "
                "unpaired: use objective kto, or pair the completions",
            )
        )
    elif obj not in (None, "sft") and fmt not in (*PREFERENCE_FORMATS, "auto"):
        out.append(
            ("data.format", f"objective {obj} trains on preference data, not {fmt!r} records")
        )
    if obj not in (None, "sft") and get("data.packing") is False:
        out.append(
            (
                "data.packing",
                f"objective {obj} trains on packed rows (padding-free, per-example attention); "
                "remove data.packing: false",
            )
        )
    if obj not in (None, "sft"):
        for key, what in (("train_on_inputs", "trains on prompts"), ("canaries", "adds canaries")):
            if get(f"data.{key}"):
                out.append(
                    (
                        f"data.{key}",
                        f"{what} for supervised fine-tuning; preference objectives train on "
                        "completions only: remove it",
                    )
                )
    mbs = get("training.micro_batch_size")
    if obj == "kto" and isinstance(mbs, int) and mbs < 2:
        out.append(
            (
                "training.micro_batch_size",
                "KTO estimates its KL reference point over the micro-batch; use at least 2",
            )
        )
    if obj in ("orpo", "simpo") and ref not in (None, "auto"):
        out.append(("preference.reference", f"{obj} has no reference model; remove this key"))
    if obj in REFERENCE_OBJECTIVES and ref == "init" and not get("init_from"):
        out.append(("preference.reference", "'init' needs init_from (the model to start from)"))
    out += _distributed_problems(get, obj)
    if get("privacy") is not None:
        out += _privacy_problems(get, obj)
    loss_type = get("preference.loss_type")
    if obj != "dpo" and loss_type not in (None, "sigmoid"):
        out.append(("preference.loss_type", f"is a DPO setting, and the objective is {obj}"))
    return out


def _distributed_problems(get: Callable[[str], Any], obj: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    strategy, nproc = get("training.distributed.strategy"), get("training.distributed.nproc")
    if isinstance(nproc, int) and nproc > 1 and strategy == "none":
        out.append(
            (
                "training.distributed.nproc",
                f"{nproc} ranks need a strategy: set training.distributed.strategy to ddp or fsdp "
                "(or nproc to 1)",
            )
        )
    nodes = get("training.distributed.nodes")
    if isinstance(nodes, int) and nodes > 1 and strategy == "none":
        out.append(
            (
                "training.distributed.nodes",
                f"{nodes} machines need a strategy: set training.distributed.strategy to ddp or "
                "fsdp (or nodes to 1)",
            )
        )
    if strategy not in (None, "none"):
        if get("method") == "qlora" and strategy == "fsdp":
            out.append(
                (
                    "training.distributed.strategy",
                    "fsdp cannot shard QLoRA's 4-bit base (bitsandbytes stores it packed, which "
                    "fully_shard cannot split): use strategy ddp, or method lora",
                )
            )
        if obj not in (None, "sft"):
            out.append(
                (
                    "training.distributed.strategy",
                    f"objective {obj} trains on one process in this release (its reference pass "
                    "and KTO's per-micro-batch KL are not sharded yet): set strategy to none",
                )
            )
    return out


def _privacy_problems(get: Callable[[str], Any], obj: Any) -> list[tuple[str, str]]:
    """What DP-SGD through Opacus cannot run or account for (loft.train.privacy)."""
    out: list[tuple[str, str]] = []
    eps, sigma = get("privacy.epsilon"), get("privacy.noise_multiplier")
    if eps is None and sigma is None:
        out.append(
            (
                "privacy",
                "give privacy.epsilon (the target; the noise is computed for it) or "
                "privacy.noise_multiplier (the epsilon it spends is then accounted)",
            )
        )
    elif eps is not None and sigma is not None:
        out.append(
            (
                "privacy.noise_multiplier",
                "give privacy.epsilon or privacy.noise_multiplier, not both: the one determines "
                "the other for the run's steps and sampling rate",
            )
        )
    method = get("method")
    why = {
        "full": "per-example gradients of a full fine-tune are not supported: loft's loss "
        "projects only the trained positions through the LM head (and SmolLM2's head is tied to "
        "the embeddings), so Opacus cannot attribute the head's gradient to examples",
        "dora": "Opacus cannot compute per-example gradients of DoRA's magnitude vectors (its "
        "functorch fallback cannot call PEFT's DoraLinearLayer)",
        "qlora": "per-example gradients through bitsandbytes' 4-bit layers have not been "
        "verified with Opacus in this release",
    }
    if method in why:
        out.append(("method", f"{method} with privacy: {why[method]}; use method lora"))
    if obj not in (None, "sft"):
        out.append(
            (
                "objective",
                f"privacy trains supervised fine-tuning only; {obj} scores pairs or completions "
                "packed together, which per-example clipping does not cover",
            )
        )
    if get("data.packing") is not False:
        out.append(
            (
                "data.packing",
                "privacy clips each example's gradient, and packing puts several examples in one "
                "row (Opacus would clip per row): set data.packing: false",
            )
        )
    strategy = get("training.distributed.strategy")
    if strategy not in (None, "none"):
        out.append(
            (
                "training.distributed.strategy",
                f"privacy runs on one process (Poisson sampling, clipping and noise are not "
                f"sharded across {strategy} ranks): set strategy to none",
            )
        )
    if get("training.gradient_checkpointing") is True:
        out.append(
            (
                "training.gradient_checkpointing",
                "activation recomputation bypasses Opacus' per-example gradient hooks (the "
                "adapter would get no per-example gradients): remove it (auto is off under "
                "privacy)",
            )
        )
    if get("training.precision") == "fp16":
        out.append(
            (
                "training.precision",
                "fp16's loss scaling would scale the per-example gradients before they are "
                "clipped: use bf16 or fp32",
            )
        )
    return out


class ServeConfig(Strict):
    """`loft serve --config serve.yaml`: one base model, many adapters, per-key access."""

    base_model: str = Field(
        "smollm2-135m-instruct", description="Base model every served adapter must be built on."
    )
    engine: Literal["torch", "vllm"] = Field(
        "torch", description="torch (CPU or GPU) or vllm (GPU; pip install loft[vllm])."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when present.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto: bfloat16 on CUDA GPUs with native bf16 (Ampere+), float16 on older "
        "ones, float32 on CPU.",
    )
    adapters: list[str] = Field(
        default_factory=list,
        description="Refs loaded at start: name, name@alias, name:version.",
    )
    pinned: list[str] = Field(
        default_factory=list, description="Registry names or refs never evicted from the cache."
    )
    max_resident_adapters: int = Field(
        8, ge=1, le=4096, description="Adapters kept loaded at once (LRU beyond pinned ones)."
    )
    default_alias: str = Field("champion", description="Alias a bare adapter name follows.")
    alias_refresh_s: float = Field(
        2.0, ge=0.0, le=3600, description="Alias moves reach live traffic within this time."
    )
    max_batch_size: int = Field(16, ge=1, le=1024, description="Sequences decoded together.")
    batch_wait_ms: float = Field(
        5.0, ge=0.0, le=1000, description="Longest wait to fill a batch once one request is queued."
    )
    max_prompt_tokens: int = Field(
        2048, ge=1, description="Longest prompt in tokens; over it: 400."
    )
    max_tokens_limit: int = Field(
        1024, ge=1, description="Largest max_tokens a request may ask; over it: 400."
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request has none.")
    max_n: int = Field(8, ge=1, le=128, description="Largest n (choices per request).")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body; over: 413.")
    max_concurrent_requests: int = Field(
        64, ge=1, description="Requests served at once; over it: 503 with Retry-After."
    )
    log_prompts: bool = Field(
        False, description="Write prompt and completion text to the audit log."
    )
    audit_log: str | None = Field(
        None, description="Audit file; default LOFT_HOME/serve/audit.jsonl."
    )
    keys_db: str | None = Field(None, description="API key store; default LOFT_HOME/keys.db.")
    drain_timeout_s: float = Field(
        30.0, ge=0.0, description="On SIGTERM, time in-flight requests get to finish."
    )
    gpu_memory_utilization: float = Field(
        0.85, gt=0.0, le=1.0, description="vllm only: share of GPU memory it may take."
    )
    max_lora_rank: int | None = Field(
        None,
        ge=1,
        description="vllm only; default: largest rank among the adapters; snapped up to a rank "
        "vLLM supports (8, 16, 32, ...).",
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve /metrics here too, with no key (see metrics_host).",
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Address for metrics_port, e.g. an internal interface."
    )

    @model_validator(mode="after")
    def _limits(self) -> ServeConfig:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit "
                f"({self.max_tokens_limit})"
            )
        return self
