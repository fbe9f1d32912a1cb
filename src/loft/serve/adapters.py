"""Which adapter a request means, and keeping a bounded set of them resident.

``Resolver`` turns a request's ``model`` into a registry version (``name`` follows the default
alias, ``name@alias``, ``name:N``), re-reading aliases at most every ``alias_refresh_s`` s so a
promotion or rollback re-routes new requests without a restart. A bare name with a traffic split
(``loft.registry.splits``) sends each client's requests to the champion or the candidate, sticky
per route key.

``AdapterCache`` is an LRU over a fixed number of slots (vLLM's ``LRUCacheLoRAModelManager`` and
LoRAX's loader are the models): loading is verified (every sha256 recomputed), idempotent and
single-flight under concurrent requests for the same version, pinned adapters are never evicted,
and an adapter in use by a queued or running request (a *lease*) is never evicted either, so
in-flight requests finish on the version they started with. The engine supplies ``load_slot`` and
``unload_slot``; this module never touches tensors.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError, OverloadedError
from loft.core.specs import ServeConfig
from loft.serve.types import Arm, Target


class Resolver:
    """``model`` string -> (name, version), with aliases cached for ``refresh_s`` seconds.

    One lookup per name at a time: while one thread re-reads an expired alias, the others keep
    using the cached answer (a registry query costs ~15 ms; a herd of them on every expiry slowed
    decoding by a third in bench/serve_throughput.py). A name never seen waits for its lookup.

    A bare name's lookup also reads its traffic split (:mod:`loft.registry.splits`), in the same
    registry read as its aliases, so a split, a share change or its end reaches new requests
    within ``refresh_s`` too; ``route`` applies it to one request's route key.
    """

    def __init__(self, *, default_alias: str, refresh_s: float, clock: Callable[[], float]):
        self.default_alias = default_alias
        self.refresh_s = refresh_s
        self.clock = clock
        self._cache: dict[str, tuple[float, str, int, dict[str, Any] | None]] = {}
        self._busy: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def resolve(self, model: str) -> tuple[str, int]:
        """(name, version) ``model`` names, without a split: a bare name's champion."""
        name, version, _ = self._entry(model)
        return name, version

    def route(self, model: str, route_key: str | None) -> tuple[str, int, Arm | None]:
        """(name, version, arm) for one request: a bare name with a split sends ``route_key`` to
        the arm :func:`loft.registry.splits.arm` picks (sticky per key); arm is None when no
        split applies (``name@alias``, ``name:N``, no split, or no ``route_key``)."""
        from loft.registry.splits import arm

        name, version, split = self._entry(model)
        if split is None or route_key is None:
            return name, version, None
        side = arm(name, split, route_key)
        return name, (split["candidate"] if side == "candidate" else version), side

    def _entry(self, model: str) -> tuple[str, int, dict[str, Any] | None]:
        from loft.registry import parse_ref

        name, alias, version = parse_ref(model)
        if version is not None:
            return name, version, None
        while True:
            with self._lock:
                hit = self._cache.get(model)
                busy = self._busy.get(model)
                fresh = hit is not None and self.clock() - hit[0] < self.refresh_s
                if fresh or (hit is not None and busy is not None):
                    return hit[1], hit[2], hit[3]  # type: ignore[index]
                if busy is None:
                    busy = self._busy[model] = threading.Event()
                    break
            busy.wait()  # first sight of this name: another thread is looking it up
        try:
            resolved = self._lookup(name, alias)
            with self._lock:
                self._cache[model] = (self.clock(), *resolved)
            return resolved
        finally:
            with self._lock:
                self._busy.pop(model, None)
            busy.set()

    def _lookup(self, name: str, alias: str | None) -> tuple[str, int, dict[str, Any] | None]:
        """(name, version, split) from the registry: ``name@alias`` never splits; a bare name
        follows the default alias, else ``champion``, else its latest version, and carries its
        split (one registry read for both; see :func:`loft.registry.splits.routing`)."""
        from loft.registry.splits import routing
        from loft.registry.store import resolve

        if alias is not None:
            got = resolve(f"{name}@{alias}")
            return got[0], got[1], None
        version, split = routing(name, self.default_alias)
        return name, version, split


