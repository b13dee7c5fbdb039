"""NAG together with diffusers' caches (FasterCache, Pyramid Attention Broadcast, FirstBlockCache, TaylorSeer, MagCache,
SeaCache, the text K/V cache) on a joint-attention family (FLUX, FLUX Kontext) and a cross-attention one (Wan).

What must hold, whatever the order of ``nagkit.apply`` and ``enable_cache``:

* guided calls change the text length (``[positive | negative]``) against plain ones (outside a ``start``/``end``
  window, the unconditional call of true CFG): no cache crashes on that, outputs stay finite;
* ``scale=1`` with a cache is bit-identical to the cache alone; guided output differs from it, and the cache still
  acts on guided calls (nagkit's hooks are innermost, so cache block hooks wrap them);
* ``guide.remove()`` leaves the cache running and ``disable_cache()`` leaves NAG running (diffusers' ``remove_hook``
  drops the next hook's ``new_forward``; nagkit removes its hooks without that).
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from diffusers import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from diffusers.hooks import HookRegistry, ModelHook, SeaCacheConfig, TextKVCacheConfig
from diffusers.hooks.hooks import CacheContext

import nagkit
from nagkit.integration.caches import (
    LayoutTracker,
    invalidate_caches,
    register_innermost,
    remove_hook_safely,
)
from nagkit.tiny.pipelines import TINY_PIPELINES

from .test_pipelines import generate

NEG = "blurry low quality"
STEPS = 4
# ``end`` that closes the window after 2 of the 4 steps (FLUX: t = 1000, 750 | 500, 250; Kontext: 1000, 826 | 613,
# 345; Wan: 999, 900 | 750, 500), so the text layout changes in the middle of a run
WINDOW_END = {"tiny-flux": 0.4, "tiny-flux-kontext": 0.3, "tiny-wan": 0.2}
# (family, cache) pairs. FLUX Kontext's pipeline enters no cache_context, so only caches that work without one;
# SeaCache needs the scheduler coordinates that only the Wan pipeline passes to cache_context.
PAIRS = [
    *[("tiny-flux", c) for c in ("faster", "pab", "fbc", "taylorseer", "magcache", "text-kv")],
    *[("tiny-wan", c) for c in ("faster", "pab", "fbc", "taylorseer", "magcache", "text-kv", "seacache")],
    *[("tiny-flux-kontext", c) for c in ("faster", "pab", "magcache")],
]
EXACT = {"text-kv"}  # lossless on these families (its block hooks only exist for NucleusMoE): output unchanged
# one state for every call, not one per cache context: under true CFG with NAG on, the conditional call is guided and
# the unconditional one plain, so the layout alternates and these caches recompute at every call (correct, no reuse)
SHARED_STATE = {"faster", "pab"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is as fast, and many times faster on a busy machine (no OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cache_config(kind: str, family: str, pipe) -> object:
    """A config that makes the cache reuse something within a 4-step tiny run."""
    def now():
        return pipe.current_timestep

    if kind == "faster":
        # separate cond/uncond calls: is_guidance_distilled (the denoiser-level split assumes batched CFG); the first
        # step (t ~ 1000) must be outside the skip range (a skip at the first call reads an empty cache)
        return FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 900),
                                 current_timestep_callback=now, attention_weight_callback=lambda _: 0.5,
                                 is_guidance_distilled=True)
    if kind == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            cross_attention_block_skip_range=2, cross_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=now)
    if kind == "fbc":
        return FirstBlockCacheConfig(threshold=100.0)  # always reuse after the first call of each context
    if kind == "taylorseer":
        ids = [r"blocks\.\d+\.attn\d"] if family == "tiny-wan" else None  # Wan's attention is attn1/attn2
        return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1,
                                     taylor_factors_dtype=torch.float32, cache_identifiers=ids)
    if kind == "magcache":
        return MagCacheConfig(threshold=100.0, max_skip_steps=1, retention_ratio=0.0, num_inference_steps=STEPS,
                              mag_ratios=[1.0] * STEPS)
    if kind == "text-kv":
        return TextKVCacheConfig()
    if kind == "seacache":
        return SeaCacheConfig(threshold=100.0, retention_steps=1, cache_end_steps=0)
    raise ValueError(kind)


def fresh(family: str):
    return TINY_PIPELINES[family](seed=0)


def run(family: str, pipe, cfg: float = 1.0):
    """4 steps; ``cfg > 1``: Flux/Kontext true CFG (``true_cfg_scale`` with a ``negative_prompt``), Wan CFG."""
    extra = {"negative_prompt": "ugly, noisy"} if cfg > 1 else {}
    return generate(family, pipe, steps=STEPS, guidance=cfg, **extra)


def setup(family: str, kind: str, order: str, **nag):
    """A fresh pipeline with the cache and NAG installed in ``order`` ("cache-first" or "nag-first")."""
    pipe = fresh(family)
    if order == "nag-first":
        guide = nagkit.apply(pipe, negative_prompt=NEG, **nag)
        pipe.transformer.enable_cache(cache_config(kind, family, pipe))
    else:
        pipe.transformer.enable_cache(cache_config(kind, family, pipe))
        guide = nagkit.apply(pipe, negative_prompt=NEG, **nag)
    return pipe, guide


@functools.cache
def cache_only(family: str, kind: str, cfg: float = 1.0) -> torch.Tensor:
    """The cache alone (memoized: read-only)."""
    pipe = fresh(family)
    pipe.transformer.enable_cache(cache_config(kind, family, pipe))
    return run(family, pipe, cfg)


@functools.cache
def _nag_only(family: str, cfg: float, nag: tuple) -> torch.Tensor:
    pipe = fresh(family)
    with nagkit.apply(pipe, negative_prompt=NEG, **dict(nag)):
        return run(family, pipe, cfg)


def nag_only(family: str, cfg: float = 1.0, **nag) -> torch.Tensor:
    """NAG alone (memoized: read-only)."""
    return _nag_only(family, cfg, tuple(sorted(nag.items())))


@functools.cache
def plain(family: str) -> torch.Tensor:
    """Neither (memoized: read-only)."""
    return run(family, fresh(family))


def registries(model: torch.nn.Module) -> list[tuple[str, HookRegistry]]:
    return [(n, m._diffusers_hook) for n, m in model.named_modules()
            if isinstance(getattr(m, "_diffusers_hook", None), HookRegistry)]


def hooks_that_ran(model: torch.nn.Module, call) -> tuple[set, set]:
    """Run ``call()``; return (every registered hook, the hooks whose own forward ran at least once).

    A hook "runs" when the chain reaches it (its ``pre_forward`` is called) *and* it still carries its own
    ``new_forward`` where it has one (diffusers' ``remove_hook`` bug swaps it for the plain forward).
    """
    every, ran, undo = set(), set(), []
    for path, registry in registries(model):
        for name, fn_ref in zip(registry._hook_order, registry._fn_refs, strict=True):
            key = (path, name)
            every.add(key)
            hook = registry.hooks[name]
            if hasattr(hook, "new_forward") and getattr(fn_ref.forward, "func", None) != hook.new_forward:
                continue  # bypassed: never counted as running

            def spy(module, *args, _key=key, _pre=fn_ref.pre_forward, **kwargs):
                ran.add(_key)
                return _pre(module, *args, **kwargs)

            undo.append((fn_ref, fn_ref.pre_forward))
            fn_ref.pre_forward = spy
    try:
        call()
    finally:
        for fn_ref, pre in undo:
            fn_ref.pre_forward = pre
    return every, ran


def nagkit_hooks(model: torch.nn.Module) -> list[str]:
    return [path for path, registry in registries(model) if "nagkit" in registry.hooks]


# ---------------------------------------------------------------------------------------------------- with a cache
@pytest.mark.parametrize("order", ["cache-first", "nag-first"])
@pytest.mark.parametrize("family,kind", PAIRS)
def test_scale_one_is_bit_identical_to_the_cache_alone(family, kind, order):
    pipe, guide = setup(family, kind, order, scale=1.0)
    assert torch.equal(run(family, pipe), cache_only(family, kind))
    guide.remove()


@pytest.mark.parametrize("cfg", [1.0, 2.0], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("window", [False, True], ids=["always", "window"])
@pytest.mark.parametrize("family,kind", PAIRS)
def test_guided_with_a_cache_runs_guides_and_keeps_caching(family, kind, window, cfg):
    nag = {"scale": 5.0, "alpha": 0.5, "end": WINDOW_END[family] if window else 1.0}
    pipe, guide = setup(family, kind, "cache-first", **nag)
    outputs = []
    every, ran = hooks_that_ran(pipe.transformer, lambda: outputs.append(run(family, pipe, cfg)))
    guided = outputs[0]
    calls = dict(guide.state.calls)
    guide.remove()
    assert torch.isfinite(guided).all()
    assert ran == every  # every hook (the cache's and nagkit's) ran its own forward
    assert calls["guided"] > 0 and (calls["unguided"] > 0) == (window or cfg > 1)
    assert (guided - cache_only(family, kind, cfg)).abs().max() > 1e-4  # NAG guides
    if kind in EXACT or (kind in SHARED_STATE and cfg > 1 and not window):
        assert torch.equal(guided, nag_only(family, cfg, **nag))  # nothing reused: exactly NAG
    else:  # the cache reuses on guided calls too (its hooks wrap nagkit's)
        assert (guided - nag_only(family, cfg, **nag)).abs().max() > 1e-4


@pytest.mark.parametrize("order", ["cache-first", "nag-first"])
@pytest.mark.parametrize("family,kind", PAIRS)
def test_removing_nag_leaves_the_cache_running(family, kind, order):
    pipe, guide = setup(family, kind, order, scale=5.0, alpha=0.5, end=WINDOW_END[family])
    run(family, pipe)
    guide.remove()
    assert nagkit_hooks(pipe.transformer) == []
    outputs = []
    every, ran = hooks_that_ran(pipe.transformer, lambda: outputs.append(run(family, pipe)))
    assert ran == every and every  # the cache's hooks are all still there and running
    assert torch.equal(outputs[0], cache_only(family, kind))
    pipe.transformer.disable_cache()
    assert all(not registry.hooks for _, registry in registries(pipe.transformer))
    assert torch.equal(run(family, pipe), plain(family))


@pytest.mark.parametrize("order", ["cache-first", "nag-first"])
@pytest.mark.parametrize("family,kind", PAIRS)
def test_disabling_the_cache_leaves_nag_running(family, kind, order):
    nag = {"scale": 5.0, "alpha": 0.5}  # the preset's window: Kontext's ends at 0.25, mid-run
    pipe, guide = setup(family, kind, order, **nag)
    run(family, pipe)
    pipe.transformer.disable_cache()
    outputs = []
    every, ran = hooks_that_ran(pipe.transformer, lambda: outputs.append(run(family, pipe)))
    assert ran == every and {name for _, name in every} == {"nagkit"}
    assert torch.equal(outputs[0], nag_only(family, **nag))
    guide.remove()
    assert nagkit_hooks(pipe.transformer) == []
    assert "nagkit" not in getattr(getattr(pipe.transformer, "_diffusers_hook", None), "hooks", {})
    assert torch.equal(run(family, pipe), plain(family))


def test_group_offloading_stays_outside_nag():
    """Block-level group offloading: nagkit's denoiser hook (FLUX computes the negative's ``temb`` there) runs after
    the offload hook loaded the weights, whichever was installed first."""
    expected = nag_only("tiny-flux", scale=5.0, alpha=0.5)
    for order in ("offload-first", "nag-first"):
        pipe = fresh("tiny-flux")
        if order == "nag-first":
            guide = nagkit.apply(pipe, negative_prompt=NEG, scale=5.0, alpha=0.5)
        pipe.transformer.enable_group_offload(torch.device("cpu"), offload_device=torch.device("cpu"),
                                              offload_type="block_level", num_blocks_per_group=1)
        if order == "offload-first":
            guide = nagkit.apply(pipe, negative_prompt=NEG, scale=5.0, alpha=0.5)
        assert HookRegistry.check_if_exists_or_initialize(pipe.transformer)._hook_order[0] == "nagkit"
        torch.testing.assert_close(run("tiny-flux", pipe), expected, atol=1e-6, rtol=1e-6)
        guide.remove()


# sequential CPU offload needs an accelerator (accelerate's meta-device dispatch fails with device="cpu" even
# without nagkit): tests/test_cuda.py::test_cuda_sequential_offload_with_nag
OFFLOADS = ["model", "group-block", "group-leaf", "fp8-storage"]


def _offload(pipe, how: str) -> None:
    cpu = torch.device("cpu")
    if how == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    elif how == "group-block":
        pipe.transformer.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level",
                                              num_blocks_per_group=1)
    elif how == "group-leaf":
        pipe.transformer.enable_group_offload(cpu, offload_device=cpu, offload_type="leaf_level")
    else:
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)


@pytest.mark.parametrize("family", ["tiny-wan", "tiny-flux"])
@pytest.mark.parametrize("how", OFFLOADS)
@pytest.mark.parametrize("order", ["offload-first", "nag-first"])
def test_offload_and_casting_with_nag(family, how, order):
    """Model and group offloading (block and leaf level) and fp8 layerwise casting, on a cross-attention
    and a joint-attention family, installed before or after NAG: the guided run equals NAG without them (casting:
    within fp8 storage error), ``scale=1`` equals them alone, and removing NAG leaves them working."""
    lossy = how == "fp8-storage"
    pipe = fresh(family)
    if order == "nag-first":
        guide = nagkit.apply(pipe, negative_prompt=NEG, scale=5.0, alpha=0.5)
        _offload(pipe, how)
    else:
        _offload(pipe, how)
        guide = nagkit.apply(pipe, negative_prompt=NEG, scale=5.0, alpha=0.5)
    guided = run(family, pipe)
    expected = nag_only(family, scale=5.0, alpha=0.5)
    assert torch.isfinite(guided).all()
    if lossy:
        assert (guided - expected).abs().max() < 0.25 * expected.abs().max()
    else:
        torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-5)
    guide.update(scale=1.0)
    alone = run(family, pipe)
    guide.remove()
    assert torch.equal(run(family, pipe), alone)
    if not lossy:
        torch.testing.assert_close(alone, plain(family), atol=1e-5, rtol=1e-5)
    assert not torch.equal(alone, guided)


# ---------------------------------------------------------------------------------------------------- bare denoiser
def test_bare_denoiser_loop_with_contexts_and_a_closing_window():
    """A hand-written loop (no pipeline) with ``cache_context`` and FirstBlockCache: when the window closes, the
    "cond" state built on the guided layout is dropped, so the first plain call computes every block (exactly the
    plain model) instead of adding a tail residual of the other text length."""
    model = fresh("tiny-flux").transformer
    g = torch.Generator().manual_seed(0)
    li, lt, dim, pooled = 16, 6, model.config.joint_attention_dim, model.config.pooled_projection_dim
    x = torch.randn(1, li, model.config.in_channels, generator=g)
    text, neg_text = torch.randn(1, lt, dim, generator=g), torch.randn(1, lt, dim, generator=g)
    pool = torch.randn(1, pooled, generator=g)
    negative = {"encoder_hidden_states": torch.randn(1, 4, dim, generator=g),
                "pooled_projections": torch.randn(1, pooled, generator=g)}
    common = dict(pooled_projections=pool, img_ids=torch.zeros(li, 3), txt_ids=torch.zeros(lt, 3), return_dict=False)
    with torch.no_grad():
        reference = model(x, encoder_hidden_states=text, timestep=torch.tensor([0.3]), **common)[0]
    model.enable_cache(FirstBlockCacheConfig(threshold=100.0))
    outputs = {}
    with torch.no_grad(), nagkit.apply(model, negative=negative, scale=5.0, alpha=0.5, end=0.5) as guide:
        for t in (0.9, 0.7, 0.3, 0.1):  # guided, guided (reused), plain (recomputed), plain (reused)
            with model.cache_context("cond"):
                outputs[t] = model(x, encoder_hidden_states=text, timestep=torch.tensor([t]), **common)[0]
            with model.cache_context("uncond"):
                model(x, encoder_hidden_states=neg_text, timestep=torch.tensor([t]), **common)
        assert guide.state.calls == {"guided": 2, "unguided": 6}
    assert all(torch.isfinite(out).all() for out in outputs.values())
    assert torch.equal(outputs[0.3], reference)
    model._reset_stateful_cache()
    model.disable_cache()


# ---------------------------------------------------------------------------------------------------- helpers
class _Tag(ModelHook):
    """Appends its tag to ``log`` around the call (``new_forward``) or before it (``pre_forward`` only)."""

    def __init__(self, tag: str, log: list, wrap: bool = True) -> None:
        super().__init__()
        self.tag, self.log = tag, log
        if wrap:
            self.new_forward = self._new_forward

    def _new_forward(self, module, *args, **kwargs):
        self.log.append(self.tag)
        return self.fn_ref.original_forward(*args, **kwargs)

    def pre_forward(self, module, *args, **kwargs):
        self.log.append(f"pre:{self.tag}")
        return args, kwargs


class _Lin(torch.nn.Linear):
    def forward(self, x, scale: float = 1.0):  # a signature of its own, to see it survive the rewiring
        return super().forward(x) * scale


@pytest.mark.parametrize("wrap_old", [True, False], ids=["new_forward", "pre_forward-only"])
def test_register_innermost_runs_inside_every_existing_hook(wrap_old):
    module, log = _Lin(2, 2), []
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(_Tag("a", log, wrap_old), "a")
    registry.register_hook(_Tag("b", log, wrap_old), "b")
    register_innermost(module, _Tag("nag", log), "nag")
    register_innermost(module, _Tag("nag2", log), "nag2")
    assert registry._hook_order == ["nag2", "nag", "a", "b"]
    module(torch.ones(1, 2))
    outer = ["pre:b", "b", "pre:a", "a"] if wrap_old else ["pre:b", "pre:a"]
    assert log == [*outer, "pre:nag", "nag", "pre:nag2", "nag2"]
    assert list(inspect.signature(module.forward).parameters) == ["x", "scale"]
    with pytest.raises(ValueError, match="already registered"):
        register_innermost(module, _Tag("nag", log), "nag")


def test_register_innermost_on_a_module_without_registry():
    module, log = _Lin(2, 2), []
    register_innermost(module, _Tag("nag", log), "nag")
    assert module._diffusers_hook._hook_order == ["nag"]
    module(torch.ones(1, 2))
    assert log == ["pre:nag", "nag"]


@pytest.mark.parametrize("position", [0, 1, 2])
def test_remove_hook_safely_keeps_every_other_hook(position):
    module, log = _Lin(2, 2), []
    registry = HookRegistry.check_if_exists_or_initialize(module)
    for tag in ("x", "y", "z"):
        registry.register_hook(_Tag(tag, log), tag)
    removed = "xyz"[position]
    assert remove_hook_safely(module, removed)
    assert not remove_hook_safely(module, removed)
    module(torch.ones(1, 2))
    kept = [t for t in "zyx" if t != removed]
    assert log == [s for t in kept for s in (f"pre:{t}", t)]
    assert list(inspect.signature(module.forward).parameters) == ["x", "scale"]


def test_diffusers_remove_hook_drops_the_next_new_forward():
    """Why :func:`remove_hook_safely` exists (diffusers 0.42.1): if this starts failing, diffusers fixed it."""
    module, log = _Lin(2, 2), []
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(_Tag("inner", log), "inner")
    registry.register_hook(_Tag("outer", log), "outer")
    registry.remove_hook("inner", recurse=False)
    module(torch.ones(1, 2))
    assert log == ["pre:outer"]  # the outer hook's new_forward is gone


@pytest.mark.parametrize("had_forward", [False, True])
def test_remove_hook_safely_restores_forward_and_registry_from_the_record(had_forward):
    module, log = _Lin(2, 2), []
    own = (lambda x, scale=1.0: x) if had_forward else None
    if had_forward:
        module.forward = own
    record = {"had_forward": had_forward, "forward": own, "created_registry": True}
    register_innermost(module, _Tag("nag", log), "nag")
    other = _Tag("cache", log)
    module._diffusers_hook.register_hook(other, "cache")
    remove_hook_safely(module, "nag", record)  # the cache stays: forward and registry untouched
    assert module._diffusers_hook._hook_order == ["cache"]
    module(torch.ones(1, 2))
    assert log == ["pre:cache", "cache"]
    remove_hook_safely(module, "cache", record)  # the last one out restores everything
    assert not hasattr(module, "_diffusers_hook")
    assert module.__dict__.get("forward") is own and ("forward" in module.__dict__) == had_forward


def test_remove_hook_safely_without_a_record_drops_the_bound_forward():
    module = _Lin(2, 2)
    register_innermost(module, _Tag("nag", []), "nag")
    remove_hook_safely(module, "nag")
    assert "forward" not in module.__dict__ and module._diffusers_hook.hooks == {}


def test_layout_tracker():
    tracker = LayoutTracker()
    assert not tracker.update("cond", "guided")  # first call: nothing cached yet
    assert not tracker.update("cond", "guided")
    change = tracker.update("uncond", None)  # another context, another layout: shared states only
    assert change and not change.in_context and change.since_last_call
    change = tracker.update("cond", "guided")
    assert change and not change.in_context
    change = tracker.update("cond", None)  # the window closed
    assert change.in_context and change.since_last_call
    assert not tracker.update("uncond", None)
    tracker.reset()
    assert not tracker.update("cond", "guided")


def test_invalidate_caches_drops_only_the_current_context():
    model = fresh("tiny-flux").transformer
    model.enable_cache(FirstBlockCacheConfig(threshold=100.0))
    manager = model.transformer_blocks[0]._diffusers_hook.hooks["fbc_leader_block_hook"].state_manager
    for name in ("cond", "uncond"):
        manager.set_context(CacheContext(name))
        manager.get_state().head_block_residual = torch.ones(1)
    manager.set_context(CacheContext("cond"))
    assert invalidate_caches(model, "cond", shared=False) == ["transformer_blocks.0:fbc_leader_block_hook"]
    assert set(manager._state_cache) == {"uncond"} and manager._context.name == "cond"
    assert invalidate_caches(model, "cond", contextual=False) == []  # nothing shared in FirstBlockCache
    model.disable_cache()


@pytest.mark.parametrize("family", ["tiny-flux", "tiny-wan"])
def test_magcache_calibration_with_nag(family, capsys):
    """Calibration never skips: with NAG it is exactly NAG, and the ratios are printed."""
    nag = {"scale": 5.0, "alpha": 0.5, "end": WINDOW_END[family]}
    pipe = fresh(family)
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    with nagkit.apply(pipe, negative_prompt=NEG, **nag):
        out = run(family, pipe)
    assert torch.equal(out, nag_only(family, **nag))
    assert "Calibration Complete" in capsys.readouterr().out


def test_fullgraph_compile_with_alternating_layouts():
    """Without a foreign cache nothing is invalidated while compiling: guided and plain calls alternating (true CFG's
    "cond" / "uncond") still trace without a graph break."""
    model = fresh("tiny-wan").transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, model.config.in_channels, 2, 4, 4, generator=g)
    text = torch.randn(1, 9, model.config.text_dim, generator=g)
    negative = {"encoder_hidden_states": torch.randn(1, 6, model.config.text_dim, generator=g)}
    t = torch.tensor([700.0])
    try:
        with torch.no_grad(), nagkit.apply(model, negative=negative, scale=5.0, alpha=0.5) as guide:
            eager = {}
            for name in ("cond", "uncond"):
                with model.cache_context(name):
                    eager[name] = model(x, t, text, return_dict=False)[0]
            compiled = torch.compile(model, fullgraph=True, backend="eager")
            for _ in range(2):
                for name in ("cond", "uncond"):
                    with model.cache_context(name):
                        torch.testing.assert_close(compiled(x, t, text, return_dict=False)[0], eager[name])
            assert guide.state.calls == {"guided": 3, "unguided": 3}
    finally:
        torch._dynamo.reset()
