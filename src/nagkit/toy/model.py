"""The embedded toy text-to-image model: a real ``FluxPipeline`` (Flux architecture, 32×32 px) built offline.

Components (all built in code; only the trained weights are a file):

* ``tokenizer`` / ``tokenizer_2``: a ``CLIPTokenizer`` and a ``T5Tokenizer`` over the toy vocabulary
  (:data:`nagkit.toy.data.VOCAB` words; every word is one token), built in memory.
* ``text_encoder``: ``CLIPTextModel`` (2 layers, width 64; only its pooled output is used, as in FLUX.1);
  ``text_encoder_2``: ``T5EncoderModel`` (2 layers, width 64). Both trained jointly with the transformer.
* ``transformer``: ``FluxTransformer2DModel``, 2 double-stream + 4 single-stream blocks, 4 heads × 32 (width 128),
  no guidance embedding (schnell-like; true CFG with ``true_cfg_scale``), RoPE axes (8, 12, 12).
* ``vae``: :class:`PixelShuffleVAE`, the documented **pixel-space arrangement**: no learned autoencoder; a 32×32 RGB
  image in [-1, 1] *is* the latent after a 2×2 pixel-unshuffle (12 channels at 16×16), which the Flux pipeline packs
  into 8×8 = 64 tokens of 48 values (each token a 4×4 RGB patch). Decoding is the exact inverse.
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with shift 1 (the training objective is rectified flow).

The pipeline must be called with :data:`EMBEDDED_CALL_KWARGS` (32×32, ``max_sequence_length=24``: the T5 sequence
length the model was trained with; the Flux default 512 would show it 488 unseen padding tokens).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from nagkit.toy.data import VOCAB

__all__ = [
    "EMBEDDED_CALL_KWARGS",
    "EMBEDDED_WEIGHTS",
    "IMAGE_SIZE",
    "TEXT_LENGTH",
    "TRAIN_KINDS",
    "PixelShuffleVAE",
    "build_toy_pipeline",
    "embedded_info",
    "load_embedded_pipeline",
    "pack_images",
    "toy_tokenizers",
]

#: Image side in pixels.
IMAGE_SIZE = 32
#: Token length of both tokenizers (captions have at most 21 words + special tokens).
TEXT_LENGTH = 24
#: Shape kinds of the training distribution (a subset of :data:`nagkit.toy.data.ALL_KINDS`).
TRAIN_KINDS: tuple[str, ...] = ("circle", "square", "triangle")
#: Keyword arguments every call of the embedded pipeline needs.
EMBEDDED_CALL_KWARGS: dict[str, Any] = {
    "height": IMAGE_SIZE,
    "width": IMAGE_SIZE,
    "max_sequence_length": TEXT_LENGTH,
    "num_inference_steps": 8,
}
#: Package resource names of the trained weights and their training record.
EMBEDDED_WEIGHTS = "embedded.safetensors"
EMBEDDED_RECORD = "embedded.json"

_WIDTH = 64  # text encoder width (= Flux joint_attention_dim and pooled_projection_dim)


class _Latents:
    """What ``AutoencoderKL.encode`` returns, enough for diffusers' ``retrieve_latents``."""

    def __init__(self, latents: torch.Tensor) -> None:
        self.latents = latents


