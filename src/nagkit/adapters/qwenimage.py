"""Qwen-Image ``QwenImageTransformer2DModel``: joint attention (text-first ``[Tp | Tn | I]``) in all dual-stream blocks.

Every block (60 in the published model) runs one joint attention over ``[text, image]``
(``QwenDoubleStreamAttnProcessor2_0``) with separate text projections (``add_{q,k,v}_proj``, ``to_add_out``) and a
text MLP. The text is only normalised and projected per token before the blocks (``txt_norm``, ``txt_in``) and the
text modulation comes from the timestep alone, so the negative text is simply packed after the prompt's text and runs
through every block as its own stream (no block hooks): prompt tokens attend to ``[Tp, I]``, negative tokens to
``[Tn, I]``, image queries get ``NAG(Z+, Z-)`` with the image→image attention computed once (log-sum-exp merge).

What is Qwen-specific:

* **Text RoPE.** The text rows of the rotary table are ``max_vid_index + j`` (``QwenEmbedRope``), and the model asks
  ``pos_embed`` for as many rows as its text input has. A hook on ``pos_embed`` (installed like a block hook, a
  pass-through on unguided calls) asks it for ``max(lp, ln)`` rows instead and returns ``[rows[:lp] | rows[:ln]]``:
  the negative's tokens get the positions they would have if the negative were the prompt.
* **Text mask.** ``encoder_hidden_states_mask`` ``(B, L)`` is packed ``[prompt | negative]`` (ones where a side has
  none); the processor turns it into a key mask ``(B, 1, 1, L + I)`` as the original does, which the joint kernel
  applies per key segment. Masked keys get no weight, so the negative's padding tokens are dropped before packing
  (``drop_padding``, exact).
* **Edit pipelines.** The condition image's latents ride in the image stream (``img_shapes`` lists them), so they are
  image tokens for NAG (shared, never duplicated). The NAG negative is encoded by ``encode_prompt`` with the call's
  arguments, the condition ``image`` included, i.e. through the vision-language encoder exactly like the pipeline's
  CFG negative.
* **Other variants.** Edit Inpaint: as Edit (condition latents in the image stream, the negative encoded with the
  condition image). ControlNet / ControlNet Inpaint: the ``QwenImageControlNetModel`` attends to the text too;
  decision as for the SD/FLUX ControlNets (:mod:`nagkit.adapters.unet`): it is left plain, fed the prompt only (the
  pipelines call it once per step with the prompt and reuse its residuals for both CFG calls); its residuals are added
  to the image stream after each block, outside attention, so the guided forward receives them unchanged. Layered:
  the layered model (``use_layer3d_rope``: ``QwenEmbedLayer3DRope``, hooked like ``QwenEmbedRope``;
  ``additional_t_cond``) with the layers and the condition image in the image stream; its ``encode_prompt`` takes no
  image (the vision processor only captions an empty prompt), but the call needs ``image``.
* **CFG.** The pipelines run true CFG (``true_cfg_scale > 1`` with a negative prompt) as separate calls in
  ``cache_context("cond")`` / ``("uncond")``; only the conditional call is guided. They pass the timestep as
  ``t / 1000``.

No official NAG implementation exists for Qwen-Image (an open diffusers pull request adds one to the modular
pipelines), so there is no ``official`` mode. Qwen-Image 2.1 (``QwenImage21Transformer2DModel``, block-causal single
stream) is a different class and is not supported.

The family's file: the NAG processor, the text-RoPE hook and the adapter; the pipelines (``QwenImagePipeline``,
``QwenImageImg2ImgPipeline``, ``QwenImageInpaintPipeline``, ``QwenImageEditPipeline``, ``QwenImageEditPlusPipeline``,
``QwenImageEditInpaintPipeline``, ``QwenImageControlNetPipeline``, ``QwenImageControlNetInpaintPipeline``,
``QwenImageLayeredPipeline``) and preset (``qwen-image``); the meta inputs of ``nagkit bench``; the tiny pipelines
``tiny-qwen-image`` and ``tiny-qwen-image-edit``.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    QwenEmbedLayer3DRope,
    QwenEmbedRope,
    apply_rotary_emb_qwen,
)

from ..core.config import NAGConfig
from ..kernels.joint import nag_joint_attention
from .base import Adapter, NAGProcessor, PipelineSpec, TinyModel, register_adapter

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImagePipeline,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    from ..bench.families import FamilySpec, Inputs


class NAGQwenDoubleStreamAttnProcessor(NAGProcessor):
    """``QwenDoubleStreamAttnProcessor2_0`` with NAG on the image tokens and the negative text as its own stream."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        encoder_hidden_states_mask: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        packing = self.packing
        if packing is None or encoder_hidden_states is None or attention_mask is not None:
            # unguided, or a call the original refuses (it raises its own error)
            return self.inner(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask,
                              image_rotary_emb)
        if self._parallel_config is not None:
            raise NotImplementedError("NAG on Qwen-Image joint attention does not support context parallelism "
                                      "(enable_parallelism): the sequence split would cut the packed negative text")
        cfg = self.state.config
        mask = None
        if encoder_hidden_states_mask is not None:  # the original's key mask over [text, image]
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask.to(torch.bool), image_mask], dim=1)[:, None, None, :]

        head_dim = attn.inner_dim // attn.heads
        img_query = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))
        img_key = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
        img_value = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        txt_query = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_key = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)
        if image_rotary_emb is not None:  # text rows already [prompt | negative] (the pos_embed hook)
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)

        query = torch.cat([txt_query, img_query], dim=1).transpose(1, 2)
        key = torch.cat([txt_key, img_key], dim=1).transpose(1, 2)
        value = torch.cat([txt_value, img_value], dim=1).transpose(1, 2)
        out = nag_joint_attention(query, key, value, packing, text_first=True, scale=cfg.scale, tau=cfg.tau,
                                  alpha=cfg.alpha, norm=cfg.norm, bias=mask, backend=self._attention_backend)
        text_len = encoder_hidden_states.shape[1]
        img_out = attn.to_out[0](out[:, text_len:].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)  # dropout
        return img_out, attn.to_add_out(out[:, :text_len].contiguous())


