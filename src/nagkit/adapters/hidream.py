"""HiDream-I1 ``HiDreamImageTransformer2DModel`` (Full, Dev, Fast): NAG in every dual- and single-stream block.

Layout. Joint attention ``[image | text]`` in the 16 dual-stream blocks (``double_stream_blocks.*.block.attn1``, text
with its own projections) and the 32 single-stream blocks (``single_stream_blocks.*.block.attn1``, one sequence),
``HiDreamAttention`` with ``HiDreamAttnProcessor``. The text of block ``k`` is ``[T5, Llama_last]`` (the evolving
"initial" text, carried from block to block) followed by a *fresh* projection of the Llama-3 layer
``llama_layers[k]``, which is cut off again after the block. Packing ``[prompt | negative]`` into each source would
interleave the segments (``[T5p, T5n, Lp, Ln, Lkp, Lkn]``), so the negative rides as a side-car stream instead:

* the denoiser hook (``plan``) leaves the prompt's inputs untouched and projects the negative's sources with the
  model's own ``caption_projection`` layers: its initial text ``[T5n, Llama_last,n]`` now, its per-block Llama
  projection when the block runs;
* a block hook on every ``HiDreamBlock`` (it knows the block's index) appends ``[initial_n, Llama_k,n]`` after the
  prompt's text: dual blocks ``[I | Tp | Tn]`` (``encoder_hidden_states`` extended), single blocks the same on the
  one sequence (``hidden_states`` extended, ``hidden_states_masks`` extended with ones: text keys are never masked);
  it runs the block's own forward, keeps the negative's new initial text for the next block and returns the prompt's
  part, so the model's own truncation and concatenation see exactly the plain shapes;
* the NAG processor gives the image queries ``NAG(Z+, Z-)`` (image→image attention computed once, LSE merge); the
  prompt's text attends ``[I, Tp]`` and the negative's ``[I, Tn]``, as if each were the prompt.

Exactness. Text positions are all zero (identity rotation), so the negative's tokens get identity rows appended to
the rotary table; the text has no padding mask (padding tokens are keys, as in the plain model); every per-token
layer (projections, norms, the feed-forward) sees each token alone, including the single blocks' mixture-of-experts
feed-forward, which routes each token to its top-2 experts independently (no capacity limit), so the negative's
tokens do not change the prompt's or the image's routing.

Modulation. ``temb = t_embed + p_embed(pooled CLIP-L ⊕ CLIP-G)`` modulates image and text in every block; the
negative's text stream uses the row's (the prompt's) ``temb``, like SD3's official NAG (no pooled negative, no
re-implemented blocks). The negative's own pooled embedding is not supported. There is no official NAG code for
HiDream, so there is no ``official`` mode.

CFG. ``HiDreamImagePipeline`` makes one call on ``[uncond, cond]`` (the Llama states with their batch on dim 1), no
``cache_context``: the conditional half is guided, the unconditional rows are computed as without NAG (their side-car
rows are zeros and never reach them). Timesteps 0–1000.

The family's file: the NAG processor, the side-car plan and block hook, the adapter; the pipeline
(``HiDreamImagePipeline``) and preset (``hidream``); the meta inputs and meta-safe MoE of ``nagkit bench``; the tiny
pipeline ``tiny-hidream``.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers import HiDreamImageTransformer2DModel
from diffusers.models.transformers.transformer_hidream_image import (
    HiDreamAttention,
    HiDreamAttnProcessor,
    HiDreamBlock,
    HiDreamImageTransformerBlock,
    MOEFeedForwardSwiGLU,
    apply_rope,
)

from ..core.config import NAGConfig
from ..core.state import Packing
from ..kernels.joint import nag_joint_attention
from .base import Adapter, NAGProcessor, PipelineSpec, TinyModel, register_adapter

if TYPE_CHECKING:
    from diffusers import HiDreamImagePipeline

    from ..bench.families import FamilySpec, Inputs

TEXT_ARG = "encoder_hidden_states_t5"
LLAMA_ARG = "encoder_hidden_states_llama3"
_SIDE = "hidream_side_car"


def _rotate(query: torch.Tensor, key: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``HiDreamAttnProcessor``'s rotary step: the whole head, or its first half when the table is half as wide."""
    if query.shape[-1] == rope.shape[-3] * 2:
        return apply_rope(query, key, rope)
    query_1, query_2 = query.chunk(2, dim=-1)
    key_1, key_2 = key.chunk(2, dim=-1)
    query_1, key_1 = apply_rope(query_1, key_1, rope)
    return torch.cat([query_1, query_2], dim=-1), torch.cat([key_1, key_2], dim=-1)


