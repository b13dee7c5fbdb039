"""HunyuanVideo 1.5 ``HunyuanVideo15Transformer3DModel``: joint attention ``[video | context]`` in the 54 dual-stream
blocks ``transformer_blocks.*.attn``, NAG on the video tokens, the negative context carried as a side-car stream.

Why not packing. Before the blocks the model assembles its context from three sources: the Qwen2.5-VL text through
``context_embedder`` (a token refiner: mask-weighted mean pooling into its ``temb`` and 2 self-attention blocks over the
text tokens — they mix), the ByT5 glyph text through ``context_embedder_2`` (per token), the SigLIP image tokens through
``image_embedder`` (zeroed and masked out in text-to-video), each plus ``cond_type_embed``; then it compacts every row
as ``[valid image, valid ByT5, valid text, invalid…]`` by the masks. A negative packed after the prompt would be
refined together with it and compacted into it.

Side-car stream (``plan`` + block hooks). On a guided call the prompt's path is the model's own forward, untouched.
``plan`` builds the negative's block-entry context with the model's own submodules, exactly as a forward on the
negative alone: the refiner with the negative's mask and the call's timestep, the ByT5 projection of the negative's
glyph text (``encoder_hidden_states_2``, its own mask), the call's image tokens (the same conditioning image: it is
never negated; masked out in text-to-video as the model does), the type embeddings, and the valid-first compaction —
keeping the valid tokens only (exact: invalid context tokens are masked as keys and as queries). A block hook on each
dual block appends the negative context (and its mask) to the block's context, runs the block's *original* forward
(per-token layers run once per token; modulation is time-only, so the negative shares the prompt's ``temb``), splits
the output: the prompt part goes on, the negative part is the stream for the next block.

Attention (:class:`NAGHunyuanVideo15AttnProcessor2_0`, the model's processor with its attention call replaced).
Prompt context queries attend ``[video, prompt context]`` with the model's query×key mask (as in the plain model);
negative context queries attend ``[video, negative context]`` (as in a negative-alone run); video queries get
``NAG(Z+, Z-)`` with ``Z+`` over ``[video, valid prompt context]`` and ``Z-`` over ``[video, valid negative
context]``; the video→video attention is computed once and merged with the two video→context parts by log-sum-exp
(fully masked rows get weight 0).

Pipelines: ``HunyuanVideo15Pipeline`` and ``HunyuanVideo15ImageToVideoPipeline``. CFG runs through the pipeline's
guider, one call per condition in ``cache_context("pred_cond")`` / ``("pred_uncond")``: only the conditional call is
guided. The NAG negative is encoded by ``encode_prompt`` (Qwen2.5-VL + ByT5, four tensors) with the prompt-only
arguments ``prompt_embeds_2``, ``prompt_embeds_mask``, ``prompt_embeds_mask_2`` reset. No official NAG code exists for
HunyuanVideo 1.5 (``official=False``).

``nagkit bench`` counts the full model on the meta device: :func:`bench_model` answers the forward's data-dependent
steps (``torch.all(image_embeds == 0)``, boolean-mask compaction) from masks marked with their valid prefix.

Tiny pipelines: ``tiny-hunyuanvideo15`` (text-to-video) and ``tiny-hunyuanvideo15-i2v`` (image-to-video, call it with
``image=``). The pipelines' ``__call__`` takes no CFG scale: CFG is the setting of their ``guider``. The command line
maps ``--cfg-scale`` to it through ``PipelineSpec.cfg_setter`` (:class:`GuiderCFG`: a copy of the guider with that
scale for the call, the pipeline's own guider put back after).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video15 import (
    HunyuanVideo15AttnProcessor2_0,
    HunyuanVideo15TransformerBlock,
)

from ..core.config import NAGConfig
from ..core.operator import nag_combine
from ..core.state import Packing
from ..kernels import joint as _joint
from ..kernels.lse import attend, attention_with_lse_backend, merge_attention
from .base import Adapter, NAGProcessor, PipelineSpec, TinyModel, register_adapter

if TYPE_CHECKING:
    from ..bench.families import FamilySpec, Inputs

#: ``state.extras`` key of the side-car stream of the guided call in flight.
SIDE_CAR = "hunyuanvideo15"
#: The negative's fields besides the Qwen text and its mask (the ByT5 glyph text and its mask).
TEXT_2, MASK_2 = "encoder_hidden_states_2", "encoder_attention_mask_2"


# ------------------------------------------------------------------------------------------------ side-car
@dataclass
class SideCar:
    """The negative context stream of one guided call.

    Attributes:
        blocks: ids of the model's dual-stream blocks.
        rows: the guided rows of ``batch``.
        stream: ``(batch, ln, C)`` the negative context entering the next block (zeros on unguided rows).
        mask: ``(batch, ln)`` bool, its valid tokens (all False on unguided rows).
        lp: the prompt context length of the block in flight (set by the block hook).
    """

    blocks: frozenset[int]
    rows: slice
    batch: int
    stream: torch.Tensor
    mask: torch.Tensor
    lp: int = 0

    @property
    def all_rows(self) -> bool:
        return self.rows.start == 0 and self.rows.stop == self.batch

    @property
    def ln(self) -> int:
        return self.stream.shape[1]


#: Attribute of a meta mask (``nagkit bench``) that says which of its tokens are valid: ``(n, inverted)``, the first
#: ``n`` tokens of every row (``inverted``: the others). Meta tensors have no values; see :func:`bench_model`.
PREFIX = "_nagkit_valid_prefix"


def _valid(mask: torch.Tensor) -> torch.Tensor:
    """A mask as the model reads it, as a CPU bool tensor; a meta mask (FLOP counting) by its :data:`PREFIX` mark
    (unmarked: every token valid)."""
    if mask.device.type == "meta":
        n, inverted = getattr(mask, PREFIX, (mask.shape[-1], False))
        valid = torch.arange(mask.shape[-1]).expand(mask.shape) < n
        return ~valid if inverted else valid
    return mask.bool().cpu()


def _is_t2v(image_embeds: torch.Tensor) -> bool:
    """The model's text-to-video test (``torch.all(image_embeds == 0)``); meta inputs: text-to-video."""
    if image_embeds.device.type == "meta":
        return True
    return bool(torch.all(image_embeds == 0))


