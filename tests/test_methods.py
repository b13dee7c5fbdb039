"""Experimental competing methods on nagkit's mechanism: NASA (``Z+ − φ·Z-``) and VSF (Value Sign Flip: the negative's
keys in the prompt's softmax with values ``× −β`` and logits ``− offset``), against plain references written here.

References (independent of nagkit's kernels, hooks and packing):

* FLUX (joint attention, double + single blocks): the whole forward written out with explicit softmax attention over
  per-segment projections. NASA: two full attentions per layer for the image queries (``[Tp, I]`` and ``[Tn, I]``).
  VSF: one attention over ``[Tp, I, Tn]`` with the negative's values times ``−β`` and ``−offset`` on its logits.
  The negative's text evolves as its own stream (queries ``[Tn, I]``, the negative's pooled modulation), the prompt's
  text sees ``[Tp, I]``: the same structure as NAG's reference (tests/mmdit_reference.py).
* Wan and the SD1.5 UNet (cross-attention): the model's own attention processors, called on the recorded negative
  context (NASA: two calls), or once on ``[prompt | negative]`` context with ``to_v`` of the negative's tokens times
  ``−β`` and an additive ``−offset`` mask on them (VSF).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from diffusers.models.embeddings import apply_rotary_emb

import nagkit
from nagkit.adapters.wan import _tiny_wan_transformer
from nagkit.core.config import METHOD_DEFAULTS, NAGConfig, get_preset
from nagkit.core.state import Packing
from nagkit.kernels.cross import nag_cross_attention
from nagkit.kernels.joint import force_two_attentions, nag_joint_attention

from .reference import Capture, processors, swapped

PHI, BETA, OFFSET = 0.7, 2.0, 0.3


# ----------------------------------------------------------------------------------------------- plain math
def softmax_attention(q, k, v, bias=None):
    """``softmax(q·kᵀ/√d + bias)·v`` for heads-first ``(B, H, L, D)`` tensors."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, dim=-1) @ v


def image_attention(method, q_i, pos_kv, neg_kv, scale, offset):
    """The guided image queries' attention output for ``method`` (heads-first, heads not merged)."""
    (k_p, v_p), (k_n, v_n) = pos_kv, neg_kv
    if method == "nasa":  # two full attentions, then Z+ − φ·Z-
        return softmax_attention(q_i, k_p, v_p) - scale * softmax_attention(q_i, k_n, v_n)
    # VSF: one softmax over the prompt's keys and the negative's, values of the negative flipped and scaled
    bias = torch.cat([torch.zeros(k_p.shape[2]), torch.full((k_n.shape[2],), -offset)])
    return softmax_attention(q_i, torch.cat([k_p, k_n], 2), torch.cat([v_p, -scale * v_n], 2), bias)


def merge(x):
    return x.transpose(1, 2).flatten(2)


# ----------------------------------------------------------------------------------------------- FLUX reference
def _qkv(attn, x, rope, text):
    if text:
        q, k, v = attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)
        nq, nk = attn.norm_added_q, attn.norm_added_k
    else:
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        nq, nk = attn.norm_q, attn.norm_k
    q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v))
    q, k = nq(q), nk(k)
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    return tuple(t.transpose(1, 2) for t in (q, k, v))


def _segment_outputs(method, attn, tp, tn, img, ropes, scale, offset, double):
    """Attention outputs (merged heads) of the prompt text, the negative text and the image queries."""
    (qp, kp, vp), (qn, kn, vn) = _qkv(attn, tp, ropes[0], double), _qkv(attn, tn, ropes[1], double)
    qi, ki, vi = _qkv(attn, img, ropes[2], False)
    out_p = softmax_attention(qp, torch.cat([kp, ki], 2), torch.cat([vp, vi], 2))
    out_n = softmax_attention(qn, torch.cat([kn, ki], 2), torch.cat([vn, vi], 2))
    if method == "nasa":
        out_i = image_attention(method, qi, (torch.cat([kp, ki], 2), torch.cat([vp, vi], 2)),
                                (torch.cat([kn, ki], 2), torch.cat([vn, vi], 2)), scale, offset)
    else:
        out_i = image_attention(method, qi, (torch.cat([kp, ki], 2), torch.cat([vp, vi], 2)), (kn, vn), scale, offset)
    return merge(out_p), merge(out_n), merge(out_i)


