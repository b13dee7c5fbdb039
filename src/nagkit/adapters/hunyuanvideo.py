"""HunyuanVideo ``HunyuanVideoTransformer3DModel``: joint attention (image-first ``[I | Tp | Tn]``) with NAG on the
video tokens, the negative text as its own stream.

Layout (diffusers 0.42.1 ``transformer_hunyuan_video.py``): 20 dual-stream blocks (``transformer_blocks.*.attn``,
added text projections) and 40 single-stream blocks (``single_transformer_blocks.*.attn``, the text concatenated
inside the processor), all with ``HunyuanVideoAttnProcessor2_0``; RoPE on the video tokens only. Three things make
plain ``[prompt | negative]`` packing leak, and each is handled here:

* **Token refiner** (``context_embedder``, ``HunyuanVideoTokenRefiner``): a mask-weighted mean over the text tokens
  (into the refiner's own modulation) and self-attention among the text tokens. A block hook runs the refiner once per
  segment on guided calls: the prompt with its mask, the negative with its own mask, then concatenates. Each segment is
  refined exactly as if it were the model's only text (its own mean, its own "key 0 always valid" rule).
* **Mask turned into a length**: the model masks keys beyond ``I + sum(mask)``, which is right only for one
  right-padded text. The NAG processor ignores the model-built mask on guided calls and builds the key mask itself,
  per segment with the model's own rule (token ``j`` of a segment is a key iff ``j < sum(segment mask)``).
* **Pooled-text modulation** (``temb = t + guidance + CLIP pooled``): the negative text stream is modulated with the
  prompt's ``temb`` (the SD3 official NAG precedent: its NAG row reuses the positive pooled embedding), so the blocks
  run unchanged. The negative's own CLIP pooled embedding is not used.

Image-to-video: ``HunyuanVideoImageToVideoPipeline`` (``image_condition_type="token_replace"``: the first latent
frame is the clean image, modulated with its own ``t = 0`` embedding) and ``HunyuanSkyreelsImageToVideoPipeline``
(``latent_concat``, 33 input channels): the image conditioning is part of the video stream (image side) and is never
negated; NAG only changes what the video queries read from the text. The I2V pipeline's Llava encoder sees the
condition image with the prompt; the NAG negative is encoded through the same ``encode_prompt`` with the call's own
arguments, so with the same (real) image: the negative differs from the prompt in its text only (the pipeline's CFG
negative uses a black image instead; CFG is unchanged by NAG).

CFG: the pipelines call the transformer twice per step; ``HunyuanVideoPipeline`` names them ``cond``/``uncond``
(``uncond`` never guided), the I2V pipelines do not name them (the unconditional call is recognised by its text).

FramePack (``HunyuanVideoFramepackTransformer3DModel``: SigLIP image tokens prepended to the refined text, clean
history latents, a batch-1 crop of the text) is its own family, :mod:`nagkit.adapters.hunyuanvideo_framepack`, which
reuses this module's NAG processor and refiner hook.

The family's file: the NAG processor, the refiner hook and the adapter; pipelines and preset (``hunyuanvideo``); the
meta inputs of ``nagkit bench``; the tiny pipelines ``tiny-hunyuanvideo``, ``tiny-hunyuanvideo-i2v`` and
``tiny-hunyuanvideo-skyreels`` (the I2V ones need ``image=``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoAttnProcessor2_0,
    HunyuanVideoTokenRefiner,
)

from ..core.config import NAGConfig
from ..kernels.joint import nag_joint_attention
from .base import Adapter, NAGProcessor, PipelineSpec, TinyModel, register_adapter

if TYPE_CHECKING:
    from diffusers import HunyuanVideoPipeline

    from ..bench.families import FamilySpec, Inputs

#: ``state.extras`` key: the packed text's key mask ``(B, Lp + Ln)`` (bool), per segment by the model's length rule.
TEXT_KEYS = "hunyuanvideo_text_keys"


def _segment_keys(mask: torch.Tensor) -> torch.Tensor:
    """The model's rule for one text segment: its first ``sum(mask)`` tokens are keys (``(B, L)`` bool)."""
    length = mask.sum(dim=1, dtype=torch.int)
    return torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) < length.unsqueeze(1)


