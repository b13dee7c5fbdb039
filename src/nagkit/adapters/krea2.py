"""Krea 2 ``Krea2Transformer2DModel``: NAG in the 28 single-stream joint attentions, text-first ``[T | I]``.

Layout ``[Tp | Tn | I]``. The negative's tapped encoder states ``(B, Ln, 12, 2560)`` are packed after the prompt's
along the token axis (dim 1 of the 4-D ``encoder_hidden_states``), its boolean padding mask after the prompt's, and
``Ln`` zero rows are inserted into ``position_ids`` after the prompt's text rows (every Krea 2 text token sits at the
RoPE origin, so the negative gets exactly the positions it would have as the prompt). On a guided call:

* ``text_fusion.layerwise_blocks``: untouched (they attend across the 12 tapped layers of one token: no token mixing);
* ``text_fusion.refiner_blocks.*.attn``: *segmented*, unguided: ``[Tp]`` and ``[Tn]`` self-attend separately, each
  with its own key mask, so the refiner (which mixes tokens) sees each text as if it were alone;
* ``transformer_blocks.*.attn`` (grouped-query attention with a sigmoid output gate computed from each query token):
  prompt text queries attend to ``[Tp, I]``, negative text queries to ``[Tn, I]`` (the negative evolves as its own
  stream), image queries get ``NAG(Z+, Z-)`` on the *pre-gate* attention output; the gate (computed from the image
  token, shared by ``Z+`` and ``Z-``) and the output projection follow, as in the original processor. The
  image→image attention is computed once (log-sum-exp merge).

Modulation depends on the timestep only (one ``temb`` for every token), so no block hooks are needed. Padding of the
negative is dropped before packing (exact: pads are masked keys everywhere, sit in the middle of the Krea 2 template
``[prompt | PAD | suffix]`` but carry no position, and the order of the valid tokens is kept), so a short negative
padded to 512 slots costs only its valid tokens. No official NAG implementation exists for Krea 2 (no ``official``
mode).

The family's file: the NAG processor and the packing (``plan``); the pipeline (``Krea2Pipeline``) and preset
(``krea2``); for ``nagkit bench`` the meta inputs, the negative's text-fusion work for the analytic minimum, and a
reference of the official FLUX way (:func:`krea2_official_way`: the negative as a second row with an image copy, as
the official single-stream blocks do; not what the bench's "official" column counts for a family without official
code, which is two full joint attentions per block); the tiny pipeline ``tiny-krea2`` (tiny Qwen3-VL text encoder,
in-memory Qwen2 BPE tokenizer, tiny Qwen-Image VAE).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from diffusers import Krea2Transformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_krea2 import Krea2AttnProcessor

from ..core.config import NAGConfig
from ..core.state import Packing
from ..kernels.joint import nag_joint_attention
from .base import Adapter, NAGProcessor, PipelineSpec, TinyModel, register_adapter

if TYPE_CHECKING:
    from diffusers import Krea2Pipeline

    from ..bench.families import FamilySpec, Inputs
    from ..bench.reference import OfficialLayout


def _projections(attn: torch.nn.Module, hidden_states: torch.Tensor, rope: Any
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Krea2AttnProcessor``'s q/k/v ``(B, L, H, D)`` (norms, RoPE, key/value heads repeated) and gate logits."""
    query = attn.to_q(hidden_states).unflatten(-1, (attn.num_heads, attn.head_dim))
    key = attn.to_k(hidden_states).unflatten(-1, (attn.num_kv_heads, attn.head_dim))
    value = attn.to_v(hidden_states).unflatten(-1, (attn.num_kv_heads, attn.head_dim))
    gate = attn.to_gate(hidden_states)
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    if rope is not None:
        query = apply_rotary_emb(query, rope, sequence_dim=1)
        key = apply_rotary_emb(key, rope, sequence_dim=1)
    groups = attn.num_heads // attn.num_kv_heads
    if groups > 1:
        key = key.repeat_interleave(groups, dim=2)
        value = value.repeat_interleave(groups, dim=2)
    return query, key, value, gate


