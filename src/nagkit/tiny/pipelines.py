"""Tiny, seeded-random diffusers pipelines built fully offline.

Every builder returns a real diffusers pipeline object (on CPU, float32) whose components are randomly initialised
from a fixed seed (``torch.manual_seed(seed)`` before each component) and whose tokenizers are built in memory from a
small English word vocabulary. Nothing is downloaded. The pipelines are meant for tests and CPU demos: a 2-step call
at the sizes in :data:`TINY_CALL_KWARGS` takes a fraction of a second.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLWan,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

__all__ = [
    "CLIP_MAX_LENGTH",
    "TINY_CALL_KWARGS",
    "TINY_PIPELINES",
    "WAN_TEXT_LENGTH",
    "WAN22_BOUNDARY_RATIO",
    "tiny_clip_tokenizer",
    "tiny_condition_image",
    "tiny_gemma_tokenizer",
    "tiny_pixart_sigma_pipeline",
    "tiny_sana_pipeline",
    "tiny_sd15_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_t5_tokenizer",
    "tiny_wan22_pipeline",
    "tiny_wan_i2v_pipeline",
    "tiny_wan_pipeline",
    "vocabulary_words",
]

#: ``model_max_length`` of the tiny CLIP tokenizers (same as real SD / SDXL).
CLIP_MAX_LENGTH = 77
#: Text length the Wan pipelines pad to by default; the Wan I2V attention processor hard-codes it.
WAN_TEXT_LENGTH = 512
#: Wan 2.2 expert switch: timesteps >= 875 use ``transformer``, lower ones ``transformer_2`` (real Wan 2.2 value).
WAN22_BOUNDARY_RATIO = 0.875

# A few hundred common English words (plus the words of Sana's default complex human instruction).
_WORDS = """
a an the and or but of in on at to from with without by for as into onto over under above below behind between
near inside outside through across around up down out off is are was were be been being has have had do does did
it its this that these those there here he she they we you i me my your his her their our who what which where
when why how all any some many much more most few no not only very too also just than then so if each every other
another same such own new old young big small large little tiny huge tall short long wide narrow high low round
square flat thick thin heavy light dark bright soft hard hot cold warm cool wet dry clean dirty full empty fast
slow quiet loud happy sad angry calm beautiful pretty ugly cute strange simple detailed realistic cinematic
photo photograph picture image painting drawing sketch illustration render style art artist portrait landscape
scene view shot close wide angle camera lens focus blur bokeh sharp quality best worst high resolution
low lighting light shadow sun sunny sunlight sunset sunrise moon star stars sky cloud clouds rain snow fog
storm wind weather day night morning evening dusk dawn red orange yellow green blue purple pink brown black
white gray grey gold golden silver color colors colorful vivid pale neon cat cats dog dogs bird birds fish horse
cow sheep pig lion tiger bear wolf fox rabbit mouse monkey elephant dragon animal animals man woman men women boy
girl child children baby person people crowd face eyes eye hair hand hands head body smile smiling running walking
sitting standing sleeping flying swimming dancing eating drinking playing reading holding wearing looking dance
jump jumping house home building buildings city street road bridge tower castle church room window windowsill
door wall floor roof garden park forest tree trees flower flowers grass leaf leaves mountain mountains hill river
lake sea ocean beach island desert field water fire ice stone rock sand wood metal glass paper car bus train
plane boat ship bicycle bike table chair bed book cup bowl plate food fruit apple banana bread cake pizza burger
coffee tea hat shirt dress shoes coat bag ball toy robot computer phone lamp lamps clock mirror box pot pots
one two three four five first second last top bottom left right center middle front back side edge corner
shape shapes size sizes texture textures spatial relationships relationship concrete vivid scenes specifics
adding focus prompt prompts user enhanced enhance refine refining existing details slightly overcomplicating
given generate generation provides visual descriptions description suitable evaluate level examples example
transform please avoid including additional commentary evaluations below already fluffy curled peacefully
surrounded blooming bustling featuring glowing diverse clothing passing towering skyscrapers double decker
busy create sleep
"""

_BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
_PUNCT = list(".,:;!?'\"-_()[]{}<>/\\|@#$%^&*+=~`")
_DIGITS = list("0123456789")
_LETTERS = list("abcdefghijklmnopqrstuvwxyz")


def vocabulary_words() -> list[str]:
    """Return the tiny English word list shared by all tiny tokenizers.

    Returns:
        Unique lower-case words, in a fixed order.
    """
    seen: dict[str, None] = {}
    for word in _WORDS.split():
        seen.setdefault(word, None)
    return list(seen)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-unicode table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _bpe_segment(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first, leftmost first) to a list of symbols."""
    symbols = list(symbols)
    while len(symbols) > 1:
        best: tuple[int, int] | None = None
        for i in range(len(symbols) - 1):
            rank = ranks.get((symbols[i], symbols[i + 1]))
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _word_merges(words: Iterable[list[str]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Create BPE merges (and add merged tokens to ``vocab``) so that each word becomes one token.

    Each word is segmented with the merges made so far; while it is still split, a merge of its first two pieces is
    appended. Appended merges rank last, so they never change how an earlier word is segmented.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for symbols in words:
        pieces = _bpe_segment(symbols, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            merged = pieces[0] + pieces[1]
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    return merges


def tiny_clip_tokenizer(
    model_max_length: int = CLIP_MAX_LENGTH, pad_token: str = "<|endoftext|>", words: Iterable[str] | None = None
) -> CLIPTokenizer:
    """Build a byte-level BPE ``CLIPTokenizer`` over the tiny word list, in memory.

    Every byte has a token, so any text tokenizes (words outside the list are split into characters).

    Args:
        model_max_length: Maximum sequence length (the SD pipelines pad/truncate to it).
        pad_token: Padding token (``"<|endoftext|>"`` like SD 1.5, ``"!"`` like the second SDXL tokenizer).
        words: Words that become single tokens (default: :func:`vocabulary_words`).

    Returns:
        A ready ``CLIPTokenizer`` (bos ``<|startoftext|>``, eos/unk ``<|endoftext|>``).
    """
    byte_chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    for ch in byte_chars:
        vocab[ch + "</w>"] = len(vocab)
    words_ = vocabulary_words() if words is None else list(words)
    merged = [[*w[:-1], w[-1] + "</w>"] for w in words_ if len(w) > 1]
    merges = _word_merges(merged, vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_t5_tokenizer(model_max_length: int = WAN_TEXT_LENGTH, words: Iterable[str] | None = None) -> T5Tokenizer:
    """Build a Unigram ``T5Tokenizer`` (as used by PixArt / Wan) over the tiny word list, in memory.

    Words are ``▁word`` pieces; other words fall back to single characters and unknown characters map to ``<unk>``.

    Args:
        model_max_length: Tokenizer ``model_max_length``; the pipelines pass their own ``max_sequence_length``.
        words: Words that become single ``▁word`` pieces (default: :func:`vocabulary_words`).

    Returns:
        A ready ``T5Tokenizer`` with ``<pad>``=0, ``</s>``=1, ``<unk>``=2 and an ``</s>`` appended to each text.
    """
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    words_ = vocabulary_words() if words is None else list(words)
    pieces += [(f"▁{w}", -1.0 - 0.01 * len(w)) for w in words_]
    pieces += [(c, -5.0) for c in _LETTERS + [c.upper() for c in _LETTERS] + _DIGITS + _PUNCT]
    pieces += [(f"▁{c}", -4.5) for c in [c.upper() for c in _LETTERS] + _DIGITS + _PUNCT]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_gemma_tokenizer(model_max_length: int = 2048) -> GemmaTokenizer:
    """Build a BPE ``GemmaTokenizer`` (as used by Sana) over the tiny word list, in memory.

    Words are ``▁word`` tokens built by BPE merges; anything else falls back to characters and then to byte tokens
    (``<0xNN>``), so every text tokenizes.

    Args:
        model_max_length: Tokenizer ``model_max_length`` (Sana's default complex human instruction needs ~600).

    Returns:
        A ready ``GemmaTokenizer`` (``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3, right padding, bos added).
    """
    vocab: dict[str, int] = {}
    for tok in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", *_BYTE_TOKENS):
        vocab[tok] = len(vocab)
    for ch in ["▁", "\n", *_LETTERS, *(c.upper() for c in _LETTERS), *_DIGITS, *_PUNCT]:
        vocab.setdefault(ch, len(vocab))
    words: list[list[str]] = []
    for w in vocabulary_words():
        for variant in (w, w[0].upper() + w[1:]):
            words += [["▁", *variant], list(variant)]
    merges = _word_merges([sym for sym in words if len(sym) > 1], vocab)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, add_bos_token=True)
    tokenizer.padding_side = "right"
    return tokenizer


def _clip_text_config(tokenizer: CLIPTokenizer, hidden_size: int, projection_dim: int | None = None) -> CLIPTextConfig:
    """2-layer CLIP text config whose vocab, positions and special-token ids match ``tokenizer``."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim or hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


def _tiny_vae_kl(seed: int, latent_channels: int = 4) -> AutoencoderKL:
    """4-level tiny ``AutoencoderKL`` (spatial factor 8, like SD)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
    )


def _finish(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Move to CPU (weights are already float32) and silence progress bars."""
    pipe = pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Build a tiny random Stable Diffusion 1.5-style pipeline.

    UNet: 2 levels (16, 32 channels), one cross-attention block per level (``attn2`` over 32-dim CLIP states).
    VAE: factor 8. Text: 2-layer CLIP (hidden 32), tokenizer ``model_max_length`` 77. Default size 64x64.

    Args:
        seed: Seed for all random weights (``torch.manual_seed(seed)`` before each component).

    Returns:
        A ``StableDiffusionPipeline`` on CPU in float32 (no safety checker).
    """
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden_size=32)).eval()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_head_dim=4,
        norm_num_groups=4,
        cross_attention_dim=32,
    ).eval()
    vae = _tiny_vae_kl(seed).eval()
    torch.manual_seed(seed)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """Build a tiny random Stable Diffusion XL-style pipeline.

    Two CLIP text encoders (hidden 16 and 32, ``CLIPTextModelWithProjection`` projection 32), so the UNet
    ``cross_attention_dim`` is 48; ``addition_embed_type="text_time"`` with ``addition_time_embed_dim`` 8
    (``projection_class_embeddings_input_dim`` = 6 * 8 + 32). VAE factor 8, default size 64x64, no watermarker.

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``StableDiffusionXLPipeline`` on CPU in float32.
    """
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden_size=16)).eval()
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, hidden_size=32, projection_dim=32))
    text_encoder_2 = text_encoder_2.eval()
    cross_dim = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    time_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        norm_num_groups=4,
        cross_attention_dim=cross_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_encoder_2.config.projection_dim,
    ).eval()
    vae = _tiny_vae_kl(seed).eval()
    torch.manual_seed(seed)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _finish(pipe)


