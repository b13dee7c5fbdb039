"""LTX-2 / LTX-2.3 (``LTX2VideoTransformer3DModel``, video + audio): nagkit vs an independent doubled-batch reference
on both text cross-attentions (``attn2`` video, ``audio_attn2`` audio; LTX-2.3 gated: NAG before the gate), CFG rows,
masks, per-sample negatives, identities, window, removal, refusal of a missing audio negative. Pipelines:
``test_ltx2_pipelines.py``."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import LTX2VideoTransformer3DModel

import nagkit

SCALE, TAU, ALPHA = 4.0, 1.5, 0.5
FR, H, W, TA = 2, 4, 4, 6  # latent frames, height, width; audio tokens


def make(v23: bool) -> LTX2VideoTransformer3DModel:
    torch.manual_seed(0)
    kw = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
              audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=8,
              audio_cross_attention_dim=16, num_layers=1, caption_channels=16)
    if v23:  # LTX-2.3: per-head gated attention, text K/V modulation, no caption projection
        kw.update(gated_attn=True, audio_gated_attn=True, cross_attn_mod=True, audio_cross_attn_mod=True,
                  use_prompt_embeddings=False)
    model = LTX2VideoTransformer3DModel(**kw).eval()
    if v23:  # zero-initialised gates would be all ones: make them matter
        for block in model.transformer_blocks:
            for attn in (block.attn2, block.audio_attn2):
                torch.nn.init.normal_(attn.to_gate_logits.weight, std=0.5)
    return model


def ref_nag(zp, zn):
    zt = SCALE * zp - (SCALE - 1) * zn
    ratio = zt.abs().sum(-1, keepdim=True) / zp.abs().sum(-1, keepdim=True)
    zh = zt * torch.clamp(ratio, max=TAU) / ratio
    return ALPHA * zh + (1 - ALPHA) * zp


class DoubledRef:
    """Text cross-attention on ``[prompt rows | negative rows]``; both halves get NAG(Z+, Z-) (pre-gate)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
                 key_rotary_emb=None):
        b = hidden_states.shape[0]
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        k = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        v = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask[:, None]).transpose(1, 2).flatten(2)
        z = torch.cat([ref_nag(z[: b // 2], z[b // 2:])] * 2)
        if attn.to_gate_logits is not None:
            gate = 2.0 * torch.sigmoid(attn.to_gate_logits(hidden_states))
            z = (z.unflatten(2, (attn.heads, -1)) * gate.unsqueeze(-1)).flatten(2)
        return attn.to_out[0](z)


def run(model, inputs, **changes):
    with torch.no_grad():
        return torch.cat(model(**{**inputs, **changes}, return_dict=False), dim=1)  # [video | audio] tokens


def _pad(x, length):
    return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])], dim=1)


def reference(model, inputs, negative):
    big = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    for text, mask in (("encoder_hidden_states", "encoder_attention_mask"),
                       ("audio_encoder_hidden_states", "audio_encoder_attention_mask")):
        length = max(inputs[text].shape[1], negative[text].shape[1])  # masked padding: exact
        big[text] = torch.cat([_pad(inputs[text], length), _pad(negative[text], length)])
        big[mask] = torch.cat([_pad(inputs[mask], length), _pad(negative[mask], length)])
    mods = {n: m for n, m in model.named_modules() if n.endswith("attn2")}
    originals = {n: m.processor for n, m in mods.items()}
    try:
        for m in mods.values():
            m.set_processor(DoubledRef())
        return run(model, big)[: inputs["hidden_states"].shape[0]]
    finally:
        for n, m in mods.items():
            m.set_processor(originals[n])


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    b, lt = 2, 7
    mask = torch.ones(b, lt, dtype=torch.long)
    mask[0, 5:] = 0
    amask = torch.ones(b, lt, dtype=torch.long)
    amask[1, 4:] = 0
    inputs = dict(hidden_states=torch.randn(b, FR * H * W, 8, generator=g),
                  audio_hidden_states=torch.randn(b, TA, 8, generator=g),
                  encoder_hidden_states=torch.randn(b, lt, 16, generator=g),
                  audio_encoder_hidden_states=torch.randn(b, lt, 16, generator=g),
                  timestep=torch.tensor([700.0, 700.0]), sigma=torch.tensor([0.7, 0.7]),
                  encoder_attention_mask=mask, audio_encoder_attention_mask=amask,
                  num_frames=FR, height=H, width=W, audio_num_frames=TA)
    nmask = torch.ones(b, 5, dtype=torch.long)
    nmask[1, 3:] = 0
    namask = torch.ones(b, 5, dtype=torch.long)
    namask[0, 2:] = 0
    negative = {"encoder_hidden_states": torch.randn(b, 5, 16, generator=g), "encoder_attention_mask": nmask,
                "audio_encoder_hidden_states": torch.randn(b, 5, 16, generator=g),
                "audio_encoder_attention_mask": namask}
    return inputs, negative


