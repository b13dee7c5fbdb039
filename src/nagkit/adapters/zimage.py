"""Z-Image ``ZImageTransformer2DModel`` (Z-Image, Z-Image-Turbo): NAG in every main layer, the negative caption as a
side-car stream.

Z-Image is a single-stream DiT: per sample, the 30 main layers (``layers.*``, processor ``ZSingleStreamAttnProcessor``)
attend over one unified sequence ``[image, caption]`` (basic mode). Packing the negative caption after the prompt's
(nagkit's default) would be wrong three times over:

* captions arrive as a Python list of per-sample valid tokens (``cap_feats``); the model pads each caption to a
  multiple of 32 with the learned ``cap_pad_token``, and those pad tokens are attended;
* a ``context_refiner`` (self-attention over the caption) runs before the main layers and would mix prompt and
  negative tokens;
* caption token ``j`` sits at RoPE position ``(1 + j, 0, 0)`` and the image at ``(E + 1 + f, h, w)``, ``E`` the
  padded caption length: a longer packed caption would move the image.

So the prompt's path through the model is left untouched (Pattern B, "side-car stream"), and the negative caption is
carried next to it:

* ``plan`` (per guided call): the guided rows (batched CFG is one call ``[cond…, uncond…]``; only the conditional
  half is guided) and the negative caption of each guided row;
* at the first main layer the negative is made exactly as the model makes a caption, with the model's own code:
  ``cap_embedder``, padding to a multiple of 32 with ``cap_pad_token`` (its own padding, not the prompt's), the
  ``context_refiner`` layers with its own positions ``(1 + j, 0, 0)``; in the main layers its axis-0 positions are
  shifted by ``d = E_p − E_n`` (per row), so that every negative↔image and negative↔negative relative offset equals
  a run of the model on the negative alone (RoPE is relative). Rows that leave the RoPE table (``d < 0``) are
  computed on the fly with the model's own frequency formula (bit-equal to the table where both exist);
* block hooks on ``layers[i]``: the negative stream ``(B, N, D)`` is appended to the layer's input, the layer's own
  forward runs (its attention goes through the NAG processor, which reads the segment bounds from the state), the
  output is split, the negative part is kept for the next layer and the prompt part returned — so the controlnet
  residuals, added to the unified sequence between layers, reach the prompt exactly as without NAG;
* the NAG processor: image queries get ``NAG(Z+, Z-)`` with ``Z+`` over ``[image, prompt caption]`` and ``Z-`` over
  ``[image, negative caption]`` (image→image attention computed once, merged by log-sum-exp); the prompt's caption
  tokens attend as in the plain model; the negative's caption tokens attend to ``[image, negative caption]``, as if
  the negative were the prompt. Unguided rows (the unconditional half of CFG) get the plain attention.

Limits (each refused with an error naming it): Omni mode (``ZImageOmniPipeline``, nested image lists,
``siglip_feats``); images of different sizes in one call; context parallelism; gradient checkpointing with gradients
on. A pipeline call with ``prompt_embeds`` and no ``prompt`` skips ``encode_prompt``, so no NAG negative is made for
it (nagkit's hook raises). The image's own pad tokens (present when the patch count is not a multiple of 32, e.g.
1280×720) sit at position 0 whatever the caption length, so their offsets to the negative caption differ by ``d``
from a negative-alone run; every real image token is exact. The negative caption does not receive controlnet
residuals (they are shaped for the prompt's unified sequence). On a batched CFG call the unconditional rows carry an
unused (zero) negative slot through the layers' per-token work.

The family's file: the NAG processor, plan and block hooks, the adapter; the pipelines (``ZImagePipeline``,
``ZImageImg2ImgPipeline``, ``ZImageInpaintPipeline``, ``ZImageControlNetPipeline``,
``ZImageControlNetInpaintPipeline``) and preset (``z-image``); the meta inputs of ``nagkit bench``; the tiny
pipeline ``tiny-z-image`` (and ``tiny_zimage_controlnet_pipeline`` for tests: the CLI takes no control image).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from diffusers import ZImageTransformer2DModel
from diffusers.models.transformers.transformer_z_image import (
    SEQ_MULTI_OF,
    ZImageTransformerBlock,
    ZSingleStreamAttnProcessor,
)

from ..core.config import NAGConfig
from ..core.operator import nag_combine
from ..core.state import Packing
from ..kernels import joint as _joint
from ..kernels.lse import attend, attention_with_lse_backend, merge_attention
from .base import Adapter, NAGProcessor, PipelineSpec, TinyModel, register_adapter

if TYPE_CHECKING:
    from diffusers import ZImageControlNetPipeline, ZImagePipeline

    from ..bench.families import FamilySpec, Inputs
    from ..core.state import NAGState, Negative

_KEY = "zimage"  # state.extras key of the call's layout
_OMNI = ("ZImageTransformer2DModel Omni mode (nested image lists / siglip_feats / image_noise_mask, as "
         "ZImageOmniPipeline calls it) is not supported by NAG; supported: basic mode (one image per sample: "
         "ZImagePipeline, ZImageImg2ImgPipeline, ZImageInpaintPipeline, ZImageControlNetPipeline, "
         "ZImageControlNetInpaintPipeline)")


@dataclass
class _Layout:
    """One guided call: rows, segment bounds and the negative stream between layers.

    Attributes:
        model: the denoiser (its ``cap_embedder``, ``context_refiner``, ``cap_pad_token``, RoPE settings).
        rows: the guided rows (contiguous).
        negatives: the raw negative caption features ``(Ln_g, C)`` of each guided row, in row order.
        image_len: padded image tokens ``X`` (the same for every row).
        prompt_lens: padded caption length ``E_p`` of every row.
        layers: ids of the main layers (the only blocks that carry the stream).
        length: unified length ``L`` (set at the first main layer).
        stream: the negative stream ``(B, N, D)`` between main layers (zeros on unguided rows).
        freqs: its RoPE ``(B, N, D_head/2)`` (complex).
        mask_prompt, mask_full, mask_negative, mask_negative_full: boolean key masks (None when all keys are valid):
            prompt caption keys ``(B, 1, 1, L − X)``, all prompt keys ``(B, 1, 1, L)``, negative keys
            ``(G, 1, 1, N)``, ``[image, negative]`` keys ``(G, 1, 1, X + N)``.
        negative_lens: padded negative caption length ``E_n`` of every guided row (set at the first main layer).
    """

    model: torch.nn.Module
    rows: slice
    negatives: list[torch.Tensor]
    image_len: int
    prompt_lens: list[int]
    layers: frozenset[int]
    length: int | None = None
    stream: torch.Tensor | None = None
    freqs: torch.Tensor | None = None
    mask_prompt: torch.Tensor | None = None
    mask_full: torch.Tensor | None = None
    mask_negative: torch.Tensor | None = None
    mask_negative_full: torch.Tensor | None = None
    negative_lens: list[int] = field(default_factory=list)


def _padded(n: int) -> int:
    return n + (-n) % SEQ_MULTI_OF


# ------------------------------------------------------------------------------------------------ NAG processor
def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``ZSingleStreamAttnProcessor``'s RoPE: ``x`` ``(B, S, H, D)`` times the complex ``freqs`` ``(B, S, D/2)``."""
    with torch.amp.autocast("cuda", enabled=False):
        complex_x = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(complex_x * freqs.unsqueeze(2)).flatten(3).type_as(x)


