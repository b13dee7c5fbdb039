"""SD3 / SD3.5 ``SD3Transformer2DModel``: joint attention (image-first ``[I | Tp | Tn]``) with NAG on the image tokens.

The negative text is packed after the prompt's text, so it runs through every block as its own stream, modulated with
the prompt's pooled embedding — exactly the official SD3 NAG pipeline (its NAG row reuses the positive pooled
embedding). SD3.5-Medium's extra image-only self-attention (``attn2`` of the dual-attention blocks) is not touched.
Both NAG modes are the same computation here.

Pipeline variants (``SD3_PIPELINES``, SD3's ``encode_prompt``): img2img, inpaint (image-side: latents blended between
steps, or mask and masked-image latents on a 33-channel transformer's channels), ControlNet and ControlNet inpainting.
All batch CFG as ``[uncond, cond]`` in one call like ``StableDiffusion3Pipeline``: the conditional half is guided; the
unconditional rows' image attention goes through the same log-sum-exp merge as the guided rows', so it equals the plain
model to float rounding (within 1e-6 on the tiny model), not bit for bit. ControlNet: ``SD3ControlNetModel`` attends to
the text with its own joint blocks (SD3.5-Large ControlNets take no text). Decision: it is left plain, fed the prompt
only; NAG is installed on the transformer alone, and the residuals are added to the image stream after each block,
outside attention, so the guided forward receives them unchanged. Reasons as for the UNet family
(:mod:`nagkit.adapters.unet`).

The family's file: the NAG processor and the adapter; the pipelines (``StableDiffusion3Pipeline`` and its variants
above) and preset (``sd3``); the meta inputs of ``nagkit bench``; the tiny pipelines ``tiny-sd3`` and ``tiny-sd35``
(SD3.5 Medium's dual-attention block).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import FusedJointAttnProcessor2_0, JointAttnProcessor2_0

from ..core.config import NAGConfig
from ..kernels.joint import nag_joint_attention
from .base import Adapter, NAGProcessor, PipelineSpec, TinyModel, register_adapter

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline

    from ..bench.families import FamilySpec, Inputs


def _heads(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


class NAGJointAttnProcessor2_0(NAGProcessor):
    """``JointAttnProcessor2_0`` with NAG on the image tokens and the negative text as a separate stream."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        *args,
        **kwargs,
    ) -> torch.FloatTensor:
        packing = self.packing
        if packing is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        cfg = self.state.config
        batch, image_len = hidden_states.shape[:2]

        query = _heads(attn.to_q(hidden_states), batch, attn.heads)
        key = _heads(attn.to_k(hidden_states), batch, attn.heads)
        value = _heads(attn.to_v(hidden_states), batch, attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_q = _heads(attn.add_q_proj(encoder_hidden_states), batch, attn.heads)
        text_k = _heads(attn.add_k_proj(encoder_hidden_states), batch, attn.heads)
        text_v = _heads(attn.add_v_proj(encoder_hidden_states), batch, attn.heads)
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        query = torch.cat([query, text_q], dim=2)
        key = torch.cat([key, text_k], dim=2)
        value = torch.cat([value, text_v], dim=2)

        out = nag_joint_attention(query, key, value, packing, text_first=False, scale=cfg.scale, tau=cfg.tau,
                                  alpha=cfg.alpha, norm=cfg.norm, backend="native")  # as the original: F.sdpa
        hidden_states, encoder_hidden_states = out[:, :image_len], out[:, image_len:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


def _joint_text_attention(name: str, module: torch.nn.Module) -> bool:
    return getattr(module, "add_q_proj", None) is not None  # the joint attention; not SD3.5's image-only attn2


# ------------------------------------------------------------------------------------------------ nagkit bench
def sd3_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one SD3 call (the pooled CLIP embedding stays the prompt's)."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    kwargs: dict[str, Any] = {"hidden_states": c.meta(batch, g.latent_channels, h, w), "timestep": c.timestep,
                              "encoder_hidden_states": c.text, "pooled_projections": c.meta(batch, g.pooled_dim)}
    return Inputs(kwargs=kwargs, negative=c.negative)


# ------------------------------------------------------------------------------------------------ tiny pipelines
# Test fixtures (``nagkit.tiny``): seeded random weights, in-memory tokenizers, nothing downloaded. Their diffusers and
# transformers imports stay inside the builders, so importing nagkit does not load the pipelines.
_SD3_T5_DIM = 64  # SD3 pads the concatenated CLIP states (16 + 32) up to the T5 width, so it must be >= 48


def _sd3(seed: int, dual_attention_layers: tuple[int, ...]) -> StableDiffusion3Pipeline:
    """Shared SD3 / SD3.5 builder (see :func:`tiny_sd3_pipeline`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from ..tiny.mmdit import MMDIT_LATENT_CHANNELS, SD3_VAE_FACTORS, _tiny_t5, _tiny_vae
    from ..tiny.pipelines import _clip_text_config, _finish, tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(tokenizer, hidden_size=16, projection_dim=16)).eval()
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(tokenizer_2, hidden_size=32, projection_dim=32)
    ).eval()
    tokenizer_3, text_encoder_3 = _tiny_t5(seed, d_model=_SD3_T5_DIM)
    num_heads, head_dim = 2, 16
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=MMDIT_LATENT_CHANNELS,
        out_channels=MMDIT_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=text_encoder_3.config.d_model,
        caption_projection_dim=num_heads * head_dim,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        pos_embed_max_size=16,
        dual_attention_layers=dual_attention_layers,
        qk_norm="rms_norm",
    ).eval()
    vae = _tiny_vae(seed, SD3_VAE_FACTORS)
    torch.manual_seed(seed)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return _finish(pipe)


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """Build a tiny random Stable Diffusion 3-style pipeline.

    Transformer: 2 joint blocks (2 heads x 16, ``qk_norm="rms_norm"``; the last one is ``context_pre_only``), patch 2,
    ``sample_size=8`` / ``pos_embed_max_size=16`` (so up to 256x256 px). Text: two ``CLIPTextModelWithProjection``
    (hidden 16 and 32, 77 tokens, pooled 16 + 32 = 48) and a 1-layer T5 (d_model 64; the 48-wide CLIP states are
    zero-padded to it), so the joint text is ``77 + max_sequence_length`` tokens. VAE: factor 8, 16 latent channels,
    SD3 scaling/shift factors. Scheduler: flow-match Euler, shift 3. CFG is on when ``guidance_scale > 1``.

    Args:
        seed: Seed for all random weights (``torch.manual_seed(seed)`` before each component).

    Returns:
        A ``StableDiffusion3Pipeline`` on CPU in float32.
    """
    return _sd3(seed, dual_attention_layers=())


def tiny_sd35_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """Build a tiny random Stable Diffusion 3.5 Medium-style pipeline.

    Like :func:`tiny_sd3_pipeline`, but block 0 is an MMDiT-X block (``dual_attention_layers=(0,)``): besides the
    joint attention ``attn`` it has an image-only self-attention ``attn2`` (no text K/V).

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``StableDiffusion3Pipeline`` on CPU in float32.
    """
    return _sd3(seed, dual_attention_layers=(0,))


# ------------------------------------------------------------------------------------------------ registration
# The pipelines on this transformer (same encode_prompt, batched [uncond, cond] CFG): img2img, inpaint (image-side),
# ControlNet (``SD3ControlNetModel``, run plain on the prompt; residuals added to the image stream). See the docstring.
SD3_PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline",
                 "StableDiffusion3ControlNetPipeline", "StableDiffusion3ControlNetInpaintingPipeline")

SD3 = register_adapter(Adapter(
    family="sd3",
    model_class=SD3Transformer2DModel,
    # fused QKV keeps the separate projections: NAG computes with them (same math as the fused processor)
    processors={JointAttnProcessor2_0: NAGJointAttnProcessor2_0, FusedJointAttnProcessor2_0: NAGJointAttnProcessor2_0},
    select=_joint_text_attention,
    mask_arg=None,
    preset="sd3",
    notes="SD3/SD3.5: NAG on the image tokens of every joint attention; the negative text is its own stream "
          "(positive pooled modulation, as official); image->image attention computed once (LSE merge)",
    pipelines=dict.fromkeys(SD3_PIPELINES, PipelineSpec(denoisers=("transformer",), preset="sd3", size_multiple=2,
                                                        encoders=("text_encoder", "text_encoder_2"))),
    # Official SD3 pipeline: alpha 0.125; README SD3.5-Large-Turbo example nag_scale 5 (paper φ=4).
    presets={"sd3": NAGConfig(scale=5.0, tau=2.5, alpha=0.125)},
    tiny={
        # T5 length 32 (CLIP stays 77; SD3's joint text is 77 + 32 tokens)
        "tiny-sd3": TinyModel(tiny_sd3_pipeline, {"height": 64, "width": 64, "max_sequence_length": 32}),
        "tiny-sd35": TinyModel(tiny_sd35_pipeline, {"height": 64, "width": 64, "max_sequence_length": 32}),
    },
    bench_inputs=sd3_bench_inputs,
))
