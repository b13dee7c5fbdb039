"""Qwen-Image 2.1 ``QwenImage21Transformer2DModel``: a single-stream, block-causal DiT; NAG on the target image's
tokens in every block, the negative's prefix carried as a side-car with its own positions and its own KV cache.

The model runs one joint sequence per sample: the prefix (the vision-language encoder's text, with the condition
images' latents substituted at its ``<|image_pad|>`` slots, 2x2 latent tokens per slot) followed by the target image.
Attention is block-causal (``q >= k`` or both in the same image block): text is causal, every image block attends to
itself and everything before it, and the target (last) attends to everything. Nothing in the prefix ever attends to
the target, so the prefix's activations do not depend on the image being denoised (and, with ``causal_condition``,
the prefix is modulated from ``t = 0``: they do not depend on the step either; the pipeline caches the prefix's keys
and values after the first step, ``kv_cache_mode="extract"``/``"cached"``).

Packing the negative after the prompt's text is therefore wrong (the negative's text would attend causally to the
prompt's, and the target's frame position is the extent of the whole prefix). Instead (Pattern B):

* ``plan`` (per guided call): the guided rows and the negative's layout; the call's inputs stay as they are, so the
  prompt's path through the model is the original one;
* at the first block (a block hook), the **negative prefix pass**: the negative's prefix is built exactly as the
  model builds a prefix, with the model's own code (``txt_in``, ``img_in`` for the condition latents substituted at
  the negative's own image slots, ``pos_embed`` with the negative's own positions ``0..``, ``build_token_metadata``,
  the prefix segments, the key mask of its padding, the shared modulation: the ``t = 0`` row with
  ``causal_condition``, the call's timestep without) and run through every block (the blocks' own forwards; their
  attention is the block-causal prefill), storing its keys and values per layer in a nagkit-owned
  ``QwenImage21KVCache``. With ``causal_condition`` and a pipeline ``kv_cache`` the pass runs once per generation (at
  the first guided step; the later ``cached`` steps reuse it); otherwise every guided step re-runs it (the prefix
  depends on ``t`` without ``causal_condition``). The image is never duplicated;
* the NAG processor: the prompt's prefix rows attend exactly as in the model (per-segment block-causal prefill);
  target queries get ``Z+`` = attention over the prompt's keys as in the model, and
  ``Z- = attention(target queries -> [negative prefix keys, target keys])`` where, for the negative-prefix part, the
  target queries are rotated with the frame index ``P_n`` the target would have after the negative prefix (a run of
  the model on the negative alone); the target->target part is computed once and merged by log-sum-exp (relative
  frame 0 either way). Target rows of guided samples get ``NAG(Z+, Z-)``; prefix rows are unchanged; unguided rows
  get the plain attention.

Processors: ``QwenImage21AttnProcessor`` (default) and ``QwenImage21FlexAttnProcessor``. On guided calls both run the
per-segment SDPA prefill (the default processor's exact decomposition of the block-causal mask; the model builds no
flex ``BlockMask`` while NAG processors are in); unguided calls run the original processor unchanged.

CFG: the pipeline runs true CFG (``true_cfg_scale > 1`` and a ``negative_prompt``) as separate calls in
``cache_context("cond")``/``("uncond")`` with separate KV caches; only the conditional call is guided, and the
unconditional one is untouched. The NAG negative is encoded by the pipeline's ``encode_prompt`` with the call's
condition ``image`` (as its CFG negative), giving its own ``image_pad_mask``; a negative in embedding form without an
``image_pad_mask`` is text only (refused when the call has condition images).

Limits (each refused with an error naming it): context parallelism; gradient checkpointing with gradients on.

The family's file: the NAG processor, plan and block hook, the adapter; the pipeline ``QwenImage21Pipeline`` and
preset (``qwen-image-2.1``); the meta inputs of ``nagkit bench``; the tiny pipeline ``tiny-qwen-image-2.1``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers import QwenImage21Transformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage21 import (
    QwenImage21AttnProcessor,
    QwenImage21FlexAttnProcessor,
    QwenImage21KVCache,
    QwenImage21TransformerBlock,
    _qwenimage21_prefix_segments,
    apply_rotary_emb_qwen,
)

from ..core.config import NAGConfig
from ..core.operator import nag_combine
from ..core.state import Packing
from ..kernels import joint as _joint
from ..kernels.lse import attend, attention_with_lse_backend, merge_attention
from .base import Adapter, NAGProcessor, PipelineSpec, TinyModel, register_adapter

if TYPE_CHECKING:
    from diffusers import QwenImage21Pipeline

    from ..bench.families import FamilySpec, Inputs
    from ..core.state import NAGState, Negative

_KEY = "qwenimage21"  # state.extras key of the call's layout
_SLOT = 4  # latent tokens per vision-language image slot (2x2)

#: The nagkit-owned negative caches, per pipeline ``kv_cache`` object (dropped with it).
_NEGATIVE_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _NegativePrefix:
    """The negative prefix of one guided call (or of a whole generation, when the prefix is cacheable).

    Attributes:
        source: the negative embeddings it was made from (identity), its rows and image layout (validity key).
        cache: per-layer keys/values ``(G, P_n, H, D)`` (after norms and RoPE at the negative's own positions).
        key_mask: ``(G, 1, 1, P_n)`` boolean key mask of its padding, or None.
        rotary: RoPE rows of the target at frame ``P_n`` ``(T, D/2)`` (complex).
        length: ``P_n``.
    """

    source: tuple
    cache: QwenImage21KVCache
    key_mask: torch.Tensor | None
    rotary: torch.Tensor
    length: int


@dataclass
class _Layout:
    """One guided call.

    Attributes:
        model: the denoiser.
        rows: the guided rows (contiguous).
        embeds, mask: the negative's text embeddings ``(G, Ln, C)`` and padding mask ``(G, Ln)`` (or None).
        img_mask: the negative's image-slot mask with the target's slots appended ``(Ln + T/4,)`` bool.
        source: validity key of a stored negative prefix.
        hidden_states: the call's latents ``(B, N, C_in)`` (condition images first, the target last).
        shapes: ``img_shapes`` of the call's first row.
        target: target tokens ``T``.
        prefix: the prompt's prefix length ``P_p``.
        segments: the prompt's prefix segments (for a processor that gets none).
        layers: attention module id -> block index.
        kv_cache: the call's ``kv_cache`` (the negative prefix is stored with it) or None.
        negative: the negative prefix (set at the first block).
        prefilling: the negative prefix pass is running (the processors then run its prefill).
    """

    model: torch.nn.Module
    rows: slice
    embeds: torch.Tensor
    mask: torch.Tensor | None
    img_mask: torch.Tensor
    source: tuple
    hidden_states: torch.Tensor
    shapes: list[tuple[int, int, int]]
    target: int
    prefix: int
    segments: list[tuple[int, int, bool]]
    layers: dict[int, int]
    kv_cache: Any = None
    negative: _NegativePrefix | None = None
    prefilling: bool = False


# ------------------------------------------------------------------------------------------------ attention pieces
def _projections(attn: torch.nn.Module, hidden_states: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key, value ``(B, L, H, D)`` after the q/k norms, before RoPE (the model's projection steps)."""
    head_dim = attn.inner_dim // attn.heads
    query = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))
    key = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
    value = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
    return attn.norm_q(query).to(value.dtype), attn.norm_k(key).to(value.dtype), value