class NAGHiDreamAttnProcessor(NAGProcessor):
    """``HiDreamAttnProcessor`` with NAG on the image tokens of the packed ``[I | Tp | Tn]`` sequence (dual blocks:
    ``encoder_hidden_states`` holds ``[Tp | Tn]``; single blocks: ``hidden_states`` holds all three)."""

    def __call__(
        self,
        attn: HiDreamAttention,
        hidden_states: torch.Tensor,
        hidden_states_masks: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor = None,
        *args,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        packing = self.packing
        if packing is None:
            return self.inner(attn, hidden_states, hidden_states_masks, encoder_hidden_states, image_rotary_emb,
                              *args, **kwargs)
        cfg = self.state.config
        dtype, batch = hidden_states.dtype, hidden_states.shape[0]
        query = attn.q_rms_norm(attn.to_q(hidden_states)).to(dtype=dtype)
        key = attn.k_rms_norm(attn.to_k(hidden_states)).to(dtype=dtype)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim) for x in (query, key, value))
        if hidden_states_masks is not None:  # multiplies keys (image padding; ones over text in single blocks)
            key = key * hidden_states_masks.view(batch, -1, 1, 1)
        image_len = query.shape[1]
        if not attn.single:
            text = encoder_hidden_states
            query_t = attn.q_rms_norm_t(attn.to_q_t(text)).to(dtype=dtype).view(batch, -1, attn.heads, head_dim)
            key_t = attn.k_rms_norm_t(attn.to_k_t(text)).to(dtype=dtype).view(batch, -1, attn.heads, head_dim)
            value_t = attn.to_v_t(text).view(batch, -1, attn.heads, head_dim)
            query = torch.cat([query, query_t], dim=1)
            key = torch.cat([key, key_t], dim=1)
            value = torch.cat([value, value_t], dim=1)
        query, key = _rotate(query, key, image_rotary_emb)
        out = nag_joint_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), packing,
                                  text_first=False, scale=cfg.scale, tau=cfg.tau, alpha=cfg.alpha, norm=cfg.norm,
                                  backend="native")  # as the original: F.scaled_dot_product_attention
        out = out.to(query.dtype)
        if attn.single:
            return attn.to_out(out)
        return attn.to_out(out[:, :image_len]), attn.to_out_t(out[:, image_len:])


# ------------------------------------------------------------------------------------------------ side-car stream
def _all_rows(x: torch.Tensor, rows: slice, batch: int) -> torch.Tensor:
    """``x`` of the guided ``rows`` as all ``batch`` rows (zeros on the others)."""
    if rows.start == 0 and rows.stop == batch:
        return x
    shape = x.shape[1:]
    return torch.cat([x.new_zeros(rows.start, *shape), x, x.new_zeros(batch - rows.stop, *shape)])


@dataclass
class _SideCar:
    """The negative's text stream of one guided call.

    Attributes:
        projections: the model's ``caption_projection`` layers.
        llama_layers: the model's ``config.llama_layers`` (block ``k`` reads Llama layer ``llama_layers[k]``).
        llama: the negative's Llama-3 states of the guided rows ``(layers, R, Ln, C)``.
        rows: the guided rows; batch: all rows.
        blocks: ``id(HiDreamBlock)`` -> its index (dual blocks first, as the model counts them).
        last: the projection of the last block's Llama layer, all rows (zeros on the unguided ones).
        initial: the negative's evolving ``[T5, Llama_last]`` text, all rows; updated by every block.
    """

    projections: torch.nn.ModuleList
    llama_layers: list[int]
    llama: torch.Tensor
    rows: slice
    batch: int
    blocks: dict[int, int]
    last: torch.Tensor
    initial: torch.Tensor

    @property
    def initial_len(self) -> int:
        return self.initial.shape[1]

    def fresh(self, index: int) -> torch.Tensor:
        """The negative's fresh Llama projection of block ``index``, all rows, as the model projects the prompt's;
        the last block's is the one already in the initial text (the model, too, projects that layer once)."""
        if index == len(self.llama_layers) - 1:
            return self.last
        return _all_rows(self.projections[index](self.llama[self.llama_layers[index]]), self.rows, self.batch)


