"""Model-level NAG on each cross-attention family, against the plain reference (tests/reference.py)."""

from __future__ import annotations

import inspect

import pytest
import torch

import nagkit
from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES, tiny_condition_image

from .reference import reference_forward, text_attention_modules

# name -> (tiny pipeline, denoiser attribute, text mask argument or None, has image context (Wan I2V))
FAMILIES = {
    "sd15": ("tiny-sd15", "unet", "encoder_attention_mask", 0),
    "sdxl": ("tiny-sdxl", "unet", "encoder_attention_mask", 0),
    "wan": ("tiny-wan", "transformer", None, 0),
    "wan-i2v": ("tiny-wan-i2v", "transformer", None, 1),
    "pixart": ("tiny-pixart-sigma", "transformer", "encoder_attention_mask", 0),
    "sana": ("tiny-sana", "transformer", "encoder_attention_mask", 0),
}
SCALE, TAU, ALPHA = 4.0, 1.5, 0.5


class _Stop(Exception):
    pass


def _denoiser_inputs(pipe, denoiser, name):
    """Capture the real arguments of the denoiser's first call in a 2-prompt pipeline run without CFG."""
    seen = {}

    def grab(module, args, kwargs):
        bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
        seen.update({k: v for k, v in bound.arguments.items() if k != "self"})
        seen.update(seen.pop("kwargs", {}))
        raise _Stop

    handle = denoiser.register_forward_pre_hook(grab, with_kwargs=True)
    call = dict(TINY_CALL_KWARGS[name], num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    if name == "tiny-wan-i2v":
        call["image"] = tiny_condition_image()
    try:
        with pytest.raises(_Stop):
            pipe(prompt=["a red cat on a table", "a blue dog in the snow"], **call)
    finally:
        handle.remove()
    seen["return_dict"] = False
    return seen


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    pipe_name, attr, mask_arg, n_image = FAMILIES[request.param]
    pipe = TINY_PIPELINES[pipe_name](seed=0)
    model = getattr(pipe, attr)
    inputs = _denoiser_inputs(pipe, model, pipe_name)
    if n_image:
        n_image = inputs["encoder_hidden_states_image"].shape[1]
    text = inputs["encoder_hidden_states"]
    lp = text.shape[1]
    ln = lp if n_image else max(lp - 3, 2)  # the stock Wan I2V processor only runs with a 512-token text
    g = torch.Generator().manual_seed(1)
    negative = {"encoder_hidden_states": torch.randn(text.shape[0], ln, text.shape[2], generator=g)}
    if mask_arg is not None:
        mask = torch.ones(text.shape[0], ln, dtype=torch.long)
        mask[:, -2:] = 0
        negative[mask_arg] = mask
    return request.param, model, inputs, negative, mask_arg, n_image


def run(model, inputs, **changes):
    with torch.no_grad():
        return model(**{**inputs, **changes})[0]


def test_matches_reference(family):
    name, model, inputs, negative, mask_arg, n_image = family
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA):
        out = run(model, inputs)
    ref = reference_forward(model, inputs, negative, SCALE, TAU, ALPHA, mask_arg=mask_arg, n_image=n_image)[0]
    base = run(model, inputs)
    assert (out - base).abs().max() > 1e-3, "NAG must change the output"
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_identities(family):
    name, model, inputs, negative, mask_arg, _ = family
    base = run(model, inputs)
    with nagkit.apply(model, negative=negative, scale=1.0, tau=TAU, alpha=ALPHA) as guide:
        assert torch.equal(run(model, inputs), base)
        guide.update(scale=SCALE, alpha=0.0)
        assert torch.equal(run(model, inputs), base)
        same = {"encoder_hidden_states": inputs["encoder_hidden_states"]}
        if mask_arg is not None and inputs.get(mask_arg) is not None:
            same[mask_arg] = inputs[mask_arg]
        guide.update(negative=same, alpha=ALPHA)
        torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
        assert guide.state.calls["guided"] == 1


def test_remove_restores_exactly(family):
    name, model, inputs, negative, _, _ = family
    base = run(model, inputs)
    before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    had_registry = hasattr(model, "_diffusers_hook")  # pipelines create an empty one through cache_context
    guide = nagkit.apply(model, negative=negative, scale=SCALE)
    modules = text_attention_modules(model)
    assert all(m.processor is before[n] for n, m in modules.items())  # between calls: the model's own processors
    seen = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, m.processor) and None)
               for n, m in modules.items()]
    run(model, inputs)
    for h in handles:
        h.remove()
    assert all(isinstance(seen[n], nagkit.adapters.NAGProcessor) and seen[n].inner is before[n] for n in modules)
    assert all(m.processor is before[n] for n, m in modules.items())
    guide.remove()
    after = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert all(before[n] is after[n] for n in before)
    assert "forward" not in model.__dict__ and hasattr(model, "_diffusers_hook") == had_registry
    assert not hasattr(model, "_nagkit_guide")
    assert torch.equal(run(model, inputs), base)
    guide.remove()  # idempotent


def test_per_sample_negatives_equal_single_runs(family):
    name, model, inputs, negative, mask_arg, _ = family
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA):
        both = run(model, inputs)
    for i in range(2):
        one = {k: _row(v, i) for k, v in inputs.items()}
        neg = {k: v[i:i + 1] for k, v in negative.items()}
        with nagkit.apply(model, negative=neg, scale=SCALE, tau=TAU, alpha=ALPHA):
            torch.testing.assert_close(run(model, one), both[i:i + 1], atol=1e-5, rtol=1e-5)


def _row(v, i):
    if isinstance(v, dict):
        return {k: _row(x, i) for k, x in v.items()}
    return v[i:i + 1] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == 2 else v


def test_broadcast_negative_and_batched_cfg_rows(family):
    name, model, inputs, negative, _, _ = family
    one = {k: v[:1] for k, v in negative.items()}
    tiled = {k: torch.cat([v, v]) for k, v in one.items()}
    with nagkit.apply(model, negative=one, scale=SCALE, tau=TAU, alpha=ALPHA):
        a = run(model, inputs)
    with nagkit.apply(model, negative=tiled, scale=SCALE, tau=TAU, alpha=ALPHA):
        b = run(model, inputs)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_window_outside_is_base(family):
    name, model, inputs, negative, _, _ = family
    base = run(model, inputs)
    t = float(inputs["timestep"].float().max())
    position = 1 - t / 1000
    with nagkit.apply(model, negative=negative, scale=SCALE, start=min(position + 0.1, 1.0), end=1.0) as guide:
        assert torch.equal(run(model, inputs), base)
        assert guide.state.calls == {"guided": 0, "unguided": 1}
        guide.update(start=0.0, end=min(position + 0.01, 1.0))
        assert not torch.equal(run(model, inputs), base)
