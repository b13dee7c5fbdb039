"""Pipeline and denoiser integration: ``apply`` / ``Guide``, the denoiser hook, the pipeline table."""

from .guide import Guide, apply
from .pipelines import PIPELINES

__all__ = ["PIPELINES", "Guide", "apply"]