def _heads_last(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2, 3)


def nag_single_stream_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: _Layout,
                                config: NAGConfig, backend: Any = None) -> torch.Tensor:
    """NAG attention over ``[image X | prompt caption (+ batch padding) | negative caption N]``.

    Args:
        query, key, value: heads-first ``(B, H, L + N, D)`` (norms and RoPE applied).
        layout: the call's layout (segment bounds, key masks, guided rows).
        config: NAG settings.
        backend: the module's diffusers attention backend.

    Returns:
        ``(B, L + N, H·D)``: the plain attention output for the prompt's caption tokens (every row) and the image
        tokens of unguided rows, ``NAG(Z+, Z-)`` for the image tokens of guided rows, the negative caption's own
        attention over ``[image, negative caption]`` (guided rows; zeros elsewhere).
    """
    x, length, rows = layout.image_len, layout.length, layout.rows
    all_rows = rows.start == 0 and rows.stop == query.shape[0]
    q_i, k_i, v_i = query[:, :, :x], key[:, :, :x], value[:, :, :x]
    k_main, v_main = key[:, :, :length], value[:, :, :length]
    q_n, k_n, v_n = query[rows, :, length:], key[rows, :, length:], value[rows, :, length:]
    k_in, v_in = torch.cat([k_i[rows], k_n], dim=2), torch.cat([v_i[rows], v_n], dim=2)
    # the prompt's caption tokens (and batch padding): the plain model's attention over [image, prompt caption]
    out_caption = attend(query[:, :, x:length], k_main, v_main, layout.mask_full, backend)
    # the negative's caption tokens: [image, negative caption], as if the negative were the prompt
    out_negative = attend(q_n, k_in, v_in, layout.mask_negative_full, backend)
    image = positive = negative = None
    if not _joint._TWO_ATTENTIONS:  # image→image once, merged with the two small image→caption parts
        image = attention_with_lse_backend(q_i, k_i, v_i, None, backend, dead=None)
        positive = image and attention_with_lse_backend(q_i, key[:, :, x:length], value[:, :, x:length],
                                                        layout.mask_prompt, backend, dead=None)
        negative = positive and attention_with_lse_backend(q_i[rows], k_n, v_n, layout.mask_negative, backend,
                                                           dead=None)
    if negative is not None:
        z_pos = merge_attention([image, positive], heads_last=True)
        z_neg = merge_attention([(image[0][rows], image[1][rows]), negative], heads_last=True)
    else:  # two full attentions (no LSE from this backend, or force_two_attentions())
        z_pos = attend(q_i, k_main, v_main, layout.mask_full, backend)
        z_neg = attend(q_i[rows], k_in, v_in, layout.mask_negative_full, backend)
    z_pos, z_neg = _heads_last(z_pos), _heads_last(z_neg)
    guided = nag_combine(z_pos[rows], z_neg, config.scale, config.tau, config.alpha, config.norm)
    out_negative = _heads_last(out_negative)
    if not all_rows:
        guided = torch.cat([z_pos[: rows.start], guided, z_pos[rows.stop:]], dim=0)
        blank = out_negative.new_zeros(rows.start, *out_negative.shape[1:])
        tail = out_negative.new_zeros(query.shape[0] - rows.stop, *out_negative.shape[1:])
        out_negative = torch.cat([blank, out_negative, tail], dim=0)
    return torch.cat([guided.to(query.dtype), _heads_last(out_caption).to(query.dtype),
                      out_negative.to(query.dtype)], dim=1)


