"""Shared helpers of the tiny, seeded-random, offline pipelines of the joint-attention (MM-DiT) families.

The builders themselves live in their family modules (:mod:`nagkit.adapters.sd3`, :mod:`nagkit.adapters.flux`,
:mod:`nagkit.adapters.chroma`) and are re-exported here under their historical names. Like the others, every builder
returns the real diffusers pipeline class on CPU in float32, with ``torch.manual_seed(seed)`` before each random
component and in-memory tokenizers; nothing is downloaded. The recommended small call kwargs are in
``nagkit.tiny.pipelines.TINY_CALL_KWARGS`` (``"tiny-sd3"``, ``"tiny-flux"``...).

This module holds what those builders share: the T5 encoder, the SD3/Flux VAE and their constants.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from nagkit.adapters.chroma import tiny_chroma_pipeline
from nagkit.adapters.flux import tiny_flux_dev_pipeline, tiny_flux_kontext_pipeline, tiny_flux_pipeline
from nagkit.adapters.sd3 import tiny_sd3_pipeline, tiny_sd35_pipeline
from nagkit.tiny.pipelines import tiny_t5_tokenizer

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


def _tiny_t5(seed: int, d_model: int = _T5_DIM) -> tuple[T5Tokenizer, T5EncoderModel]:
    """Tokenizer (``model_max_length`` 512) and 1-layer T5 v1.1-style (gated-gelu) encoder, in eval mode."""
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
