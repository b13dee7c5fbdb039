"""Z-Image (``ZImageTransformer2DModel``, Pattern B side-car negative): nagkit vs an independent reference,
identities, rows, window, removal, the pinned negative layout, pipelines, refusals.

The reference (:func:`reference`) is the doubled computation written out plainly, per sample and per main layer,
with explicit softmax attention and the NAG formula written here (no nagkit kernel, no nagkit layout code):

* the prompt's unified sequence entering the main layers is taken from the model itself (a pre-hook on ``layers[0]``
  of a plain run on the prompts);
* the negative caption entering the main layers is taken from the model itself too: a plain run of the model on
  ``(same image, negative caption)``, whose ``layers[0]`` input holds the negative caption after the model's own
  embedding, pad-to-32 with ``cap_pad_token`` and ``context_refiner``, with its RoPE rows ``(1 + j, 0, 0)``; those
  rows are shifted to ``1 + j + d``, ``d = E_p − E_n``, by multiplying the axis-0 factors by ``exp(i·d·θ)`` (a
  different formula from nagkit's table-free recomputation), so that every negative↔image offset equals the
  negative-alone run;
* each main layer is the block's math written out on ``[image | prompt caption | negative caption]``: image queries
  attend twice — over ``[image, prompt caption]`` (``Z+``) and over ``[image, negative caption]`` (``Z-``) — two full
  attentions, combined by NAG; the prompt's caption tokens attend over ``[image, prompt caption]``, the negative's
  caption tokens over ``[image, negative caption]``; unguided rows run the real layer;
* controlnet residuals are added to the prompt's unified sequence after their layer, as the model does.

That the re-implemented block is the model's block is checked by :func:`test_reference_is_the_model_at_identity`
(negative = prompt gives the plain model's output).
"""

from __future__ import annotations

import inspect

import pytest
import torch

import nagkit
from nagkit.adapters.zimage import tiny_zimage_transformer
from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES, tiny_condition_image

SCALE, TAU, ALPHA = 4.0, 1.5, 0.5
C = 16  # caption feature width of the tiny model


class _Stop(Exception):
    pass


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast, and spares a shared machine the spinning of idle threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_zimage_transformer(seed=0)


def make_inputs(cap_lens, hw=(8, 8), t=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"x": [torch.randn(16, 1, *hw, generator=g) for _ in cap_lens],
            "t": torch.full((len(cap_lens),), t),
            "cap_feats": [torch.randn(n, C, generator=g) for n in cap_lens], "return_dict": False}


def captions(lens, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, C, generator=g) for n in lens]


def run(model, inputs, **changes):
    with torch.no_grad():
        return torch.stack(model(**{**inputs, **changes})[0])


# ------------------------------------------------------------------------------------------------ reference
def layer0_inputs(model, x, t, caps):
    """``(unified, mask, freqs, adaln)`` entering ``layers[0]`` in a plain run."""
    seen = {}

    def grab(module, args):
        seen["args"] = args
        raise _Stop

    handle = model.layers[0].register_forward_pre_hook(grab)
    try:
        with torch.no_grad(), pytest.raises(_Stop):
            model(x=x, t=t, cap_feats=caps)
    finally:
        handle.remove()
    unified, mask, freqs, adaln = seen["args"][:4]
    return unified, mask, freqs, adaln


