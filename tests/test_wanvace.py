"""Wan VACE (NAG on the main and the VACE control blocks' text cross-attention) and WanVideoToVideoPipeline (Wan
Animate: tests/test_wananimate.py); reference in tests/reference.py (two full attentions per guided layer, literal
paper formula)."""

from __future__ import annotations

import pytest
import torch

import nagkit
from nagkit.adapters.wan import NAGWanAttnProcessor
from nagkit.adapters.wanvace import _ensure_prompt_clean
from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES
from tests.reference import reference_forward

S, TAU, A = 4.0, 2.5, 0.5


@pytest.fixture(scope="module")
def tiny():
    return TINY_PIPELINES["tiny-wan-vace"](seed=0)


def _inputs(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 16, 2, 4, 4, generator=g), "timestep": torch.tensor([900.0] * batch),
            "encoder_hidden_states": torch.randn(batch, 7, 16, generator=g),
            "control_hidden_states": torch.randn(batch, 96, 2, 4, 4, generator=g),
            "control_hidden_states_scale": torch.tensor([1.0, 0.7])}


def _guided(model, kwargs, negative, **settings):
    with torch.no_grad(), nagkit.apply(model, negative=negative, **{"scale": S, "tau": TAU, "alpha": A, **settings}):
        return model(**kwargs)[0]


@pytest.mark.parametrize("batch,neg_len", [(1, 7), (2, 11)])
def test_matches_reference_on_main_and_vace_blocks(tiny, batch, neg_len):
    model = tiny.transformer
    kwargs = _inputs(batch)
    negative = {"encoder_hidden_states": torch.randn(batch, neg_len, 16, generator=torch.Generator().manual_seed(8))}
    ref = reference_forward(model, kwargs, negative, S, TAU, A)[0]  # guides every attn2, vace_blocks' included
    torch.testing.assert_close(_guided(model, kwargs, negative), ref, atol=1e-5, rtol=0)


def test_vace_blocks_get_the_nag_processor(tiny):
    """During a guided call every attn2 (main and VACE control blocks) runs the packing-aware NAG processor."""
    model = tiny.transformer
    attn2 = {n: m for n, m in model.named_modules() if n.endswith("attn2")}
    assert sorted(attn2) == ["blocks.0.attn2", "blocks.1.attn2", "vace_blocks.0.attn2", "vace_blocks.1.attn2"]
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, type(mod.processor)))
             for n, m in attn2.items()]
    try:
        with nagkit.apply(model, negative={"encoder_hidden_states": torch.zeros(1, 3, 16)}), torch.no_grad():
            model(**_inputs())
    finally:
        for h in hooks:
            h.remove()
    assert set(seen) == set(attn2) and all(issubclass(c, NAGWanAttnProcessor) for c in seen.values())
    assert {type(m.processor).__name__ for m in attn2.values()} == {"WanAttnProcessor"}  # restored after the call


def test_identities_window_removal(tiny):
    model = tiny.transformer
    kwargs = _inputs(2)
    negative = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))}
    with torch.no_grad():
        plain = model(**kwargs)[0]
    before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    torch.testing.assert_close(_guided(model, kwargs, negative, scale=1.0), plain, atol=0, rtol=0)
    torch.testing.assert_close(_guided(model, kwargs, negative, alpha=0.0), plain, atol=1e-5, rtol=0)
    same = {"encoder_hidden_states": kwargs["encoder_hidden_states"]}
    torch.testing.assert_close(_guided(model, kwargs, same), plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(_guided(model, kwargs, negative, start=0.5), plain, atol=0, rtol=0)  # t=900: 0.1
    assert (_guided(model, kwargs, negative, end=0.5) - plain).abs().max() > 1e-4
    with torch.no_grad():
        assert torch.equal(model(**kwargs)[0], plain)
    assert before == {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}


def test_pipeline_cfg_identity_removal(tiny):
    pipe = tiny
    call = dict(TINY_CALL_KWARGS["tiny-wan-vace"], num_inference_steps=2, output_type="latent")

    def run(guidance):
        return pipe(prompt="a red cat", generator=torch.Generator().manual_seed(0), guidance_scale=guidance,
                    **call)[0]

    plain = run(1.0)
    records = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: records.append((a, k, o[0].clone())),
                                                  with_kwargs=True)
    try:
        with nagkit.apply(pipe, negative_prompt="blurry") as guide:
            run(4.0)
            assert guide.state.calls == {"guided": 2, "unguided": 2}
            guide.update(scale=1.0)
            torch.testing.assert_close(run(1.0), plain, atol=0, rtol=0)
    finally:
        hook.remove()
    # the conditional calls are guided, the unconditional ones (every second call) bit-identical to the plain model
    for args, kwargs, out in records[0:4:2]:
        with torch.no_grad():
            assert (pipe.transformer(*args, **kwargs)[0] - out).abs().max() > 1e-4
    for args, kwargs, out in records[1:4:2]:
        with torch.no_grad():
            assert torch.equal(pipe.transformer(*args, **kwargs)[0], out)
    torch.testing.assert_close(run(1.0), plain, atol=0, rtol=0)


def test_video_to_video_pipeline(tiny):
    from diffusers import WanVideoToVideoPipeline
    from PIL import Image

    from nagkit.adapters.wan import _tiny_wan_transformer

    _ensure_prompt_clean("diffusers.pipelines.wan.pipeline_wan_video2video")
    pipe = WanVideoToVideoPipeline(tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder,
                                   transformer=_tiny_wan_transformer(0, text_dim=16), vae=tiny.vae,
                                   scheduler=tiny.scheduler)
    video = [Image.new("RGB", (32, 32), (40 * i, 90, 200)) for i in range(5)]

    def run():
        return pipe(video=video, prompt="a red cat", height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                    strength=0.8, output_type="latent", generator=torch.Generator().manual_seed(0))[0]

    plain = run()
    with nagkit.apply(pipe, negative_prompt="blurry") as guide:
        assert (run() - plain).abs().max() > 1e-4 and guide.state.calls["guided"] >= 1
    torch.testing.assert_close(run(), plain, atol=0, rtol=0)

