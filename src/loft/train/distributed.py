"""Many ranks, one loop: how ranks share a step, sum gradients and gather what is saved.

The step loop (``loft.train.loop.StepLoop``) calls these on every run; with one process they are
no-ops, so a single-process run and a 2-rank run execute the same code.

- **A step's share.** A step is the plan's micro-batches of example indices. Rank r takes every
  world-th of them (r, r + world, ...); when a step has fewer micro-batches than ranks, its
  examples are cut into ``world`` contiguous pieces instead. The global batch is the
  single-process one, and each unit of work keeps its index, which seeds its dropout, so a unit
  sees the same dropout masks on whichever rank runs it.
- **Gradients are summed.** Every rank normalises its losses by the step's all-reduced count and
  the gradients are SUM-reduced, so the update is the single-process update up to reduction order.
  ddp replicates the model and all-reduces the trainable gradients once per step, after the
  micro-batches (the semantics of DDP with ``no_sync``): ranks may run different numbers of
  micro-batches (an uneven last step) without a hang, and for adapters the buffer is small.
  fsdp (FSDP2 ``fully_shard``) shards each decoder layer; its reduce-scatter is set to sum
  (divide factor 1, sum-only collectives, which gloo needs), and ranks with fewer micro-batches
  run zero-weighted passes so every rank makes the same all-gathers. Parameters outside the
  layers (embeddings, final norm, LM head, tied in many models) stay replicated and are summed
  like ddp's.
- **Collectives per step are the same on every rank**, whatever its share: counts, gradients,
  then the loss and metrics, plus one flag so a stop signal seen by any rank stops them all at the
  same step.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from loft.core.errors import ConfigError, HardwareError
from loft.core.specs import TrainConfig

RUN_DIR_ENV = "LOFT_RUN_DIR"  # the launcher's chosen run directory, for every rank
RESTART_ENV = "LOFT_RESTART_COUNT"  # Ray Train's restarts (torchrun has its own variable)
_BUCKET = 1 << 24  # elements per gradient all-reduce


def under_launcher() -> bool:
    """True in a rank that torchrun or Ray Train started (both set RANK and WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def restarted() -> bool:
    """True in a rank its launcher restarted after a failure (it resumes from the newest
    checkpoint): torchrun counts restarts in TORCHELASTIC_RESTART_COUNT, loft's Ray Train ranks in
    LOFT_RESTART_COUNT."""
    counts = (os.environ.get(v, "0") or "0" for v in ("TORCHELASTIC_RESTART_COUNT", RESTART_ENV))
    return any(int(c) > 0 for c in counts)


def backend_for(config: TrainConfig, cuda: bool) -> str:
    b = config.training.distributed.backend
    return ("nccl" if cuda else "gloo") if b == "auto" else b


def check_launch(config: TrainConfig, *, cuda: bool, gpus: int, env: dict[str, str]) -> None:
    """Refuse, before anything is loaded, a distributed setting this process cannot run."""
    d = config.training.distributed
    world = int(env["WORLD_SIZE"]) if "WORLD_SIZE" in env and "RANK" in env else None
    if d.strategy == "none":
        if world is not None and world > 1:
            raise ConfigError(
                f"torchrun started {world} ranks, and training.distributed.strategy is none: "
                "each rank would train the whole run alone.",
                hint="Add --set training.distributed.strategy=ddp (or fsdp).",
            )
        return
    if world is None and d.nodes > 1:
        raise ConfigError(
            f"training.distributed.nodes is {d.nodes}: the torchrun launcher starts ranks on this "
            "machine only; several machines need a Ray cluster.",
            hint="Add --launcher ray --ray-address http://HEAD:8265 (see `loft train --help`), "
            "or set --set training.distributed.nodes=1.",
        )
    if world is None and d.nproc == 1:
        raise ConfigError(
            f"training.distributed.strategy is {d.strategy} with nproc 1, outside torchrun: "
            "there is only one rank to share the work.",
            hint="Set --set training.distributed.nproc=N (loft starts the ranks), or start it "
            "as torchrun --nproc-per-node N -m loft.cli.main train CONFIG.",
        )
    if world is not None and d.nodes == 1 and d.nproc > 1 and world != d.nproc:
        raise ConfigError(
            f"training.distributed.nproc is {d.nproc}, and torchrun started {world} ranks.",
            hint="Remove nproc from the config when starting torchrun yourself, or make them "
            "equal.",
        )
    if world is not None and d.nodes > 1 and world != d.nodes * d.nproc:
        raise ConfigError(
            f"training.distributed.nodes × nproc is {d.nodes} × {d.nproc}, and the launcher "
            f"started {world} ranks.",
            hint="Make nodes × nproc the launcher's world size.",
        )
    # the ranks on this machine: torchrun and Ray Train say how many (LOCAL_WORLD_SIZE)
    local = int(env.get("LOCAL_WORLD_SIZE") or world or d.nproc)
    backend = backend_for(config, cuda)
    if backend == "nccl" and not cuda:
        raise HardwareError(
            "training.distributed.backend is nccl, which needs CUDA GPUs; this machine has none.",
            hint="Use --set training.distributed.backend=auto (gloo on CPU).",
        )
    if cuda and local > gpus:
        raise HardwareError(
            f"training.distributed.nproc is {local}, and this machine has {gpus} visible GPU"
            f"{'s' if gpus != 1 else ''} (one rank per GPU).",
            hint=f"Set --set training.distributed.nproc={gpus}, or check CUDA_VISIBLE_DEVICES.",
        )


@dataclass
class Ranks:
    """This process's place among the run's ranks; ``Ranks()`` is a single-process run."""

    rank: int = 0
    world: int = 1
    strategy: str = "none"
    mesh: Any = None
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp" and self.active

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (float64: counts stay exact)."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (small Python values: losses, metric sums)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        return bool(self.all_sum([1.0 if flag else 0.0])[0])

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it writes shared caches: data, converted models); the
        others run it after, reading what rank 0 wrote. A failing rank 0 exits, and torchrun
        stops the ranks waiting here."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()


