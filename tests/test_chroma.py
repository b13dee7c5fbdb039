"""Chroma (Flux-like, text-independent modulation, additive text mask): nagkit vs the doubled-batch reference."""

import pytest
import torch
from diffusers import ChromaTransformer2DModel

import nagkit

from .mmdit_reference import DoubledFluxRef, joint_processors

SCALE, TAU, ALPHA = 4.0, 1.5, 0.5


@pytest.fixture(scope="module")
def chroma():
    torch.manual_seed(0)
    model = ChromaTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1).eval()
    g = torch.Generator().manual_seed(1)
    b, li, lt = 2, 16, 7
    mask = torch.ones(b, lt + li)
    mask[0, 5:lt] = 0  # padding (Chroma keeps the first padding token: the pipeline's rule does that upstream)
    inputs = dict(hidden_states=torch.randn(b, li, 8, generator=g),
                  encoder_hidden_states=torch.randn(b, lt, 16, generator=g), timestep=torch.tensor([0.7, 0.7]),
                  img_ids=torch.randn(li, 3, generator=g), txt_ids=torch.zeros(lt, 3), attention_mask=mask,
                  return_dict=False)
    neg_mask = torch.ones(b, lt)
    neg_mask[1, 4:] = 0
    negative = {"encoder_hidden_states": torch.randn(b, lt, 16, generator=g), "attention_mask": neg_mask}
    return model, inputs, negative


def run(model, inputs, **changes):
    with torch.no_grad():
        return model(**{**inputs, **changes})[0]


def reference(model, inputs, negative):
    lt = inputs["encoder_hidden_states"].shape[1]
    li = inputs["hidden_states"].shape[1]
    big = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim and k not in ("img_ids", "txt_ids") else v)
           for k, v in inputs.items()}
    big["encoder_hidden_states"] = torch.cat([inputs["encoder_hidden_states"], negative["encoder_hidden_states"]])
    neg_joint = torch.cat([negative["attention_mask"], torch.ones(negative["attention_mask"].shape[0], li)], dim=1)
    big["attention_mask"] = torch.cat([inputs["attention_mask"], neg_joint])
    with joint_processors(model, lambda inner: DoubledFluxRef(inner, SCALE, TAU, ALPHA, lt),
                          lambda name, m: name.endswith(".attn")):
        return run(model, big)[: inputs["hidden_states"].shape[0]]


def test_matches_reference_with_masks(chroma):
    model, inputs, negative = chroma
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, inputs)
        assert guide.state.calls["guided"] == 1
    assert (out - run(model, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(out, reference(model, inputs, negative), atol=1e-5, rtol=1e-5)


def test_identities_removal_and_mode(chroma):
    model, inputs, negative = chroma
    base = run(model, inputs)
    lt = inputs["encoder_hidden_states"].shape[1]
    same = {"encoder_hidden_states": inputs["encoder_hidden_states"],
            "attention_mask": inputs["attention_mask"][:, :lt]}
    with nagkit.apply(model, negative=same, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
        guide.update(scale=1.0)
        assert torch.equal(run(model, inputs), base)
    with pytest.raises(ValueError, match="mode='official' is not available for ChromaTransformer2DModel"):
        nagkit.apply(model, negative=negative, scale=SCALE, mode="official")
    with nagkit.apply(model, negative=negative, scale=SCALE) as guide:
        with pytest.raises(ValueError, match="mode='official' is not available"):
            guide.update(mode="official")
    assert torch.equal(run(model, inputs), base)