def image_tokens(model, image):
    tokens = (image.shape[1]) * (image.shape[2] // 2) * (image.shape[3] // 2)
    return tokens + (-tokens) % 32


def padded(n):
    return n + (-n) % 32


def shift_axis0(model, freqs, d):
    """RoPE rows of positions ``p`` -> rows of ``p + d`` on axis 0 (multiply by ``exp(i·d·θ_k)``)."""
    dim, theta = model.config.axes_dims[0], model.config.rope_theta
    k = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    phase = torch.polar(torch.ones(dim // 2, dtype=torch.float64), d * theta ** (-k)).to(torch.complex64)
    out = freqs.clone()
    out[:, : dim // 2] = freqs[:, : dim // 2] * phase
    return out


def rope(x, freqs):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs[:, None]).flatten(-2)


def softmax_attention(q, k, v):  # (S, H, D)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).flatten(1)


def nag_formula(z_pos, z_neg, scale, tau, alpha):
    z_tilde = scale * z_pos - (scale - 1) * z_neg
    ratio = z_tilde.abs().sum(-1, keepdim=True) / z_pos.abs().sum(-1, keepdim=True)
    z_hat = z_tilde * torch.clamp(ratio, max=tau) / ratio
    return alpha * z_hat + (1 - alpha) * z_pos


def reference_layer(layer, h, n, f, fn, x_len, adaln, scale, tau, alpha):
    """One main layer on ``[image | prompt caption]`` (``h``) and the negative caption ``n``, doubled attention."""
    mod = layer.adaLN_modulation(adaln)[0]
    scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4)
    gate_msa, gate_mlp, scale_msa, scale_mlp = gate_msa.tanh(), gate_mlp.tanh(), 1 + scale_msa, 1 + scale_mlp
    attn = layer.attention
    seq = torch.cat([h, n])
    lp = len(h)
    a_in = layer.attention_norm1(seq) * scale_msa
    q = attn.norm_q(attn.to_q(a_in).unflatten(-1, (attn.heads, -1)))
    k = attn.norm_k(attn.to_k(a_in).unflatten(-1, (attn.heads, -1)))
    v = attn.to_v(a_in).unflatten(-1, (attn.heads, -1))
    freqs = torch.cat([f, fn])
    q, k = rope(q, freqs), rope(k, freqs)
    pos = torch.arange(lp)
    negk = torch.cat([torch.arange(x_len), torch.arange(lp, len(seq))])
    z_pos = softmax_attention(q[:x_len], k[pos], v[pos])
    z_neg = softmax_attention(q[:x_len], k[negk], v[negk])
    caption = softmax_attention(q[x_len:lp], k[pos], v[pos])
    negative = softmax_attention(q[lp:], k[negk], v[negk])
    out = torch.cat([nag_formula(z_pos, z_neg, scale, tau, alpha), caption, negative])
    seq = seq + gate_msa * layer.attention_norm2(attn.to_out[0](out))
    seq = seq + gate_mlp * layer.ffn_norm2(layer.feed_forward(layer.ffn_norm1(seq) * scale_mlp))
    return seq[:lp], seq[lp:]


def reference(model, inputs, negatives, guided, scale=SCALE, tau=TAU, alpha=ALPHA, controlnet=None):
    """The doubled computation (see the module docstring); ``negatives[i]`` for each row ``i`` in ``guided``."""
    x, t, caps = inputs["x"], inputs["t"], inputs["cap_feats"]
    with torch.no_grad():
        unified, _, freqs, adaln = layer0_inputs(model, x, t, caps)
        outs = []
        for i in range(len(caps)):
            x_len = image_tokens(model, x[i])
            length = x_len + padded(len(caps[i]))
            h, f = unified[i, :length], freqs[i, :length]
            if i in guided:
                neg = negatives[guided.index(i)]
                u_n, _, f_n, _ = layer0_inputs(model, [x[i]], t[i:i + 1], [neg])
                n, fn = u_n[0, x_len:], f_n[0, x_len:]
                fn = shift_axis0(model, fn, padded(len(caps[i])) - padded(len(neg)))
            for index, layer in enumerate(model.layers):
                if i in guided:
                    h, n = reference_layer(layer, h, n, f, fn, x_len, adaln[i:i + 1], scale, tau, alpha)
                else:
                    h = layer(h[None], None, f[None], adaln[i:i + 1])[0]
                if controlnet is not None and index in controlnet:
                    h = h + controlnet[index][i, :length]
            final = model.all_final_layer["2-1"](h[None], c=adaln[i:i + 1])[0]
            outs.append(model.unpatchify([final], [tuple(x[i].shape[1:])], 2, 1)[0])
    return torch.stack(outs)


# ------------------------------------------------------------------------------------------------ model level
def test_reference_is_the_model_at_identity(model):
    inputs = make_inputs([5, 40])
    ref = reference(model, inputs, inputs["cap_feats"], [0, 1])
    torch.testing.assert_close(ref, run(model, inputs), atol=1e-5, rtol=1e-5)


CASES = {
    # one row; a negative longer than the prompt (E_n 64 > E_p 32: d < 0, rows off the RoPE table); image pads
    "longer-negative": ([5], [40], (8, 8)),
    # a shorter negative; 64 image tokens (no image pads)
    "shorter-negative": ([40], [3], (16, 16)),
    # batch 2, per-sample negatives, prompts of different padded lengths (batch padding mask in the main layers)
    "batch-padding": ([5, 40], [7, 70], (8, 8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(model, case):
    cap_lens, neg_lens, hw = CASES[case]
    inputs, negs = make_inputs(cap_lens, hw), captions(neg_lens)
    with nagkit.apply(model, negative={"cap_feats": negs}, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, inputs)
        assert guide.state.calls["guided"] == 1
    base = run(model, inputs)
    assert (out - base).abs().max() > 1e-3
    torch.testing.assert_close(out, reference(model, inputs, negs, list(range(len(cap_lens)))), atol=1e-5, rtol=1e-5)


def test_tensor_negative_is_broadcast_and_equals_per_row(model):
    inputs = make_inputs([5, 12])
    neg = captions([9])[0]
    with nagkit.apply(model, negative={"cap_feats": neg[None]}, scale=SCALE, tau=TAU, alpha=ALPHA):
        one = run(model, inputs)
    with nagkit.apply(model, negative={"cap_feats": [neg, neg]}, scale=SCALE, tau=TAU, alpha=ALPHA):
        torch.testing.assert_close(run(model, inputs), one, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(one, reference(model, inputs, [neg, neg], [0, 1]), atol=1e-5, rtol=1e-5)


def test_batched_cfg_guides_the_conditional_half(model):
    """Z-Image's batched CFG order: ``[cond…, uncond…]``; the unconditional rows stay the plain model's."""
    inputs = make_inputs([5, 40, 3, 3])
    negs = captions([7, 20])
    with nagkit.apply(model, negative={"cap_feats": negs}, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = run(model, inputs)
        assert guide.state.last_packing.rows == slice(0, 2)
    base = run(model, inputs)
    torch.testing.assert_close(out[2:], base[2:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, reference(model, inputs, negs, [0, 1]), atol=1e-5, rtol=1e-5)


def test_controlnet_residuals_reach_the_prompt_stream(model):
    inputs = make_inputs([5, 40])
    negs = captions([7, 3])
    length = image_tokens(model, inputs["x"][0]) + 64
    g = torch.Generator().manual_seed(5)
    residuals = {i: 0.5 * torch.randn(2, length, 32, generator=g) for i in range(2)}
    with nagkit.apply(model, negative={"cap_feats": negs}, scale=SCALE, tau=TAU, alpha=ALPHA):
        out = run(model, inputs, controlnet_block_samples=residuals)
    ref = reference(model, inputs, negs, [0, 1], controlnet=residuals)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_lse_path_equals_two_full_attentions(model):
    from nagkit.kernels.joint import force_two_attentions

    inputs, negs = make_inputs([5, 40]), captions([7, 70])
    with nagkit.apply(model, negative={"cap_feats": negs}, scale=SCALE, tau=TAU, alpha=ALPHA):
        fast = run(model, inputs)
        with force_two_attentions():
            plain = run(model, inputs)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def processors(model):
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}


def test_identities_and_removal(model):
    inputs, negs = make_inputs([5, 40]), captions([7, 70])
    base = run(model, inputs)
    procs = processors(model)
    with nagkit.apply(model, negative={"cap_feats": negs}, scale=1.0, tau=TAU, alpha=ALPHA) as guide:
        assert torch.equal(run(model, inputs), base)
        guide.update(scale=SCALE, alpha=0.0)
        assert torch.equal(run(model, inputs), base)
        guide.update(negative={"cap_feats": inputs["cap_feats"]}, alpha=ALPHA)  # negative == prompt
        torch.testing.assert_close(run(model, inputs), base, atol=1e-5, rtol=1e-5)
        assert guide.state.calls["guided"] == 1
        guide.update(negative={"cap_feats": negs})
        assert (run(model, inputs) - base).abs().max() > 1e-3
    assert all(procs[k] is v for k, v in processors(model).items())
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in model.modules())
    assert "forward" not in model.__dict__ and "forward" not in model.layers[0].__dict__
    assert not hasattr(model, "_nagkit_guide")
    assert torch.equal(run(model, inputs), base)
    # only the main layers' attention is guided, the refiners keep the stock processor
    guide = nagkit.apply(model, negative={"cap_feats": negs})
    seen = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, type(m.processor).__name__) and None)
               for n, m in model.named_modules() if n.endswith("attention")]
    run(model, inputs)
    for h in handles:
        h.remove()
    guide.remove()
    assert seen["layers.0.attention"] == "NAGZSingleStreamAttnProcessor"
    assert seen["context_refiner.0.attention"] == seen["noise_refiner.0.attention"] == "ZSingleStreamAttnProcessor"


def test_window_follows_the_reversed_timestep(model):
    """Z-Image pipelines pass ``(1000 − t)/1000``: the schedule position itself."""
    inputs, negs = make_inputs([5], t=0.3), captions([7])
    base = run(model, inputs)
    with nagkit.apply(model, negative={"cap_feats": negs}, scale=SCALE, start=0.4) as guide:
        assert torch.equal(run(model, inputs), base)
        assert guide.state.calls == {"guided": 0, "unguided": 1}
        guide.update(start=0.0, end=0.35)
        assert not torch.equal(run(model, inputs), base)
        guide.update(end=0.25)
        assert torch.equal(run(model, inputs), base)


@pytest.mark.parametrize("cap_len, neg_len", [(40, 5), (5, 40), (7, 9)], ids=["d+32", "d-32", "d0"])
def test_negative_stream_is_pinned_to_a_negative_alone_run(model, cap_len, neg_len):
    """The side-car negative at the first main layer equals the model's own caption stream in a run on the negative
    alone (its refiner, padding and pad token), and its RoPE rows are that run's shifted by ``d = E_p − E_n``
    (``d < 0``: rows off the RoPE table). Pins the layout code nagkit reuses (``_pad_with_ids``,
    ``_prepare_sequence``, ``context_refiner``) against diffusers changes."""
    inputs, neg = make_inputs([cap_len]), captions([neg_len])[0]
    x_len = image_tokens(model, inputs["x"][0])
    e_p, e_n = padded(cap_len), padded(neg_len)
    with nagkit.apply(model, negative={"cap_feats": [neg]}, scale=SCALE):
        guided = attention_inputs(model, inputs)
    alone = attention_inputs(model, {**inputs, "cap_feats": [neg]})
    length = x_len + e_p
    assert guided["hidden"].shape[1] == length + e_n
    torch.testing.assert_close(guided["hidden"][0, length:], alone["hidden"][0, x_len:], atol=1e-6, rtol=1e-6)
    side, own = guided["freqs"][0, length:], alone["freqs"][0, x_len:]
    torch.testing.assert_close(side, shift_axis0(model, own, e_p - e_n), atol=1e-6, rtol=1e-6)
    if e_p == e_n:
        assert torch.equal(side, own)  # the on-the-fly RoPE rows are the table's, bit for bit
    # the prompt's own sequence is untouched
    plain = attention_inputs(model, inputs)
    torch.testing.assert_close(guided["hidden"][0, :length], plain["hidden"][0], atol=1e-6, rtol=1e-6)
    assert torch.equal(guided["freqs"][0, :length], plain["freqs"][0])


def attention_inputs(model, inputs):
    """What ``layers[0].attention`` receives (its normalised, modulated input and the RoPE rows)."""
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("hidden", kwargs.get("hidden_states", args[0] if args else None))
        seen.setdefault("freqs", kwargs["freqs_cis"])

    handle = model.layers[0].attention.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run(model, inputs)
    finally:
        handle.remove()
    return seen


def test_unsupported_calls_are_refused(model):
    negs = captions([7])
    inputs = make_inputs([5, 5])
    with nagkit.apply(model, negative={"cap_feats": negs}):
        mixed = {**inputs, "x": [inputs["x"][0], torch.randn(16, 1, 16, 16)]}
        with pytest.raises(NotImplementedError, match="images of one size"):
            run(model, mixed)
        omni = {**inputs, "x": [[x] for x in inputs["x"]], "cap_feats": [[c] for c in inputs["cap_feats"]],
                "siglip_feats": [None, None], "image_noise_mask": [[1], [1]]}
        with pytest.raises(NotImplementedError, match="Omni mode.*not supported"):
            run(model, omni)
    with nagkit.apply(model, negative={"cap_feats": captions([7, 7, 7])}):
        with pytest.raises(ValueError, match="3 rows but the Z-Image denoiser was called with batch 2"):
            run(model, inputs)
    with pytest.raises(ValueError, match="official"):
        nagkit.apply(model, negative={"cap_feats": negs}, mode="official")
    with pytest.raises(ValueError, match="list takes one"):
        nagkit.apply(model, negative={"cap_feats": [torch.zeros(2, 3, C)]})


# ------------------------------------------------------------------------------------------------ pipelines
PROMPT, NEGATIVE = "a red cat sitting on a table", "blurry low quality"


@pytest.fixture(scope="module")
def pipe():
    return TINY_PIPELINES["tiny-z-image"](seed=0)


def generate(pipe, prompt=PROMPT, seeds=(0,), steps=2, guidance=0.0, name="tiny-z-image", **kwargs):
    call = dict(TINY_CALL_KWARGS[name], num_inference_steps=steps, output_type="latent", guidance_scale=guidance)
    call.update(kwargs)
    prompt = list(prompt) if isinstance(prompt, list) else prompt  # the pipeline rewrites a prompt list in place
    return pipe(prompt=prompt, generator=[torch.Generator().manual_seed(s) for s in seeds], **call)[0]


def test_pipeline_guides_identities_and_removal(pipe):
    base = generate(pipe)
    before = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, alpha=0.5) as guide:
        assert guide.config.tau == 2.5  # the z-image preset's
        guided = generate(pipe)
        assert guide.state.calls == {"guided": 2, "unguided": 0}
        assert (guided - base).abs().max() > 1e-4
        image = generate(pipe, output_type="pt")  # a full call, decoded
        assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
        guide.update(scale=1.0)
        assert torch.equal(generate(pipe), base)
        guide.update(scale=5.0, negative_prompt=PROMPT)
        torch.testing.assert_close(generate(pipe), base, atol=1e-5, rtol=1e-5)
    assert "encode_prompt" not in pipe.__dict__ and not hasattr(pipe, "_nagkit_guide")
    after = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    assert all(before[k] is after[k] for k in before)
    assert "forward" not in pipe.transformer.__dict__
    assert torch.equal(generate(pipe), base)


def test_pipeline_negative_in_embedding_form(pipe):
    """The NAG negative as a ``(1, tokens, channels)`` tensor, or by default the call's CFG negative given as the
    pipeline's list of embeddings, equals the same negative given as text."""
    embeds = pipe.encode_prompt(NEGATIVE, do_classifier_free_guidance=False)[0]
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0):
        text = generate(pipe)
        text_cfg = generate(pipe, guidance=2.0, negative_prompt=NEGATIVE)
    with nagkit.apply(pipe, negative_prompt_embeds=embeds[0][None], scale=5.0):
        torch.testing.assert_close(generate(pipe), text, atol=1e-6, rtol=1e-6)
    with nagkit.apply(pipe, scale=5.0):
        torch.testing.assert_close(generate(pipe, guidance=2.0, negative_prompt_embeds=embeds), text_cfg, atol=1e-6,
                                   rtol=1e-6)


def test_pipeline_step_matches_the_denoiser_reference(pipe):
    """One pipeline step: the denoiser call (captured) and the NAG negative (the pipeline's own encoding) give the
    reference's output."""
    seen = {}

    def grab(module, args, kwargs):
        seen.update(inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments)

    def keep(module, args, output):
        seen["out"] = torch.stack(output[0])

    handles = [pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True),
               pipe.transformer.register_forward_hook(keep)]
    try:
        with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=SCALE, tau=TAU, alpha=ALPHA):
            generate(pipe, steps=1)
    finally:
        for h in handles:
            h.remove()
    negative = pipe.encode_prompt(NEGATIVE, do_classifier_free_guidance=False)[0]
    inputs = {"x": seen["x"], "t": seen["t"], "cap_feats": seen["cap_feats"]}
    torch.testing.assert_close(seen["out"], reference(pipe.transformer, inputs, negative, [0]), atol=1e-5,
                               rtol=1e-5)