def _used(valid: torch.Tensor) -> int:
    """Columns up to the last one any row uses (trailing columns no row uses can be dropped: masked everywhere)."""
    cols = valid.any(dim=0).nonzero()
    return int(cols.max()) + 1 if cols.numel() else 0


def negative_context(model: HunyuanVideo15Transformer3DModel, text: torch.Tensor, mask: torch.Tensor,
                     valid: torch.Tensor, text_2: torch.Tensor, valid_2: torch.Tensor, image_embeds: torch.Tensor,
                     timestep: torch.Tensor, t2v: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The block-entry context of rows run on the negative alone, compacted to the valid tokens.

    The model's own submodules in the order of its forward (``context_embedder`` with ``mask`` and ``timestep``,
    ``context_embedder_2``, ``image_embedder``, ``cond_type_embed``), then the valid-first compaction
    ``[valid image, valid ByT5, valid text]``, padded to the longest row. Exact shortcuts: trailing columns that no row
    uses are not computed (the refiner masks them as keys and queries, the compaction drops them), nor are the image
    tokens in text-to-video (masked out).

    Args:
        text, mask, valid: the negative's Qwen text ``(R, L, C)``, its mask and valid tokens (CPU bool).
        text_2, valid_2: its ByT5 text ``(R, L2, C2)`` and valid tokens (CPU bool).
        image_embeds: the call's image tokens of these rows; ``timestep``: ``(R,)``.
        t2v: the model's text-to-video test on the call.

    Returns:
        ``(context (R, W, C), valid (R, W) bool)``, ``W >= 1``.
    """
    width = max(1, _used(valid))
    text, mask, valid = text[:, :width], mask[:, :width], valid[:, :width]
    ctx = model.context_embedder(text, timestep, mask)
    ctx = ctx + model.cond_type_embed(torch.zeros_like(ctx[:, :, 0], dtype=torch.long))
    width_2 = _used(valid_2)
    text_2, valid_2 = text_2[:, :width_2], valid_2[:, :width_2]
    parts, valids = [], []
    if not t2v:
        ctx_3 = model.image_embedder(image_embeds)
        ctx_3 = ctx_3 + model.cond_type_embed(2 * torch.ones_like(ctx_3[:, :, 0], dtype=torch.long))
        parts.append(ctx_3)
        valids.append(torch.ones(ctx_3.shape[:2], dtype=torch.bool))
    if width_2:
        ctx_2 = model.context_embedder_2(text_2)
        ctx_2 = ctx_2 + model.cond_type_embed(torch.ones_like(ctx_2[:, :, 0], dtype=torch.long))
        parts.append(ctx_2)
        valids.append(valid_2)
    joined = torch.cat([*parts, ctx], dim=1)
    valid = torch.cat([*valids, valid], dim=1)
    rows = joined.shape[0]
    counts = valid.sum(dim=1).tolist()
    width = max(1, max(counts))
    index = torch.zeros(rows, width, dtype=torch.long)
    for r in range(rows):
        found = valid[r].nonzero().squeeze(1)
        index[r, : len(found)] = found
    keep = torch.arange(width)[None] < torch.tensor(counts)[:, None]
    device = joined.device
    out = joined.gather(1, index.to(device)[..., None].expand(-1, -1, joined.shape[-1]))
    keep = keep.to(device)
    out = torch.where(keep[..., None], out, torch.zeros((), dtype=out.dtype, device=device))
    return out, keep


def _plan(module: torch.nn.Module, access: Any, args: tuple, kwargs: dict, negative: Any, state: Any,
          pipeline: str | None, named: bool) -> tuple[tuple, dict, Packing] | None:
    """Guided-call layout: the negative's side-car context (``state.extras[SIDE_CAR]``); the call's own arguments are
    not changed."""
    from ..integration.hook import guided_rows

    text = access.get("encoder_hidden_states", args, kwargs)
    mask = access.get("encoder_attention_mask", args, kwargs)
    image_embeds = access.get("image_embeds", args, kwargs)
    timestep = access.get("timestep", args, kwargs)
    if not isinstance(text, torch.Tensor) or mask is None or image_embeds is None:
        return None
    if negative.embeds.shape[-1] != text.shape[-1]:
        raise ValueError(f"negative embeddings have {negative.embeds.shape[-1]} channels, the prompt's have "
                         f"{text.shape[-1]}")
    batch = text.shape[0]
    found = guided_rows(batch, negative, text, pipeline, named)
    if found is None:
        return None
    rows, expand = found
    count = rows.stop - rows.start
    device, dtype = text.device, text.dtype

    def take(x: torch.Tensor) -> torch.Tensor:
        return x.expand(count, *x.shape[1:]) if expand else x

    n_text = take(negative.embeds).to(device=device, dtype=dtype)
    n_mask = negative.mask
    if n_mask is None:
        n_mask = torch.ones(negative.embeds.shape[:2], dtype=torch.long)
    valid = take(_valid(n_mask))
    n_mask = take(n_mask).to(device)
    text_2 = negative.extras.get(TEXT_2)
    mask_2 = negative.extras.get(MASK_2)
    if text_2 is None:  # no glyph text: what the pipeline encodes for a prompt without quoted text (all masked)
        width_2 = module.context_embedder_2.norm.normalized_shape[0]
        text_2 = torch.zeros(negative.embeds.shape[0], 1, width_2)
        mask_2 = torch.zeros(negative.embeds.shape[0], 1, dtype=torch.long)
    elif mask_2 is None:
        mask_2 = torch.ones(text_2.shape[:2], dtype=torch.long)
    valid_2 = take(_valid(mask_2))
    text_2 = take(text_2).to(device=device, dtype=dtype)
    t = timestep.expand(batch) if timestep.ndim == 0 else timestep
    ctx, keep = negative_context(module, n_text, n_mask, valid, text_2, valid_2, image_embeds[rows], t[rows],
                                 _is_t2v(image_embeds))
    if count != batch:
        full = ctx.new_zeros(batch, *ctx.shape[1:])
        full[rows] = ctx
        full_keep = keep.new_zeros(batch, keep.shape[1])
        full_keep[rows] = keep
        ctx, keep = full, full_keep
    state.extras[SIDE_CAR] = SideCar(blocks=frozenset(id(b) for b in module.transformer_blocks), rows=rows,
                                     batch=batch, stream=ctx, mask=keep)
    return args, kwargs, Packing(lp=text.shape[1], ln=ctx.shape[1], rows=rows, batch=batch)


def _block(block: HunyuanVideo15TransformerBlock, state: Any, original: Any, hidden_states: torch.Tensor,
           encoder_hidden_states: torch.Tensor, temb: torch.Tensor, attention_mask: torch.Tensor | None = None,
           freqs_cis: Any = None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A dual block on ``[video | prompt context | negative context]`` (the block's own forward; its attention is the
    NAG processor); the negative part of its context output is the stream for the next block."""
    side: SideCar | None = state.extras.get(SIDE_CAR)
    if side is None or id(block) not in side.blocks:
        return original(hidden_states, encoder_hidden_states, temb, attention_mask, freqs_cis, *args, **kwargs)
    lp = encoder_hidden_states.shape[1]
    if attention_mask is None:
        attention_mask = torch.ones(hidden_states.shape[0], lp, dtype=torch.bool, device=hidden_states.device)
    side.lp = lp
    context = torch.cat([encoder_hidden_states, side.stream.to(encoder_hidden_states.dtype)], dim=1)
    mask = torch.cat([attention_mask.bool(), side.mask.to(attention_mask.device)], dim=1)
    hidden_states, context = original(hidden_states, context, temb, mask, freqs_cis, *args, **kwargs)
    side.stream = context[:, lp:]
    return hidden_states, context[:, :lp]


