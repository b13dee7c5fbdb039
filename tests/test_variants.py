"""NAG on the img2img / inpaint / ControlNet / Fill / Control variants of the SD1.5, SDXL, FLUX.1, Chroma and SD3
pipelines, built from the families' tiny seeded components: 9-channel inpainting UNets (SD1.5, SDXL), FLUX Fill (384
input channels) and Control (128) transformers, ControlNets with seeded weights (their zero-initialised output layers
redrawn so the residuals matter).

For every variant: listed in ``nagkit.PIPELINES`` with its base pipeline's spec; scale 1 bit-identical to the plain
pipeline; NAG changes the output and equals NAG installed on the variant's own denoiser with the negative encoded by
the variant's ``encode_prompt`` (the model-level path that ``tests/test_<family>.py`` checks against independent
references); ``negative == prompt`` gives the plain output; CFG on top leaves the unconditional rows/calls untouched
(bit-identical; SD3's batched rows to 1e-6, as the base SD3 pipeline); removal restores the original processors and
bit-identical outputs. ControlNet variants also: the ControlNet runs plain on the prompt alone (its residuals
bit-identical with and without NAG). Text-to-image ControlNets: the residuals reach the guided denoiser forward
(model level, inputs captured from the pipeline, against a plain NAG reference given the same residuals:
cross-attention for SD1.5/SDXL, doubled joint attention for FLUX/SD3), and with NAG ``controlnet_conditioning_scale=0``
equals the base text-to-image pipeline bit for bit while scale 1 does not.
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

PROMPT, NEGATIVE = "a red cat sitting on a table", "blurry low quality"
SCALE, TAU, ALPHA = 5.0, 2.5, 0.5
SIZE = 64
T5_LENGTH = 32  # the tiny MM-DiT pipelines' max_sequence_length


def _image(seed: int) -> Image.Image:
    return tiny_condition_image(SIZE, SIZE, seed=seed)


def _mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    return mask


IMAGE, CONTROL, MASK = _image(1), _image(2), _mask()


# ---------------------------------------------------------------------------------------------------- builders
def redraw_zero_parameters(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Seeded random values for every all-zero parameter (ControlNets zero-initialise their output layers, which
    would make the residuals vanish)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def _assemble(cls: type, components: dict[str, Any]) -> Any:
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in components.items() if k in params}
    if "requires_safety_checker" in params:
        kwargs["requires_safety_checker"] = False
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _config(model: torch.nn.Module, **changes: Any) -> dict[str, Any]:
    """``model``'s config with ``changes`` (private keys dropped: ``_use_default_values`` would reset them)."""
    return {**{k: v for k, v in model.config.items() if not k.startswith("_")}, **changes}


def _unet_like(unet: torch.nn.Module, seed: int, **changes: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel.from_config(_config(unet, **changes)).eval()


def _controlnet(unet: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 4, 8, 8))
    return redraw_zero_parameters(controlnet, 1)


def build_unet_variant(base: str, cls_name: str, inpaint_channels: int = 4, controlnet: bool = False) -> Any:
    """SD1.5 / SDXL variant from the tiny family components; ``inpaint_channels=9``: a 9-channel inpainting UNet
    (latents, mask, masked-image latents); a ControlNet is built from the 4-channel UNet (its input is the latents)."""
    components = dict(TINY_PIPELINES[base](seed=0).components)
    if controlnet:
        components["controlnet"] = _controlnet(components["unet"])
    if inpaint_channels != 4:
        components["unet"] = _unet_like(components["unet"], 0, in_channels=inpaint_channels)
    return _assemble(getattr(diffusers, cls_name), components)


