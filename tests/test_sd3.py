"""SD3 / SD3.5 (joint attention, image-first): nagkit vs the doubled-batch reference, identities, removal."""

import pytest
import torch
from diffusers import SD3Transformer2DModel

import nagkit

from .mmdit_reference import DoubledJointRef, doubled, joint_processors

SCALE, TAU, ALPHA = 4.0, 1.5, 0.5


@pytest.fixture(scope="module", params=["sd3", "sd35"])
def sd3(request):
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,) if request.param == "sd35" else ()).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 7, 16, generator=g),
                  pooled_projections=torch.randn(2, 12, generator=g), timestep=torch.tensor([700.0, 700.0]),
                  return_dict=False)
    negative = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=g)}
    return model, inputs, negative


def run(model, inputs, **changes):
    with torch.no_grad():
        return model(**{**inputs, **changes})[0]


def reference(model, inputs, negative):
    """Official SD3 algorithm: batch [prompt; negative], positive pooled for both rows, image stream tiled."""
    pos, neg = inputs["encoder_hidden_states"], negative["encoder_hidden_states"]
    big = {k: doubled(v) for k, v in inputs.items()}
    big["encoder_hidden_states"] = torch.cat([pos, neg])  # the batch-doubled form needs equal text lengths
    with joint_processors(model, lambda inner: DoubledJointRef(inner, SCALE, TAU, ALPHA),
                          lambda name, m: getattr(m, "add_q_proj", None) is not None):
        return run(model, big)[: pos.shape[0]]


def test_matches_official_algorithm(sd3):
    model, inputs, negative = sd3
    neg = {"encoder_hidden_states": torch.randn_like(inputs["encoder_hidden_states"])}
    with nagkit.apply(model, negative=neg, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, inputs)
        assert guide.state.calls["guided"] == 1
    base = run(model, inputs)
    assert (out - base).abs().max() > 1e-3
    torch.testing.assert_close(out, reference(model, inputs, neg), atol=1e-5, rtol=1e-5)


def test_identities_and_removal(sd3):
    model, inputs, negative = sd3
    base = run(model, inputs)
    procs = dict(model.attn_processors)
    with nagkit.apply(model, negative=negative, scale=1.0) as guide:
        assert torch.equal(run(model, inputs), base)
        guide.update(negative={"encoder_hidden_states": inputs["encoder_hidden_states"]}, scale=SCALE, alpha=ALPHA)
        torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
        guide.update(negative=negative)  # a shorter negative (5 tokens vs 7)
        assert (run(model, inputs) - base).abs().max() > 1e-3
    assert all(procs[k] is v for k, v in model.attn_processors.items())
    assert torch.equal(run(model, inputs), base)
    if model.config.dual_attention_layers:  # SD3.5's image-only attn2 is never replaced
        assert type(model.transformer_blocks[0].attn2.processor).__name__ == "JointAttnProcessor2_0"


def test_lse_path_equals_two_full_attentions(sd3):
    model, inputs, negative = sd3
    from nagkit.kernels.joint import force_two_attentions

    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA):
        fast = run(model, inputs)
        with force_two_attentions():
            plain = run(model, inputs)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def test_cfg_rows(sd3):
    model, inputs, negative = sd3
    cfg = {k: doubled(v) for k, v in inputs.items()}  # batched CFG: [uncond (2 rows), cond (2 rows)]
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, cfg)
        assert guide.state.last_packing.rows == slice(2, 4)
    base = run(model, cfg)
    torch.testing.assert_close(out[:2], base[:2], atol=1e-6, rtol=1e-6)
    assert (out[2:] - base[2:]).abs().max() > 1e-3
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA):
        torch.testing.assert_close(out[2:], run(model, inputs), atol=1e-5, rtol=1e-5)
