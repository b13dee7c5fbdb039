"""LSE attention and the exact merge of partial attentions (masks, padding, fully masked rows, bf16)."""

import pytest
import torch
import torch.nn.functional as F

from nagkit.kernels.lse import _math, attention_with_lse, merge_attention


def qkv(b=2, h=3, lq=11, lk=9, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for n in (lq, lk, lk)]


def test_lse_matches_logsumexp_and_sdpa():
    q, k, v = qkv()
    out, lse = attention_with_lse(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-5)
    ref = torch.logsumexp((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    torch.testing.assert_close(lse, ref, atol=1e-5, rtol=1e-5)
    out_m, lse_m = _math(q, k, v, None, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out_m, out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse_m, lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_merge_of_parts_equals_full_attention(masked):
    q, k, v = qkv(lk=20)
    keep = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    if masked:  # padding in the second part for sample 1
        keep[1, ..., 15:] = False
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    a = attention_with_lse(q, k[:, :, :12], v[:, :, :12], keep[..., :12])
    b = attention_with_lse(q, k[:, :, 12:], v[:, :, 12:], keep[..., 12:])
    torch.testing.assert_close(merge_attention([a, b]), full, atol=2e-6, rtol=1e-5)


def test_fully_masked_part_has_no_weight():
    q, k, v = qkv(lk=10)
    keep = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    keep[0, ..., 6:] = False  # sample 0: the whole second part is padding
    out, lse = attention_with_lse(q, k[:, :, 6:], v[:, :, 6:], keep[..., 6:])
    assert torch.isneginf(lse[0]).all() and torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(lse[1]).all()
    merged = merge_attention([attention_with_lse(q, k[:, :, :6], v[:, :, :6]), (out, lse)])
    torch.testing.assert_close(merged[0], F.scaled_dot_product_attention(q, k, v, attn_mask=keep)[0], atol=2e-6,
                               rtol=1e-5)
    nothing = merge_attention([(out[:1], lse[:1])])  # every key masked everywhere: zeros, not NaN
    assert torch.equal(nothing, torch.zeros_like(nothing))


def test_additive_float_bias_is_kept_additive():
    q, k, v = qkv()
    bias = torch.randn(2, 1, 11, 9)
    out, _ = attention_with_lse(q, k, v, bias)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), atol=1e-6, rtol=1e-5)


def test_bf16_merge_is_as_accurate_as_one_fused_call():
    q, k, v = qkv(lk=64, d=32, dtype=torch.bfloat16)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    fused = F.scaled_dot_product_attention(q, k, v).float()
    merged = merge_attention([attention_with_lse(q, k[:, :, :40], v[:, :, :40]),
                              attention_with_lse(q, k[:, :, 40:], v[:, :, 40:])]).float()
    assert (merged - ref).abs().max() <= 2 * (fused - ref).abs().max() + 1e-3