def _transformer_like(transformer: torch.nn.Module, seed: int, **changes: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    return type(transformer).from_config(_config(transformer, **changes)).eval()


def build_flux_variant(cls_name: str, in_channels: int | None = None, controlnet: bool = False) -> Any:
    """FLUX.1 variant. ``in_channels``: Fill (384 = 64 latent + 64 masked-image + 256 packed-mask channels) and
    Control (128 = 64 latent + 64 control-latent channels) transformers, guidance-distilled like their releases; the
    others reuse the schnell-like tiny components (true CFG available)."""
    distilled = in_channels is not None
    components = dict(TINY_PIPELINES["tiny-flux-dev" if distilled else "tiny-flux"](seed=0).components)
    transformer = components["transformer"]
    if distilled:
        components["transformer"] = _transformer_like(transformer, 0, in_channels=in_channels, out_channels=64)
    if controlnet:
        config = _config(transformer, num_layers=1, num_single_layers=1)
        torch.manual_seed(0)
        components["controlnet"] = redraw_zero_parameters(diffusers.FluxControlNetModel.from_config(config), 1)
    return _assemble(getattr(diffusers, cls_name), components)


def build_chroma_variant(cls_name: str) -> Any:
    components = dict(TINY_PIPELINES["tiny-chroma"](seed=0).components)
    # ChromaInpaintPipeline reads transformer.config.guidance_embeds, which ChromaTransformer2DModel does not define;
    # the published Chroma1-HD config.json carries guidance_embeds=False (kept in the loaded config), so do the same
    components["transformer"].register_to_config(guidance_embeds=False)
    return _assemble(getattr(diffusers, cls_name), components)


def build_sd3_variant(cls_name: str, controlnet_extra_channels: int | None = None) -> Any:
    components = dict(TINY_PIPELINES["tiny-sd3"](seed=0).components)
    if controlnet_extra_channels is not None:
        config = _config(components["transformer"], num_layers=1, extra_conditioning_channels=controlnet_extra_channels)
        config = {k: v for k, v in config.items() if k in inspect.signature(diffusers.SD3ControlNetModel).parameters}
        torch.manual_seed(0)
        components["controlnet"] = redraw_zero_parameters(diffusers.SD3ControlNetModel(**config), 1)
    return _assemble(getattr(diffusers, cls_name), components)


# ---------------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    family: str  # "sd15", "sdxl", "flux", "chroma", "sd3"
    build: Any
    call: dict[str, Any] = field(default_factory=dict)
    cfg: str | None = "guidance_scale"  # the CFG argument (None: the pipeline has no CFG)
    batched_cfg: bool = True  # [uncond, cond] rows in one call; else separate conditional / unconditional calls
    steps: int = 2


_I2I = {"image": IMAGE, "strength": 0.75}
_INPAINT = {"image": IMAGE, "mask_image": MASK, "strength": 0.75}
_FLUX_I2I = {**_I2I, "strength": 0.9}  # FLUX's schedule at 2 steps: strength 0.9 still runs both
VARIANTS: dict[str, Variant] = {
    # SD1.5 ------------------------------------------------------------------------------------------------------
    "StableDiffusionImg2ImgPipeline": Variant(
        "sd15", lambda: build_unet_variant("tiny-sd15", "StableDiffusionImg2ImgPipeline"), _I2I),
    "StableDiffusionInpaintPipeline": Variant(
        "sd15", lambda: build_unet_variant("tiny-sd15", "StableDiffusionInpaintPipeline", inpaint_channels=9),
        _INPAINT),
    "StableDiffusionControlNetPipeline": Variant(
        "sd15", lambda: build_unet_variant("tiny-sd15", "StableDiffusionControlNetPipeline", controlnet=True),
        {"image": CONTROL}),
    "StableDiffusionControlNetImg2ImgPipeline": Variant(
        "sd15", lambda: build_unet_variant("tiny-sd15", "StableDiffusionControlNetImg2ImgPipeline", controlnet=True),
        {**_I2I, "control_image": CONTROL}),
    "StableDiffusionControlNetInpaintPipeline": Variant(
        "sd15", lambda: build_unet_variant("tiny-sd15", "StableDiffusionControlNetInpaintPipeline",
                                           inpaint_channels=9, controlnet=True),
        {**_INPAINT, "control_image": CONTROL}),
    # SDXL -------------------------------------------------------------------------------------------------------
    "StableDiffusionXLImg2ImgPipeline": Variant(
        "sdxl", lambda: build_unet_variant("tiny-sdxl", "StableDiffusionXLImg2ImgPipeline"), _I2I),
    "StableDiffusionXLInpaintPipeline": Variant(
        "sdxl", lambda: build_unet_variant("tiny-sdxl", "StableDiffusionXLInpaintPipeline", inpaint_channels=9),
        _INPAINT),
    "StableDiffusionXLControlNetPipeline": Variant(
        "sdxl", lambda: build_unet_variant("tiny-sdxl", "StableDiffusionXLControlNetPipeline", controlnet=True),
        {"image": CONTROL}),
    "StableDiffusionXLControlNetImg2ImgPipeline": Variant(
        "sdxl", lambda: build_unet_variant("tiny-sdxl", "StableDiffusionXLControlNetImg2ImgPipeline",
                                           controlnet=True),
        {**_I2I, "control_image": CONTROL}),
    "StableDiffusionXLControlNetInpaintPipeline": Variant(
        "sdxl", lambda: build_unet_variant("tiny-sdxl", "StableDiffusionXLControlNetInpaintPipeline",
                                           controlnet=True),
        {**_INPAINT, "control_image": CONTROL}),
    # FLUX.1 (true CFG: separate calls) ---------------------------------------------------------------------------
    "FluxImg2ImgPipeline": Variant(
        "flux", lambda: build_flux_variant("FluxImg2ImgPipeline"), _FLUX_I2I, "true_cfg_scale", False),
    "FluxInpaintPipeline": Variant(
        "flux", lambda: build_flux_variant("FluxInpaintPipeline"), {**_INPAINT, "strength": 0.9}, "true_cfg_scale",
        False),
    "FluxFillPipeline": Variant(
        "flux", lambda: build_flux_variant("FluxFillPipeline", in_channels=384), {"image": IMAGE, "mask_image": MASK},
        None),
    "FluxControlPipeline": Variant(
        "flux", lambda: build_flux_variant("FluxControlPipeline", in_channels=128), {"control_image": CONTROL}, None),
    "FluxControlImg2ImgPipeline": Variant(
        "flux", lambda: build_flux_variant("FluxControlImg2ImgPipeline", in_channels=128),
        {**_FLUX_I2I, "control_image": CONTROL}, None),
    "FluxControlInpaintPipeline": Variant(
        "flux", lambda: build_flux_variant("FluxControlInpaintPipeline", in_channels=128),
        {**_INPAINT, "strength": 0.9, "control_image": CONTROL}, None),
    "FluxControlNetPipeline": Variant(
        "flux", lambda: build_flux_variant("FluxControlNetPipeline", controlnet=True), {"control_image": CONTROL},
        "true_cfg_scale", False),
    "FluxControlNetImg2ImgPipeline": Variant(
        "flux", lambda: build_flux_variant("FluxControlNetImg2ImgPipeline", controlnet=True),
        {**_FLUX_I2I, "control_image": CONTROL}, None),
    "FluxControlNetInpaintPipeline": Variant(
        "flux", lambda: build_flux_variant("FluxControlNetInpaintPipeline", controlnet=True),
        {**_INPAINT, "strength": 0.9, "control_image": CONTROL}, None),
    # Chroma (CFG: separate calls) --------------------------------------------------------------------------------
    "ChromaImg2ImgPipeline": Variant(
        "chroma", lambda: build_chroma_variant("ChromaImg2ImgPipeline"), _FLUX_I2I, batched_cfg=False),
    "ChromaInpaintPipeline": Variant(
        "chroma", lambda: build_chroma_variant("ChromaInpaintPipeline"), {**_INPAINT, "strength": 0.9},
        batched_cfg=False),
    # SD3 --------------------------------------------------------------------------------------------------------
    "StableDiffusion3Img2ImgPipeline": Variant(
        "sd3", lambda: build_sd3_variant("StableDiffusion3Img2ImgPipeline"), _FLUX_I2I),
    "StableDiffusion3InpaintPipeline": Variant(
        "sd3", lambda: build_sd3_variant("StableDiffusion3InpaintPipeline"), {**_INPAINT, "strength": 0.9}),
    "StableDiffusion3ControlNetPipeline": Variant(
        "sd3", lambda: build_sd3_variant("StableDiffusion3ControlNetPipeline", controlnet_extra_channels=0),
        {"control_image": CONTROL}),
    "StableDiffusion3ControlNetInpaintingPipeline": Variant(
        "sd3", lambda: build_sd3_variant("StableDiffusion3ControlNetInpaintingPipeline",
                                         controlnet_extra_channels=1),
        {"control_image": IMAGE, "control_mask": MASK}),
}
MT5 = {"flux", "chroma", "sd3"}


def generate(variant: Variant, pipe: Any, prompt: str | list[str] = PROMPT, cfg: float = 1.0, **kwargs: Any
             ) -> torch.Tensor:
    call = {**variant.call, "height": SIZE, "width": SIZE, "num_inference_steps": variant.steps,
            "output_type": "latent"}
    if variant.family in MT5:
        call["max_sequence_length"] = T5_LENGTH
    if variant.cfg is not None:
        call[variant.cfg] = cfg
    call.update(kwargs)
    torch.manual_seed(0)  # some pipelines VAE-encode condition images with the global generator
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **call)[0]


