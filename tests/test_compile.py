"""torch.compile of a guided denoiser: whole model, fullgraph (no graph break), same output as eager."""

import torch

import nagkit
from nagkit.tiny.pipelines import TINY_PIPELINES

from .test_host import flux_call


def test_compiled_denoiser_fullgraph_matches_eager():
    pipe = TINY_PIPELINES["tiny-wan"](seed=0)
    model = pipe.transformer
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, 2, 4, 4, generator=g)
    text = torch.randn(2, 9, cfg.text_dim, generator=g)
    negative = {"encoder_hidden_states": torch.randn(2, 6, cfg.text_dim, generator=g)}
    t = torch.tensor([700.0, 700.0])
    with torch.no_grad(), nagkit.apply(model, negative=negative, scale=5.0, tau=2.5, alpha=0.5) as guide:
        eager = model(x, t, text, return_dict=False)[0]
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(x, t, text, return_dict=False)[0]
        assert guide.state.calls["guided"] == 2
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_regional_compile_of_flux_blocks_fullgraph():
    pipe = TINY_PIPELINES["tiny-flux"](seed=0)
    model = pipe.transformer
    inputs, negative = flux_call(model)
    with torch.no_grad(), nagkit.apply(model, negative=negative, scale=5.0, alpha=0.5):
        eager = model(**inputs)[0]
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        try:
            compiled = model(**inputs)[0]
        finally:
            for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
                block._compiled_call_impl = None
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
