"""NAG on the remaining pipeline variants of Qwen-Image (Edit Inpaint, ControlNet, ControlNet Inpaint, Layered),
SDXL (ControlNet-Union text-to-image / img2img / inpaint) and FLUX.1 (Kontext Inpaint), built from the families' tiny
seeded components: a Qwen-Image ControlNet (1 block) from the tiny transformer, the Layered model (the tiny
transformer's config with ``use_layer3d_rope`` and ``use_additional_t_cond``), a tiny ``ControlNetUnionModel`` whose
task-embedding / fusion width follows the tiny UNet's first block (16) instead of the 320 its ``from_unet`` hard-codes,
ControlNets' zero-initialised output layers redrawn so the residuals matter.

For every variant: listed in ``nagkit.PIPELINES`` with its base pipeline's spec; scale 1 bit-identical to the plain
pipeline; NAG changes the output and equals NAG installed on the variant's own denoiser with the negative encoded by
the variant's ``encode_prompt`` (the model-level path ``tests/test_qwenimage.py``, ``tests/test_flux.py`` and
``tests/test_pipelines.py`` check against independent references); ``negative == prompt`` gives the plain output to
1e-5; CFG on top leaves the unconditional rows/calls bit-identical; removal restores the original processors and
bit-identical outputs. ControlNet variants also: the ControlNet runs plain on the prompt alone (its inputs and
residuals bit-identical with and without NAG).

The Qwen edit-inpaint and layered pipelines size their images from a fixed area (about 1 MP; 640² or 1024² for
Layered); here their size rule targets 64x64 (16 tokens per image), which changes nothing NAG sees but the count.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import diffusers
import pytest
import torch
from PIL import Image

import nagkit
from nagkit.adapters import NAGProcessor
from nagkit.tiny.pipelines import TINY_PIPELINES, tiny_condition_image

from .test_variants import Recorder, _flat

PROMPT, NEGATIVE = "a red cat sitting on a table", "blurry low quality"
SCALE, TAU, ALPHA = 5.0, 2.5, 0.5  # with end=1.0 everywhere (the flux-kontext preset ends NAG at 0.25)
SIZE = 64
T5_LENGTH = 32  # the tiny FLUX pipelines' max_sequence_length


def _mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    return mask


IMAGE, CONTROL, MASK = tiny_condition_image(SIZE, SIZE, seed=1), tiny_condition_image(SIZE, SIZE, seed=2), _mask()


# ---------------------------------------------------------------------------------------------------- builders
def redraw_zero_parameters(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Seeded random values for every all-zero parameter (ControlNets zero-initialise their output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def _assemble(cls: type, components: dict[str, Any]) -> Any:
    params = inspect.signature(cls.__init__).parameters
    pipe = cls(**{k: v for k, v in components.items() if k in params})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _config(model: torch.nn.Module, **changes: Any) -> dict[str, Any]:
    """``model``'s config with ``changes`` (private keys dropped: ``_use_default_values`` would reset them)."""
    return {**{k: v for k, v in model.config.items() if not k.startswith("_")}, **changes}


def build_qwen_variant(cls_name: str, controlnet_extra_channels: int | None = None, layered: bool = False) -> Any:
    components = dict(TINY_PIPELINES["tiny-qwen-image-edit"](seed=0).components)  # with the vision processor
    transformer = components["transformer"]
    if controlnet_extra_channels is not None:
        torch.manual_seed(0)
        controlnet = diffusers.QwenImageControlNetModel.from_transformer(
            transformer, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            extra_condition_channels=controlnet_extra_channels)
        components["controlnet"] = redraw_zero_parameters(controlnet, 1)
    if layered:
        torch.manual_seed(0)
        components["transformer"] = type(transformer).from_config(
            _config(transformer, use_layer3d_rope=True, use_additional_t_cond=True)).eval()
    return _assemble(getattr(diffusers, cls_name), components)


