"""Tiny, seeded-random, fully offline diffusers pipelines for tests and CPU demos."""

from nagkit.tiny.pipelines import (
    TINY_CALL_KWARGS,
    TINY_PIPELINES,
    tiny_condition_image,
    tiny_pixart_sigma_pipeline,
    tiny_sana_pipeline,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
    tiny_wan22_pipeline,
    tiny_wan_i2v_pipeline,
    tiny_wan_pipeline,
)

__all__ = [
    "TINY_CALL_KWARGS",
    "TINY_PIPELINES",
    "tiny_condition_image",
    "tiny_pixart_sigma_pipeline",
    "tiny_sana_pipeline",
    "tiny_sd15_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_wan22_pipeline",
    "tiny_wan_i2v_pipeline",
    "tiny_wan_pipeline",
]