def encoded_negative(variant: Variant, pipe: Any, text: str) -> dict[str, torch.Tensor]:
    """The negative in the denoiser's argument names, encoded by the pipeline's own ``encode_prompt`` as the call
    encodes its prompt (what ``nagkit.apply(denoiser, negative=...)`` takes)."""
    family = variant.family
    if family in ("sd15", "sdxl"):
        out = pipe.encode_prompt(text, device=torch.device("cpu"), num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
        return {"encoder_hidden_states": out[0]}
    if family == "flux":
        embeds, pooled, _ = pipe.encode_prompt(text, None, max_sequence_length=T5_LENGTH)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    if family == "chroma":
        out = pipe.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=T5_LENGTH)
        return {"encoder_hidden_states": out[0], "attention_mask": out[2]}
    out = pipe.encode_prompt(text, None, None, do_classifier_free_guidance=False, max_sequence_length=T5_LENGTH)
    return {"encoder_hidden_states": out[0]}


def denoiser_of(pipe: Any) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def processor_map(pipe: Any) -> dict[tuple[str, str], Any]:
    found = {}
    for attr in ("unet", "transformer", "controlnet"):
        module = getattr(pipe, attr, None)
        if module is not None:
            found.update({(attr, n): m.processor for n, m in module.named_modules() if hasattr(m, "processor")})
    return found


