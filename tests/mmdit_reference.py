"""Plain references for NAG on joint-attention MM-DiTs: the image stream tiled over a doubled batch.

The batch is ``[prompt rows; negative rows]``. In every guided joint attention both halves run the model's own
attention (two full joint attentions); the image part of the attention output of *both* halves is replaced by
``NAG(Z+, Z-)`` so the two image streams stay one stream; the text halves evolve separately. The model output is the
first half. This is the official algorithm's structure, written in the most direct way.
"""

from __future__ import annotations

import contextlib

import torch

from .reference import reference_nag, swapped


class DoubledJointRef:
    """For processors that return ``(image_out, text_out)`` and project the image with ``attn.to_out[0]``."""

    def __init__(self, inner, scale, tau, alpha):
        self.inner, self.scale, self.tau, self.alpha = inner, scale, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        with swapped(attn.to_out, "0", torch.nn.Identity()):
            z, text = self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        b = z.shape[0] // 2
        guided = reference_nag(z[:b], z[b:], self.scale, self.tau, self.alpha)
        return attn.to_out[0](torch.cat([guided, guided])), text


@contextlib.contextmanager
def joint_processors(model, make, select):
    modules = {n: m for n, m in model.named_modules() if hasattr(m, "set_processor") and select(n, m)}
    originals = {n: m.processor for n, m in modules.items()}
    try:
        for n, m in modules.items():
            m.set_processor(make(originals[n]))
        yield
    finally:
        for n, m in modules.items():
            m.set_processor(originals[n])


def doubled(x):
    return torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.ndim > 0 else x


def reference_nag_p(z_pos, z_neg, scale, tau, alpha, p):
    zp, zn = z_pos.double(), z_neg.double()
    zg = zp * scale - zn * (scale - 1)
    r = zg.norm(p=p, dim=-1, keepdim=True) / zp.norm(p=p, dim=-1, keepdim=True)
    return (alpha * zg * torch.clamp(r, max=tau) / r + (1 - alpha) * zp).to(z_pos.dtype)