def _plan(model: HiDreamImageTransformer2DModel, access: Any, args: tuple, kwargs: dict, negative: Any, state: Any,
          pipeline: str | None, named: bool) -> tuple[tuple, dict, Packing] | None:
    """A guided call: the prompt's inputs unchanged, the negative's projected initial text and Llama states in
    ``state.extras`` for the block hooks, and the per-block layout ``lp = |T5p| + 2·|Llama_p|``,
    ``ln = |T5n| + 2·|Llama_n|``."""
    from ..integration.hook import guided_rows

    t5, llama = access.get(TEXT_ARG, args, kwargs), access.get(LLAMA_ARG, args, kwargs)
    if not isinstance(t5, torch.Tensor) or not isinstance(llama, torch.Tensor):
        return None  # the model itself will complain about a missing text input
    neg_llama = negative.extras.get(LLAMA_ARG)
    if neg_llama is None:
        raise ValueError(f"NAG on {type(model).__name__} needs the negative's Llama-3 states too: give "
                         f"negative={{{TEXT_ARG!r}: ..., {LLAMA_ARG!r}: ...}} (Llama states (layers, batch, tokens, "
                         "channels), as the denoiser takes them), or a negative_prompt with the pipeline's text "
                         "encoders")
    neg_t5 = negative.embeds
    if neg_t5.shape[-1] != t5.shape[-1] or neg_llama.shape[-1] != llama.shape[-1]:
        raise ValueError(f"negative embeddings have {neg_t5.shape[-1]} (T5) / {neg_llama.shape[-1]} (Llama) channels, "
                         f"the prompt's {t5.shape[-1]} / {llama.shape[-1]}")
    layers = list(model.config.llama_layers)
    if neg_llama.ndim != 4 or neg_llama.shape[1] != neg_t5.shape[0] or neg_llama.shape[0] <= max(layers):
        raise ValueError(f"the negative's {LLAMA_ARG} must be (layers > {max(layers)}, {neg_t5.shape[0]}, tokens, "
                         f"channels), got {tuple(neg_llama.shape)}")
    batch = t5.shape[0]
    found = guided_rows(batch, negative, t5, pipeline, named)
    if found is None:
        return None
    rows, expand = found
    if expand:
        neg_t5 = neg_t5.expand(batch, -1, -1)
        neg_llama = neg_llama.expand(-1, batch, -1, -1)
    neg_t5 = neg_t5.to(device=t5.device, dtype=t5.dtype)
    neg_llama = neg_llama.to(device=llama.device, dtype=llama.dtype)
    projections, last = model.caption_projection, len(layers) - 1
    # the model's "initial" text: [T5 projection, projection of the last block's Llama layer]
    last_llama = _all_rows(projections[last](neg_llama[layers[last]]), rows, batch)
    initial = torch.cat([_all_rows(projections[-1](neg_t5), rows, batch), last_llama], dim=1)
    blocks = [*model.double_stream_blocks, *model.single_stream_blocks]
    state.extras[_SIDE] = _SideCar(projections=projections, llama_layers=layers, llama=neg_llama, rows=rows,
                                   batch=batch, blocks={id(block): i for i, block in enumerate(blocks)},
                                   last=last_llama, initial=initial)
    lp = t5.shape[1] + 2 * llama.shape[2]
    ln = neg_t5.shape[1] + 2 * neg_llama.shape[2]
    return args, kwargs, Packing(lp=lp, ln=ln, rows=rows, batch=batch)


def _identity_rows(rope: torch.Tensor, count: int) -> torch.Tensor:
    """The rotary table extended by ``count`` text rows (all text positions are zero: its last row)."""
    return torch.cat([rope, rope[:, -1:].expand(-1, count, *rope.shape[2:])], dim=1)


