"""Toy text-to-image world for offline NAG experiments: procedural scenes with captions (:mod:`nagkit.toy.data`), a
deterministic pixel-rule judge that reads them back (:mod:`nagkit.toy.judge`), the embedded model trained on them
(:mod:`nagkit.toy.model`, :mod:`nagkit.toy.train`) and its few-step student (:mod:`nagkit.toy.distill`; the default
``embedded`` model of the command line, the many-step teacher being ``embedded-teacher``).

Importing this package registers the embedded model's NAG preset, ``"embedded"``.
"""

from nagkit.core.config import NAGConfig, register_preset

# nagkit's embedded toy model (nagkit.toy, 6 Flux blocks against FLUX.1's 57): the Flux preset barely moves it; the full
# NAG output (α 1) with a looser cap does. Picked among 5 settings on the quality benchmark's seeds, checked on held-out
# seeds (docs/quality.md, tests/test_embedded.py).
register_preset("embedded", NAGConfig(scale=8.0, tau=5.0, alpha=1.0))
