"""SD1.5 / SDXL ``UNet2DConditionModel``: NAG on every text cross-attention (``attn2``), as the official SDXL code.

Also home of the NAG processors for diffusers' classic ``Attention`` processors (shared with PixArt): the SDPA one
(``AttnProcessor2_0``), the default one ``set_default_attn_processor`` installs (``AttnProcessor``), fused QKV
(``FusedAttnProcessor2_0``), attention slicing (``SlicedAttnProcessor``) and IP-Adapter (``IPAdapterAttnProcessor2_0``,
``IPAdapterAttnProcessor``). Each computes the attention the way its original does; NAG acts on the text attention
only. IP-Adapter image tokens are not negated: their attention is added after NAG, as the official code does with
Wan's image context.

Pooled text and time ids (SDXL ``added_cond_kwargs``) stay positive: the negative enters only through the
cross-attention keys/values, like the official pipeline.

Pipeline variants (``SD15_PIPELINES``, ``SDXL_PIPELINES``; one ``encode_prompt``, so one spec per base model):
img2img, inpaint, ControlNet, ControlNet img2img and ControlNet inpaint. All batch CFG as ``[uncond, cond]`` in one UNet
call; the conditional half is guided (found by comparing with the encoded prompt), the unconditional rows stay
bit-identical. What they add is image-side: img2img starts from noised image latents; an inpainting UNet with 9 input
channels gets the mask and the masked-image latents concatenated on its channels (a 4-channel one blends latents between
steps). ControlNet: the ``ControlNetModel`` attends to the text too. Decision: it is left plain, fed the prompt only.
NAG is installed on the UNet alone; the pipeline calls the ControlNet before the UNet with the unpacked prompt
embeddings (guess mode: the conditional rows only), and its residuals, added to the UNet's down/mid-block features
(never to the text), reach the guided UNet forward unchanged. Why: the residuals are a spatial control signal, not the
text-conditioned attention output NAG is defined on; the official NAG pipelines (FLUX, Kontext, SD3.5, SDXL, Wan)
have no ControlNet variant to follow; left plain it costs nothing more and keeps scale 1 and the unconditional rows
exact. A ControlNet given to ``nagkit.apply`` itself is
refused (not a supported denoiser). SDXL ControlNet-Union (``StableDiffusionXLControlNetUnion{,Img2Img,Inpaint}
Pipeline``): the same decision for ``ControlNetUnionModel`` (plain, prompt only); its inpaint pipeline takes a
4-channel UNet only. Not listed: InstructPix2Pix (three CFG rows ``[text, image-only, uncond]``).

The family's file: the NAG processors and the adapter; the pipelines (``StableDiffusionPipeline``,
``StableDiffusionXLPipeline`` and their variants above) and presets (``sd15``, ``sdxl``); the meta inputs of ``nagkit
bench``; the tiny pipelines ``tiny-sd15`` and ``tiny-sdxl``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    SlicedAttnProcessor,
)

from ..core.config import NAGConfig
from ..kernels.cross import Attend, nag_cross_attention, sdpa_heads_first
from .base import Adapter, NAGProcessor, PipelineSpec, TinyModel, register_adapter

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from ..bench.families import FamilySpec, Inputs


def classic_heads_first(attn: Attention, slice_size: int | None = None) -> Attend:
    """``attend`` for ``(B, H, L, D)`` tensors the way ``AttnProcessor`` (and, by ``slice_size`` rows of
    ``B·H``, ``SlicedAttnProcessor``) computes it: ``attn.get_attention_scores`` then ``bmm``."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, h, lq, d = q.shape
        q3, k3, v3 = (x.reshape(b * h, x.shape[2], d) for x in (q, k, v))
        m3 = None if mask is None else mask.expand(b, h, -1, -1).reshape(b * h, mask.shape[2], mask.shape[3])
        step = slice_size or b * h
        out = torch.empty(b * h, lq, d, device=q.device, dtype=q.dtype)
        for start in range(0, b * h, step):
            stop = start + step
            probs = attn.get_attention_scores(q3[start:stop], k3[start:stop],
                                              None if m3 is None else m3[start:stop])
            out[start:stop] = torch.bmm(probs, v3[start:stop])
        return out.view(b, h, lq, d).transpose(1, 2).reshape(b, lq, h * d)

    return attend