class Recorder:
    """Inputs/outputs of every forward of a module, kept as detached copies."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[tuple[dict[str, Any], Any]] = []
        self.handle = module.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
        inputs = {k: _detach(v) for k, v in bound.arguments.items() if k != "self"}
        self.calls.append((inputs, _detach(output)))

    def remove(self) -> None:
        self.handle.remove()


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return [_detach(v) for v in x]
    return x


def _flat(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat(v)]
    return []


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tensors here are tiny: intra-op threads only add overhead (and spin against other processes on a shared
    machine), so this module runs single-threaded; the previous setting is restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    v = VARIANTS[request.param]
    return request.param, v, v.build()


# ---------------------------------------------------------------------------------------------------- tests
def test_listed_with_the_family_spec(variant):
    name, v, pipe = variant
    assert type(pipe).__name__ == name and name in nagkit.PIPELINES
    spec = nagkit.PIPELINES[name]
    base = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline",
            "chroma": "ChromaPipeline", "sd3": "StableDiffusion3Pipeline"}[v.family]
    assert spec == nagkit.PIPELINES[base]  # same denoiser, same encode_prompt: the base pipeline's reading of it


def test_identity_effect_reference_and_removal(variant):
    name, v, pipe = variant
    controlnet = getattr(pipe, "controlnet", None)
    recorder = Recorder(controlnet) if controlnet is not None else None
    try:
        base = generate(v, pipe)
        before = processor_map(pipe)
        guide = nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=1.0, tau=TAU, alpha=ALPHA)
        assert torch.equal(generate(v, pipe), base)
        steps = guide.state.calls["unguided"]  # scale 1: NAG off, every denoiser call plain
        assert steps >= 1 and guide.state.calls["guided"] == 0
        plain_calls = len(recorder.calls) if recorder else 0
        guide.update(scale=SCALE)
        guide.state.calls.update(guided=0, unguided=0)
        guided = generate(v, pipe)
        assert guide.state.calls == {"guided": steps, "unguided": 0}
        assert (guided - base).abs().max() > 1e-4
        if recorder is not None:  # the ControlNet runs plain on the prompt: residuals bit-identical to the plain run
            (first_in, first_out), (nag_in, nag_out) = recorder.calls[0], recorder.calls[plain_calls]
            assert torch.equal(nag_in["encoder_hidden_states"], first_in["encoder_hidden_states"])
            assert all(torch.equal(a, b) for a, b in zip(_flat(nag_out), _flat(first_out), strict=True))
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
    with nagkit.apply(denoiser_of(pipe), negative=negative, scale=SCALE, tau=TAU, alpha=ALPHA):
        reference = generate(v, pipe)
    torch.testing.assert_close(guided, reference, atol=1e-6, rtol=1e-6)


def test_cfg_guides_only_the_conditional_branch(variant):
    name, v, pipe = variant
    if v.cfg is None:
        pytest.skip(f"{name} has no CFG")
    recorder = Recorder(denoiser_of(pipe))
    try:
        base_final = generate(v, pipe, cfg=3.0, negative_prompt="ugly")
        base = [out for _, out in recorder.calls]
        recorder.calls.clear()
        with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
            final = generate(v, pipe, cfg=3.0, negative_prompt="ugly")
            calls = dict(guide.state.calls)
            rows = guide.state.last_packing.rows
        outputs = [out for _, out in recorder.calls]
    finally:
        recorder.remove()
    assert (final - base_final).abs().max() > 1e-4
    if v.batched_cfg:  # first step: [uncond, cond] rows of one call
        b = base[0][0].shape[0] // 2
        if v.family == "sd3":  # the joint kernel's Z+ of unguided rows is an LSE merge: equal to rounding (as SD3)
            torch.testing.assert_close(outputs[0][0][:b], base[0][0][:b], atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(outputs[0][0][:b], base[0][0][:b])
        assert (outputs[0][0][b:] - base[0][0][b:]).abs().max() > 1e-4
        assert rows == slice(b, 2 * b) and calls == {"guided": len(base), "unguided": 0}
    else:  # separate conditional / unconditional calls: the unconditional one untouched
        assert torch.equal(outputs[1][0], base[1][0])
        assert (outputs[0][0] - base[0][0]).abs().max() > 1e-4
        assert calls == {"guided": len(base) // 2, "unguided": len(base) // 2}


# ---------------------------------------------------------------------------------------------------- ControlNet
CONTROLNETS = {  # text-to-image ControlNet variant -> (base pipeline, residual arguments of the denoiser)
    "StableDiffusionControlNetPipeline": ("StableDiffusionPipeline",
                                          ("down_block_additional_residuals", "mid_block_additional_residual")),
    "StableDiffusionXLControlNetPipeline": ("StableDiffusionXLPipeline",
                                            ("down_block_additional_residuals", "mid_block_additional_residual")),
    "FluxControlNetPipeline": ("FluxPipeline", ("controlnet_block_samples", "controlnet_single_block_samples")),
    "StableDiffusion3ControlNetPipeline": ("StableDiffusion3Pipeline", ("block_controlnet_hidden_states",)),
}


class _Stop(Exception):
    pass


def first_denoiser_inputs(v: Variant, pipe: Any) -> dict[str, Any]:
    """The arguments of the denoiser's first call in a plain pipeline run without CFG."""
    seen: dict[str, Any] = {}

    def grab(module, args, kwargs):
        bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
        seen.update({k: v for k, v in bound.arguments.items() if k not in ("self", "kwargs")})
        raise _Stop

    handle = denoiser_of(pipe).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with pytest.raises(_Stop):
            generate(v, pipe)
    finally:
        handle.remove()
    return {**seen, "return_dict": False}


