"""Wan 2.1 / 2.2 ``WanTransformer3DModel`` (T2V, I2V, TI2V): NAG on the text cross-attention ``attn2``.

I2V: the image-context tokens (CLIP, 257 per frame reference) are not negated. NAG acts on the text attention output
and the image-context attention is added afterwards, as in the official Wan processor.

The family's file: the NAG processor and the adapter; the pipelines (``WanPipeline``, ``WanImageToVideoPipeline``)
and presets (``wan``, ``wan-causvid``); the meta inputs of ``nagkit bench``; the tiny pipelines ``tiny-wan``,
``tiny-wan22`` (two experts) and ``tiny-wan-i2v``.
"""

from __future__ import annotations

import importlib
import types
from typing import TYPE_CHECKING, Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from ..core.config import NAGConfig
from ..kernels.cross import nag_cross_attention
from .base import Adapter, NAGProcessor, PipelineSpec, TinyModel, register_adapter

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    from transformers import T5Tokenizer, UMT5EncoderModel

    from ..bench.families import FamilySpec, Inputs


class NAGWanAttnProcessor(NAGProcessor):
    """``WanAttnProcessor`` with NAG on the text cross-attention output."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        packing = self.packing
        if packing is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        cfg = self.state.config
        backend = self._attention_backend

        # [image context | positive text | negative text]: the text length is known exactly here.
        context_img, n_img = None, encoder_hidden_states.shape[1] - packing.lp - packing.ln
        if attn.add_k_proj is not None:  # I2V: the image context has its own K/V projections
            context_img = encoder_hidden_states[:, :n_img]
            encoder_hidden_states = encoder_hidden_states[:, n_img:]
            n_img = 0
        # else (``image_dim`` without ``added_kv_proj_dim``): the image tokens are plain context keys of both branches

        query = attn.to_q(hidden_states)
        if attn.fused_projections:
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        def attend(q, k, v, mask):  # noqa: ANN001, ANN202
            out = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, backend=backend,
                                        parallel_config=None)
            return out.flatten(2, 3).type_as(q)

        hidden_states = nag_cross_attention(attend, query, key, value, attention_mask, packing,
                                            cfg.scale, cfg.tau, cfg.alpha, cfg.norm, seq_dim=1, prefix=n_img)

        if context_img is not None:
            if attn.fused_projections:
                key_img, value_img = attn.to_added_kv(context_img).chunk(2, dim=-1)
            else:
                key_img, value_img = attn.add_k_proj(context_img), attn.add_v_proj(context_img)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states = hidden_states + attend(query, key_img, value_img, None)

        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def _wan_text_attention(name: str, module: torch.nn.Module) -> bool:
    return name.endswith("attn2") and bool(getattr(module, "is_cross_attention", False))


# ------------------------------------------------------------------------------------------------ nagkit bench
def wan_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one Wan call (I2V: the image context when the geometry has ``image_tokens``)."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    kwargs: dict[str, Any] = {"hidden_states": c.meta(batch, g.latent_channels, g.latent_frames or 1, h, w),
                              "timestep": c.timestep, "encoder_hidden_states": c.text}
    if g.image_tokens:
        kwargs["encoder_hidden_states_image"] = c.meta(batch, g.image_tokens, g.image_dim)
    return Inputs(kwargs=kwargs, negative=c.negative)


# ------------------------------------------------------------------------------------------------ tiny pipelines
# Test fixtures (``nagkit.tiny``): seeded random weights, in-memory tokenizers, nothing downloaded. Their diffusers and
# transformers imports stay inside the builders, so importing nagkit does not load the pipelines.


def _tiny_umt5(seed: int, d_model: int = 16) -> tuple[T5Tokenizer, UMT5EncoderModel]:
    """Tokenizer and 1-layer UMT5 encoder for the Wan pipelines."""
    from transformers import UMT5Config, UMT5EncoderModel

    from ..tiny.pipelines import WAN_TEXT_LENGTH, tiny_t5_tokenizer

    tokenizer = tiny_t5_tokenizer(model_max_length=WAN_TEXT_LENGTH)
    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, UMT5EncoderModel(config).eval()


def _tiny_wan_vae(seed: int) -> AutoencoderKLWan:
    """Tiny Wan 2.1 VAE (z_dim 16, spatial factor 8, temporal factor 4), as in diffusers' tests."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()


def _tiny_wan_transformer(
    seed: int, text_dim: int, in_channels: int = 16, image_dim: int | None = None
) -> WanTransformer3DModel:
    """2-block Wan transformer (2 heads x 8); with ``image_dim`` it gets image-context K/V in ``attn2`` (I2V)."""
    num_heads, head_dim = 2, 8
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=num_heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=image_dim,
        added_kv_proj_dim=num_heads * head_dim if image_dim is not None else None,
        rope_max_seq_len=32,
    ).eval()


def _wan_scheduler() -> UniPCMultistepScheduler:
    # Same scheduler family / settings as the released Wan 2.1 480p pipelines (flow_shift 3.0).
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def tiny_wan_pipeline(seed: int = 0) -> WanPipeline:
    """Build a tiny random Wan 2.1 text-to-video pipeline.

    Transformer: 2 blocks, 2 heads x 8 (``attn2`` attends to the text); UMT5 text encoder (1 layer, d_model 16);
    Wan VAE (spatial factor 8, temporal factor 4); UniPC flow scheduler (shift 3). Works with the default
    ``max_sequence_length=512``.

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``WanPipeline`` on CPU in float32 (``transformer_2`` is ``None``).
    """
    from diffusers import WanPipeline

    from ..tiny.pipelines import _finish

    tokenizer, text_encoder = _tiny_umt5(seed)
    transformer = _tiny_wan_transformer(seed, text_dim=text_encoder.config.d_model)
    vae = _tiny_wan_vae(seed)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=_wan_scheduler(),
    )
    return _finish(pipe)


