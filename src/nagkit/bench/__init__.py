"""``nagkit bench``: the cost of negative guidance.

FLOP mode (:func:`run_flops`) builds each family's published config on the meta device (no weights, no memory) and
counts every variant — no guidance, CFG, nagkit's NAG (``fast`` and ``official`` mode), NAG with CFG, the official
implementation's way, and the analytic minimum — with ``torch.utils.flop_counter``. Time mode (:func:`run_time`)
measures wall time and peak memory per denoiser call of every variant on reduced configs with real random weights
(:mod:`nagkit.bench.timing`).
"""

from .families import FamilySpec, Geometry, build_inputs, build_model, load_families
from .flops import VARIANTS, FamilyResult, VariantResult, attention_count_check, count_flops, run_family, run_flops
from .timing import TIME_VARIANTS, FamilyTime, TimeVariant, reduce_for_time, run_time, time_family

__all__ = ["TIME_VARIANTS", "VARIANTS", "FamilyResult", "FamilySpec", "FamilyTime", "Geometry", "TimeVariant",
           "VariantResult", "attention_count_check", "build_inputs", "build_model", "count_flops", "load_families",
           "reduce_for_time", "run_family", "run_flops", "run_time", "time_family"]