def _tiny_umt5(seed: int, d_model: int = 16) -> tuple[T5Tokenizer, UMT5EncoderModel]:
    """Tokenizer and 1-layer UMT5 encoder for the Wan pipelines."""
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


def tiny_pixart_sigma_pipeline(seed: int = 0) -> PixArtSigmaPipeline:
    """Build a tiny random PixArt-Sigma pipeline.

    Transformer: 2 blocks, 2 heads x 8, patch 2, ``sample_size=32`` (so the default resolution binning is valid);
    T5 encoder (1 layer, d_model 16); VAE factor 8; DDIM scheduler. Recommended: ``use_resolution_binning=False``
    and a small ``max_sequence_length`` (the default 300 also works).

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``PixArtSigmaPipeline`` on CPU in float32.
    """
    tokenizer = tiny_t5_tokenizer(model_max_length=300)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=16,
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
    ).eval()
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=32,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=text_encoder.config.d_model,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=16,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    ).eval()
    vae = _tiny_vae_kl(seed).eval()
    torch.manual_seed(seed)
    scheduler = DDIMScheduler()
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return _finish(pipe)


def tiny_sana_pipeline(seed: int = 0) -> SanaPipeline:
    """Build a tiny random Sana pipeline.

    Transformer: 1 block, 2 heads x 8 (linear self-attention, ``attn2`` cross-attention to the text), patch 1,
    ``sample_size=16`` (valid for resolution binning); Gemma2 text encoder (2 layers, hidden 16); 3-stage
    ``AutoencoderDC`` (spatial factor 4); flow-match Euler scheduler. The default ``complex_human_instruction``
    works (it encodes to 211 tokens that are prepended; ``model_max_length`` is 2048).

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``SanaPipeline`` on CPU in float32.
    """
    tokenizer = tiny_gemma_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=2048,
            sliding_window=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            attn_implementation="eager",
        )
    ).eval()
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=8,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=text_encoder.config.hidden_size,
        sample_size=16,
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    torch.manual_seed(seed)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return _finish(pipe)