class NAGHunyuanVideoAttnProcessor2_0(NAGProcessor):
    """``HunyuanVideoAttnProcessor2_0`` with NAG on the video tokens and the negative text as a separate stream
    (dual-stream blocks: added text projections; single-stream blocks: text concatenated here, as the original)."""

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
        from diffusers.models.embeddings import apply_rotary_emb

        cfg = self.state.config
        image_len, text_len = hidden_states.shape[1], encoder_hidden_states.shape[1]
        single = attn.add_q_proj is None
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1) if single else hidden_states

        query = attn.to_q(x).unflatten(2, (attn.heads, -1))
        key = attn.to_k(x).unflatten(2, (attn.heads, -1))
        value = attn.to_v(x).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # video tokens only
            if single:
                query = torch.cat([apply_rotary_emb(query[:, :image_len], image_rotary_emb, sequence_dim=1),
                                   query[:, image_len:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :image_len], image_rotary_emb, sequence_dim=1),
                                 key[:, image_len:]], dim=1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if not single:
            text_q = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            text_k = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            text_v = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query = torch.cat([query, text_q], dim=1)
            key = torch.cat([key, text_k], dim=1)
            value = torch.cat([value, text_v], dim=1)

        # key mask over [I | Tp | Tn]: every video token, and per text segment the model's length rule (the
        # model-built ``attention_mask`` counts the packed text as one segment, so it is not used)
        text_keys = self.state.extras.get(TEXT_KEYS)
        bias = None
        if text_keys is not None:
            ones = text_keys.new_ones(text_keys.shape[0], image_len)
            bias = torch.cat([ones, text_keys.to(hidden_states.device)], dim=1)[:, None, None, :]
        out = nag_joint_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), packing,
                                  text_first=False, scale=cfg.scale, tau=cfg.tau, alpha=cfg.alpha, norm=cfg.norm,
                                  bias=bias, backend=self._attention_backend)
        hidden_states, encoder_hidden_states = out[:, :image_len], out[:, image_len:image_len + text_len]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def _joint_attention(name: str, module: torch.nn.Module) -> bool:
    """The main blocks' joint attentions (not the token refiner's text-only self-attention)."""
    return name.endswith(".attn") and name.split(".")[0] in ("transformer_blocks", "single_transformer_blocks")


def _prepare(model: torch.nn.Module, access: Any, args: tuple, kwargs: dict, extras: dict, packing: Any,
             state: Any) -> tuple[tuple, dict]:
    """Keep the packed text's per-segment key mask for the processors (the packed mask is ``[mask_p | mask_n]``)."""
    mask = access.get("encoder_attention_mask", args, kwargs)
    if mask is not None:
        lp = packing.lp
        state.extras[TEXT_KEYS] = torch.cat([_segment_keys(mask[:, :lp]), _segment_keys(mask[:, lp:])], dim=1)
    return args, kwargs


