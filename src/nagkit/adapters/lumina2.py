"""Lumina 2 (Lumina-Image-2.0) ``Lumina2Transformer2DModel``: single-stream joint attention, NAG on the image tokens of
the 26 main layers ``layers.*.attn``, the negative text carried as a side-car stream.

Why not packing. Before the main layers the caption goes through ``caption_embedder`` and a ``context_refiner`` (2
self-attention blocks over the caption tokens with the text mask): a negative packed after the prompt would mix with
it. The model then keeps only the first ``mask.sum()`` caption tokens per row (compaction, right padding) and builds
each row as ``[valid caption, image, batch padding]`` with RoPE positions caption ``(j, 0, 0)`` and image
``(L_eff, row, col)``: the image's positions depend on the caption length, so a longer packed text would move the
image.

Side-car stream (``plan`` + block hooks). On a guided call the prompt's path is the model's own forward, untouched.
``plan`` builds the negative's block-entry stream with the model's own submodules: ``caption_embedder``, then the
``context_refiner`` layers with the negative's own mask and positions ``(j, 0, 0)`` (exactly a forward on the negative
alone), compacted to its valid tokens. In the main layers the negative caption tokens get axis-0 positions shifted by
``d = L_eff,p − L_eff,n`` per row (axes 1, 2 stay 0), so that negative↔negative and negative↔image offsets are those
of a negative-alone run (RoPE is relative) while the image keeps the prompt's positions; the rows are computed with
the model's own frequency formula on the CPU (bit-equal to its table, and valid for positions a table gather would
refuse: ``d < 0`` when the negative is longer). A block hook on each main layer lays a row out as ``[prompt caption
(padded to the longest row) | negative caption (padded) | image]``, runs the layer's *original* forward (every
per-token layer runs once on each token; modulation is time-only, so the negative shares it), and puts the prompt
part back in the model's order; the negative part is the stream for the next layer. The refiners are the same block
class and pass through.

Attention (:class:`NAGLumina2AttnProcessor2_0`, Lumina's GQA processor with its attention call replaced). Prompt
caption queries attend ``[prompt caption, image]`` (as in the plain model); negative caption queries attend
``[negative caption, image]`` (as in a negative-alone run); image queries get ``NAG(Z+, Z-)`` with ``Z+`` over
``[prompt caption, image]`` and ``Z-`` over ``[negative caption, image]``; the image→image attention is computed once
and merged with the two image→caption parts by log-sum-exp. Padding keys are masked per row. Proportional attention
(``base_sequence_length``, which the model itself never passes) scales by the prompt-only joint length for every
branch, as the plain model's call would.

Pipelines: ``Lumina2Pipeline`` (the only Lumina 2 pipeline in diffusers 0.42.1). CFG runs as two separate calls
without ``cache_context`` (optional CFG truncation skips the second): the unconditional call is recognised by its
text and never guided. The timestep is passed reversed (``1 − t/1000``), so ``start``/``end`` use it as the schedule
position directly. The NAG negative is encoded as the pipeline encodes its CFG negative: without the system prompt
that ``encode_prompt`` prefixes to prompts only. No official NAG code exists for Lumina 2 (``official=False``).

The family's file: the NAG processor, block hook and plan; the adapter; the pipeline and preset (``lumina2``); the
meta inputs of ``nagkit bench``; the tiny pipeline ``tiny-lumina2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers import Lumina2Transformer2DModel
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_lumina2 import Lumina2AttnProcessor2_0, Lumina2TransformerBlock

from ..core.config import NAGConfig
from ..core.operator import nag_combine
from ..core.state import Packing
from ..kernels import joint as _joint
from ..kernels.lse import attend, attention_with_lse_backend, merge_attention
from .base import Adapter, NAGProcessor, PipelineSpec, TinyModel, register_adapter

if TYPE_CHECKING:
    from diffusers import Lumina2Pipeline

    from ..bench.families import FamilySpec, Inputs

#: ``state.extras`` key of the side-car stream of the guided call in flight.
SIDE_CAR = "lumina2"
#: Lumina2AttnProcessor2_0 calls PyTorch's SDPA directly (no diffusers attention backend): so does NAG.
_BACKEND = "native"


# ------------------------------------------------------------------------------------------------ RoPE rows
def rope_rows(embedder: torch.nn.Module, positions: torch.Tensor) -> torch.Tensor:
    """Lumina 2 RoPE rows of caption tokens at axis-0 ``positions`` (axes 1 and 2 at 0), ``(N, head_dim / 2)``.

    The model's own formula (``get_1d_rotary_pos_embed`` per axis, concatenated as ``Lumina2RotaryPosEmbed`` gathers
    its tables), computed on the CPU in the table's dtype: bit-equal to the table rows for positions inside it, and
    defined for positions outside it (negative ones: the model's ``gather`` would raise).

    Args:
        embedder: the model's ``rope_embedder``.
        positions: ``(N,)`` integer axis-0 positions.

    Returns:
        Complex rotations on the CPU.
    """
    table = embedder.freqs_cis[0]
    freqs_dtype = torch.float64 if table.dtype == torch.complex128 else torch.float32
    positions = positions.to("cpu", torch.int64)
    parts = [get_1d_rotary_pos_embed(dim, positions if axis == 0 else torch.zeros_like(positions),
                                     theta=embedder.theta, freqs_dtype=freqs_dtype)
             for axis, dim in enumerate(embedder.axes_dim)]
    return torch.cat(parts, dim=-1)


def _lengths(mask: torch.Tensor) -> list[int]:
    """Valid caption tokens per row, as the model counts them (``mask.sum(dim=1)``)."""
    if mask.device.type == "meta":  # FLOP counting: no values to read; every token counts as valid
        return [mask.shape[1]] * mask.shape[0]
    return [int(n) for n in mask.sum(dim=1).tolist()]


# ------------------------------------------------------------------------------------------------ side-car
@dataclass
class SideCar:
    """The negative stream of one guided call and the joint layout of the main layers.

    A main layer sees ``[Tp | Tn | I]``: the prompt caption padded to ``lp_max``, the negative caption padded to
    ``ln_max``, the ``image`` tokens. ``perm`` maps that order's prompt part back to the model's rows
    ``[caption, image, padding]`` (None when every row has ``lp_max`` caption tokens: then the orders agree).

    Attributes:
        layers: ids of the model's main layers (the refiners are the same class and pass through).
        rows: the guided rows; ``batch`` rows in all.
        lp: valid prompt caption tokens per row; ``lp_max``, ``ln_max``, ``image``: segment lengths.
        stream: ``(batch, ln_max, C)`` the negative caption stream entering the next main layer (zeros on unguided
            rows).
        rope_n: ``(batch, ln_max, head_dim/2)`` its RoPE rows (axis 0 shifted by ``d`` per row).
        keys_p, keys_n: key masks ``(batch, 1, 1, lp_max|ln_max + image)`` of ``[Tp, I]`` / ``[Tn, I]``, or None when
            every key is valid; ``text_p``, ``text_n``: their caption parts.
        perm: ``(batch, lp_max + image)`` gather index, or None.
    """

    layers: frozenset[int]
    rows: slice
    batch: int
    lp: list[int]
    lp_max: int
    ln_max: int
    image: int
    stream: torch.Tensor
    rope_n: torch.Tensor
    keys_p: torch.Tensor | None
    keys_n: torch.Tensor | None
    text_p: torch.Tensor | None
    text_n: torch.Tensor | None
    perm: torch.Tensor | None
    _rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def all_rows(self) -> bool:
        return self.rows.start == 0 and self.rows.stop == self.batch

    @property
    def prompt_length(self) -> int:
        """The model's own joint length (prompt only): ``lp_max + image``."""
        return self.lp_max + self.image

    @property
    def length(self) -> int:
        """The joint length a main layer sees: ``lp_max + ln_max + image``."""
        return self.lp_max + self.ln_max + self.image

    def _to_segments(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is None:
            return x
        return x[torch.arange(x.shape[0], device=x.device)[:, None], self.perm]

    def join(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The model's rows ``(B, lp_max + image, C)`` with the negative stream: ``[Tp | Tn | I]``."""
        x = self._to_segments(hidden_states)
        stream = self.stream.to(x.dtype)
        return torch.cat([x[:, :self.lp_max], stream, x[:, self.lp_max:]], dim=1)

    def split(self, out: torch.Tensor) -> torch.Tensor:
        """Keep the negative part of a main layer's output as the stream; return the prompt part in model order."""
        lp, ln = self.lp_max, self.ln_max
        self.stream = out[:, lp:lp + ln]
        prompt = torch.cat([out[:, :lp], out[:, lp + ln:]], dim=1)
        if self.perm is None:
            return prompt
        index = self.perm[..., None].expand(-1, -1, prompt.shape[-1])
        return torch.empty_like(prompt).scatter_(1, index, prompt)

    def rope(self, rotary: torch.Tensor) -> torch.Tensor:
        """The main layers' RoPE rows in ``[Tp | Tn | I]`` order (built once per call: every layer gets the model's
        same rotary tensor)."""
        if self._rope is not None and self._rope[0] is rotary:
            return self._rope[1]
        r = self._to_segments(rotary)
        joint = torch.cat([r[:, :self.lp_max], self.rope_n.to(device=r.device, dtype=r.dtype), r[:, self.lp_max:]],
                          dim=1)
        self._rope = (rotary, joint)
        return joint


def _negative_stream(model: torch.nn.Module, embeds: torch.Tensor, mask: torch.Tensor | None, device: torch.device,
                     dtype: torch.dtype) -> tuple[torch.Tensor, list[int]]:
    """The negative's caption stream entering the main layers, as a forward on the negative alone makes it:
    ``caption_embedder``, the ``context_refiner`` layers with its own mask and RoPE rows ``(j, 0, 0)``; trailing
    columns that no row uses are dropped first (exact: they are masked keys and compaction drops them).

    Returns:
        ``(refined (R, W, C), valid tokens per row)``; a row's stream is its first ``valid`` tokens (compaction).
    """
    rows, width = embeds.shape[:2]
    if mask is None:
        mask = torch.ones(rows, width, dtype=torch.long, device=embeds.device)
    if mask.device.type != "meta":
        used = (mask != 0).any(dim=0).nonzero()
        width = int(used.max()) + 1 if used.numel() else 1
        embeds, mask = embeds[:, :width], mask[:, :width]
    lengths = _lengths(mask)
    embeds = embeds.to(device=device, dtype=dtype)
    mask = mask.to(device)
    cap = model.time_caption_embed.caption_embedder(embeds)
    table = rope_rows(model.rope_embedder, torch.arange(width)).to(device)
    valid = torch.arange(width, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
    rope = torch.where(valid[..., None], table[None], torch.zeros((), dtype=table.dtype, device=device))
    for layer in model.context_refiner:
        cap = layer(cap, mask, rope)
    return cap, lengths


def _plan(module: torch.nn.Module, access: Any, args: tuple, kwargs: dict, negative: Any, state: Any,
          pipeline: str | None, named: bool) -> tuple[tuple, dict, Packing] | None:
    """Guided-call layout: the negative's side-car stream (``state.extras[SIDE_CAR]``); the call's own arguments are
    not changed."""
    from ..integration.hook import guided_rows

    text = access.get("encoder_hidden_states", args, kwargs)
    mask = access.get("encoder_attention_mask", args, kwargs)
    hidden = access.get("hidden_states", args, kwargs)
    if not isinstance(text, torch.Tensor) or mask is None or hidden is None:
        return None
    if negative.embeds.shape[-1] != text.shape[-1]:
        raise ValueError(f"negative embeddings have {negative.embeds.shape[-1]} channels, the prompt's have "
                         f"{text.shape[-1]}")
    batch = text.shape[0]
    found = guided_rows(batch, negative, text, pipeline, named)
    if found is None:
        return None
    rows, expand = found
    device = text.device
    cap, ln_rows = _negative_stream(module, negative.embeds, negative.mask, device, text.dtype)
    source = [0] * (rows.stop - rows.start) if expand else list(range(rows.stop - rows.start))
    lp = _lengths(mask)
    lp_max, ln_max = max(lp), max(1, max(ln_rows[s] for s in source))  # ln_max <= cap.shape[1]
    patch = module.config.patch_size
    image = (hidden.shape[-2] // patch) * (hidden.shape[-1] // patch)

    # negative caption per guided row: its first ln tokens (compaction), axis-0 positions shifted by d = lp - ln
    ln = [0] * batch
    pick = torch.zeros(batch, dtype=torch.long)
    for g, s in enumerate(source):
        ln[rows.start + g], pick[rows.start + g] = ln_rows[s], s
    slots = torch.arange(ln_max)
    valid_n = slots[None] < torch.tensor(ln)[:, None]
    positions = torch.where(valid_n, slots[None] + torch.tensor([lp[i] - ln[i] for i in range(batch)])[:, None], 0)
    low, high = int(positions.min()), int(positions.max())
    table = rope_rows(module.rope_embedder, torch.arange(low, high + 1))
    rope_n = table[positions - low].to(device)
    stream = torch.where(valid_n.to(device)[..., None], cap[pick.to(device), :ln_max],
                         torch.zeros((), dtype=cap.dtype, device=device))

    # prompt side: the model's rows [caption, image, padding] -> [caption, padding | image]
    perm = None
    if min(lp) != lp_max:
        order = [torch.cat([torch.arange(n), torch.arange(n + image, lp_max + image), torch.arange(n, n + image)])
                 for n in lp]
        perm = torch.stack(order).to(device)
    ones = torch.ones(batch, image, dtype=torch.bool, device=device)
    text_p = keys_p = text_n = keys_n = None
    if perm is not None:
        text_p = (torch.arange(lp_max)[None] < torch.tensor(lp)[:, None]).to(device)
        keys_p = torch.cat([text_p, ones], dim=1)[:, None, None]
        text_p = text_p[:, None, None]
    if not bool(valid_n.all()):
        text_n = valid_n.to(device)
        keys_n = torch.cat([text_n, ones], dim=1)[:, None, None]
        text_n = text_n[:, None, None]
    state.extras[SIDE_CAR] = SideCar(
        layers=frozenset(id(layer) for layer in module.layers), rows=rows, batch=batch, lp=lp, lp_max=lp_max,
        ln_max=ln_max, image=image, stream=stream, rope_n=rope_n, keys_p=keys_p, keys_n=keys_n, text_p=text_p,
        text_n=text_n, perm=perm)
    return args, kwargs, Packing(lp=lp_max, ln=ln_max, rows=rows, batch=batch)


def _main_layer(block: Lumina2TransformerBlock, state: Any, original: Any, hidden_states: torch.Tensor,
                attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None,
                temb: torch.Tensor | None = None) -> torch.Tensor:
    """A main layer on ``[Tp | Tn | I]`` (the layer's own forward; its attention is the NAG processor); the refiners
    (same class) pass through."""
    side: SideCar | None = state.extras.get(SIDE_CAR)
    if side is None or id(block) not in side.layers:
        return original(hidden_states, attention_mask, image_rotary_emb, temb)
    if hidden_states.shape[1] != side.prompt_length:
        raise RuntimeError(f"Lumina2 main layer got {hidden_states.shape[1]} tokens, NAG expected "
                           f"{side.prompt_length} (caption {side.lp_max} + image {side.image}): the model's layout "
                           "is not the one this nagkit version knows")
    out = original(side.join(hidden_states), None, side.rope(image_rotary_emb), temb)
    return side.split(out)


# ------------------------------------------------------------------------------------------------ attention
def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2, 3)


def _nag_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, side: SideCar, cfg: NAGConfig
                   ) -> torch.Tensor:
    """Joint attention over ``[Tp | Tn | I]`` (heads-first ``(B, H, L, D)``) with NAG on the image queries.

    Returns:
        ``(B, L, H·D)``: caption queries as their own joint attention (``[Tp, I]`` / ``[Tn, I]``), image queries
        ``NAG(Z+, Z-)`` on the guided rows and ``Z+`` elsewhere.
    """
    lp, ln = side.lp_max, side.ln_max
    sp, sn, si = slice(0, lp), slice(lp, lp + ln), slice(lp + ln, None)
    q_p, q_n, q_i = query[:, :, sp], query[:, :, sn], query[:, :, si]
    k_p, k_n, k_i = key[:, :, sp], key[:, :, sn], key[:, :, si]
    v_p, v_n, v_i = value[:, :, sp], value[:, :, sn], value[:, :, si]
    rows, all_rows = side.rows, side.all_rows

    def guided(x: torch.Tensor | None) -> torch.Tensor | None:
        return x if x is None or all_rows else x[rows]

    kv_p = torch.cat([k_p, k_i], dim=2), torch.cat([v_p, v_i], dim=2)
    kv_n = torch.cat([k_n, k_i], dim=2), torch.cat([v_n, v_i], dim=2)
    out_p = attend(q_p, *kv_p, side.keys_p, _BACKEND)
    out_n = attend(q_n, *kv_n, side.keys_n, _BACKEND)
    q_g = guided(q_i)
    negative = None
    if _joint.lse_available(query.device) and not _joint._TWO_ATTENTIONS:
        image = attention_with_lse_backend(q_i, k_i, v_i, None, _BACKEND, dead=None)
        positive = image and attention_with_lse_backend(q_i, k_p, v_p, side.text_p, _BACKEND)
        negative = positive and attention_with_lse_backend(q_g, guided(k_n), guided(v_n), guided(side.text_n),
                                                           _BACKEND)
    if negative is not None:
        z_pos = merge_attention([image, positive], heads_last=True)
        if not all_rows:
            image = (image[0][rows], image[1][rows])
        z_neg = merge_attention([image, negative], heads_last=True)
    else:  # two full attentions: the official-style way (force_two_attentions), or no LSE kernel
        z_pos = attend(q_i, *kv_p, side.keys_p, _BACKEND)
        z_neg = attend(q_g, guided(kv_n[0]), guided(kv_n[1]), guided(side.keys_n), _BACKEND)
    z_pos, z_neg = _merge_heads(z_pos), _merge_heads(z_neg)
    out = nag_combine(z_pos if all_rows else z_pos[rows], z_neg, cfg.scale, cfg.tau, cfg.alpha, cfg.norm)
    if not all_rows:
        out = torch.cat([z_pos[: rows.start], out, z_pos[rows.stop:]], dim=0)
    return torch.cat([_merge_heads(out_p), _merge_heads(out_n), out], dim=1).to(query.dtype)


class NAGLumina2AttnProcessor2_0(NAGProcessor):
    """``Lumina2AttnProcessor2_0`` (GQA, QK-norm, complex RoPE) with NAG on the image queries of a main layer's
    ``[Tp | Tn | I]`` sequence; segment bounds and key masks come from the call's :class:`SideCar`."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        base_sequence_length: int | None = None,
    ) -> torch.Tensor:
        if self.packing is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                              base_sequence_length)
        side: SideCar | None = self.state.extras.get(SIDE_CAR)
        if side is None or hidden_states.shape[1] != side.length or encoder_hidden_states is not hidden_states:
            raise RuntimeError("NAG's Lumina2 attention was called outside a main layer's side-car hook (or with "
                               "another layout): nagkit cannot tell the prompt, the negative and the image apart")
        if self._parallel_config is not None:
            raise NotImplementedError("NAG on Lumina2 does not support context parallelism (enable_parallelism): "
                                      "the sequence split would cut the negative stream")
        cfg = self.state.config
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = query.shape[-1] // attn.heads
        dtype = query.dtype
        kv_heads = key.shape[-1] // head_dim
        query = query.view(batch_size, -1, attn.heads, head_dim)
        key = key.view(batch_size, -1, kv_heads, head_dim)
        value = value.view(batch_size, -1, kv_heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=False)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)
        # the model's softmax scale; proportional attention uses the prompt-only joint length for every branch
        scale = attn.scale
        if base_sequence_length is not None:
            scale = math.sqrt(math.log(side.prompt_length, base_sequence_length)) * attn.scale
        factor = scale / head_dim ** -0.5  # the kernels use SDPA's default 1/sqrt(head_dim)
        if factor != 1.0:
            query = query * factor
        n_rep = attn.heads // kv_heads
        if n_rep >= 1:
            key = key.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
            value = value.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
        out = _nag_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), side, cfg)
        out = out.type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _main_attention(name: str, module: torch.nn.Module) -> bool:
    """The main layers' joint attention (the refiners attend over one modality and are not guided)."""
    return name.startswith("layers.") and name.endswith(".attn")


def _reversed_window(config: NAGConfig, t: float) -> bool:
    """Lumina 2 pipelines pass ``1 − t/1000`` (0 = noise): that is the schedule position ``u`` itself."""
    return config.in_window(1.0 - t, 1.0)


# ------------------------------------------------------------------------------------------------ negative encoding
def encode_like_cfg_negative(encode: Any, arguments: dict[str, Any]) -> tuple:
    """``Lumina2Pipeline.encode_prompt`` for the NAG negative: as the pipeline encodes its CFG negative.

    ``encode_prompt`` prefixes its system prompt (``system_prompt + " <Prompt Start> "``) to prompts only, never to
    the CFG negative. So the negatives go in as ``negative_prompt`` with CFG on, and the prompt side is a one-token
    placeholder given as embeddings (nothing is encoded for it).

    Args:
        encode: the pipeline's original ``encode_prompt``.
        arguments: the call's arguments for the negative (``prompt`` = the negatives, CFG off).

    Returns:
        ``(negative_embeds, negative_mask)``.
    """
    negatives = arguments["prompt"]
    negatives = [negatives] if isinstance(negatives, str) else list(negatives)
    args = {**arguments, "prompt": None, "negative_prompt": negatives, "do_classifier_free_guidance": True,
            "prompt_embeds": torch.zeros(len(negatives), 1, 1),
            "prompt_attention_mask": torch.ones(len(negatives), 1, dtype=torch.long),
            "negative_prompt_embeds": None, "negative_prompt_attention_mask": None}
    out = encode(**args)
    return out[2], out[3]


# ------------------------------------------------------------------------------------------------ nagkit bench
class _Lengths(torch.Tensor):
    """A meta ``mask.sum(dim=1)`` that knows its values (see :class:`AllValidMask`)."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    values: list[int]

    def tolist(self) -> list[int]:  # type: ignore[override]
        return list(self.values)


class AllValidMask(torch.Tensor):
    """A meta ``(B, L)`` text mask whose tokens are all valid, for FLOP counting on the meta device.

    ``Lumina2Transformer2DModel.forward`` reads the caption lengths with ``mask.sum(dim=1).tolist()``, which a meta
    tensor cannot answer. This mask's ``sum(dim=1)`` returns a meta tensor whose ``tolist()`` gives ``[L] * B``;
    every other operation gives plain meta tensors. So the full published model runs on the meta device.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def make(cls, batch: int, length: int) -> AllValidMask:
        return torch.empty(batch, length, dtype=torch.long, device="meta").as_subclass(cls)

    def sum(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        out = torch.Tensor.sum(self, *args, **kwargs)
        dim = kwargs.get("dim", args[0] if args else None)
        if dim in (1, -1) and out.ndim == 1:
            out = out.as_subclass(_Lengths)
            out.values = [self.shape[1]] * self.shape[0]
        return out


def lumina2_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one Lumina 2 call: latents ``(B, C, H, W)``, the reversed timestep, the Gemma text and its mask
    (every token valid: :class:`AllValidMask`, so the forward runs on the meta device); the negative with its own
    mask (nagkit counts every token of a meta mask as valid)."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    kwargs: dict[str, Any] = {"hidden_states": c.meta(batch, g.latent_channels, h, w), "timestep": c.timestep,
                              "encoder_hidden_states": c.text,
                              "encoder_attention_mask": AllValidMask.make(batch, g.text_tokens)}
    negative = c.negative
    negative["encoder_attention_mask"] = c.meta(g.batch, g.negative_length, dtype=torch.long)
    return Inputs(kwargs=kwargs, mask_arg="encoder_attention_mask", negative=negative)


def lumina2_bench_text_flops(model: torch.nn.Module, spec: FamilySpec) -> int:
    """The negative caption's own attention in the ``context_refiner`` layers, ``4·C·Ln²`` per layer and row: work
    of the analytic minimum that the per-token ``text_linears`` patterns cannot describe."""
    g = spec.geometry
    return sum(g.batch * 4 * layer.attn.to_q.out_features * g.negative_length ** 2 for layer in model.context_refiner)


# ------------------------------------------------------------------------------------------------ tiny pipelines
# Test fixtures (``nagkit.tiny``): seeded random weights, in-memory tokenizers, nothing downloaded. Their diffusers and
# transformers imports stay inside the builders, so importing nagkit does not load the pipelines.


def tiny_lumina2_transformer(seed: int = 0, cap_feat_dim: int = 16) -> Lumina2Transformer2DModel:
    """2 main layers + 1 + 1 refiner layers, 2 query heads x 16 with 1 KV head (GQA), RoPE axes 4 + 6 + 6, patch 2,
    16 latent channels (the FLUX VAE's)."""
    from ..tiny.mmdit import MMDIT_LATENT_CHANNELS

    torch.manual_seed(seed)
    return Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=MMDIT_LATENT_CHANNELS,
        hidden_size=32,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),
        cap_feat_dim=cap_feat_dim,
    ).eval()


def tiny_lumina2_pipeline(seed: int = 0) -> Lumina2Pipeline:
    """Build a tiny random Lumina-Image-2.0-style pipeline.

    Transformer: :func:`tiny_lumina2_transformer`. Text: Gemma2 (2 layers, hidden 16; the pipeline takes its
    second-to-last hidden states) with the tiny Gemma tokenizer; the pipeline's default system prompt is about 60 of
    its tokens, so use a ``max_sequence_length`` of 96 (:data:`TINY_CALL`). VAE: factor 8, 16 latent channels, the
    FLUX.1 scaling/shift factors (Lumina 2 uses the FLUX.1 VAE). Scheduler: flow-match Euler (the pipeline passes its
    own sigmas). CFG runs with ``guidance_scale > 1`` as two denoiser calls.

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``Lumina2Pipeline`` on CPU in float32.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

    from ..tiny.mmdit import FLUX_VAE_FACTORS, _tiny_vae
    from ..tiny.pipelines import _finish, tiny_gemma_encoder

    tokenizer, text_encoder = tiny_gemma_encoder(seed)
    transformer = tiny_lumina2_transformer(seed, cap_feat_dim=text_encoder.config.hidden_size)
    vae = _tiny_vae(seed, FLUX_VAE_FACTORS)
    torch.manual_seed(seed)
    pipe = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                           text_encoder=text_encoder, tokenizer=tokenizer)
    return _finish(pipe)


# ------------------------------------------------------------------------------------------------ registration
#: Small call of the tiny pipeline: 64x64 (16 image tokens), text padded to 96 (the system prompt is ~60 tokens).
TINY_CALL = {"height": 64, "width": 64, "max_sequence_length": 96}

LUMINA2 = register_adapter(Adapter(
    family="lumina2",
    model_class=Lumina2Transformer2DModel,
    processors={Lumina2AttnProcessor2_0: NAGLumina2AttnProcessor2_0},
    select=_main_attention,
    mask_arg="encoder_attention_mask",
    timestep_max=1.0,
    window=_reversed_window,  # the pipeline passes 1 - t/1000
    official=False,
    preset="lumina2",
    notes="Lumina 2: NAG on the image tokens of the main layers; the negative caption (refined on its own, compacted, "
          "RoPE shifted to the prompt's image) rides as a side-car stream through block hooks",
    plan=_plan,
    block_forwards={Lumina2TransformerBlock: _main_layer},
    drop_padding=True,  # the side-car keeps the negative's valid tokens only (exact: compaction drops the rest)
    pipelines={
        # encode_prompt returns (embeds, mask, negative embeds, negative mask); the NAG negative is encoded as the
        # CFG negative (no system prompt)
        "Lumina2Pipeline": PipelineSpec(denoisers=("transformer",), mask_index=1, preset="lumina2", size_multiple=2,
                                        embeds_args={"embeds": "negative_prompt_embeds",
                                                     "mask": "negative_prompt_attention_mask"},
                                        encode_negative=encode_like_cfg_negative),
    },
    # No published NAG values for Lumina 2: the FLUX.1 values (official Flux pipeline alpha 0.25, README nag_scale 5,
    # tau 2.5), chosen by analogy with FLUX.1 (also a flow-matching joint-attention DiT).
    presets={"lumina2": NAGConfig(scale=5.0, tau=2.5, alpha=0.25)},
    tiny={"tiny-lumina2": TinyModel(tiny_lumina2_pipeline, dict(TINY_CALL))},
    bench_inputs=lumina2_bench_inputs,
    bench_text_flops=lumina2_bench_text_flops,
    separate_cfg=True,  # Lumina2Pipeline: conditional and unconditional calls in turn
))