def _key_mask(mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The model's key-padding mask ``(B, 1, 1, L)`` over the packed sequence, checked; the joint kernel takes it as a
    key-only mask (every query shares it)."""
    if mask is not None and (mask.ndim != 4 or mask.shape[-2] != 1 or mask.shape[-1] != length):
        raise RuntimeError(f"Krea 2 attention mask of shape {tuple(mask.shape)}: expected a key-padding mask "
                           f"(B, 1, 1, {length})")
    return mask


class NAGKrea2AttnProcessor(NAGProcessor):
    """``Krea2AttnProcessor`` on a packed ``[Tp | Tn | I]`` call.

    In the transformer blocks (a sequence longer than the packed text): NAG on the image tokens' pre-gate attention
    output, the negative text as its own stream. In the text-fusion refiner (the packed text only): each text
    segment attends to itself only (unguided), with its own key mask.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        packing = self.packing
        if packing is None:
            return self.inner(attn, hidden_states, attention_mask, image_rotary_emb)
        if self._parallel_config is not None:
            raise NotImplementedError("NAG on Krea 2 does not support context parallelism (enable_parallelism): the "
                                      "sequence split would cut the packed negative text")
        lp, ln, length = packing.lp, packing.ln, hidden_states.shape[1]
        if length < lp + ln:
            raise RuntimeError(f"Krea 2 attention over {length} tokens, fewer than the packed text ({lp} + {ln}): "
                               "not the packed sequence nagkit built")
        query, key, value, gate = _projections(attn, hidden_states, image_rotary_emb)
        if length == lp + ln:  # text-fusion refiner: [Tp] and [Tn] separately
            parts = []
            for seg in (slice(0, lp), slice(lp, lp + ln)):
                mask = None if attention_mask is None else attention_mask[..., seg]
                parts.append(dispatch_attention_fn(query[:, seg], key[:, seg], value[:, seg], attn_mask=mask,
                                                   backend=self._attention_backend, parallel_config=None))
            out = torch.cat(parts, dim=1).flatten(2, 3)
        else:
            cfg = self.state.config
            bias = _key_mask(attention_mask, length)
            out = nag_joint_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), packing,
                                      text_first=True, scale=cfg.scale, tau=cfg.tau, alpha=cfg.alpha, norm=cfg.norm,
                                      bias=bias, backend=self._attention_backend)
        out = out * torch.sigmoid(gate)
        return attn.to_out[0](out)


def _krea2_attention(name: str, module: torch.nn.Module) -> bool:
    """The joint attention of every transformer block and the text-fusion refiner's token self-attention (segmented,
    unguided); not the layer-wise text-fusion blocks, which never mix tokens."""
    return name.endswith(".attn") and (name.startswith("transformer_blocks.")
                                       or name.startswith("text_fusion.refiner_blocks."))


# ------------------------------------------------------------------------------------------------ packing
def _plan(model: torch.nn.Module, access: Any, args: tuple, kwargs: dict, negative: Any, state: Any,
          pipeline: str | None, named: bool) -> tuple[tuple, dict, Packing] | None:
    """Pack ``[prompt | negative]`` along the token axis of the 4-D ``encoder_hidden_states`` and of the boolean
    ``encoder_attention_mask``, and insert the negative's zero RoPE rows into ``position_ids``."""
    from ..integration.hook import _drop_padding, guided_rows

    text = access.get("encoder_hidden_states", args, kwargs)
    if not isinstance(text, torch.Tensor) or text.ndim != 4:
        raise ValueError("Krea 2 takes encoder_hidden_states of shape (batch, tokens, text layers, channels); got "
                         f"{None if not isinstance(text, torch.Tensor) else tuple(text.shape)}")
    embeds, mask = negative.embeds, negative.mask
    if mask is not None:  # exact: padded tokens are masked keys everywhere and carry no position
        if negative.unpadded is None:
            negative.unpadded = _drop_padding(embeds, mask)
        embeds, mask = negative.unpadded
    if embeds.ndim != 4 or embeds.shape[2:] != text.shape[2:]:
        raise ValueError(f"negative embeddings of shape {tuple(embeds.shape)} do not match the prompt's "
                         f"{tuple(text.shape)} (batch, tokens, text layers, channels)")
    batch, lp = text.shape[0], text.shape[1]
    found = guided_rows(batch, negative, text, pipeline, named)
    if found is None:
        return None
    rows, expand = found
    if expand:
        embeds = embeds.expand(batch, *embeds.shape[1:])
        mask = None if mask is None else mask.expand(batch, -1)
    embeds = embeds.to(device=text.device, dtype=text.dtype)
    ln = embeds.shape[1]
    if rows.stop - rows.start != batch:  # batched CFG: the other rows carry an all-valid zero negative
        full = text.new_zeros(batch, ln, *text.shape[2:])
        full[rows] = embeds
        embeds = full
    packing = Packing(lp=lp, ln=ln, rows=rows, batch=batch)
    args, kwargs = access.set("encoder_hidden_states", torch.cat([text, embeds], dim=1), args, kwargs)

    pos_mask = access.get("encoder_attention_mask", args, kwargs)
    if pos_mask is not None or mask is not None:
        like = pos_mask if pos_mask is not None else mask
        dtype = pos_mask.dtype if pos_mask is not None else torch.bool
        if pos_mask is None:
            pos_mask = torch.ones(batch, lp, device=like.device, dtype=dtype)
        neg_mask = torch.ones(batch, ln, device=like.device, dtype=dtype)
        if mask is not None:
            neg_mask[rows] = mask.to(device=like.device, dtype=dtype)
        args, kwargs = access.set("encoder_attention_mask", torch.cat([pos_mask, neg_mask], dim=1), args, kwargs)

    ids = access.get("position_ids", args, kwargs)
    if ids is not None:
        image = access.get("hidden_states", args, kwargs).shape[1]
        if ids.ndim != 2 or ids.shape[0] != lp + image:
            raise ValueError(f"position_ids of shape {tuple(ids.shape)}: expected ({lp} text + {image} image "
                             "tokens, 3)")
        # every Krea 2 text token sits at the origin (Krea2Pipeline.prepare_position_ids): so does the negative's
        ids = torch.cat([ids[:lp], ids.new_zeros(ln, ids.shape[1]), ids[lp:]])
        args, kwargs = access.set("position_ids", ids, args, kwargs)
    return args, kwargs, packing


