"""The torch serving engine on a tiny model: mixed-adapter batches equal PEFT, the adapter cache
(LRU, leases, single-flight loads, verification, base checks, alias re-routing), sampling, stops."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import aclosing
from pathlib import Path

import pytest
import torch

from helpers import linked_home, make_lora_adapter, vllm_engine_without_vllm
from loft.core.errors import ConfigError, HardwareError, IntegrityError, OverloadedError
from loft.core.specs import ServeConfig
from loft.serve.types import SamplingParams

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model, _session_home):
    """LOFT_HOME with alpha (LoRA r4, champion) and beta (DoRA r8) registered on the tiny model."""
    from loft.registry import move_alias, register

    root = tmp_path_factory.mktemp("serve_engine")
    home = linked_home(root, _session_home)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOFT_HOME", str(home))
        alpha = make_lora_adapter(root / "alpha", tiny_model, seed=1, r=4)
        beta = make_lora_adapter(root / "beta", tiny_model, seed=2, r=8, use_dora=True)
        va = register(alpha, name="alpha")
        register(beta, name="beta")
        register(make_lora_adapter(root / "gamma", tiny_model, seed=5, r=4), name="gamma")
        move_alias("alpha", "champion", va.version, reason="test")
        yield {"root": root, "alpha": alpha, "beta": beta, "base": tiny_model}


@pytest.fixture
def engine(served):
    from loft.serve.engine import TorchEngine

    eng = TorchEngine(
        ServeConfig(base_model=str(served["base"]), max_resident_adapters=2, alias_refresh_s=0)
    )
    eng.start()
    yield eng
    eng.shutdown()


def _complete(engine, model: str, prompt: list[int], **params):
    """(resolved ref, token ids, text, finish reason) of one request."""

    async def run():
        async with engine.acquire(model) as target:
            deltas = [
                d
                async for d in engine.generate(
                    target, prompt, SamplingParams(**params), threading.Event()
                )
            ]
        ids = [t for d in deltas for t in d.token_ids]
        return target.ref, ids, "".join(d.text for d in deltas), deltas[-1].finish_reason

    return run()


def _gather(*coros):
    async def run():
        return await asyncio.gather(*coros)

    return asyncio.run(run())


PROMPT = [1, 17, 280, 33, 942, 7]


def _peft_greedy(base: Path, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
    from peft import PeftModel

    from loft.models import load_causal_lm, resolve_model

    model = load_causal_lm(resolve_model(str(base))).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None
        )
    return out[0, len(prompt) :].tolist()


def test_multilora_logits_match_peft_per_row(served):
    """One batch: row 0 LoRA r4, row 1 DoRA r8 (forces the rank to grow), row 2 no adapter."""
    from peft import PeftModel

    from loft.models import load_causal_lm, resolve_model
    from loft.serve.multilora import MultiLora, read_adapter

    info = resolve_model(str(served["base"]))
    ids = torch.randint(5, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        refs = []
        for folder in (served["alpha"], served["beta"], None):
            m = load_causal_lm(info).eval()
            m = PeftModel.from_pretrained(m, str(folder)).eval() if folder else m
            refs.append(m(ids).logits)
        model = load_causal_lm(info).eval()
        ml = MultiLora(model, capacity=3)
        ml.load(1, read_adapter(served["alpha"], label="alpha"), label="alpha")
        ml.load(2, read_adapter(served["beta"], label="beta"), label="beta")
        ml.set_rows([1, 2, 0], torch.device("cpu"))
        out = model(ids).logits
        for row in range(3):
            assert torch.allclose(out[row], refs[row][row], atol=1e-4), row
        assert not torch.allclose(refs[0][0], refs[2][0], atol=1e-2)  # the adapter matters
        ml.unload(1)
        ml.set_rows([1, 1, 1], torch.device("cpu"))
        assert torch.equal(model(ids).logits, refs[2])  # an emptied slot is exactly the base


def test_mixed_batch_generation_equals_peft_alone(engine, served):
    got = _gather(
        _complete(engine, "alpha", PROMPT, max_tokens=8, temperature=0),
        _complete(engine, "beta", PROMPT[:4], max_tokens=6, temperature=0),
        _complete(engine, str(served["base"]), PROMPT, max_tokens=5, temperature=0),
    )
    assert [g[0] for g in got] == ["alpha:1", "beta:1", engine.base.ref]
    assert got[0][1] == _peft_greedy(served["base"], served["alpha"], PROMPT, 8)
    assert got[1][1] == _peft_greedy(served["base"], served["beta"], PROMPT[:4], 6)
    assert got[2][1] == _peft_greedy(served["base"], None, PROMPT, 5)
    assert [g[3] for g in got] == ["length"] * 3


def test_seeded_sampling_is_reproducible(engine):
    a, b, c = _gather(
        _complete(engine, "alpha", PROMPT, max_tokens=8, temperature=1.0, seed=7),
        _complete(engine, "alpha", PROMPT, max_tokens=8, temperature=1.0, seed=7),
        _complete(engine, "alpha", PROMPT, max_tokens=8, temperature=1.0, seed=8),
    )
    assert a[1] == b[1]
    assert a[1] != c[1]


def test_stop_string_truncates_and_finishes(engine):
    _, _, text, _ = asyncio.run(_complete(engine, "alpha", PROMPT, max_tokens=8, temperature=0))
    stop = text.strip()[3:6]
    assert stop, text
    _, _, cut, finish = asyncio.run(
        _complete(engine, "alpha", PROMPT, max_tokens=8, temperature=0, stop=[stop])
    )
    assert finish == "stop"
    assert cut == text[: text.index(stop)]


def test_cancel_stops_generation(engine):
    async def run():
        cancel = threading.Event()
        async with engine.acquire("alpha") as target:
            n = 0
            params = SamplingParams(max_tokens=50, temperature=0)
            async with aclosing(engine.generate(target, PROMPT, params, cancel)) as stream:
                async for _ in stream:
                    n += 1
                    if n == 2:
                        break  # the consumer goes away: generate's finally sets cancel
        return cancel.is_set(), n

    assert asyncio.run(run()) == (True, 2)
    deadline = time.monotonic() + 5  # the worker drops the cancelled row at its next token
    while engine.queue_depth():
        assert time.monotonic() < deadline, "the cancelled generation kept running"
        time.sleep(0.01)


def test_lru_eviction_respects_leases_and_pins(served, engine):
    cache = engine.cache  # capacity 2
    with cache.lease("alpha") as a, cache.lease("beta") as b:
        assert (a.ref, b.ref) == ("alpha:1", "beta:1")
        with pytest.raises(OverloadedError, match="adapter slots"), cache.lease("gamma"):
            pass
    assert cache.resident() == ["alpha:1", "beta:1"]
    with cache.lease("gamma"):  # evicts the least recently used idle adapter
        pass
    assert cache.resident() == ["beta:1", "gamma:1"]
    assert _gather(_complete(engine, "alpha", PROMPT, max_tokens=3, temperature=0))[0][0] == (
        "alpha:1"
    )  # reloads on demand
    assert cache.resident() == ["gamma:1", "alpha:1"]


def test_pinned_adapters_are_never_evicted(served):
    from loft.serve.engine import TorchEngine

    eng = TorchEngine(
        ServeConfig(base_model=str(served["base"]), max_resident_adapters=2, pinned=["alpha"])
    )
    eng.start()
    try:
        assert eng.resident() == ["alpha:1"]  # pinned adapters load at start
        for name in ("beta", "gamma", "beta"):
            with eng.cache.lease(name):
                pass
        assert eng.resident() == ["alpha:1", "beta:1"]
    finally:
        eng.shutdown()


def test_concurrent_loads_are_single_flight(served):
    from loft.serve.engine import TorchEngine

    eng = TorchEngine(ServeConfig(base_model=str(served["base"]), max_resident_adapters=2))
    eng.start()
    calls = []
    real = eng._load_slot
    eng.cache._load_slot = lambda slot, t: (calls.append(t.ref), real(slot, t))
    barrier = threading.Barrier(6)

    def worker():
        barrier.wait()
        with eng.cache.lease("beta"):
            pass

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    eng.shutdown()
    assert calls == ["beta:1"]


def test_adapter_for_another_base_is_refused_by_name(served, tmp_path):
    from loft.models.tiny import make_tiny_model
    from loft.registry import register
    from loft.serve.engine import TorchEngine

    other = make_tiny_model(tmp_path / "other-base", seed=5)
    register(make_lora_adapter(tmp_path / "foreign", other, seed=3), name="foreign")
    eng = TorchEngine(ServeConfig(base_model=str(served["base"])))
    eng.start()
    try:
        refused = pytest.raises(ConfigError, match=r"foreign:1 was trained on base model .*other")
        with refused, eng.cache.lease("foreign"):
            pass
    finally:
        eng.shutdown()


def test_tampered_adapter_is_refused_before_loading(served, tmp_path):
    from loft.registry import register
    from loft.serve.engine import TorchEngine

    v = register(make_lora_adapter(tmp_path / "t", served["base"], seed=4), name="tampered")
    weights = v.path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    eng = TorchEngine(ServeConfig(base_model=str(served["base"])))
    eng.start()
    try:
        with (
            pytest.raises(IntegrityError, match="adapter_model.safetensors"),
            eng.cache.lease("tampered"),
        ):
            pass
        assert eng.resident() == []
    finally:
        eng.shutdown()


def test_alias_move_reroutes_new_requests_old_lease_keeps_its_version(served, engine):
    from loft.registry import move_alias, register

    with engine.cache.lease("alpha") as old:
        assert old.ref == "alpha:1"
        v2 = register(
            make_lora_adapter(served["root"] / "alpha2", served["base"], seed=9), name="alpha"
        )
        move_alias("alpha", "champion", v2.version, reason="test promotion")
        try:
            with engine.cache.lease("alpha") as new:
                assert new.ref == f"alpha:{v2.version}"
                assert new.sha256 != old.sha256
            assert "alpha:1" in engine.resident()  # still leased, so not evicted
        finally:
            move_alias("alpha", "champion", 1, reason="restore")


def test_vllm_engine_refuses_without_gpu_before_loading(served):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the refusal is for machines without one")
    from loft.serve.engine import make_engine

    eng = make_engine(ServeConfig(base_model=str(served["base"]), engine="vllm"))
    with pytest.raises(HardwareError, match="vllm|vLLM"):
        eng.start()
    assert eng.tokenizer is None  # nothing was loaded


def test_vllm_rank_is_derived_from_adapters():
    from loft.serve.vllm_engine import lora_rank_for

    assert lora_rank_for([4, 8], None) == 8
    assert lora_rank_for([12], None) == 16
    assert lora_rank_for([], None) == 16
    assert lora_rank_for([8], 64) == 64
    with pytest.raises(ConfigError, match="below the largest adapter rank 32"):
        lora_rank_for([32], 16)


def test_vllm_engine_args_bound_gpu_slots_by_the_batch_and_snap_the_rank():
    """vLLM preallocates a GPU LoRA slot (at max_lora_rank, out of the KV cache) for each of
    max_loras: a batch never mixes more adapters than it has sequences. It accepts only its own
    ranks, so a configured max_lora_rank is snapped up to one, and startup says so."""
    from loft.serve.vllm_engine import lora_rank_for, sizing_line, vllm_engine_args

    cfg = ServeConfig(engine="vllm", max_resident_adapters=64, max_batch_size=8, max_lora_rank=20)
    args = vllm_engine_args(cfg, [4, 16], model_path="/m")
    assert args["max_loras"] == 8 and args["max_cpu_loras"] == 64
    assert args["max_lora_rank"] == 32 and args["max_num_seqs"] == 8
    assert args["model"] == args["tokenizer"] == "/m" and args["enable_lora"] is True
    assert args["max_model_len"] == cfg.max_prompt_tokens + cfg.max_tokens_limit
    line = sizing_line(cfg, args)
    assert "8 adapters per batch" in line and "configured 20, snapped up" in line
    few = ServeConfig(engine="vllm", max_resident_adapters=2, max_batch_size=16)
    args = vllm_engine_args(few, [4], model_path="/m")
    assert (args["max_loras"], args["max_cpu_loras"], args["max_lora_rank"]) == (2, 2, 8)
    assert "snapped" not in sizing_line(few, args)
    assert lora_rank_for([1], 1) == 8 and lora_rank_for([8], 300) == 320
    with pytest.raises(ConfigError, match=r"max_lora_rank 600 is above what vLLM supports \(512\)"):
        lora_rank_for([8], 600)


def test_adapter_stacks_live_on_the_base_weights_device(served):
    """The stacked A/B/magnitude buffers are made beside the wrapped weights (on CUDA they stayed
    on the CPU and the first batch with an adapter failed), also after growing to a larger rank:
    checked on the meta device, where a mixed batch still runs through every layer."""
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from loft.serve.multilora import MultiLora, MultiLoraLinear, RowState, read_adapter

    layer = MultiLoraLinear(nn.Linear(8, 6, device="meta", dtype=torch.bfloat16), 3, 2, RowState())
    layer.grow(4)
    for buf in (layer.a, layer.b, layer.m):
        assert (buf.device.type, buf.dtype) == ("meta", torch.bfloat16)
    assert tuple(layer.a.shape) == (12, 8) and tuple(layer.b.shape) == (12, 6)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(served["base"]), dtype=torch.bfloat16
        )
    ml = MultiLora(model, capacity=2)
    ml.load(1, read_adapter(served["alpha"], label="alpha"), label="alpha")  # LoRA r4
    ml.load(2, read_adapter(served["beta"], label="beta"), label="beta")  # DoRA r8: grows
    assert len(ml.layers) == 14
    for layer in ml.layers.values():
        assert {b.device.type for b in (layer.a, layer.b, layer.m)} == {"meta"}
        assert layer.rank == 8 and layer.dora == {2}
    ml.set_rows([1, 2, 0], torch.device("meta"))
    logits = model(torch.zeros(3, 5, dtype=torch.long, device="meta")).logits
    assert logits.device.type == "meta" and tuple(logits.shape[:2]) == (3, 5)


def _acquire(engine, model: str):
    async def run():
        async with engine.acquire(model) as target:
            return target

    return asyncio.run(run())


def test_vllm_engine_refuses_a_dora_adapter_before_vllm_sees_it(served):
    """vLLM refuses DoRA inside its engine step, where a failed load stops the engine for every
    client: the adapter is refused when it is first acquired, a 400 that names why and the engine
    that serves it, and nothing is handed on to vLLM."""
    from loft.core.errors import http_status_for

    eng = vllm_engine_without_vllm(
        ServeConfig(base_model=str(served["base"]), engine="vllm", alias_refresh_s=0)
    )
    with pytest.raises(ConfigError) as refused:
        _acquire(eng, "beta")
    message = str(refused.value)
    assert "beta:1 cannot be served by the vLLM engine: use_dora: true" in message
    assert "engine: torch" in message
    assert http_status_for(refused.value) == 400
    assert eng.resident() == [] and eng._ids == {}


def test_vllm_engine_refuses_a_configured_dora_adapter_before_loading_anything(served):
    from loft.serve.vllm_engine import VllmEngine

    eng = VllmEngine(
        ServeConfig(base_model=str(served["base"]), engine="vllm", adapters=["alpha", "beta"])
    )
    with pytest.raises(ConfigError, match="beta cannot be served by the vLLM engine: use_dora"):
        eng._prepare()  # what start() runs once vLLM is importable, before vLLM loads the model
    assert eng.engine is None and eng.sizing is None


class _AddLora:
    """The part of vLLM's AsyncLLM the engine uses before a request: ``add_lora`` (vLLM itself is
    not installed on CPU machines). It refuses the adapters named in ``refuse``."""

    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse
        self.calls: list[str] = []
        self.errored = False

    async def add_lora(self, request: str) -> bool:
        self.calls.append(request)
        await asyncio.sleep(0)
        if request in self.refuse:
            raise ValueError(f"While loading {request}, expected target modules in [...]")
        return True


def test_vllm_engine_adds_each_adapter_once_before_use_and_a_refusal_fails_one_request(
    served, monkeypatch
):
    """Adapters reach vLLM through add_lora on the serving loop before their first request (never
    lazily inside vLLM's engine step): once per load however many requests wait, and an adapter
    vLLM still refuses fails that request with a 400 while the others keep being served."""
    from loft.core.errors import LoftError, http_status_for

    eng = vllm_engine_without_vllm(
        ServeConfig(base_model=str(served["base"]), engine="vllm", alias_refresh_s=0)
    )
    eng.engine = _AddLora(refuse={"gamma:1"})
    monkeypatch.setattr(eng, "_lora_request", lambda target: target.ref)

    async def both():
        target = await asyncio.to_thread(lambda: eng.cache.preload(["alpha"])[0])
        await asyncio.gather(eng._add_lora(target), eng._add_lora(target))
        async with eng.acquire("alpha") as again:
            return again

    assert asyncio.run(both()).ref == "alpha:1"
    assert eng.engine.calls == ["alpha:1"]  # one add_lora for two waiters and a later request
    for _ in range(2):  # refused each time it is asked for, in that request alone
        with pytest.raises(ConfigError, match="vLLM could not load gamma:1: While loading") as e:
            _acquire(eng, "gamma")
        assert http_status_for(e.value) == 400
    assert eng.engine.calls == ["alpha:1", "gamma:1", "gamma:1"]
    assert _acquire(eng, "alpha").ref == "alpha:1" and len(eng.engine.calls) == 3
    eng.engine.errored = True  # the engine itself died: a 500, not the adapter's fault
    with pytest.raises(LoftError, match="the vLLM engine has stopped") as e:
        _acquire(eng, "gamma")
    assert http_status_for(e.value) == 500


def test_resolver_looks_up_once_and_serves_cached_answer_while_refreshing():
    import time as _time

    from loft.serve.adapters import Resolver

    now = [0.0]
    calls = []
    gate = threading.Event()
    r = Resolver(default_alias="champion", refresh_s=2.0, clock=lambda: now[0])

    def lookup(name, alias):
        calls.append(name)
        gate.wait(5)
        return name, len(calls), None  # (name, version, traffic split)

    r._lookup = lookup
    out = []
    threads = [threading.Thread(target=lambda: out.append(r.resolve("m"))) for _ in range(5)]
    for t in threads:
        t.start()
    _time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join()
    assert calls == ["m"] and out == [("m", 1)] * 5  # first sight: one lookup, the rest wait
    gate.clear()
    now[0] = 3.0  # expired: one thread refreshes, the others get the cached answer meanwhile
    refresher = threading.Thread(target=lambda: out.append(r.resolve("m")))
    refresher.start()
    _time.sleep(0.1)
    assert r.resolve("m") == ("m", 1)
    gate.set()
    refresher.join()
    assert calls == ["m", "m"] and out[-1] == ("m", 2) and r.resolve("m") == ("m", 2)
    assert r.resolve("m:7") == ("m", 7)  # explicit versions never touch the registry


def test_cancel_from_outside_ends_the_stream_and_normal_finish_leaves_cancel_alone(engine):
    async def run():
        outside, untouched = threading.Event(), threading.Event()
        async with engine.acquire("alpha") as target:
            slow = engine.generate(target, PROMPT, SamplingParams(max_tokens=400), outside)
            quick = engine.generate(target, PROMPT, SamplingParams(max_tokens=2), untouched)

            async def consume(stream, stop_after=None):
                n = 0
                async for _ in stream:
                    n += 1
                    if n == stop_after:
                        outside.set()  # the server saw the client go away
                return n

            n_slow, n_quick = await asyncio.wait_for(
                asyncio.gather(consume(slow, stop_after=1), consume(quick)), timeout=60
            )
        return n_slow, n_quick, untouched.is_set()

    n_slow, n_quick, touched = asyncio.run(run())
    assert 1 <= n_slow < 400 and n_quick >= 1
    assert not touched  # a stream that finished normally does not set the caller's event


def test_requests_joining_a_running_batch_get_the_same_tokens_as_alone(engine, served):
    """Continuous batching: newcomers are prefilled and joined mid-decode (left padding on the
    shorter side), finished rows leave; every row's greedy output still equals PEFT alone."""
    from loft.serve import engine as engine_mod

    long_prompt = PROMPT * 3
    joins = []
    real_join = engine_mod._Batch.join

    def counting_join(self, other):
        joins.append((len(self.live), len(other.live)))
        return real_join(self, other)

    # beta resident first, so the newcomer needs no load (verify, copy into a slot) while the
    # first request decodes
    asyncio.run(_complete(engine, "beta", PROMPT[:2], max_tokens=1, temperature=0))
    real_admit = engine._admit
    held = []

    def admit_both_newcomers_together(n_live: int):
        """When the first newcomer is queued, wait (bounded) for the second, so both join the
        running request at the same token however the two happen to be scheduled. Until then
        it admits nothing: checking the queue and then admitting from it would race with the
        event loop, letting a newcomer queued in between join alone."""
        if held:
            return real_admit(n_live)
        if not engine._pending.qsize():
            return []
        held.append(n_live)
        deadline = time.monotonic() + 60
        while engine._pending.qsize() < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        return real_admit(n_live)

    async def run():
        first = asyncio.ensure_future(
            _complete(engine, "alpha", PROMPT, max_tokens=40, temperature=0)
        )
        # the worker has taken the first request off the queue and is decoding it (newcomers
        # queued before that would share its initial batch instead of joining it)
        while not engine._active or engine._pending.qsize():
            await asyncio.sleep(0.001)
        later = [  # tasks, so they run now, while the first is decoding (not after it)
            asyncio.ensure_future(
                _complete(engine, "beta", long_prompt, max_tokens=5, temperature=0)
            ),
            asyncio.ensure_future(
                _complete(engine, str(served["base"]), PROMPT[:3], max_tokens=7, temperature=0)
            ),
        ]
        return [await first, *(await asyncio.gather(*later))]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_mod._Batch, "join", counting_join)
        mp.setattr(engine, "_admit", admit_both_newcomers_together)
        got = asyncio.run(run())
    assert joins[0] == (1, 2)  # both newcomers joined the running request mid-decode
    assert got[0][1] == _peft_greedy(served["base"], served["alpha"], PROMPT, 40)
    assert got[1][1] == _peft_greedy(served["base"], served["beta"], long_prompt, 5)
    assert got[2][1] == _peft_greedy(served["base"], None, PROMPT[:3], 7)