def _rope(x: torch.Tensor, rotary: torch.Tensor | None) -> torch.Tensor:
    return x if rotary is None else apply_rotary_emb_qwen(x, rotary, use_real=False)


def prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     segments: list[tuple[int, int, bool]], key_valid: torch.Tensor | None) -> torch.Tensor:
    """Block-causal attention of the prefix rows, one SDPA call per segment (layout ``(B, L, H, D)``).

    A segment ``[start, end)`` sees the keys ``[0, end)``: everything before it and its own tokens, all of them for
    an image block, causally for text; padded keys (``key_valid`` False) are dropped. The same calls as the model's
    default processor, so the prompt's prefix rows are the plain model's.
    """
    parts = []
    for start, end, is_text in segments:
        keep = None
        if is_text:
            rows = torch.arange(start, end, device=query.device)[:, None]
            keep = (torch.arange(end, device=query.device)[None, :] <= rows)[None, None]
        if key_valid is not None:
            valid = key_valid[:, None, None, :end]
            keep = valid if keep is None else keep & valid
        parts.append(dispatch_attention_fn(query[:, start:end], key[:, :end], value[:, :end], attn_mask=keep,
                                           dropout_p=0.0, backend=None, parallel_config=None))
    return torch.cat(parts, dim=1)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def nag_target_attention(query: torch.Tensor, query_neg: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         key_target: torch.Tensor, mask: torch.Tensor | None, negative: _NegativePrefix,
                         layer: int, rows: slice, config: NAGConfig, backend: Any, plain_backend: Any
                         ) -> torch.Tensor:
    """NAG attention of the target queries.

    Args:
        query: target queries ``(B, T, H, D)`` rotated as in the model (frame ``P_p``).
        query_neg: the guided rows' target queries rotated at frame ``P_n`` ``(G, T, H, D)``.
        key, value: every key the target sees in the model ``(B, P_p + T, H, D)`` (prompt prefix, then target).
        key_target: the guided rows' target keys rotated at frame ``P_n`` ``(G, T, H, D)`` (two-attention path only;
            the merged path reuses the target→target part).
        mask: the model's key mask ``(B, 1, 1, P_p + T)`` bool, or None.
        negative: the negative prefix (its keys/values at ``layer``, key mask).
        layer: block index.
        rows: the guided rows.
        config: NAG settings.
        backend: the module's attention backend (target parts).
        plain_backend: the backend the model uses for the target rows (unguided rows).

    Returns:
        ``(B, T, H·D)``: ``NAG(Z+, Z-)`` on the guided rows, the plain attention elsewhere.
    """
    t = query.shape[1]
    pk = key.shape[1] - t
    k_neg, v_neg = negative.cache.get_layer(layer).get()
    q, k, v = _heads_first(query), _heads_first(key), _heads_first(value)
    qn, kn, vn = _heads_first(query_neg), _heads_first(k_neg), _heads_first(v_neg)
    image = positive = neg = None
    if not _joint._TWO_ATTENTIONS:  # target→target once, merged with the two prefix parts
        image = attention_with_lse_backend(q[rows], k[rows, :, pk:], v[rows, :, pk:], None, backend, dead=None)
        prefix_mask = None if mask is None else mask[rows, ..., :pk]
        positive = image and attention_with_lse_backend(q[rows], k[rows, :, :pk], v[rows, :, :pk], prefix_mask,
                                                        backend)
        neg = positive and attention_with_lse_backend(qn, kn, vn, negative.key_mask, backend)
    if neg is not None:
        z_pos = merge_attention([image, positive], heads_last=True)
        z_neg = merge_attention([image, neg], heads_last=True)
    else:  # two full attentions (no LSE from this backend, or force_two_attentions())
        z_pos = attend(q[rows], k[rows], v[rows], None if mask is None else mask[rows], backend)
        neg_mask = negative.key_mask
        if neg_mask is not None:
            ones = neg_mask.new_ones(*neg_mask.shape[:-1], t)
            neg_mask = torch.cat([neg_mask, ones], dim=-1)
        z_neg = attend(qn, torch.cat([kn, _heads_first(key_target)], dim=2),
                       torch.cat([vn, v[rows, :, pk:]], dim=2), neg_mask, backend)
    z_pos, z_neg = z_pos.transpose(1, 2).flatten(2), z_neg.transpose(1, 2).flatten(2)
    guided = nag_combine(z_pos, z_neg, config.scale, config.tau, config.alpha, config.norm).to(query.dtype)
    if rows.start == 0 and rows.stop == query.shape[0]:
        return guided
    parts = []
    for part in (slice(0, rows.start), None, slice(rows.stop, query.shape[0])):
        if part is None:
            parts.append(guided)
        elif part.stop > part.start:
            plain = dispatch_attention_fn(query[part], key[part], value[part],
                                          attn_mask=None if mask is None else mask[part], dropout_p=0.0,
                                          backend=plain_backend, parallel_config=None)
            parts.append(plain.flatten(2, 3).to(query.dtype))
    return torch.cat(parts, dim=0)