# ------------------------------------------------------------------------------------------------ nagkit bench
def krea2_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one Krea 2 call: packed 2x2 latent patches, ``(B, L, num_text_layers, text_dim)`` tapped text
    states with their boolean mask, ``(L + image tokens, 3)`` position ids."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    image = (h // g.patch) * (w // g.patch)
    layers = int(spec.config.get("num_text_layers", 12))
    kwargs: dict[str, Any] = {
        "hidden_states": c.meta(batch, image, g.latent_channels * g.patch * g.patch), "timestep": c.timestep,
        "encoder_hidden_states": c.meta(batch, g.text_tokens, layers, g.text_dim),
        "position_ids": c.meta(g.text_tokens + image, 3, dtype=torch.float32)}
    negative = {"encoder_hidden_states": c.meta(g.batch, g.negative_length, layers, g.text_dim)}
    if g.mask:
        kwargs["encoder_attention_mask"] = c.meta(batch, g.text_tokens, dtype=torch.bool)
        negative["encoder_attention_mask"] = c.meta(g.batch, g.negative_length, dtype=torch.bool)
    return Inputs(kwargs=kwargs, mask_arg="encoder_attention_mask" if g.mask else None, negative=negative)


def krea2_text_flops(model: torch.nn.Module, spec: FamilySpec) -> int:
    """The analytic minimum's pre-block text work on the negative's tokens: ``text_fusion`` (layer-wise blocks on
    ``num_text_layers`` rows per token, projector, refiner self-attention among the negative's own tokens) and
    ``txt_in``, counted by running those modules on meta tensors of the negative alone."""
    from ..bench.flops import count_flops

    g = spec.geometry
    layers = model.text_fusion.projector.in_features
    dtype = model.txt_in.linear_1.weight.dtype
    text = torch.empty(g.batch, g.negative_length, layers, g.text_dim, device="meta", dtype=dtype)
    mask = torch.empty(g.batch, 1, 1, g.negative_length, device="meta", dtype=torch.bool) if g.mask else None
    return count_flops(lambda: model.txt_in(model.text_fusion(text, attention_mask=mask)))