@pytest.fixture(scope="module", params=[False, True], ids=["ltx2.0", "ltx2.3-gated"])
def ltx2(request):
    return (make(request.param), *data())


def test_matches_reference_both_streams(ltx2):
    model, inputs, negative = ltx2
    base = run(model, inputs)
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, inputs)
        assert guide.state.calls["guided"] == 1
    nv = FR * H * W
    assert (out[:, :nv] - base[:, :nv]).abs().max() > 1e-3  # video stream guided
    assert (out[:, nv:] - base[:, nv:]).abs().max() > 1e-3  # audio stream guided
    torch.testing.assert_close(out, reference(model, inputs, negative), atol=1e-5, rtol=1e-5)


def test_audio_negative_alone_changes_the_audio_attention(ltx2):
    """The audio cross-attention really uses the negative's audio text (not the video one)."""
    model, inputs, negative = ltx2
    other = {**negative, "audio_encoder_hidden_states": negative["audio_encoder_hidden_states"] + 1.0}
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA):
        a = run(model, inputs)
    with nagkit.apply(model, negative=other, scale=SCALE, tau=TAU, alpha=ALPHA):
        b = run(model, inputs)
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(b, reference(model, inputs, other), atol=1e-5, rtol=1e-5)


def test_cfg_rows(ltx2):
    model, inputs, negative = ltx2
    g = torch.Generator().manual_seed(3)
    big = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    for key in ("encoder_hidden_states", "audio_encoder_hidden_states"):
        big[key] = torch.cat([torch.randn(inputs[key].shape, generator=g), inputs[key]])
    plain = run(model, big)
    with nagkit.apply(model, negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, big)
        assert guide.state.last_packing.rows == slice(2, 4)
    assert torch.equal(out[:2], plain[:2])
    torch.testing.assert_close(out[2:], reference(model, inputs, negative), atol=1e-5, rtol=1e-5)


def test_identities_window_and_removal(ltx2):
    model, inputs, negative = ltx2
    base = run(model, inputs)
    before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    same = {k: inputs[k] for k in ("encoder_hidden_states", "encoder_attention_mask", "audio_encoder_hidden_states",
                                   "audio_encoder_attention_mask")}
    with nagkit.apply(model, negative=same, scale=SCALE, tau=TAU, alpha=ALPHA):
        torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
    guide = nagkit.apply(model, negative=negative, scale=1.0)
    assert torch.equal(run(model, inputs), base)
    guide.update(scale=SCALE, alpha=0.0)
    torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
    guide.update(alpha=ALPHA, start=0.5)  # u = 0.3: outside
    assert torch.equal(run(model, inputs), base)
    guide.update(start=0.0, end=0.5)
    assert not torch.equal(run(model, inputs), base)
    guide.remove()
    after = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert all(before[k] is after[k] for k in before)
    assert torch.equal(run(model, inputs), base)


def test_refusals(ltx2):
    model, inputs, negative = ltx2
    video_only = {k: negative[k] for k in ("encoder_hidden_states", "encoder_attention_mask")}
    with nagkit.apply(model, negative=video_only) as guide:
        with pytest.raises(ValueError, match="audio_attn2.*audio_encoder_hidden_states"):
            run(model, inputs)
    assert guide.state.packing is None
