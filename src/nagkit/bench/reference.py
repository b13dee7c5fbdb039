"""In-repo reference of the official NAG implementation's way of computing cross-attention NAG, for FLOP counting.

The official code (ChenDarYen/Normalized-Attention-Guidance) concatenates the NAG negative text to the prompt's
text along the *batch* and, in each text cross-attention, tiles the image queries so that one attention call covers
both: ``Q = [q; q]``, ``K = [k(prompt); k(negative)]``. The query projection runs once, the key/value projections run
on the negative's tokens too, and the attention runs once more on every image token; the output projection runs on
the guided result only. :class:`OfficialCrossAttnProcessor` reproduces that computation (written for this benchmark,
not copied) on a model that receives the negative as extra text tokens after the prompt's (``[positive | negative]``
along the sequence, which costs the per-token text layers exactly what a batch concatenation costs). The NAG
combination is the paper's formula with an L1 norm.

Chroma has no official NAG implementation (and nagkit refuses ``mode="official"`` on it); ComfyUI-NAG's Chroma code
does it the official FLUX way (the negative as a second batch row, image tokens copied into it for the single
blocks). :func:`chroma_official_forward` reproduces that computation (:data:`OFFICIAL_WAY` lists such references).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
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


def official_nag(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float, tau: float, alpha: float,
                 p: int = 1) -> torch.Tensor:
    """The official NAG combination (an L1 norm over the channels of each token; ComfyUI-NAG's Flux and Chroma code
    use L2).

    Args:
        z_pos: attention output with the prompt ``(B, L, C)``.
        z_neg: attention output with the negative, same shape.
        scale, tau, alpha: NAG parameters.
        p: order of the norm.

    Returns:
        ``α·Ẑ + (1 − α)·Z+`` with ``Ẑ = Z~·min(r, τ)/r``.
    """
    guidance = z_pos * scale - z_neg * (scale - 1)
    norm_pos = torch.norm(z_pos, p=p, dim=-1, keepdim=True)
    norm_guidance = torch.norm(guidance, p=p, dim=-1, keepdim=True)
    ratio = norm_guidance / norm_pos
    guidance = guidance * torch.minimum(ratio, ratio.new_ones(1) * tau) / ratio
    return guidance * alpha + z_pos * (1 - alpha)


def _norms_on_flat_projection(inner: Any) -> bool:
    """Whether q/k norms apply to the flat projection (Wan, Sana, SANA-Video, LTX-Video, LTX-2) or per head (diffusers'
    ``AttnProcessor2_0``)."""
    from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
    from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor
    from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoAttnProcessor
    from diffusers.models.transformers.transformer_sana_video import SanaAttnProcessor2_0 as SanaVideoAttnProcessor
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    return isinstance(inner, (WanAttnProcessor, SanaAttnProcessor2_0, LTXVideoAttnProcessor,
                              LTX2AudioVideoAttnProcessor, SanaVideoAttnProcessor))


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


# ------------------------------------------------------------------------------------------------ Chroma
def _chroma_bias(mask: torch.Tensor) -> torch.Tensor:
    """A ``[text | image]`` mask ``(B, L)`` as Chroma's blocks turn it into an attention mask: ``(B, 1, L, L)``."""
    return mask[:, None, None, :] * mask[:, None, :, None]


def _heads(x: torch.Tensor, attn: torch.nn.Module) -> torch.Tensor:
    return x.unflatten(-1, (-1, attn.head_dim))


def _joint_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rope: Any,
                bias: torch.Tensor | None) -> torch.Tensor:
    """``FluxAttnProcessor``'s attention: ``(B, L, H, D)`` q/k/v (norms applied), RoPE, SDPA, ``(B, L, H·D)``."""
    from diffusers.models.embeddings import apply_rotary_emb

    if rope is not None:
        query = apply_rotary_emb(query, rope, sequence_dim=1)
        key = apply_rotary_emb(key, rope, sequence_dim=1)
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         attn_mask=bias, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