def tiny_condition_image(height: int = 32, width: int = 32, seed: int = 0) -> Image.Image:
    """Make a small deterministic RGB image, e.g. the ``image`` argument of the tiny Wan I2V pipeline.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        seed: Seed of the random pixel values.

    Returns:
        A PIL RGB image.
    """
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), mode="RGB")


# The MM-DiT builders live in their own module; it imports the helpers above lazily, so this import has no cycle.
from nagkit.tiny.mmdit import (  # noqa: E402
    tiny_chroma_pipeline,
    tiny_flux_dev_pipeline,
    tiny_flux_kontext_pipeline,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd35_pipeline,
)

#: Builders by short name.
TINY_PIPELINES: dict[str, Callable[..., DiffusionPipeline]] = {
    "tiny-sd15": tiny_sd15_pipeline,
    "tiny-sdxl": tiny_sdxl_pipeline,
    "tiny-wan": tiny_wan_pipeline,
    "tiny-wan22": tiny_wan22_pipeline,
    "tiny-wan-i2v": tiny_wan_i2v_pipeline,
    "tiny-pixart-sigma": tiny_pixart_sigma_pipeline,
    "tiny-sana": tiny_sana_pipeline,
    "tiny-sd3": tiny_sd3_pipeline,
    "tiny-sd35": tiny_sd35_pipeline,
    "tiny-flux": tiny_flux_pipeline,
    "tiny-flux-dev": tiny_flux_dev_pipeline,
    "tiny-flux-kontext": tiny_flux_kontext_pipeline,
    "tiny-chroma": tiny_chroma_pipeline,
}

