"""Wan Animate ``WanAnimateTransformer3DModel`` (bare denoiser only): NAG on the text cross-attention ``attn2``.

The Animate model carries its own copies of ``WanAttention`` / ``WanAttnProcessor`` (same computation as Wan's:
``[image context | text]`` with the CLIP image context through ``add_k_proj``), so the Wan NAG processor applies: NAG
on the text attention output, the image-context attention added afterwards (never negated). ``face_adapter`` blocks
cross-attend to motion features, not to text: they are not guided (the selector takes ``*.attn2`` modules only).

``WanAnimatePipeline`` is not supported (not listed): its call needs pose and face videos and a CLIP image encoder,
and no tiny pipeline was built to test it; ``nagkit.apply(pipe)`` refuses it with the list of supported pipelines.
Use the bare denoiser with ``negative={"encoder_hidden_states": ...}`` in a custom loop.
"""

from __future__ import annotations

from diffusers import WanAnimateTransformer3DModel
from diffusers.models.transformers.transformer_wan_animate import WanAttnProcessor as WanAnimateAttnProcessor

from .base import Adapter, register_adapter
from .wan import NAGWanAttnProcessor, _wan_text_attention


class NAGWanAnimateAttnProcessor(NAGWanAttnProcessor):
    """Wan Animate's own ``WanAttnProcessor`` copy with NAG on the text cross-attention output (same computation)."""


WAN_ANIMATE = register_adapter(Adapter(
    family="wananimate",
    model_class=WanAnimateTransformer3DModel,
    processors={WanAnimateAttnProcessor: NAGWanAnimateAttnProcessor},
    select=_wan_text_attention,
    mask_arg=None,
    preset="wan",
    official=False,
    notes="Wan Animate (bare denoiser): NAG on the text cross-attention attn2; CLIP image context not negated; "
          "face_adapter (motion features) untouched; WanAnimatePipeline not supported",
    separate_cfg=True,
))