class PixelShuffleVAE(ModelMixin, ConfigMixin):
    """Exact, parameter-free "autoencoder" for pixel-space diffusion: latents are 2×2 pixel-unshuffled images.

    ``block_out_channels`` has two entries only so that diffusers pipelines derive a spatial factor of 2
    (``2 ** (len(block_out_channels) - 1)``); ``scaling_factor`` 1 and ``shift_factor`` 0 leave pixels unscaled.

    Args:
        factor: Spatial factor (2).
        latent_channels: ``3 * factor**2`` (12).
        block_out_channels: ``(latent_channels,) * 2``; read by pipelines for the spatial factor.
        scaling_factor: Latent scale (1.0).
        shift_factor: Latent shift (0.0).
    """

    @register_to_config
    def __init__(
        self,
        factor: int = 2,
        latent_channels: int = 12,
        block_out_channels: tuple[int, ...] = (12, 12),
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ) -> None:
        super().__init__()
        if latent_channels != 3 * factor**2 or 2 ** (len(block_out_channels) - 1) != factor:
            raise ValueError(
                "PixelShuffleVAE needs latent_channels == 3 * factor**2 and factor == 2**(len(block_out_channels) - 1)"
            )
        # A buffer gives the module a dtype/device for pipelines that ask (``vae.dtype``).
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        """Image ``(B, 3, H, W)`` in [-1, 1] -> latents ``(B, 12, H/2, W/2)``.

        Args:
            x: Images.
            return_dict: Return an object with ``.latents`` (else a 1-tuple).

        Returns:
            The latents.
        """
        z = F.pixel_unshuffle(x, self.config.factor)
        return _Latents(z) if return_dict else (z,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        """Latents ``(B, 12, h, w)`` -> images ``(B, 3, 2h, 2w)``.

        Args:
            z: Latents.
            return_dict: Return an object with ``.sample`` (else a 1-tuple).
            generator: Ignored (decoding is deterministic).

        Returns:
            The images.
        """
        x = F.pixel_shuffle(z, self.config.factor)
        return DecoderOutput(sample=x) if return_dict else (x,)


def toy_tokenizers() -> tuple[CLIPTokenizer, T5Tokenizer]:
    """Build the two tokenizers of the embedded model in memory (every toy word is one token).

    Returns:
        ``(clip_tokenizer, t5_tokenizer)``, both with ``model_max_length`` :data:`TEXT_LENGTH`.
    """
    from nagkit.tiny.pipelines import tiny_clip_tokenizer, tiny_t5_tokenizer

    words = VOCAB.itos[2:]
    return (
        tiny_clip_tokenizer(model_max_length=TEXT_LENGTH, words=words),
        tiny_t5_tokenizer(model_max_length=TEXT_LENGTH, words=words),
    )


def build_toy_pipeline(weights: str | Path | None = None, seed: int = 0) -> FluxPipeline:
    """Build the embedded model's ``FluxPipeline`` (CPU, float32), random (seeded) or with trained weights.

    Args:
        weights: A safetensors file written by :mod:`nagkit.toy.train` (keys prefixed ``transformer.``,
            ``text_encoder.``, ``text_encoder_2.``); ``None`` keeps the seeded random initialisation.
        seed: Seed of the random initialisation.

    Returns:
        The pipeline, in eval mode, progress bar disabled.

    Raises:
        ValueError: If the weights file does not match the architecture (missing or unexpected keys).
    """
    tokenizer, tokenizer_2 = toy_tokenizers()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=_WIDTH,
            intermediate_size=2 * _WIDTH,
            projection_dim=_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=TEXT_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="gelu",
        )
    )
    torch.manual_seed(seed + 1)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=_WIDTH,
            d_kv=16,
            d_ff=2 * _WIDTH,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=16,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * 12,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=_WIDTH,
        pooled_projection_dim=_WIDTH,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=PixelShuffleVAE(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    if weights is not None:
        from safetensors.torch import load_file

        state = load_file(str(weights))
        for name in ("transformer", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, name)
            part = {k[len(name) + 1 :]: v for k, v in state.items() if k.split(".", 1)[0] == name}
            missing, unexpected = module.load_state_dict(part, strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing or unexpected:
                raise ValueError(
                    f"weights {weights} do not match the embedded {name}: missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}"
                )
    for module in (text_encoder, text_encoder_2, transformer):
        module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pack_images(images: torch.Tensor) -> torch.Tensor:
    """Images ``(B, 3, 32, 32)`` in [-1, 1] -> the transformer's packed latents ``(B, 64, 48)``.

    The same layout the pipeline produces: :class:`PixelShuffleVAE` encoding, then ``FluxPipeline._pack_latents``.

    Args:
        images: Images.

    Returns:
        Packed latents.
    """
    z = F.pixel_unshuffle(images, 2)
    b, c, h, w = z.shape
    return FluxPipeline._pack_latents(z, b, c, h, w)


def _resource(name: str) -> Path:
    return Path(str(resources.files("nagkit.toy").joinpath("weights", name)))


def embedded_info() -> dict[str, Any]:
    """The training record shipped next to the embedded weights (steps, seed, losses, wall time, sizes).

    Returns:
        The record, or ``{}`` if none is shipped.
    """
    path = _resource(EMBEDDED_RECORD)
    return json.loads(path.read_text()) if path.is_file() else {}


def load_embedded_pipeline() -> FluxPipeline:
    """Load the embedded, trained toy model shipped inside the package (no network access).

    Call it with :data:`EMBEDDED_CALL_KWARGS`, e.g.::

        pipe = load_embedded_pipeline()
        image = pipe("a circle", generator=torch.Generator().manual_seed(0), **EMBEDDED_CALL_KWARGS).images[0]

    Returns:
        The ``FluxPipeline`` on CPU in float32.

    Raises:
        FileNotFoundError: If the package was installed without its weights file.
    """
    path = _resource(EMBEDDED_WEIGHTS)
    if not path.is_file():
        raise FileNotFoundError(
            f"the embedded model's weights ({path}) are missing from this installation; retrain them with "
            "`python -m nagkit.toy.train` or reinstall nagkit"
        )
    return build_toy_pipeline(path)