def _text_rope(rope: torch.nn.Module, state: Any, original: Any, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``pos_embed`` on a guided call: the packed text's rows are ``[rows[:lp] | rows[:ln]]`` (the negative's tokens at
    the positions they would have as the prompt), computed from a table of ``max(lp, ln)`` rows."""
    packing = state.packing
    bound = inspect.signature(original).bind(*args, **kwargs)
    length = bound.arguments.get("max_txt_seq_len")
    lp, ln = packing.lp, packing.ln
    if length is None or int(length) != lp + ln:
        raise RuntimeError(f"{type(rope).__name__} was asked for {length} text rows on a guided call whose packed "
                           f"text has {lp} + {ln} tokens; NAG cannot place the negative's positions")
    bound.arguments["max_txt_seq_len"] = max(lp, ln)
    vid_freqs, txt_freqs = original(*bound.args, **bound.kwargs)
    return vid_freqs, torch.cat([txt_freqs[:lp], txt_freqs[:ln]], dim=0)


def _qwen_attention(name: str, module: torch.nn.Module) -> bool:
    return name.startswith("transformer_blocks.") and name.endswith(".attn")


# ------------------------------------------------------------------------------------------------ nagkit bench
def qwen_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one Qwen-Image call: packed 2x2 latent patches, ``img_shapes``, the text (and its mask when
    the geometry has one; the pipeline passes ``(B, L)`` long masks, or None when every token is valid)."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    ph, pw = h // g.patch, w // g.patch
    kwargs: dict[str, Any] = {"hidden_states": c.meta(batch, ph * pw, g.latent_channels * g.patch * g.patch),
                              "timestep": c.timestep, "encoder_hidden_states": c.text,
                              "img_shapes": [[(1, ph, pw)]] * batch}
    negative = c.negative
    if g.mask:
        kwargs["encoder_hidden_states_mask"] = c.meta(batch, g.text_tokens, dtype=torch.long)
        negative["encoder_hidden_states_mask"] = c.meta(g.batch, g.negative_length, dtype=torch.long)
    return Inputs(kwargs=kwargs, mask_arg="encoder_hidden_states_mask", negative=negative)


# ------------------------------------------------------------------------------------------------ tiny pipelines
# Test fixtures (``nagkit.tiny``): seeded random weights, in-memory tokenizers, nothing downloaded. Their diffusers and
# transformers imports stay inside the builders, so importing nagkit does not load the pipelines.
_QWEN_TEXT_DIM = 16
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
# The words of the pipelines' prompt templates: each becomes one token (as in the real Qwen2 vocabulary), so the
# templates' system part has the length the pipelines drop (34 tokens for text-to-image, 64 for the edit pipelines).
_QWEN_TEMPLATE_WORDS = """
describe detailing quantity text objects background system user assistant key features input explain instruction
should alter modify generate meets requirements while maintaining consistency original appropriate Describe Generate
Picture
"""
_QWEN_TEMPLATE_PIECES = (" (", "'s", "),")  # punctuation pieces the real vocabulary also keeps whole


def tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    """Build a byte-level BPE ``Qwen2Tokenizer`` over the tiny word list (plus the Qwen-Image template words), in
    memory, with Qwen's chat and vision special tokens.

    Every byte has a token, so any text tokenizes; listed words (with or without a leading space) are single tokens.

    Returns:
        The tokenizer (pad ``<|endoftext|>``, right padding).
    """
    from transformers import Qwen2Tokenizer

    from ..tiny.pipelines import _bytes_to_unicode, _word_merges, vocabulary_words

    byte_chars = _bytes_to_unicode()
    vocab = {ch: i for i, ch in enumerate(byte_chars.values())}
    space = byte_chars[ord(" ")]
    words = list(dict.fromkeys([*vocabulary_words(), *_QWEN_TEMPLATE_WORDS.split()]))
    pieces = [[byte_chars[b] for b in piece.encode()] for piece in _QWEN_TEMPLATE_PIECES]
    merges = _word_merges([[*w] for w in words if len(w) > 1] + [[space, *w] for w in words] + pieces, vocab)
    for token in _QWEN_SPECIALS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=list(_QWEN_SPECIALS[1:]),
                          model_max_length=32768)


def _tiny_qwen_text_encoder(seed: int, tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL with 1 text layer (hidden 16, 2 heads, M-RoPE sections 1+1+2) and a 1-block vision tower (patch 14,
    2x2 merge, output width 16)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": _QWEN_TEXT_DIM, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "max_position_embeddings": 4096, "bos_token_id": ids["<|endoftext|>"],
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": _QWEN_TEXT_DIM, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [0]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


_PROCESSOR_CLASS: list[type] = []


def tiny_qwen_processor(tokenizer: Qwen2Tokenizer) -> Any:
    """A ``Qwen2VLProcessor`` (what the edit pipelines encode the condition image with) over ``tokenizer`` and a PIL
    image processor that resizes every image to at most 64x64 pixels (4 image tokens after the 2x2 merge).

    transformers checks a processor's video processor against a class that needs torchvision even when none is
    given; the subclass used here skips that one check when there is no video processor (images only)."""
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    if not _PROCESSOR_CLASS:
        class TinyQwen2VLProcessor(Qwen2VLProcessor):
            def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
                if argument_name == "video_processor" and argument is None:
                    return None
                return super().check_argument_for_proper_class(argument_name, argument)

        _PROCESSOR_CLASS.append(TinyQwen2VLProcessor)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=64 * 64)
    return _PROCESSOR_CLASS[0](image_processor=image_processor, tokenizer=tokenizer)


def _tiny_qwen_vae(seed: int) -> AutoencoderKLQwenImage:
    """Tiny Qwen-Image VAE: base width 4, 4 latent channels, one residual block per stage, spatial factor 8."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                  temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                  latents_std=[1.0] * 4).eval()


