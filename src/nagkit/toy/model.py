"""The embedded toy text-to-image model: a real ``FluxPipeline`` (Flux architecture, 32×32 px) built offline.

Components (all built in code; only the trained weights are a file):

* ``tokenizer`` / ``tokenizer_2``: a ``CLIPTokenizer`` and a ``T5Tokenizer`` over the toy vocabulary
  (:data:`nagkit.toy.data.VOCAB` words; every word is one token), built in memory.
* ``text_encoder``: ``CLIPTextModel`` (2 layers, width 64; only its pooled output is used, as in FLUX.1);
  ``text_encoder_2``: ``T5EncoderModel`` (2 layers, width 64). Both trained jointly with the transformer.
* ``vae``: a small diffusers ``AutoencoderKL`` trained on the toy data (:func:`toy_autoencoder`: 3 blocks of
  16/32/32 channels, spatial factor 4, 4 latent channels): a 32×32 image is an 8×8×4 latent, which the Flux pipeline
  packs into 4×4 = 16 tokens of 16 values (each token an 8×8-pixel area). Its ``scaling_factor`` and ``shift_factor``
  (latent standardisation, as in FLUX.1's VAE) are measured after its training and stored in the weights file.
* ``transformer``: ``FluxTransformer2DModel``, 2 double-stream + 4 single-stream blocks, 4 heads × 32 (width 128),
  no guidance embedding (schnell-like; true CFG with ``true_cfg_scale``), RoPE axes (8, 12, 12).
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with shift 1 (the training objective is rectified flow).

Why a learned autoencoder: the first embedded model diffused pixels directly (4×4-pixel tokens) and never learned
shape kinds in its 45-minute budget: sampling committed to a noise-shaped blob in the first step, although the same
network denoised real noisy shapes well. In latent space a decoder draws the shape and the transformer only chooses
it: in the same one-kind-at-a-time test (one large shape, 400 steps) the right kind went from 5 of 48 to 45 of 48.

The few-step student (:func:`load_student_pipeline`, :data:`STUDENT_CALL_KWARGS`: 4 steps, no CFG) is this pipeline
with another transformer, distilled from this one by :mod:`nagkit.toy.distill` (shipped in float16, 4.4 MiB).

The pipeline must be called with :data:`EMBEDDED_CALL_KWARGS` (32×32, ``max_sequence_length=24``: the T5 sequence
length the model was trained with; the Flux default 512 would show it 488 unseen padding tokens).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from nagkit.toy.data import VOCAB

__all__ = [
    "EMBEDDED_CALL_KWARGS",
    "EMBEDDED_WEIGHTS",
    "STUDENT_CALL_KWARGS",
    "STUDENT_RECORD",
    "STUDENT_WEIGHTS",
    "IMAGE_SIZE",
    "TEXT_LENGTH",
    "TRAIN_KINDS",
    "LATENT_CHANNELS",
    "build_toy_pipeline",
    "embedded_info",
    "load_embedded_pipeline",
    "load_student_pipeline",
    "student_info",
    "pack_images",
    "toy_autoencoder",
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
#: Package resource names of the few-step student's transformer weights (float16) and its training record
#: (:mod:`nagkit.toy.distill`); the student shares the teacher's text encoders and autoencoder.
STUDENT_WEIGHTS = "student.safetensors"
STUDENT_RECORD = "student.json"
#: Keyword arguments every call of the student needs: 4 steps, no CFG (schnell-like).
STUDENT_CALL_KWARGS: dict[str, Any] = {
    "height": IMAGE_SIZE,
    "width": IMAGE_SIZE,
    "max_sequence_length": TEXT_LENGTH,
    "num_inference_steps": 4,
}

#: Latent channels of the autoencoder (the transformer sees 2×2 patches of them: 16 values per token).
LATENT_CHANNELS = 4
_WEIGHT_PARTS = ("vae", "transformer", "text_encoder", "text_encoder_2")  # key prefixes of a weights file
_WIDTH = 64  # text encoder width (= Flux joint_attention_dim and pooled_projection_dim)


def toy_autoencoder() -> AutoencoderKL:
    """The embedded model's autoencoder, untrained (weights from the current torch seed; latent ``scaling_factor`` 1
    and ``shift_factor`` 0 until training measures them, see :mod:`nagkit.toy.train`).

    Returns:
        A diffusers ``AutoencoderKL``: spatial factor 4, :data:`LATENT_CHANNELS` latent channels, 0.23 M parameters,
        no attention.
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
        shift_factor=0.0,
        mid_block_add_attention=False,
    )


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
        weights: A safetensors file written by :mod:`nagkit.toy.train` (keys prefixed ``vae.``, ``transformer.``,
            ``text_encoder.``, ``text_encoder_2.``; the latent ``scaling_factor``/``shift_factor`` in its metadata);
            ``None`` keeps the seeded random initialisation.
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
        in_channels=4 * LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=_WIDTH,
        pooled_projection_dim=_WIDTH,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )
    torch.manual_seed(seed + 3)
    vae = toy_autoencoder()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    if weights is not None:
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if "vae_scaling_factor" not in meta:
            raise ValueError(f"weights {weights} have no latent scaling factor in their metadata (not a toy-model "
                             "file, or one from before the autoencoder)")
        vae.register_to_config(scaling_factor=float(meta["vae_scaling_factor"]),
                               shift_factor=float(meta["vae_shift_factor"]))
        for name in _WEIGHT_PARTS:
            module = getattr(pipe, name)
            part = {k[len(name) + 1 :]: v for k, v in state.items() if k.split(".", 1)[0] == name}
            missing, unexpected = module.load_state_dict(part, strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing or unexpected:
                raise ValueError(
                    f"weights {weights} do not match the embedded {name}: missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}"
                )
    for module in (text_encoder, text_encoder_2, transformer, vae):
        module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pack_images(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Images ``(B, 3, 32, 32)`` in [-1, 1] -> the transformer's packed latents ``(B, 16, 16)``.

    The layout the pipeline denoises: the autoencoder's posterior mean, standardised with the VAE config's
    ``shift_factor``/``scaling_factor`` (``FluxPipeline`` undoes exactly this before decoding), then
    ``FluxPipeline._pack_latents``.

    Args:
        vae: The pipeline's autoencoder.
        images: Images.

    Returns:
        Packed latents.
    """
    z = vae.encode(images).latent_dist.mean
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
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


def student_info() -> dict[str, Any]:
    """The few-step student's training record shipped next to its weights (pairs, steps, times, losses).

    Returns:
        The record, or ``{}`` if none is shipped.
    """
    path = _resource(STUDENT_RECORD)
    return json.loads(path.read_text()) if path.is_file() else {}


def load_student_pipeline(weights: str | Path | None = None) -> FluxPipeline:
    """Load the embedded few-step student (:mod:`nagkit.toy.distill`): the teacher's pipeline with the student's
    transformer. Call it with :data:`STUDENT_CALL_KWARGS` (4 steps; 1 and 2 work too), without CFG.

    Args:
        weights: A ``student.safetensors`` file (keys ``transformer.*``); default the one shipped in the package.

    Returns:
        The ``FluxPipeline`` on CPU in float32.

    Raises:
        FileNotFoundError: If the student's or the teacher's weights are missing.
        ValueError: If the file does not match the transformer.
    """
    path = Path(weights) if weights is not None else _resource(STUDENT_WEIGHTS)
    if not path.is_file():
        raise FileNotFoundError(
            f"the embedded student's weights ({path}) are missing from this installation; distil them with "
            "`python -m nagkit.toy.distill --install` or reinstall nagkit"
        )
    from safetensors.torch import load_file

    pipe = load_embedded_pipeline()
    state = {k.split(".", 1)[1]: v.float() for k, v in load_file(str(path)).items() if k.startswith("transformer.")}
    missing, unexpected = pipe.transformer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"student weights {path} do not match the embedded transformer: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return pipe