# ------------------------------------------------------------------------------------------------ attention
def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2, 3)


def _joint_mask(queries: torch.Tensor, keys: torch.Tensor, video: int) -> torch.Tensor:
    """The model's boolean query×key mask over ``[video, context]`` keys for context queries ``(B, 1, Lq, I + Lk)``."""
    keys = torch.cat([keys.new_ones(keys.shape[0], video), keys], dim=1)
    return queries[:, None, :, None] & keys[:, None, None, :]


def _nag_attention(q_i: torch.Tensor, k_i: torch.Tensor, v_i: torch.Tensor, q_c: torch.Tensor, k_c: torch.Tensor,
                   v_c: torch.Tensor, mask: torch.Tensor, side: SideCar, cfg: NAGConfig, backend: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads-first ``(B, H, L, D)`` video and context projections; ``mask`` ``(B, Lp + Ln)`` bool.

    Returns:
        ``(video (B, I, H·D), context (B, Lp + Ln, H·D))``: context queries as their own joint attention, video
        queries ``NAG(Z+, Z-)`` on the guided rows and ``Z+`` elsewhere.
    """
    lp, video = side.lp, q_i.shape[2]
    sp, sn = slice(0, lp), slice(lp, None)
    m_p, m_n = mask[:, sp], mask[:, sn]
    k_p, k_n, v_p, v_n = k_c[:, :, sp], k_c[:, :, sn], v_c[:, :, sp], v_c[:, :, sn]
    kv_p = torch.cat([k_i, k_p], dim=2), torch.cat([v_i, v_p], dim=2)
    kv_n = torch.cat([k_i, k_n], dim=2), torch.cat([v_i, v_n], dim=2)
    out_p = attend(q_c[:, :, sp], *kv_p, _joint_mask(m_p, m_p, video), backend)
    out_n = attend(q_c[:, :, sn], *kv_n, _joint_mask(m_n, m_n, video), backend)
    rows, all_rows = side.rows, side.all_rows

    def guided(x: torch.Tensor) -> torch.Tensor:
        return x if all_rows else x[rows]

    keys_p, keys_n = m_p[:, None, None], m_n[:, None, None]
    negative = None
    if _joint.lse_available(q_i.device) and not _joint._TWO_ATTENTIONS:
        image = attention_with_lse_backend(q_i, k_i, v_i, None, backend, dead=None)
        positive = image and attention_with_lse_backend(q_i, k_p, v_p, keys_p, backend)
        negative = positive and attention_with_lse_backend(guided(q_i), guided(k_n), guided(v_n), guided(keys_n),
                                                           backend)
    if negative is not None:
        z_pos = merge_attention([image, positive], heads_last=True)
        if not all_rows:
            image = (image[0][rows], image[1][rows])
        z_neg = merge_attention([image, negative], heads_last=True)
    else:  # two full attentions: the official-style way (force_two_attentions), or no LSE kernel
        ones = m_p.new_ones(m_p.shape[0], 1, 1, video)
        z_pos = attend(q_i, *kv_p, torch.cat([ones, keys_p], dim=-1), backend)
        z_neg = attend(guided(q_i), guided(kv_n[0]), guided(kv_n[1]), guided(torch.cat([ones, keys_n], dim=-1)),
                       backend)
    z_pos, z_neg = _merge_heads(z_pos), _merge_heads(z_neg)
    out = nag_combine(z_pos if all_rows else z_pos[rows], z_neg, cfg.scale, cfg.tau, cfg.alpha, cfg.norm)
    if not all_rows:
        out = torch.cat([z_pos[: rows.start], out.to(z_pos.dtype), z_pos[rows.stop:]], dim=0)
    return out, torch.cat([_merge_heads(out_p), _merge_heads(out_n)], dim=1)


class NAGHunyuanVideo15AttnProcessor2_0(NAGProcessor):
    """``HunyuanVideo15AttnProcessor2_0`` with NAG on the video queries of a dual block's ``[video | prompt context |
    negative context]`` sequence; the segment bounds and the negative's mask come from the call's :class:`SideCar`."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.packing is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        side: SideCar | None = self.state.extras.get(SIDE_CAR)
        if (side is None or encoder_hidden_states is None or attention_mask is None
                or encoder_hidden_states.shape[1] != side.lp + side.ln):
            raise RuntimeError("NAG's HunyuanVideo 1.5 attention was called outside a dual block's side-car hook (or "
                               "with another layout): nagkit cannot tell the prompt, the negative and the video apart")
        if self._parallel_config is not None:
            raise NotImplementedError("NAG on HunyuanVideo 1.5 does not support context parallelism "
                                      "(enable_parallelism): the sequence split would cut the negative stream")
        from diffusers.models.embeddings import apply_rotary_emb

        query = attn.norm_q(attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(2, (attn.heads, -1)))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        c_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        c_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        c_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_added_q is not None:
            c_query = attn.norm_added_q(c_query)
        if attn.norm_added_k is not None:
            c_key = attn.norm_added_k(c_key)

        def heads_first(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2)

        video, context = _nag_attention(*map(heads_first, (query, key, value, c_query, c_key, c_value)),
                                        attention_mask.bool(), side, self.state.config, self._attention_backend)
        video, context = video.to(query.dtype), context.to(query.dtype)
        video = attn.to_out[1](attn.to_out[0](video))
        context = attn.to_add_out(context)
        return video, context