def _official_way_forward(model: torch.nn.Module, negative: dict[str, torch.Tensor], layout: OfficialLayout,
                          hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                          position_ids: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None,
                          attention_kwargs: dict | None = None, return_dict: bool = True) -> Any:
    """``Krea2Transformer2DModel.forward`` with NAG computed the official FLUX way (the way the official single-stream
    blocks do it; no official NAG code exists for Krea 2): the negative is a second batch row ``[Tn | I']`` that
    runs the text fusion and every block in full (norms, projections, gate, MLP and attention over its own row),
    ``I'`` starting as a copy of the image tokens; both rows' image attention output is ``NAG(Z+, Z-)`` (pre-gate,
    L1). The modulation depends on time only, so ``I'`` never drifts from ``I``: the output equals nagkit's, only the
    work differs (the whole model but its output layer runs twice: +100 % FLOPs at 1024²). ``attention_kwargs`` (a
    LoRA scale) is not supported."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from ..core.operator import nag_combine

    if attention_kwargs:
        raise NotImplementedError("the Krea 2 FLUX-way reference takes no attention_kwargs")
    batch, lp = hidden_states.shape[0], encoder_hidden_states.shape[1]
    neg = negative["encoder_hidden_states"].expand(batch, *negative["encoder_hidden_states"].shape[1:])
    ln, li = neg.shape[1], hidden_states.shape[1]
    neg_mask = negative.get("encoder_attention_mask")
    temb = model.time_embed(timestep, dtype=hidden_states.dtype)
    temb_mod = model.time_mod_proj(torch.nn.functional.gelu(temb, approximate="tanh"))
    rows, masks, ropes = [], [], []
    for text, mask, length in ((encoder_hidden_states, encoder_attention_mask, lp), (neg, neg_mask, ln)):
        mask = None if mask is None else mask.expand(batch, -1)
        fused = model.txt_in(model.text_fusion(text, attention_mask=None if mask is None else mask[:, None, None]))
        rows.append(torch.cat([fused, model.img_in(hidden_states)], dim=1))
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, li)], dim=1)[:, None, None]
        masks.append(mask)
        ids = torch.cat([position_ids.new_zeros(length, position_ids.shape[1]), position_ids[lp:]])
        ropes.append(model.rotary_emb(ids))
    for block in model.transformer_blocks:
        mod = (temb_mod.unflatten(-1, (6, -1)) + block.scale_shift_table).unbind(-2)
        prescale, preshift, pregate, postscale, postshift, postgate = mod
        outs, gates = [], []
        for row, mask, rope in zip(rows, masks, ropes, strict=True):
            x = (1.0 + prescale) * block.norm1(row) + preshift
            query, key, value, gate = _projections(block.attn, x, rope)
            out = dispatch_attention_fn(query, key, value, attn_mask=mask, parallel_config=None)
            outs.append(out.flatten(2, 3))
            gates.append(gate)
        guided = nag_combine(outs[0][:, lp:], outs[1][:, ln:], layout.scale, layout.tau, layout.alpha, "l1")
        new = []
        for row, out, gate, length in zip(rows, outs, gates, (lp, ln), strict=True):
            out = torch.cat([out[:, :length], guided], dim=1) * torch.sigmoid(gate)
            row = row + pregate * block.attn.to_out[0](out)
            new.append(row + postgate * block.ff((1.0 + postscale) * block.norm2(row) + postshift))
        rows = new
    out = model.final_layer(rows[0][:, lp:], temb)
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)


@contextlib.contextmanager
def krea2_official_way(model: torch.nn.Module, negative: dict[str, torch.Tensor], layout: OfficialLayout
                       ) -> Iterator[None]:
    """Make ``model(...)`` compute :func:`_official_way_forward` (the instance's ``forward`` is replaced), restore it
    on exit. A reference of what the official FLUX way would cost on Krea 2; not registered in
    ``nagkit.bench.reference.OFFICIAL_WAY`` (the bench's "official" column counts two full joint attentions per block
    for a family without official code)."""
    if not isinstance(model, Krea2Transformer2DModel):
        raise TypeError(f"the Krea 2 reference needs a Krea2Transformer2DModel, not {type(model).__name__}")
    previous = model.__dict__.get("forward")
    model.forward = functools.partial(_official_way_forward, model, negative, layout)
    try:
        yield
    finally:
        if previous is None:
            del model.forward
        else:
            model.forward = previous


# ------------------------------------------------------------------------------------------------ tiny pipelines
# Test fixtures: seeded random weights, an in-memory tokenizer, nothing downloaded. Their diffusers and transformers
# imports stay inside the builders, so importing nagkit does not load the pipelines.
#: Words of the Krea 2 prompt template that the tiny tokenizer keeps whole, so that its system prefix is 34 tokens
#: and its assistant suffix 5, as Krea2Pipeline assumes (``prompt_template_encode_start_idx`` / ``_num_suffix_tokens``).
_TEMPLATE_WORDS = ("system", "user", "assistant", "Describe", "detailing", "color", "quantity", "text", "objects",
                   "background")
_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_qwen2_tokenizer() -> Any:
    """A byte-level BPE ``Qwen2Tokenizer`` over the tiny word list (``Ġword`` and ``word`` pieces), in memory, with
    Qwen's chat specials (``<|im_start|>``, ``<|im_end|>``; ``<|endoftext|>`` pads). Any text tokenizes."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    from ..tiny.pipelines import _bytes_to_unicode, _word_merges, vocabulary_words

    vocab: dict[str, int] = {}
    for char in _bytes_to_unicode().values():
        vocab[char] = len(vocab)
    words, seen = [], set()
    for word in (*vocabulary_words(), *_TEMPLATE_WORDS):
        for piece in ("Ġ" + word, word):
            if len(piece) > 1 and piece not in seen:
                seen.add(piece)
                words.append(list(piece))
    merges = _word_merges(words, vocab)
    for special in _SPECIAL:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_tokens([AddedToken(s, special=True) for s in _SPECIAL], special_tokens=True)
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_krea2_pipeline(seed: int = 0) -> Krea2Pipeline:
    """Build a tiny random Krea 2 pipeline.

    Transformer: ``Krea2Transformer2DModel`` with 2 blocks of 2 query heads x 16 over 1 key/value head (grouped-query
    attention, gated output), RoPE axes 4 + 6 + 6, text fusion on 3 tapped layers of width 16 (1 layer-wise + 2
    refiner blocks, 2 query heads over 1 key/value head). Text: ``Qwen3VLModel`` (2 decoder layers, hidden 16, tiny
    vision tower never used), its embedding output and both layers tapped (``text_encoder_select_layers=(0, 1, 2)``);
    the tokenizer keeps the Krea 2 template's 34-token prefix and 5-token suffix. VAE: ``AutoencoderKLQwenImage``
    (factor 8, 4 latent channels, so 16 transformer channels after 2x2 packing). Scheduler: flow-match Euler with the
    Krea 2 dynamic shift. CFG is on when ``guidance_scale > 0`` (Krea 2's convention).

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``Krea2Pipeline`` on CPU in float32.
    """
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, Krea2Pipeline
    from transformers import Qwen3VLConfig, Qwen3VLModel

    from ..tiny.pipelines import _finish

    tokenizer = tiny_qwen2_tokenizer()
    text_config = {"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 1024,
                   "pad_token_id": tokenizer.pad_token_id,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                       "mrope_interleaved": True}}
    vision_config = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16,
                     "patch_size": 16, "num_position_embeddings": 16, "deepstack_visual_indexes": []}
    torch.manual_seed(seed)
    text_encoder = Qwen3VLModel(Qwen3VLConfig(text_config=text_config, vision_config=vision_config)).eval()
    torch.manual_seed(seed)
    transformer = Krea2Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=3,
        text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=32,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=2, axes_dims_rope=(4, 6, 6)).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 1.0, 2.5]).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=6400)
    pipe = Krea2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer, text_encoder_select_layers=(0, 1, 2))
    return _finish(pipe)


