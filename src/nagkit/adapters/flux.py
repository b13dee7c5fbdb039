"""FLUX.1 ``FluxTransformer2DModel`` (schnell, dev, Kontext): NAG in every double- and single-stream block.

Layout ``[Tp | Tn | I]`` (text first). The negative text is packed after the prompt's text (its RoPE position ids are
zeros, like every Flux text token) and travels through all blocks as its own stream; the image stream stays single:

* double blocks: image queries give ``NAG(Z+, Z-)``; the image→image attention is computed once (LSE merge);
* single blocks (``fast`` mode): the same rule on the concatenated sequence — image tokens are never duplicated, and
  per-token work (norms, MLP, projections) runs once on them.

Modulation of the negative text follows the official code: the negative branch is conditioned with the *negative*
pooled CLIP embedding (``temb`` of the negative), applied per segment by block hooks; when no negative pooled
embedding is given (bare denoiser without ``pooled_projections`` in ``negative``), the prompt's is used.

``mode="official"`` reproduces the official diffusers code: its single blocks run a second copy of the image tokens
under the negative modulation (so the negative branch sees image keys/values that drift from the image stream), and
it uses the L2 norm. The double blocks are the same in both modes. ``fast`` keeps one image stream.

Pipeline variants (``FLUX_PIPELINES``, all with ``FluxPipeline``'s ``encode_prompt`` and spec): img2img, inpaint, Fill
(``in_channels`` 384: masked-image latents and the packed mask concatenated on the image tokens' features), Control and
Control img2img/inpaint (``in_channels`` 128: control latents on the features), ControlNet and ControlNet
img2img/inpaint. Condition channels belong to the image tokens before ``x_embedder``: NAG sees ordinary image tokens.
CFG: the pipelines with true CFG (``FluxPipeline``, Img2Img, Inpaint, ControlNet) make separate conditional and
unconditional calls (``separate_cfg``); only ``FluxPipeline`` names them with ``cache_context``, elsewhere the
unconditional call is recognised by its text differing from the encoded prompt and is never guided. Fill, Control and
ControlNet img2img/inpaint have no true CFG: every call is guided. ControlNet: ``FluxControlNetModel`` runs its own
joint blocks over the text. Decision: it is left plain, fed the prompt only; NAG is installed on the transformer alone
(the ControlNet's blocks get neither block hooks nor NAG processors), and its residuals are added to the image stream
after each block, outside attention, so the guided forward receives them unchanged. Reasons as for the UNet family
(:mod:`nagkit.adapters.unet`). ``FluxKontextInpaintPipeline`` shares Kontext's spec and preset: the reference image's
latents (``image_reference``, else the image to inpaint) ride in the image stream, like Kontext's.

The family's file: the NAG processor, block hooks and preparation (shared with Chroma, :mod:`nagkit.adapters.chroma`)
and the adapter; the pipelines (``FluxPipeline`` and its variants above, ``FluxKontextPipeline``,
``FluxKontextInpaintPipeline``) and presets (``flux``, ``flux-kontext``); the meta inputs of ``nagkit bench``; the
tiny pipelines ``tiny-flux`` (schnell-like), ``tiny-flux-dev`` and ``tiny-flux-kontext``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)

from ..core.config import NAGConfig
from ..core.operator import nag_combine
from ..kernels.joint import nag_joint_attention
from ..kernels.lse import attend
from .base import Adapter, NAGProcessor, PipelineSpec, TinyModel, register_adapter

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline

    from ..bench.families import CallBase, FamilySpec, Inputs


def _projections(attn: torch.nn.Module, hidden_states: torch.Tensor, text: torch.Tensor | None):
    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        if text is not None:
            return (query, key, value, *attn.to_added_qkv(text).chunk(3, dim=-1))
        return query, key, value, None, None, None
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    if text is not None:
        return query, key, value, attn.add_q_proj(text), attn.add_k_proj(text), attn.add_v_proj(text)
    return query, key, value, None, None, None


class NAGFluxAttnProcessor(NAGProcessor):
    """``FluxAttnProcessor`` with NAG on the image tokens (double blocks: separate text input; single blocks: the
    packed ``[Tp | Tn | I]`` sequence)."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        packing = self.packing
        if packing is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        cfg = self.state.config
        if self._parallel_config is not None:
            raise NotImplementedError("NAG on FLUX/Chroma joint attention does not support context parallelism "
                                      "(enable_parallelism): the sequence split would cut the packed negative text")
        query, key, value, t_query, t_key, t_value = _projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if encoder_hidden_states is not None:
            query = torch.cat([attn.norm_added_q(t_query.unflatten(-1, (-1, attn.head_dim))), query], dim=1)
            key = torch.cat([attn.norm_added_k(t_key.unflatten(-1, (-1, attn.head_dim))), key], dim=1)
            value = torch.cat([t_value.unflatten(-1, (-1, attn.head_dim)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = nag_joint_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), packing,
                                  text_first=True, scale=cfg.scale, tau=cfg.tau, alpha=cfg.alpha, norm=cfg.norm,
                                  bias=attention_mask, backend=self._attention_backend)
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        hidden_states = attn.to_out[1](attn.to_out[0](out[:, text_len:].contiguous()))
        return hidden_states, attn.to_add_out(out[:, :text_len].contiguous())


def _per_token(pos: torch.Tensor, neg: torch.Tensor, lp: int, ln: int, tail: int = 0) -> torch.Tensor:
    """Per-row modulation ``(B, D)`` of each segment as one per-token tensor ``(B, lp+ln+tail, D)``."""
    parts = [pos[:, None].expand(-1, lp, -1), neg[:, None].expand(-1, ln, -1)]
    if tail:
        parts.append(pos[:, None].expand(-1, tail, -1))
    return torch.cat(parts, dim=1)


def _double_block(block: FluxTransformerBlock, state: Any, original: Any, hidden_states: torch.Tensor,
                  encoder_hidden_states: torch.Tensor, temb: torch.Tensor, image_rotary_emb: Any = None,
                  joint_attention_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxTransformerBlock.forward`` with the negative text modulated by the negative's ``temb``."""
    temb_neg = state.extras.get("temb_neg")
    if temb_neg is None:
        return original(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
    lp, ln = state.packing.lp, state.packing.ln
    norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
    pos = block.norm1_context(encoder_hidden_states[:, :lp], emb=temb)
    neg = block.norm1_context(encoder_hidden_states[:, lp:], emb=temb_neg)
    c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = (
        _per_token(p, n, lp, ln) for p, n in zip(pos[1:], neg[1:], strict=True))
    outputs = block.attn(hidden_states=norm_hidden, encoder_hidden_states=torch.cat([pos[0], neg[0]], dim=1),
                         image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    attn_output, context_attn_output = outputs[0], outputs[1]

    hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
    norm_hidden = block.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * block.ff(norm_hidden)

    encoder_hidden_states = encoder_hidden_states + c_gate_msa * context_attn_output
    norm_text = block.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp) + c_shift_mlp
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp * block.ff_context(norm_text)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _segment_attention(attn: torch.nn.Module, hidden_states: torch.Tensor, rope: Any) -> torch.Tensor:
    """The single block's own joint attention over one segment (``FluxAttnProcessor`` math, merged heads)."""
    query, key, value, _, _, _ = _projections(attn, hidden_states, None)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if rope is not None:
        query = apply_rotary_emb(query, rope, sequence_dim=1)
        key = apply_rotary_emb(key, rope, sequence_dim=1)
    out = attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), None,
                 getattr(attn.processor, "_attention_backend", None))
    return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


def _single_block_official(block: FluxSingleTransformerBlock, state: Any, hidden_states: torch.Tensor,
                           encoder_hidden_states: torch.Tensor, temb: torch.Tensor, temb_neg: torch.Tensor,
                           image_rotary_emb: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The official single block: the negative row ``[Tn | I']`` carries its own image copy ``I'`` (entering the
    single blocks as a copy of the image stream) under the negative's modulation; both rows' image attention outputs
    are replaced by ``NAG(Z+, Z-)``. Kept across blocks in ``state.extras["image_copy"]``."""
    packing, cfg = state.packing, state.config
    lp, ln, rows = packing.lp, packing.ln, packing.rows
    copy = state.extras.get("image_copy", hidden_states)
    pos = torch.cat([encoder_hidden_states[:, :lp], hidden_states], dim=1)
    neg = torch.cat([encoder_hidden_states[:, lp:], copy], dim=1)
    if image_rotary_emb is not None:
        rope_pos = tuple(torch.cat([r[:lp], r[lp + ln:]]) for r in image_rotary_emb)
        rope_neg = tuple(r[lp:] for r in image_rotary_emb)
    else:
        rope_pos = rope_neg = None
    norm_pos, gate_pos = block.norm(pos, emb=temb)
    norm_neg, gate_neg = block.norm(neg, emb=temb_neg)
    attn_pos = _segment_attention(block.attn, norm_pos, rope_pos)
    attn_neg = _segment_attention(block.attn, norm_neg, rope_neg)
    z_pos = attn_pos[:, lp:]
    guided = nag_combine(z_pos[rows], attn_neg[rows, ln:], cfg.scale, cfg.tau, cfg.alpha, cfg.norm)
    image_pos = torch.cat([z_pos[: rows.start], guided, z_pos[rows.stop:]])
    image_neg = torch.cat([attn_neg[: rows.start, ln:], guided, attn_neg[rows.stop:, ln:]])
    attn_pos = torch.cat([attn_pos[:, :lp], image_pos], dim=1)
    attn_neg = torch.cat([attn_neg[:, :ln], image_neg], dim=1)
    mlp_pos, mlp_neg = block.act_mlp(block.proj_mlp(norm_pos)), block.act_mlp(block.proj_mlp(norm_neg))
    pos = pos + gate_pos.unsqueeze(1) * block.proj_out(torch.cat([attn_pos, mlp_pos], dim=2))
    neg = neg + gate_neg.unsqueeze(1) * block.proj_out(torch.cat([attn_neg, mlp_neg], dim=2))
    if pos.dtype == torch.float16:
        pos, neg = pos.clip(-65504, 65504), neg.clip(-65504, 65504)
    state.extras["image_copy"] = neg[:, ln:]
    return torch.cat([pos[:, :lp], neg[:, :ln]], dim=1), pos[:, lp:]


def _single_block(block: FluxSingleTransformerBlock, state: Any, original: Any, hidden_states: torch.Tensor,
                  encoder_hidden_states: torch.Tensor, temb: torch.Tensor, image_rotary_emb: Any = None,
                  joint_attention_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxSingleTransformerBlock.forward`` with the negative text modulated by the negative's ``temb``
    (``fast``), or the official doubled-image single block (``official``)."""
    temb_neg = state.extras.get("temb_neg")
    if state.config.mode == "official":
        if joint_attention_kwargs:
            raise NotImplementedError("mode='official' takes no joint_attention_kwargs")
        return _single_block_official(block, state, hidden_states, encoder_hidden_states, temb,
                                      temb if temb_neg is None else temb_neg, image_rotary_emb)
    if temb_neg is None:
        return original(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
    lp, ln = state.packing.lp, state.packing.ln
    text_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden, gate = block.norm(hidden_states, emb=temb)
    norm_neg, gate_neg = block.norm(hidden_states[:, lp:lp + ln], emb=temb_neg)
    norm_hidden = torch.cat([norm_hidden[:, :lp], norm_neg, norm_hidden[:, lp + ln:]], dim=1)
    gate = _per_token(gate, gate_neg, lp, ln, hidden_states.shape[1] - lp - ln)
    mlp_hidden = block.act_mlp(block.proj_mlp(norm_hidden))
    attn_output = block.attn(hidden_states=norm_hidden, image_rotary_emb=image_rotary_emb,
                             **(joint_attention_kwargs or {}))
    hidden_states = residual + gate * block.proj_out(torch.cat([attn_output, mlp_hidden], dim=2))
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_len], hidden_states[:, text_len:]


def _prepare(model: torch.nn.Module, access: Any, args: tuple, kwargs: dict, extras: dict, packing: Any,
             state: Any) -> tuple[tuple, dict]:
    """Zero RoPE ids for the negative text; the negative's ``temb`` from its pooled embedding."""
    txt_ids = access.get("txt_ids", args, kwargs)
    if txt_ids is not None:
        ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        args, kwargs = access.set("txt_ids", torch.cat([ids, ids.new_zeros(packing.ln, ids.shape[-1])]), args, kwargs)
    pooled_neg = extras.get("pooled_projections")
    if pooled_neg is not None:
        pooled = access.get("pooled_projections", args, kwargs)
        full = pooled.clone()
        full[packing.rows] = pooled_neg.to(device=pooled.device, dtype=pooled.dtype)
        # the compute dtype, as FluxTransformer2DModel.forward casts the timestep (the x_embedder output's dtype);
        # not a weight's dtype, which is the *storage* dtype under layerwise casting (fp8)
        dtype = access.get("hidden_states", args, kwargs).dtype
        timestep = access.get("timestep", args, kwargs).to(dtype) * 1000
        guidance = access.get("guidance", args, kwargs)
        if guidance is None:
            state.extras["temb_neg"] = model.time_text_embed(timestep, full)
        else:
            state.extras["temb_neg"] = model.time_text_embed(timestep, guidance.to(dtype) * 1000, full)
    return args, kwargs


def _flux_attention(name: str, module: torch.nn.Module) -> bool:
    return name.endswith(".attn") and hasattr(module, "head_dim")


# ------------------------------------------------------------------------------------------------ nagkit bench
def packed_bench_kwargs(c: CallBase) -> dict[str, Any]:
    """The meta inputs Flux and Chroma share (from a :class:`nagkit.bench.families.CallBase`): packed latents
    (``patch``×``patch`` latent patches as channels), timestep, text, RoPE ids."""
    g, (h, w) = c.geometry, c.latent_hw
    ph, pw = h // g.patch, w // g.patch
    return {"hidden_states": c.meta(c.batch, ph * pw, g.latent_channels * g.patch * g.patch), "timestep": c.timestep,
            "encoder_hidden_states": c.text, "img_ids": c.meta(ph * pw, 3), "txt_ids": c.meta(g.text_tokens, 3)}


def flux_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one FLUX.1 call (pooled CLIP embedding and guidance, as FLUX.1-dev)."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    kwargs = packed_bench_kwargs(c)
    kwargs["pooled_projections"] = c.meta(batch, c.geometry.pooled_dim)
    kwargs["guidance"] = c.meta(batch, dtype=torch.float32)
    return Inputs(kwargs=kwargs, negative=c.negative)


# ------------------------------------------------------------------------------------------------ tiny pipelines
# Test fixtures (``nagkit.tiny``): seeded random weights, in-memory tokenizers, nothing downloaded. Their diffusers and
# transformers imports stay inside the builders, so importing nagkit does not load the pipelines.


def _flux_dev_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # Released FLUX.1-dev / Kontext / Chroma scheduler config (resolution-dependent shift; the pipelines pass `mu`).
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _flux_transformer(seed: int, pooled_dim: int, guidance_embeds: bool) -> FluxTransformer2DModel:
    """2 double-stream + 2 single-stream Flux blocks, 2 heads x 16 (RoPE axes 4 + 4 + 8)."""
    from ..tiny.mmdit import _T5_DIM, MMDIT_LATENT_CHANNELS

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * MMDIT_LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_DIM,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    ).eval()


def _flux_components(seed: int, guidance_embeds: bool) -> dict[str, object]:
    """Components shared by the Flux and Flux Kontext builders."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel

    from ..tiny.mmdit import FLUX_VAE_FACTORS, _tiny_t5, _tiny_vae
    from ..tiny.pipelines import _clip_text_config, tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden_size=16)).eval()
    tokenizer_2, text_encoder_2 = _tiny_t5(seed)
    transformer = _flux_transformer(seed, text_encoder.config.hidden_size, guidance_embeds)
    vae = _tiny_vae(seed, FLUX_VAE_FACTORS)
    torch.manual_seed(seed)
    if guidance_embeds:
        scheduler = _flux_dev_scheduler()
    else:  # FLUX.1-schnell: fixed shift 1
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
    }


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """Build a tiny random FLUX.1-schnell-style pipeline (no guidance embedding).

    Transformer: 2 double-stream (joint) + 2 single-stream blocks, 2 heads x 16, 64 input channels (2x2-packed
    16-channel latents). Text: ``CLIPTextModel`` (hidden 16, 77 tokens; only its pooled output is used) and a 1-layer
    T5 (d_model 32). VAE factor 8 (height/width multiples of 16), Flux scaling/shift factors. Scheduler: flow-match
    Euler, shift 1. True CFG runs with ``true_cfg_scale > 1`` and a ``negative_prompt``; ``guidance_scale`` is ignored.

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``FluxPipeline`` on CPU in float32.
    """
    from diffusers import FluxPipeline

    from ..tiny.pipelines import _finish

    return _finish(FluxPipeline(**_flux_components(seed, guidance_embeds=False)))


def tiny_flux_dev_pipeline(seed: int = 0) -> FluxPipeline:
    """Build a tiny random FLUX.1-dev-style (guidance-distilled) pipeline.

    Like :func:`tiny_flux_pipeline` with ``guidance_embeds=True`` (``guidance_scale`` is embedded, no extra pass) and
    the dev scheduler (shift 3, dynamic shifting).

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``FluxPipeline`` on CPU in float32.
    """
    from diffusers import FluxPipeline

    from ..tiny.pipelines import _finish

    return _finish(FluxPipeline(**_flux_components(seed, guidance_embeds=True)))


def tiny_flux_kontext_pipeline(seed: int = 0) -> FluxKontextPipeline:
    """Build a tiny random FLUX.1-Kontext-dev-style pipeline (guidance-distilled, image-conditioned).

    Same components as :func:`tiny_flux_dev_pipeline`. The conditioning ``image`` is VAE-encoded and its packed
    tokens are appended to the image tokens. Call it with ``max_area=height * width`` (the output size is derived
    from it, default 1024**2) and ``_auto_resize=False`` (else the image is resized to a ~1 MP preferred resolution).

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``FluxKontextPipeline`` on CPU in float32; ``image=`` is optional (see :func:`tiny_condition_image`).
    """
    from diffusers import FluxKontextPipeline

    from ..tiny.pipelines import _finish

    return _finish(FluxKontextPipeline(**_flux_components(seed, guidance_embeds=True)))


# ------------------------------------------------------------------------------------------------ registration
# Flux returns (prompt_embeds, pooled, text_ids); the negative branch uses the negative's pooled embedding (official).
_FLUX_ARGS = {"embeds": "negative_prompt_embeds", "pooled_projections": "negative_pooled_prompt_embeds"}
_FLUX = PipelineSpec(denoisers=("transformer",), extras={"pooled_projections": 1}, preset="flux", size_multiple=2,
                     encoders=("text_encoder", "text_encoder_2"), embeds_args=_FLUX_ARGS)
_KONTEXT = PipelineSpec(denoisers=("transformer",), extras={"pooled_projections": 1}, preset="flux-kontext",
                        size_multiple=2,
                        encoders=("text_encoder", "text_encoder_2"), embeds_args=_FLUX_ARGS)
# The pipelines on this transformer with FluxPipeline's encode_prompt and no reference tokens (Kontext has its own
# preset). img2img / inpaint / ControlNet (``FluxControlNetModel``, run plain on the prompt; residuals added to the
# image stream): true CFG as separate calls where the pipeline has it (FluxPipeline, Img2Img, Inpaint, ControlNet).
# Fill / Control: condition latents concatenated on the image tokens' channels (in_channels 384 / 128); no true CFG.
FLUX_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxFillPipeline",
                  "FluxControlPipeline", "FluxControlImg2ImgPipeline", "FluxControlInpaintPipeline",
                  "FluxControlNetPipeline", "FluxControlNetImg2ImgPipeline", "FluxControlNetInpaintPipeline")
# MM-DiT: T5 length 32. Kontext: the output size comes from max_area, and _auto_resize=False keeps an `image=` at its
# own (tiny) size instead of a ~1 MP preferred one.
_TINY_CALL = {"height": 64, "width": 64, "max_sequence_length": 32}

FLUX = register_adapter(Adapter(
    family="flux",
    model_class=FluxTransformer2DModel,
    processors={FluxAttnProcessor: NAGFluxAttnProcessor},
    select=_flux_attention,
    mask_arg=None,
    timestep_max=1.0,  # the Flux pipelines pass t / 1000
    preset="flux",
    notes="FLUX.1 schnell/dev/Kontext: NAG on the image tokens of every double and single block; one image stream "
          "(fast mode), negative text modulated with the negative pooled embedding (official choice)",
    negative_keys=("pooled_projections",),
    official_norm="l2",  # the official diffusers Flux processor uses the L2 norm
    prepare=_prepare,
    block_forwards={FluxTransformerBlock: _double_block, FluxSingleTransformerBlock: _single_block},
    pipelines={**dict.fromkeys(FLUX_PIPELINES, _FLUX), "FluxKontextPipeline": _KONTEXT,
               "FluxKontextInpaintPipeline": _KONTEXT},
    presets={
        # Official Flux pipeline: alpha 0.25; README FLUX.1-schnell example nag_scale 5 (4 steps, no CFG).
        "flux": NAGConfig(scale=5.0, tau=2.5, alpha=0.25),
        # Official Kontext pipeline: nag_end 0.25 by default; README nag_scale 5.
        "flux-kontext": NAGConfig(scale=5.0, tau=2.5, alpha=0.25, end=0.25),
    },
    tiny={
        "tiny-flux": TinyModel(tiny_flux_pipeline, dict(_TINY_CALL)),
        "tiny-flux-dev": TinyModel(tiny_flux_dev_pipeline, dict(_TINY_CALL)),
        "tiny-flux-kontext": TinyModel(tiny_flux_kontext_pipeline, {**_TINY_CALL, "max_area": 64 * 64,
                                                                    "_auto_resize": False}),
    },
    bench_inputs=flux_bench_inputs,
    separate_cfg=True,  # true CFG (true_cfg_scale): conditional and unconditional calls in turn
))
