"""LTX-Video 0.9.x ``LTXVideoTransformer3DModel``: NAG on the T5 text cross-attention ``attn2`` (with its mask).

Pattern A, like PixArt/Sana: the negative's T5 tokens ride after the prompt's in ``encoder_hidden_states`` (the only
text preprocessing, ``caption_projection``, is per token; the text has no RoPE) and its ``(B, L)`` padding mask after
the prompt's in ``encoder_attention_mask``, which the model turns into an additive ``(1 − m)·−10000`` bias over the
packed keys. The NAG processor splits keys, values and bias again (:func:`nagkit.kernels.nag_cross_attention`).
Padding of the negative is dropped before packing (exact: masked keys get weight ``exp(−10000)``, 0 in fp32/bf16).

Pipelines (``LTXPipeline``, ``LTXImageToVideoPipeline``, ``LTXConditionPipeline``) batch CFG as ``[uncond, cond]`` in
one call inside ``cache_context("cond_uncond")``: the conditional half is guided, the unconditional rows stay plain.
Image/video conditioning enters as clean latent tokens with per-token timesteps ``(B, N)`` (0 on conditioned tokens):
nothing of it is negated (NAG only touches the text attention); the ``start``/``end`` window reads the max timestep.

The family's file: the NAG processor and the adapter; the pipelines and preset (``ltx-video``); the meta inputs of
``nagkit bench``; the tiny pipeline ``tiny-ltx``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import LTXVideoTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, apply_rotary_emb

from ..core.config import NAGConfig
from ..kernels.cross import nag_cross_attention
from .base import Adapter, NAGProcessor, PipelineSpec, TinyModel, register_adapter

if TYPE_CHECKING:
    from diffusers import LTXPipeline

    from ..bench.families import FamilySpec, Inputs


class NAGLTXVideoAttnProcessor(NAGProcessor):
    """``LTXVideoAttnProcessor`` with NAG on the text cross-attention output (before ``to_out``)."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        packing = self.packing
        if packing is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        cfg = self.state.config
        backend, parallel = self._attention_backend, self._parallel_config

        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(encoder_hidden_states))
        value = attn.to_v(encoder_hidden_states)
        if image_rotary_emb is not None:  # never for attn2 (the model passes None); kept as the original
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        def attend(q, k, v, mask):  # noqa: ANN001, ANN202
            out = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, backend=backend,
                                        parallel_config=parallel)
            return out.flatten(2, 3).to(q.dtype)

        hidden_states = nag_cross_attention(attend, query, key, value, attention_mask, packing,
                                            cfg.scale, cfg.tau, cfg.alpha, cfg.norm, seq_dim=1)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def _ltx_text_attention(name: str, module: torch.nn.Module) -> bool:
    return name.endswith("attn2")


# ------------------------------------------------------------------------------------------------ nagkit bench
def ltx_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one LTX-Video call: packed latent tokens ``(B, F·H·W, C)`` (patch 1), the T5 text and its mask."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    f = g.latent_frames or 1
    kwargs: dict[str, Any] = {"hidden_states": c.meta(batch, f * h * w, g.latent_channels), "timestep": c.timestep,
                              "encoder_hidden_states": c.text, "num_frames": f, "height": h, "width": w,
                              "rope_interpolation_scale": (g.vae_scale_t or 1, g.vae_scale, g.vae_scale)}
    negative = c.negative
    kwargs["encoder_attention_mask"] = c.meta(batch, g.text_tokens, dtype=torch.long)
    negative["encoder_attention_mask"] = c.meta(g.batch, g.negative_length, dtype=torch.long)
    return Inputs(kwargs=kwargs, mask_arg="encoder_attention_mask", negative=negative)


def ltx_bench_model(model: LTXVideoTransformer3DModel) -> LTXVideoTransformer3DModel:
    """Mark the meta model's ``attn2`` modules as text cross-attention (``is_cross_attention``, which diffusers'
    ``LTXAttention`` lacks) so that ``nagkit bench`` finds them for its official-way count and analytic minimum. An
    attribute on that meta instance only; nothing is computed differently."""
    for name, module in model.named_modules():
        if _ltx_text_attention(name, module):
            module.is_cross_attention = True
    return model


# ------------------------------------------------------------------------------------------------ tiny pipelines
# Test fixtures (``nagkit.tiny``): seeded random weights, in-memory tokenizers, nothing downloaded. Their diffusers and
# transformers imports stay inside the builders, so importing nagkit does not load the pipelines.


def tiny_ltx_transformer(seed: int = 0, text_dim: int = 16) -> LTXVideoTransformer3DModel:
    """1-block LTX-Video transformer (2 heads x 8, latent channels 8, patch 1)."""
    torch.manual_seed(seed)
    return LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=1, caption_channels=text_dim,
    ).eval()


def tiny_ltx_pipeline(seed: int = 0) -> LTXPipeline:
    """Build a tiny random LTX-Video text-to-video pipeline.

    Transformer: 1 block, 2 heads x 8 (``attn2`` attends to the T5 text with its padding mask); T5 encoder (1 layer,
    d_model 16); ``AutoencoderKLLTXVideo`` with 8 latent channels (spatial factor 4, temporal factor 4, as in
    diffusers' own LTX tests); flow-match Euler scheduler. Use a small ``max_sequence_length`` (e.g. 16).

    Args:
        seed: Seed for all random weights.

    Returns:
        An ``LTXPipeline`` on CPU in float32.
    """
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline
    from transformers import T5Config, T5EncoderModel

    from ..tiny.pipelines import _finish, tiny_t5_tokenizer

    tokenizer = tiny_t5_tokenizer(model_max_length=128)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    transformer = tiny_ltx_transformer(seed, text_dim=text_encoder.config.d_model)
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False,
    ).eval()
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                       tokenizer=tokenizer, transformer=transformer)
    return _finish(pipe)


# ------------------------------------------------------------------------------------------------ registration
_LTX = PipelineSpec(denoisers=("transformer",), mask_index=1, count_arg="num_videos_per_prompt", preset="ltx-video",
                    embeds_args={"embeds": "negative_prompt_embeds", "mask": "negative_prompt_attention_mask"})

LTX_VIDEO = register_adapter(Adapter(
    drop_padding=True,
    family="ltx-video",
    model_class=LTXVideoTransformer3DModel,
    processors={LTXVideoAttnProcessor: NAGLTXVideoAttnProcessor},
    select=_ltx_text_attention,
    mask_arg="encoder_attention_mask",
    preset="ltx-video",
    official=False,  # no official NAG code for LTX-Video
    notes="LTX-Video 0.9.x: NAG on the T5 cross-attention attn2 (masked); image/video conditioning not negated",
    pipelines={"LTXPipeline": _LTX, "LTXImageToVideoPipeline": _LTX, "LTXConditionPipeline": _LTX},
    # No official LTX values: Wan's (official NAG Wan pipeline: scale 9, tau 2.5, alpha 0.25), chosen by analogy
    # with the other video DiT with T5 cross-attention.
    presets={"ltx-video": NAGConfig(scale=9.0, tau=2.5, alpha=0.25)},
    tiny={
        "tiny-ltx": TinyModel(tiny_ltx_pipeline, {"height": 32, "width": 32, "num_frames": 9,
                                                  "max_sequence_length": 16}),
    },
    bench_inputs=ltx_bench_inputs,
    bench_model=ltx_bench_model,
))