#: Recommended small call kwargs per tiny pipeline (the Wan I2V pipeline additionally needs ``image=``).
TINY_CALL_KWARGS: dict[str, dict[str, Any]] = {
    "tiny-sd15": {"height": 64, "width": 64},
    "tiny-sdxl": {"height": 64, "width": 64},
    "tiny-wan": {"height": 32, "width": 32, "num_frames": 5},
    "tiny-wan22": {"height": 32, "width": 32, "num_frames": 5},
    "tiny-wan-i2v": {"height": 32, "width": 32, "num_frames": 5},
    "tiny-pixart-sigma": {
        "height": 64,
        "width": 64,
        "use_resolution_binning": False,
        "max_sequence_length": 32,
        "clean_caption": False,
    },
    "tiny-sana": {"height": 32, "width": 32, "use_resolution_binning": False, "max_sequence_length": 32},
    # MM-DiT: T5 length 32 (CLIP stays 77; SD3's joint text is 77 + 32 tokens). Kontext: the output size comes from
    # max_area, and _auto_resize=False keeps an `image=` at its own (tiny) size instead of a ~1 MP preferred one.
    "tiny-sd3": {"height": 64, "width": 64, "max_sequence_length": 32},
    "tiny-sd35": {"height": 64, "width": 64, "max_sequence_length": 32},
    "tiny-flux": {"height": 64, "width": 64, "max_sequence_length": 32},
    "tiny-flux-dev": {"height": 64, "width": 64, "max_sequence_length": 32},
    "tiny-flux-kontext": {
        "height": 64,
        "width": 64,
        "max_sequence_length": 32,
        "max_area": 64 * 64,
        "_auto_resize": False,
    },
    "tiny-chroma": {"height": 64, "width": 64, "max_sequence_length": 32},
}