def _chroma_double_block(block: torch.nn.Module, hidden: torch.Tensor, texts: list[torch.Tensor], temb: torch.Tensor,
                         ropes: list[Any], biases: list[torch.Tensor | None], lay: OfficialLayout
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One double block: the image projected once, one full joint attention per text stream (prompt, negative), the
    image takes ``NAG(Z+, Z-)``; each text stream is updated by its own attention output."""
    attn = block.attn
    norm_img, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden, emb=temb[:, :6])
    q_img = attn.norm_q(_heads(attn.to_q(norm_img), attn))
    k_img = attn.norm_k(_heads(attn.to_k(norm_img), attn))
    v_img = _heads(attn.to_v(norm_img), attn)
    z, updated = [], []
    for text, rope, bias in zip(texts, ropes, biases, strict=True):
        norm_txt, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(text, emb=temb[:, 6:])
        query = torch.cat([attn.norm_added_q(_heads(attn.add_q_proj(norm_txt), attn)), q_img], dim=1)
        key = torch.cat([attn.norm_added_k(_heads(attn.add_k_proj(norm_txt), attn)), k_img], dim=1)
        value = torch.cat([_heads(attn.add_v_proj(norm_txt), attn), v_img], dim=1)
        out = _joint_sdpa(query, key, value, rope, bias)
        length = text.shape[1]
        z.append(out[:, length:])
        text = text + c_gate_msa.unsqueeze(1) * attn.to_add_out(out[:, :length].contiguous())
        norm_txt = block.norm2_context(text) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        updated.append(text + c_gate_mlp.unsqueeze(1) * block.ff_context(norm_txt))
    guided = official_nag(z[0], z[1], lay.scale, lay.tau, lay.alpha, p=2)
    hidden = hidden + gate_msa.unsqueeze(1) * attn.to_out[1](attn.to_out[0](guided.contiguous()))
    norm_img = block.norm2(hidden) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return hidden + gate_mlp.unsqueeze(1) * block.ff(norm_img), updated


def _chroma_single_block(block: torch.nn.Module, rows: list[torch.Tensor], temb: torch.Tensor, ropes: list[Any],
                         biases: list[torch.Tensor | None], lay: OfficialLayout) -> list[torch.Tensor]:
    """One single block on the two rows ``[Tp | I]`` and ``[Tn | I']``: each row runs the whole block; the image
    part of both rows' attention output is ``NAG(Z+, Z-)``."""
    attn = block.attn
    outs, mlps, gates = [], [], []
    for row, rope, bias in zip(rows, ropes, biases, strict=True):
        norm_row, gate = block.norm(row, emb=temb)
        query = attn.norm_q(_heads(attn.to_q(norm_row), attn))
        key = attn.norm_k(_heads(attn.to_k(norm_row), attn))
        outs.append(_joint_sdpa(query, key, _heads(attn.to_v(norm_row), attn), rope, bias))
        mlps.append(block.act_mlp(block.proj_mlp(norm_row)))
        gates.append(gate)
    guided = official_nag(outs[0][:, lay.lp:], outs[1][:, lay.ln:], lay.scale, lay.tau, lay.alpha, p=2)
    outs = [torch.cat([outs[0][:, : lay.lp], guided], dim=1), torch.cat([outs[1][:, : lay.ln], guided], dim=1)]
    return [row + gate.unsqueeze(1) * block.proj_out(torch.cat([out, mlp], dim=2))
            for row, gate, out, mlp in zip(rows, gates, outs, mlps, strict=True)]


def chroma_official_forward(model: torch.nn.Module, negative: dict[str, torch.Tensor], layout: OfficialLayout,
                            hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                            img_ids: torch.Tensor, txt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                            joint_attention_kwargs: dict[str, Any] | None = None, return_dict: bool = True,
                            **unused: Any) -> Any:
    """``ChromaTransformer2DModel.forward`` with NAG computed the way ComfyUI-NAG does it for Chroma (its Flux way).

    There is no official diffusers NAG for Chroma; ComfyUI-NAG (``chroma/model.py``, ``chroma/layers.py``) runs the
    negative as a second batch row, as the official FLUX code does: the modulation vectors are computed once (they
    do not depend on the text) and reused by the negative row; in every double block the image is projected once
    and two full joint attentions run, ``[Tp, I]`` and ``[Tn, I]`` (image→image computed twice), the image takes
    ``NAG(Z+, Z-)`` (L2 norm) and each text stream is updated by its own attention output; before the single blocks
    the image tokens are copied into the negative row, which then runs every single block in full (norms,
    projections, MLP and attention on ``[Tn | I']``), both rows' image attention output being ``NAG(Z+, Z-)``; the
    output layer runs on the prompt row. Written for this benchmark (not copied), with diffusers' modules and the
    diffusers Chroma mask rule (``[text | image]`` mask, outer product per block; the negative's image part is
    ones). Each text keeps its own length (ComfyUI-NAG pads the shorter to the longer for the text layers: the
    same work when both have the same length, as in the benchmark's default geometry).

    Because Chroma's modulation does not depend on the text, the copy ``I'`` receives exactly the updates of ``I``:
    the outputs equal nagkit's ``mode="fast"`` with ``norm="l2"``; only the work differs.

    Args:
        model: a ``ChromaTransformer2DModel``.
        negative: ``{"encoder_hidden_states": (1 or B, Ln, C), "attention_mask": (1 or B, Ln) (optional)}``.
        layout: NAG parameters (``lp``/``ln``/``image_tokens`` are taken from the tensors).
        hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, attention_mask, joint_attention_kwargs,
            return_dict: the model's forward arguments (ControlNet residuals and IP-Adapter inputs are not supported).

    Returns:
        As the model's forward: ``Transformer2DModelOutput`` or a one-tuple.
    """
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    if joint_attention_kwargs or any(value is not None for value in unused.values()):
        raise NotImplementedError("the Chroma reference takes no joint_attention_kwargs or ControlNet inputs")
    batch = hidden_states.shape[0]
    neg_text = negative["encoder_hidden_states"]
    if neg_text.shape[0] not in (1, batch):
        raise ValueError(f"the negative has {neg_text.shape[0]} rows, the call {batch}: the reference guides every row")
    hidden = model.x_embedder(hidden_states)
    pooled = model.distilled_guidance_layer(model.time_text_embed(timestep.to(hidden.dtype) * 1000))
    texts = [model.context_embedder(encoder_hidden_states),
             model.context_embedder(neg_text.expand(batch, -1, -1).to(encoder_hidden_states.dtype))]
    lp, ln, li = texts[0].shape[1], texts[1].shape[1], hidden.shape[1]
    lay = OfficialLayout(lp=lp, ln=ln, scale=layout.scale, tau=layout.tau, alpha=layout.alpha)
    txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
    img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    ropes = [model.pos_embed(torch.cat([txt_ids, img_ids])),
             model.pos_embed(torch.cat([txt_ids.new_zeros(ln, txt_ids.shape[-1]), img_ids]))]  # Chroma's text ids: 0
    neg_mask = negative.get("attention_mask")
    biases: list[torch.Tensor | None] = [None, None]
    if attention_mask is not None or neg_mask is not None:
        like = attention_mask if attention_mask is not None else neg_mask

        def ones(length: int) -> torch.Tensor:
            return torch.ones(batch, length, device=like.device, dtype=like.dtype)

        pos = attention_mask if attention_mask is not None else ones(lp + li)
        neg = ones(ln) if neg_mask is None else neg_mask.expand(batch, -1).to(device=like.device, dtype=like.dtype)
        biases = [_chroma_bias(pos), _chroma_bias(torch.cat([neg, ones(li)], dim=1))]

    doubles, singles = model.transformer_blocks, model.single_transformer_blocks
    img_offset = 3 * len(singles)
    txt_offset = img_offset + 6 * len(doubles)
    for i, block in enumerate(doubles):
        temb = torch.cat([pooled[:, img_offset + 6 * i: img_offset + 6 * i + 6],
                          pooled[:, txt_offset + 6 * i: txt_offset + 6 * i + 6]], dim=1)
        hidden, texts = _chroma_double_block(block, hidden, texts, temb, ropes, biases, lay)
    rows = [torch.cat([texts[0], hidden], dim=1), torch.cat([texts[1], hidden], dim=1)]  # the negative's image copy
    for i, block in enumerate(singles):
        rows = _chroma_single_block(block, rows, pooled[:, 3 * i: 3 * i + 3], ropes, biases, lay)
    out = model.proj_out(model.norm_out(rows[0][:, lp:], pooled[:, -2:]))
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)


@contextlib.contextmanager
def chroma_official_way(model: torch.nn.Module, negative: dict[str, torch.Tensor], layout: OfficialLayout
                        ) -> Iterator[None]:
    """Make ``model(...)`` compute :func:`chroma_official_forward` (the instance's ``forward`` is replaced, as
    ComfyUI-NAG patches its model's ``forward_orig``), restore it on exit.

    Args:
        model: a ``ChromaTransformer2DModel``.
        negative: the negative's ``encoder_hidden_states`` (and ``attention_mask``).
        layout: NAG parameters.

    Yields:
        Nothing.
    """
    from diffusers import ChromaTransformer2DModel

    if not isinstance(model, ChromaTransformer2DModel):
        raise TypeError(f"the Chroma reference needs a ChromaTransformer2DModel, not {type(model).__name__}")
    previous = model.__dict__.get("forward")
    model.forward = functools.partial(chroma_official_forward, model, negative, layout)
    try:
        yield
    finally:
        if previous is None:
            del model.forward
        else:
            model.forward = previous


#: In-repo references of the official way for families that nagkit's ``mode="official"`` does not cover, by input
#: builder (``FamilySpec.inputs``): ``reference(model, negative, layout)`` is a context manager during which
#: ``model(**kwargs)`` computes NAG that way.
OFFICIAL_WAY: dict[str, Callable[..., AbstractContextManager[Any]]] = {"chroma": chroma_official_way}
