"""FLUX.2 ``Flux2Transformer2DModel`` (dev, Klein, Klein inpaint, Klein KV): NAG in every double- and single-stream
block.

Layout ``[Tp | Tn | I]`` (text first, as the model's own ``[txt, img]``). The negative text is packed after the
prompt's text (the ``context_embedder`` is a per-token Linear, so nothing mixes the two) and travels through all
blocks as its own stream; the image stream stays single:

* double blocks (``transformer_blocks.*.attn``, ``Flux2AttnProcessor``): prompt text attends to ``[Tp, I]``, negative
  text to ``[Tn, I]``, image queries give ``NAG(Z+, Z-)`` with the image→image attention computed once (LSE merge);
* single blocks (``single_transformer_blocks.*.attn``, ``Flux2ParallelSelfAttnProcessor``): the fused
  ``to_qkv_mlp_proj`` is split as in the original, the attention is the same segmented joint attention, and the MLP
  branch and the fused ``to_out`` run per token as usual. The model concatenates ``[txt, img]`` before the single
  blocks and slices the text off by its total (packed) length, so the packed text length flows through unchanged.

Positions: the pipelines give text tokens the RoPE ids ``(0, 0, 0, j)``. The negative's tokens get the ids they would
have if the negative were the prompt — the prompt's first text id with the token axis counting ``j = 0..Ln-1``, i.e.
``(0, 0, 0, j)`` — appended to ``txt_ids`` by ``prepare``. Image ids (and reference-image ids ``t = 10, 20, …``) do not
depend on the text.

Masks: none. FLUX.2 pads its Mistral/Qwen3 text to ``max_sequence_length`` and the padding tokens are keys, so the
negative keeps its padding (``negative_max_length`` changes results here, as on FLUX.1).

Modulation of the negative text stream: FLUX.2 modulates with one *global* ``temb`` (timestep and, for dev, the
embedded guidance scale), shared by all blocks through ``double_stream_modulation_{img,txt}`` and
``single_stream_modulation``; there is no pooled text embedding, so nothing in it depends on the text. The negative
text gets exactly the prompt text's modulation (what it would get if it were the prompt), and no block hooks are
needed.

Pipelines: ``Flux2Pipeline`` (FLUX.2-dev) has no negative prompt and no CFG at all (one call per step): NAG is its only
negative. ``Flux2KleinPipeline`` / ``Flux2KleinInpaintPipeline`` run CFG for non-distilled checkpoints with a
hard-coded ``""`` negative in ``cache_context("cond"/"uncond")``; the ``uncond`` calls are never guided. The NAG
negative defaults to ``""`` (the pipelines' own CFG negative). In the inpaint pipeline the condition latents sit in the
image segment.

Klein KV (``Flux2KleinKVPipeline``, processors ``Flux2KVAttnProcessor`` / ``Flux2KVParallelSelfAttnProcessor``):
step 0 (``kv_cache_mode="extract"``) runs ``[txt, ref, img]`` with the reference tokens attending to themselves only
and stores their K/V; later steps (``"cached"``) inject the cached reference K/V between text and image keys. The
reference tokens never see the text, so their K/V are text-independent and shared exactly by ``Z+`` and ``Z-``: with
NAG, prompt text and image queries attend to ``[Tp, R, I]``, negative text to ``[Tn, R, I]``, image queries give
``NAG(Z+, Z-)`` (one image-side attention over ``[R, I]``, merged by LSE), the reference queries attend to ``R`` as in
the original. Supported exactly.

No official NAG implementation exists for FLUX.2, so there is no ``official`` mode.

The family's file: the NAG processors, the preparation and the adapter; the pipelines and the preset (``flux2``); the
meta inputs of ``nagkit bench``; the tiny pipelines ``tiny-flux2-klein`` (Qwen3 text encoder) and ``tiny-flux2-dev``
(Mistral3 text encoder), plus the Klein KV and inpaint builders used by the tests.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2Attention,
    Flux2AttnProcessor,
    Flux2KVAttnProcessor,
    Flux2KVParallelSelfAttnProcessor,
    Flux2ParallelSelfAttention,
    Flux2ParallelSelfAttnProcessor,
)

from ..core.config import NAGConfig
from ..core.operator import nag_combine
from ..kernels import joint as _joint
from ..kernels.joint import lse_available, nag_joint_attention
from ..kernels.lse import attend, attention_with_lse_backend, merge_attention
from .base import Adapter, NAGProcessor, PipelineSpec, TinyModel, register_adapter

if TYPE_CHECKING:
    from diffusers import (
        Flux2KleinInpaintPipeline,
        Flux2KleinKVPipeline,
        Flux2KleinPipeline,
        Flux2Pipeline,
    )

    from ..bench.families import FamilySpec, Inputs


# ------------------------------------------------------------------------------------------------ attention
def _heads(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (-1, attn.head_dim))


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2, 3)


def _double_qkv(attn: torch.nn.Module, hidden_states: torch.Tensor, text: torch.Tensor, rope: Any
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Flux2AttnProcessor``'s query/key/value over ``[text | image]``, ``(B, L, H, D)``, norms and RoPE applied."""
    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        t_query, t_key, t_value = attn.to_added_qkv(text).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        t_query, t_key, t_value = attn.add_q_proj(text), attn.add_k_proj(text), attn.add_v_proj(text)
    query = torch.cat([attn.norm_added_q(_heads(attn, t_query)), attn.norm_q(_heads(attn, query))], dim=1)
    key = torch.cat([attn.norm_added_k(_heads(attn, t_key)), attn.norm_k(_heads(attn, key))], dim=1)
    value = torch.cat([_heads(attn, t_value), _heads(attn, value)], dim=1)
    if rope is not None:
        query = apply_rotary_emb(query, rope, sequence_dim=1)
        key = apply_rotary_emb(key, rope, sequence_dim=1)
    return query, key, value


