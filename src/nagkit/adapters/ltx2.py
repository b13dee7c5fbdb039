"""LTX-2 / LTX-2.3 ``LTX2VideoTransformer3DModel`` (audio + video): NAG on BOTH text cross-attentions.

* Video → text: ``transformer_blocks.*.attn2`` (text ``encoder_hidden_states``, mask ``encoder_attention_mask``).
* Audio → text: ``transformer_blocks.*.audio_attn2`` (text ``audio_encoder_hidden_states``, mask
  ``audio_encoder_attention_mask``).

Each is guided with its own negative text (the negative's video-text and audio-text embeddings, both required), packed
after the prompt's like PixArt/Sana (Pattern A): the model's only text preprocessing is per token
(``caption_projection``/``audio_caption_projection`` in LTX-2.0; in LTX-2.3 a per-sample, token-independent K/V
shift/scale in each block), the text has no RoPE, and both masks are per key (additive ``(1 − m)·−10000``). Not
guided: ``attn1``/``audio_attn1`` (self-attention, STG perturbation), ``audio_to_video_attn``/``video_to_audio_attn``.

LTX-2.3 gated attention (``to_gate_logits``: per head ``2·sigmoid``, computed from the query tokens): NAG combines the
*pre-gate* attention outputs, then the gate and ``to_out`` are applied (families-notes §1.6).

Pipelines: NOT supported yet. ``LTX2Pipeline``/``LTX2ImageToVideoPipeline`` post-process the Gemma text outside
``encode_prompt`` (``pipe.connectors``), so the NAG negative would need that post-encode step; there is no tiny LTX-2
pipeline to test it, so nagkit refuses those pipelines (not in ``PIPELINES``). Guide the denoiser directly with
``nagkit.apply(pipe.transformer, negative={...})`` giving the connector outputs of the negative.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import LTX2VideoTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoAttnProcessor, LTX2PerturbedAttnProcessor

from ..core.config import NAGConfig
from ..core.state import Packing
from ..kernels.cross import nag_cross_attention
from .base import Adapter, NAGProcessor, register_adapter

if TYPE_CHECKING:
    from ..bench.families import FamilySpec, Inputs

AUDIO_TEXT, AUDIO_MASK = "audio_encoder_hidden_states", "audio_encoder_attention_mask"
_AUDIO_PACKING, _AUDIO_MODULES = "ltx2_audio_packing", "ltx2_audio_modules"


def _guided_text_attention(proc: NAGProcessor, attn: torch.nn.Module, hidden_states: torch.Tensor,
                           encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The text cross-attention of ``LTX2AudioVideoAttnProcessor`` with NAG before the per-head gate."""
    state = proc.state
    cfg = state.config
    packing = state.extras[_AUDIO_PACKING] if id(attn) in state.extras.get(_AUDIO_MODULES, ()) else proc.packing
    backend, parallel = proc._attention_backend, proc._parallel_config

    batch_size, sequence_length, _ = encoder_hidden_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None

    query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))
    value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))

    def attend(q, k, v, mask):  # noqa: ANN001, ANN202
        out = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, backend=backend,
                                    parallel_config=parallel)
        return out.flatten(2, 3).to(q.dtype)

    hidden_states = nag_cross_attention(attend, query, key, value, attention_mask, packing,
                                        cfg.scale, cfg.tau, cfg.alpha, cfg.norm, seq_dim=1)
    if gate_logits is not None:  # LTX-2.3: the gate after NAG (shared by Z+ and Z-)
        gates = 2.0 * torch.sigmoid(gate_logits)
        hidden_states = (hidden_states.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
    hidden_states = attn.to_out[0](hidden_states)
    return attn.to_out[1](hidden_states)


class NAGLTX2AttnProcessor(NAGProcessor):
    """``LTX2AudioVideoAttnProcessor`` with NAG on the text cross-attention output (video or audio stream)."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if self.packing is None or encoder_hidden_states is None or query_rotary_emb is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                              key_rotary_emb)
        return _guided_text_attention(self, attn, hidden_states, encoder_hidden_states, attention_mask)


class NAGLTX2PerturbedAttnProcessor(NAGProcessor):
    """``LTX2PerturbedAttnProcessor`` (STG-enabled configs) with NAG on the text cross-attention output. The
    perturbation is only ever passed to the self-attentions, which NAG does not touch."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        perturbation_mask: torch.Tensor | None = None,
        all_perturbed: bool | None = None,
    ) -> torch.Tensor:
        if (self.packing is None or encoder_hidden_states is None or query_rotary_emb is not None
                or perturbation_mask is not None or all_perturbed):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                              key_rotary_emb, perturbation_mask, all_perturbed)
        return _guided_text_attention(self, attn, hidden_states, encoder_hidden_states, attention_mask)


