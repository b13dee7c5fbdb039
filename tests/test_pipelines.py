"""NAG installed on whole tiny pipelines: identities, CFG, batches, windows, removal, updates, offload, errors."""

from __future__ import annotations

import pytest
import torch

import nagkit
from nagkit.adapters import NAGProcessor
from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES, tiny_condition_image

ALL = ["tiny-sd15", "tiny-sdxl", "tiny-wan", "tiny-wan22", "tiny-wan-i2v", "tiny-pixart-sigma", "tiny-sana",
       "tiny-chroma", "tiny-sd3", "tiny-sd35", "tiny-flux", "tiny-flux-dev", "tiny-flux-kontext"]
# [uncond, cond] in one denoiser call; the others (Wan, Flux true CFG) make separate cond / uncond calls
BATCHED_CFG = {"tiny-sd15", "tiny-sdxl", "tiny-pixart-sigma", "tiny-sana", "tiny-sd3", "tiny-sd35"}
FLUX = {"tiny-flux", "tiny-flux-dev", "tiny-flux-kontext"}
PROMPT, NEGATIVE = "a red cat sitting on a table", "blurry low quality"


@pytest.fixture(scope="module", params=ALL)
def tiny(request):
    return request.param, TINY_PIPELINES[request.param](seed=0)


def generate(name, pipe, prompt=PROMPT, seeds=(0,), steps=2, guidance=1.0, **kwargs):
    """``guidance`` is the pipeline's CFG scale (Flux: ``true_cfg_scale``; its ``guidance_scale`` stays default)."""
    call = dict(TINY_CALL_KWARGS[name], num_inference_steps=steps, output_type="latent")
    call["true_cfg_scale" if name in FLUX else "guidance_scale"] = guidance
    if name == "tiny-wan-i2v":
        call["image"] = tiny_condition_image()
    if name == "tiny-flux-kontext":
        call["image"] = tiny_condition_image(64, 64)
    call.update(kwargs)
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompt=prompt, generator=generator, **call)[0]


def denoisers(pipe):
    return [m for m in (getattr(pipe, a, None) for a in ("unet", "transformer", "transformer_2")) if m is not None]


def processor_map(pipe):
    return {(i, n): m.processor for i, d in enumerate(denoisers(pipe)) for n, m in d.named_modules()
            if hasattr(m, "processor")}


def test_guides_and_removes_without_a_trace(tiny):
    name, pipe = tiny
    base = generate(name, pipe)
    before = processor_map(pipe)
    guide = nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, tau=2.5, alpha=0.5, end=1.0)
    assert "encode_prompt" in pipe.__dict__
    guided = generate(name, pipe)
    assert guide.state.calls["guided"] >= 2
    assert (guided - base).abs().max() > 1e-4
    guide.remove()
    assert "encode_prompt" not in pipe.__dict__ and not hasattr(pipe, "_nagkit_guide")
    assert "check_inputs" not in pipe.__dict__
    after = processor_map(pipe)
    assert all(before[k] is after[k] for k in before)
    for d in denoisers(pipe):
        assert "forward" not in d.__dict__
        assert "nagkit" not in getattr(getattr(d, "_diffusers_hook", None), "hooks", {})
    assert torch.equal(generate(name, pipe), base)


def test_identities(tiny):
    name, pipe = tiny
    extra = {"complex_human_instruction": None} if name == "tiny-sana" else {}
    base = generate(name, pipe, **extra)
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=1.0, end=1.0) as guide:
        assert torch.equal(generate(name, pipe, **extra), base)
        guide.update(scale=5.0, alpha=0.0)
        assert torch.equal(generate(name, pipe, **extra), base)
        guide.update(negative_prompt=PROMPT, alpha=0.5)
        torch.testing.assert_close(generate(name, pipe, **extra), base, atol=1e-5, rtol=1e-5)
        assert guide.state.calls["guided"] >= 2