def _single_qkv(attn: torch.nn.Module, hidden_states: torch.Tensor, rope: Any
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Flux2ParallelSelfAttnProcessor``'s split of the fused projection: query/key/value ``(B, L, H, D)`` (norms
    and RoPE applied) and the MLP input."""
    projected = attn.to_qkv_mlp_proj(hidden_states)
    qkv_dim = 3 * attn.inner_dim
    mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
    local_qkv = projected.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
    qkv, mlp = torch.split(projected, [local_qkv, projected.shape[-1] - local_qkv], dim=-1)
    query, key, value = (_heads(attn, x) for x in qkv.chunk(3, dim=-1))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if rope is not None:
        query = apply_rotary_emb(query, rope, sequence_dim=1)
        key = apply_rotary_emb(key, rope, sequence_dim=1)
    return query, key, value, mlp


def _nag_with_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ref_key: torch.Tensor,
                        ref_value: torch.Tensor, packing: Any, config: NAGConfig, backend: Any) -> torch.Tensor:
    """NAG joint attention over ``[Tp | Tn | I]`` whose text and image queries also attend to reference keys ``R``
    that have no queries here (Klein KV): prompt text and image attend to ``[Tp, R, I]``, negative text to
    ``[Tn, R, I]``; image queries give ``NAG(Z+, Z-)``, the image-side attention over ``[R, I]`` computed once.

    Args:
        query, key, value: heads-first ``(B, H, L, D)`` over the packed sequence.
        ref_key, ref_value: heads-first ``(B, H, R, D)``.
        packing: text lengths and guided rows.
        config: NAG settings.
        backend: the module's diffusers attention backend.

    Returns:
        ``(B, L, H·D)`` in the packed order.
    """
    lp, ln = packing.lp, packing.ln
    sp, sn, si = slice(0, lp), slice(lp, lp + ln), slice(lp + ln, query.shape[2])
    rows = packing.rows

    def guided_rows(x: torch.Tensor) -> torch.Tensor:
        return x if packing.all_rows or x.shape[0] == 1 else x[rows]

    k_image = torch.cat([ref_key, key[:, :, si]], dim=2)
    v_image = torch.cat([ref_value, value[:, :, si]], dim=2)

    def keys(text: slice, x: torch.Tensor, x_image: torch.Tensor) -> torch.Tensor:  # the model's order [T, R, I]
        return torch.cat([x[:, :, text], x_image], dim=2)

    out_p = attend(query[:, :, sp], keys(sp, key, k_image), keys(sp, value, v_image), None, backend)
    out_n = attend(query[:, :, sn], keys(sn, key, k_image), keys(sn, value, v_image), None, backend)
    q_image = query[:, :, si]
    image = positive = negative = None
    if lse_available(query.device) and not _joint._TWO_ATTENTIONS:
        image = attention_with_lse_backend(q_image, k_image, v_image, None, backend, dead=None)
        if image is not None:
            positive = attention_with_lse_backend(q_image, key[:, :, sp], value[:, :, sp], None, backend, dead=None)
        if positive is not None:
            negative = attention_with_lse_backend(guided_rows(q_image), guided_rows(key[:, :, sn]),
                                                  guided_rows(value[:, :, sn]), None, backend, dead=None)
    if negative is not None:
        z_pos = merge_attention([image, positive], heads_last=True)
        if not packing.all_rows:
            image = (image[0][rows], image[1][rows])
        z_neg = merge_attention([image, negative], heads_last=True)
    else:  # no LSE for this backend (or two full attentions requested): the same numbers from full attentions
        z_pos = attend(q_image, keys(sp, key, k_image), keys(sp, value, v_image), None, backend)
        z_neg = attend(guided_rows(q_image), guided_rows(keys(sn, key, k_image)),
                       guided_rows(keys(sn, value, v_image)), None, backend)
    z_pos, z_neg = _merge_heads(z_pos), _merge_heads(z_neg)
    guided = nag_combine(z_pos if packing.all_rows else z_pos[rows], z_neg, config.scale, config.tau, config.alpha,
                         config.norm)
    if not packing.all_rows:
        guided = torch.cat([z_pos[: rows.start], guided, z_pos[rows.stop:]], dim=0)
    return torch.cat([_merge_heads(out_p), _merge_heads(out_n), guided], dim=1).to(query.dtype)


def _nag_attention(processor: NAGProcessor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   text_len: int, attention_mask: torch.Tensor | None, kv_cache: Any = None,
                   kv_cache_mode: str | None = None, num_ref_tokens: int = 0) -> torch.Tensor:
    """The guided attention of every FLUX.2 processor: ``(B, L, H, D)`` query/key/value over the packed
    ``[Tp | Tn | (R) | I]`` sequence in, ``(B, L, H·D)`` out, with the KV processors' three modes (plain, ``extract``
    with ``num_ref_tokens`` reference tokens after the text, ``cached``) reproduced as in
    ``_flux2_kv_causal_attention``."""
    packing, config = processor.packing, processor.state.config
    backend = processor._attention_backend
    if processor._parallel_config is not None:
        raise NotImplementedError("NAG on FLUX.2 joint attention does not support context parallelism "
                                  "(enable_parallelism): the sequence split would cut the packed negative text")
    if attention_mask is not None:
        raise NotImplementedError("NAG on FLUX.2 does not support an attention_mask (passed through "
                                  "joint_attention_kwargs): it would cover the unpacked [text, image] sequence; the "
                                  "FLUX.2 pipelines pass none")
    if text_len != packing.lp + packing.ln:
        raise RuntimeError(f"FLUX.2 attention got {text_len} text tokens, but NAG packed {packing.lp} + {packing.ln}")
    query, key, value = (x.transpose(1, 2) for x in (query, key, value))
    if kv_cache_mode == "extract" and num_ref_tokens > 0:
        ref = slice(text_len, text_len + num_ref_tokens)

        def outside(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:, :, :text_len], x[:, :, ref.stop:]], dim=2)

        out_ref = attend(query[:, :, ref], key[:, :, ref], value[:, :, ref], None, backend)  # reference: self only
        out = _nag_with_reference(outside(query), outside(key), outside(value), key[:, :, ref], value[:, :, ref],
                                  packing, config, backend)
        return torch.cat([out[:, :text_len], _merge_heads(out_ref).to(out.dtype), out[:, text_len:]], dim=1)
    if kv_cache_mode == "cached" and kv_cache is not None:
        ref_key, ref_value = kv_cache.get()  # (B, R, H, D), stored after RoPE by the extract step
        return _nag_with_reference(query, key, value, ref_key.transpose(1, 2), ref_value.transpose(1, 2), packing,
                                   config, backend)
    return nag_joint_attention(query, key, value, packing, text_first=True, scale=config.scale, tau=config.tau,
                               alpha=config.alpha, norm=config.norm, backend=backend)


def _store_reference(key: torch.Tensor, value: torch.Tensor, text_len: int, kv_cache: Any, kv_cache_mode: str | None,
                     num_ref_tokens: int) -> None:
    """The KV processors' extract step: cache the reference tokens' K/V (after RoPE); text-independent."""
    if kv_cache_mode == "extract" and kv_cache is not None and num_ref_tokens > 0:
        ref = slice(text_len, text_len + num_ref_tokens)
        kv_cache.store(key[:, ref].clone(), value[:, ref].clone())


def _double(processor: NAGProcessor, attn: torch.nn.Module, hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, rope: Any, kv_cache: Any = None,
            kv_cache_mode: str | None = None, num_ref_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    query, key, value = _double_qkv(attn, hidden_states, encoder_hidden_states, rope)
    text_len = encoder_hidden_states.shape[1]
    _store_reference(key, value, text_len, kv_cache, kv_cache_mode, num_ref_tokens)
    out = _nag_attention(processor, query, key, value, text_len, attention_mask, kv_cache, kv_cache_mode,
                         num_ref_tokens)
    image = attn.to_out[1](attn.to_out[0](out[:, text_len:].contiguous()))
    return image, attn.to_add_out(out[:, :text_len].contiguous())


def _single(processor: NAGProcessor, attn: torch.nn.Module, hidden_states: torch.Tensor,
            attention_mask: torch.Tensor | None, rope: Any, kv_cache: Any = None, kv_cache_mode: str | None = None,
            num_txt_tokens: int | None = None, num_ref_tokens: int = 0) -> torch.Tensor:
    query, key, value, mlp = _single_qkv(attn, hidden_states, rope)
    packing = processor.packing
    text_len = packing.lp + packing.ln if num_txt_tokens is None else num_txt_tokens
    _store_reference(key, value, text_len, kv_cache, kv_cache_mode, num_ref_tokens)
    out = _nag_attention(processor, query, key, value, text_len, attention_mask, kv_cache, kv_cache_mode,
                         num_ref_tokens)
    return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


class NAGFlux2AttnProcessor(NAGProcessor):
    """``Flux2AttnProcessor`` (double blocks) with NAG on the image tokens and the negative text as its own stream."""

    def __call__(
        self,
        attn: Flux2Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.packing is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return _double(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


class NAGFlux2KVAttnProcessor(NAGProcessor):
    """``Flux2KVAttnProcessor`` (Klein KV double blocks): as :class:`NAGFlux2AttnProcessor`, with the reference
    tokens' extract/cached modes (their K/V are text-independent and shared by ``Z+`` and ``Z-``)."""

    def __call__(
        self,
        attn: Flux2Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        kv_cache: Any = None,
        kv_cache_mode: str | None = None,
        num_ref_tokens: int = 0,
    ) -> torch.Tensor:
        if self.packing is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                              kv_cache=kv_cache, kv_cache_mode=kv_cache_mode, num_ref_tokens=num_ref_tokens)
        return _double(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, kv_cache,
                       kv_cache_mode, num_ref_tokens)


