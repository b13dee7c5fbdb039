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

Pipelines (``LTX2Pipeline``, ``LTX2ImageToVideoPipeline``, ``LTX2ConditionPipeline``, ``LTX2InContextPipeline``,
``LTX2HDRPipeline``: one ``encode_prompt``, the same denoiser calls): the pipelines post-process
``encode_prompt``'s Gemma features outside it: ``pipe.connectors`` (masked-mean norm, learnable registers over the
padding, a 1-D RoPE transformer per stream) turn them into the video text, the audio text and one mask for both. The NAG
negative takes the same step (``PipelineSpec.post_encode`` = :func:`connect_negative`): ``encode_prompt`` on the
negatives with the call's settings, then ``pipe.connectors(...)`` with the pipeline's padding side, so it reaches the
denoiser as video text + audio text + their mask, exactly like the CFG negative (connectors work per sample, so running
them on the negative alone is exact). A negative given in the pipeline's embedding form (``negative_prompt_embeds`` of
``apply`` or of the call) goes through the connectors too; one given under the denoiser's names (``negative={...}``
with the audio text) is used as it is.

Denoiser calls per step (each in a named ``cache_context``):

* ``cond_uncond``: one batched ``[uncond, cond]`` call; NAG guides the conditional rows only, the unconditional rows
  are bit-identical to the plain model.
* ``uncond_stg`` (positive text, STG-perturbed self-attention in the chosen blocks) and ``uncond_modality`` (positive
  text, audio↔video attention off): guided too, with the same negative and settings (families-notes §1.7). The pipeline
  adds ``stg_scale·(cond − stg)`` and ``(modality_scale − 1)·(cond − modality)`` to the CFG result; with ``cond``
  guided and these passes plain, each delta would also carry the NAG change Δ, which would then enter the result with
  weight ``guidance_scale + stg_scale + modality_scale − 1`` instead of ``guidance_scale`` (as in every CFG pipeline).
  Guided, each delta measures only its perturbation, as without NAG.

Image, video and reference-video conditioning (I2V, Condition, IC-LoRA, HDR) enter as video tokens (clean or with
their own timesteps): nothing of it is negated. ``LTX2HDRPipeline(connector_video_embeds=...)`` skips ``encode_prompt``,
so no NAG negative exists for that call: nagkit raises (``RuntimeError``) instead of guiding with a stale one.

Refused (not in ``PIPELINES``, ``nagkit.apply`` names the supported ones): ``LTX2DFRPipeline`` and
``LTX2DFRTemporalRefinePipeline`` (distilled, no CFG, no negative in their ``encode_prompt``, tiled denoiser calls
outside any ``cache_context``; not tested), ``LTX2LatentUpsamplePipeline`` and ``LTX2VideoDiffusionDecodePipeline``
(no text-conditioned denoising).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import LTX2VideoTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoAttnProcessor, LTX2PerturbedAttnProcessor

from ..core.config import NAGConfig
from ..core.state import Negative, Packing
from ..kernels.cross import nag_cross_attention
from .base import Adapter, NAGProcessor, PipelineSpec, TinyModel, register_adapter

if TYPE_CHECKING:
    from diffusers import LTX2Pipeline

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


# ------------------------------------------------------------------------------------------------ pipelines
def connect_negative(pipe: Any, negative: Negative) -> Negative:
    """``PipelineSpec.post_encode`` of the LTX-2 pipelines: the NAG negative through ``pipe.connectors``, as the
    pipeline does with its prompt and CFG negative right after ``encode_prompt``.

    Args:
        pipe: the pipeline (its ``connectors``, and the padding side its tokenizer used).
        negative: the negative as ``encode_prompt`` returns it (Gemma features ``(R, L, C·layers)`` and their
            ``(R, L)`` mask), or given in that embedding form; or already under the denoiser's names (its extras hold
            the audio text), then returned as it is.

    Returns:
        The negative the denoiser receives: video text (``embeds``), the connectors' mask (``mask``), the audio text
        and the same mask (``extras``). ``positive`` is None: the denoiser never sees the Gemma features, so they
        cannot tell its rows apart; every LTX-2 call is named (``cond_uncond`` is ``[uncond, cond]``).
    """
    if AUDIO_TEXT in negative.extras:
        return negative
    connectors = getattr(pipe, "connectors", None)
    if connectors is None:
        raise ValueError(f"{type(pipe).__name__} has no connectors: NAG needs them to turn the negative's text "
                         "features into the denoiser's video and audio text (or give negative={...} under the "
                         "denoiser's argument names)")
    embeds, mask = negative.embeds, negative.mask
    width = connectors.config.caption_channels * connectors.config.text_proj_in_factor
    if embeds.shape[-1] != width:
        raise ValueError(f"the negative's text features have {embeds.shape[-1]} channels; {type(pipe).__name__}'s "
                         f"connectors take encode_prompt's output ({width} = caption_channels x text_proj_in_factor)")
    if negative.positive is not None:  # the prompt's features: the device and dtype the connectors get from the call
        embeds = embeds.to(device=negative.positive.device, dtype=negative.positive.dtype)
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    side = getattr(pipe, "tokenizer_padding_side", None) or getattr(getattr(pipe, "tokenizer", None), "padding_side",
                                                                      None) or "left"
    with torch.no_grad():
        video, audio, connected = connectors(embeds, mask.to(embeds.device), padding_side=side)
    return Negative(embeds=video, mask=connected, extras={AUDIO_TEXT: audio, AUDIO_MASK: connected})