def test_cfg_guides_only_the_conditional_branch(tiny):
    name, pipe = tiny
    outputs = []

    def record(module, args, output):
        outputs.append(output[0].detach().clone())

    handles = [d.register_forward_hook(record) for d in denoisers(pipe)]
    try:
        base_final = generate(name, pipe, guidance=3.0, negative_prompt="ugly")
        base = list(outputs)
        outputs.clear()
        with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, alpha=0.5, end=1.0) as guide:
            final = generate(name, pipe, guidance=3.0, negative_prompt="ugly")
            calls = dict(guide.state.calls)
    finally:
        for h in handles:
            h.remove()
    assert (final - base_final).abs().max() > 1e-4
    if name in BATCHED_CFG:  # first step: [uncond, cond] rows of one call
        b = base[0].shape[0] // 2
        torch.testing.assert_close(outputs[0][:b], base[0][:b], atol=1e-6, rtol=1e-6)
        assert (outputs[0][b:] - base[0][b:]).abs().max() > 1e-4
        assert guide.state.last_packing.rows == slice(b, 2 * b)
    else:  # Wan, Flux: separate cond / uncond calls; the uncond call is not touched at all
        assert torch.equal(outputs[1], base[1])
        assert (outputs[0] - base[0]).abs().max() > 1e-4
        assert calls == {"guided": 2, "unguided": 2}


def test_per_sample_negatives_equal_single_runs(tiny):
    name, pipe = tiny
    prompts = ["a red cat sitting on a table", "a blue dog running in the snow"]
    negatives = ["blurry low quality", "dark night"]
    with nagkit.apply(pipe, negative_prompt=negatives, scale=5.0, alpha=0.5):
        batch = generate(name, pipe, prompt=prompts, seeds=(0, 1), guidance=2.0)
    for i in range(2):
        with nagkit.apply(pipe, negative_prompt=negatives[i], scale=5.0, alpha=0.5):
            single = generate(name, pipe, prompt=prompts[i], seeds=(i,), guidance=2.0)
        torch.testing.assert_close(batch[i:i + 1], single, atol=1e-5, rtol=1e-4)


def test_window(tiny):
    name, pipe = tiny
    base = generate(name, pipe)
    first, second = sorted(1 - float(t) / 1000 for t in pipe.scheduler.timesteps)[:2]  # positions u = 1 - t/T
    between = (first + second) / 2
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0, start=between, end=between) as guide:
        assert torch.equal(generate(name, pipe), base)  # no step inside the window: exactly the base pipeline
        assert guide.state.calls["guided"] == 0
        guide.update(start=0.0, end=1.0)
        everywhere = generate(name, pipe)
        guide.update(end=between)  # the first step only
        guide.state.calls.update(guided=0, unguided=0)
        first_only = generate(name, pipe)
        assert guide.state.calls == {"guided": 1, "unguided": 1}
    assert not torch.equal(first_only, base) and not torch.equal(first_only, everywhere)


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-pixart-sigma", "tiny-wan"])
def test_images_per_prompt_and_encoder_settings(name):
    pipe = TINY_PIPELINES[name](seed=0)
    count = "num_videos_per_prompt" if "wan" in name else "num_images_per_prompt"
    extra = {count: 2}
    if name == "tiny-pixart-sigma":
        extra["max_sequence_length"] = 16
    with nagkit.apply(pipe, negative_prompt=["dark", "blurry"], scale=5.0) as guide:
        out = generate(name, pipe, prompt=["a red cat", "a blue dog"], seeds=(0, 1, 2, 3), **extra)
        packing = guide.state.last_packing
    assert out.shape[0] == 4 and packing.batch == 4
    if name == "tiny-pixart-sigma":
        # the negative was encoded with the call's max_sequence_length, then its padding dropped (exact: masked)
        assert packing.lp == 16 and 1 <= packing.ln < 16
    if name == "tiny-wan":
        assert packing.lp == packing.ln == 512


