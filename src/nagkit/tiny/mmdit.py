"""Tiny, seeded-random, offline pipelines of the joint-attention (MM-DiT) families: SD3 / SD3.5, Flux, Chroma.

Like :mod:`nagkit.tiny.pipelines`, every builder returns the real diffusers pipeline class on CPU in float32, with
``torch.manual_seed(seed)`` before each random component and in-memory tokenizers; nothing is downloaded. The
recommended small call kwargs are in ``nagkit.tiny.pipelines.TINY_CALL_KWARGS`` (``"tiny-sd3"``, ``"tiny-flux"``...).

This module imports the shared helpers of :mod:`nagkit.tiny.pipelines` inside the builders, so that module can
import these builders at its end without an import cycle.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    ChromaPipeline,
    ChromaTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

__all__ = [
    "FLUX_VAE_FACTORS",
    "MMDIT_LATENT_CHANNELS",
    "MMDIT_TEXT_LENGTH",
    "SD3_VAE_FACTORS",
    "tiny_chroma_pipeline",
    "tiny_flux_dev_pipeline",
    "tiny_flux_kontext_pipeline",
    "tiny_flux_pipeline",
    "tiny_sd35_pipeline",
    "tiny_sd3_pipeline",
]

#: Latent channels of the SD3 / Flux / Chroma VAEs (Flux packs 2x2 latent patches: 64 transformer channels).
MMDIT_LATENT_CHANNELS = 16
#: T5 ``max_sequence_length`` in the recommended call kwargs (the pipelines' defaults, 256 / 512, also work).
MMDIT_TEXT_LENGTH = 32
#: ``(scaling_factor, shift_factor)`` of the real SD3 / SD3.5 VAE.
SD3_VAE_FACTORS = (1.5305, 0.0609)
#: ``(scaling_factor, shift_factor)`` of the real Flux / Chroma VAE.
FLUX_VAE_FACTORS = (0.3611, 0.1159)

_T5_DIM = 32  # d_model of the tiny T5 (Flux / Chroma ``joint_attention_dim``)
_SD3_T5_DIM = 64  # SD3 pads the concatenated CLIP states (16 + 32) up to the T5 width, so it must be >= 48


def _tiny_t5(seed: int, d_model: int = _T5_DIM) -> tuple[T5Tokenizer, T5EncoderModel]:
    """Tokenizer (``model_max_length`` 512) and 1-layer T5 v1.1-style (gated-gelu) encoder, in eval mode."""
    from nagkit.tiny.pipelines import tiny_t5_tokenizer

    tokenizer = tiny_t5_tokenizer(model_max_length=512)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, T5EncoderModel(config).eval()


def _tiny_vae(seed: int, factors: tuple[float, float]) -> AutoencoderKL:
    """4-level ``AutoencoderKL`` (spatial factor 8, 16 latent channels, no quant convs) with SD3/Flux factors.

    The SD3 / Flux pipelines decode with ``latents / scaling_factor + shift_factor``, so ``shift_factor`` must be set
    (the ``AutoencoderKL`` default ``None`` raises a ``TypeError``).
    """
    scaling_factor, shift_factor = factors
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=MMDIT_LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def _flux_dev_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # Released FLUX.1-dev / Kontext / Chroma scheduler config (resolution-dependent shift; the pipelines pass `mu`).
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _sd3(seed: int, dual_attention_layers: tuple[int, ...]) -> StableDiffusion3Pipeline:
    """Shared SD3 / SD3.5 builder (see :func:`tiny_sd3_pipeline`)."""
    from nagkit.tiny.pipelines import _clip_text_config, _finish, tiny_clip_tokenizer

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


def _flux_transformer(seed: int, pooled_dim: int, guidance_embeds: bool) -> FluxTransformer2DModel:
    """2 double-stream + 2 single-stream Flux blocks, 2 heads x 16 (RoPE axes 4 + 4 + 8)."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * MMDIT_LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_DIM,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    ).eval()


def _flux_components(seed: int, guidance_embeds: bool) -> dict[str, object]:
    """Components shared by the Flux and Flux Kontext builders."""
    from nagkit.tiny.pipelines import _clip_text_config, tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden_size=16)).eval()
    tokenizer_2, text_encoder_2 = _tiny_t5(seed)
    transformer = _flux_transformer(seed, text_encoder.config.hidden_size, guidance_embeds)
    vae = _tiny_vae(seed, FLUX_VAE_FACTORS)
    torch.manual_seed(seed)
    if guidance_embeds:
        scheduler = _flux_dev_scheduler()
    else:  # FLUX.1-schnell: fixed shift 1
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
    }


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """Build a tiny random FLUX.1-schnell-style pipeline (no guidance embedding).

    Transformer: 2 double-stream (joint) + 2 single-stream blocks, 2 heads x 16, 64 input channels (2x2-packed
    16-channel latents). Text: ``CLIPTextModel`` (hidden 16, 77 tokens; only its pooled output is used) and a 1-layer
    T5 (d_model 32). VAE factor 8 (height/width multiples of 16), Flux scaling/shift factors. Scheduler: flow-match
    Euler, shift 1. True CFG runs with ``true_cfg_scale > 1`` and a ``negative_prompt``; ``guidance_scale`` is ignored.

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``FluxPipeline`` on CPU in float32.
    """
    from nagkit.tiny.pipelines import _finish

    return _finish(FluxPipeline(**_flux_components(seed, guidance_embeds=False)))


def tiny_flux_dev_pipeline(seed: int = 0) -> FluxPipeline:
    """Build a tiny random FLUX.1-dev-style (guidance-distilled) pipeline.

    Like :func:`tiny_flux_pipeline` with ``guidance_embeds=True`` (``guidance_scale`` is embedded, no extra pass) and
    the dev scheduler (shift 3, dynamic shifting).

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``FluxPipeline`` on CPU in float32.
    """
    from nagkit.tiny.pipelines import _finish

    return _finish(FluxPipeline(**_flux_components(seed, guidance_embeds=True)))


def tiny_flux_kontext_pipeline(seed: int = 0) -> FluxKontextPipeline:
    """Build a tiny random FLUX.1-Kontext-dev-style pipeline (guidance-distilled, image-conditioned).

    Same components as :func:`tiny_flux_dev_pipeline`. The conditioning ``image`` is VAE-encoded and its packed
    tokens are appended to the image tokens. Call it with ``max_area=height * width`` (the output size is derived
    from it, default 1024**2) and ``_auto_resize=False`` (else the image is resized to a ~1 MP preferred resolution).

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``FluxKontextPipeline`` on CPU in float32; ``image=`` is optional (see :func:`tiny_condition_image`).
    """
    from nagkit.tiny.pipelines import _finish

    return _finish(FluxKontextPipeline(**_flux_components(seed, guidance_embeds=True)))


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
    from nagkit.tiny.pipelines import _finish

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
