"""Toy text-to-image world for offline NAG experiments: procedural scenes with captions (:mod:`nagkit.toy.data`) and
a deterministic pixel-rule judge that reads them back (:mod:`nagkit.toy.judge`)."""