class NAGZSingleStreamAttnProcessor(NAGProcessor):
    """``ZSingleStreamAttnProcessor`` with NAG on the image tokens of the guided rows and the negative caption as its
    own segment after the unified sequence (see :func:`nag_single_stream_attention`)."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        layout = None if self.packing is None else self.state.extras.get(_KEY)
        if layout is None or layout.length is None or hidden_states.shape[1] == layout.length:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        if self._parallel_config is not None:
            raise NotImplementedError("NAG on Z-Image does not support context parallelism (enable_parallelism): the "
                                      "sequence split would cut the side-car negative caption")
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = _rotate(query, freqs_cis), _rotate(key, freqs_cis)
        dtype = query.dtype
        out = nag_single_stream_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), layout,
                                          self.state.config, self._attention_backend)
        output = attn.to_out[0](out.to(dtype))
        if len(attn.to_out) > 1:  # dropout
            output = attn.to_out[1](output)
        return output


def _main_attention(name: str, module: torch.nn.Module) -> bool:
    """The main layers' attention (``layers.<i>.attention``), not the noise / context refiners'."""
    parts = name.split(".")
    return len(parts) == 3 and parts[0] == "layers" and parts[2] == "attention"


# ------------------------------------------------------------------------------------------------ rows and plan
def _negative_rows(negative: Negative) -> list[torch.Tensor]:
    embeds = negative.embeds
    if isinstance(embeds, torch.Tensor):
        if embeds.ndim == 2:
            return [embeds]
        return list(embeds.unbind(0))
    return list(embeds)


def _matches(text: list[torch.Tensor], positive: list[torch.Tensor], per: int) -> bool:
    """Every row ``i`` of the call is the prompt ``i // per`` (by identity first: pipelines pass the very tensors
    ``encode_prompt`` returned)."""
    for i, row in enumerate(text):
        p = positive[i // per]
        if row is p:
            continue
        if row.shape != p.shape or not torch.equal(row, p.to(device=row.device, dtype=row.dtype)):
            return False
    return True


def _guided(batch: int, negatives: list[torch.Tensor], positive: list[torch.Tensor] | None,
            text: list[torch.Tensor], pipeline: str | None) -> tuple[slice, list[torch.Tensor]]:
    """The guided rows of a call of ``batch`` rows and the negative of each.

    Z-Image pipelines call the denoiser once per step with ``[cond…, uncond…]`` under CFG (no ``cache_context``),
    each prompt repeated ``num_images_per_prompt`` times, and never make a separate unconditional call. A pipeline
    call is batched CFG unless every row is its prompt (then it is ``num_images_per_prompt`` copies without CFG).
    A bare denoiser: ``R`` rows guide ``R`` rows, one row guides every row, ``2R`` rows are batched CFG in Z-Image's
    order (the first half guided).
    """
    r = len(negatives)
    if pipeline is None:
        if batch == r:
            return slice(0, batch), negatives
        if r == 1:
            return slice(0, batch), negatives * batch
        if batch == 2 * r:
            return slice(0, r), negatives
    elif batch % r == 0:
        per = batch // r
        if per % 2 == 1 or (positive is not None and _matches(text, positive, per)):
            return slice(0, batch), [n for n in negatives for _ in range(per)]
        return slice(0, batch // 2), [n for n in negatives for _ in range(per // 2)]
    raise ValueError(f"the negative has {r} rows but the Z-Image denoiser was called with batch {batch}; expected "
                     f"{r} (guide all rows), a multiple of {r} (images per prompt) or twice that (batched CFG "
                     "[cond…, uncond…]: guide the conditional half)")


def _default(model: torch.nn.Module, name: str) -> Any:
    return inspect.signature(type(model).forward).parameters[name].default


def _plan(model: torch.nn.Module, access: Any, args: tuple, kwargs: dict, negative: Negative, state: NAGState,
          pipeline: str | None, named: bool) -> tuple[tuple, dict, Packing] | None:
    """``Adapter.plan``: the guided rows and the layout of the side-car negative; the call's inputs stay as they
    are (the prompt's path through the model is the original one)."""
    images = access.get("x", args, kwargs)
    text = access.get("cap_feats", args, kwargs)
    if (isinstance(images[0], (list, tuple)) or access.get("siglip_feats", args, kwargs) is not None
            or access.get("image_noise_mask", args, kwargs) is not None):
        raise NotImplementedError(_OMNI)
    if torch.is_grad_enabled() and getattr(model, "gradient_checkpointing", False):
        raise NotImplementedError("NAG on Z-Image does not support gradient checkpointing (the side-car negative "
                                  "stream is carried from layer to layer, and a recomputed layer would see a later "
                                  "one's); run under torch.no_grad() or disable gradient checkpointing")
    negatives = _negative_rows(negative)
    rows, negatives = _guided(len(text), negatives, negative.positive, list(text), pipeline)
    channels = text[0].shape[-1]
    if any(n.ndim != 2 or n.shape[-1] != channels for n in negatives):
        raise ValueError(f"negative caption features must be (tokens, {channels}) per row, like cap_feats")
    patch = access.get("patch_size", args, kwargs) or _default(model, "patch_size")
    f_patch = access.get("f_patch_size", args, kwargs) or _default(model, "f_patch_size")
    lengths = {_padded((c[1] // f_patch) * (c[2] // patch) * (c[3] // patch))
               for c in (tuple(image.shape) for image in images)}
    if len(lengths) != 1:
        raise NotImplementedError("NAG on Z-Image needs images of one size per call (the pipelines always pass "
                                  "one); call the denoiser once per image size")
    device, dtype = text[0].device, text[0].dtype
    negatives = [n.to(device=device, dtype=dtype) for n in negatives]
    state.extras[_KEY] = _Layout(
        model=model, rows=rows, negatives=negatives, image_len=lengths.pop(),
        prompt_lens=[_padded(len(c)) for c in text], layers=frozenset(id(layer) for layer in model.layers))
    packing = Packing(lp=max(_padded(len(c)) for c in text), ln=max(_padded(len(n)) for n in negatives), rows=rows,
                      batch=len(text))
    return args, kwargs, packing


# ------------------------------------------------------------------------------------------------ negative stream
def _axis_freqs(model: torch.nn.Module, positions: torch.Tensor) -> torch.Tensor:
    """Axis-0 RoPE factors of integer ``positions`` (any sign or size) with the model's own formula
    (``RopeEmbedder.precompute_freqs_cis``: float64 angles on the CPU, cast to float32, complex64): bit-equal to the
    table's rows where the table has them."""
    rope = model.rope_embedder
    dim = rope.axes_dims[0]
    freqs = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    angles = torch.outer(positions.to(device="cpu", dtype=torch.float64), freqs).float()
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def negative_caption_stream(model: torch.nn.Module, negatives: list[torch.Tensor]
                            ) -> tuple[torch.Tensor, list[int]]:
    """The negative captions as the main layers receive a caption, made with the model's own code:
    ``cap_embedder``, padding to a multiple of 32 (``_pad_with_ids``: positions ``(1 + j, 0, 0)``, pad tokens
    replaced by ``cap_pad_token`` in ``_prepare_sequence``), the ``context_refiner`` layers (its own positions and
    batch-padding mask).

    Args:
        model: the denoiser.
        negatives: raw caption features ``(Ln_g, C)`` per row.

    Returns:
        ``(stream (G, N, D), padded lengths E_n)``; rows beyond a row's ``E_n`` are batch padding.
    """
    device = negatives[0].device
    feats, pos_ids, pad_masks = [], [], []
    for cap in negatives:
        padded, ids, pad_mask, _, _ = model._pad_with_ids(cap, (_padded(len(cap)), 1, 1), (1, 0, 0), device)
        feats.append(padded)
        pos_ids.append(ids)
        pad_masks.append(pad_mask)
    lens = [len(f) for f in feats]
    embedded = model.cap_embedder(torch.cat(feats, dim=0))
    stream, freqs, mask, _, _ = model._prepare_sequence(list(embedded.split(lens, dim=0)), pos_ids, pad_masks,
                                                        model.cap_pad_token, None, device)
    for layer in model.context_refiner:
        stream = layer(stream, mask, freqs)
    return stream, lens


def _start_stream(layout: _Layout, x: torch.Tensor, freqs_cis: torch.Tensor) -> None:
    """At the first main layer: the negative stream, its shifted RoPE rows and the key masks."""
    model, rows = layout.model, layout.rows
    batch, length, dim = x.shape
    xl = layout.image_len
    if length != max(xl + e for e in layout.prompt_lens):
        raise RuntimeError(f"unexpected Z-Image layout: unified length {length}, expected image {xl} + padded captions "
                           f"{layout.prompt_lens} (a diffusers change NAG does not know)")
    layout.length = length
    stream, lens = negative_caption_stream(model, layout.negatives)
    layout.negative_lens = lens
    n = stream.shape[1]
    full = x.new_zeros(batch, n, dim)
    full[rows] = stream.to(x.dtype)
    layout.stream = full
    # RoPE: caption token j of the negative at (1 + j + d, 0, 0), d = E_p − E_n of its row
    half = freqs_cis.shape[-1]
    axis0 = model.rope_embedder.axes_dims[0] // 2
    freqs = torch.zeros(batch, n, half, dtype=torch.complex64)
    for g, e_n in enumerate(lens):
        row = rows.start + g
        positions = torch.arange(e_n) + 1 + (layout.prompt_lens[row] - e_n)
        freqs[row, :e_n, :axis0] = _axis_freqs(model, positions)
        freqs[row, :e_n, axis0:] = 1  # axes 1, 2 at position 0
    layout.freqs = freqs.to(device=freqs_cis.device, dtype=freqs_cis.dtype)
    # key masks (None where every key is valid)
    device = x.device
    keys = torch.arange(length - xl, device=device)
    prompt = keys[None] < torch.tensor(layout.prompt_lens, device=device)[:, None]
    if any(e != length - xl for e in layout.prompt_lens):
        layout.mask_prompt = prompt[:, None, None]
        ones = torch.ones(batch, xl, dtype=torch.bool, device=device)
        layout.mask_full = torch.cat([ones, prompt], dim=1)[:, None, None]
    if any(e != n for e in lens):
        neg = torch.arange(n, device=device)[None] < torch.tensor(lens, device=device)[:, None]
        layout.mask_negative = neg[:, None, None]
        ones = torch.ones(len(lens), xl, dtype=torch.bool, device=device)
        layout.mask_negative_full = torch.cat([ones, neg], dim=1)[:, None, None]


def _layer_forward(block: ZImageTransformerBlock, state: NAGState, original: Any, x: torch.Tensor,
                   attn_mask: torch.Tensor | None, freqs_cis: torch.Tensor, adaln_input: torch.Tensor | None = None,
                   noise_mask: torch.Tensor | None = None, adaln_noisy: torch.Tensor | None = None,
                   adaln_clean: torch.Tensor | None = None) -> torch.Tensor:
    """A main layer on a guided call: ``[unified | negative]`` through the layer's own forward, split again."""
    layout = state.extras.get(_KEY)
    if layout is None or id(block) not in layout.layers:  # refiners, or a block of another model
        return original(x, attn_mask, freqs_cis, adaln_input, noise_mask, adaln_noisy, adaln_clean)
    if noise_mask is not None:
        raise NotImplementedError(_OMNI)
    if layout.stream is None:
        _start_stream(layout, x, freqs_cis)
    length = layout.length
    out = original(torch.cat([x, layout.stream.to(x.dtype)], dim=1), attn_mask,
                   torch.cat([freqs_cis, layout.freqs], dim=1), adaln_input)
    layout.stream = out[:, length:]
    return out[:, :length]


def _window(config: NAGConfig, timestep: float) -> bool:
    """Z-Image pipelines pass ``t' = (1000 − t)/1000``: the schedule position itself (0 first, 1 last)."""
    return config.start <= timestep <= config.end


# ------------------------------------------------------------------------------------------------ nagkit bench
def zimage_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one Z-Image call: lists of ``batch`` latents ``(C, 1, H, W)`` and captions
    ``(text_tokens, text_dim)``, the reversed timestep; the negative as a ``(1, tokens, dim)`` caption."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    kwargs = {"x": [c.meta(g.latent_channels, 1, h, w) for _ in range(batch)], "t": c.timestep,
              "cap_feats": [c.meta(g.text_tokens, g.text_dim) for _ in range(batch)], "return_dict": False}
    return Inputs(kwargs=kwargs, text_arg="cap_feats", negative={"cap_feats": c.negative["encoder_hidden_states"]})


def zimage_text_flops(model: torch.nn.Module, spec: FamilySpec) -> int:
    """The negative's self-attention in the ``context_refiner`` layers (``4·C·Ln²`` each), which the per-token
    ``text_linears`` patterns of the analytic minimum cannot describe."""
    g = spec.geometry
    return sum(g.batch * 4 * layer.attention.to_q.out_features * g.negative_length ** 2
               for layer in model.context_refiner)


# ------------------------------------------------------------------------------------------------ tiny pipelines
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def tiny_qwen_tokenizer(model_max_length: int = 1024) -> Any:
    """A byte-level BPE ``Qwen2Tokenizer`` over the tiny word list (``Ġword`` and ``word`` are single tokens), with
    Qwen's chat markers and a Qwen3-style chat template (``enable_thinking``), built in memory.

    Returns:
        The tokenizer (pad ``<|endoftext|>``, eos ``<|im_end|>``, right padding).
    """
    from transformers import Qwen2Tokenizer

    from ..tiny.pipelines import _bytes_to_unicode, _word_merges, vocabulary_words

    table = _bytes_to_unicode()
    vocab = {ch: i for i, ch in enumerate(table.values())}
    words: list[list[str]] = []
    for word in [*vocabulary_words(), "user", "assistant", "system"]:
        words += [[table[ord(" ")], *word], list(word)]
    merges = _word_merges([w for w in words if len(w) > 1], vocab)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


#: Tiny Z-Image sizes: caption features 16 wide (the tiny Qwen3's hidden size), transformer width 32 = 2 heads x 16.
TINY_CAPTION_DIM = 16


def tiny_zimage_transformer(seed: int = 0, cap_feat_dim: int = TINY_CAPTION_DIM) -> ZImageTransformer2DModel:
    """2 main layers, 2 noise + 2 context refiner layers, 2 heads x 16 (RoPE axes 4 + 6 + 6, table 256/64/64),
    16 latent channels, patch 2."""
    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=2,
        n_heads=2, n_kv_heads=2, cap_feat_dim=cap_feat_dim, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64]).eval()
    with torch.no_grad():  # the released pad tokens are learned, not zero
        model.cap_pad_token.normal_()
        model.x_pad_token.normal_()
    return model


