"""PixArt-α/Σ ``PixArtTransformer2DModel``: T5 cross-attention (``attn2``) with a text padding mask.

The family's file: the adapter (the NAG processors are the classic ones of :mod:`nagkit.adapters.unet`); the
pipelines (``PixArtSigmaPipeline``, ``PixArtAlphaPipeline``) and preset (``pixart``); the meta inputs of
``nagkit bench``; the tiny pipeline ``tiny-pixart-sigma``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import PixArtTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

from ..core.config import NAGConfig
from .base import Adapter, PipelineSpec, TinyModel, register_adapter
from .unet import CLASSIC_PROCESSORS, is_text_cross_attention

if TYPE_CHECKING:
    from diffusers import PixArtSigmaPipeline

    from ..bench.families import FamilySpec, Inputs


# ------------------------------------------------------------------------------------------------ nagkit bench
def pixart_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one PixArt call (no resolution/aspect conditions, as PixArt-Σ; the text mask when the geometry
    has one)."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    kwargs: dict[str, Any] = {"hidden_states": c.meta(batch, g.latent_channels, h, w), "timestep": c.timestep,
                              "encoder_hidden_states": c.text,
                              "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    negative = c.negative
    if g.mask:
        kwargs["encoder_attention_mask"] = c.meta(batch, g.text_tokens, dtype=torch.long)
        negative["encoder_attention_mask"] = c.meta(g.batch, g.negative_length, dtype=torch.long)
    return Inputs(kwargs=kwargs, mask_arg="encoder_attention_mask", negative=negative)


# ------------------------------------------------------------------------------------------------ tiny pipelines
# Test fixtures (``nagkit.tiny``): seeded random weights, in-memory tokenizers, nothing downloaded. Their diffusers and
# transformers imports stay inside the builders, so importing nagkit does not load the pipelines.


def tiny_pixart_sigma_pipeline(seed: int = 0) -> PixArtSigmaPipeline:
    """Build a tiny random PixArt-Sigma pipeline.

    Transformer: 2 blocks, 2 heads x 8, patch 2, ``sample_size=32`` (so the default resolution binning is valid);
    T5 encoder (1 layer, d_model 16); VAE factor 8; DDIM scheduler. Recommended: ``use_resolution_binning=False``
    and a small ``max_sequence_length`` (the default 300 also works).

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``PixArtSigmaPipeline`` on CPU in float32.
    """
    from diffusers import DDIMScheduler, PixArtSigmaPipeline
    from transformers import T5Config, T5EncoderModel

    from ..tiny.pipelines import _finish, _tiny_vae_kl, tiny_t5_tokenizer

    tokenizer = tiny_t5_tokenizer(model_max_length=300)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=32,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=text_encoder.config.d_model,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=16,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    ).eval()
    vae = _tiny_vae_kl(seed).eval()
    torch.manual_seed(seed)
    scheduler = DDIMScheduler()
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return _finish(pipe)


# ------------------------------------------------------------------------------------------------ registration
_PIXART = PipelineSpec(denoisers=("transformer",), mask_index=1, preset="pixart",
                       embeds_args={"embeds": "negative_prompt_embeds", "mask": "negative_prompt_attention_mask"})

PIXART = register_adapter(Adapter(
    drop_padding=True,
    family="pixart",
    model_class=PixArtTransformer2DModel,
    processors={k: CLASSIC_PROCESSORS[k] for k in (AttnProcessor2_0, AttnProcessor, FusedAttnProcessor2_0)},
    select=is_text_cross_attention,
    mask_arg="encoder_attention_mask",
    preset="pixart",
    notes="PixArt-α/Σ: NAG on every cross-attention attn2; the negative keeps its own padding mask",
    pipelines={"PixArtSigmaPipeline": _PIXART, "PixArtAlphaPipeline": _PIXART},
    # No official PixArt code; same DiT-with-T5-cross-attention setting as SANA.
    presets={"pixart": NAGConfig(scale=5.0, tau=2.5, alpha=0.375)},
    tiny={
        "tiny-pixart-sigma": TinyModel(tiny_pixart_sigma_pipeline, {
            "height": 64,
            "width": 64,
            "use_resolution_binning": False,
            "max_sequence_length": 32,
            "clean_caption": False,
        }),
    },
    bench_inputs=pixart_bench_inputs,
))