def build_sdxl_union(cls_name: str, inpaint_channels: int = 4) -> Any:
    """SDXL ControlNet-Union from the tiny SDXL components; the union model's task-embedding transformer and fusion
    projection are 16 wide (the tiny UNet's first block) instead of the 320 ``from_unet`` leaves them at."""
    components = dict(TINY_PIPELINES["tiny-sdxl"](seed=0).components)
    unet = components["unet"]
    torch.manual_seed(0)
    union = diffusers.ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=(4, 4, 8, 8),
                                                     load_weights_from_unet=False)
    width = unet.config.block_out_channels[0]
    torch.manual_seed(0)
    union = diffusers.ControlNetUnionModel.from_config(
        _config(union, num_trans_channel=width, num_trans_head=2, num_proj_channel=width))
    components["controlnet"] = redraw_zero_parameters(union, 1)
    if inpaint_channels != 4:
        torch.manual_seed(0)
        components["unet"] = diffusers.UNet2DConditionModel.from_config(
            _config(unet, in_channels=inpaint_channels)).eval()
    return _assemble(getattr(diffusers, cls_name), components)


def build_kontext_inpaint() -> Any:
    components = dict(TINY_PIPELINES["tiny-flux-kontext"](seed=0).components)
    return _assemble(diffusers.FluxKontextInpaintPipeline, components)


# ---------------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    family: str  # "qwen-image", "sdxl", "flux-kontext"
    base: str  # the pipeline whose spec the variant shares
    build: Any
    call: dict[str, Any] = field(default_factory=dict)
    cfg: str = "true_cfg_scale"
    batched_cfg: bool = False  # [uncond, cond] rows in one call; else separate conditional / unconditional calls
    steps: int = 2


_UNION = {"control_image": [CONTROL], "control_mode": [0]}
_INPAINT = {"image": IMAGE, "mask_image": MASK, "strength": 0.9}
VARIANTS: dict[str, Variant] = {
    # Qwen-Image (true CFG: separate "cond" / "uncond" calls) -----------------------------------------------------
    "QwenImageEditInpaintPipeline": Variant(
        "qwen-image", "QwenImageEditPipeline", lambda: build_qwen_variant("QwenImageEditInpaintPipeline"), _INPAINT),
    "QwenImageControlNetPipeline": Variant(
        "qwen-image", "QwenImagePipeline",
        lambda: build_qwen_variant("QwenImageControlNetPipeline", controlnet_extra_channels=0),
        {"control_image": CONTROL}),
    "QwenImageControlNetInpaintPipeline": Variant(
        "qwen-image", "QwenImagePipeline",
        lambda: build_qwen_variant("QwenImageControlNetInpaintPipeline", controlnet_extra_channels=4),
        {"control_image": IMAGE, "control_mask": MASK}),
    "QwenImageLayeredPipeline": Variant(
        "qwen-image", "QwenImagePipeline", lambda: build_qwen_variant("QwenImageLayeredPipeline", layered=True),
        {"image": IMAGE, "layers": 2}),
    # SDXL ControlNet-Union ([uncond, cond] rows in one UNet call) --------------------------------------------------
    "StableDiffusionXLControlNetUnionPipeline": Variant(
        "sdxl", "StableDiffusionXLPipeline", lambda: build_sdxl_union("StableDiffusionXLControlNetUnionPipeline"),
        _UNION, "guidance_scale", True),
    "StableDiffusionXLControlNetUnionImg2ImgPipeline": Variant(
        "sdxl", "StableDiffusionXLPipeline",
        lambda: build_sdxl_union("StableDiffusionXLControlNetUnionImg2ImgPipeline"),
        {"image": IMAGE, "strength": 0.75, **_UNION}, "guidance_scale", True),
    "StableDiffusionXLControlNetUnionInpaintPipeline": Variant(
        "sdxl", "StableDiffusionXLPipeline",
        lambda: build_sdxl_union("StableDiffusionXLControlNetUnionInpaintPipeline"),  # 4-channel UNet only
        {"image": IMAGE, "mask_image": MASK, "strength": 0.75, **_UNION}, "guidance_scale", True),
    # FLUX.1 Kontext Inpaint (true CFG: separate calls) ----------------------------------------------------------
    "FluxKontextInpaintPipeline": Variant(
        "flux-kontext", "FluxKontextPipeline", build_kontext_inpaint,
        {**_INPAINT, "max_area": SIZE * SIZE, "_auto_resize": False, "max_sequence_length": T5_LENGTH}),
}