@pytest.mark.unit
@pytest.mark.parametrize(("capability", "want"), [((7, 5), "float16"), ((9, 0), "bfloat16")])
def test_auto_dtype_on_a_gpu_is_bf16_only_where_native(
    monkeypatch: pytest.MonkeyPatch, capability, want
):
    """A T4 (sm75) emulates bf16, several times slower than fp16: serve it fp16 (issue 12)."""
    import torch

    from loft.core.specs import ServeConfig
    from loft.serve.engine import TorchEngine

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    engine = TorchEngine(ServeConfig())
    assert engine._dtype(torch, "cuda") is getattr(torch, want)
    assert engine._dtype(torch, "cpu") is torch.float32


@pytest.mark.unit
@pytest.mark.parametrize("key", ["use_qalora", "alora_invocation_tokens"])
def test_mixed_adapter_serving_refuses_adapters_that_are_not_plain_linear_deltas(
    tmp_path: Path, tiny_model: Path, key: str
):
    """QA-LoRA pools the adapter's input and aLoRA switches on after given tokens: served as a
    plain delta they would answer wrongly, so they are refused by name."""
    import json as _json

    from helpers import make_lora_adapter
    from loft.core.errors import ConfigError
    from loft.serve.multilora import read_adapter

    folder = make_lora_adapter(tmp_path / "a", tiny_model, seed=1, r=2)
    cfg = _json.loads((folder / "adapter_config.json").read_text())
    cfg[key] = True if key == "use_qalora" else [1, 2]
    (folder / "adapter_config.json").write_text(_json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"QA-LoRA|aLoRA"):
        read_adapter(folder, label="a:1")


@pytest.mark.unit
def test_output_for_a_closed_event_loop_cancels_its_sequence_not_the_worker():
    """A client whose event loop has closed (it went away between two tokens): the worker's
    send must not raise (it used to kill the worker thread that decodes for every client);
    the sequence is cancelled and dropped at the next token instead."""
    from loft.serve.engine import _Seq
    from loft.serve.types import SamplingParams

    loop = asyncio.new_event_loop()
    seq = _Seq([1, 2], 0, SamplingParams(max_tokens=4), threading.Event(), loop, asyncio.Queue())
    loop.close()
    seq.send(None)
    assert seq.cancel.is_set()