def _tiny_qwen_transformer(seed: int) -> QwenImageTransformer2DModel:
    """2 dual-stream blocks, 2 heads x 8 (RoPE axes 2 + 2 + 4), 16 input channels (2x2-packed 4-channel latents)."""
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=8, num_attention_heads=2,
                                       joint_attention_dim=_QWEN_TEXT_DIM, axes_dims_rope=(2, 2, 4)).eval()


def _qwen_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # Qwen-Image-like flow-match scheduler: resolution-dependent (exponential) shift, as its scheduler config.
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                           base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                           time_shift_type="exponential")


def _qwen_components(seed: int) -> dict[str, Any]:
    tokenizer = tiny_qwen_tokenizer()
    return {
        "scheduler": _qwen_scheduler(),
        "vae": _tiny_qwen_vae(seed),
        "text_encoder": _tiny_qwen_text_encoder(seed, tokenizer),
        "tokenizer": tokenizer,
        "transformer": _tiny_qwen_transformer(seed),
    }


def tiny_qwen_image_pipeline(seed: int = 0) -> QwenImagePipeline:
    """Build a tiny random Qwen-Image text-to-image pipeline.

    Transformer: 2 dual-stream blocks, 2 heads x 8, 16 input channels (2x2-packed 4-channel latents). Text encoder:
    Qwen2.5-VL (1 text layer, hidden 16; vision tower unused here) over an in-memory Qwen2 tokenizer; the pipeline
    drops the 34 template tokens and keeps each prompt at its own length (mask only for batches of unequal
    prompts). VAE: ``AutoencoderKLQwenImage`` with spatial factor 8 (height/width multiples of 16). True CFG runs
    with ``true_cfg_scale > 1`` and a ``negative_prompt``. The same components build ``QwenImageImg2ImgPipeline`` and
    ``QwenImageInpaintPipeline`` (``QwenImageImg2ImgPipeline(**pipe.components)``).

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``QwenImagePipeline`` on CPU in float32.
    """
    from diffusers import QwenImagePipeline

    from ..tiny.pipelines import _finish

    return _finish(QwenImagePipeline(**_qwen_components(seed)))


