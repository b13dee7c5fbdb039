"""A guest that never breaks its host: NAG together with ordinary diffusers features (issue 12's findings, one test
each): processor swaps after apply, set_default_attn_processor, IP-Adapter, pipelines without text encoders, caches,
layerwise casting, unusual Wan configs, replaced denoisers, copies, FLUX's default negative, attention backends."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from diffusers import FluxPipeline, WanTransformer3DModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

import nagkit
from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES

from .test_pipelines import generate

NEG = "blurry low quality"


@pytest.fixture(scope="module")
def sd15():
    return TINY_PIPELINES["tiny-sd15"](seed=0)


@pytest.fixture(scope="module")
def flux():
    return TINY_PIPELINES["tiny-flux"](seed=0)


def flux_call(model, pooled=True):
    """Seeded inputs of one bare FLUX transformer call and a NAG negative for it."""
    g = torch.Generator().manual_seed(0)
    li, lt, dim = 16, 6, model.config.joint_attention_dim
    inputs = dict(hidden_states=torch.randn(1, li, model.config.in_channels, generator=g),
                  encoder_hidden_states=torch.randn(1, lt, dim, generator=g),
                  pooled_projections=torch.randn(1, model.config.pooled_projection_dim, generator=g),
                  timestep=torch.tensor([0.6]), img_ids=torch.randn(li, 3, generator=g), txt_ids=torch.zeros(lt, 3),
                  return_dict=False)
    negative = {"encoder_hidden_states": torch.randn(1, 4, dim, generator=g)}
    if pooled:
        negative["pooled_projections"] = torch.randn(1, model.config.pooled_projection_dim, generator=g)
    return inputs, negative


def _attn2(unet):
    return {n: m for n, m in unet.named_modules() if n.endswith("attn2")}


# ---------------------------------------------------------------------------------------------------- finding 1
@pytest.mark.parametrize("swap", ["fuse_qkv_projections", "set_default_attn_processor", "set_attn_processor",
                                  "enable_attention_slicing"])
def test_processor_replaced_after_apply_is_rewrapped(sd15, swap):
    pipe = sd15
    plain = generate("tiny-sd15", pipe)
    with nagkit.apply(pipe, negative_prompt=NEG, scale=5.0, alpha=0.5):
        guided = generate("tiny-sd15", pipe)
        original = dict(pipe.unet.attn_processors)
        try:
            if swap == "fuse_qkv_projections":
                pipe.fuse_qkv_projections()
            elif swap == "set_default_attn_processor":
                pipe.unet.set_default_attn_processor()
            elif swap == "set_attn_processor":
                pipe.unet.set_attn_processor(AttnProcessor2_0())
            else:
                pipe.enable_attention_slicing(1)
            swapped = generate("tiny-sd15", pipe)
        finally:
            if swap == "fuse_qkv_projections":
                pipe.unfuse_qkv_projections()
            pipe.unet.set_attn_processor(original)
    torch.testing.assert_close(swapped, guided, atol=1e-4, rtol=1e-4)  # still NAG, with the new kernel
    assert (swapped - plain).abs().max() > 1e-3


def test_unsupported_processor_is_refused_naming_module_and_class(sd15):
    pipe = sd15

    class MyProcessor(AttnProcessor2_0):
        pass

    class Foreign:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    original = dict(pipe.unet.attn_processors)
    with nagkit.apply(pipe, negative_prompt=NEG, scale=5.0, alpha=0.5) as guide:
        try:
            pipe.unet.set_attn_processor(MyProcessor())  # a subclass of a supported processor: still guided
            generate("tiny-sd15", pipe)
            pipe.unet.set_attn_processor(Foreign())
            with pytest.raises(NotImplementedError, match=r"attn2' of UNet2DConditionModel now uses Foreign"):
                generate("tiny-sd15", pipe)
            guide.update(scale=1.0)  # NAG off: the host's own processor runs, nothing is packed
            generate("tiny-sd15", pipe)
        finally:
            pipe.unet.set_attn_processor(original)


# ---------------------------------------------------------------------------------------------------- finding 2
def test_set_default_attn_processor_works_at_scale_one_and_between_calls(sd15):
    pipe = sd15
    original = dict(pipe.unet.attn_processors)
    base = generate("tiny-sd15", pipe)
    with nagkit.apply(pipe, negative_prompt=NEG, scale=1.0):
        pipe.unet.set_default_attn_processor()  # raised "Cannot call set_default_attn_processor" before
        assert all(type(p) is AttnProcessor for p in pipe.unet.attn_processors.values())
        torch.testing.assert_close(generate("tiny-sd15", pipe), base, atol=1e-5, rtol=1e-5)
    pipe.unet.set_attn_processor(original)


# ---------------------------------------------------------------------------------------------------- finding 3
def _ip_adapter(unet, tokens=4, embed_dim=8, seed=0):
    """Install a seeded random IP-Adapter the way ``_load_ip_adapter_weights`` does (processors + projection)."""
    torch.manual_seed(seed)
    procs = {}
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            module = unet.get_submodule(name[: -len(".processor")])
            procs[name] = IPAdapterAttnProcessor2_0(hidden_size=module.to_q.out_features,
                                                    cross_attention_dim=unet.config.cross_attention_dim,
                                                    num_tokens=(tokens,), scale=1.0)
            for layer in [*procs[name].to_k_ip, *procs[name].to_v_ip]:
                torch.nn.init.normal_(layer.weight, std=0.5)
        else:
            procs[name] = type(proc)()
    unet.set_attn_processor(procs)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([ImageProjection(
        cross_attention_dim=unet.config.cross_attention_dim, image_embed_dim=embed_dim, num_image_text_embeds=tokens)])
    unet.config.encoder_hid_dim_type = "ip_image_proj"


def test_ip_adapter_loaded_after_apply_is_guided_and_not_negated():
    unet = TINY_PIPELINES["tiny-sd15"](seed=0).unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 7, unet.config.cross_attention_dim, generator=g)
    negative = {"encoder_hidden_states": torch.randn(1, 5, unet.config.cross_attention_dim, generator=g)}
    image = torch.randn(1, 1, 8, generator=g)

    def run(**extra):
        with torch.no_grad():
            return unet(x, 500, text, **extra).sample

    guided_text_only = None
    with nagkit.apply(unet, negative=negative, scale=5.0, alpha=0.5) as guide:
        guided_text_only = run()
        _ip_adapter(unet)  # loading after apply: diffusers re-creates the other processors with no arguments
        guided = run(added_cond_kwargs={"image_embeds": [image]})
        guide.update(scale=1.0)
        plain_ip = run(added_cond_kwargs={"image_embeds": [image]})
        guide.update(scale=5.0)
        for proc in unet.attn_processors.values():
            if isinstance(proc, IPAdapterAttnProcessor2_0):
                proc.scale = [0.0]
        no_ip = run(added_cond_kwargs={"image_embeds": [image]})
    assert (guided - plain_ip).abs().max() > 1e-3  # NAG acts with the IP-Adapter
    assert (guided - guided_text_only).abs().max() > 1e-3  # and the image tokens act
    torch.testing.assert_close(no_ip, guided_text_only, atol=1e-5, rtol=1e-5)  # IP scale 0 = NAG on text alone


def test_nag_processors_take_no_constructor_arguments(flux):
    from nagkit.adapters.flux import NAGFluxAttnProcessor
    from nagkit.adapters.unet import NAGAttnProcessor2_0

    for klass in (NAGFluxAttnProcessor, NAGAttnProcessor2_0):
        assert klass().packing is None
    with nagkit.apply(flux, negative_prompt=NEG, scale=5.0):
        # Flux IP-Adapter loading re-creates every processor by calling its class with no arguments
        flux.transformer.set_attn_processor({k: type(v)() for k, v in flux.transformer.attn_processors.items()})
        generate("tiny-flux", flux)


# ---------------------------------------------------------------------------------------------------- finding 4
@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-flux", "tiny-pixart-sigma"])
def test_pipeline_without_text_encoders_takes_embedding_negatives(name):
    pipe = TINY_PIPELINES[name](seed=0)
    call = dict(TINY_CALL_KWARGS[name], num_inference_steps=2, output_type="latent")
    if name != "tiny-flux":
        call["guidance_scale"] = 1.0  # the pipeline's own CFG would need its text encoder for its "" negative
    device = torch.device("cpu")
    kwargs = {k: call[k] for k in ("max_sequence_length",) if k in call}
    if name == "tiny-flux":
        pos, pooled, _ = pipe.encode_prompt("a red cat", None, device=device, **kwargs)
        neg, neg_pooled, _ = pipe.encode_prompt(NEG, None, device=device, **kwargs)
        prompt = {"prompt_embeds": pos, "pooled_prompt_embeds": pooled}
        negative = {"negative_prompt_embeds": neg, "negative_pooled_prompt_embeds": neg_pooled}
    elif name == "tiny-pixart-sigma":
        pos, pos_mask, _, _ = pipe.encode_prompt("a red cat", do_classifier_free_guidance=False, device=device,
                                                 clean_caption=False, **kwargs)
        neg, neg_mask, _, _ = pipe.encode_prompt(NEG, do_classifier_free_guidance=False, device=device,
                                                 clean_caption=False, **kwargs)
        prompt = {"prompt_embeds": pos, "prompt_attention_mask": pos_mask}
        negative = {"negative_prompt_embeds": neg, "negative_prompt_attention_mask": neg_mask}
    else:
        pos, _ = pipe.encode_prompt("a red cat", device, 1, False)
        neg, _ = pipe.encode_prompt(NEG, device, 1, False)
        prompt, negative = {"prompt_embeds": pos}, {"negative_prompt_embeds": neg}
    gen = torch.Generator()

    def run(p, **extra):
        return p(prompt=None, generator=gen.manual_seed(0), **prompt, **call, **extra)[0]

    with nagkit.apply(pipe, negative_prompt=NEG, scale=5.0, alpha=0.5):
        reference = run(pipe)
    pipe.text_encoder = None
    if hasattr(pipe, "text_encoder_2"):
        pipe.text_encoder_2 = None
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        nagkit.apply(pipe, negative_prompt=NEG)
    with nagkit.apply(pipe, scale=5.0, alpha=0.5, **negative):
        torch.testing.assert_close(run(pipe), reference, atol=1e-5, rtol=1e-5)
    if name != "tiny-flux":  # default NAG negative = the call's CFG negative, here in embedding form
        with nagkit.apply(pipe, scale=5.0, alpha=0.5):
            torch.testing.assert_close(run(pipe, negative_prompt=None, **negative), reference, atol=1e-5, rtol=1e-5)
    with nagkit.apply(pipe, scale=5.0, alpha=0.5), pytest.raises(ValueError, match="cannot encode the NAG negative"):
        run(pipe)  # nothing to take the negative from: a clear error, not 'NoneType has no attribute tokenize'


# ---------------------------------------------------------------------------------------------------- finding 6
def test_layerwise_casting_fp8_storage(flux):
    model = TINY_PIPELINES["tiny-flux"](seed=0).transformer
    inputs, negative = flux_call(model)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with torch.no_grad():
        plain = model(**inputs)[0]
        with nagkit.apply(model, negative=negative, scale=5.0, alpha=0.5) as guide:
            guided = model(**inputs)[0]
            guide.update(scale=1.0)
            assert torch.equal(model(**inputs)[0], plain)
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------- finding 7
def test_wan_image_context_without_added_kv_projection():
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                  out_channels=16, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", image_dim=12,
                                  added_kv_proj_dim=None, rope_max_seq_len=32).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    text = torch.randn(1, 7, 16, generator=g)
    image = torch.randn(1, 5, 12, generator=g)
    with torch.no_grad():
        plain = model(x, torch.tensor([500.0]), text, encoder_hidden_states_image=image, return_dict=False)[0]
        with nagkit.apply(model, negative={"encoder_hidden_states": text}, scale=5.0, alpha=0.5) as guide:
            same = model(x, torch.tensor([500.0]), text, encoder_hidden_states_image=image, return_dict=False)[0]
            guide.update(negative={"encoder_hidden_states": torch.randn(1, 4, 16, generator=g)})
            guided = model(x, torch.tensor([500.0]), text, encoder_hidden_states_image=image, return_dict=False)[0]
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)  # negative == prompt: identity
    assert (guided - plain).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------- finding 8
def test_replaced_denoiser_is_followed_and_shared_one_refused():
    pipe = TINY_PIPELINES["tiny-sd15"](seed=0)
    other = TINY_PIPELINES["tiny-sd15"](seed=1).unet
    first = pipe.unet
    with nagkit.apply(pipe, negative_prompt=NEG, scale=5.0, alpha=0.5) as guide:
        pipe.unet = other
        guided_other = generate("tiny-sd15", pipe)
        assert guide.denoisers == [other] and "forward" not in first.__dict__
    plain_other = generate("tiny-sd15", pipe)
    with nagkit.apply(pipe, negative_prompt=NEG, scale=5.0, alpha=0.5):
        torch.testing.assert_close(generate("tiny-sd15", pipe), guided_other, atol=1e-6, rtol=1e-6)
        sibling = type(pipe).from_pipe(pipe)  # shares the guided UNet
        with pytest.raises(RuntimeError, match="from_pipe"):
            generate("tiny-sd15", sibling)
    assert (guided_other - plain_other).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------- finding 9
def test_deepcopy_is_an_independent_guided_copy_and_pickle_is_refused(sd15):
    pipe = sd15
    plain = generate("tiny-sd15", pipe)
    guide = nagkit.apply(pipe, negative_prompt=NEG, scale=5.0, alpha=0.5)
    guided = generate("tiny-sd15", pipe)
    twin = copy.deepcopy(pipe)
    lone = copy.deepcopy(pipe.unet)  # a pipeline's denoiser copied alone: a plain copy, the original stays guided
    assert "nagkit" not in getattr(getattr(lone, "_diffusers_hook", None), "hooks", {})
    assert "forward" not in lone.__dict__ and not hasattr(lone, "_nagkit_guide")
    torch.testing.assert_close(generate("tiny-sd15", pipe), guided, atol=1e-6, rtol=1e-6)
    guide.update(scale=1.0)
    torch.testing.assert_close(generate("tiny-sd15", twin), guided, atol=1e-6, rtol=1e-6)
    guide.remove()
    torch.testing.assert_close(generate("tiny-sd15", twin), guided, atol=1e-6, rtol=1e-6)
    assert torch.equal(generate("tiny-sd15", pipe), plain)
    twin._nagkit_guide.remove()
    torch.testing.assert_close(generate("tiny-sd15", twin), plain, atol=1e-6, rtol=1e-6)
    with nagkit.apply(pipe.unet, negative={"encoder_hidden_states": torch.randn(1, 3, 32)}):
        with pytest.raises(TypeError, match="cannot pickle a UNet2DConditionModel with NAG installed"):
            pickle.dumps(pipe.unet)
    assert pickle.loads(pickle.dumps(pipe.unet)) is not None  # fine again after remove


# ---------------------------------------------------------------------------------------------------- finding 10
def test_flux_default_negative_is_the_call_negative_prompt(flux):
    assert isinstance(flux, FluxPipeline)
    with nagkit.apply(flux, negative_prompt="ugly dark", scale=5.0, alpha=0.5):
        explicit = generate("tiny-flux", flux)
    with nagkit.apply(flux, scale=5.0, alpha=0.5):
        default = generate("tiny-flux", flux, negative_prompt="ugly dark")  # true_cfg_scale 1: CFG itself is off
    torch.testing.assert_close(default, explicit, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- finding 11
@pytest.mark.parametrize("backend", ["_native_math", "flex"])
def test_guided_attention_uses_the_module_backend(flux, backend):
    from diffusers.models import attention_dispatch as ad

    model = flux.transformer
    inputs, negative = flux_call(model, pooled=False)
    with torch.no_grad(), nagkit.apply(model, negative=negative, scale=5.0, alpha=0.5):
        default = model(**inputs)[0]
        name = ad.AttentionBackendName(backend)
        original = ad._AttentionBackendRegistry._backends[name]
        calls = []

        def counting(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        ad._AttentionBackendRegistry._backends[name] = counting
        active = ad._AttentionBackendRegistry._active_backend
        try:
            model.set_attention_backend(backend)
            chosen = model(**inputs)[0]
        finally:
            ad._AttentionBackendRegistry._backends[name] = original
            model.reset_attention_backend()
            # diffusers' set_attention_backend also sets the process-wide active backend, which its reset leaves
            ad._AttentionBackendRegistry._active_backend = active
    # 3 blocks: text segments (and, without an LSE from this backend, both image attentions) through the backend
    assert len(calls) >= 2 * 3
    torch.testing.assert_close(chosen, default, atol=1e-4, rtol=1e-4)


def test_sd3_fused_qkv_after_apply_is_still_guided():
    pipe = TINY_PIPELINES["tiny-sd3"](seed=0)
    with nagkit.apply(pipe, negative_prompt=NEG, scale=5.0, alpha=0.5):
        guided = generate("tiny-sd3", pipe)
        pipe.transformer.fuse_qkv_projections()
        fused = generate("tiny-sd3", pipe)
    torch.testing.assert_close(fused, guided, atol=1e-4, rtol=1e-4)
