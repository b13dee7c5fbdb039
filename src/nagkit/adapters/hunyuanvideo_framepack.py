"""HunyuanVideo FramePack ``HunyuanVideoFramepackTransformer3DModel``: HunyuanVideo's joint attention with NAG on the
image side, the negative text as its own stream; image conditioning and history are never negated.

FramePack (diffusers 0.42.1 ``transformer_hunyuan_video_framepack.py``) is HunyuanVideo's transformer (the same
``HunyuanVideoTransformerBlock`` / ``HunyuanVideoSingleTransformerBlock`` with ``HunyuanVideoAttnProcessor2_0``, the
same token refiner, the same pooled-CLIP modulation) with two conditionings added to the sequence:

* **Clean history latents** (``latents_clean``, ``latents_history_2x``, ``latents_history_4x``), patch-embedded and
  *prepended* to the noisy latents with their own RoPE frames: the video stream is ``[4x | 2x | clean | noisy]``
  (only the noisy part is predicted).
* **SigLIP image tokens** (``image_embeds``, projected by ``image_projection``), *prepended to the refined text*: the
  context stream is ``[S | T]`` with the key mask ``[ones | text mask]``. The model then turns that mask into a
  length (keys beyond ``I + S + sum(mask)`` are masked), and with batch 1 it instead *crops* the context to its first
  ``S + sum(mask)`` tokens.

Layout with NAG (per block, video ``I`` = history + noisy, ``S`` = SigLIP tokens)::

    video stream    [I]                      (one copy, RoPE as the model's)
    context stream  [S | Tp | Tn]            (S and Tp as the model's; Tn the refined negative, after the prompt)

    I and S queries -> Z+ over [I, S, Tp], Z- over [I, S, Tn];  output NAG(Z+, Z-)
    Tp queries      -> [I, S, Tp]            (the prompt's own attention, unchanged)
    Tn queries      -> [I, S, Tn]            (the negative text evolves as if it were the prompt)

So the SigLIP tokens sit on the image side of NAG: both ``Z+`` and ``Z-`` read them (the image conditioning is never
negated; the negative's text segment is the only thing that differs), they are carried once (the prompt's stream: the
negative does not get a second copy), and as queries they are guided like the video tokens — the precedent of
reference-image tokens in FLUX Kontext and of HunyuanVideo I2V's clean first frame, which are image-side tokens. The
history latents are video tokens (queries and keys, guided, never negated). With ``negative == prompt`` ``Z- = Z+``
and the output is the plain model's.

What this module adds to :mod:`nagkit.adapters.hunyuanvideo` (whose NAG processor and per-segment token-refiner
hook it reuses unchanged):

* **Key masks.** The NAG processor builds its own key mask ``[ones(I) | ones(S) | keys(Tp) | keys(Tn)]`` (each text
  segment by the model's length rule) and ignores the model-built one, which counts ``[S | Tp | Tn]`` as one text.
* **The batch-1 crop.** The model crops the context to ``S + sum(packed mask)`` tokens when the batch is 1, which
  would cut the negative's tail whenever the prompt is padded. A guided call therefore drops the prompt columns
  beyond its longest row (``max sum(mask)``; exact: they are never keys, and the refiner never lets a valid token
  see them) and the negative's all-padded columns, so the crop keeps everything. Right-padded masks are required in
  batch 1 (what the pipeline's Llama tokenizer makes); anything else is refused with a ``ValueError``.
* **Modulation.** As HunyuanVideo: the negative text stream uses the prompt's ``temb`` (``t + guidance + pooled
  CLIP of the prompt``), so the blocks run unchanged.

CFG: ``HunyuanVideoFramepackPipeline`` runs ``true_cfg_scale`` as a second, unnamed denoiser call; nagkit recognises
it by its text (not the prompt's) and leaves it plain. The pipeline's ``image_embeds`` and history are the same for
the prompt, the CFG negative and the NAG negative.

The family's file: the plan (packing + crop-safe trimming + key masks), the adapter, the pipeline spec and preset, the
meta inputs of ``nagkit bench`` and the tiny pipeline ``tiny-hunyuanvideo-framepack`` (needs ``image=``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoAttnProcessor2_0,
    HunyuanVideoTokenRefiner,
)

from ..core.config import NAGConfig
from ..core.state import Packing
from .base import Adapter, PipelineSpec, TinyModel, register_adapter
from .hunyuanvideo import (
    _SPEC,
    _TINY_CALL,
    TEXT_KEYS,
    TINY_TEXT_DIM,
    NAGHunyuanVideoAttnProcessor2_0,
    _joint_attention,
    _refiner_forward,
    _segment_keys,
    _tiny_pipeline,
    hunyuanvideo_text_flops,
)

if TYPE_CHECKING:
    from diffusers import HunyuanVideoFramepackPipeline

    from ..bench.families import FamilySpec, Inputs

#: History latent frames of one FramePack call (``clean`` = the start-image frame + 1 history frame, 2 frames at 2x
#: and 16 at 4x down-sampling), fixed by the released checkpoints (``history_sizes`` in the diffusers pipeline).
HISTORY_FRAMES = {"clean": 2, "2x": 2, "4x": 16}


# ------------------------------------------------------------------------------------------------ guided calls
def _plan(module: torch.nn.Module, access: Any, args: tuple, kwargs: dict, negative: Any, state: Any,
          pipeline: str | None, named: bool) -> tuple[tuple, dict, Packing] | None:
    """Pack ``[prompt | negative]`` text and mask as nagkit's default (rows, CFG, the negative's padding dropped),
    then drop the prompt columns past its longest row (so the model's batch-1 crop keeps the negative) and keep the
    key mask ``[ones(S) | keys(Tp) | keys(Tn)]`` of the context stream for the NAG processors."""
    from ..integration.hook import plan_call

    planned = plan_call(_DEFAULT_PACKING, state, access, args, kwargs, module, pipeline, named)
    if planned is None:
        return None
    args, kwargs, packing = planned
    image_embeds = access.get("image_embeds", args, kwargs)
    if image_embeds is None:
        raise ValueError("HunyuanVideoFramepackTransformer3DModel needs image_embeds (the SigLIP image tokens)")
    mask = access.get("encoder_attention_mask", args, kwargs)
    if mask is None:  # the model itself needs the mask; nothing to trim
        return args, kwargs, packing
    text = access.get("encoder_hidden_states", args, kwargs)
    lp = packing.lp
    meta = mask.device.type == "meta"  # no values to read (FLOP counting): nothing is trimmed
    keep = lp if meta else max(1, int(mask[:, :lp].sum(dim=1).max()))  # a host sync, as the model's own crop
    if keep < lp:
        text = torch.cat([text[:, :keep], text[:, lp:]], dim=1)
        mask = torch.cat([mask[:, :keep], mask[:, lp:]], dim=1)
        args, kwargs = access.set("encoder_hidden_states", text, args, kwargs)
        args, kwargs = access.set("encoder_attention_mask", mask, args, kwargs)
        packing = Packing(lp=keep, ln=packing.ln, rows=packing.rows, batch=packing.batch)
    if mask.shape[0] == 1 and not meta and not bool((mask != 0).all()):
        raise ValueError("HunyuanVideoFramepackTransformer3DModel crops a batch-1 call's text to its mask's length, "
                         "which needs right-padded text masks (as the pipeline makes); got a mask with zeros inside")
    image = torch.ones(mask.shape[0], image_embeds.shape[1], dtype=torch.bool, device=mask.device)
    keys = torch.cat([image, _segment_keys(mask[:, :packing.lp]), _segment_keys(mask[:, packing.lp:])], dim=1)
    state.extras[TEXT_KEYS] = keys.to(text.device)  # where the attention runs (the mask may be a CPU tensor)
    return args, kwargs, packing


# ------------------------------------------------------------------------------------------------ nagkit bench
def _history_tokens(h: int, w: int, patch: int = 2) -> int:
    """Video tokens of the clean history at latent size ``h x w`` (patch 2; the 2x and 4x latents are padded to
    their (2, 4, 4) / (4, 8, 8) kernels, as the model's ``HunyuanVideoHistoryPatchEmbed``)."""
    clean = HISTORY_FRAMES["clean"] * (h // patch) * (w // patch)
    two = math.ceil(HISTORY_FRAMES["2x"] / 2) * math.ceil(h / 4) * math.ceil(w / 4)
    four = math.ceil(HISTORY_FRAMES["4x"] / 4) * math.ceil(h / 8) * math.ceil(w / 8)
    return clean + two + four


def framepack_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one FramePack call: the noisy window ``(B, C, F, H, W)`` (``F`` = latent frames of the
    geometry: ``latent_window_size``), the clean / 2x / 4x history latents (2 + 2 + 16 frames), their frame indices
    (the vanilla layout), SigLIP image tokens ``(B, image_tokens, image_dim)``, Llama text with its mask, CLIP pooled,
    embedded guidance.

    The text masks are real CPU tensors (ones): the model reads their values (``sum`` → crop length / key length),
    which meta tensors do not have; :func:`framepack_bench_model` moves the mask to the meta device where the token
    refiner multiplies with it.
    """
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    frames, channels = g.latent_frames or 1, g.latent_channels
    history = HISTORY_FRAMES
    index = torch.arange(1 + history["4x"] + history["2x"] + 1 + frames)  # [start, 4x, 2x, 1x, window]
    kwargs: dict[str, Any] = {
        "hidden_states": c.meta(batch, channels, frames, h, w), "timestep": c.timestep,
        "encoder_hidden_states": c.text, "encoder_attention_mask": torch.ones(batch, g.text_tokens, dtype=torch.long),
        "pooled_projections": c.meta(batch, g.pooled_dim or 768),
        "image_embeds": c.meta(batch, g.image_tokens, g.image_dim), "indices_latents": index[-frames:],
        "guidance": c.meta(batch),
        "latents_clean": c.meta(batch, channels, history["clean"], h, w),
        "indices_latents_clean": torch.cat([index[:1], index[-frames - 1:-frames]]),
        "latents_history_2x": c.meta(batch, channels, history["2x"], h, w),
        "indices_latents_history_2x": index[1 + history["4x"]:1 + history["4x"] + history["2x"]],
        "latents_history_4x": c.meta(batch, channels, history["4x"], h, w),
        "indices_latents_history_4x": index[1:1 + history["4x"]]}
    negative = dict(c.negative)
    negative["encoder_attention_mask"] = torch.ones(g.batch, g.negative_length, dtype=torch.long)
    return Inputs(kwargs=kwargs, mask_arg="encoder_attention_mask", negative=negative)


def framepack_text_flops(model: torch.nn.Module, spec: FamilySpec) -> int:
    """What the analytic minimum of a joint family (``nagkit.bench.flops.joint_minimum``) needs on top of its
    per-token text layers and ``4·C·Ln·(Ln + 2·Li)`` per joint attention, where ``Li`` counts the noisy window's
    tokens only: the negative's token refiner (as HunyuanVideo), and per joint attention the attention of the
    negative's tokens with the other image-side tokens every FramePack call carries, the clean history and the SigLIP
    tokens (``8·C·Ln·(history + S)``: the negative's queries over them and their queries over the negative's keys)."""
    from ..bench.flops import _matches, attention_width

    g = spec.geometry
    h, w = g.latent_hw
    extra = _history_tokens(h, w, g.patch) + g.image_tokens
    total = hunyuanvideo_text_flops(model, spec)
    for name, module in model.named_modules():
        if _matches(name, spec.joint_attention):
            total += g.batch * 8 * attention_width(module) * g.negative_length * extra
    return total


def _mask_to_refiner_device(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if len(args) > 2 and isinstance(args[2], torch.Tensor) and args[2].device != args[0].device:
        args = (*args[:2], args[2].to(args[0].device), *args[3:])
    return args, kwargs


def framepack_bench_model(model: torch.nn.Module) -> torch.nn.Module:
    """The meta model of ``nagkit bench``, made countable: the text mask comes as a CPU tensor (the forward reads its
    values for the crop / key length), so a pre-hook on the token refiner moves it to the meta device there. This
    instance only; no FLOP changes."""
    model.context_embedder.register_forward_pre_hook(_mask_to_refiner_device, with_kwargs=True)
    return model


# ------------------------------------------------------------------------------------------------ tiny pipeline
#: SigLIP width of the tiny pipeline (the transformer's ``image_proj_dim``) and its image size (28 px, 14 px patches:
#: 4 image tokens).
TINY_IMAGE_DIM = 8


def tiny_hunyuanvideo_framepack_transformer(seed: int = 0, num_layers: int = 1, num_single_layers: int = 1
                                            ) -> HunyuanVideoFramepackTransformer3DModel:
    """A tiny ``HunyuanVideoFramepackTransformer3DModel``: 2 heads x 8 (RoPE axes 2, 2, 4), ``num_layers`` dual +
    ``num_single_layers`` single blocks, a 1-layer token refiner, patch 2 (the history embedder's fixed patch), text
    width 16, pooled 8, SigLIP width 8, image projection and history embedder on (as the released checkpoints)."""
    torch.manual_seed(seed)
    return HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=num_layers,
        num_single_layers=num_single_layers, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=TINY_TEXT_DIM, pooled_projection_dim=8,
        rope_theta=256.0, rope_axes_dim=(2, 2, 4), has_image_proj=True, image_proj_dim=TINY_IMAGE_DIM,
        has_clean_x_embedder=True,
    ).eval()


def tiny_hunyuanvideo_framepack_pipeline(seed: int = 0) -> HunyuanVideoFramepackPipeline:
    """Build a tiny random ``HunyuanVideoFramepackPipeline``.

    The HunyuanVideo tiny pipeline's text encoders (3-layer ``LlamaModel`` of hidden 16 with an in-memory BPE
    tokenizer, 2-layer ``CLIPTextModel`` of hidden 8), VAE and scheduler; the transformer
    :func:`tiny_hunyuanvideo_framepack_transformer`; a 1-layer ``SiglipVisionModel`` of hidden 8 (28 px images in
    14 px patches: 4 image tokens) with a 28 px SigLIP image processor (PIL backend). Use
    ``prompt_template=TINY_PROMPT_TEMPLATE``, a small ``latent_window_size`` and ``image=`` in the call (see the tiny
    call kwargs).

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``HunyuanVideoFramepackPipeline`` on CPU in float32.
    """
    from diffusers import HunyuanVideoFramepackPipeline
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip import SiglipImageProcessorPil  # the PIL backend: no torchvision needed

    torch.manual_seed(seed)
    image_encoder = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=TINY_IMAGE_DIM, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28,
        patch_size=14)).eval()
    feature_extractor = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    pipe = _tiny_pipeline(seed, HunyuanVideoFramepackPipeline, in_channels=4, image_encoder=image_encoder,
                          feature_extractor=feature_extractor)
    pipe.register_modules(transformer=tiny_hunyuanvideo_framepack_transformer(seed))
    return pipe


# ------------------------------------------------------------------------------------------------ registration
HUNYUANVIDEO_FRAMEPACK = register_adapter(Adapter(
    family="hunyuanvideo-framepack",
    model_class=HunyuanVideoFramepackTransformer3DModel,
    processors={HunyuanVideoAttnProcessor2_0: NAGHunyuanVideoAttnProcessor2_0},
    select=_joint_attention,
    mask_arg="encoder_attention_mask",
    plan=_plan,
    block_forwards={HunyuanVideoTokenRefiner: _refiner_forward},
    preset="hunyuanvideo-framepack",
    official=False,  # no official NAG implementation for HunyuanVideo / FramePack
    separate_cfg=True,
    # masked keys get no weight and the refiner runs per segment: dropping the negative's all-padded columns is exact
    # for right-padded masks (the Llama tokenizer pads right)
    drop_padding=True,
    notes="HunyuanVideo FramePack (I2V with clean history): NAG on the video + history + SigLIP image tokens of all "
          "20 dual + 40 single joint attentions; negative text refined on its own after [SigLIP | prompt], its own "
          "key mask, prompt's temb; image conditioning never negated; image->image attention computed once",
    pipelines={
        "HunyuanVideoFramepackPipeline": PipelineSpec(**{**_SPEC, "preset": "hunyuanvideo-framepack"},
                                                      requires_image=True),
    },
    # No official NAG values exist for HunyuanVideo or FramePack. FramePack is HunyuanVideo's FLUX-style double/single
    # stream MM-DiT (guidance-distilled embedding, like FLUX.1-dev), so the FLUX values are chosen by analogy with
    # FLUX (scale 5, tau 2.5, alpha 0.25), the same as nagkit's ``hunyuanvideo`` preset.
    presets={"hunyuanvideo-framepack": NAGConfig(scale=5.0, tau=2.5, alpha=0.25)},
    tiny={
        # needs ``image=`` (the start image), like tiny-hunyuanvideo-i2v
        "tiny-hunyuanvideo-framepack": TinyModel(tiny_hunyuanvideo_framepack_pipeline,
                                                 dict(_TINY_CALL, latent_window_size=2)),
    },
    bench_inputs=framepack_bench_inputs,
    bench_text_flops=framepack_text_flops,
    bench_model=framepack_bench_model,
))

#: The same adapter without its plan: nagkit's default ``[prompt | negative]`` packing, which :func:`_plan` runs first.
_DEFAULT_PACKING = dataclasses.replace(HUNYUANVIDEO_FRAMEPACK, plan=None)
