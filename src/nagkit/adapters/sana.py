"""Sana ``SanaTransformer2DModel``: linear self-attention plus a Gemma-text cross-attention ``attn2`` (guided).

The family's file: the NAG processor and the adapter; the pipeline (``SanaPipeline``) and preset (``sana``); the meta
inputs of ``nagkit bench``; the tiny pipeline ``tiny-sana``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import SanaTransformer2DModel
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

from ..core.config import NAGConfig
from ..kernels.cross import nag_cross_attention, sdpa_heads_first
from .base import Adapter, NAGProcessor, PipelineSpec, TinyModel, register_adapter
from .unet import is_text_cross_attention

if TYPE_CHECKING:
    from diffusers import SanaPipeline

    from ..bench.families import FamilySpec, Inputs


class NAGSanaAttnProcessor2_0(NAGProcessor):
    """``SanaAttnProcessor2_0`` with NAG on the cross-attention output."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        packing = self.packing
        if packing is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)
        cfg = self.state.config

        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        hidden_states = nag_cross_attention(sdpa_heads_first(attn.heads), query, key, value, attention_mask, packing,
                                            cfg.scale, cfg.tau, cfg.alpha, cfg.norm, seq_dim=2)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states / attn.rescale_output_factor


# ------------------------------------------------------------------------------------------------ nagkit bench
def sana_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one Sana call (the text mask when the geometry has one)."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    kwargs: dict[str, Any] = {"hidden_states": c.meta(batch, g.latent_channels, h, w), "timestep": c.timestep,
                              "encoder_hidden_states": c.text}
    negative = c.negative
    if g.mask:
        kwargs["encoder_attention_mask"] = c.meta(batch, g.text_tokens, dtype=torch.long)
        negative["encoder_attention_mask"] = c.meta(g.batch, g.negative_length, dtype=torch.long)
    return Inputs(kwargs=kwargs, mask_arg="encoder_attention_mask", negative=negative)


# ------------------------------------------------------------------------------------------------ tiny pipelines
# Test fixtures (``nagkit.tiny``): seeded random weights, in-memory tokenizers, nothing downloaded. Their diffusers and
# transformers imports stay inside the builders, so importing nagkit does not load the pipelines.


def tiny_sana_pipeline(seed: int = 0) -> SanaPipeline:
    """Build a tiny random Sana pipeline.

    Transformer: 1 block, 2 heads x 8 (linear self-attention, ``attn2`` cross-attention to the text), patch 1,
    ``sample_size=16`` (valid for resolution binning); Gemma2 text encoder (2 layers, hidden 16); 3-stage
    ``AutoencoderDC`` (spatial factor 4); flow-match Euler scheduler. The default ``complex_human_instruction``
    works (it encodes to 211 tokens that are prepended; ``model_max_length`` is 2048).

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``SanaPipeline`` on CPU in float32.
    """
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline

    from ..tiny.pipelines import _finish, tiny_gemma_encoder

    tokenizer, text_encoder = tiny_gemma_encoder(seed)
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=8,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=text_encoder.config.hidden_size,
        sample_size=16,
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    torch.manual_seed(seed)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return _finish(pipe)


# ------------------------------------------------------------------------------------------------ registration
SANA = register_adapter(Adapter(
    drop_padding=True,
    family="sana",
    model_class=SanaTransformer2DModel,
    processors={SanaAttnProcessor2_0: NAGSanaAttnProcessor2_0},
    select=is_text_cross_attention,
    mask_arg="encoder_attention_mask",
    preset="sana",
    notes="Sana: NAG on every cross-attention attn2 (self-attention is linear and untouched)",
    pipelines={
        # Sana encodes its CFG negative without the complex human instruction; so does the NAG negative.
        "SanaPipeline": PipelineSpec(denoisers=("transformer",), mask_index=1,
                                     overrides={"complex_human_instruction": False}, preset="sana",
                                     embeds_args={"embeds": "negative_prompt_embeds",
                                                  "mask": "negative_prompt_attention_mask"}),
    },
    # Paper Table 5, SANA: φ=4, α=0.375 (pladis-vla transcription; another transcription says φ=2, α=0.5).
    presets={"sana": NAGConfig(scale=5.0, tau=2.5, alpha=0.375)},
    tiny={
        "tiny-sana": TinyModel(tiny_sana_pipeline, {"height": 32, "width": 32, "use_resolution_binning": False,
                                                    "max_sequence_length": 32}),
    },
    bench_inputs=sana_bench_inputs,
))