def test_default_negative_is_the_cfg_negative():
    name = "tiny-sdxl"
    pipe = TINY_PIPELINES[name](seed=0)
    with nagkit.apply(pipe, scale=5.0):
        default = generate(name, pipe, negative_prompt="dark")
        empty = generate(name, pipe)
    with nagkit.apply(pipe, negative_prompt="dark", scale=5.0):
        explicit = generate(name, pipe)
    with nagkit.apply(pipe, negative_prompt="", scale=5.0):
        explicit_empty = generate(name, pipe)
    assert torch.equal(default, explicit) and torch.equal(empty, explicit_empty)
    assert not torch.equal(default, empty)


def test_precomputed_negative_embeddings_match_text():
    name = "tiny-pixart-sigma"
    pipe = TINY_PIPELINES[name](seed=0)
    emb, mask, _, _ = pipe.encode_prompt("dark night", do_classifier_free_guidance=False, max_sequence_length=32)
    with nagkit.apply(pipe, negative_prompt="dark night", scale=5.0):
        from_text = generate(name, pipe)
    with nagkit.apply(pipe, negative={"encoder_hidden_states": emb, "encoder_attention_mask": mask}, scale=5.0):
        from_embeds = generate(name, pipe)
    torch.testing.assert_close(from_text, from_embeds, atol=1e-6, rtol=1e-6)


def test_exception_inside_generation_leaves_pipeline_usable():
    name = "tiny-sd15"
    pipe = TINY_PIPELINES[name](seed=0)
    base = generate(name, pipe)
    guide = nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0)
    good = generate(name, pipe)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        generate(name, pipe, callback_on_step_end=boom)
    assert guide.state.packing is None
    assert torch.equal(generate(name, pipe), good)
    guide.remove()
    assert torch.equal(generate(name, pipe), base)


def test_model_cpu_offload_before_or_after():
    name = "tiny-sd15"
    pipe = TINY_PIPELINES[name](seed=0)
    base = generate(name, pipe)
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0):
        expected = generate(name, pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    guide = nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0)  # after offload
    for _ in range(2):  # offload hooks are re-created after every call; NAG must stay in place
        torch.testing.assert_close(generate(name, pipe), expected, atol=1e-6, rtol=1e-6)
    assert guide.state.calls["guided"] == 4
    guide.remove()
    assert torch.equal(generate(name, pipe), base)
    assert hasattr(pipe.unet, "_hf_hook")  # the offload hook is still in place

    fresh = TINY_PIPELINES[name](seed=0)
    guide = nagkit.apply(fresh, negative_prompt=NEGATIVE, scale=5.0)  # before offload
    fresh.enable_model_cpu_offload(device="cpu")
    for _ in range(2):
        torch.testing.assert_close(generate(name, fresh), expected, atol=1e-6, rtol=1e-6)
    guide.remove()
    assert torch.equal(generate(name, fresh), base)


def test_update_takes_effect_on_next_call():
    name = "tiny-wan"
    pipe = TINY_PIPELINES[name](seed=0)
    with nagkit.apply(pipe, negative_prompt="dark", scale=5.0) as guide:
        a = generate(name, pipe)
        guide.update(negative_prompt="pink flowers", scale=3.0)
        assert guide.config.scale == 3.0
        b = generate(name, pipe)
    assert not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- errors
class FakePipeline:
    components: dict = {}

    def encode_prompt(self, prompt):
        return prompt


def test_unsupported_targets_are_named():
    with pytest.raises(TypeError, match="FakePipeline.*supported pipelines: .*StableDiffusionXLPipeline"):
        nagkit.apply(FakePipeline(), negative_prompt="x")
    with pytest.raises(TypeError, match="Linear.*supported denoisers: .*UNet2DConditionModel"):
        nagkit.apply(torch.nn.Linear(2, 2), negative={"encoder_hidden_states": torch.zeros(1, 1, 2)})
    with pytest.raises(TypeError, match="str.*supported pipelines"):
        nagkit.apply("stabilityai/sdxl", negative_prompt="x")