def _zimage_components(seed: int) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import Qwen3Config, Qwen3Model

    from ..tiny.mmdit import FLUX_VAE_FACTORS, _tiny_vae

    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TINY_CAPTION_DIM, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    # Z-Image-Turbo's scheduler: flow matching with a fixed shift of 3
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return {"scheduler": scheduler, "vae": _tiny_vae(seed, FLUX_VAE_FACTORS), "text_encoder": text_encoder,
            "tokenizer": tokenizer, "transformer": tiny_zimage_transformer(seed)}


def tiny_zimage_pipeline(seed: int = 0, kind: str = "ZImagePipeline") -> ZImagePipeline:
    """Build a tiny random Z-Image pipeline (``ZImagePipeline``; ``kind`` picks ``ZImageImg2ImgPipeline`` or
    ``ZImageInpaintPipeline`` on the same components).

    Transformer: :func:`tiny_zimage_transformer`. Text: a 2-layer ``Qwen3Model`` (hidden 16; the pipeline takes the
    second-to-last hidden state) with :func:`tiny_qwen_tokenizer`. VAE: factor 8, 16 latent channels, Flux factors
    (height/width multiples of 16). Scheduler: flow-match Euler, shift 3 (Z-Image-Turbo's). CFG runs when
    ``guidance_scale > 0`` (Z-Image-Turbo is used with 0).

    Args:
        seed: seed of every random weight.
        kind: the pipeline class name.

    Returns:
        The pipeline on CPU in float32.
    """
    import diffusers

    from ..tiny.pipelines import _finish

    return _finish(getattr(diffusers, kind)(**_zimage_components(seed)))