def _twice(x: Any) -> Any:
    return [torch.cat([r, r]) for r in x] if isinstance(x, (list, tuple)) else torch.cat([x, x])


def doubled_reference(family: str, model: torch.nn.Module, inputs: dict[str, Any], neg_text: torch.Tensor,
                      residuals: tuple[str, ...]) -> torch.Tensor:
    """Plain NAG over a doubled batch ``[prompt; negative]`` (tests/mmdit_reference.py), the ControlNet residuals
    added to both rows' image stream (which NAG keeps equal)."""
    from .mmdit_reference import DoubledFluxRef, DoubledJointRef, joint_processors

    fixed = ("img_ids", "txt_ids", *residuals)
    big = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim and k not in fixed else v)
           for k, v in inputs.items()}
    big.update({k: _twice(inputs[k]) for k in residuals})
    text = inputs["encoder_hidden_states"]
    big["encoder_hidden_states"] = torch.cat([text, neg_text])
    if family == "flux":
        def make(inner):
            return DoubledFluxRef(inner, SCALE, TAU, ALPHA, text.shape[1])

        def select(name, m):
            return name.endswith(".attn")
    else:
        def make(inner):
            return DoubledJointRef(inner, SCALE, TAU, ALPHA)

        def select(name, m):
            return getattr(m, "add_q_proj", None) is not None
    with torch.no_grad(), joint_processors(model, make, select):
        return model(**big)[0][: text.shape[0]]


