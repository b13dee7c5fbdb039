"""SANA-Video: NAG on the masked text cross-attention (padding dropped), against tests/reference.py (two full
attentions per layer, literal paper formula); CFG rows, masks, per-sample negatives, I2V, identities, removal, CLI."""

from __future__ import annotations

import pytest
import torch
from diffusers import SanaVideoTransformer3DModel

import nagkit
from nagkit.cli.main import main
from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES
from tests.reference import reference_forward

S, TAU, A = 4.0, 2.5, 0.5
MASK = "encoder_attention_mask"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SanaVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                       num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                       cross_attention_dim=16, caption_channels=16, sample_size=8,
                                       patch_size=(1, 2, 2), rope_max_seq_len=32).eval()


@pytest.fixture(scope="module")
def tiny():
    return TINY_PIPELINES["tiny-sana-video"](seed=0)


def _inputs(batch=1, text=7, seed=0, keep=None):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text, dtype=torch.long)
    if keep is not None:
        for i, k in enumerate(keep):
            mask[i, k:] = 0
    return {"hidden_states": torch.randn(batch, 4, 2, 4, 4, generator=g), "timestep": torch.tensor([700.0] * batch),
            "encoder_hidden_states": torch.randn(batch, text, 16, generator=g), MASK: mask}


def _negative(batch, length, keep=None, seed=5):
    mask = torch.ones(batch, length, dtype=torch.long)
    if keep is not None:
        for i, k in enumerate(keep):
            mask[i, k:] = 0
    return {"encoder_hidden_states": torch.randn(batch, length, 16, generator=torch.Generator().manual_seed(seed)),
            MASK: mask}


def _guided(model, kwargs, negative, **settings):
    with torch.no_grad(), nagkit.apply(model, negative=negative, **{"scale": S, "tau": TAU, "alpha": A, **settings}):
        return model(**kwargs)[0]


def _plain(model, kwargs):
    with torch.no_grad():
        return model(**kwargs)[0]


@pytest.mark.parametrize("batch,keep,neg_keep,neg_len", [(1, None, None, 7), (2, [7, 4], [3, 5], 9),
                                                        (2, [5, 6], [2, 2], 4)])
def test_matches_reference_with_masks_and_per_sample_negatives(model, batch, keep, neg_keep, neg_len):
    kwargs, negative = _inputs(batch, keep=keep), _negative(batch, neg_len, neg_keep)
    ref = reference_forward(model, kwargs, negative, S, TAU, A, mask_arg=MASK)[0]
    torch.testing.assert_close(_guided(model, kwargs, negative), ref, atol=1e-5, rtol=0)


def test_cfg_rows_unconditional_untouched(tiny):
    """Batched CFG [uncond, cond] through the pipeline-free path: only the rows holding the prompt are guided."""
    pipe = tiny
    call = dict(TINY_CALL_KWARGS["tiny-sana-video"], num_inference_steps=1, output_type="latent", guidance_scale=4.0)
    records = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, o: records.append((a, k, o[0].clone())),
                                                  with_kwargs=True)
    try:
        with nagkit.apply(pipe, negative_prompt="blurry"):
            pipe(prompt="a red cat", generator=torch.Generator().manual_seed(0), **call)
    finally:
        hook.remove()
    (args, kw), out = records[0][:2], records[0][2]
    assert len(records) == 1
    with torch.no_grad():
        plain = pipe.transformer(*args, **kw)[0]
    torch.testing.assert_close(out[0], plain[0], atol=0, rtol=0)  # the unconditional row, bit-identical
    assert (out[1] - plain[1]).abs().max() > 1e-4


def test_identities_window_and_removal(model):
    kwargs, negative = _inputs(2, keep=[7, 5]), _negative(2, 6, [6, 3])
    plain = _plain(model, kwargs)
    before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    torch.testing.assert_close(_guided(model, kwargs, negative, scale=1.0), plain, atol=0, rtol=0)
    torch.testing.assert_close(_guided(model, kwargs, negative, alpha=0.0), plain, atol=1e-5, rtol=0)
    same = {"encoder_hidden_states": kwargs["encoder_hidden_states"], MASK: kwargs[MASK]}
    torch.testing.assert_close(_guided(model, kwargs, same), plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(_guided(model, kwargs, negative, start=0.5), plain, atol=0, rtol=0)  # t=700: 0.3
    assert (_guided(model, kwargs, negative, end=0.5) - plain).abs().max() > 1e-4
    guide = nagkit.apply(model, negative=negative, scale=S)
    with torch.no_grad():
        model(**kwargs)
    guide.remove()
    torch.testing.assert_close(_plain(model, kwargs), plain, atol=0, rtol=0)
    assert before == {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}


def test_i2v_per_frame_timesteps_match_reference(model):
    """SanaImageToVideoPipeline: per-token timesteps, 0 on the conditioning frame (a video latent, never negated)."""
    kwargs, negative = _inputs(2, keep=[7, 4]), _negative(2, 5, [5, 2])
    timestep = torch.full((2, 1, 2, 2, 2), 800.0)  # per token (B, 1, F, H, W), as the pipeline builds it
    timestep[:, :, 0] = 0.0
    kwargs["timestep"] = timestep
    ref = reference_forward(model, kwargs, negative, S, TAU, A, mask_arg=MASK)[0]
    torch.testing.assert_close(_guided(model, kwargs, negative), ref, atol=1e-5, rtol=0)


def test_pipelines_end_to_end_and_refusal(tiny, tmp_path):
    from diffusers import SanaImageToVideoPipeline
    from PIL import Image

    pipe = tiny
    call = dict(TINY_CALL_KWARGS["tiny-sana-video"], num_inference_steps=2, output_type="latent", guidance_scale=1.0)

    def run(p, **extra):
        return p(prompt="a red cat", generator=torch.Generator().manual_seed(0), **call, **extra)[0]

    plain = run(pipe)
    guide = nagkit.apply(pipe, negative_prompt="blurry")
    assert (run(pipe) - plain).abs().max() > 1e-4
    guide.update(scale=1.0)
    torch.testing.assert_close(run(pipe), plain, atol=0, rtol=0)
    guide.remove()
    torch.testing.assert_close(run(pipe), plain, atol=0, rtol=0)

    i2v = SanaImageToVideoPipeline(**pipe.components)
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    plain = run(i2v, image=image)
    with nagkit.apply(i2v, negative_prompt="blurry") as guide:
        assert (run(i2v, image=image) - plain).abs().max() > 1e-4
        assert guide.state.calls["guided"] == 2

    class Other(torch.nn.Module):
        pass

    with pytest.raises(TypeError, match="Other"):
        nagkit.apply(Other(), negative={"encoder_hidden_states": torch.zeros(1, 2, 16)})

    out = tmp_path / "clip.gif"
    assert main(["generate", "tiny-sana-video", "a red cat", "--negative", "blurry", "--steps", "1", "--frames", "5",
                 "--out", str(out), "--quiet"]) == 0
    from PIL import Image as PILImage

    assert PILImage.open(out).n_frames == 5 and out.with_suffix(".json").exists()