class NAGQwenImage21AttnProcessor(NAGProcessor):
    """``QwenImage21AttnProcessor`` / ``QwenImage21FlexAttnProcessor`` with NAG on the target image's queries (see
    :func:`nag_target_attention`); the prompt's prefix rows keep the model's block-causal attention, the KV-cache
    bookkeeping is the model's. During the negative prefix pass it runs that pass's block-causal prefill and stores
    the negative's keys and values."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        attention_mask: Any | None = None,
        rotary_emb: torch.Tensor | None = None,
        layer_cache: Any | None = None,
        kv_cache_mode: str | None = None,
        cache_write_slice: slice | None = None,
        segments: list[tuple[int, int, bool]] | None = None,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        layout = None if self.packing is None else self.state.extras.get(_KEY)
        if layout is None or id(attn) not in layout.layers:
            return self.inner(attn, hidden_states, attention_mask, rotary_emb, layer_cache, kv_cache_mode,
                              cache_write_slice, segments, key_valid)
        if self._parallel_config is not None:
            raise NotImplementedError("NAG on Qwen-Image 2.1 does not support context parallelism "
                                      "(enable_parallelism): the sequence split would cut the side-car negative "
                                      "prefix")
        query0, key0, value = _projections(attn, hidden_states)
        query, key = _rope(query0, rotary_emb), _rope(key0, rotary_emb)
        if layout.prefilling:  # the negative prefix pass: its own block-causal prefill; keep its keys/values
            layer_cache.store(key, value)
            out = prefix_attention(query, key, value, segments, key_valid)
            return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))
        if layer_cache is not None:  # the model's KV-cache bookkeeping for the prompt
            if kv_cache_mode == "extract" and cache_write_slice is not None:
                layer_cache.store(key[:, cache_write_slice].clone(), value[:, cache_write_slice].clone())
            elif kv_cache_mode == "cached":
                cached_k, cached_v = layer_cache.get()
                key, value = torch.cat([cached_k, key], dim=1), torch.cat([cached_v, value], dim=1)
        t, n = layout.target, query.shape[1]
        mask = key_valid[:, None, None, :] if key_valid is not None else (
            attention_mask if isinstance(attention_mask, torch.Tensor) else None)
        outputs = []
        if n > t:  # prefill: the prompt's prefix rows, block-causal as in the model
            outputs.append(prefix_attention(query[:, : n - t], key[:, : n - t], value[:, : n - t],
                                            segments if segments is not None else layout.segments, key_valid))
        negative, rows = layout.negative, layout.rows
        rotary = negative.rotary.to(query0.device)
        query_neg = _rope(query0[rows, n - t:], rotary)
        key_target = _rope(key0[rows, n - t:], rotary) if _joint._TWO_ATTENTIONS else None
        plain_backend = self._attention_backend if n == t else None  # the model: decode vs prefill target rows
        outputs.append(nag_target_attention(
            query[:, n - t:], query_neg, key, value, key_target, mask, negative, layout.layers[id(attn)], rows,
            self.state.config, self._attention_backend, plain_backend))
        out = torch.cat([o.flatten(2, 3) if o.ndim == 4 else o for o in outputs], dim=1).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _block_attention(name: str, module: torch.nn.Module) -> bool:
    """The blocks' attention modules (``transformer_blocks.<i>.attn``)."""
    parts = name.split(".")
    return len(parts) == 3 and parts[0] == "transformer_blocks" and parts[2] == "attn"