class NAGAttnProcessor2_0(NAGProcessor):
    """NAG over a classic ``Attention`` processor (``AttnProcessor2_0`` and its fused, sliced, default and IP-Adapter
    relatives): NAG on the text cross-attention output, before the output projection."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        packing = self.packing
        if packing is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return self.guided(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def attend(self, attn: Attention) -> Attend:
        """The attention kernel of the wrapped processor."""
        inner = self.inner
        if isinstance(inner, SlicedAttnProcessor):
            return classic_heads_first(attn, inner.slice_size)
        if isinstance(inner, (AttnProcessor, IPAdapterAttnProcessor)):
            return classic_heads_first(attn)
        return sdpa_heads_first(attn.heads)

    def guided(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | tuple,
               attention_mask: torch.Tensor | None, temb: torch.Tensor | None,
               ip_adapter_masks: torch.Tensor | list | None = None) -> torch.Tensor:
        cfg, packing = self.state.config, self.packing
        ip_hidden_states = None
        if isinstance(encoder_hidden_states, tuple):  # IP-Adapter: (text, [image tokens per adapter])
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if isinstance(self.inner, FusedAttnProcessor2_0):
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        attend = self.attend(attn)
        hidden_states = nag_cross_attention(attend, query, key, value, attention_mask, packing,
                                            cfg.scale, cfg.tau, cfg.alpha, cfg.norm, seq_dim=2)
        if ip_hidden_states is not None:
            hidden_states = hidden_states + self.ip_adapter(attn, attend, query, ip_hidden_states, ip_adapter_masks)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def ip_adapter(self, attn: Attention, attend: Attend, query: torch.Tensor, ip_hidden_states: list,
                   ip_adapter_masks: torch.Tensor | list | None) -> torch.Tensor:
        """The IP-Adapter image-token attention (the same on both NAG branches), as ``IPAdapterAttnProcessor2_0``."""
        inner = self.inner
        batch, heads, _, head_dim = query.shape
        if ip_adapter_masks is None:
            ip_adapter_masks = [None] * len(inner.scale)
        elif not isinstance(ip_adapter_masks, list):
            ip_adapter_masks = list(ip_adapter_masks.unsqueeze(1))
        total = torch.zeros((), dtype=query.dtype, device=query.device)
        for states, scale, to_k_ip, to_v_ip, mask in zip(ip_hidden_states, inner.scale, inner.to_k_ip,
                                                          inner.to_v_ip, ip_adapter_masks, strict=True):
            if (all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0):
                continue
            images = [states] if mask is None else [states[:, i] for i in range(mask.shape[1])]
            scales = scale if isinstance(scale, list) else [scale] * len(images)
            for i, image in enumerate(images):
                ip_key = to_k_ip(image).view(batch, -1, heads, head_dim).transpose(1, 2)
                ip_value = to_v_ip(image).view(batch, -1, heads, head_dim).transpose(1, 2)
                out = attend(query, ip_key, ip_value, None)
                if mask is not None:
                    down = IPAdapterMaskProcessor.downsample(mask[:, i], batch, out.shape[1], out.shape[2])
                    out = out * down.to(dtype=query.dtype, device=query.device)
                total = total + scales[i] * out
        return total


class NAGIPAdapterAttnProcessor(NAGAttnProcessor2_0):
    """NAG over ``IPAdapterAttnProcessor2_0`` / ``IPAdapterAttnProcessor`` (their ``__call__`` parameters, so
    ``ip_adapter_masks`` reaches the processor)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: float = 1.0,
        ip_adapter_masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        packing = self.packing
        if packing is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, scale,
                              ip_adapter_masks)
        if not isinstance(encoder_hidden_states, tuple):
            raise ValueError("NAG with an IP-Adapter needs the image embeddings as the tuple the UNet builds "
                             "(pass ip_adapter_image / ip_adapter_image_embeds to the pipeline)")
        return self.guided(attn, hidden_states, encoder_hidden_states, attention_mask, temb, ip_adapter_masks)


#: The classic ``Attention`` processors NAG wraps, and the NAG class for each.
CLASSIC_PROCESSORS: dict[type, type[NAGProcessor]] = {
    AttnProcessor2_0: NAGAttnProcessor2_0,
    AttnProcessor: NAGAttnProcessor2_0,
    FusedAttnProcessor2_0: NAGAttnProcessor2_0,
    SlicedAttnProcessor: NAGAttnProcessor2_0,
    IPAdapterAttnProcessor2_0: NAGIPAdapterAttnProcessor,
    IPAdapterAttnProcessor: NAGIPAdapterAttnProcessor,
}

def is_text_cross_attention(name: str, module: torch.nn.Module) -> bool:
    """``attn2`` modules that attend to the text (the official selection: every processor named ``attn2``)."""
    return name.endswith("attn2") and bool(getattr(module, "is_cross_attention", False))


def _official_unet_window(config: NAGConfig, timestep: float) -> bool:
    """The official SDXL rule: guided while ``floor((1 − end)·999) ≤ t ≤ ceil((1 − start)·999)``."""
    return config.in_window(timestep, 999.0, floor=True)


# ------------------------------------------------------------------------------------------------ nagkit bench
def unet_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one UNet call (SDXL: pooled text and time ids when the geometry has ``pooled_dim``)."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    kwargs: dict[str, Any] = {"sample": c.meta(batch, g.latent_channels, h, w), "timestep": c.timestep,
                              "encoder_hidden_states": c.text}
    if g.pooled_dim:
        kwargs["added_cond_kwargs"] = {"text_embeds": c.meta(batch, g.pooled_dim),
                                       "time_ids": c.meta(batch, g.time_ids)}
    return Inputs(kwargs=kwargs, mask_arg="encoder_attention_mask", negative=c.negative)