@dataclass
class Resident:
    target: Target
    slot: int
    leases: int = 0
    pinned: bool = False


@dataclass
class _Loading:
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def base_target(info: Any) -> Target:
    """The base model (a ``loft.models.ModelInfo``) as a Target."""
    return Target(
        ref=info.name, name=info.name, version=None, sha256=info.sha256, is_base=True,
        path=info.path,
    )  # fmt: skip


def cache_for(
    config: ServeConfig,
    base: Target,
    *,
    load_slot: Callable[[int, Target], None],
    unload_slot: Callable[[int], None],
) -> AdapterCache:
    """The adapter cache both engines use, configured from the serve config."""
    resolver = Resolver(
        default_alias=config.default_alias, refresh_s=config.alias_refresh_s, clock=time.monotonic
    )
    return AdapterCache(
        capacity=config.max_resident_adapters,
        base=base,
        base_names={base.name, config.base_model},
        load_slot=load_slot,
        unload_slot=unload_slot,
        resolver=resolver,
        pinned=config.pinned,
    )


class AdapterCache:
    def __init__(
        self,
        *,
        capacity: int,
        base: Target,
        base_names: set[str] | None = None,
        load_slot: Callable[[int, Target], None],
        unload_slot: Callable[[int], None],
        resolver: Resolver,
        pinned: list[str] | None = None,
    ) -> None:
        self.capacity = capacity
        self.base = base
        self.base_names = base_names or {base.name}
        self._load_slot = load_slot
        self._unload_slot = unload_slot
        self.resolver = resolver
        self._pinned = set(pinned or [])
        self._resident: OrderedDict[str, Resident] = OrderedDict()  # LRU first
        self._loading: dict[str, _Loading] = {}
        self._reserved: set[int] = set()  # slots being (un)loaded, outside the lock
        self._lock = threading.Lock()

    # -- queries ------------------------------------------------------------------------------

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._resident)

    def details(self) -> list[dict[str, Any]]:
        """Each resident adapter, least recently used first: ref, sha256, pinned, in_use."""
        with self._lock:
            return [
                {"ref": ref, "sha256": r.target.sha256, "pinned": r.pinned, "in_use": r.leases}
                for ref, r in self._resident.items()
            ]

    def slot_of(self, ref: str) -> int:
        with self._lock:
            return self._resident[ref].slot

    def is_base_name(self, model: str) -> bool:
        return model in self.base_names

    # -- leases -------------------------------------------------------------------------------

    @asynccontextmanager
    async def acquire(self, model: str, route_key: str | None = None) -> AsyncIterator[Target]:
        """``lease`` for async callers (loading runs in a thread); the base model needs none."""
        if self.is_base_name(model):
            yield self.base
            return
        lease = self.lease(model, route_key)
        target = await asyncio.to_thread(lease.__enter__)
        try:
            yield target
        finally:
            lease.__exit__(None, None, None)

    @contextmanager
    def lease(self, model: str, route_key: str | None = None) -> Iterator[Target]:
        """Resolve ``model`` (a bare name's split applied to ``route_key``: see
        ``Resolver.route``), make it resident, and keep it so until the block exits. The target
        carries the arm it was routed to (``route``), None when no split applied."""
        name, version, route = self.resolver.route(model, route_key)
        ref = f"{name}:{version}"
        while True:
            with self._lock:
                res = self._resident.get(ref)
                if res is not None:
                    res.leases += 1
                    self._resident.move_to_end(ref)
                    break
                loading = self._loading.get(ref)
                leader = loading is None
                if leader:
                    loading = self._loading[ref] = _Loading()
            assert loading is not None
            if leader:
                self._load(ref, loading)
            else:
                loading.done.wait()
            if loading.error is not None:
                raise loading.error
        try:
            yield res.target if route is None else replace(res.target, route=route)
        finally:
            with self._lock:
                res.leases -= 1

    def _load(self, ref: str, loading: _Loading) -> None:
        try:
            target = self._verified_target(ref)  # hashing happens outside every lock
            with self._lock:
                slot, evicted = self._free_slot(ref)
            try:
                if evicted:
                    self._unload_slot(slot)
                self._load_slot(slot, target)
            except BaseException:
                with self._lock:
                    self._reserved.discard(slot)
                raise
            pinned = target.name in self._pinned or target.ref in self._pinned
            with self._lock:
                self._reserved.discard(slot)
                self._resident[ref] = Resident(target, slot, pinned=pinned)
        except BaseException as e:
            loading.error = e
        finally:
            with self._lock:
                self._loading.pop(ref, None)
            loading.done.set()

    def _free_slot(self, ref: str) -> tuple[int, bool]:
        """(slot, evicted) for ``ref``, lock held: a free slot, else the LRU idle adapter's."""
        used = {r.slot for r in self._resident.values()} | self._reserved
        for slot in range(1, self.capacity + 1):
            if slot not in used:
                self._reserved.add(slot)
                return slot, False
        for victim, res in self._resident.items():  # least recently used first
            if res.leases == 0 and not res.pinned:
                del self._resident[victim]
                self._reserved.add(res.slot)
                return res.slot, True
        raise OverloadedError(
            f"cannot load {ref}: all {self.capacity} adapter slots hold pinned adapters or "
            "adapters in use by in-flight requests.",
            retry_after=1.0,
            hint="Raise max_resident_adapters in the serve config, or pin fewer adapters.",
        )

    def _verified_target(self, ref: str) -> Target:
        from loft.registry import get_version
        from loft.registry.card import weights_digest

        mv = get_version(ref, verify=True)  # IntegrityError names the bad file
        card = mv.card
        if card.get("kind") != "adapter":
            raise ConfigError(
                f"{ref} is a {card.get('kind')} model, not an adapter; only adapters are served "
                "over the base model.",
                hint=f"Serve it on its own: `loft serve --base-model {mv.path}`.",
            )
        base = (card.get("lineage") or {}).get("base_model") or {}
        check_base(ref, base, self.base)
        lora = _adapter_rank(Path(mv.path))
        return Target(
            ref=ref,
            name=mv.name,
            version=mv.version,
            sha256=weights_digest(card),  # what `loft registry show` prints as its digest
            is_base=False,
            path=Path(mv.path),
            chat_template=(card.get("lineage") or {}).get("chat_template"),
            rank=lora,
        )

    def folder_of(self, model: str) -> Path:
        """The folder of the version ``model`` names, found without hashing (loading verifies)."""
        from loft.registry import get_version

        name, version = self.resolver.resolve(model)
        return Path(get_version(f"{name}:{version}", verify=False).path)

    def rank_of(self, model: str) -> int | None:
        """LoRA rank of the version ``model`` names, read without hashing (loading verifies)."""
        return _adapter_rank(self.folder_of(model))

    def preload(self, refs: list[str]) -> list[Target]:
        out = []
        for ref in refs:
            with self.lease(ref) as target:
                out.append(target)
        return out


def check_base(ref: str, base_card: dict[str, Any], served: Target) -> None:
    """Refuse an adapter trained on another base model, naming both."""
    sha, name = base_card.get("sha256"), base_card.get("name")
    if sha and sha == served.sha256:
        return
    if not sha and name and name == served.name:
        return
    got = f"{name or 'an unrecorded model'}" + (f" (sha256 {sha[:12]}…)" if sha else "")
    raise ConfigError(
        f"{ref} was trained on base model {got}, but this server serves {served.name} "
        f"(sha256 {served.sha256[:12]}…); an adapter only works on the exact base it was "
        "trained on.",
        hint=f"Serve it from a server started with --base-model {name}." if name else None,
    )


def _adapter_rank(folder: Path) -> int | None:
    from loft.models.memory import read_json

    cfg = read_json(folder / "adapter_config.json")
    ranks = [cfg.get("r")] + list((cfg.get("rank_pattern") or {}).values())
    ranks = [int(r) for r in ranks if isinstance(r, int | float)]
    return max(ranks) if ranks else None