def tiny_qwen_image_edit_pipeline(seed: int = 0) -> QwenImageEditPipeline:
    """Build a tiny random Qwen-Image-Edit pipeline (image-conditioned).

    The components of :func:`tiny_qwen_image_pipeline` plus the vision processor (:func:`tiny_qwen_processor`): the
    condition ``image`` (required) goes through the Qwen2.5-VL vision tower into the text embeddings and, VAE-encoded
    at about 1 megapixel as the pipeline always does (4096 tokens with this VAE), into the image stream. The same
    components build ``QwenImageEditPlusPipeline`` (batch 1, one or more condition images).

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``QwenImageEditPipeline`` on CPU in float32.
    """
    from diffusers import QwenImageEditPipeline

    from ..tiny.pipelines import _finish

    components = _qwen_components(seed)
    components["processor"] = tiny_qwen_processor(components["tokenizer"])
    return _finish(QwenImageEditPipeline(**components))


# ------------------------------------------------------------------------------------------------ registration
# encode_prompt returns (prompt_embeds, prompt_embeds_mask) in every Qwen-Image pipeline; the mask is None when every
# token is valid. The edit pipelines' encode_prompt also takes the condition `image` (kept for the negative, as the
# pipelines encode their CFG negative); their processor is needed to encode a string.
_QWEN_ARGS = {"embeds": "negative_prompt_embeds", "mask": "negative_prompt_embeds_mask"}
_QWEN = PipelineSpec(denoisers=("transformer",), mask_index=1, preset="qwen-image", size_multiple=2,
                     overrides={"prompt_embeds_mask": None}, embeds_args=_QWEN_ARGS)
_QWEN_EDIT = PipelineSpec(denoisers=("transformer",), mask_index=1, preset="qwen-image", size_multiple=2,
                          requires_image=True,
                          overrides={"prompt_embeds_mask": None}, encoders=("text_encoder", "processor"),
                          embeds_args=_QWEN_ARGS)

# Layered: its encode_prompt takes no image (the processor only captions an empty prompt), but the call needs `image`.
_QWEN_LAYERED = PipelineSpec(denoisers=("transformer",), mask_index=1, preset="qwen-image", size_multiple=2,
                             requires_image=True, overrides={"prompt_embeds_mask": None}, embeds_args=_QWEN_ARGS)

QWEN_IMAGE = register_adapter(Adapter(
    family="qwen-image",
    model_class=QwenImageTransformer2DModel,
    processors={QwenDoubleStreamAttnProcessor2_0: NAGQwenDoubleStreamAttnProcessor},
    select=_qwen_attention,
    mask_arg="encoder_hidden_states_mask",
    drop_padding=True,  # masked text keys get no weight: the negative's padding tokens are dropped (exact)
    timestep_max=1.0,  # the Qwen-Image pipelines pass t / 1000
    official=False,  # no official NAG code for Qwen-Image to reproduce
    preset="qwen-image",
    notes="Qwen-Image (T2I, img2img, inpaint, Edit, Edit Plus, Edit Inpaint, ControlNet, Layered): NAG on the "
          "image tokens of every dual-stream block; "
          "negative text as its own stream at the prompt's text positions; edit condition latents are image tokens",
    block_forwards={QwenEmbedRope: _text_rope, QwenEmbedLayer3DRope: _text_rope},
    pipelines={
        "QwenImagePipeline": _QWEN,
        "QwenImageImg2ImgPipeline": _QWEN,
        "QwenImageInpaintPipeline": _QWEN,
        "QwenImageEditPipeline": _QWEN_EDIT,
        "QwenImageEditPlusPipeline": _QWEN_EDIT,
        "QwenImageEditInpaintPipeline": _QWEN_EDIT,
        # the QwenImageControlNetModel runs plain on the prompt (as the SD/FLUX ControlNets, adapters/unet.py)
        "QwenImageControlNetPipeline": _QWEN,
        "QwenImageControlNetInpaintPipeline": _QWEN,
        "QwenImageLayeredPipeline": _QWEN_LAYERED,
    },
    # diffusers PR #13089 (open: NAG for the QwenImage modular pipelines), NormalizedAttentionCFGGuidance defaults:
    # nag_scale 5.0, nag_tau 2.5, nag_alpha 0.25.
    presets={"qwen-image": NAGConfig(scale=5.0, tau=2.5, alpha=0.25)},
    tiny={
        "tiny-qwen-image": TinyModel(tiny_qwen_image_pipeline, {"height": 64, "width": 64}),
        "tiny-qwen-image-edit": TinyModel(tiny_qwen_image_edit_pipeline, {"height": 64, "width": 64}),
    },
    bench_inputs=qwen_bench_inputs,
    separate_cfg=True,  # true CFG: conditional and unconditional calls in turn (cache_context "cond"/"uncond")
))