@pytest.fixture(scope="module", autouse=True)
def _small_and_single_threaded():
    """Tensors here are tiny: intra-op threads only add overhead, so this module runs single-threaded. The Qwen
    edit-inpaint / layered size rules target 64x64 instead of about 1 MP (restored after the module)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_inpaint, pipeline_qwenimage_layered

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    patched = [(m, m.calculate_dimensions) for m in (pipeline_qwenimage_edit_inpaint, pipeline_qwenimage_layered)]
    for module, size in patched:
        module.calculate_dimensions = lambda area, ratio, size=size: size(SIZE * SIZE, ratio)
    yield
    for module, size in patched:
        module.calculate_dimensions = size
    torch.set_num_threads(previous)


def generate(variant: Variant, pipe: Any, prompt: str | list[str] = PROMPT, cfg: float = 1.0, **kwargs: Any
             ) -> torch.Tensor:
    call = {**variant.call, "num_inference_steps": variant.steps, variant.cfg: cfg}
    final: list[torch.Tensor] = []
    if isinstance(pipe, diffusers.QwenImageLayeredPipeline):
        # its output_type="latent" path returns nothing: take the final latents from the step callback
        def keep(p, i, t, tensors):
            final[:] = [tensors["latents"]]
            return tensors
        call.update(output_type="np", callback_on_step_end=keep)
    else:
        call.update(height=SIZE, width=SIZE, output_type="latent")
    call.update(kwargs)
    torch.manual_seed(0)  # some pipelines VAE-encode condition images with the global generator
    out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **call)[0]
    return final[0] if final else out


def encoded_negative(variant: Variant, pipe: Any, text: str) -> dict[str, torch.Tensor]:
    """The negative in the denoiser's argument names, encoded by the pipeline's own ``encode_prompt`` as the call
    encodes its prompt (the edit pipeline with the call's preprocessed condition image, caught from a plain run)."""
    if variant.family == "sdxl":
        out = pipe.encode_prompt(text, device=torch.device("cpu"), num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
        return {"encoder_hidden_states": out[0]}
    if variant.family == "flux-kontext":
        embeds, pooled, _ = pipe.encode_prompt(text, None, max_sequence_length=T5_LENGTH)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    extra = {}
    if "image" in inspect.signature(pipe.encode_prompt).parameters:
        seen = []
        original = pipe.encode_prompt
        pipe.encode_prompt = lambda *a, **kw: seen.append(kw) or original(*a, **kw)
        try:
            generate(variant, pipe)
        finally:
            del pipe.encode_prompt
        extra["image"] = seen[0]["image"]
    embeds, mask = pipe.encode_prompt(text, device=torch.device("cpu"), **extra)
    negative = {"encoder_hidden_states": embeds}
    if mask is not None:
        negative["encoder_hidden_states_mask"] = mask
    return negative


def denoiser_of(pipe: Any) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def processor_map(pipe: Any) -> dict[tuple[str, str], Any]:
    found = {}
    for attr in ("unet", "transformer", "controlnet"):
        module = getattr(pipe, attr, None)
        if module is not None:
            found.update({(attr, n): m.processor for n, m in module.named_modules() if hasattr(m, "processor")})
    return found


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    v = VARIANTS[request.param]
    return request.param, v, v.build()


# ---------------------------------------------------------------------------------------------------- tests
def test_listed_with_the_family_spec(variant):
    name, v, pipe = variant
    assert type(pipe).__name__ == name and name in nagkit.PIPELINES
    spec, base = nagkit.PIPELINES[name], nagkit.PIPELINES[v.base]
    if name == "QwenImageLayeredPipeline":  # QwenImagePipeline's encode_prompt, but the call needs an image
        assert spec.requires_image and spec == type(base)(**{**base.__dict__, "requires_image": True})
    else:
        assert spec == base


def test_identity_effect_reference_and_removal(variant):
    name, v, pipe = variant
    controlnet = getattr(pipe, "controlnet", None)
    recorder = Recorder(controlnet) if controlnet is not None else None
    try:
        base = generate(v, pipe)
        before = processor_map(pipe)
        guide = nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=1.0, tau=TAU, alpha=ALPHA, end=1.0)
        assert torch.equal(generate(v, pipe), base)
        steps = guide.state.calls["unguided"]  # scale 1: NAG off, every denoiser call plain
        assert steps >= 1 and guide.state.calls["guided"] == 0
        plain_calls = len(recorder.calls) if recorder else 0
        guide.update(scale=SCALE)
        guide.state.calls.update(guided=0, unguided=0)
        guided = generate(v, pipe)
        assert guide.state.calls == {"guided": steps, "unguided": 0}
        assert (guided - base).abs().max() > 1e-4
        if recorder is not None:  # the ControlNet runs plain on the prompt: inputs and residuals bit-identical
            (first_in, first_out), (nag_in, nag_out) = recorder.calls[0], recorder.calls[plain_calls]
            assert torch.equal(nag_in["encoder_hidden_states"], first_in["encoder_hidden_states"])
            assert all(torch.equal(a, b) for a, b in zip(_flat(nag_out), _flat(first_out), strict=True))
            assert all(t.abs().max() > 0 for t in _flat(nag_out))
        guide.update(negative_prompt=PROMPT)
        torch.testing.assert_close(generate(v, pipe), base, atol=1e-5, rtol=1e-5)
        guide.remove()
    finally:
        if recorder is not None:
            recorder.remove()
    after = processor_map(pipe)
    assert all(before[k] is after[k] for k in before) and not any(isinstance(p, NAGProcessor) for p in after.values())
    assert "encode_prompt" not in pipe.__dict__ and not hasattr(pipe, "_nagkit_guide")
    assert torch.equal(generate(v, pipe), base)

    # the same NAG on the variant's own denoiser, with the negative encoded by its encode_prompt
    negative = encoded_negative(v, pipe, NEGATIVE)
    with nagkit.apply(denoiser_of(pipe), negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA, end=1.0):
        reference = generate(v, pipe)
    torch.testing.assert_close(guided, reference, atol=1e-6, rtol=1e-6)


def test_cfg_guides_only_the_conditional_branch(variant):
    name, v, pipe = variant
    recorder = Recorder(denoiser_of(pipe))
    try:
        base_final = generate(v, pipe, cfg=3.0, negative_prompt="ugly")
        base = [out for _, out in recorder.calls]
        recorder.calls.clear()
        with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=SCALE, tau=TAU, alpha=ALPHA, end=1.0) as guide:
            final = generate(v, pipe, cfg=3.0, negative_prompt="ugly")
            calls = dict(guide.state.calls)
            rows = guide.state.last_packing.rows
        outputs = [out for _, out in recorder.calls]
    finally:
        recorder.remove()
    assert (final - base_final).abs().max() > 1e-4
    if v.batched_cfg:  # first step: [uncond, cond] rows of one call
        b = base[0][0].shape[0] // 2
        assert torch.equal(outputs[0][0][:b], base[0][0][:b])
        assert (outputs[0][0][b:] - base[0][0][b:]).abs().max() > 1e-4
        assert rows == slice(b, 2 * b) and calls == {"guided": len(base), "unguided": 0}
    else:  # separate conditional / unconditional calls: the first step's unconditional one untouched
        assert torch.equal(outputs[1][0], base[1][0])
        assert (outputs[0][0] - base[0][0]).abs().max() > 1e-4
        assert calls == {"guided": len(base) // 2, "unguided": len(base) // 2}


def test_unlisted_pipeline_is_refused_by_name():
    """A pipeline class that is not listed (here a custom one on the Qwen-Image transformer; in diffusers 0.42.1 every
    Qwen-Image pipeline on ``QwenImageTransformer2DModel`` is listed now) is refused at apply, naming the class and the
    supported pipelines."""

    class QwenImageCustomPipeline(diffusers.DiffusionPipeline):
        def __init__(self, transformer):
            super().__init__()
            self.register_modules(transformer=transformer)

        def encode_prompt(self, prompt):
            raise NotImplementedError

    pipe = QwenImageCustomPipeline(TINY_PIPELINES["tiny-qwen-image"](seed=0).transformer)
    with pytest.raises(TypeError, match="nagkit does not support QwenImageCustomPipeline; supported pipelines: "
                                        ".*QwenImageLayeredPipeline"):
        nagkit.apply(pipe, negative_prompt=NEGATIVE)


def test_kontext_inpaint_reference_image_and_preset_window():
    """FLUX.1 Kontext Inpaint with an ``image_reference``: its latents ride in the image stream (16 target + 16
    reference tokens; NAG on the pipeline equals NAG on the transformer with the encoded negative, bit-identical at
    scale 1); the ``flux-kontext`` preset (NAG ends at 0.25, as the official Kontext pipeline) leaves late steps
    plain."""
    v = VARIANTS["FluxKontextInpaintPipeline"]
    pipe = v.build()
    v4 = Variant(v.family, v.base, v.build, v.call, v.cfg, v.batched_cfg, 4)
    tokens = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: tokens.append(kw["hidden_states"].shape[1]), with_kwargs=True)
    try:
        base = generate(v4, pipe, image_reference=CONTROL)
    finally:
        handle.remove()
    assert tokens[0] == 32
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=1.0, end=1.0):
        assert torch.equal(generate(v4, pipe, image_reference=CONTROL), base)
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=SCALE, tau=TAU, alpha=ALPHA, end=1.0):
        guided = generate(v4, pipe, image_reference=CONTROL)
    assert (guided - base).abs().max() > 1e-4
    with nagkit.apply(pipe.transformer, negative=encoded_negative(v4, pipe, NEGATIVE), scale=SCALE, tau=TAU,
                      alpha=ALPHA, end=1.0):
        torch.testing.assert_close(generate(v4, pipe, image_reference=CONTROL), guided, atol=1e-6, rtol=1e-6)
    with nagkit.apply(pipe, negative_prompt=NEGATIVE) as guide:  # preset flux-kontext
        assert guide.config.end == 0.25
        preset = generate(v4, pipe, image_reference=CONTROL)
        assert guide.state.calls["guided"] >= 1 and guide.state.calls["unguided"] >= 1
    assert (preset - base).abs().max() > 1e-4