@torch.no_grad()
def flux_method_reference(model, inputs, neg_text, neg_pooled, method, scale, offset=0.0):
    """FLUX.1-schnell-style forward with ``method`` on every guided layer, written out plainly."""
    x = model.x_embedder(inputs["hidden_states"])
    t = inputs["timestep"].to(x.dtype) * 1000
    temb_p = model.time_text_embed(t, inputs["pooled_projections"])
    temb_n = model.time_text_embed(t, neg_pooled)
    tp, tn = model.context_embedder(inputs["encoder_hidden_states"]), model.context_embedder(neg_text)
    ropes = (model.pos_embed(inputs["txt_ids"]), model.pos_embed(torch.zeros(tn.shape[1], 3)),
             model.pos_embed(inputs["img_ids"]))
    for blk in model.transformer_blocks:
        n_img, gate, shift_mlp, scale_mlp, gate_mlp = blk.norm1(x, emb=temb_p)
        n_tp, *mods_p = blk.norm1_context(tp, emb=temb_p)
        n_tn, *mods_n = blk.norm1_context(tn, emb=temb_n)
        out_p, out_n, out_i = _segment_outputs(method, blk.attn, n_tp, n_tn, n_img, ropes, scale, offset, True)
        x = x + gate.unsqueeze(1) * blk.attn.to_out[1](blk.attn.to_out[0](out_i))
        x = x + gate_mlp.unsqueeze(1) * blk.ff(blk.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
        new = []
        for txt, (c_gate, c_shift, c_scale, c_gate_mlp), out in ((tp, mods_p, out_p), (tn, mods_n, out_n)):
            txt = txt + c_gate.unsqueeze(1) * blk.attn.to_add_out(out)
            txt = txt + c_gate_mlp.unsqueeze(1) * blk.ff_context(
                blk.norm2_context(txt) * (1 + c_scale[:, None]) + c_shift[:, None])
            new.append(txt)
        tp, tn = new
    for blk in model.single_transformer_blocks:
        (n_tp, g_tp), (n_tn, g_tn), (n_i, g_i) = (blk.norm(s, emb=e) for s, e in
                                                  ((tp, temb_p), (tn, temb_n), (x, temb_p)))
        outs = _segment_outputs(method, blk.attn, n_tp, n_tn, n_i, ropes, scale, offset, False)
        tp, tn, x = (s + g.unsqueeze(1) * blk.proj_out(torch.cat([o, blk.act_mlp(blk.proj_mlp(n))], 2))
                     for s, g, o, n in ((tp, g_tp, outs[0], n_tp), (tn, g_tn, outs[1], n_tn), (x, g_i, outs[2], n_i)))
    return model.proj_out(model.norm_out(x, temb_p))


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=12, axes_dims_rope=(2, 2, 4)).eval()
    g = torch.Generator().manual_seed(1)
    b, li, lt = 2, 16, 7
    inputs = dict(hidden_states=torch.randn(b, li, 8, generator=g),
                  encoder_hidden_states=torch.randn(b, lt, 16, generator=g),
                  pooled_projections=torch.randn(b, 12, generator=g), timestep=torch.tensor([0.7, 0.7]),
                  img_ids=torch.randn(li, 3, generator=g), txt_ids=torch.zeros(lt, 3), return_dict=False)
    # one negative per sample, shorter than the prompt (5 vs 7 tokens)
    negative = {"encoder_hidden_states": torch.randn(b, 5, 16, generator=g),
                "pooled_projections": torch.randn(b, 12, generator=g)}
    return model, inputs, negative


def run(model, inputs, **changes):
    with torch.no_grad():
        return model(**{**inputs, **changes})[0]


def _flux_ref(flux, method, scale, offset=0.0, rows=None):
    model, inputs, negative = flux
    if rows is not None:
        inputs = {k: (v[rows] if isinstance(v, torch.Tensor) and v.ndim and k not in ("img_ids", "txt_ids") else v)
                  for k, v in inputs.items()}
        negative = {k: v[rows] for k, v in negative.items()}
    return flux_method_reference(model, inputs, negative["encoder_hidden_states"], negative["pooled_projections"],
                                 method, scale, offset)


