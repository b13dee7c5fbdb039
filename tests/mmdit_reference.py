"""Plain references for NAG on joint-attention MM-DiTs: the image stream tiled over a doubled batch.

The batch is ``[prompt rows; negative rows]``. In every guided joint attention both halves run the model's own
attention (two full joint attentions); the image part of the attention output of *both* halves is replaced by
``NAG(Z+, Z-)`` so the two image streams stay one stream; the text halves evolve separately. The model output is the
first half. This is the official algorithm's structure, written in the most direct way.
"""

from __future__ import annotations

import contextlib

import torch

from .reference import reference_nag, swapped


class DoubledJointRef:
    """For processors that return ``(image_out, text_out)`` and project the image with ``attn.to_out[0]``."""

    def __init__(self, inner, scale, tau, alpha):
        self.inner, self.scale, self.tau, self.alpha = inner, scale, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        with swapped(attn.to_out, "0", torch.nn.Identity()):
            z, text = self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        b = z.shape[0] // 2
        guided = reference_nag(z[:b], z[b:], self.scale, self.tau, self.alpha)
        return attn.to_out[0](torch.cat([guided, guided])), text


@contextlib.contextmanager
def joint_processors(model, make, select):
    modules = {n: m for n, m in model.named_modules() if hasattr(m, "set_processor") and select(n, m)}
    originals = {n: m.processor for n, m in modules.items()}
    try:
        for n, m in modules.items():
            m.set_processor(make(originals[n]))
        yield
    finally:
        for n, m in modules.items():
            m.set_processor(originals[n])


def doubled(x):
    return torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.ndim > 0 else x
