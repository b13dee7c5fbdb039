"""Chroma ``ChromaTransformer2DModel``: the FLUX.1 architecture with NAG as in Flux ``fast`` mode.

Chroma's modulation comes from a text-independent approximator (no pooled CLIP embedding), so the negative text needs
no modulation of its own: the Flux NAG processor and preparation (:mod:`nagkit.adapters.flux`: negative RoPE ids) do
everything, without block hooks. Its ``attention_mask`` covers ``[text | image]``; the negative's padding mask goes in
after the prompt's text, so Chroma's own masking rule holds for the negative segment. No official NAG code exists for
Chroma, so there is no ``official`` mode.

Pipeline variants: ``ChromaImg2ImgPipeline`` and ``ChromaInpaintPipeline`` have Chroma's ``encode_prompt`` and
``[text | image]`` mask and make separate conditional / unconditional calls without ``cache_context`` (the
unconditional one is recognised by its text and never guided); what they add is image-side. ``ChromaInpaintPipeline``
reads ``transformer.config.guidance_embeds``, which ``ChromaTransformer2DModel`` does not declare: published configs
carry it (Chroma1-HD: false); a model built without it fails in diffusers, with or without NAG.

The family's file: the adapter; the pipelines (``ChromaPipeline``, ``ChromaImg2ImgPipeline``,
``ChromaInpaintPipeline``) and preset (``chroma``); the meta inputs of ``nagkit bench``; the tiny pipeline
``tiny-chroma``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import ChromaTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from ..core.config import NAGConfig
from .base import Adapter, PipelineSpec, TinyModel, register_adapter
from .flux import NAGFluxAttnProcessor, _flux_attention, _flux_dev_scheduler, _prepare, packed_bench_kwargs

if TYPE_CHECKING:
    from diffusers import ChromaPipeline

    from ..bench.families import FamilySpec, Inputs


def _chroma_prepare(model: torch.nn.Module, access: Any, args: tuple, kwargs: dict, extras: dict, packing: Any,
                    state: Any) -> tuple[tuple, dict]:
    if state.config.mode == "official":
        raise ValueError("Chroma has no official NAG implementation to reproduce; use mode='fast'")
    return _prepare(model, access, args, kwargs, extras, packing, state)


def _chroma_mask(access: Any, args: tuple, kwargs: dict, mask: torch.Tensor | None, packing: Any
                 ) -> tuple[tuple, dict]:
    """Chroma's ``attention_mask`` covers ``[text | image]``: the negative's part goes in after the prompt's text."""
    pos_mask = access.get("attention_mask", args, kwargs)
    if pos_mask is None and mask is None:
        return args, kwargs
    batch, lp, ln = packing.batch, packing.lp, packing.ln
    if pos_mask is None:
        text = access.get("encoder_hidden_states", args, kwargs)
        length = lp + access.get("hidden_states", args, kwargs).shape[1]
        pos_mask = torch.ones(batch, length, device=text.device, dtype=torch.long)
    neg_mask = torch.ones(batch, ln, device=pos_mask.device, dtype=pos_mask.dtype)
    if mask is not None:
        neg_mask[packing.rows] = mask.to(device=pos_mask.device, dtype=pos_mask.dtype)
    packed = torch.cat([pos_mask[:, :lp], neg_mask, pos_mask[:, lp:]], dim=1)
    return access.set("attention_mask", packed, args, kwargs)


# ------------------------------------------------------------------------------------------------ nagkit bench
def chroma_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one Chroma call (the ``[text | image]`` attention mask when the geometry has a text mask)."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g = c.geometry
    kwargs = packed_bench_kwargs(c)
    negative = c.negative
    if g.mask:
        # ChromaPipeline: the T5 padding mask (in the embeddings' dtype) extended with ones over the image tokens;
        # not a text-only mask, so no ``mask_arg`` (nothing packs it but nagkit, which knows Chroma's layout)
        kwargs["attention_mask"] = c.meta(batch, g.text_tokens + kwargs["img_ids"].shape[0])
        negative["attention_mask"] = c.meta(g.batch, g.negative_length)
    return Inputs(kwargs=kwargs, negative=negative)


# ------------------------------------------------------------------------------------------------ tiny pipelines
# Test fixtures (``nagkit.tiny``): seeded random weights, in-memory tokenizers, nothing downloaded. Their diffusers and
# transformers imports stay inside the builders, so importing nagkit does not load the pipelines.


def tiny_chroma_pipeline(seed: int = 0) -> ChromaPipeline:
    """Build a tiny random Chroma pipeline.

    Transformer: ``ChromaTransformer2DModel`` with 2 double + 2 single blocks, 2 heads x 16, 64 input channels and a
    1-layer modulation approximator (no pooled text, no guidance embedding). Text: 1-layer T5 only (d_model 32; the
    pipeline passes the padding mask, keeping one pad token). VAE as Flux. CFG is on when ``guidance_scale > 1``.

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``ChromaPipeline`` on CPU in float32.
    """
    from diffusers import ChromaPipeline

    from ..tiny.mmdit import FLUX_VAE_FACTORS, MMDIT_LATENT_CHANNELS, _tiny_t5, _tiny_vae
    from ..tiny.pipelines import _finish

    tokenizer, text_encoder = _tiny_t5(seed)
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4 * MMDIT_LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_encoder.config.d_model,
        axes_dims_rope=(4, 4, 8),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    ).eval()
    vae = _tiny_vae(seed, FLUX_VAE_FACTORS)
    torch.manual_seed(seed)
    pipe = ChromaPipeline(
        scheduler=_flux_dev_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return _finish(pipe)


# ------------------------------------------------------------------------------------------------ registration
CHROMA = register_adapter(Adapter(
    family="chroma",
    model_class=ChromaTransformer2DModel,
    processors={FluxAttnProcessor: NAGFluxAttnProcessor},
    select=_flux_attention,
    mask_arg="attention_mask",
    mask_packer=_chroma_mask,
    timestep_max=1.0,
    official=False,
    preset="chroma",
    notes="Chroma: as Flux fast mode (modulation is text-independent); Chroma's own additive text-mask semantics "
          "kept for the negative segment",
    prepare=_chroma_prepare,
    pipelines={
        # Chroma returns (prompt_embeds, text_ids, prompt_mask, negative...); the mask keeps Chroma's own rule.
        # img2img / inpaint: the same encode_prompt, [text | image] mask and separate CFG calls (image-side changes)
        **dict.fromkeys(("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline"),
                        PipelineSpec(denoisers=("transformer",), mask_index=2, preset="chroma", size_multiple=2,
                                     embeds_args={"embeds": "negative_prompt_embeds",
                                                  "mask": "negative_prompt_attention_mask"})),
    },
    # No official diffusers Chroma code; ComfyUI-NAG's Chroma workflow: nag_scale 5, tau 2.5, alpha 0.25.
    presets={"chroma": NAGConfig(scale=5.0, tau=2.5, alpha=0.25)},
    # T5 length 32, as the Flux tiny pipelines
    tiny={"tiny-chroma": TinyModel(tiny_chroma_pipeline, {"height": 64, "width": 64, "max_sequence_length": 32})},
    bench_inputs=chroma_bench_inputs,
    separate_cfg=True,  # ChromaPipeline: conditional and unconditional calls in turn
))
