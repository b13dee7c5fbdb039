"""``nagkit.cli.models.vae_factors``: the CLI's size and frame checks use the factors the pipelines themselves use."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    AutoencoderKLHunyuanVideo15,
    AutoencoderKLLTX2Video,
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
)

from nagkit.cli.models import vae_factors


def _defaults(cls: type) -> dict:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("cls", [AutoencoderKLLTXVideo, AutoencoderKLLTX2Video, AutoencoderKLHunyuanVideo,
                                 AutoencoderKLHunyuanVideo15, AutoencoderKLWan])
def test_video_vae_factors_match_the_vae(cls):
    config = _defaults(cls)
    spatial, temporal = vae_factors(config)
    if cls is AutoencoderKLWan:  # the Wan pipelines: 2 ** len(temperal_downsample), 2 ** sum(temperal_downsample)
        assert (spatial, temporal) == (8, 4)
        return
    with torch.device("meta"):
        vae = cls.from_config(config)
    assert spatial == vae.spatial_compression_ratio
    assert temporal == getattr(vae, "temporal_compression_ratio", getattr(vae, "time_compression_ratio", None))


def test_ltx_published_sizes_and_image_vae_fallback():
    published_ltx = {**_defaults(AutoencoderKLLTXVideo), "patch_size": 4, "patch_size_t": 1,
                     "spatio_temporal_scaling": (True, True, True, False)}
    assert vae_factors(published_ltx) == (32, 8)  # LTX-Video 0.9: height/width multiples of 32, 8k+1 frames
    assert vae_factors({"block_out_channels": [128, 256, 512, 512]}) == (8, 1)  # image VAEs (SD, FLUX)
    assert vae_factors(None) == (8, 1)