def setup(config: TrainConfig, device: str) -> Ranks:
    """Join the process group torchrun prepared, or use the one Ray Train already initialised
    (it also chose this rank's GPU); or return the single-process Ranks."""
    import torch.distributed as dist

    cuda = device == "cuda"
    gpus = torch.cuda.device_count() if cuda else 0
    check_launch(config, cuda=cuda, gpus=gpus, env=dict(os.environ))
    strategy = config.training.distributed.strategy
    if strategy == "none" or not under_launcher():
        return Ranks()
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend, store = backend_for(config, cuda), _attempt_store()
        if store is None:
            dist.init_process_group(backend)
        else:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = None
    if strategy == "fsdp" and world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device, (world,))
    return Ranks(rank, world, strategy, mesh, device)


def _attempt_store() -> Any:
    """This attempt's own key space in torchrun's shared store, or None (torch's default).

    torchrun's ranks connect to the agent's TCP store, the same server for every restart, with no
    per-attempt prefix: a restarted rank would read the dead ranks' gloo addresses and fail with
    "Connection refused". A prefix per restart count gives each attempt fresh keys."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # rank 0 hosts a new store every attempt
    import torch.distributed as dist

    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=dist.constants.default_pg_timeout,
    )
    return dist.PrefixStore(
        f"loft/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store
    )


def teardown(ranks: Ranks) -> None:
    """Destroy the process group (Ray Train's shutdown skips a group that is already gone)."""
    if ranks.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------- a step's share


def units(micro_batches: list[list[int]], world: int) -> list[list[int]]:
    """The step's units of work: its micro-batches, or, with fewer micro-batches than ranks,
    its examples cut into ``world`` contiguous pieces (some may be missing when the step has
    fewer examples than ranks)."""
    if world == 1 or len(micro_batches) >= world:
        return micro_batches
    flat = [i for mb in micro_batches for i in mb]
    size = math.ceil(len(flat) / world)
    return [flat[k : k + size] for k in range(0, len(flat), size)]


def share(micro_batches: list[list[int]], rank: int, world: int) -> list[tuple[int, list[int]]]:
    """(unit index, example indices) of the units ``rank`` runs: every world-th from ``rank``."""
    return [(j, u) for j, u in enumerate(units(micro_batches, world)) if j % world == rank]


def passes(micro_batches: list[list[int]], world: int) -> int:
    """Forward/backward passes every rank makes in this step under fsdp (the largest share)."""
    return math.ceil(len(units(micro_batches, world)) / world)


def unit_seed(seed: int, step: int, unit: int) -> int:
    """The RNG seed of one unit of work (its dropout): a pure function, like the data order."""
    return (seed * 1_000_003 + step * 1_009 + unit) % (1 << 63)


# ---------------------------------------------------------------- FSDP2


def shard_model(model: torch.nn.Module, ranks: Ranks) -> list[torch.nn.Module]:
    """fully_shard each decoder layer over the ranks' mesh, with summed (not averaged) gradient
    reduction; returns the sharded layers."""
    from torch.distributed.fsdp import fully_shard

    from loft.train.loss import _causal_lm

    layers = list(_causal_lm(model).get_decoder().layers)
    for layer in layers:
        fully_shard(layer, mesh=ranks.mesh, reshard_after_forward=True)
        layer.set_gradient_divide_factor(1.0)
        layer.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return layers


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: the trainable parameters of the decoder layers, then
    the others (embeddings, final norm, an untied LM head: a full fine-tune's), each group in
    model order. Under fsdp the first are sharded and the others replicated, and one foreach
    step cannot mix the two; the groups are the same on any number of ranks, so a checkpoint
    resumes anywhere. Adapters live in the layers: one group, as before."""
    from loft.train.loss import _causal_lm

    in_layers = {
        id(p) for layer in _causal_lm(model).get_decoder().layers for p in layer.parameters()
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    layered = [p for p in trainable if id(p) in in_layers]
    rest = [p for p in trainable if id(p) not in in_layers]
    return [{"params": g} for g in (layered, rest) if g]


def set_grad_sync(layers: list[torch.nn.Module], sync: bool) -> None:
    """Reduce-scatter gradients only on a step's last pass (they accumulate locally before)."""
    for layer in layers:
        layer.set_requires_gradient_sync(sync)


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def sum_grads(params: list[torch.nn.Parameter], ranks: Ranks) -> None:
    """SUM-reduce the gradients of replicated trainable parameters over ranks, in buckets. A
    parameter no rank produced a gradient for keeps none (the optimizer skips it, as it would in
    one process)."""
    if not ranks.active:
        return
    import torch.distributed as dist

    plain = [p for p in params if not _is_dtensor(p)]
    if not plain:
        return
    has = torch.tensor([p.grad is not None for p in plain], dtype=torch.int32, device=ranks.device)
    dist.all_reduce(has)
    live = [p for p, h in zip(plain, has.tolist(), strict=True) if h]
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for p in [*live, None]:
        if p is not None and (not bucket or size + p.numel() <= _BUCKET):
            bucket.append(p)
            size += p.numel()
            continue
        if bucket:
            grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in bucket]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for q in bucket:
                q.grad = flat[offset : offset + q.numel()].view_as(q).clone()
                offset += q.numel()
        bucket, size = ([p], p.numel()) if p is not None else ([], 0)


def clip_grads(params: list[torch.nn.Parameter], max_norm: float, ranks: Ranks) -> None:
    """Clip to the global gradient norm. Replicated gradients are equal on every rank (the
    stock function); sharded ones add their squared local shards over ranks first."""
    if not ranks.fsdp:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    sharded = torch.zeros((), dtype=torch.float64, device=ranks.device)
    replicated = torch.zeros((), dtype=torch.float64, device=ranks.device)
    for g in grads:
        if _is_dtensor(g):
            sharded += g.to_local().double().pow(2).sum()
        else:
            replicated += g.double().pow(2).sum()
    dist.all_reduce(sharded)
    total = float((sharded + replicated).sqrt())
    coef = min(max_norm / (total + 1e-6), 1.0)  # torch.nn.utils.clip_grad_norm_'s rule
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered on every rank (a collective), or ``t``; on the CPU."""
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous()


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole, in parameter order (every rank must call it)."""
    return {n: full_tensor(p) for n, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with sharded states gathered (every rank must call it): the
    single-process format, so any number of ranks can resume from it."""
    sd = optimizer.state_dict()
    state = {
        i: {k: full_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for i, s in sorted(sd["state"].items())
    }
    return {"state": state, "param_groups": sd["param_groups"]}


def place_like(like: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like``: this rank's shard when ``like`` is sharded, else itself."""
    if _is_dtensor(like) and tuple(full.shape) == tuple(like.shape):
        from torch.distributed.tensor import distribute_tensor

        full = full.to(like.device_mesh.device_type)
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return full


def place_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """A full (single-process format) optimizer state dict laid out for this rank's params."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {
        i: {
            k: place_like(params[int(i)], v) if isinstance(v, torch.Tensor) else v
            for k, v in s.items()
        }
        for i, s in sd["state"].items()
    }
    return {**sd, "state": state}
