"""CUDA paths (skipped without a GPU): the LSE kernels, the joint NAG attention and a guided Flux forward on CUDA.

Run on a GPU machine with ``pytest tests/test_cuda.py``; the results of the last run are in docs/benchmarks.md.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nagkit.core.state import Packing
from nagkit.kernels.joint import nag_joint_attention
from nagkit.kernels.lse import _math, attention_with_lse, merge_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def qkv(b=2, h=4, lq=300, lk=200, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to("cuda", dtype) for n in (lq, lk, lk)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_lse_matches_math(dtype, masked):
    q, k, v = qkv(dtype=dtype)
    bias = None
    if masked:
        keep = torch.ones(2, 1, 1, 200, dtype=torch.bool, device="cuda")
        keep[1, ..., 150:] = False
        bias = torch.zeros(keep.shape, dtype=dtype, device="cuda").masked_fill(~keep, float("-inf"))
    out, lse = attention_with_lse(q, k, v, bias)
    ref_out, ref_lse = _math(q, k, v, bias, q.shape[-1] ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_merge_equals_full_attention(dtype):
    q, k, v = qkv(lk=400, dtype=dtype)
    full = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    merged = merge_attention([attention_with_lse(q, k[:, :, :300], v[:, :, :300]),
                              attention_with_lse(q, k[:, :, 300:], v[:, :, 300:])]).float()
    fused = F.scaled_dot_product_attention(q, k, v).float()
    assert (merged - full).abs().max() <= 2 * (fused - full).abs().max() + 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_joint_lse_equals_two_attentions(dtype):
    g = torch.Generator().manual_seed(1)
    lp, ln, li = 32, 24, 256
    q, k, v = (torch.randn(2, 4, lp + ln + li, 64, generator=g).to("cuda", dtype) for _ in range(3))
    packing = Packing(lp=lp, ln=ln, rows=slice(0, 2), batch=2)
    fast = nag_joint_attention(q, k, v, packing, True, 5.0, 2.5, 0.5, use_lse=True).float()
    slow = nag_joint_attention(q, k, v, packing, True, 5.0, 2.5, 0.5, use_lse=False).float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast, slow, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sdxl", "tiny-sd3"])
def test_cuda_guided_pipeline_matches_cpu(name):
    import nagkit
    from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES

    pipe = TINY_PIPELINES[name](seed=0)
    outs = {}
    for device in ("cpu", "cuda"):
        pipe.to(device)
        call = dict(TINY_CALL_KWARGS[name], num_inference_steps=2, output_type="latent")
        with nagkit.apply(pipe, negative_prompt="blurry", scale=5.0, alpha=0.5):
            outs[device] = pipe("a red cat", generator=torch.Generator().manual_seed(0), **call)[0].float().cpu()
    torch.testing.assert_close(outs["cuda"], outs["cpu"], atol=2e-3, rtol=2e-3)


def _flux_inputs(model, device, dtype):
    g = torch.Generator().manual_seed(0)
    li, lt, dim = 64, 12, model.config.joint_attention_dim
    inputs = dict(hidden_states=torch.randn(2, li, model.config.in_channels, generator=g),
                  encoder_hidden_states=torch.randn(2, lt, dim, generator=g),
                  pooled_projections=torch.randn(2, model.config.pooled_projection_dim, generator=g),
                  timestep=torch.tensor([0.6, 0.6]), img_ids=torch.randn(li, 3, generator=g),
                  txt_ids=torch.zeros(lt, 3))
    negative = {"encoder_hidden_states": torch.randn(2, 8, dim, generator=g),
                "pooled_projections": torch.randn(2, model.config.pooled_projection_dim, generator=g)}
    move = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    return move, {k: v.to(device, dtype) for k, v in negative.items()}


@pytest.mark.parametrize("backend", ["native", "_native_flash", "_native_efficient", "_native_math"])
def test_cuda_guided_flux_on_each_attention_backend(backend):
    import nagkit
    from nagkit.tiny.pipelines import TINY_PIPELINES

    model = TINY_PIPELINES["tiny-flux"](seed=0).transformer.to("cuda", torch.bfloat16)
    inputs, negative = _flux_inputs(model, "cuda", torch.bfloat16)
    with torch.no_grad(), nagkit.apply(model, negative=negative, scale=5.0, alpha=0.5):
        reference = model(**inputs, return_dict=False)[0].float()
        model.set_attention_backend(backend)
        try:
            out = model(**inputs, return_dict=False)[0].float()
        finally:
            model.reset_attention_backend()
    torch.testing.assert_close(out, reference, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("order", ["nag_first", "offload_first"])
def test_cuda_group_offload_with_nag(order):
    import nagkit
    from nagkit.tiny.pipelines import TINY_PIPELINES

    model = TINY_PIPELINES["tiny-flux"](seed=0).transformer.to(torch.float32)
    inputs, negative = _flux_inputs(model, "cuda", torch.float32)
    model.to("cuda")
    with torch.no_grad(), nagkit.apply(model, negative=negative, scale=5.0, alpha=0.5):
        expected = model(**inputs, return_dict=False)[0]
    model.to("cpu")

    def offload():
        model.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1)

    if order == "offload_first":
        offload()
    guide = nagkit.apply(model, negative=negative, scale=5.0, alpha=0.5)
    if order == "nag_first":
        offload()
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    guide.remove()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["tiny-wan", "tiny-flux"])
@pytest.mark.parametrize("order", ["nag_first", "offload_first"])
def test_cuda_sequential_offload_with_nag(family, order):
    """``enable_sequential_cpu_offload`` (accelerate hooks on every leaf module) with NAG installed before or after:
    the guided pipeline output equals NAG on the GPU without offloading."""
    import nagkit
    from nagkit.tiny.pipelines import TINY_PIPELINES

    from .test_pipelines import generate

    pipe = TINY_PIPELINES[family](seed=0).to("cuda")
    with nagkit.apply(pipe, negative_prompt="blurry", scale=5.0, alpha=0.5):
        expected = generate(family, pipe, steps=2)
    pipe = TINY_PIPELINES[family](seed=0)
    if order == "offload_first":
        pipe.enable_sequential_cpu_offload(device="cuda")
    guide = nagkit.apply(pipe, negative_prompt="blurry", scale=5.0, alpha=0.5)
    if order == "nag_first":
        pipe.enable_sequential_cpu_offload(device="cuda")
    out = generate(family, pipe, steps=2)
    guide.remove()
    torch.testing.assert_close(out.float().cpu(), expected.float().cpu(), atol=1e-4, rtol=1e-4)