# ------------------------------------------------------------------------------------------------ plan
def _slot_layout(img_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(repeats, image_pad_mask)`` of a vision-language slot mask row, as the model expands it."""
    repeats = torch.where(img_mask, _SLOT, 1)
    return repeats, torch.repeat_interleave(img_mask, repeats)


def _plan(model: torch.nn.Module, access: Any, args: tuple, kwargs: dict, negative: Negative, state: NAGState,
          pipeline: str | None, named: bool) -> tuple[tuple, dict, Packing] | None:
    """``Adapter.plan``: the guided rows and the negative's layout; the call's inputs stay as they are (the prompt's
    path through the model is the original one)."""
    from ..integration.hook import guided_rows

    text = access.get("encoder_hidden_states", args, kwargs)
    found = guided_rows(text.shape[0], negative, text, pipeline, named)
    if found is None:
        return None
    rows, expand = found
    if torch.is_grad_enabled() and getattr(model, "gradient_checkpointing", False):
        raise NotImplementedError("NAG on Qwen-Image 2.1 does not support gradient checkpointing with gradients on "
                                  "(the negative prefix pass runs inside the forward); run under torch.no_grad() or "
                                  "disable gradient checkpointing")
    embeds, mask = negative.embeds, negative.mask
    if embeds.ndim != 3 or embeds.shape[-1] != text.shape[-1]:
        raise ValueError(f"negative embeddings must be (batch, tokens, {text.shape[-1]}) like "
                         f"encoder_hidden_states, got {tuple(embeds.shape)}")
    g = rows.stop - rows.start
    if expand:
        embeds = embeds.expand(g, -1, -1)
        mask = None if mask is None else mask.expand(g, -1)
    device = text.device
    embeds = embeds.to(device=device, dtype=text.dtype)
    mask = None if mask is None or bool(mask.all()) else mask.to(device=device).bool()
    shapes = [tuple(int(v) for v in s) for s in access.get("img_shapes", args, kwargs)[0]]
    target = math.prod(shapes[-1])
    prompt_slots = access.get("img_mask", args, kwargs)[0]  # layout code runs on the mask's device, as the model's
    _, pad = _slot_layout(prompt_slots)
    image_ids, target_mask = model.build_token_metadata(pad, shapes)
    prefix = int((~target_mask).sum())
    ln, slots = embeds.shape[1], target // _SLOT
    neg_slots = negative.extras.get("img_mask")
    if neg_slots is None:
        if len(shapes) > 1:
            raise ValueError("this Qwen-Image 2.1 call has condition images, but the NAG negative has no "
                             "image_pad_mask (where its encoding holds the condition images): encode the negative "
                             "with the same image (a pipeline does so for a negative_prompt), or pass "
                             "negative['img_mask']")
        neg_slots = torch.zeros(ln, dtype=torch.bool, device=prompt_slots.device)
    else:
        neg_slots = neg_slots[0].to(prompt_slots.device).bool()
        if neg_slots.shape[0] == ln + slots:
            neg_slots = neg_slots[:ln]
        elif neg_slots.shape[0] != ln:
            raise ValueError(f"the negative's image_pad_mask has {neg_slots.shape[0]} slots; expected {ln} (its "
                             f"tokens) or {ln + slots} (with the target's slots)")
    neg_slots = torch.cat([neg_slots, neg_slots.new_ones(slots)])
    layers = {id(block.attn): i for i, block in enumerate(model.transformer_blocks)}
    source = (negative.embeds, rows.start, rows.stop, tuple(shapes), ln)
    layout = _Layout(model=model, rows=rows, embeds=embeds, mask=mask, img_mask=neg_slots, source=source,
                     hidden_states=access.get("hidden_states", args, kwargs), shapes=shapes, target=target,
                     prefix=prefix, segments=_qwenimage21_prefix_segments(image_ids, prefix), layers=layers)
    kv_cache = access.get("kv_cache", args, kwargs)
    if kv_cache is not None and model.config.causal_condition:
        layout.kv_cache = kv_cache
        stored = _NEGATIVE_CACHES.get(kv_cache)
        if (access.get("kv_cache_mode", args, kwargs) == "cached" and stored is not None and stored[0] is state
                and _same_source(stored[1].source, source)):
            layout.negative = stored[1]
    state.extras[_KEY] = layout
    return args, kwargs, Packing(lp=text.shape[1], ln=ln, rows=rows, batch=text.shape[0])


def _same_source(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1:] == b[1:]


# ------------------------------------------------------------------------------------------------ negative prefix
def negative_prefix(layout: _Layout, modulation: torch.Tensor) -> _NegativePrefix:
    """The negative prefix pass: the negative's prefix made and run through every block as the model runs a
    prefix (its own positions ``0..``, segments, padding mask; modulation rows as the model's), keeping its
    keys/values per layer.

    Args:
        layout: the call's layout.
        modulation: the model's shared modulation of this call (``B + 1`` rows with ``causal_condition``: the last
            one is ``t = 0``).

    Returns:
        The negative prefix.
    """
    model, rows = layout.model, layout.rows
    embeds, slots, shapes, target = layout.embeds, layout.img_mask, layout.shapes, layout.target
    hidden = layout.hidden_states
    g, ln = embeds.shape[:2]
    batch = hidden.shape[0]
    hidden = hidden[rows]
    repeats, pad = _slot_layout(slots)
    length = int(repeats[:ln].sum())
    conditions = hidden.shape[1] - target
    text = model.txt_in(embeds)
    joint = text.repeat_interleave(repeats[:ln], dim=1)
    if int(pad[:length].sum()) != conditions:
        raise ValueError(f"the NAG negative's image_pad_mask holds {int(pad[:length].sum()) // _SLOT} condition-image "
                         f"slots, the call's condition images {conditions // _SLOT}: encode the negative with the "
                         "call's condition images")
    if conditions:
        joint[:, pad[:length]] = model.img_in(hidden[:, :conditions]).to(joint.dtype)
    rotary = model.pos_embed(shapes, pad, device=joint.device)
    image_ids, _ = model.build_token_metadata(pad, shapes)
    segments = _qwenimage21_prefix_segments(image_ids, length)
    key_valid = None
    if layout.mask is not None:
        key_valid = torch.ones(g, length, dtype=torch.bool, device=joint.device)
        key_valid[:, ~pad[:length]] = layout.mask[:, ~slots[:ln]]
    # the modulation rows of the guided samples (one row when the call's timestep has one for every sample)
    causal = model.config.causal_condition
    real = modulation[:-1] if causal else modulation
    real = real[rows] if real.shape[0] == batch else real
    if causal:  # prefix tokens read the trailing t = 0 row
        mod = torch.cat([real, modulation[-1:]], dim=0)
        token_rows = torch.zeros(length, dtype=torch.bool, device=joint.device)
    else:
        mod, token_rows = real, None
    cache = QwenImage21KVCache(len(model.transformer_blocks))
    layout.prefilling = True
    try:
        x = joint
        for i, block in enumerate(model.transformer_blocks):
            # the class's forward: no hooks (NAG's own, caches') on the negative pass
            x = type(block).forward(block, hidden_states=x, modulation=mod, rotary_emb=rotary[:length],
                                    attention_mask=None, target_token_mask=token_rows,
                                    layer_cache=cache.get_layer(i), kv_cache_mode="extract",
                                    cache_write_slice=slice(0, length), segments=segments, key_valid=key_valid)
    finally:
        layout.prefilling = False
    return _NegativePrefix(source=layout.source, cache=cache,
                           key_mask=None if key_valid is None else key_valid[:, None, None, :],
                           rotary=rotary[length:], length=length)


def _block_forward(block: QwenImage21TransformerBlock, state: NAGState, original: Any, *args: Any,
                   **kwargs: Any) -> torch.Tensor:
    """A block on a guided call: at the first one, the negative prefix pass (unless stored); then the block's own
    forward (its attention through the NAG processor)."""
    layout = state.extras.get(_KEY)
    if layout is not None and layout.negative is None and not layout.prefilling:
        modulation = kwargs["modulation"] if "modulation" in kwargs else args[1]
        layout.negative = negative_prefix(layout, modulation)
        if layout.kv_cache is not None:
            _NEGATIVE_CACHES[layout.kv_cache] = (state, layout.negative)
    return original(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ nagkit bench
def qwen21_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Inputs of one Qwen-Image 2.1 call (text-to-image, no padding): latents ``(B, T, C)``, the text, ``img_shapes``
    and ``img_mask`` (text slots, then the target's ``T/4`` slots). The model reads values (``pos_embed``, the
    block metadata), so the masks are real tensors; the negative carries its own ``img_mask``."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    target = h * w
    slots = torch.zeros(batch, g.text_tokens + target // _SLOT, dtype=torch.bool)
    slots[:, g.text_tokens:] = True
    kwargs: dict[str, Any] = {"hidden_states": c.meta(batch, target, g.latent_channels), "timestep": c.timestep,
                              "encoder_hidden_states": c.text, "img_shapes": [[(1, h, w)]] * batch,
                              "img_mask": slots, "return_dict": False}
    negative = dict(c.negative)
    negative["img_mask"] = torch.zeros(g.batch, g.negative_length, dtype=torch.bool)
    return Inputs(kwargs=kwargs, negative=negative, real=("img_mask",))


def qwen21_text_flops(model: torch.nn.Module, spec: FamilySpec) -> int:
    """Correction of the generic joint-attention minimum for a block-causal model: the negative's prefix queries never
    attend to the image (the generic formula counts ``4·C·Ln·Li`` per layer for them), so
    ``−4·C·Ln·Li`` per block. What remains per block: the negative's own per-token linears, its attention over its own
    tokens (``4·C·Ln²``, as counted for a dense SDPA call) and the target's queries over its keys (``4·C·Li·Ln``)."""
    g = spec.geometry
    return -sum(g.batch * 4 * block.attn.inner_dim * g.negative_length * g.image_query_tokens
                for block in model.transformer_blocks)


def qwen21_bench_model(model: torch.nn.Module) -> torch.nn.Module:
    """The meta model of ``nagkit bench``, countable: the model builds its token layout from ``img_mask`` on that
    mask's device (host values: ``tolist``, ``nonzero``), and then selects modulation rows with a CPU token mask
    against meta parameters; on this instance only, the blocks' ``_modulate`` and ``norm_out`` move that mask to the
    parameters' device first (an elementwise selection: no FLOPs change)."""

    def on_device(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        return None if mask is None else mask.to(like.device)

    for block in model.transformer_blocks:
        def modulate(hidden_states: torch.Tensor, mod_params: torch.Tensor, target_token_mask: torch.Tensor | None,
                     block: torch.nn.Module = block) -> tuple[torch.Tensor, torch.Tensor]:
            return type(block)._modulate(block, hidden_states, mod_params, on_device(target_token_mask, mod_params))

        block._modulate = modulate
    norm = model.norm_out

    def norm_forward(hidden_states: torch.Tensor, conditioning_embedding: torch.Tensor,
                     target_token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return type(norm).forward(norm, hidden_states, conditioning_embedding,
                                  on_device(target_token_mask, hidden_states))

    norm.forward = norm_forward
    return model


# ------------------------------------------------------------------------------------------------ tiny pipelines
_TEXT_DIM = 16
# A chat template that renders string and list-of-parts contents (what the pipeline's processor call needs to count
# the system prompt's tokens).
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_PROCESSOR_CLASS: list[type] = []


def tiny_qwen3vl_processor(tokenizer: Any) -> Any:
    """A ``Qwen3VLProcessor`` over ``tokenizer`` and a PIL image processor (patch 16, 2x2 merge, at most 64x64
    pixels: 4 image slots), without a video processor (transformers checks that one against a class that needs
    torchvision; the subclass skips that check when there is none)."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    if not _PROCESSOR_CLASS:
        class TinyQwen3VLProcessor(Qwen3VLProcessor):
            def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
                if argument_name == "video_processor" and argument is None:
                    return None
                return super().check_argument_for_proper_class(argument_name, argument)

        _PROCESSOR_CLASS.append(TinyQwen3VLProcessor)
    images = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=16, merge_size=2)
    return _PROCESSOR_CLASS[0](image_processor=images, tokenizer=tokenizer, chat_template=_CHAT_TEMPLATE)


def _tiny_qwen3vl(seed: int, tokenizer: Any) -> Any:
    """Qwen3-VL with 1 text layer (hidden 16, 2 heads x 8, interleaved M-RoPE sections 1+1+2) and a 1-block vision
    tower (patch 16, 2x2 merge, output width 16, no deepstack)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in
           ("<|endoftext|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    config = Qwen3VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": _TEXT_DIM, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                     "max_position_embeddings": 4096, "pad_token_id": ids["<|endoftext|>"],
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2],
                                         "mrope_interleaved": True}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": _TEXT_DIM, "patch_size": 16, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "num_position_embeddings": 16, "deepstack_visual_indexes": []},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config).eval()


def tiny_qwen21_transformer(seed: int = 0, causal_condition: bool = True) -> QwenImage21Transformer2DModel:
    """2 blocks, 2 heads x 8 (RoPE axes 2 + 2 + 4), 4 latent channels, text width 16; the zero-initialised norm
    weights get random values (the released ones are learned)."""
    torch.manual_seed(seed)
    model = QwenImage21Transformer2DModel(in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                                          num_attention_heads=2, context_in_dim=_TEXT_DIM, axes_dims_rope=(2, 2, 4),
                                          causal_condition=causal_condition).eval()
    with torch.no_grad():
        model.txt_in.text_norm.weight.normal_(std=0.2)
    return model


def tiny_qwen_image21_pipeline(seed: int = 0) -> QwenImage21Pipeline:
    """Build a tiny random Qwen-Image 2.1 pipeline (text-to-image and image-conditioned).

    Transformer: :func:`tiny_qwen21_transformer`. Text: Qwen3-VL (1 text layer, hidden 16; a 1-block vision tower)
    with the tiny Qwen tokenizer (:func:`nagkit.adapters.qwenimage.tiny_qwen_tokenizer`) and
    :func:`tiny_qwen3vl_processor`. VAE: ``AutoencoderKLQwenImage21`` (base width 4, 4 latent channels, spatial factor
    16: height/width multiples of 32). Scheduler: flow-match Euler with dynamic shift. True CFG runs with
    ``true_cfg_scale > 1`` and a ``negative_prompt``; pass ``image=`` (and ``output_resolution=64``) for a condition
    image.

    Args:
        seed: seed of every random weight.

    Returns:
        The pipeline on CPU in float32.
    """
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    from ..tiny.pipelines import _finish
    from .qwenimage import tiny_qwen_tokenizer

    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage21(base_dim=4, decoder_base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1, 1],
                                   num_res_blocks=1, temperal_downsample=[False, True, True, True],
                                   latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192)
    return _finish(QwenImage21Pipeline(scheduler=scheduler, vae=vae, text_encoder=_tiny_qwen3vl(seed, tokenizer),
                                       processor=tiny_qwen3vl_processor(tokenizer),
                                       transformer=tiny_qwen21_transformer(seed)))


# ------------------------------------------------------------------------------------------------ registration
# encode_prompt returns (prompt_embeds, prompt_embeds_mask, image_pad_mask); the mask is None when every token is
# valid; the negative keeps its own image_pad_mask (where the condition images sit in its encoding). The call's
# condition `image` is kept for the negative (the pipeline encodes its CFG negative with it).
_PIPELINE = PipelineSpec(denoisers=("transformer",), mask_index=1, extras={"img_mask": 2}, preset="qwen-image-2.1",
                         size_multiple=2, overrides={"prompt_embeds_mask": None, "image_pad_mask": None},
                         encoders=("text_encoder", "processor"),
                         embeds_args={"embeds": "negative_prompt_embeds", "mask": "negative_prompt_embeds_mask"})

QWEN_IMAGE_21 = register_adapter(Adapter(
    family="qwen-image-2.1",
    model_class=QwenImage21Transformer2DModel,
    processors={QwenImage21AttnProcessor: NAGQwenImage21AttnProcessor,
                QwenImage21FlexAttnProcessor: NAGQwenImage21AttnProcessor},
    select=_block_attention,
    mask_arg="encoder_hidden_states_mask",
    negative_keys=("img_mask",),
    timestep_max=1.0,  # the pipeline passes t / 1000
    official=False,  # no official NAG implementation for Qwen-Image 2.1
    preset="qwen-image-2.1",
    notes="Qwen-Image 2.1: NAG on the target image's tokens of every block; the negative's prefix (text and "
          "condition images) runs once as a side-car with its own positions and KV cache, target queries rotated "
          "at the negative's frame",
    plan=_plan,
    block_forwards={QwenImage21TransformerBlock: _block_forward},
    pipelines={"QwenImage21Pipeline": _PIPELINE},
    presets={
        # No published NAG values for Qwen-Image 2.1: those of Qwen-Image (diffusers PR #13089,
        # NormalizedAttentionCFGGuidance defaults nag_scale 5.0, nag_tau 2.5, nag_alpha 0.25), which equal the FLUX
        # values.
        "qwen-image-2.1": NAGConfig(scale=5.0, tau=2.5, alpha=0.25),
    },
    tiny={"tiny-qwen-image-2.1": TinyModel(tiny_qwen_image21_pipeline, {"height": 64, "width": 64})},
    bench_inputs=qwen21_bench_inputs,
    bench_text_flops=qwen21_text_flops,  # negative: the generic joint minimum lets text attend to the image
    bench_model=qwen21_bench_model,  # the token layout is host code on img_mask's device (CPU), the model on meta
    separate_cfg=True,  # true CFG: conditional and unconditional calls in turn (cache_context "cond"/"uncond")
))

__all__ = ["NAGQwenImage21AttnProcessor", "QWEN_IMAGE_21", "nag_target_attention", "negative_prefix",
           "prefix_attention", "tiny_qwen21_transformer", "tiny_qwen_image21_pipeline", "tiny_qwen3vl_processor"]