@pytest.mark.parametrize("method,scale,offset", [("nasa", PHI, 0.0), ("vsf", BETA, OFFSET), ("vsf", BETA, 0.0)])
def test_flux_matches_reference(flux, method, scale, offset):
    model, inputs, negative = flux
    options = {"offset": offset} if method == "vsf" else {}
    with nagkit.apply(model, negative=negative, method=method, scale=scale, **options) as guide:
        assert guide.config.method == method and guide.config.scale == scale
        out = run(model, inputs)
        with force_two_attentions():  # the path without log-sum-exp merges (backends without an LSE)
            two = run(model, inputs)
    ref = _flux_ref(flux, method, scale, offset)
    assert (out - run(model, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["nasa", "vsf"])
def test_flux_cfg_rows_window_identity_and_removal(flux, method):
    model, inputs, negative = flux
    scale = PHI if method == "nasa" else BETA
    base = run(model, inputs)
    procs = dict(model.attn_processors)
    uncond = torch.randn(inputs["encoder_hidden_states"].shape, generator=torch.Generator().manual_seed(5))
    cfg = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim and k not in ("img_ids", "txt_ids") else v)
           for k, v in inputs.items()}
    cfg["encoder_hidden_states"] = torch.cat([uncond, inputs["encoder_hidden_states"]])
    with nagkit.apply(model, negative=negative, method=method, scale=scale) as guide:
        both = run(model, cfg)  # batched CFG [uncond, cond]: only the conditional rows are guided
        assert guide.state.last_packing.rows == slice(2, 4)
        # window: the call sits at u = 1 − 0.7 = 0.3 of the schedule
        guide.update(start=0.5)
        assert torch.equal(run(model, inputs), base)
        guide.update(start=0.0, end=0.4)
        in_window = run(model, inputs)
        guide.update(end=1.0, scale=0.0)  # φ = 0 / β = 0: off, the plain model bit for bit
        assert guide.config.is_off and torch.equal(run(model, inputs), base)
    plain = run(model, cfg)
    torch.testing.assert_close(both[:2], plain[:2], atol=1e-6, rtol=1e-6)
    ref = _flux_ref(flux, method, scale, METHOD_DEFAULTS[method]["offset"])
    torch.testing.assert_close(both[2:], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(in_window, ref, atol=1e-5, rtol=1e-5)
    assert all(procs[k] is v for k, v in model.attn_processors.items())
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in model.modules())
    assert torch.equal(run(model, inputs), base)


