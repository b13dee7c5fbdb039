"""Which diffusers pipelines nagkit drives, and how the NAG negative is encoded with the pipeline's own
``encode_prompt``.

The NAG negative is encoded by calling the pipeline's ``encode_prompt`` once more with the *same arguments as the
call* (device, ``num_images_per_prompt``, ``max_sequence_length``, ``clip_skip``, ``lora_scale``…), except that the
prompt is the NAG negative and everything about CFG is switched off. So the negative sees exactly the encoder settings
the prompt saw.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class PipelineSpec:
    """How to read one pipeline family's ``encode_prompt``.

    Attributes:
        denoisers: attribute names of the denoisers to guide (those that exist and are not None).
        embeds_index: position of the positive text embeddings in ``encode_prompt``'s return tuple.
        mask_index: position of the positive text mask, or None.
        pooled_index: position of the pooled text embedding the negative branch uses, or None (then the negative
            branch keeps the prompt's pooled embedding, as in the official SD3/SDXL pipelines).
        count_arg: the ``num_*_per_prompt`` argument name.
        overrides: extra ``encode_prompt`` arguments for the negative (how the pipeline encodes its CFG negative).
        preset: default preset.
    """

    denoisers: tuple[str, ...]
    embeds_index: int = 0
    mask_index: int | None = None
    pooled_index: int | None = None
    count_arg: str = "num_images_per_prompt"
    overrides: dict[str, Any] = field(default_factory=dict)
    preset: str = ""


_SD = PipelineSpec(denoisers=("unet",), preset="sd15")
_SDXL = PipelineSpec(denoisers=("unet",), preset="sdxl")
_WAN = PipelineSpec(denoisers=("transformer", "transformer_2"), count_arg="num_videos_per_prompt", preset="wan")
_PIXART = PipelineSpec(denoisers=("transformer",), mask_index=1, preset="pixart")
# Sana encodes its CFG negative without the complex human instruction; so does the NAG negative.
_SANA = PipelineSpec(denoisers=("transformer",), mask_index=1, overrides={"complex_human_instruction": False},
                     preset="sana")

_SD3 = PipelineSpec(denoisers=("transformer",), preset="sd3")
# Flux returns (prompt_embeds, pooled, text_ids); the negative branch uses the negative's pooled embedding (official).
_FLUX = PipelineSpec(denoisers=("transformer",), pooled_index=1, preset="flux")
_KONTEXT = PipelineSpec(denoisers=("transformer",), pooled_index=1, preset="flux-kontext")
# Chroma returns (prompt_embeds, text_ids, prompt_mask, negative...); the mask keeps Chroma's own rule.
_CHROMA = PipelineSpec(denoisers=("transformer",), mask_index=2, preset="chroma")

PIPELINES: dict[str, PipelineSpec] = {
    "StableDiffusion3Pipeline": _SD3,
    "FluxPipeline": _FLUX,
    "FluxKontextPipeline": _KONTEXT,
    "ChromaPipeline": _CHROMA,
    "StableDiffusionPipeline": _SD,
    "StableDiffusionXLPipeline": _SDXL,
    "WanPipeline": _WAN,
    "WanImageToVideoPipeline": _WAN,
    "PixArtSigmaPipeline": _PIXART,
    "PixArtAlphaPipeline": _PIXART,
    "SanaPipeline": _SANA,
}


def pipeline_spec(pipe: object) -> PipelineSpec:
    """The spec for ``pipe``; raise ``TypeError`` naming its class and the supported pipelines."""
    for klass in type(pipe).__mro__:
        if klass.__name__ in PIPELINES:
            return PIPELINES[klass.__name__]
    raise TypeError(f"nagkit does not support {type(pipe).__name__}; supported pipelines: "
                    f"{', '.join(sorted(PIPELINES))} (or apply NAG to a supported denoiser directly)")


def is_pipeline(obj: object) -> bool:
    """Duck-typed check for a diffusers pipeline."""
    return hasattr(obj, "components") and hasattr(obj, "encode_prompt") and not isinstance(obj, torch.nn.Module)


_PROMPT_ONLY = ("prompt_2", "prompt_3", "prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask")


def negative_arguments(arguments: dict[str, Any], negatives: list[str], spec: PipelineSpec,
                       max_length: int | None = None) -> dict[str, Any]:
    """``encode_prompt`` arguments that encode ``negatives`` exactly like the call encoded its prompt (optionally
    with a shorter ``max_sequence_length``)."""
    args = dict(arguments)
    if max_length is not None:
        if "max_sequence_length" not in args:
            raise ValueError("negative_max_length needs a pipeline whose encode_prompt takes max_sequence_length")
        args["max_sequence_length"] = max_length
    args["prompt"] = negatives
    for name in list(args):
        if name.startswith("negative_") or name in _PROMPT_ONLY:
            args[name] = None
    if "do_classifier_free_guidance" in args:
        args["do_classifier_free_guidance"] = False
    args.update(spec.overrides)
    return args


def bind_arguments(fn: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a call to ``fn`` by name, defaults included."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(out.pop(name, {}))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL and out.get(name):
            raise TypeError(f"cannot forward positional varargs of {fn}")
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            out.pop(name, None)
    return out