# ------------------------------------------------------------------------------------------------ tiny pipelines
# Test fixtures (``nagkit.tiny``): seeded random weights, in-memory tokenizers, nothing downloaded. Their diffusers and
# transformers imports stay inside the builders, so importing nagkit does not load the pipelines.


def tiny_sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Build a tiny random Stable Diffusion 1.5-style pipeline.

    UNet: 2 levels (16, 32 channels), one cross-attention block per level (``attn2`` over 32-dim CLIP states).
    VAE: factor 8. Text: 2-layer CLIP (hidden 32), tokenizer ``model_max_length`` 77. Default size 64x64.

    Args:
        seed: Seed for all random weights (``torch.manual_seed(seed)`` before each component).

    Returns:
        A ``StableDiffusionPipeline`` on CPU in float32 (no safety checker).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    from ..tiny.pipelines import _clip_text_config, _finish, _tiny_vae_kl, tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden_size=32)).eval()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_head_dim=4,
        norm_num_groups=4,
        cross_attention_dim=32,
    ).eval()
    vae = _tiny_vae_kl(seed).eval()
    torch.manual_seed(seed)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """Build a tiny random Stable Diffusion XL-style pipeline.

    Two CLIP text encoders (hidden 16 and 32, ``CLIPTextModelWithProjection`` projection 32), so the UNet
    ``cross_attention_dim`` is 48; ``addition_embed_type="text_time"`` with ``addition_time_embed_dim`` 8
    (``projection_class_embeddings_input_dim`` = 6 * 8 + 32). VAE factor 8, default size 64x64, no watermarker.

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``StableDiffusionXLPipeline`` on CPU in float32.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ..tiny.pipelines import _clip_text_config, _finish, _tiny_vae_kl, tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden_size=16)).eval()
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, hidden_size=32, projection_dim=32))
    text_encoder_2 = text_encoder_2.eval()
    cross_dim = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    time_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        norm_num_groups=4,
        cross_attention_dim=cross_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_encoder_2.config.projection_dim,
    ).eval()
    vae = _tiny_vae_kl(seed).eval()
    torch.manual_seed(seed)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _finish(pipe)


# ------------------------------------------------------------------------------------------------ registration
# The pipelines on this UNet (same ``encode_prompt``, batched ``[uncond, cond]`` CFG). Variants: img2img; inpaint with
# a 4- or 9-channel UNet (mask and masked-image latents concatenated on the channels: image side); ControlNet
# (``ControlNetModel`` run plain on the prompt, residuals added to UNet features). See the module docstring.
SD15_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                  "StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline",
                  "StableDiffusionControlNetInpaintPipeline")
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
                  "StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetImg2ImgPipeline",
                  "StableDiffusionXLControlNetInpaintPipeline", "StableDiffusionXLControlNetUnionPipeline",
                  "StableDiffusionXLControlNetUnionImg2ImgPipeline", "StableDiffusionXLControlNetUnionInpaintPipeline")

UNET = register_adapter(Adapter(
    family="unet",
    model_class=UNet2DConditionModel,
    processors=CLASSIC_PROCESSORS,
    select=is_text_cross_attention,
    mask_arg="encoder_attention_mask",
    timestep_max=999.0,  # official SDXL: NAG off once t < floor((1 - nag_end) * 999)
    window=_official_unet_window,
    preset="sdxl",
    notes="SD1.5/SDXL (incl. DMD2, Lightning, Turbo checkpoints): NAG on every cross-attention attn2; default, "
          "fused, sliced and IP-Adapter processors (IP-Adapter image tokens not negated)",
    pipelines={
        **dict.fromkeys(SD15_PIPELINES, PipelineSpec(denoisers=("unet",), preset="sd15")),
        **dict.fromkeys(SDXL_PIPELINES, PipelineSpec(denoisers=("unet",), preset="sdxl",
                                                     encoders=("text_encoder_2",))),
    },
    presets={
        # Official SDXL pipeline: alpha 0.5; README DMD2 example nag_scale 3 (paper φ=2).
        "sdxl": NAGConfig(scale=3.0, tau=2.5, alpha=0.5),
        # No official diffusers SD1.5 code; paper/UNet family φ=2, α=0.5 (as SDXL).
        "sd15": NAGConfig(scale=3.0, tau=2.5, alpha=0.5),
    },
    tiny={
        "tiny-sd15": TinyModel(tiny_sd15_pipeline, {"height": 64, "width": 64}),
        "tiny-sdxl": TinyModel(tiny_sdxl_pipeline, {"height": 64, "width": 64}),
    },
    bench_inputs=unet_bench_inputs,
))