def test_flux_one_negative_for_every_row_and_switching_methods(flux):
    """A one-row negative serves every row of a bare denoiser; update(method=...) switches live and back to NAG."""
    model, inputs, negative = flux
    one = {k: v[:1] for k, v in negative.items()}
    with nagkit.apply(model, negative=one, scale=4.0, tau=1.5, alpha=0.5) as guide:
        nag = run(model, inputs)
        guide.update(method="vsf", scale=BETA, offset=OFFSET)
        vsf = run(model, inputs)
        guide.update(method="nasa")  # scale and offset not given: NASA's defaults
        assert (guide.config.scale, guide.config.offset) == (METHOD_DEFAULTS["nasa"]["scale"], 0.0)
        guide.update(method="nag")  # back to the NAG settings the guide was applied with
        assert (guide.config.scale, guide.config.tau, guide.config.alpha) == (4.0, 1.5, 0.5)
        torch.testing.assert_close(run(model, inputs), nag, atol=0, rtol=0)
    both = {k: v.expand(2, *v.shape[1:]) for k, v in one.items()}
    ref = flux_method_reference(model, inputs, both["encoder_hidden_states"], both["pooled_projections"], "vsf",
                                BETA, OFFSET)
    torch.testing.assert_close(vsf, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- kernels directly
def _packing(b, lp, ln, rows):
    return Packing(lp=lp, ln=ln, rows=rows, batch=b)


@pytest.mark.parametrize("rows", [slice(0, 3), slice(1, 3)])
@pytest.mark.parametrize("text_first", [True, False])
def test_joint_kernel_vsf_with_mask_and_rows(rows, text_first):
    """The LSE merge and the two-attention path against one explicit softmax, with a key-padding bias (Chroma,
    Qwen-Image) and guided rows that are not all rows."""
    g = torch.Generator().manual_seed(0)
    b, h, d, lp, ln, li = 3, 2, 8, 4, 3, 6
    q, k, v = (torch.randn(b, h, lp + ln + li, d, generator=g) for _ in range(3))
    keep = torch.ones(b, lp + ln + li, dtype=torch.bool)
    text_start = 0 if text_first else li
    keep[:, text_start + lp - 1] = False  # a padded prompt token
    keep[1, text_start + lp + ln - 1] = False  # a padded negative token in one row
    bias = torch.zeros(b, 1, 1, lp + ln + li).masked_fill(~keep[:, None, None], float("-inf"))
    packing = _packing(b, lp, ln, rows)
    outs = [nag_joint_attention(q, k, v, packing, text_first, BETA, 2.5, 0.25, bias=bias, method="vsf",
                                offset=OFFSET, use_lse=use) for use in (True, False)]
    sp = slice(0, lp) if text_first else slice(li, li + lp)
    sn = slice(lp, lp + ln) if text_first else slice(li + lp, li + lp + ln)
    si = slice(lp + ln, lp + ln + li) if text_first else slice(0, li)
    image = [si.start + i for i in range(li)]
    pos = list(range(sp.start, sp.stop)) + image
    negk = list(range(sn.start, sn.stop))
    qi = q[:, :, si]
    plain = softmax_attention(qi, k[:, :, pos], v[:, :, pos], bias[..., pos])
    vsf = softmax_attention(qi, k[:, :, pos + negk], torch.cat([v[:, :, pos], -BETA * v[:, :, negk]], 2),
                            torch.cat([bias[..., pos], bias[..., negk] - OFFSET], -1))
    expect_i = plain.clone()
    expect_i[rows] = vsf[rows]
    for out in outs:
        torch.testing.assert_close(out[:, si], merge(expect_i), atol=1e-5, rtol=1e-5)
        text_p = softmax_attention(q[:, :, sp], k[:, :, pos], v[:, :, pos], bias[..., pos])
        torch.testing.assert_close(out[:, sp], merge(text_p), atol=1e-5, rtol=1e-5)


def test_cross_kernel_vsf_beta_zero_is_a_dilution_not_plain():
    """β = 0 in the formula still gives the negative's keys softmax weight (zero values): VSF defines β = 0 as off
    (``NAGConfig.is_off``); the kernel itself computes the formula."""
    g = torch.Generator().manual_seed(2)
    b, h, d, lq, lp, ln = 2, 2, 8, 5, 4, 3
    q = torch.randn(b, h, lq, d, generator=g)
    k, v = torch.randn(b, h, lp + ln, d, generator=g), torch.randn(b, h, lp + ln, d, generator=g)

    def attend(q_, k_, v_, m_):
        return merge(torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, attn_mask=m_))

    out = nag_cross_attention(attend, q, k, v, None, _packing(b, lp, ln, slice(0, b)), 0.0, 2.5, 0.25, method="vsf")
    expect = softmax_attention(q, k, torch.cat([v[:, :, :lp], 0 * v[:, :, lp:]], 2))
    torch.testing.assert_close(out, merge(expect), atol=1e-6, rtol=1e-6)
    assert (out - merge(softmax_attention(q, k[:, :, :lp], v[:, :, :lp]))).abs().max() > 1e-3
    assert NAGConfig(method="vsf", scale=0.0).is_off and NAGConfig(method="nasa", scale=0.0).is_off


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("rows,prefix", [(slice(0, 3), 0), (slice(1, 3), 2)])
def test_cross_kernel_vsf_masks_rows_prefix(mask_kind, rows, prefix):
    """Padding masks (PixArt/Sana: boolean or additive), guided rows that are not all rows, and Wan's context prefix
    (image tokens both branches attend to, never flipped) against one explicit softmax."""
    g = torch.Generator().manual_seed(4)
    b, h, d, lq, lp, ln = 3, 2, 8, 5, 4, 3
    total = prefix + lp + ln
    q = torch.randn(b, h, lq, d, generator=g)
    k, v = torch.randn(b, h, total, d, generator=g), torch.randn(b, h, total, d, generator=g)
    keep = torch.ones(b, 1, 1, total, dtype=torch.bool)
    keep[0, ..., prefix + lp - 1] = False
    keep[2, ..., total - 1] = False
    additive = torch.zeros(b, 1, 1, total).masked_fill(~keep, float("-inf"))
    mask = {None: None, "bool": keep, "float": additive}[mask_kind]
    bias = torch.zeros(b, 1, 1, total) if mask is None else additive

    def attend(q_, k_, v_, m_):
        return merge(torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, attn_mask=m_))

    out = nag_cross_attention(attend, q, k, v, mask, _packing(b, lp, ln, rows), BETA, 2.5, 0.25, prefix=prefix,
                              method="vsf", offset=OFFSET)
    pos = slice(0, prefix + lp)
    plain = softmax_attention(q, k[:, :, pos], v[:, :, pos], bias[..., pos])
    flipped = torch.cat([v[:, :, pos], -BETA * v[:, :, prefix + lp:]], 2)
    offsets = torch.cat([torch.zeros(prefix + lp), torch.full((ln,), -OFFSET)])
    vsf = softmax_attention(q, k, flipped, bias + offsets)
    expect = plain.clone()
    expect[rows] = vsf[rows]
    torch.testing.assert_close(out, merge(expect), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- cross-attention
class FlipTail(torch.nn.Module):
    """``to_v`` whose outputs after the first ``lp`` tokens (the negative's) are multiplied by ``−scale``."""

    def __init__(self, to_v, lp, scale):
        super().__init__()
        self.to_v, self.lp, self.scale = to_v, lp, scale

    def forward(self, x):
        out = self.to_v(x)
        return torch.cat([out[:, :self.lp], -self.scale * out[:, self.lp:]], dim=1)


class MethodRef:
    """Reference processor: NASA from two calls of the module's own processor; VSF from one call on ``[prompt |
    negative]`` context with the negative's values flipped (``to_v`` wrapped) and a ``−offset`` mask on its keys."""

    def __init__(self, inner, neg_context, method, scale, offset, rows, mask_layout):
        self.inner, self.neg_context, self.method, self.scale, self.offset = inner, neg_context, method, scale, offset
        self.rows, self.mask_layout = rows, mask_layout

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        assert attention_mask is None
        call = self.inner
        with swapped(attn.to_out, "0", torch.nn.Identity()):
            z_pos = call(attn, hidden_states, encoder_hidden_states, None, *args, **kwargs)
            if self.method == "nasa":
                z_neg = call(attn, hidden_states, self.neg_context, None, *args, **kwargs)
                guided = z_pos - self.scale * z_neg
            else:
                lp, ln = encoder_hidden_states.shape[1], self.neg_context.shape[1]
                flip = FlipTail(attn.to_v, lp, self.scale)
                bias = torch.cat([torch.zeros(lp), torch.full((ln,), -self.offset)])
                mask = bias.expand(*self.mask_layout(hidden_states.shape[0]), lp + ln).clone()
                with swapped(attn, "to_v", flip):
                    guided = call(attn, hidden_states, torch.cat([encoder_hidden_states, self.neg_context], 1),
                                  mask, *args, **kwargs)
        out = z_pos.clone()
        out[self.rows] = guided[self.rows]
        return attn.to_out[0](out)


def cross_reference(model, kwargs, negative, method, scale, offset, rows, mask_layout):
    store = {}
    with torch.no_grad(), processors(model, lambda n, inner: Capture(inner, store, n)):
        model(**{**kwargs, "encoder_hidden_states": negative})
    with torch.no_grad(), processors(model, lambda n, inner: MethodRef(inner, store[n][0], method, scale, offset,
                                                                          rows, mask_layout)):
        return model(**kwargs)[0]


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
        attention_head_dim=4, norm_num_groups=4, cross_attention_dim=32).eval()