# ------------------------------------------------------------------------------------------------ tiny pipeline
# Test fixture (``nagkit.tiny``): seeded random weights, an in-memory tokenizer, nothing downloaded; the diffusers and
# transformers imports stay inside the builder.
#: Small call of ``tiny-ltx2``: 32x32, 5 frames (2 latent frames of 8x8 tokens; 5 audio tokens at the default 24 fps),
#: text padded to 16, STG on block 0 (the pipeline's default block 28 does not exist in the 2-block model).
TINY_CALL = {"height": 32, "width": 32, "num_frames": 5, "max_sequence_length": 16,
             "spatio_temporal_guidance_blocks": [0]}


def tiny_gemma3_encoder(seed: int = 0) -> tuple[Any, Any]:
    """A tiny ``Gemma3ForConditionalGeneration`` (text: 2 layers, hidden 16; a 1-layer SigLIP vision tower that
    text-only calls never run; eager attention; seeded) and the tiny Gemma tokenizer."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from ..tiny.pipelines import tiny_gemma_tokenizer

    tokenizer = tiny_gemma_tokenizer()
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
                sliding_window=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    encoder = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                                          attn_implementation="eager"))
    return tokenizer, encoder.eval()


def tiny_ltx2_connectors(seed: int = 0, registers: int | None = 8) -> Any:
    """``LTX2TextConnectors`` (LTX-2.0 layout) for the tiny Gemma3: 3 stacked hidden states of 16 channels in, one
    1-layer connector (2 heads x 8) per stream with ``registers`` learnable registers (None: padding stays masked)."""
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    torch.manual_seed(seed)
    return LTX2TextConnectors(
        caption_channels=16, text_proj_in_factor=3, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=registers, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=registers, connector_rope_base_seq_len=32,
    ).eval()


def tiny_ltx2_pipeline(seed: int = 0) -> LTX2Pipeline:
    """Build a tiny random LTX-2 text-to-video+audio pipeline.

    Text: tiny Gemma3 (2 layers, hidden 16; the pipeline stacks its 3 hidden states) and LTX-2.0 connectors (8
    learnable registers, as the published model fills its padding); transformer: 2 blocks, video 2 heads x 8 (latent
    channels 8), audio 2 heads x 8 (4 packed audio channels), STG-capable (``perturbed_attn``);
    ``AutoencoderKLLTX2Video`` (8 latent channels, spatial and temporal factor 4); ``AutoencoderKLLTX2Audio`` (2 latent
    channels, 8 mel bins) and an ``LTX2Vocoder``; flow-match Euler scheduler. Use :data:`TINY_CALL`.

    Args:
        seed: Seed for all random weights.

    Returns:
        An ``LTX2Pipeline`` on CPU in float32.
    """
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
    )
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    from ..tiny.pipelines import _finish

    tokenizer, text_encoder = tiny_gemma3_encoder(seed)
    connectors = tiny_ltx2_connectors(seed)
    torch.manual_seed(seed)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2, caption_channels=16,
        perturbed_attn=True,
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8),
        down_block_types=("LTX2VideoDownBlock3D",) * 2, decoder_block_out_channels=(8, 8),
        layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, True),
        decoder_spatio_temporal_scaling=(True, True), decoder_inject_noise=(False, False, False),
        downsample_type=("spatiotemporal", "spatiotemporal"), upsample_type=("spatiotemporal", "spatiotemporal"),
        upsample_residual=(False, False), upsample_factor=(1, 1), timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ).eval()
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    torch.manual_seed(seed)
    audio_vae = AutoencoderKLLTX2Audio(base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1,
                                       in_channels=2, resolution=32, latent_channels=2, mel_bins=8).eval()
    torch.manual_seed(seed)
    vocoder = LTX2Vocoder(in_channels=16, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4],
                          upsample_factors=[2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
                          output_sampling_rate=16000).eval()
    pipe = LTX2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, connectors=connectors,
                        transformer=transformer, vocoder=vocoder)
    return _finish(pipe)


# ------------------------------------------------------------------------------------------------ registration
# encode_prompt returns (embeds, mask, negative embeds, negative mask) of the Gemma features; connect_negative then
# makes the denoiser's video/audio text. Sizes: patch size 1 (the pipelines themselves require multiples of 32).
_LTX2 = PipelineSpec(denoisers=("transformer",), mask_index=1, count_arg="num_videos_per_prompt", preset="ltx2",
                     embeds_args={"embeds": "negative_prompt_embeds", "mask": "negative_prompt_attention_mask"},
                     post_encode=connect_negative)

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
    notes="LTX-2/2.3: NAG on both text cross-attentions, attn2 (video) and audio_attn2 (audio), each with the "
          "negative's own text (through the pipeline's connectors); pre-gate in LTX-2.3; STG and modality passes "
          "guided too",
    # No official LTX-2 values: Wan's (official NAG Wan pipeline: scale 9, tau 2.5, alpha 0.25), by analogy with the
    # other video DiT with text cross-attention.
    presets={"ltx2": NAGConfig(scale=9.0, tau=2.5, alpha=0.25)},
    pipelines={"LTX2Pipeline": _LTX2, "LTX2ImageToVideoPipeline": _LTX2, "LTX2ConditionPipeline": _LTX2,
               "LTX2InContextPipeline": _LTX2, "LTX2HDRPipeline": _LTX2},
    tiny={"tiny-ltx2": TinyModel(tiny_ltx2_pipeline, dict(TINY_CALL))},
    bench_inputs=ltx2_bench_inputs,
    bench_model=ltx2_bench_model,
))