def _block_forward(block: HiDreamBlock, state: Any, original: Any, hidden_states: torch.Tensor,
                   hidden_states_masks: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                   temb: torch.Tensor | None = None, image_rotary_emb: torch.Tensor = None) -> Any:
    """``HiDreamBlock.forward`` with the negative's text appended after the prompt's, split off again afterwards."""
    side: _SideCar | None = state.extras.get(_SIDE)
    index = None if side is None else side.blocks.get(id(block))
    if index is None:  # not a block of the guided denoiser
        return original(hidden_states, hidden_states_masks, encoder_hidden_states, temb, image_rotary_emb)
    lp = state.packing.lp
    negative = torch.cat([side.initial, side.fresh(index)], dim=1)
    ln = negative.shape[1]
    rope = _identity_rows(image_rotary_emb, ln)
    if isinstance(block.block, HiDreamImageTransformerBlock):  # dual stream: [I] and [Tp | Tn]
        if encoder_hidden_states.shape[1] != lp:
            raise RuntimeError(f"HiDream block {index}: {encoder_hidden_states.shape[1]} text tokens, expected {lp}")
        text = torch.cat([encoder_hidden_states, negative.to(encoder_hidden_states.dtype)], dim=1)
        image, text = original(hidden_states, hidden_states_masks, text, temb, rope)
        side.initial = text[:, lp:lp + side.initial_len]
        return image, text[:, :lp]
    total = hidden_states.shape[1]  # single stream: [I | Tp] -> [I | Tp | Tn]
    if hidden_states_masks is not None:
        ones = hidden_states_masks.new_ones(hidden_states_masks.shape[0], ln)
        hidden_states_masks = torch.cat([hidden_states_masks, ones], dim=1)
    out = original(torch.cat([hidden_states, negative.to(hidden_states.dtype)], dim=1), hidden_states_masks,
                   encoder_hidden_states, temb, rope)
    side.initial = out[:, total:total + side.initial_len]
    return out[:, :total]


def _hidream_attention(name: str, module: torch.nn.Module) -> bool:
    return isinstance(module, HiDreamAttention)


# ------------------------------------------------------------------------------------------------ nagkit bench
def _meta_moe_infer(self: MOEFeedForwardSwiGLU, x: torch.Tensor, flat_expert_indices: torch.Tensor,
                    flat_expert_weights: torch.Tensor) -> torch.Tensor:
    """FLOP-equal stand-in of ``MOEFeedForwardSwiGLU.moe_infer`` on the meta device (whose routing needs values):
    every token through ``num_activated_experts`` experts, as the real top-k routing does (all experts have the
    same size, so the FLOPs do not depend on which experts a token picks)."""
    out = torch.zeros_like(x)
    for expert in self.experts[: self.num_activated_experts]:
        out = out + expert(x)
    return out


def bench_model(model: torch.nn.Module) -> torch.nn.Module:
    """Make a meta-device HiDream countable: its MoE routing reads values (``bincount().cpu()``), which meta tensors
    have none of, so each MoE of *this* model instance gets a FLOP-equal static routing (see
    :func:`_meta_moe_infer`); the counts equal a CPU run's (tested at reduced width). Other models are untouched."""
    for module in model.modules():
        if isinstance(module, MOEFeedForwardSwiGLU):
            module.moe_infer = types.MethodType(_meta_moe_infer, module)
    return model