@pytest.mark.parametrize("name", list(CONTROLNETS))
def test_controlnet_residuals_reach_the_guided_forward(name):
    """Model level, inputs captured from the pipeline: nagkit with the ControlNet residuals equals a plain NAG
    reference given the same residuals, and the residuals change the guided output."""
    from .reference import reference_forward

    v = VARIANTS[name]
    pipe = v.build()
    model, residuals = denoiser_of(pipe), CONTROLNETS[name][1]
    inputs = first_denoiser_inputs(v, pipe)
    assert all(t.abs().max() > 0 for k in residuals for t in _flat(inputs[k]))
    text = inputs["encoder_hidden_states"]
    neg_text = torch.randn(text.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), nagkit.apply(model, negative={"encoder_hidden_states": neg_text}, scale=SCALE, tau=TAU,
                                       alpha=ALPHA):
        out = model(**inputs)[0]
        without = model(**{**inputs, **dict.fromkeys(residuals)})[0]
    if v.family in ("sd15", "sdxl"):
        ref = reference_forward(model, inputs, {"encoder_hidden_states": neg_text}, SCALE, TAU, ALPHA)[0]
    else:
        ref = doubled_reference(v.family, model, inputs, neg_text, residuals)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - without).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(CONTROLNETS))
def test_controlnet_at_scale_zero_is_the_base_pipeline(name):
    """``controlnet_conditioning_scale=0`` adds zero residuals: with NAG the ControlNet pipeline gives the base
    text-to-image pipeline's NAG output bit for bit (same denoiser, ``from_pipe``); at scale 1 it does not."""
    v = VARIANTS[name]
    pipe = v.build()
    base_pipe = getattr(diffusers, CONTROLNETS[name][0]).from_pipe(pipe)
    base_pipe.set_progress_bar_config(disable=True)
    # the same starting latents (FLUX's ControlNet pipeline VAE-encodes the control image with the call's generator)
    shape = {"sd15": (1, 4, 8, 8), "sdxl": (1, 4, 8, 8), "flux": (1, 16, 64), "sd3": (1, 16, 8, 8)}[v.family]
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    base_call = Variant(v.family, v.build, {"latents": latents}, v.cfg, v.batched_cfg, v.steps)
    assert torch.equal(generate(v, pipe, latents=latents, controlnet_conditioning_scale=0.0),
                       generate(base_call, base_pipe))
    with nagkit.apply(base_pipe, negative_prompt=NEGATIVE, scale=SCALE, tau=TAU, alpha=ALPHA):
        expected = generate(base_call, base_pipe)
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=SCALE, tau=TAU, alpha=ALPHA):
        zero = generate(v, pipe, latents=latents, controlnet_conditioning_scale=0.0)
        one = generate(v, pipe, latents=latents)
    assert torch.equal(zero, expected)
    assert (one - expected).abs().max() > 1e-4