def test_pipeline_cfg_guides_only_the_conditional_rows(pipe):
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, o: outputs.append(torch.stack(o[0]).clone()))
    try:
        base_final = generate(pipe, guidance=3.0, negative_prompt="ugly")
        base, outputs[:] = list(outputs), []
        with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, alpha=0.5) as guide:
            final = generate(pipe, guidance=3.0, negative_prompt="ugly")
            assert guide.state.last_packing.rows == slice(0, 1) and guide.state.last_packing.batch == 2
    finally:
        handle.remove()
    assert (final - base_final).abs().max() > 1e-4
    torch.testing.assert_close(outputs[0][1:], base[0][1:], atol=1e-6, rtol=1e-6)  # [cond, uncond]
    assert (outputs[0][:1] - base[0][:1]).abs().max() > 1e-4


def test_pipeline_per_sample_negatives_and_images_per_prompt(pipe):
    prompts = ["a red cat sitting on a table", "a blue dog running in the snow under a big old tree near the "
               "house with a small green car and a yellow flower on the left side of a long road"]
    negatives = ["blurry low quality", "dark night"]
    with nagkit.apply(pipe, negative_prompt=negatives, scale=5.0, alpha=0.5) as guide:
        batch = generate(pipe, prompt=prompts, seeds=(0, 1), guidance=2.0)
        assert guide.state.last_packing.lp == 64  # the second prompt pads to 64, the first to 32
    for i in range(2):
        with nagkit.apply(pipe, negative_prompt=negatives[i], scale=5.0, alpha=0.5):
            single = generate(pipe, prompt=prompts[i], seeds=(i,), guidance=2.0)
        torch.testing.assert_close(batch[i:i + 1], single, atol=1e-5, rtol=1e-4)
    with nagkit.apply(pipe, negative_prompt=negatives, scale=5.0, alpha=0.5) as guide:
        four = generate(pipe, prompt=prompts, seeds=(0, 0, 1, 1), num_images_per_prompt=2)
        assert guide.state.last_packing.rows == slice(0, 4)  # no CFG: every row is guided
    torch.testing.assert_close(four[::2], batch_no_cfg(pipe, prompts, negatives), atol=1e-5, rtol=1e-4)