def _refiner_forward(block: torch.nn.Module, state: Any, original_forward: Any, hidden_states: torch.Tensor,
                     timestep: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The token refiner once per text segment on a guided call: its masked mean and self-attention stay inside the
    prompt's tokens and inside the negative's tokens."""
    lp = state.packing.lp
    if attention_mask is None:
        return torch.cat([original_forward(hidden_states[:, :lp], timestep),
                          original_forward(hidden_states[:, lp:], timestep)], dim=1)
    return torch.cat([original_forward(hidden_states[:, :lp], timestep, attention_mask[:, :lp]),
                      original_forward(hidden_states[:, lp:], timestep, attention_mask[:, lp:])], dim=1)


# ------------------------------------------------------------------------------------------------ nagkit bench
def hunyuanvideo_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one HunyuanVideo call: latents ``(B, C, F, H, W)``, Llama text with its mask, CLIP pooled,
    embedded guidance."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    kwargs: dict[str, Any] = {
        "hidden_states": c.meta(batch, g.latent_channels, g.latent_frames or 1, h, w), "timestep": c.timestep,
        "encoder_hidden_states": c.text, "encoder_attention_mask": c.meta(batch, g.text_tokens, dtype=torch.long),
        "pooled_projections": c.meta(batch, g.pooled_dim or 768), "guidance": c.meta(batch)}
    negative = dict(c.negative)
    negative["encoder_attention_mask"] = c.meta(g.batch, g.negative_length, dtype=torch.long)
    return Inputs(kwargs=kwargs, mask_arg="encoder_attention_mask", negative=negative)


def hunyuanvideo_text_flops(model: torch.nn.Module, spec: FamilySpec) -> int:
    """The analytic minimum's pre-block text work on the negative's tokens: the token refiner (``proj_in``, masked
    mean, refiner blocks with self-attention among the negative's own tokens), counted on meta tensors."""
    from ..bench.flops import count_flops

    g = spec.geometry
    dtype = model.context_embedder.proj_in.weight.dtype
    text = torch.empty(g.batch, g.negative_length, g.text_dim, device="meta", dtype=dtype)
    mask = torch.empty(g.batch, g.negative_length, device="meta", dtype=torch.long)
    t = torch.empty(g.batch, device="meta", dtype=torch.float32)
    return count_flops(lambda: model.context_embedder(text, t, mask))


# ------------------------------------------------------------------------------------------------ tiny pipelines
# Test fixtures (``nagkit.tiny``): seeded random weights, in-memory tokenizers, nothing downloaded. Their diffusers and
# transformers imports stay inside the builders, so importing nagkit does not load the pipelines.
#: The tiny pipelines' prompt template: HunyuanVideo's default template is ~250 tiny-tokenizer tokens with a crop of
#: 95 (sized for the real Llama tokenizer), which would crop into the prompt; this one crops exactly its prefix.
TINY_PROMPT_TEMPLATE = {"template": "Describe the video: {}", "crop_start": 8}
TINY_TEXT_DIM = 16


def tiny_hunyuanvideo_transformer(seed: int = 0, in_channels: int = 4, image_condition_type: str | None = None,
                                  guidance_embeds: bool = True, num_layers: int = 1, num_single_layers: int = 1
                                  ) -> HunyuanVideoTransformer3DModel:
    """A tiny ``HunyuanVideoTransformer3DModel``: 2 heads x 8 (RoPE axes 2, 2, 4), ``num_layers`` dual +
    ``num_single_layers`` single blocks, a 1-layer token refiner, patch 1, text width 16, pooled 8."""
    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=in_channels, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=num_layers,
        num_single_layers=num_single_layers, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=guidance_embeds, text_embed_dim=TINY_TEXT_DIM, pooled_projection_dim=8,
        rope_theta=256.0, rope_axes_dim=(2, 2, 4), image_condition_type=image_condition_type,
    ).eval()


def _tiny_pipeline(seed: int, pipeline_class: type, in_channels: int, image_condition_type: str | None = None,
                   **components: Any) -> Any:
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, LlamaConfig, LlamaModel

    from ..tiny.pipelines import _clip_text_config, _finish, tiny_clip_tokenizer, tiny_gemma_tokenizer

    tokenizer = tiny_gemma_tokenizer(model_max_length=512)
    torch.manual_seed(seed)
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_TEXT_DIM, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    tokenizer_2 = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModel(_clip_text_config(tokenizer_2, hidden_size=8)).eval()
    transformer = tiny_hunyuanvideo_transformer(seed, in_channels=in_channels,
                                                image_condition_type=image_condition_type)
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, act_fn="silu", norm_num_groups=4,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    pipe = pipeline_class(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                          scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, **components)
    return _finish(pipe)


def tiny_hunyuanvideo_pipeline(seed: int = 0) -> HunyuanVideoPipeline:
    """Build a tiny random ``HunyuanVideoPipeline``.

    Transformer: :func:`tiny_hunyuanvideo_transformer` (1 dual + 1 single block, 1 refiner layer, guidance embedding).
    Text: a 3-layer ``LlamaModel`` (hidden 16; the pipeline reads its third-last hidden state) with a BPE tokenizer
    built in memory, and a 2-layer ``CLIPTextModel`` (hidden 8, pooled). VAE: ``AutoencoderKLHunyuanVideo`` (factor 8
    spatial, 4 temporal, 4 latent channels). Use ``prompt_template=TINY_PROMPT_TEMPLATE`` (in the call kwargs).

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``HunyuanVideoPipeline`` on CPU in float32.
    """
    from diffusers import HunyuanVideoPipeline

    return _tiny_pipeline(seed, HunyuanVideoPipeline, in_channels=4)


def tiny_hunyuan_skyreels_pipeline(seed: int = 0) -> Any:
    """Build a tiny random ``HunyuanSkyreelsImageToVideoPipeline``: as :func:`tiny_hunyuanvideo_pipeline` with a
    transformer of ``2 x 4`` input channels (the pipeline concatenates the noisy latents with the image latents)."""
    from diffusers import HunyuanSkyreelsImageToVideoPipeline

    return _tiny_pipeline(seed, HunyuanSkyreelsImageToVideoPipeline, in_channels=8)


#: The tiny I2V pipeline's Llava template: the real template's layout (system with ``<image>``, user, assistant
#: headers) in a few tokens; its image takes 4 tokens (a 28 px CLIP vision tower of 14 px patches).
TINY_I2V_PROMPT_TEMPLATE = {
    "template": "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe:<|eot_id|><|start_header_id|>user"
                "<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "crop_start": 20, "image_emb_start": 9, "image_emb_end": 13, "image_emb_len": 4}


def tiny_hunyuanvideo_i2v_pipeline(seed: int = 0) -> Any:
    """Build a tiny random ``HunyuanVideoImageToVideoPipeline``.

    As :func:`tiny_hunyuanvideo_pipeline`, with a ``token_replace`` transformer and a ``LlavaForConditionalGeneration``
    text encoder (the 3-layer Llama of hidden 16 and a 2-layer CLIP vision tower of hidden 8, 28 px images in 14 px
    patches: 4 image tokens) whose tokenizer has the Llama-3 header tokens and ``<image>``; a ``CLIPImageProcessor``
    at 28 px. Use ``prompt_template=TINY_I2V_PROMPT_TEMPLATE`` and ``image=`` in the call.
    """
    from diffusers import HunyuanVideoImageToVideoPipeline
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from ..tiny.pipelines import tiny_gemma_tokenizer

    pipe = _tiny_pipeline(seed, HunyuanVideoImageToVideoPipeline, in_channels=4, image_condition_type="token_replace",
                          image_processor=CLIPImageProcessor(size={"shortest_edge": 28},
                                                             crop_size={"height": 28, "width": 28}))
    tokenizer = tiny_gemma_tokenizer(model_max_length=512)
    tokenizer.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>"], special_tokens=True)
    torch.manual_seed(seed)
    text_encoder = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=28, patch_size=14, projection_dim=8),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=TINY_TEXT_DIM, intermediate_size=32,
                                num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                                max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
        projector_hidden_act="gelu")).eval()
    pipe.register_modules(text_encoder=text_encoder, tokenizer=tokenizer)
    return pipe