def test_controlnet_models_are_not_guided_themselves():
    """NAG goes on the pipeline's denoiser; a ControlNet given to nagkit.apply directly is refused by name."""
    for name in ("StableDiffusionControlNetPipeline", "FluxControlNetPipeline", "StableDiffusion3ControlNetPipeline"):
        controlnet = VARIANTS[name].build().controlnet
        with pytest.raises(TypeError, match=f"nagkit does not support {type(controlnet).__name__}"):
            nagkit.apply(controlnet, negative={"encoder_hidden_states": torch.zeros(1, 2, 8)})


def test_unlisted_variant_is_refused_by_name():
    """A variant that is not listed (SDXL InstructPix2Pix batches three rows [text, image-only, uncond]) is refused
    at apply, naming the class and the supported pipelines."""
    components = dict(TINY_PIPELINES["tiny-sdxl"](seed=0).components)
    pipe = _assemble(diffusers.StableDiffusionXLInstructPix2PixPipeline, components)
    with pytest.raises(TypeError, match="nagkit does not support StableDiffusionXLInstructPix2PixPipeline; supported "
                                        "pipelines: .*StableDiffusionXLControlNetPipeline"):
        nagkit.apply(pipe, negative_prompt=NEGATIVE)


# ---------------------------------------------------------------------------------------------------- img2img
IMG2IMG = {  # variant -> (base pipeline, shape of the starting latents the call takes as given)
    "FluxImg2ImgPipeline": ("FluxPipeline", (1, 16, 64)),
    "ChromaImg2ImgPipeline": ("ChromaPipeline", (1, 16, 64)),
    "StableDiffusion3Img2ImgPipeline": ("StableDiffusion3Pipeline", (1, 16, 8, 8)),
}


@pytest.mark.parametrize("name", list(IMG2IMG))
def test_img2img_at_full_strength_is_the_base_pipeline(name):
    """With given starting latents and ``strength=1`` these img2img pipelines run exactly the text-to-image schedule
    (checked plain first); with NAG and CFG on top they still equal the base pipeline with NAG, bit for bit."""
    v = VARIANTS[name]
    pipe = v.build()
    base_name, shape = IMG2IMG[name]
    base_pipe = getattr(diffusers, base_name).from_pipe(pipe)
    base_pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    base_call = Variant(v.family, v.build, {"latents": latents}, v.cfg, v.batched_cfg, v.steps)
    cfg = {"cfg": 3.0, "negative_prompt": "ugly"}
    assert torch.equal(generate(v, pipe, strength=1.0, latents=latents, **cfg), generate(base_call, base_pipe, **cfg))
    with nagkit.apply(base_pipe, negative_prompt=NEGATIVE, scale=SCALE, tau=TAU, alpha=ALPHA):
        expected = generate(base_call, base_pipe, **cfg)
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=SCALE, tau=TAU, alpha=ALPHA) as guide:
        out = generate(v, pipe, strength=1.0, latents=latents, **cfg)
        assert guide.state.calls["guided"] == v.steps
    assert torch.equal(out, expected)