def batch_no_cfg(pipe, prompts, negatives):
    with nagkit.apply(pipe, negative_prompt=negatives, scale=5.0, alpha=0.5):
        return generate(pipe, prompt=prompts, seeds=(0, 1))


def test_pipeline_window(pipe):
    base = generate(pipe)
    first, second = sorted(1 - float(t) / 1000 for t in pipe.scheduler.timesteps)[:2]
    between = (first + second) / 2
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, start=between, end=between) as guide:
        assert torch.equal(generate(pipe), base)
        guide.update(start=0.0, end=between)  # the first step only
        first_only = generate(pipe)
        assert guide.state.calls == {"guided": 1, "unguided": 3}
    assert not torch.equal(first_only, base)


@pytest.mark.parametrize("kind", ["ZImageImg2ImgPipeline", "ZImageInpaintPipeline"])
def test_img2img_and_inpaint_pipelines(kind):
    from nagkit.adapters.zimage import tiny_zimage_pipeline

    pipe = tiny_zimage_pipeline(seed=0, kind=kind)
    extra = {"image": tiny_condition_image(64, 64), "strength": 0.9, "num_inference_steps": 3}
    if kind == "ZImageInpaintPipeline":
        mask = torch.zeros(1, 64, 64)
        mask[:, :, 32:] = 1
        extra["mask_image"] = mask
    base = generate(pipe, **extra)
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, alpha=0.5) as guide:
        guided = generate(pipe, **extra)
        assert guide.state.calls["guided"] >= 2
        guide.update(scale=1.0)
        assert torch.equal(generate(pipe, **extra), base)
    assert (guided - base).abs().max() > 1e-4
    assert torch.equal(generate(pipe, **extra), base)