CROSS = {
    # (builder, inputs of batch b, text dim, mask shape for the processor: Wan -> SDPA (1, 1, 1, L); UNet -> (B, 1, L))
    "wan": (lambda: _tiny_wan_transformer(0, text_dim=16),
            lambda b, g: {"hidden_states": torch.randn(b, 16, 2, 4, 4, generator=g),
                          "timestep": torch.tensor([900.0] * b)}, 16, lambda b: (1, 1, 1)),
    "unet": (_tiny_unet, lambda b, g: {"sample": torch.randn(b, 4, 8, 8, generator=g),
                                       "timestep": torch.tensor([900.0] * b)}, 32, lambda b: (b, 1)),
}


@pytest.fixture(scope="module", params=sorted(CROSS))
def cross(request):
    build, make, dim, layout = CROSS[request.param]
    return request.param, build(), make, dim, layout


@pytest.mark.parametrize("method,scale,offset", [("nasa", PHI, 0.0), ("vsf", BETA, OFFSET)])
def test_cross_families_match_reference(cross, method, scale, offset):
    """Batch 2 with per-sample negatives of another length than the prompt; batched CFG (conditional rows only);
    window; identity; removal."""
    name, model, make, dim, layout = cross
    g = torch.Generator().manual_seed(3)
    kwargs = {**make(2, g), "encoder_hidden_states": torch.randn(2, 6, dim, generator=g)}
    negative = torch.randn(2, 4, dim, generator=g)
    options = {"offset": offset} if method == "vsf" else {}
    base = run(model, kwargs)
    procs = dict(model.attn_processors)
    with nagkit.apply(model, negative={"encoder_hidden_states": negative}, method=method, scale=scale,
                      **options) as guide:
        out = run(model, kwargs)
        cfg = {k: torch.cat([v, v]) for k, v in kwargs.items()}
        cfg["encoder_hidden_states"] = torch.cat([torch.randn(2, 6, dim, generator=g), kwargs["encoder_hidden_states"]])
        both = run(model, cfg)
        assert guide.state.last_packing.rows == slice(2, 4)
        guide.update(start=0.5)  # t = 900 of 1000 (UNet: 999) sits at u ≈ 0.1: outside [0.5, 1]
        assert torch.equal(run(model, kwargs), base)
    ref = cross_reference(model, kwargs, negative, method, scale, offset, slice(0, 2), layout)
    assert (out - base).abs().max() > 1e-4
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    cfg_ref = cross_reference(model, cfg, torch.cat([negative, negative]), method, scale, offset, slice(2, 4), layout)
    torch.testing.assert_close(both, cfg_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[:2], run(model, {**cfg})[:2], atol=1e-6, rtol=1e-6)
    assert all(procs[k] is v for k, v in model.attn_processors.items())
    assert torch.equal(run(model, kwargs), base)


