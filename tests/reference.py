"""A straightforward NAG reference for cross-attention denoisers, independent of nagkit's kernels and hooks.

1. Run the unmodified model with the *negative* as its text and record, for every guided attention module, the text
   context (and mask) that reaches it — i.e. the negative after the model's own text layers.
2. Swap each of those modules' processors for :class:`RefProcessor`, which calls the module's original diffusers
   processor twice with the output projection removed (``Z+`` with the prompt, ``Z-`` with the recorded negative),
   applies the literal paper formula, then the output projection.
"""

from __future__ import annotations

import contextlib

import torch

UNGUIDED = object()


def reference_nag(z_pos, z_neg, scale, tau, alpha):
    zp, zn = z_pos.double(), z_neg.double()
    zg = zp * scale - zn * (scale - 1)
    r = zg.abs().sum(-1, keepdim=True) / zp.abs().sum(-1, keepdim=True)
    zhat = zg * torch.clamp(r, max=tau) / r
    return (alpha * zhat + (1 - alpha) * zp).to(z_pos.dtype)


def text_attention_modules(model):
    return {n: m for n, m in model.named_modules() if n.endswith("attn2") and getattr(m, "is_cross_attention", False)}


@contextlib.contextmanager
def swapped(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


class Capture:
    def __init__(self, inner, store, name):
        self.inner, self.store, self.name = inner, store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        self.store[self.name] = (encoder_hidden_states, attention_mask)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


class RefProcessor:
    def __init__(self, inner, neg_context, neg_mask, scale, tau, alpha, n_image=0, rows=None):
        self.inner, self.neg_context, self.neg_mask = inner, neg_context, neg_mask
        self.scale, self.tau, self.alpha, self.n_image, self.rows = scale, tau, alpha, n_image, rows

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        call = self.inner
        with swapped(attn.to_out, "0", torch.nn.Identity()):
            if self.n_image:
                k = self.n_image
                with swapped(attn, "add_k_proj", None):
                    z_pos = call(attn, hidden_states, encoder_hidden_states[:, k:], attention_mask, *args, **kwargs)
                    z_neg = call(attn, hidden_states, self.neg_context[:, k:], self.neg_mask, *args, **kwargs)
                image = call(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs) - z_pos
            else:
                z_pos = call(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
                z_neg = call(attn, hidden_states, self.neg_context, self.neg_mask, *args, **kwargs)
                image = 0
        out = reference_nag(z_pos, z_neg, self.scale, self.tau, self.alpha)
        if self.rows is not None:  # only these rows are guided
            keep = torch.ones(out.shape[0], dtype=torch.bool)
            keep[self.rows] = False
            out[keep] = z_pos[keep]
        return attn.to_out[0](out + image)


@contextlib.contextmanager
def processors(model, make):
    modules = text_attention_modules(model)
    originals = {n: m.processor for n, m in modules.items()}
    try:
        for n, m in modules.items():
            m.set_processor(make(n, originals[n]))
        yield
    finally:
        for n, m in modules.items():
            m.set_processor(originals[n])


def reference_forward(model, kwargs, negative, scale, tau, alpha, text_arg="encoder_hidden_states",
                      mask_arg=None, n_image=0, rows=None):
    """The model output with NAG computed the plain way. ``negative`` maps forward-argument names to tensors."""
    store = {}
    neg_kwargs = dict(kwargs)
    neg_kwargs[text_arg] = negative[text_arg]
    if mask_arg is not None:
        neg_kwargs[mask_arg] = negative.get(mask_arg)
    with torch.no_grad(), processors(model, lambda n, inner: Capture(inner, store, n)):
        model(**neg_kwargs)
    with torch.no_grad(), processors(model, lambda n, inner: RefProcessor(
            inner, *store[n], scale, tau, alpha, n_image=n_image, rows=rows)):
        return model(**kwargs)