@pytest.mark.parametrize("kind", ["ZImageControlNetPipeline", "ZImageControlNetInpaintPipeline"])
def test_controlnet_pipelines(kind):
    """The controlnet (unguided, fed the prompt) adds its residuals to the prompt's unified sequence; NAG runs beside
    it with batched CFG."""
    from nagkit.adapters.zimage import tiny_zimage_controlnet_pipeline

    pipe = tiny_zimage_controlnet_pipeline(seed=0, kind=kind)
    extra = {"control_image": tiny_condition_image(64, 64)}
    if kind == "ZImageControlNetInpaintPipeline":
        mask = torch.zeros(1, 64, 64)
        mask[:, :, 32:] = 1
        extra.update(image=tiny_condition_image(64, 64, seed=1), mask_image=mask)
    base = generate(pipe, guidance=2.0, **extra)
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, alpha=0.5) as guide:
        guided = generate(pipe, guidance=2.0, **extra)
        assert guide.state.calls == {"guided": 2, "unguided": 0}
        assert guide.state.last_packing.rows == slice(0, 1)
        guide.update(scale=1.0)
        assert torch.equal(generate(pipe, guidance=2.0, **extra), base)
    assert (guided - base).abs().max() > 1e-4
    assert torch.equal(generate(pipe, guidance=2.0, **extra), base)


