"""Tiny, seeded-random diffusers pipelines built fully offline: the registry and the shared fixture helpers.

Each model family's module in :mod:`nagkit.adapters` holds its own tiny builders and their call kwargs
(``Adapter.tiny``); this module collects them into :data:`TINY_PIPELINES` and :data:`TINY_CALL_KWARGS` (re-exporting
the builders) and holds what the builders share: the in-memory tokenizers over a small English vocabulary, CLIP text
configs, the SD-style VAE, constants, and :func:`tiny_condition_image`.

Every builder returns a real diffusers pipeline object (on CPU, float32) whose components are randomly initialised
from a fixed seed (``torch.manual_seed(seed)`` before each component) and whose tokenizers are built in memory from a
small English word vocabulary. Nothing is downloaded. The pipelines are meant for tests and CPU demos: a 2-step call
at the sizes in :data:`TINY_CALL_KWARGS` takes a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from PIL import Image
from transformers import CLIPTextConfig, CLIPTokenizer, GemmaTokenizer, T5Tokenizer

from nagkit.adapters.base import TINY_MODELS

# The built-in builders live in their family modules; re-exported here under their historical names (a new family's
# builders are reached through TINY_PIPELINES).
from nagkit.adapters.chroma import tiny_chroma_pipeline
from nagkit.adapters.flux import tiny_flux_dev_pipeline, tiny_flux_kontext_pipeline, tiny_flux_pipeline
from nagkit.adapters.pixart import tiny_pixart_sigma_pipeline
from nagkit.adapters.sana import tiny_sana_pipeline
from nagkit.adapters.sd3 import tiny_sd3_pipeline, tiny_sd35_pipeline
from nagkit.adapters.unet import tiny_sd15_pipeline, tiny_sdxl_pipeline
from nagkit.adapters.wan import tiny_wan22_pipeline, tiny_wan_i2v_pipeline, tiny_wan_pipeline

__all__ = [
    "CLIP_MAX_LENGTH",
    "TINY_CALL_KWARGS",
    "TINY_PIPELINES",
    "WAN_TEXT_LENGTH",
    "WAN22_BOUNDARY_RATIO",
    "tiny_chroma_pipeline",
    "tiny_clip_tokenizer",
    "tiny_condition_image",
    "tiny_flux_dev_pipeline",
    "tiny_flux_kontext_pipeline",
    "tiny_flux_pipeline",
    "tiny_gemma_encoder",
    "tiny_gemma_tokenizer",
    "tiny_pixart_sigma_pipeline",
    "tiny_sana_pipeline",
    "tiny_sd15_pipeline",
    "tiny_sd35_pipeline",
    "tiny_sd3_pipeline",
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


def tiny_gemma_encoder(seed: int = 0) -> tuple[GemmaTokenizer, Any]:
    """The tiny Gemma2 text encoder (2 layers, hidden 16, eager attention, seeded) and its tokenizer: what the Sana,
    SANA-Video and Lumina 2 tiny pipelines encode text with.

    Args:
        seed: Seed of the random weights.

    Returns:
        ``(tokenizer, text_encoder)``, the encoder a ``Gemma2Model`` on CPU in float32, in eval mode.
    """
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = tiny_gemma_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=2048, sliding_window=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager")).eval()
    return tokenizer, text_encoder


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


#: Builders by short name, from every registered family (``Adapter.tiny``), in registration order.
TINY_PIPELINES: dict[str, Callable[..., DiffusionPipeline]] = {name: m.builder for name, m in TINY_MODELS.items()}

#: Recommended small call kwargs per tiny pipeline (the Wan I2V pipeline additionally needs ``image=``).
TINY_CALL_KWARGS: dict[str, dict[str, Any]] = {name: m.call_kwargs for name, m in TINY_MODELS.items()}