def _ltx2_text_attention(name: str, module: torch.nn.Module) -> bool:
    return name.endswith(".attn2") or name.endswith(".audio_attn2")


def _prepare(model: torch.nn.Module, access: Any, args: tuple, kwargs: dict, extras: dict, packing: Packing,
             state: Any) -> tuple[tuple, dict]:
    """Pack the negative's audio text (and mask) after the prompt's, with its own layout for ``audio_attn2``."""
    neg = extras.get(AUDIO_TEXT)
    if neg is None:
        raise ValueError("LTX2VideoTransformer3DModel: NAG guides both text cross-attentions (attn2 for video, "
                         "audio_attn2 for audio) and needs the negative's audio text too: give "
                         f"negative[{AUDIO_TEXT!r}] (and negative[{AUDIO_MASK!r}] if it has padding)")
    text = access.get(AUDIO_TEXT, args, kwargs)
    batch, rows = packing.batch, packing.rows
    neg = neg.to(device=text.device, dtype=text.dtype)
    if neg.shape[-1] != text.shape[-1]:
        raise ValueError(f"negative audio text has {neg.shape[-1]} channels, the prompt's has {text.shape[-1]}")
    ln = neg.shape[1]
    full = text.new_zeros(batch, ln, text.shape[-1])
    full[rows] = neg
    args, kwargs = access.set(AUDIO_TEXT, torch.cat([text, full], dim=1), args, kwargs)
    pos_mask = access.get(AUDIO_MASK, args, kwargs)
    neg_mask = extras.get(AUDIO_MASK)
    if pos_mask is not None or neg_mask is not None:
        like = pos_mask if pos_mask is not None else neg_mask
        dtype = pos_mask.dtype if pos_mask is not None else torch.long
        if pos_mask is None:
            pos_mask = torch.ones(batch, text.shape[1], device=like.device, dtype=dtype)
        full_mask = torch.ones(batch, ln, device=like.device, dtype=dtype)
        if neg_mask is not None:
            full_mask[rows] = neg_mask.to(device=like.device, dtype=dtype)
        args, kwargs = access.set(AUDIO_MASK, torch.cat([pos_mask, full_mask], dim=1), args, kwargs)
    state.extras[_AUDIO_PACKING] = Packing(lp=text.shape[1], ln=ln, rows=rows, batch=batch)
    state.extras[_AUDIO_MODULES] = {id(block.audio_attn2) for block in model.transformer_blocks}
    return args, kwargs