def hidream_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one HiDream call: timesteps 0–1000, T5 ``(B, L, C)``, all Llama-3 layers ``(layers, B, L, C)``,
    pooled CLIP-L ⊕ CLIP-G; the negative's T5 and Llama states. The geometry's ``text_tokens`` (``negative_tokens``)
    count a block's text, ``|T5| + |Llama_last| + |Llama_k|``: each source has a third of them (128 at the
    pipeline's default ``max_sequence_length``: 384).

    The latents come patched, with ``img_ids``, ``img_sizes`` (a list) and an all-ones ``hidden_states_masks``, as
    the model's own ``patchify`` makes them (non-square sizes padded to ``max_seq`` tokens): the model's unpatchify
    reads the sizes' *values*, which meta tensors do not have. The same FLOPs as the pipeline's call (the mask only
    multiplies keys)."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    p, config = g.patch, spec.config
    tokens = (h // p) * (w // p)
    if h != w:  # HiDream pads non-square latents to max_seq tokens (masked)
        tokens = config.get("max_resolution", [128, 128])[0] * config.get("max_resolution", [128, 128])[1] // (p * p)
    layers = max(config.get("llama_layers") or [0]) + 1
    lt, ln = _per_source(g.text_tokens), _per_source(g.negative_length)
    kwargs: dict[str, Any] = {
        "hidden_states": c.meta(batch, tokens, p * p * g.latent_channels), "timesteps": c.timestep,
        TEXT_ARG: c.meta(batch, lt, g.text_dim), LLAMA_ARG: c.meta(layers, batch, lt, g.text_dim),
        "pooled_embeds": c.meta(batch, g.pooled_dim), "img_ids": c.meta(batch, tokens, 3),
        "img_sizes": [(h // p, w // p)] * batch, "hidden_states_masks": c.meta(batch, tokens, dtype=torch.long)}
    negative = {TEXT_ARG: c.meta(g.batch, ln, g.text_dim), LLAMA_ARG: c.meta(layers, g.batch, ln, g.text_dim)}
    return Inputs(kwargs=kwargs, text_arg=TEXT_ARG, negative=negative)


def bench_text_flops(model: torch.nn.Module, spec: FamilySpec) -> int:
    """The part of NAG's least extra work on HiDream that ``text_linears`` patterns cannot describe, in FLOPs: the
    negative's caption projections (its T5 and one Llama layer per block, ``negative_tokens / 3`` tokens each) and,
    in every single-stream block, the MoE gate (a bare weight, not an ``nn.Linear``) on its ``negative_tokens``.

    The rest of the minimum is ``nagkit bench``'s per-block formula with ``negative_tokens`` = the negative's text
    tokens per block (``|T5| + |Llama_last| + |Llama_k|``): the ``text_linears`` (dual: the ``*_t`` projections and
    ``ff_t``; single: q/k/v/out, the shared expert and 2 of the 4 routed experts: each token goes through its top-2,
    all experts the same size) and ``4·C·Ln·(Ln + 2·Li)`` per joint attention.
    """
    g = spec.geometry
    per_source = _per_source(g.negative_length)
    total = sum(2 * per_source * p.linear.in_features * p.linear.out_features for p in model.caption_projection)
    for wrapper in model.single_stream_blocks:
        ff = wrapper.block.ff_i
        if isinstance(ff, MOEFeedForwardSwiGLU):
            total += 2 * g.negative_length * ff.gate.gating_dim * ff.gate.n_routed_experts
    return g.batch * total


def _per_source(tokens: int) -> int:
    """Tokens of each text source (T5, Llama) when a block's text has ``tokens``: ``|T5| + 2·|Llama|``, equal."""
    if tokens % 3:
        raise ValueError(f"HiDream's bench text length counts the per-block text T5 + Llama_last + Llama_k of equal "
                         f"lengths: give a multiple of 3, got {tokens}")
    return tokens // 3


# ------------------------------------------------------------------------------------------------ tiny pipeline
# Test fixtures (``nagkit.tiny``): seeded random weights, in-memory tokenizers, nothing downloaded. Their diffusers and
# transformers imports stay inside the builders, so importing nagkit does not load the pipelines.
_TINY_CLIP_LENGTH = 128  # the pipeline pads CLIP text to min(max_sequence_length, 218); 128 is its default


def tiny_hidream_transformer(seed: int = 0, t5_dim: int = 32, llama_dim: int = 32, pooled_dim: int = 48,
                             llama_layers: tuple[int, ...] = (0, 1, 1, 1), **config: Any
                             ) -> HiDreamImageTransformer2DModel:
    """2 dual-stream + 2 single-stream HiDream blocks, 2 heads x 16 (rotary axes 8 + 4 + 4), MoE 4 experts top-2,
    16 latent channels, patch 2, ``max_resolution`` 8x8 latents (16 image tokens; smaller non-square images are
    padded to that and masked)."""
    torch.manual_seed(seed)
    base = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2,
                attention_head_dim=16, num_attention_heads=2, caption_channels=[t5_dim, llama_dim],
                text_emb_dim=pooled_dim, num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(8, 4, 4),
                max_resolution=(8, 8), llama_layers=list(llama_layers))
    return HiDreamImageTransformer2DModel(**{**base, **config}).eval()


def tiny_hidream_pipeline(seed: int = 0) -> HiDreamImagePipeline:
    """Build a tiny random HiDream-I1-style pipeline.

    Transformer: :func:`tiny_hidream_transformer` (2 dual + 2 single blocks; block ``k`` reads Llama layer
    ``[0, 1, 1, 1][k]``, the published "0…31, then 31" pattern). Text: two ``CLIPTextModelWithProjection`` (hidden
    16 and 32, pooled 16 + 32 = 48; tokenizers of 128 tokens), a 1-layer T5 (d_model 32) and a 2-layer
    ``LlamaForCausalLM`` (hidden 32, eager attention: the pipeline asks for attention maps) with a BPE tokenizer.
    VAE: factor 8, 16 channels, FLUX scaling/shift factors (HiDream uses the FLUX VAE). Scheduler: flow-match Euler,
    shift 3. ``default_sample_size`` is 8 (the pipeline rescales every size to that area: 64x64 px, 16 image
    tokens). CFG is on when ``guidance_scale > 1`` (one batched call).

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``HiDreamImagePipeline`` on CPU in float32.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline
    from transformers import CLIPTextModelWithProjection, LlamaConfig, LlamaForCausalLM

    from ..tiny.mmdit import FLUX_VAE_FACTORS, _tiny_t5, _tiny_vae
    from ..tiny.pipelines import _clip_text_config, _finish, tiny_clip_tokenizer, tiny_gemma_tokenizer

    tokenizer = tiny_clip_tokenizer(model_max_length=_TINY_CLIP_LENGTH)
    tokenizer_2 = tiny_clip_tokenizer(model_max_length=_TINY_CLIP_LENGTH, pad_token="!")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(tokenizer, hidden_size=16, projection_dim=16)).eval()
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(tokenizer_2, hidden_size=32, projection_dim=32)).eval()
    tokenizer_3, text_encoder_3 = _tiny_t5(seed, d_model=32)
    tokenizer_4 = tiny_gemma_tokenizer(model_max_length=512)
    llama_config = LlamaConfig(vocab_size=len(tokenizer_4), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                               bos_token_id=tokenizer_4.bos_token_id, eos_token_id=tokenizer_4.eos_token_id,
                               pad_token_id=tokenizer_4.pad_token_id)
    llama_config._attn_implementation = "eager"  # the pipeline asks for attention maps (output_attentions=True)
    torch.manual_seed(seed)
    text_encoder_4 = LlamaForCausalLM(llama_config).eval()
    transformer = tiny_hidream_transformer(seed, t5_dim=text_encoder_3.config.d_model,
                                           llama_dim=llama_config.hidden_size,
                                           pooled_dim=text_encoder.config.projection_dim +
                                           text_encoder_2.config.projection_dim)
    vae = _tiny_vae(seed, FLUX_VAE_FACTORS)
    torch.manual_seed(seed)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = HiDreamImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
                                tokenizer_3=tokenizer_3, text_encoder_4=text_encoder_4, tokenizer_4=tokenizer_4,
                                transformer=transformer)
    pipe.default_sample_size = 8  # the pipeline rescales every size to (8·8)² px: 64x64, 16 image tokens
    return _finish(pipe)


# ------------------------------------------------------------------------------------------------ registration
# encode_prompt returns (t5, neg_t5, llama3, neg_llama3, pooled, neg_pooled); the negative branch keeps the prompt's
# pooled embedding (its temb), as SD3's official NAG. prompt_4 and the prompt's T5/Llama embeddings are prompt-only
# arguments nagkit's generic list does not know: reset for the negative (so it is encoded from its own text).
_HIDREAM = PipelineSpec(
    denoisers=("transformer",),
    embeds_index=0,
    extras={LLAMA_ARG: 2},
    overrides={"prompt_4": None, "prompt_embeds_t5": None, "prompt_embeds_llama3": None},
    preset="hidream",
    encoders=("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"),
    embeds_args={"embeds": "negative_prompt_embeds_t5", LLAMA_ARG: "negative_prompt_embeds_llama3"},
    size_multiple=2,
)

HIDREAM = register_adapter(Adapter(
    family="hidream",
    model_class=HiDreamImageTransformer2DModel,
    processors={HiDreamAttnProcessor: NAGHiDreamAttnProcessor},
    select=_hidream_attention,
    text_arg=TEXT_ARG,
    mask_arg=None,
    timestep_arg="timesteps",
    timestep_max=1000.0,  # the pipeline passes the scheduler's t (0..1000)
    preset="hidream",
    notes="HiDream-I1 Full/Dev/Fast: NAG on the image tokens of every dual and single block; the negative text is a "
          "side-car stream (block hooks) with the prompt's modulation; image->image attention computed once",
    negative_keys=(LLAMA_ARG,),
    batch_dims={LLAMA_ARG: 1},
    official=False,  # no official NAG implementation for HiDream
    plan=_plan,
    block_forwards={HiDreamBlock: _block_forward},
    pipelines={"HiDreamImagePipeline": _HIDREAM},
    # No published NAG values for HiDream: chosen by analogy with FLUX.1 (official Flux NAG pipeline alpha 0.25, its
    # README's nag_scale 5, tau 2.5).
    presets={"hidream": NAGConfig(scale=5.0, tau=2.5, alpha=0.25)},
    # text length 16 (T5, Llama and CLIP); the pipeline fixes the area at 64x64 px (default_sample_size 8)
    tiny={"tiny-hidream": TinyModel(tiny_hidream_pipeline, {"height": 64, "width": 64, "max_sequence_length": 16})},
    bench_inputs=hidream_bench_inputs,
    bench_text_flops=bench_text_flops,
    bench_model=bench_model,
))