class NAGFlux2ParallelSelfAttnProcessor(NAGProcessor):
    """``Flux2ParallelSelfAttnProcessor`` (single blocks): NAG attention on the packed ``[Tp | Tn | I]``; the fused
    MLP branch and output projection per token as in the original."""

    def __call__(
        self,
        attn: Flux2ParallelSelfAttention,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.packing is None:
            return self.inner(attn, hidden_states, attention_mask, image_rotary_emb)
        return _single(self, attn, hidden_states, attention_mask, image_rotary_emb)


class NAGFlux2KVParallelSelfAttnProcessor(NAGProcessor):
    """``Flux2KVParallelSelfAttnProcessor`` (Klein KV single blocks): as :class:`NAGFlux2ParallelSelfAttnProcessor`
    with the reference tokens' extract/cached modes."""

    def __call__(
        self,
        attn: Flux2ParallelSelfAttention,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        kv_cache: Any = None,
        kv_cache_mode: str | None = None,
        num_txt_tokens: int = 0,
        num_ref_tokens: int = 0,
    ) -> torch.Tensor:
        if self.packing is None:
            return self.inner(attn, hidden_states, attention_mask, image_rotary_emb, kv_cache=kv_cache,
                              kv_cache_mode=kv_cache_mode, num_txt_tokens=num_txt_tokens,
                              num_ref_tokens=num_ref_tokens)
        return _single(self, attn, hidden_states, attention_mask, image_rotary_emb, kv_cache, kv_cache_mode,
                       num_txt_tokens if kv_cache_mode is not None else None, num_ref_tokens)


def _flux2_attention(name: str, module: torch.nn.Module) -> bool:
    return name.endswith(".attn") and isinstance(module, (Flux2Attention, Flux2ParallelSelfAttention))


def _prepare(model: torch.nn.Module, access: Any, args: tuple, kwargs: dict, extras: dict, packing: Any,
             state: Any) -> tuple[tuple, dict]:
    """RoPE ids of the negative text: the prompt's first text id with the token axis counting ``0..Ln-1`` (the
    pipelines' ``(0, 0, 0, j)``), appended after the prompt's."""
    txt_ids = access.get("txt_ids", args, kwargs)
    if txt_ids is None:
        return args, kwargs
    ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
    negative = ids[:1].repeat(packing.ln, 1)
    negative[:, -1] = ids[0, -1] + torch.arange(packing.ln, device=ids.device).to(ids.dtype)
    return access.set("txt_ids", torch.cat([ids, negative]), args, kwargs)


# ------------------------------------------------------------------------------------------------ nagkit bench
def flux2_bench_inputs(spec: FamilySpec, batch: int, dtype: torch.dtype) -> Inputs:
    """Meta inputs of one FLUX.2 call: packed latents (``patch``×``patch`` latent patches as channels), timestep, text,
    4-axis RoPE ids, and the embedded guidance scale when the config has a guidance embedding (dev; Klein has none)."""
    from ..bench.families import Inputs, call_base

    c = call_base(spec, batch, dtype)
    g, (h, w) = c.geometry, c.latent_hw
    tokens = (h // g.patch) * (w // g.patch)
    kwargs: dict[str, Any] = {"hidden_states": c.meta(batch, tokens, g.latent_channels * g.patch * g.patch),
                              "timestep": c.timestep, "encoder_hidden_states": c.text, "img_ids": c.meta(tokens, 4),
                              "txt_ids": c.meta(g.text_tokens, 4)}
    if spec.config.get("guidance_embeds", True):
        kwargs["guidance"] = c.meta(batch, dtype=torch.float32)
    return Inputs(kwargs=kwargs, negative=c.negative)


# ------------------------------------------------------------------------------------------------ tiny pipelines
# Test fixtures (``nagkit.tiny``): seeded random weights, in-memory tokenizers, nothing downloaded. Their diffusers and
# transformers imports stay inside the builders, so importing nagkit does not load the pipelines.
_TINY_TEXT_HIDDEN = 16  # hidden size of the tiny Qwen3 / Mistral text models; FLUX.2 stacks 3 of their layers
_TINY_VAE_LATENT_CHANNELS = 4  # 2x2-patchified: 16 transformer input channels
# Qwen3's chat template, reduced to what Flux2KleinPipeline uses (a user turn, the generation prompt, no thinking).
_QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
# Mistral-Small-3's chat template, reduced to what Flux2Pipeline uses (system + user turns of text parts).
_MISTRAL_TEMPLATE = (
    "<s>{% for message in messages %}{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('') %}{% endif %}{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}</s>{% endif %}{% endfor %}")


def tiny_chat_tokenizer(specials: tuple[str, ...], template: str, extra_words: tuple[str, ...] = ()) -> Any:
    """Build a byte-level BPE tokenizer (``Qwen2Tokenizer``, the Qwen3 tokenizer class) over the tiny word list, with
    special tokens and a chat template, in memory.

    Every byte has a token, so any text tokenizes; each tiny-vocabulary word (and ``extra_words``) is one token, with
    and without a leading space.

    Args:
        specials: special tokens; the first one is the padding, end-of-text and unknown token.
        template: the Jinja chat template.
        extra_words: further single-token words (e.g. those of a pipeline's system message).

    Returns:
        The tokenizer (right padding, ``model_max_length`` 512).
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    from ..tiny.pipelines import _bytes_to_unicode, _word_merges, vocabulary_words

    table = _bytes_to_unicode()
    vocab = {char: i for i, char in enumerate(table.values())}
    words = dict.fromkeys([*vocabulary_words(), *extra_words])
    symbols = [seq for w in words for seq in ([table[ord(" ")], *w], list(w)) if len(seq) > 1]
    merges = _word_merges(symbols, vocab)
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=specials[0], eos_token=specials[0],
                               pad_token=specials[0], model_max_length=512)
    tokenizer.add_tokens([AddedToken(token, special=True) for token in specials])
    tokenizer.chat_template = template
    tokenizer.padding_side = "right"
    return tokenizer


def _tiny_qwen3(seed: int) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and a 27-layer, 16-wide ``Qwen3ForCausalLM`` (the Klein pipelines read hidden layers 9, 18, 27)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tiny_chat_tokenizer(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
                                    _QWEN3_TEMPLATE, ("user", "assistant"))
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=_TINY_TEXT_HIDDEN, intermediate_size=32,
                         num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return tokenizer, Qwen3ForCausalLM(config).eval()


def _tiny_mistral3(seed: int) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and a ``Mistral3ForConditionalGeneration`` with a 30-layer, 16-wide Mistral text model (FLUX.2-dev
    reads hidden layers 10, 20, 30) and a 1-layer Pixtral vision tower (unused: text-only prompts)."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    words = tuple(w.strip(".,") for w in SYSTEM_MESSAGE.split())
    tokenizer = tiny_chat_tokenizer(("</s>", "<s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]",
                                     "[IMG]"), _MISTRAL_TEMPLATE, words)
    torch.manual_seed(seed)
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, head_dim=8, image_size=32, patch_size=16),
        text_config=MistralConfig(vocab_size=len(tokenizer), hidden_size=_TINY_TEXT_HIDDEN, intermediate_size=32,
                                  num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                  max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
    )
    return tokenizer, Mistral3ForConditionalGeneration(config).eval()


def _tiny_flux2_transformer(seed: int, guidance_embeds: bool) -> Flux2Transformer2DModel:
    """2 double-stream + 2 single-stream FLUX.2 blocks, 2 heads x 16 (RoPE axes 4 + 4 + 4 + 4)."""
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * _TINY_VAE_LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * _TINY_TEXT_HIDDEN,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    ).eval()


def _tiny_flux2_vae(seed: int) -> torch.nn.Module:
    """4-level ``AutoencoderKLFlux2`` (spatial factor 8, 4 latent channels, 2x2 patch batch norm)."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    return AutoencoderKLFlux2(
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=_TINY_VAE_LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        mid_block_add_attention=False,
    ).eval()


def _flux2_scheduler() -> Any:
    # FLUX.2 scheduler config (dynamic shifting; the pipelines pass their empirical `mu`).
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def tiny_flux2_klein_components(seed: int = 0) -> dict[str, Any]:
    """Components of the tiny Klein pipelines (``Flux2KleinPipeline``, its inpaint and KV variants).

    Transformer: 2 double + 2 single FLUX.2 blocks, 2 heads x 16, no guidance embedding, 16 input channels (2x2
    patches of 4 latent channels). Text: a 27-layer, 16-wide ``Qwen3ForCausalLM`` (layers 9, 18, 27 stacked: 48
    channels) with an in-memory byte-level BPE tokenizer and a Qwen3-style chat template. VAE: tiny
    ``AutoencoderKLFlux2`` (factor 8). Scheduler: flow-match Euler with dynamic shifting.

    Args:
        seed: Seed for all random weights.

    Returns:
        The pipeline's keyword arguments (``is_distilled=False``: CFG runs when ``guidance_scale > 1``).
    """
    tokenizer, text_encoder = _tiny_qwen3(seed)
    return {"scheduler": _flux2_scheduler(), "vae": _tiny_flux2_vae(seed), "text_encoder": text_encoder,
            "tokenizer": tokenizer, "transformer": _tiny_flux2_transformer(seed, guidance_embeds=False),
            "is_distilled": False}


def tiny_flux2_klein_pipeline(seed: int = 0) -> Flux2KleinPipeline:
    """Build a tiny random FLUX.2-Klein-style pipeline (non-distilled: CFG with the pipeline's ``""`` negative when
    ``guidance_scale > 1``); see :func:`tiny_flux2_klein_components`.

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``Flux2KleinPipeline`` on CPU in float32.
    """
    from diffusers import Flux2KleinPipeline

    from ..tiny.pipelines import _finish

    return _finish(Flux2KleinPipeline(**tiny_flux2_klein_components(seed)))


def tiny_flux2_klein_inpaint_pipeline(seed: int = 0) -> Flux2KleinInpaintPipeline:
    """Build a tiny random ``Flux2KleinInpaintPipeline`` from :func:`tiny_flux2_klein_components` (call it with
    ``image=`` and ``mask_image=``).

    Args:
        seed: Seed for all random weights.

    Returns:
        The pipeline on CPU in float32.
    """
    from diffusers import Flux2KleinInpaintPipeline

    from ..tiny.pipelines import _finish

    return _finish(Flux2KleinInpaintPipeline(**tiny_flux2_klein_components(seed)))


def tiny_flux2_klein_kv_pipeline(seed: int = 0) -> Flux2KleinKVPipeline:
    """Build a tiny random ``Flux2KleinKVPipeline`` from :func:`tiny_flux2_klein_components` (distilled: no CFG; its
    transformer gets the KV processors; call it with a reference ``image=`` for the KV-cache path).

    Args:
        seed: Seed for all random weights.

    Returns:
        The pipeline on CPU in float32.
    """
    from diffusers import Flux2KleinKVPipeline

    from ..tiny.pipelines import _finish

    components = {**tiny_flux2_klein_components(seed), "is_distilled": True}
    return _finish(Flux2KleinKVPipeline(**components))


def tiny_flux2_dev_pipeline(seed: int = 0) -> Flux2Pipeline:
    """Build a tiny random FLUX.2-dev-style pipeline (guidance-distilled: ``guidance_scale`` is embedded; no CFG).

    Transformer as :func:`tiny_flux2_klein_components` with a guidance embedding. Text:
    ``Mistral3ForConditionalGeneration`` with a 30-layer, 16-wide Mistral text model (layers 10, 20, 30 stacked: 48
    channels) and a 1-layer Pixtral vision tower; an in-memory byte-level BPE tokenizer with a Mistral-style chat
    template stands in for the Pixtral processor (text-only prompts; the words of the pipeline's system message are
    single tokens). VAE and scheduler as Klein.

    Args:
        seed: Seed for all random weights.

    Returns:
        A ``Flux2Pipeline`` on CPU in float32.
    """
    from diffusers import Flux2Pipeline

    from ..tiny.pipelines import _finish

    tokenizer, text_encoder = _tiny_mistral3(seed)
    return _finish(Flux2Pipeline(scheduler=_flux2_scheduler(), vae=_tiny_flux2_vae(seed), text_encoder=text_encoder,
                                 tokenizer=tokenizer, transformer=_tiny_flux2_transformer(seed, guidance_embeds=True)))


# ------------------------------------------------------------------------------------------------ registration
# Every FLUX.2 pipeline's encode_prompt returns (prompt_embeds, text_ids); the negative's text ids are made by prepare.
_SPEC = PipelineSpec(denoisers=("transformer",), preset="flux2", size_multiple=2)
# Text length: the chat template plus the prompt fit (dev: its system message too); 64x64 images (16 image tokens).
_TINY_CALL = {"height": 64, "width": 64, "max_sequence_length": 48}

FLUX2 = register_adapter(Adapter(
    family="flux2",
    model_class=Flux2Transformer2DModel,
    processors={
        Flux2AttnProcessor: NAGFlux2AttnProcessor,
        Flux2ParallelSelfAttnProcessor: NAGFlux2ParallelSelfAttnProcessor,
        Flux2KVAttnProcessor: NAGFlux2KVAttnProcessor,
        Flux2KVParallelSelfAttnProcessor: NAGFlux2KVParallelSelfAttnProcessor,
    },
    select=_flux2_attention,
    mask_arg=None,
    timestep_max=1.0,  # the FLUX.2 pipelines pass t / 1000
    official=False,  # no official NAG implementation for FLUX.2
    preset="flux2",
    notes="FLUX.2 dev/Klein (+ inpaint, KV): NAG on the image tokens of every double and single block; one image "
          "stream, the negative text as its own stream under the global (text-independent) modulation; Klein KV's "
          "cached reference K/V shared by both branches",
    prepare=_prepare,
    pipelines={
        "Flux2Pipeline": dataclasses.replace(_SPEC, cfg_arg=""),  # no CFG: guidance_scale is distilled guidance
        "Flux2KleinPipeline": _SPEC,
        "Flux2KleinInpaintPipeline": _SPEC,
        "Flux2KleinKVPipeline": _SPEC,
    },
    presets={
        # Chosen by analogy with FLUX.1 (no published FLUX.2 NAG settings): the official Flux pipeline's alpha 0.25
        # and its README's nag_scale 5, tau 2.5.
        "flux2": NAGConfig(scale=5.0, tau=2.5, alpha=0.25),
    },
    tiny={
        "tiny-flux2-klein": TinyModel(tiny_flux2_klein_pipeline, dict(_TINY_CALL)),
        "tiny-flux2-dev": TinyModel(tiny_flux2_dev_pipeline, {**_TINY_CALL, "max_sequence_length": 64}),
    },
    bench_inputs=flux2_bench_inputs,
    separate_cfg=True,  # Klein CFG: conditional and unconditional calls in turn
))
