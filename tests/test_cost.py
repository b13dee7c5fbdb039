"""Exact FLOP overhead of NAG on full-size configs (FLUX.1-dev; Sana-1.6B with a short negative): meta device, no
weights, seconds."""

import json
from importlib.resources import files

import pytest
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


def test_sana_short_negative_overhead_target():
    """Sana-1.6B at 1024² (full-size config, meta device): a few-word negative padded to 300 tokens costs only its
    valid tokens (nagkit drops the padding), at most +1 % FLOPs; every one of the 300 tokens counted: +6.1 %."""
    from nagkit.bench import load_families
    from nagkit.bench.flops import SHORT_NEGATIVE_TARGETS, SHORT_NEGATIVE_TOKENS, run_family

    result = run_family(load_families()["sana-1.6b"], short_negative=SHORT_NEGATIVE_TOKENS)
    short = result.short_negative
    assert short is not None and (short.tokens, short.padded_tokens) == (8, 300)
    assert short.nag_padded == result.variants["nag"].overhead
    assert 0.060 < short.nag_padded < 0.063  # +6.12 %: the negative as long as the prompt
    assert short.target == SHORT_NEGATIVE_TARGETS["sana-1.6b"] == 0.01
    assert 0 < short.nag <= 0.01 and short.meets_target  # measured +0.16 %
    assert short.nag == pytest.approx(short.min, abs=1e-12)  # and still the analytic minimum