# ------------------------------------------------------------------------------------------------ registration
KREA2 = register_adapter(Adapter(
    family="krea2",
    model_class=Krea2Transformer2DModel,
    processors={Krea2AttnProcessor: NAGKrea2AttnProcessor},
    select=_krea2_attention,
    mask_arg="encoder_attention_mask",
    text_ndim=4,  # (batch, tokens, tapped encoder layers, channels)
    timestep_max=1.0,  # Krea2Pipeline passes t / 1000
    official=False,
    preset="krea2",
    notes="Krea 2: NAG on the image tokens of every single-stream joint attention (pre-gate); negative text as its "
          "own stream, run through the text-fusion refiner as a separate segment; its padding dropped (exact)",
    plan=_plan,
    pipelines={
        # encode_prompt returns (prompt_embeds (B, L, 12, 2560), prompt_embeds_mask (B, L) bool)
        "Krea2Pipeline": PipelineSpec(denoisers=("transformer",), mask_index=1, preset="krea2", size_multiple=2,
                                      cfg_min=0.0,  # the pipeline runs CFG whenever guidance_scale > 0
                                      overrides={"prompt_embeds_mask": None},
                                      embeds_args={"embeds": "negative_prompt_embeds",
                                                   "mask": "negative_prompt_embeds_mask"}),
    },
    # No official or community NAG values for Krea 2: the FLUX values (official Flux pipeline alpha 0.25, README
    # FLUX.1-schnell nag_scale 5, tau 2.5), chosen by analogy with FLUX.1 (also a flow-matching MM-DiT).
    presets={"krea2": NAGConfig(scale=5.0, tau=2.5, alpha=0.25)},
    tiny={"tiny-krea2": TinyModel(tiny_krea2_pipeline, {"height": 64, "width": 64, "max_sequence_length": 32})},
    bench_inputs=krea2_bench_inputs,
    bench_text_flops=krea2_text_flops,  # text fusion (12 rows per token, refiner attention) and txt_in
    separate_cfg=True,  # Krea2Pipeline: conditional and unconditional calls in turn, no cache_context
    drop_padding=True,
))