# ------------------------------------------------------------------------------------------------ nagkit bench
def ltx2_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one LTX-2.0 call: video tokens ``(B, F·H·W, C)`` (patch 1), audio tokens ``(B, T_a, C_a)`` with
    ``T_a = round(frames / 24 fps · sampling_rate / hop / audio_scale_factor)`` (the pipeline's rule at its default
    24 fps), the connector text for video and for audio (same shape in LTX-2.0: both connectors output
    ``caption_channels`` wide and as long) and their masks."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    f = g.latent_frames or 1
    cfg = spec.config
    audio_tokens = round((g.frames or 1) / 24.0 * cfg.get("audio_sampling_rate", 16000)
                         / cfg.get("audio_hop_length", 160) / cfg.get("audio_scale_factor", 4))
    kwargs: dict[str, Any] = {
        "hidden_states": c.meta(batch, f * h * w, g.latent_channels),
        "audio_hidden_states": c.meta(batch, audio_tokens, cfg.get("audio_in_channels", 128)),
        "encoder_hidden_states": c.text, "timestep": c.timestep, "num_frames": f, "height": h, "width": w,
        "audio_num_frames": audio_tokens, "encoder_attention_mask": c.meta(batch, g.text_tokens, dtype=torch.long),
        AUDIO_TEXT: c.meta(batch, g.text_tokens, g.text_dim),
        AUDIO_MASK: c.meta(batch, g.text_tokens, dtype=torch.long),
    }
    negative = c.negative
    negative["encoder_attention_mask"] = c.meta(g.batch, g.negative_length, dtype=torch.long)
    negative[AUDIO_TEXT] = negative["encoder_hidden_states"]
    negative[AUDIO_MASK] = negative["encoder_attention_mask"]
    return Inputs(kwargs=kwargs, mask_arg="encoder_attention_mask", negative=negative)


def _audio_text_from_video(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    video, audio = kwargs.get("encoder_hidden_states"), kwargs.get(AUDIO_TEXT)
    if video is not None and audio is not None and video.shape[1] != audio.shape[1]:
        kwargs = {**kwargs, AUDIO_TEXT: kwargs["encoder_hidden_states"],
                  AUDIO_MASK: kwargs.get("encoder_attention_mask")}
    return args, kwargs


def ltx2_bench_model(model: LTX2VideoTransformer3DModel) -> LTX2VideoTransformer3DModel:
    """The meta model of ``nagkit bench``, on that instance only: its text cross-attentions marked
    (``is_cross_attention``, which ``LTX2Attention`` lacks), and a forward pre-hook that gives the audio stream the
    video text (and mask) when their lengths differ: ``nagkit bench``'s official-way and minimum checks pack the
    negative into the video text only (one text argument per family); the audio text has the same shape in LTX-2.0,
    so the packed video text stands in for the packed audio text (same FLOPs). Calls guided by nagkit pack both
    streams themselves and reach the model with equal lengths (the hook does nothing then)."""
    for name, module in model.named_modules():
        if _ltx2_text_attention(name, module):
            module.is_cross_attention = True
    model.register_forward_pre_hook(_audio_text_from_video, with_kwargs=True)
    return model


# ------------------------------------------------------------------------------------------------ registration
LTX2 = register_adapter(Adapter(
    family="ltx2",
    model_class=LTX2VideoTransformer3DModel,
    processors={LTX2AudioVideoAttnProcessor: NAGLTX2AttnProcessor,
                LTX2PerturbedAttnProcessor: NAGLTX2PerturbedAttnProcessor},
    select=_ltx2_text_attention,
    mask_arg="encoder_attention_mask",
    negative_keys=(AUDIO_TEXT, AUDIO_MASK),
    prepare=_prepare,
    preset="ltx2",
    official=False,  # no official NAG code for LTX-2
    notes="LTX-2/2.3 (denoiser only): NAG on both text cross-attentions, attn2 (video) and audio_attn2 (audio), "
          "each with the negative's own text; pre-gate in LTX-2.3; pipelines not supported yet (connectors)",
    # No official LTX-2 values: Wan's (official NAG Wan pipeline: scale 9, tau 2.5, alpha 0.25), by analogy with the
    # other video DiT with text cross-attention.
    presets={"ltx2": NAGConfig(scale=9.0, tau=2.5, alpha=0.25)},
    bench_inputs=ltx2_bench_inputs,
    bench_model=ltx2_bench_model,
))