def test_bad_input_errors():
    name = "tiny-sd15"
    pipe = TINY_PIPELINES[name](seed=0)
    unet = pipe.unet
    with pytest.raises(ValueError, match="needs negative="):
        nagkit.apply(unet)
    with pytest.raises(ValueError, match="negative_prompt needs a pipeline"):
        nagkit.apply(unet, negative_prompt="x")
    with pytest.raises(ValueError, match="give one of negative_prompt, negative"):
        nagkit.apply(pipe, negative_prompt="x", negative={"encoder_hidden_states": torch.zeros(1, 2, 32)})
    with pytest.raises(ValueError, match="keys .*'prompt_embeds'"):
        nagkit.apply(unet, negative={"prompt_embeds": torch.zeros(1, 2, 32)})
    with pytest.raises(ValueError, match=r"\(batch, tokens, channels\)"):
        nagkit.apply(unet, negative={"encoder_hidden_states": torch.zeros(2, 32)})
    with pytest.raises(ValueError, match="encoder_attention_mask.*matching"):
        nagkit.apply(unet, negative={"encoder_hidden_states": torch.zeros(1, 2, 32),
                                     "encoder_attention_mask": torch.ones(1, 3)})
    with pytest.raises(TypeError, match="list of strings"):
        nagkit.apply(pipe, negative_prompt=["a", 3])
    with pytest.raises(ValueError, match="tau must be"):
        nagkit.apply(pipe, negative_prompt="x", tau=0)
    with pytest.raises(ValueError, match="alpha must be in"):
        nagkit.apply(pipe, negative_prompt="x", alpha=2)
    with pytest.raises(ValueError, match="start must be <= end"):
        nagkit.apply(pipe, negative_prompt="x", start=0.5, end=0.2)
    with pytest.raises(KeyError, match="known presets"):
        nagkit.apply(pipe, negative_prompt="x", preset="nope")
    # nothing was left behind by the failed calls
    assert "encode_prompt" not in pipe.__dict__
    assert all(not isinstance(p, NAGProcessor) for p in unet.attn_processors.values())

    guide = nagkit.apply(pipe, negative_prompt=["a", "b", "c"], scale=5.0)
    with pytest.raises(RuntimeError, match="already applied"):
        nagkit.apply(pipe, negative_prompt="x")
    with pytest.raises(RuntimeError, match="already applied"):
        nagkit.apply(unet, negative={"encoder_hidden_states": torch.zeros(1, 2, 32)})
    with pytest.raises(ValueError, match="3 entries but the call has 1 prompts"):
        generate(name, pipe)
    with pytest.raises(RuntimeError, match="encodes the negative once per pipeline call"):
        unet(torch.zeros(1, 4, 8, 8), 10, torch.zeros(1, 77, 32))
    guide.remove()
    with pytest.raises(RuntimeError, match="was removed"):
        guide.update(scale=2.0)

    from diffusers.models.attention_processor import AttnAddedKVProcessor

    unet.set_attn_processor(AttnAddedKVProcessor())
    try:
        with pytest.raises(NotImplementedError, match="uses AttnAddedKVProcessor, which nagkit cannot guide"):
            nagkit.apply(pipe, negative_prompt="x")
        assert "encode_prompt" not in pipe.__dict__
    finally:
        unet.set_default_attn_processor()


def test_model_level_batch_mismatch_is_an_error():
    pipe = TINY_PIPELINES["tiny-sd15"](seed=0)
    unet = pipe.unet
    dim = unet.config.cross_attention_dim
    with nagkit.apply(unet, negative={"encoder_hidden_states": torch.zeros(3, 5, dim)}):
        with pytest.raises(ValueError, match="negative has 3 rows but the denoiser was called with batch 2"):
            unet(torch.zeros(2, 4, 8, 8), 10, torch.zeros(2, 7, dim))
    with nagkit.apply(unet, negative={"encoder_hidden_states": torch.zeros(1, 5, dim + 1)}):
        with pytest.raises(ValueError, match="channels"):
            unet(torch.zeros(1, 4, 8, 8), 10, torch.zeros(1, 7, dim))