def tiny_zimage_controlnet_pipeline(seed: int = 0, kind: str = "ZImageControlNetPipeline"
                                    ) -> ZImageControlNetPipeline:
    """Build a tiny random ``ZImageControlNetPipeline`` (``kind="ZImageControlNetInpaintPipeline"``: the inpainting
    one): :func:`tiny_zimage_pipeline`'s components and a ``ZImageControlNetModel`` with control layers at main layers
    0 and 1 (16 control channels; 33 for inpainting: control latents, mask, masked-image latents), which shares the
    transformer's embedders and refiners as the pipeline builds it. Call it with ``control_image=`` (and ``image=``,
    ``mask_image=`` for inpainting).

    Args:
        seed: seed of every random weight.
        kind: the pipeline class name.

    Returns:
        The pipeline on CPU in float32.
    """
    import diffusers
    from diffusers import ZImageControlNetModel

    from ..tiny.pipelines import _finish

    components = _zimage_components(seed)
    torch.manual_seed(seed + 1)
    control_in_dim = 33 if kind == "ZImageControlNetInpaintPipeline" else 16
    controlnet = ZImageControlNetModel(control_layers_places=[0, 1], control_in_dim=control_in_dim, dim=32,
                                       n_refiner_layers=2, n_heads=2, n_kv_heads=2).eval()
    with torch.no_grad():  # zero-initialised output projections would make the controlnet a no-op
        for name, param in controlnet.named_parameters():
            if "after_proj" in name or "before_proj" in name:
                param.normal_(std=0.2)
    return _finish(getattr(diffusers, kind)(**components, controlnet=controlnet))