# ----------------------------------------------------------------------------------------------- settings
def test_config_methods_and_refusals():
    assert NAGConfig().method == "nag" and NAGConfig().scale == 5.0
    for name in ("nag", "nasa", "vsf"):
        config = NAGConfig(method=name)
        assert (config.scale, config.offset) == (METHOD_DEFAULTS[name]["scale"], METHOD_DEFAULTS[name]["offset"])
    assert get_preset("flux").method == "nag" and get_preset("wan").method == "nag"
    assert "method" not in NAGConfig().to_dict()  # NAG sidecars unchanged
    assert NAGConfig(method="vsf").to_dict()["method"] == "vsf" and NAGConfig(method="vsf").to_dict()["offset"] == 0.1
    switched = get_preset("sdxl").with_updates(method="nasa")  # NAG's tau/alpha do not carry over
    assert (switched.scale, switched.tau, switched.alpha) == (0.25, 2.5, 0.25)
    cases = [
        (dict(method="cfg"), r"method must be one of \('nag', 'nasa', 'vsf'\)"),
        (dict(method="nasa", tau=3.0), "tau is a NAG parameter: method='nasa'"),
        (dict(method="vsf", alpha=0.5), "alpha is a NAG parameter: method='vsf'"),
        (dict(method="vsf", norm="l2"), "norm is a NAG parameter"),
        (dict(method="nasa", mode="official"), "no official mode"),
        (dict(method="nasa", offset=0.1), "offset is a VSF parameter"),
        (dict(offset=0.1), "offset is a VSF parameter"),
        (dict(method="vsf", scale=-1.0), "scale must be a finite number >= 0 for method='vsf'"),
        (dict(method="vsf", offset=float("inf")), "offset must be finite"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            NAGConfig(**kwargs)


def test_apply_refuses_bad_method_parameters(flux):
    model, _, negative = flux
    for kwargs, match in [(dict(method="nasa", tau=2.5), "tau is a NAG parameter"),
                          (dict(method="vsf", norm="l1"), "norm is a NAG parameter"),
                          (dict(method="vsf", mode="official"), "no official mode"),
                          (dict(method="sag"), "method must be one of"),
                          (dict(method="sag", tau=2.0), "method must be one of"),
                          (dict(offset=0.2), "offset is a VSF parameter")]:
        with pytest.raises(ValueError, match=match):
            nagkit.apply(model, negative=negative, **kwargs)
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in model.modules())
    with nagkit.apply(model, negative=negative, method="nasa") as guide:
        with pytest.raises(ValueError, match="alpha is a NAG parameter"):
            guide.update(alpha=0.5)
        with pytest.raises(ValueError, match="offset is a VSF parameter"):
            guide.update(offset=0.5)
        assert guide.config.method == "nasa"


def test_vsf_refused_for_families_outside_the_kernels():
    from nagkit.adapters.base import _REGISTRY
    from nagkit.integration.guide import VSF_FAMILIES, _check_method

    others = [a for a in _REGISTRY if a.model_class.__name__ not in VSF_FAMILIES]
    assert others  # e.g. Lumina2, Z-Image, FLUX.2: their processors compute the attention themselves
    for adapter in others:
        with pytest.raises(ValueError, match=f"method='vsf' is not available for {adapter.model_class.__name__}"):
            _check_method("vsf", adapter)
        _check_method("nasa", adapter)  # NASA combines Z+ and Z- like NAG: every family


def test_nag_combine_refuses_vsf_outside_kernels():
    from nagkit.core.operator import guidance_method, nag, nag_combine

    z = torch.randn(2, 3, 8)
    with guidance_method("vsf", 0.1), pytest.raises(NotImplementedError, match="method='vsf' cannot be computed"):
        nag_combine(z, z, 2.0, 2.5, 0.25)
    with guidance_method("nasa"):
        torch.testing.assert_close(nag_combine(z, 2 * z, 0.5, 2.5, 0.25), torch.zeros_like(z))
        torch.testing.assert_close(nag(z, z, 5.0), z)  # the public NAG operator stays NAG


# ----------------------------------------------------------------------------------------------- cost
def test_flop_cost_per_step_equals_nag(flux):
    """NASA reuses NAG's Z+/Z-; VSF's one softmax over [Tp, I] ∪ Tn costs what NAG's two merged parts cost (the
    image→image attention is shared either way). Counted as ``nagkit bench`` counts (FlopCounterMode)."""
    from nagkit.bench.flops import count_flops

    model, inputs, negative = flux
    counts = {}
    for method in ("nag", "nasa", "vsf"):
        with nagkit.apply(model, negative=negative, method=method):
            counts[method] = count_flops(lambda: model(**inputs))
    assert counts["nasa"] == counts["vsf"] == counts["nag"] > count_flops(lambda: model(**inputs))


def test_bench_counts_methods_as_variants():
    from nagkit.bench import flops as bench_flops

    from .test_bench import TINY_FLUX

    result = bench_flops.run_family(TINY_FLUX)
    variants = result.variants
    assert {"nasa", "vsf"} <= set(bench_flops.VARIANTS) and not result.notes
    assert variants["nasa"].flops == variants["vsf"].flops == variants["nag"].flops


# ----------------------------------------------------------------------------------------------- pipeline level
@contextlib.contextmanager
def _quiet():
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


@pytest.mark.parametrize("method", ["nasa", "vsf"])
def test_tiny_flux_pipeline(method):
    from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES

    pipe = TINY_PIPELINES["tiny-flux"](seed=0)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red cat", num_inference_steps=2, output_type="pt", **TINY_CALL_KWARGS["tiny-flux"])

    def generate():
        with _quiet():
            return pipe(**call, generator=torch.Generator().manual_seed(0)).images

    plain = generate()
    with nagkit.apply(pipe, negative_prompt="blurry", method=method) as guide:
        guided = generate()
        guide.update(scale=0.0)
        assert torch.equal(generate(), plain)
    assert (guided - plain).abs().max() > 1e-4
    assert torch.equal(generate(), plain)