# ------------------------------------------------------------------------------------------------ registration
_SPEC = {"denoisers": ("transformer",), "mask_index": 2, "count_arg": "num_videos_per_prompt",
         "encoders": ("text_encoder", "text_encoder_2"), "preset": "hunyuanvideo", "size_multiple": 2,
         "embeds_args": {"embeds": "negative_prompt_embeds", "mask": "negative_prompt_attention_mask"}}
_TINY_CALL = {"height": 32, "width": 32, "num_frames": 5, "max_sequence_length": 16,
              "prompt_template": TINY_PROMPT_TEMPLATE}

HUNYUANVIDEO = register_adapter(Adapter(
    family="hunyuanvideo",
    model_class=HunyuanVideoTransformer3DModel,
    processors={HunyuanVideoAttnProcessor2_0: NAGHunyuanVideoAttnProcessor2_0},
    select=_joint_attention,
    mask_arg="encoder_attention_mask",
    prepare=_prepare,
    block_forwards={HunyuanVideoTokenRefiner: _refiner_forward},
    preset="hunyuanvideo",
    official=False,  # no official NAG implementation for HunyuanVideo
    separate_cfg=True,
    # masked keys get no weight and the refiner runs per segment: trimming the columns padded in every row is exact
    # for right-padded masks (what all three pipelines produce: the Llama tokenizer pads right)
    drop_padding=True,
    notes="HunyuanVideo (T2V, I2V, SkyReels I2V): NAG on the video tokens of all 20 dual + 40 single joint "
          "attentions; negative text refined on its own (token refiner per segment), its own key mask, prompt's "
          "temb; video->video attention computed once (LSE merge)",
    pipelines={
        "HunyuanVideoPipeline": PipelineSpec(**_SPEC),
        "HunyuanVideoImageToVideoPipeline": PipelineSpec(**_SPEC, requires_image=True),
        "HunyuanSkyreelsImageToVideoPipeline": PipelineSpec(**_SPEC, requires_image=True),
    },
    # No official HunyuanVideo NAG values exist. HunyuanVideo is a FLUX-style double/single-stream joint-attention
    # MM-DiT with a guidance-distilled embedding (like FLUX.1-dev), so the FLUX values are chosen by analogy with
    # FLUX (scale 5, tau 2.5, alpha 0.25) rather than Wan's (a cross-attention model).
    presets={"hunyuanvideo": NAGConfig(scale=5.0, tau=2.5, alpha=0.25)},
    tiny={
        "tiny-hunyuanvideo": TinyModel(tiny_hunyuanvideo_pipeline, dict(_TINY_CALL)),
        # needs ``image=`` (the condition image), like tiny-wan-i2v
        "tiny-hunyuanvideo-skyreels": TinyModel(tiny_hunyuan_skyreels_pipeline, dict(_TINY_CALL)),
        "tiny-hunyuanvideo-i2v": TinyModel(tiny_hunyuanvideo_i2v_pipeline,
                                           dict(_TINY_CALL, prompt_template=TINY_I2V_PROMPT_TEMPLATE)),
    },
    bench_inputs=hunyuanvideo_bench_inputs,
    bench_text_flops=hunyuanvideo_text_flops,
))