# ------------------------------------------------------------------------------------------------ registration
# encode_prompt returns (prompt embeds, CFG negative embeds): lists of per-prompt valid-token tensors.
_PIPELINE = PipelineSpec(denoisers=("transformer",), preset="z-image", size_multiple=2, cfg_min=0.0)
_TINY_CALL = {"height": 64, "width": 64, "max_sequence_length": 64}

ZIMAGE = register_adapter(Adapter(
    family="z-image",
    model_class=ZImageTransformer2DModel,
    processors={ZSingleStreamAttnProcessor: NAGZSingleStreamAttnProcessor},
    select=_main_attention,
    text_arg="cap_feats",
    mask_arg=None,
    timestep_arg="t",
    timestep_max=1.0,  # the pipelines pass (1000 − t) / 1000, reversed: see window
    window=_window,
    preset="z-image",
    notes="Z-Image / Z-Image-Turbo: NAG on the image tokens of every main layer; the negative caption is refined by "
          "the model's own context refiner and carried as a side-car stream with shifted RoPE positions",
    official=False,  # no official NAG implementation for Z-Image
    plan=_plan,
    block_forwards={ZImageTransformerBlock: _layer_forward},
    pipelines={name: _PIPELINE for name in ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline",
                                            "ZImageControlNetPipeline", "ZImageControlNetInpaintPipeline")},
    presets={
        # No published NAG values for Z-Image: chosen by analogy with FLUX.1 (the `flux` preset: official Flux
        # pipeline alpha 0.25, README FLUX.1-schnell nag_scale 5). Z-Image-Turbo runs without CFG (guidance 0), the
        # few-step regime NAG is meant for.
        "z-image": NAGConfig(scale=5.0, tau=2.5, alpha=0.25),
    },
    tiny={
        "tiny-z-image": TinyModel(tiny_zimage_pipeline, dict(_TINY_CALL)),
    },
    bench_inputs=zimage_bench_inputs,
    bench_text_flops=zimage_text_flops,  # the context refiner's attention over the negative's own tokens
    separate_cfg=False,  # CFG is one call with the lists [cond…, uncond…]
))

__all__ = ["NAGZSingleStreamAttnProcessor", "ZIMAGE", "nag_single_stream_attention",
           "negative_caption_stream", "tiny_qwen_tokenizer", "tiny_zimage_controlnet_pipeline",
           "tiny_zimage_pipeline", "tiny_zimage_transformer"]