def test_unsupported_pipeline_uses_are_refused(pipe):
    """Omni mode is refused by name; a call with ``prompt_embeds`` and no ``prompt`` (the pipeline then skips
    ``encode_prompt``, so no NAG negative is made) fails instead of running unguided."""
    from diffusers import ZImageOmniPipeline

    embeds = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)[0]
    with nagkit.apply(pipe, negative_prompt=NEGATIVE):
        with pytest.raises(RuntimeError, match="came without one"):
            pipe(prompt_embeds=embeds, height=64, width=64, num_inference_steps=1, guidance_scale=0.0,
                 output_type="latent")

    omni = ZImageOmniPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder,
                              tokenizer=pipe.tokenizer, transformer=pipe.transformer, siglip=None,
                              siglip_processor=None)
    with pytest.raises(TypeError, match="ZImageOmniPipeline.*supported pipelines: .*ZImagePipeline"):
        nagkit.apply(omni, negative_prompt=NEGATIVE)


# ------------------------------------------------------------------------------------------------ bench
def test_bench_counts_on_the_meta_device():
    """FLOP mode runs on the meta device; ``official`` (two full attentions per main layer) − ``nag`` is exactly the
    image→image attention computed once more per main layer."""
    from nagkit.bench import FamilySpec, Geometry, run_family

    spec = FamilySpec(
        name="tiny-z-image", title="tiny Z-Image", source="test", model_class="ZImageTransformer2DModel",
        attention="joint", inputs="zimage",
        config={"dim": 64, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 32,
                "axes_dims": [8, 12, 12], "axes_lens": [256, 64, 64]},
        geometry=Geometry(height=128, width=128, vae_scale=8, patch=2, latent_channels=16, text_tokens=32,
                          text_dim=32),
        text_linears=("cap_embedder.1", "context_refiner.*.attention.to_*", "context_refiner.*.feed_forward.*",
                      "layers.*.attention.to_q", "layers.*.attention.to_k", "layers.*.attention.to_v",
                      "layers.*.attention.to_out.0", "layers.*.feed_forward.*"),
        joint_attention=("layers.*.attention",))
    result = run_family(spec)
    v = result.variants
    assert result.nag_supported and v["nag-official"].flops is None
    image = spec.geometry.image_query_tokens
    assert v["official"].flops - v["nag"].flops == 2 * 4 * 64 * image * image
    assert v["nag"].flops > v["none"].flops and result.nag_minus_min == 0  # nagkit does the minimum