def _dual_attention(name: str, module: torch.nn.Module) -> bool:
    """The dual blocks' joint attention (the refiner's self-attention sees text only and is not guided)."""
    return name.startswith("transformer_blocks.") and name.endswith(".attn")


# ------------------------------------------------------------------------------------------------ nagkit bench
def _mark(mask: torch.Tensor, n: int, inverted: bool = False) -> torch.Tensor:
    setattr(mask, PREFIX, (n, inverted))
    return mask


class _MetaMasks(torch.overrides.TorchFunctionMode):
    """Answers the forward's data-dependent steps on meta tensors (FLOP counting only).

    ``HunyuanVideo15Transformer3DModel.forward`` tests ``torch.all(image_embeds == 0)`` (text-to-video: True here)
    and compacts the context with boolean indexing. Masks marked with :data:`PREFIX` (the bench's inputs: the first
    ``n`` tokens valid) keep their mark through ``bool``/``to``/``~``/row iteration, the forward's own all-zero and
    all-one masks get one, and ``x[mask]`` returns the marked prefix (or the rest) — the shapes a real run with such
    masks has, so the FLOP count is exact.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is torch.all and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return True
        if (func is torch.Tensor.__getitem__ and isinstance(args[1], torch.Tensor) and args[1].is_meta
                and args[1].dtype == torch.bool):
            n, inverted = getattr(args[1], PREFIX, (args[1].shape[-1], False))
            return args[0][n:] if inverted else args[0][:n]
        out = func(*args, **kwargs)
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        mark = getattr(source, PREFIX, None)
        if func in (torch.zeros, torch.ones) and isinstance(out, torch.Tensor) and out.is_meta:
            _mark(out, 0 if func is torch.zeros else out.shape[-1])
        elif mark is not None and func in (torch.Tensor.bool, torch.Tensor.to) and isinstance(out, torch.Tensor):
            _mark(out, *mark)
        elif mark is not None and func is torch.Tensor.__invert__:
            _mark(out, mark[0], not mark[1])
        elif mark is not None and func is torch.Tensor.unbind:
            out = tuple(_mark(row, *mark) for row in out)
        elif mark is not None and func is torch.Tensor.__iter__:
            out = iter([_mark(row, *mark) for row in out])
        return out


def bench_model(model: torch.nn.Module) -> torch.nn.Module:
    """Make a meta-device HunyuanVideo 1.5 countable: every forward of *this* model instance runs under
    :class:`_MetaMasks` when its latents are on the meta device (other devices and models are untouched)."""
    if not isinstance(model, HunyuanVideo15Transformer3DModel):
        return model
    modes: list[_MetaMasks] = []

    def enter(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        mode = _MetaMasks() if isinstance(hidden, torch.Tensor) and hidden.is_meta else None
        if mode is not None:
            mode.__enter__()
        modes.append(mode)

    def leave(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        mode = modes.pop()
        if mode is not None:
            mode.__exit__(None, None, None)

    model.register_forward_pre_hook(enter, with_kwargs=True)
    model.register_forward_hook(leave, with_kwargs=True, always_call=True)
    return model


#: Valid Qwen tokens of the bench's prompt and negative (the pipeline pads the prompt to 1000).
BENCH_VALID_TOKENS = 256


def hunyuanvideo15_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one text-to-video call as the pipeline makes it: latents ``(B, 2·C + 1, F, H, W)`` (noise,
    zero condition latents, mask), the Qwen2.5-VL text padded to ``text_tokens`` with its first
    :data:`BENCH_VALID_TOKENS` valid, ByT5 glyph text of 256 tokens none valid (a prompt without quoted text), zero
    SigLIP tokens (729, masked out); the negative: ``negative_tokens`` valid Qwen tokens and no glyph text. Masks are
    marked for :class:`_MetaMasks` (see :func:`bench_model`)."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    valid = min(BENCH_VALID_TOKENS, g.text_tokens)
    byt5, image, byt5_dim = 256, 729, spec.config.get("text_embed_2_dim", 1472)
    kwargs: dict[str, Any] = {
        "hidden_states": c.meta(batch, g.latent_channels, g.latent_frames, h, w),
        "timestep": c.meta(batch), "encoder_hidden_states": c.text,  # the pipeline's timestep: the latents' dtype
        "encoder_attention_mask": _mark(c.meta(batch, g.text_tokens, dtype=torch.long), valid),
        "encoder_hidden_states_2": c.meta(batch, byt5, byt5_dim),
        "encoder_attention_mask_2": _mark(c.meta(batch, byt5, dtype=torch.long), 0),
        "image_embeds": c.meta(batch, image, g.image_dim or 1152),
    }
    negative = c.negative
    negative["encoder_attention_mask"] = _mark(c.meta(g.batch, g.negative_length, dtype=torch.long),
                                               g.negative_length)
    negative[TEXT_2] = c.meta(g.batch, byt5, byt5_dim)
    negative[MASK_2] = _mark(c.meta(g.batch, byt5, dtype=torch.long), 0)
    return Inputs(kwargs=kwargs, mask_arg="encoder_attention_mask", negative=negative)


def hunyuanvideo15_bench_text_flops(model: torch.nn.Module, spec: FamilySpec) -> int:
    """The negative text's own attention in the token refiner's blocks, ``4·C·Ln²`` per block and row: work of the
    analytic minimum that the per-token ``text_linears`` patterns cannot describe."""
    g = spec.geometry
    blocks = model.context_embedder.token_refiner.refiner_blocks
    return sum(g.batch * 4 * block.attn.to_q.out_features * g.negative_length ** 2 for block in blocks)


# ------------------------------------------------------------------------------------------------ tiny model
def tiny_hunyuanvideo15_transformer(seed: int = 0) -> HunyuanVideo15Transformer3DModel:
    """2 dual blocks + 1 refiner block, 2 heads x 8 (RoPE axes 2 + 2 + 4), patch 1, 4 latent channels in and out,
    Qwen text width 16, ByT5 width 8, image-embed width 8 (the ByT5 projection's hidden width is fixed at 2048 by the
    class)."""
    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=8, rope_axes_dim=(2, 2, 4),
    ).eval()


def tiny_hunyuanvideo15_pipeline(seed: int = 0) -> Any:
    """A tiny random ``HunyuanVideo15Pipeline`` (text-to-video), nothing downloaded.

    Qwen2.5-VL text model (3 layers, hidden 16; the pipeline takes the third-to-last hidden states) with the tiny Qwen
    tokenizer and a minimal chat template; ByT5 encoder (1 layer, width 8) with the byte tokenizer; VAE
    ``AutoencoderKLHunyuanVideo15`` (factor 16 spatial, 4 temporal, 4 latent channels); transformer as
    :func:`tiny_hunyuanvideo15_transformer` with ``2·4 + 1`` input channels; CFG through a ``ClassifierFreeGuidance``
    guider (scale 4). The pipeline's instance settings are shrunk: a short system message, Qwen text padded to 24
    tokens after its template, ByT5 to 16, 4 SigLIP tokens. Registered as ``tiny-hunyuanvideo15``.
    """
    from diffusers import HunyuanVideo15Pipeline

    from ..tiny.pipelines import _finish

    parts = _tiny_parts(seed, task_type="t2v", target_size=64)
    pipe = HunyuanVideo15Pipeline(**parts)
    return _finish(_shrink(pipe))


def tiny_hunyuanvideo15_i2v_pipeline(seed: int = 0) -> Any:
    """A tiny random ``HunyuanVideo15ImageToVideoPipeline``, nothing downloaded.

    As :func:`tiny_hunyuanvideo15_pipeline` (transformer ``task_type="i2v"``, ``target_size=32``: a square
    condition image gives 32x32 videos) plus a SigLIP vision encoder (1 layer, width 8 = the transformer's
    ``image_embed_dim``, 32x32 input, patch 16: 4 image tokens) and its image processor. Registered as
    ``tiny-hunyuanvideo15-i2v``; call it with ``image=`` (e.g. ``nagkit.tiny.pipelines.tiny_condition_image()``).
    """
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from ..tiny.pipelines import _finish

    parts = _tiny_parts(seed, task_type="i2v", target_size=32)
    torch.manual_seed(seed)
    image_encoder = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=16)).eval()
    feature_extractor = SiglipImageProcessor(size={"height": 32, "width": 32})
    pipe = HunyuanVideo15ImageToVideoPipeline(**parts, image_encoder=image_encoder,
                                              feature_extractor=feature_extractor)
    return _finish(_shrink(pipe))


def _tiny_parts(seed: int, task_type: str, target_size: int) -> dict[str, Any]:
    """Text encoders, tokenizers, VAE, transformer, scheduler and guider of the tiny HunyuanVideo 1.5 pipelines."""
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    from .qwenimage import tiny_qwen_tokenizer

    tokenizer = tiny_qwen_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]})).eval()
    tokenizer_2 = ByT5Tokenizer()
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                             num_heads=2)).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1).eval()
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_refiner_layers=1,
        mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(2, 2, 4),
        target_size=target_size, task_type=task_type).eval()
    return {"text_encoder": text_encoder, "tokenizer": tokenizer, "transformer": transformer, "vae": vae,
            "scheduler": FlowMatchEulerDiscreteScheduler(), "text_encoder_2": text_encoder_2,
            "tokenizer_2": tokenizer_2, "guider": ClassifierFreeGuidance(guidance_scale=4.0)}


def _shrink(pipe: Any) -> Any:
    """The pipeline's instance settings shrunk for the tiny encoders: a short system message (its template part
    dropped from the embeddings), Qwen text padded to 24 tokens, ByT5 to 16, 4 SigLIP tokens in text-to-video."""
    pipe.system_message = "Describe the video."
    prefix = pipe.tokenizer.apply_chat_template([{"role": "system", "content": pipe.system_message},
                                                 {"role": "user", "content": ""}], tokenize=True, return_dict=True)
    pipe.prompt_template_encode_start_idx = len(prefix["input_ids"]) - 2  # drop the system part, keep the user's
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length, pipe.vision_num_semantic_tokens = 24, 16, 4
    return pipe


# ------------------------------------------------------------------------------------------------ CFG setting
@dataclass(frozen=True)
class GuiderCFG:
    """``PipelineSpec.cfg_setter`` of the HunyuanVideo 1.5 pipelines, whose CFG scale is their guider's setting.

    ``GuiderCFG()(pipe, scale)`` replaces ``pipe.guider`` by a copy with ``guidance_scale=scale`` (``guider.new``:
    a ``ClassifierFreeGuidance`` with the same settings otherwise) and returns ``(scale, restore)``; ``restore()``
    puts the pipeline's own guider back. With ``scale=None`` nothing changes and the guider's own scale is returned
    (None when the guider is disabled).
    """

    setting: str = "guider.guidance_scale"

    def __call__(self, pipe: Any, scale: float | None) -> tuple[float | None, Any]:
        guider = getattr(pipe, "guider", None)
        if guider is None or not hasattr(guider, "guidance_scale") or not hasattr(guider, "new"):
            raise TypeError(f"{type(pipe).__name__}.guider is {type(guider).__name__}: nagkit sets the CFG scale on "
                            "a diffusers guider with guidance_scale (ClassifierFreeGuidance)")
        if scale is None:
            return (float(guider.guidance_scale) if guider._enabled else None), (lambda: None)
        pipe.guider = guider.new(guidance_scale=float(scale))

        def restore() -> None:
            pipe.guider = guider

        return float(scale), restore


# ------------------------------------------------------------------------------------------------ registration
_EMBEDS_ARGS = {"embeds": "negative_prompt_embeds", "mask": "negative_prompt_embeds_mask",
                TEXT_2: "negative_prompt_embeds_2", MASK_2: "negative_prompt_embeds_mask_2"}
# encode_prompt returns (embeds, mask, ByT5 embeds, ByT5 mask); the prompt-only arguments below are reset for the
# negative (the others are reset by nagkit: prompt_embeds, negative_*)
_OVERRIDES = {"prompt_embeds_2": None, "prompt_embeds_mask": None, "prompt_embeds_mask_2": None}


def _spec() -> PipelineSpec:
    return PipelineSpec(denoisers=("transformer",), mask_index=1, extras={TEXT_2: 2, MASK_2: 3},
                        count_arg="num_videos_per_prompt", overrides=dict(_OVERRIDES), preset="hunyuanvideo15",
                        encoders=("text_encoder", "text_encoder_2"), embeds_args=dict(_EMBEDS_ARGS),
                        cfg_arg="", size_multiple=1,  # no CFG call argument: CFG is the pipeline's guider's setting
                        cfg_setter=GuiderCFG())  # the command line's --cfg-scale sets it for the call


HUNYUANVIDEO15 = register_adapter(Adapter(
    family="hunyuanvideo15",
    model_class=HunyuanVideo15Transformer3DModel,
    processors={HunyuanVideo15AttnProcessor2_0: NAGHunyuanVideo15AttnProcessor2_0},
    select=_dual_attention,
    mask_arg="encoder_attention_mask",
    negative_keys=(TEXT_2, MASK_2),
    official=False,
    preset="hunyuanvideo15",
    notes="HunyuanVideo 1.5: NAG on the video tokens of the 54 dual blocks; the negative context (refined, projected "
          "and compacted on its own) rides as a side-car stream through block hooks",
    plan=_plan,
    block_forwards={HunyuanVideo15TransformerBlock: _block},
    pipelines={
        "HunyuanVideo15Pipeline": _spec(),
        "HunyuanVideo15ImageToVideoPipeline": dataclasses.replace(_spec(), requires_image=True),
    },
    tiny={
        "tiny-hunyuanvideo15": TinyModel(tiny_hunyuanvideo15_pipeline, {"height": 32, "width": 32, "num_frames": 5}),
        # also needs ``image=`` (nagkit.tiny.pipelines.tiny_condition_image); the video size follows the image
        "tiny-hunyuanvideo15-i2v": TinyModel(tiny_hunyuanvideo15_i2v_pipeline, {"num_frames": 5}),
    },
    # No published NAG values for HunyuanVideo 1.5: the FLUX.1 values (official Flux pipeline alpha 0.25, README
    # nag_scale 5, tau 2.5), chosen by analogy with FLUX.1 (also a flow-matching joint-attention MM-DiT).
    presets={"hunyuanvideo15": NAGConfig(scale=5.0, tau=2.5, alpha=0.25)},
    bench_inputs=hunyuanvideo15_bench_inputs,
    bench_text_flops=hunyuanvideo15_bench_text_flops,
    bench_model=bench_model,
    separate_cfg=True,  # the guider's pred_cond / pred_uncond calls
))
