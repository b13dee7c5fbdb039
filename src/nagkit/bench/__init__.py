"""``nagkit bench``: the cost of negative guidance on full-size denoisers.

FLOP mode (:func:`run_flops`) builds each family's published config on the meta device (no weights, no memory) and
counts every variant — no guidance, CFG, nagkit's NAG, NAG with CFG, the official implementation's way, and the
analytic minimum — with ``torch.utils.flop_counter``. Time mode (wall time) is not implemented yet.
"""

from .families import FamilySpec, Geometry, build_inputs, build_model, load_families
from .flops import VARIANTS, FamilyResult, VariantResult, attention_count_check, count_flops, run_family, run_flops

__all__ = ["VARIANTS", "FamilyResult", "FamilySpec", "Geometry", "VariantResult", "attention_count_check",
           "build_inputs", "build_model", "count_flops", "load_families", "run_family", "run_flops"]
