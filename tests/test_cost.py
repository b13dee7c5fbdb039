"""Exact FLOP overhead of NAG on a full-size FLUX.1-dev config (meta device, no weights, seconds)."""

import json
from importlib.resources import files

import torch
from diffusers import FluxTransformer2DModel

import nagkit
from nagkit.bench.flops import count_flops, ensure_cpu_attention_formula


def test_flux_dev_fast_overhead_target():
    ensure_cpu_attention_formula()  # the CPU flash kernel (LSE path) has no FLOP formula of its own
    cfg = json.loads(files("nagkit.bench").joinpath("configs/flux1-dev.json").read_text())["config"]
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg).to(torch.bfloat16)

    def t(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

    li, lt = 4096, 512  # 1024², 512-token T5
    inputs = dict(hidden_states=t(1, li, 64), encoder_hidden_states=t(1, lt, 4096), pooled_projections=t(1, 768),
                  timestep=t(1), guidance=t(1), img_ids=t(li, 3), txt_ids=t(lt, 3), return_dict=False)
    negative = {"encoder_hidden_states": t(1, lt, 4096), "pooled_projections": t(1, 768)}
    with torch.no_grad():
        base = count_flops(lambda: model(**inputs))
        with nagkit.apply(model, negative=negative, scale=5.0):
            fast = count_flops(lambda: model(**inputs))
        with nagkit.apply(model, negative={**negative, "encoder_hidden_states": t(1, 128, 4096)}, scale=5.0):
            short = count_flops(lambda: model(**inputs))
    assert 74e12 < base < 75e12  # 74.4 TFLOPs per step, attention included
    assert fast / base - 1 <= 0.15  # target: <= +15 % (measured +13.1 %)
    assert short / base - 1 <= 0.05  # a 128-token negative: +3.2 %
    assert fast > base and short > base