def tiny_wan22_pipeline(seed: int = 0) -> WanPipeline:
    """Build a tiny random Wan 2.2 (two-expert, A14B-style) text-to-video pipeline.

    Like :func:`tiny_wan_pipeline` plus ``transformer_2`` (seeded with ``seed + 1`` so the experts differ) and
    ``boundary_ratio=0.875``: with the UniPC flow scheduler (shift 3) a 2-step run uses timesteps [999, 750] and a
    4-step run [999, 900, 750, 500], so ``transformer`` (t >= 875) and ``transformer_2`` are both used.

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``WanPipeline`` with ``transformer`` and ``transformer_2``, on CPU in float32.
    """
    from diffusers import WanPipeline

    from ..tiny.pipelines import WAN22_BOUNDARY_RATIO, _finish

    tokenizer, text_encoder = _tiny_umt5(seed)
    transformer = _tiny_wan_transformer(seed, text_dim=text_encoder.config.d_model)
    transformer_2 = _tiny_wan_transformer(seed + 1, text_dim=text_encoder.config.d_model)
    vae = _tiny_wan_vae(seed)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        transformer_2=transformer_2,
        vae=vae,
        scheduler=_wan_scheduler(),
        boundary_ratio=WAN22_BOUNDARY_RATIO,
    )
    return _finish(pipe)


def _ensure_wan_i2v_prompt_clean() -> None:
    """Work around diffusers' Wan I2V ``basic_clean`` calling ``ftfy.fix_text`` even when ftfy is not installed.

    ``pipeline_wan_i2v`` imports ``ftfy`` only if available but uses it unconditionally (``pipeline_wan`` guards it),
    so without ftfy every text prompt raises ``NameError``. If the module has no ``ftfy`` global, give it an identity
    ``fix_text`` (the module-level name only; ``sys.modules`` is not touched).
    """
    module = importlib.import_module("diffusers.pipelines.wan.pipeline_wan_i2v")
    if not hasattr(module, "ftfy"):
        shim = types.ModuleType("ftfy_identity_shim")
        shim.fix_text = lambda text: text  # type: ignore[attr-defined]
        module.ftfy = shim  # type: ignore[attr-defined]


def tiny_wan_i2v_pipeline(seed: int = 0) -> WanImageToVideoPipeline:
    """Build a tiny random Wan 2.1 image-to-video pipeline.

    Transformer with ``in_channels=36`` (noise + mask + image latents), ``image_dim`` = CLIP vision hidden size and
    ``added_kv_proj_dim`` = inner dim, so ``attn2`` also attends to image tokens (``add_k_proj``/``add_v_proj``).
    Image encoder: 1-layer ``CLIPVisionModelWithProjection`` (32x32 input, patch 8, 17 tokens); processor resizes to
    32x32. The attention processor hard-codes 512 text tokens, so keep ``max_sequence_length=512`` (the default).

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``WanImageToVideoPipeline`` on CPU in float32; call it with ``image=`` (see :func:`tiny_condition_image`).
    """
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from ..tiny.pipelines import _finish

    _ensure_wan_i2v_prompt_clean()
    tokenizer, text_encoder = _tiny_umt5(seed)
    torch.manual_seed(seed)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=8,
            projection_dim=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=16,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformer = _tiny_wan_transformer(
        seed, text_dim=text_encoder.config.d_model, in_channels=36, image_dim=image_encoder.config.hidden_size
    )
    vae = _tiny_wan_vae(seed)
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=_wan_scheduler(),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
    )
    return _finish(pipe)


# ------------------------------------------------------------------------------------------------ registration
_WAN = PipelineSpec(denoisers=("transformer", "transformer_2"), count_arg="num_videos_per_prompt", preset="wan",
                    size_multiple=2)

WAN = register_adapter(Adapter(
    family="wan",
    model_class=WanTransformer3DModel,
    processors={WanAttnProcessor: NAGWanAttnProcessor},
    select=_wan_text_attention,
    mask_arg=None,
    preset="wan",
    notes="Wan 2.1/2.2 T2V, I2V, TI2V: NAG on the text cross-attention attn2; I2V image context not negated",
    # WanVideoToVideoPipeline: the same WanTransformer3DModel and encode_prompt, separate cond / uncond calls
    pipelines={"WanPipeline": _WAN, "WanImageToVideoPipeline": _WAN, "WanVideoToVideoPipeline": _WAN},
    presets={
        # Official Wan pipeline: alpha 0.25; README: nag_scale 9 with CFG 5 (25 steps).
        "wan": NAGConfig(scale=9.0, tau=2.5, alpha=0.25),
        # Wan + CausVid (4 steps, no CFG): official demo / ComfyUI "Wan-Fast" workflow.
        "wan-causvid": NAGConfig(scale=11.0, tau=3.5, alpha=0.5),
    },
    tiny={
        "tiny-wan": TinyModel(tiny_wan_pipeline, {"height": 32, "width": 32, "num_frames": 5}),
        "tiny-wan22": TinyModel(tiny_wan22_pipeline, {"height": 32, "width": 32, "num_frames": 5}),
        # also needs ``image=`` (nagkit.tiny.pipelines.tiny_condition_image)
        "tiny-wan-i2v": TinyModel(tiny_wan_i2v_pipeline, {"height": 32, "width": 32, "num_frames": 5}),
    },
    bench_inputs=wan_bench_inputs,
    separate_cfg=True,  # WanPipeline: conditional and unconditional calls in turn
))
