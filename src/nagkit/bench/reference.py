"""In-repo reference of the official NAG implementation's way of computing cross-attention NAG, for FLOP counting.

The official code (ChenDarYen/Normalized-Attention-Guidance) concatenates the NAG negative text to the prompt's
text along the *batch* and, in each text cross-attention, tiles the image queries so that one attention call covers
both: ``Q = [q; q]``, ``K = [k(prompt); k(negative)]``. The query projection runs once, the key/value projections run
on the negative's tokens too, and the attention runs once more on every image token; the output projection runs on
the guided result only. :class:`OfficialCrossAttnProcessor` reproduces that computation (written for this benchmark,
not copied) on a model that receives the negative as extra text tokens after the prompt's (``[positive | negative]``
along the sequence, which costs the per-token text layers exactly what a batch concatenation costs). The NAG
combination is the paper's formula with an L1 norm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class OfficialLayout:
    """What the reference processors need to know about the packed text.

    Attributes:
        lp: prompt tokens (first in the text sequence).
        ln: negative tokens (right after the prompt's).
        image_tokens: image-context tokens placed by the model *before* the text (Wan I2V), else 0.
        scale, tau, alpha: NAG parameters (official convention: ``Z~ = s·Z+ − (s−1)·Z-``).
    """

    lp: int
    ln: int
    image_tokens: int = 0
    scale: float = 3.0
    tau: float = 2.5
    alpha: float = 0.5


def official_nag(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float, tau: float, alpha: float) -> torch.Tensor:
    """The official NAG combination (L1 norm over the channels of each token).

    Args:
        z_pos: attention output with the prompt ``(B, L, C)``.
        z_neg: attention output with the negative, same shape.
        scale, tau, alpha: NAG parameters.

    Returns:
        ``α·Ẑ + (1 − α)·Z+`` with ``Ẑ = Z~·min(r, τ)/r``.
    """
    guidance = z_pos * scale - z_neg * (scale - 1)
    norm_pos = torch.norm(z_pos, p=1, dim=-1, keepdim=True)
    norm_guidance = torch.norm(guidance, p=1, dim=-1, keepdim=True)
    ratio = norm_guidance / norm_pos
    guidance = guidance * torch.minimum(ratio, ratio.new_ones(1) * tau) / ratio
    return guidance * alpha + z_pos * (1 - alpha)


def _norms_on_flat_projection(inner: Any) -> bool:
    """Whether q/k norms apply to the flat projection (Wan, Sana) or per head (diffusers' ``AttnProcessor2_0``)."""
    from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    return isinstance(inner, (WanAttnProcessor, SanaAttnProcessor2_0))


def _bias(mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """A model-converted text bias ``(B, 1, L)`` (or ``(B, L)``) as an SDPA mask ``(B, 1, 1, L)``."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask[:, None]
    return mask.reshape(batch, 1, -1, mask.shape[-1])


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[1] == length:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])], dim=1)


def _pad_bias(bias: torch.Tensor | None, batch: int, have: int, length: int, like: torch.Tensor
              ) -> torch.Tensor | None:
    if bias is None and have == length:
        return None
    if bias is None:
        bias = like.new_zeros(batch, 1, 1, have)
    if have == length:
        return bias
    pad = bias.new_full((*bias.shape[:-1], length - have), float("-inf"))
    return torch.cat([bias, pad], dim=-1)


class OfficialCrossAttnProcessor:
    """Cross-attention NAG the official way: image queries tiled for the negative text batch, one attention call.

    Set on the text cross-attention modules (``attn2``) of a model called with ``[positive | negative]`` text
    tokens. Works for diffusers' ``AttnProcessor2_0`` (UNet, PixArt), ``SanaAttnProcessor2_0`` and
    ``WanAttnProcessor`` modules (the I2V image context is attended with the untiled queries and added after, as the
    official Wan code). Calls without text go to the original processor.

    Args:
        inner: the module's original processor.
        layout: text lengths and NAG parameters.
    """

    def __init__(self, inner: Any, layout: OfficialLayout) -> None:
        self.inner = inner
        self.layout = layout

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the module's cross-attention with official-style NAG (see the class docstring).

        Args:
            attn: the attention module.
            hidden_states: image tokens ``(B, Lq, C)``.
            encoder_hidden_states: ``[image context |] positive text | negative text`` tokens.
            attention_mask: the model's text bias over the packed text, or None.

        Returns:
            The module's output for the guided call ``(B, Lq, C)``.
        """
        if encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        lay = self.layout
        flat_norms = _norms_on_flat_projection(self.inner)
        batch = hidden_states.shape[0]
        context = encoder_hidden_states
        image_context = None
        if lay.image_tokens and getattr(attn, "add_k_proj", None) is not None:
            image_context, context = context[:, : lay.image_tokens], context[:, lay.image_tokens:]
        if context.shape[1] != lay.lp + lay.ln:
            raise RuntimeError(f"text length {context.shape[1]} != {lay.lp} + {lay.ln}")
        bias = _bias(attention_mask, batch)
        length = max(lay.lp, lay.ln)  # the official pipelines encode both texts to one length
        pos, neg = context[:, : lay.lp], context[:, lay.lp:]
        bias_pos = _pad_bias(None if bias is None else bias[..., : lay.lp], batch, lay.lp, length, hidden_states)
        bias_neg = _pad_bias(None if bias is None else bias[..., lay.lp:], batch, lay.ln, length, hidden_states)
        text = torch.cat([_pad_tokens(pos, length), _pad_tokens(neg, length)], dim=0)  # batch concatenation

        heads = attn.heads
        query = attn.to_q(hidden_states)
        key = attn.to_k(text)
        value = attn.to_v(text)
        if flat_norms:
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
        query = query.unflatten(-1, (heads, -1)).transpose(1, 2)
        key = key.unflatten(-1, (heads, -1)).transpose(1, 2)
        value = value.unflatten(-1, (heads, -1)).transpose(1, 2)
        if not flat_norms:
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
        mask = None
        if bias_pos is not None or bias_neg is not None:
            bias_pos = bias_pos if bias_pos is not None else query.new_zeros(batch, 1, 1, length)
            bias_neg = bias_neg if bias_neg is not None else query.new_zeros(batch, 1, 1, length)
            mask = torch.cat([bias_pos, bias_neg], dim=0).to(query.dtype)
        tiled = torch.cat([query, query], dim=0)  # the official query tiling
        out = F.scaled_dot_product_attention(tiled, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).to(hidden_states.dtype)
        hidden = official_nag(out[:batch], out[batch:], lay.scale, lay.tau, lay.alpha)

        if image_context is not None:
            key_img = attn.norm_added_k(attn.add_k_proj(image_context)).unflatten(-1, (heads, -1)).transpose(1, 2)
            value_img = attn.add_v_proj(image_context).unflatten(-1, (heads, -1)).transpose(1, 2)
            img = F.scaled_dot_product_attention(query, key_img, value_img, dropout_p=0.0, is_causal=False)
            hidden = hidden + img.transpose(1, 2).flatten(2, 3).to(hidden.dtype)

        hidden = attn.to_out[0](hidden)
        hidden = attn.to_out[1](hidden)
        if getattr(attn, "residual_connection", False):
            raise NotImplementedError("residual_connection cross-attention is not supported by the reference")
        return hidden / getattr(attn, "rescale_output_factor", 1.0)


def text_cross_attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The text cross-attention modules of a cross-attention denoiser (``attn2`` modules that attend to text).

    Args:
        model: a UNet, PixArt, Sana or Wan denoiser.

    Returns:
        ``{qualified name: module}``.
    """
    return {name: module for name, module in model.named_modules()
            if name.endswith("attn2") and getattr(module, "is_cross_attention", False)
            and hasattr(module, "set_processor")}


@contextlib.contextmanager
def official_processors(model: torch.nn.Module, layout: OfficialLayout) -> Iterator[int]:
    """Install :class:`OfficialCrossAttnProcessor` on every text cross-attention, restore the originals on exit.

    Args:
        model: a cross-attention denoiser.
        layout: text lengths and NAG parameters.

    Yields:
        The number of modules changed.
    """
    modules = text_cross_attention_modules(model)
    if not modules:
        raise NotImplementedError(f"{type(model).__name__} has no text cross-attention for the official reference")
    originals = {name: module.processor for name, module in modules.items()}
    try:
        for name, module in modules.items():
            module.set_processor(OfficialCrossAttnProcessor(originals[name], layout))
        yield len(modules)
    finally:
        for name, module in modules.items():
            module.set_processor(originals[name])