@torch.no_grad()
def flux_reference(model, inputs, neg_text, neg_pooled, scale, tau, alpha, mode="fast", p=1):
    """FLUX with NAG written out plainly over two rows per sample: the prompt row and the negative row.

    Double blocks: one image stream (prompt modulation), two text streams (the negative's with the negative's
    ``temb``), two full joint attentions through the model's own processor; the image takes NAG(Z+, Z-).
    Single blocks: each row runs the whole block. ``fast``: the negative row's image tokens are the shared image
    stream under the prompt's modulation. ``official``: the negative row carries its own copy of the image tokens
    under the negative's modulation (the official diffusers code). In both, the image part of both rows' attention
    output is replaced by NAG(Z+, Z-).
    """
    x = model.x_embedder(inputs["hidden_states"])
    dtype = x.dtype
    t = inputs["timestep"].to(dtype) * 1000
    g = inputs.get("guidance")
    g = None if g is None else g.to(dtype) * 1000

    def temb_of(pooled):
        return model.time_text_embed(t, pooled) if g is None else model.time_text_embed(t, g, pooled)

    temb_p = temb_of(inputs["pooled_projections"])
    temb_n = temb_of(inputs["pooled_projections"] if neg_pooled is None else neg_pooled)
    txt_p, txt_n = model.context_embedder(inputs["encoder_hidden_states"]), model.context_embedder(neg_text)
    lp, ln = txt_p.shape[1], txt_n.shape[1]
    img_ids = inputs["img_ids"]
    rope_p = model.pos_embed(torch.cat([inputs["txt_ids"], img_ids]))
    rope_n = model.pos_embed(torch.cat([img_ids.new_zeros(ln, img_ids.shape[-1]), img_ids]))

    def guide(zp, zn):
        return reference_nag_p(zp, zn, scale, tau, alpha, p)

    for blk in model.transformer_blocks:
        proc = blk.attn.processor
        n_img, gate_msa, shift_mlp, scale_mlp, gate_mlp = blk.norm1(x, emb=temb_p)
        streams = []
        for txt, temb, rope in ((txt_p, temb_p, rope_p), (txt_n, temb_n, rope_n)):
            n_txt, *mods = blk.norm1_context(txt, emb=temb)
            with swapped(blk.attn.to_out, "0", torch.nn.Identity()):
                z, ctx = proc(blk.attn, n_img, n_txt, None, rope)
            streams.append((txt, mods, z, ctx))
        img_out = blk.attn.to_out[0](guide(streams[0][2], streams[1][2]))
        x = x + gate_msa.unsqueeze(1) * img_out
        x = x + gate_mlp.unsqueeze(1) * blk.ff(blk.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
        new = []
        for txt, (c_gate_msa, c_shift, c_scale, c_gate_mlp), _, ctx in streams:
            txt = txt + c_gate_msa.unsqueeze(1) * ctx
            txt = txt + c_gate_mlp.unsqueeze(1) * blk.ff_context(
                blk.norm2_context(txt) * (1 + c_scale[:, None]) + c_shift[:, None])
            new.append(txt)
        txt_p, txt_n = new

    seq_p, seq_n = torch.cat([txt_p, x], 1), torch.cat([txt_n, x], 1)
    for blk in model.single_transformer_blocks:
        norm_p, gate_p = blk.norm(seq_p, emb=temb_p)
        if mode == "fast":  # negative text under its modulation, the shared image under the prompt's
            norm_nt, gate_nt = blk.norm(seq_n[:, :ln], emb=temb_n)
            norm_n = torch.cat([norm_nt, norm_p[:, lp:]], 1)
            gate_n = torch.cat([gate_nt[:, None].expand(-1, ln, -1), gate_p[:, None].expand(-1, x.shape[1], -1)], 1)
        else:
            norm_n, gate_n = blk.norm(seq_n, emb=temb_n)
            gate_n = gate_n[:, None]
        a_p = blk.attn.processor(blk.attn, norm_p, None, None, rope_p)
        a_n = blk.attn.processor(blk.attn, norm_n, None, None, rope_n)
        guided = guide(a_p[:, lp:], a_n[:, ln:])
        a_p = torch.cat([a_p[:, :lp], guided], 1)
        a_n = torch.cat([a_n[:, :ln], guided], 1)
        seq_p = seq_p + gate_p[:, None] * blk.proj_out(torch.cat([a_p, blk.act_mlp(blk.proj_mlp(norm_p))], 2))
        seq_n = seq_n + gate_n * blk.proj_out(torch.cat([a_n, blk.act_mlp(blk.proj_mlp(norm_n))], 2))
    x = seq_p[:, lp:]
    return model.proj_out(model.norm_out(x, temb_p))


class DoubledSingleRef:
    """Single-stream blocks (``[text | image]`` in, merged attention out, no output projection)."""

    def __init__(self, inner, scale, tau, alpha, text_len):
        self.inner, self.scale, self.tau, self.alpha, self.text_len = inner, scale, tau, alpha, text_len

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        if encoder_hidden_states is not None:
            return out
        b, t = out.shape[0] // 2, self.text_len
        guided = reference_nag(out[:b, t:], out[b:, t:], self.scale, self.tau, self.alpha)
        return torch.cat([out[:, :t], torch.cat([guided, guided])], dim=1)


class DoubledFluxRef:
    """Flux-style processors: double blocks (text given) like :class:`DoubledJointRef`, single blocks like
    :class:`DoubledSingleRef`."""

    def __init__(self, inner, scale, tau, alpha, text_len):
        self.double = DoubledJointRef(inner, scale, tau, alpha)
        self.single = DoubledSingleRef(inner, scale, tau, alpha, text_len)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is None:
            return self.single(attn, hidden_states, None, *args, **kwargs)
        return self.double(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