@pytest.mark.parametrize("name,base_name,shape", [
    ("QwenImageControlNetPipeline", "QwenImagePipeline", (1, 16, 16)),
    ("StableDiffusionXLControlNetUnionPipeline", "StableDiffusionXLPipeline", (1, 4, 8, 8)),
])
def test_controlnet_residuals_reach_the_guided_forward(name, base_name, shape):
    """``controlnet_conditioning_scale=0`` adds zero residuals: with NAG the ControlNet pipeline gives the base
    text-to-image pipeline's NAG output bit for bit (same denoiser, ``from_pipe``); at scale 1 the residuals change the
    guided output."""
    v = VARIANTS[name]
    pipe = v.build()
    base_pipe = getattr(diffusers, base_name).from_pipe(pipe)
    base_pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    base_call = Variant(v.family, v.base, v.build, {"latents": latents}, v.cfg, v.batched_cfg, v.steps)
    assert torch.equal(generate(v, pipe, latents=latents, controlnet_conditioning_scale=0.0),
                       generate(base_call, base_pipe))
    with nagkit.apply(base_pipe, negative_prompt=NEGATIVE, scale=SCALE, tau=TAU, alpha=ALPHA, end=1.0):
        expected = generate(base_call, base_pipe)
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=SCALE, tau=TAU, alpha=ALPHA, end=1.0):
        zero = generate(v, pipe, latents=latents, controlnet_conditioning_scale=0.0)
        one = generate(v, pipe, latents=latents)
    assert torch.equal(zero, expected)
    assert (one - expected).abs().max() > 1e-4
