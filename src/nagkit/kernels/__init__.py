"""Attention kernels that compute NAG's two attention outputs at minimal cost."""

from .cross import Packing, nag_cross_attention, split_text

__all__ = ["Packing", "nag_cross_attention", "split_text"]