def test_negative_is_encoded_with_the_calls_settings():
    name = "tiny-sdxl"
    pipe = TINY_PIPELINES[name](seed=0)
    seen = []
    original = pipe.encode_prompt

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    pipe.encode_prompt = spy  # a user's own instance attribute must survive apply/remove
    with nagkit.apply(pipe, negative_prompt="dark", scale=5.0):
        generate(name, pipe, guidance=2.0, negative_prompt="ugly", num_images_per_prompt=2,
                 seeds=(0, 1))
    assert pipe.encode_prompt is spy
    call, negative = seen
    assert negative["prompt"] == ["dark"] and negative["do_classifier_free_guidance"] is False
    assert negative["negative_prompt"] is None and negative["prompt_embeds"] is None
    for key in ("clip_skip", "num_images_per_prompt", "lora_scale", "device"):
        assert negative[key] == call[key], key


def test_short_negative():
    name = "tiny-flux"
    pipe = TINY_PIPELINES[name](seed=0)
    with nagkit.apply(pipe, negative_prompt="dark", scale=5.0) as guide:
        full = generate(name, pipe)
        assert guide.state.last_packing.ln == TINY_CALL_KWARGS[name]["max_sequence_length"]
    with nagkit.apply(pipe, negative_prompt="dark", scale=5.0, negative_max_length=8) as guide:
        short = generate(name, pipe)
        assert guide.state.last_packing.ln == 8
    assert not torch.equal(short, full)  # T5 padding tokens are keys too on Flux (no text mask)
    with pytest.raises(ValueError, match="negative_max_length must be a positive int"):
        nagkit.apply(pipe, negative_prompt="dark", negative_max_length=0)
    sd = TINY_PIPELINES["tiny-sd15"](seed=0)
    with nagkit.apply(sd, negative_prompt="dark", negative_max_length=8):
        with pytest.raises(ValueError, match="negative_max_length needs a pipeline"):
            generate("tiny-sd15", sd)


def test_ip_adapter_processors_get_a_clear_error():
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    pipe = TINY_PIPELINES["tiny-flux"](seed=0)
    attn = pipe.transformer.transformer_blocks[0].attn
    attn.set_processor(FluxIPAdapterAttnProcessor(hidden_size=attn.inner_dim, cross_attention_dim=8))
    with pytest.raises(NotImplementedError, match="uses FluxIPAdapterAttnProcessor, which nagkit cannot guide"):
        nagkit.apply(pipe, negative_prompt="x")
    assert "encode_prompt" not in pipe.__dict__


def test_lora_loaded_pipeline():
    peft = pytest.importorskip("peft")
    name = "tiny-flux"
    pipe = TINY_PIPELINES[name](seed=0)
    config = peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"])
    torch.manual_seed(0)
    pipe.transformer.add_adapter(config)
    base = generate(name, pipe)
    with nagkit.apply(pipe, negative_prompt=PROMPT, scale=5.0):  # negative == prompt: identity through LoRA layers
        torch.testing.assert_close(generate(name, pipe), base, atol=1e-5, rtol=1e-5)
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0) as guide:
        guided = generate(name, pipe)
        assert guide.state.calls["guided"] == 2
    assert (guided - base).abs().max() > 1e-4
    assert torch.equal(generate(name, pipe), base)
    assert any("lora" in n for n, _ in pipe.transformer.named_modules())


def test_failed_call_between_encoding_and_denoising_leaves_no_stale_negative():
    name = "tiny-chroma"  # no cache_context: unconditional calls are told apart by their text
    pipe = TINY_PIPELINES[name](seed=0)
    base = generate(name, pipe, prompt="a blue dog")
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0) as guide:
        with pytest.raises(Exception):  # noqa: B017 - fails in prepare_latents, after encode_prompt
            generate(name, pipe, prompt="a red cat", latents=torch.zeros(1, 1, 1))
        guide.state.calls.update(guided=0, unguided=0)
        out = generate(name, pipe, prompt="a blue dog", guidance=2.0)
        assert guide.state.calls == {"guided": 2, "unguided": 2}
    assert not torch.equal(out, base)
