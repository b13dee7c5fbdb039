"""A minimal fake of the ComfyUI interfaces nagkit's ComfyUI pack uses, for CI without ComfyUI.

Written for these tests from the interface descriptions in ``shared/research/comfyui-notes.md`` (no ComfyUI code):

* a model patcher: ``clone`` (deep-copies ``model_options``, shallow-copies the wrapper lists), ``model_options``,
  ``set_model_patch_replace``, ``set_model_patch``, ``add_wrapper_with_key`` / ``remove_wrappers_with_key``,
  ``get_model_object``;
* wrapper executors (``OUTER_SAMPLE``, ``PREDICT_NOISE``, ``APPLY_MODEL``) with ``class_obj``;
* an attention function that honours ``transformer_options["optimized_attention_override"]``;
* a guider/sampler loop that batches ``[uncond, cond]`` (``cond_or_uncond == [1, 0]``) when cfg != 1 and skips the
  uncond pass at cfg 1, with per-run and per-call copies of the options dicts;
* tiny models with the structure the pack detects: FLUX-like (``double_blocks``/``single_blocks``/``txt_in``, ``dit``
  replaces, heads-first joint attention), SD3-like (``joint_blocks``, ``(B, L, H·D)`` joint attention plus an
  image-only second attention), UNet-like (``attn2_patch``) and Wan-like (``dit`` double-block replace around a
  cross-attention block), Qwen-Image-like (``transformer_blocks`` behind ``dit`` double-block replaces, text
  positions after the image's, optional reference latents in the image stream) and HunyuanVideo-like (image-first
  FLUX-like blocks, a token refiner as ``txt_in``).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PACK_DIR = Path(__file__).resolve().parents[1] / "comfyui"
OVERRIDE = "optimized_attention_override"


def load_pack(name: str = "nagkit_comfyui_pack") -> Any:
    """Import the pack folder as a package (the way ComfyUI's loader does: a spec on its ``__init__.py``)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PACK_DIR / "__init__.py",
                                                  submodule_search_locations=[str(PACK_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------- executors
class Executor:
    """Calls the wrappers in order, then ``fn``; ``class_obj`` is the object whose method is wrapped."""

    def __init__(self, fn: Callable, class_obj: Any, wrappers: list, index: int = 0) -> None:
        self.fn, self.class_obj, self.wrappers, self.index = fn, class_obj, wrappers, index

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.index < len(self.wrappers):
            nxt = Executor(self.fn, self.class_obj, self.wrappers, self.index + 1)
            return self.wrappers[self.index](nxt, *args, **kwargs)
        return self.fn(*args, **kwargs)


def wrappers_of(transformer_options: dict, kind: str) -> list:
    return [w for ws in transformer_options.get("wrappers", {}).get(kind, {}).values() for w in ws]


def copy_nested(d: dict) -> dict:
    """Copies dicts (recursively) and lists; other values are shared, as ComfyUI's option copies do."""
    out = dict(d)
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = copy_nested(v)
        elif isinstance(v, list):
            out[k] = list(v)
    return out


# --------------------------------------------------------------------------------------------- attention
def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: Any = None, attn_precision: Any = None,
         skip_reshape: bool = False, skip_output_reshape: bool = False, **kwargs: Any) -> torch.Tensor:
    if not skip_reshape:
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).flatten(2)


def attention(*args: Any, **kwargs: Any) -> torch.Tensor:
    to = kwargs.get("transformer_options")
    if to and OVERRIDE in to:
        return to[OVERRIDE](sdpa, *args, **kwargs)
    return sdpa(*args, **kwargs)


# --------------------------------------------------------------------------------------------- patcher
class FlowSampling:
    """``percent_to_sigma`` of a flow model (sigma = 1 - percent)."""

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return 1.0 - percent

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """What the model is called with (this fake's ``BaseModel`` passes the sigma itself)."""
        return sigma


class BaseModel(nn.Module):
    """``apply_model`` with ``APPLY_MODEL`` wrappers from ``transformer_options`` (flow: denoised = x - sigma·v)."""

    def __init__(self, diffusion_model: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model
        self.model_sampling = FlowSampling()

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None, c_crossattn: Any = None,
                    control: Any = None, transformer_options: dict | None = None, **kwargs: Any) -> torch.Tensor:
        to = transformer_options if transformer_options is not None else {}
        return Executor(self._apply_model, self, wrappers_of(to, "apply_model"))(
            x, t, c_concat, c_crossattn, control, to, **kwargs)

    def _apply_model(self, x: torch.Tensor, t: torch.Tensor, c_concat: Any, c_crossattn: Any, control: Any,
                     transformer_options: dict, **kwargs: Any) -> torch.Tensor:
        v = self.diffusion_model(x, t, c_crossattn, transformer_options=transformer_options, **kwargs)
        return x - t.view(-1, *([1] * (x.ndim - 1))) * v

    def process_text(self, context: torch.Tensor) -> torch.Tensor:
        """What the model's conditioning code does to a text conditioning before ``apply_model`` (FLUX.2 pads it)."""
        pad = getattr(self.diffusion_model, "pad_text_to", None)
        if pad and context.shape[1] < pad:  # as ComfyUI's Flux2.extra_conds: zero tokens in front
            context = F.pad(context, (0, 0, pad - context.shape[1], 0))
        return context


class Patcher:
    def __init__(self, model: BaseModel) -> None:
        self.model = model
        self.model_options: dict = {"transformer_options": {}}
        self.wrappers: dict = {}

    def clone(self) -> Patcher:
        n = Patcher.__new__(Patcher)
        n.model = self.model
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {k: {k1: list(v1) for k1, v1 in v.items()} for k, v in self.wrappers.items()}
        return n

    def get_model_object(self, name: str) -> Any:
        return getattr(self.model, name)

    def set_model_patch_replace(self, patch: Any, name: str, block_name: str, number: int) -> None:
        to = dict(self.model_options["transformer_options"])
        replaces = dict(to.get("patches_replace", {}))
        replaces[name] = dict(replaces.get(name, {}))
        replaces[name][(block_name, number)] = patch
        to["patches_replace"] = replaces
        self.model_options["transformer_options"] = to

    def set_model_patch(self, patch: Any, name: str) -> None:
        to = self.model_options["transformer_options"]
        patches = to.setdefault("patches", {})
        patches[name] = patches.get(name, []) + [patch]

    def add_wrapper_with_key(self, kind: str, key: str, wrapper: Callable) -> None:
        self.wrappers.setdefault(kind, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, kind: str, key: str) -> None:
        self.wrappers.get(kind, {}).pop(key, None)


# --------------------------------------------------------------------------------------------- sampling
class Guider:
    """CFG guider + Euler sampler over a flow schedule; records every ``apply_model`` call's ``cond_or_uncond``."""

    def __init__(self, patcher: Patcher, positive: Any, negative: Any, cfg: float) -> None:
        """``positive``/``negative``: a text tensor, or ``(tensor, {name: tensor})`` with other conditioning tensors
        (HiDream's ``conditioning_llama3``), mapped to model arguments by the model's ``cond_map``."""
        self.model_patcher = patcher
        self.original_conds = {"positive": [_entry(positive)], "negative": [] if negative is None else [
            _entry(negative)]}
        self.cfg = cfg
        self.calls: list[list[int]] = []

    def sample(self, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        self.model_options = copy_nested(self.model_patcher.model_options)
        to = self.model_options["transformer_options"]
        to["wrappers"] = {k: {k1: list(v1) for k1, v1 in v.items()} for k, v in self.model_patcher.wrappers.items()}
        return Executor(self.outer_sample, self, wrappers_of(to, "outer_sample"))(noise, sigmas)

    def outer_sample(self, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        options = copy_nested(self.model_options)
        x = noise * sigmas[0]
        for i in range(len(sigmas) - 1):
            s = sigmas[i]
            predict = Executor(self.predict_noise, self, wrappers_of(self.model_options["transformer_options"],
                                                                     "predict_noise"))
            denoised = predict(x, s.expand(x.shape[0]), options, None)
            x = x + (sigmas[i + 1] - s) * (x - denoised) / s
        return x

    def predict_noise(self, x: torch.Tensor, sigma: torch.Tensor, model_options: dict, seed: Any) -> torch.Tensor:
        model = self.model_patcher.model
        pos = self.original_conds["positive"][0]
        negs = self.original_conds["negative"]
        cond_map = getattr(model.diffusion_model, "cond_map", {})

        def call(cou: list[int], entries: list[dict]) -> list[torch.Tensor]:
            to = copy_nested(model_options["transformer_options"])
            to["cond_or_uncond"] = list(cou)
            to["sigmas"] = torch.cat([sigma] * len(cou))
            self.calls.append(list(cou))
            xs = torch.cat([x] * len(cou))
            ctx = torch.cat([model.process_text(e["cross_attn"]).expand(x.shape[0], -1, -1) for e in entries])
            kw = {arg: torch.cat([e[name].expand(x.shape[0], *e[name].shape[1:]) for e in entries])
                  for name, arg in cond_map.items() if name in entries[0]}
            return list(model.apply_model(xs, to["sigmas"], c_crossattn=ctx, transformer_options=to, **kw)
                        .chunk(len(cou)))

        if math.isclose(self.cfg, 1.0) or not negs:
            return call([0], [pos])[0]
        neg = negs[0]

        def shapes(e: dict) -> list:
            return [model.process_text(e["cross_attn"]).shape, *(e[k].shape for k in sorted(e) if k != "cross_attn")]

        if shapes(neg) == shapes(pos):  # batched together, uncond first (as ComfyUI orders them)
            uncond, cond = call([1, 0], [neg, pos])
        else:
            uncond, cond = call([1], [neg])[0], call([0], [pos])[0]
        return uncond + self.cfg * (cond - uncond)


def _entry(c: Any) -> dict:
    if isinstance(c, tuple):
        return {"cross_attn": c[0], **c[1]}
    return {"cross_attn": c}


def flow_sigmas(steps: int) -> torch.Tensor:
    return torch.linspace(1.0, 0.0, steps + 1)


def sample(patcher: Patcher, positive: torch.Tensor, negative: torch.Tensor | None, cfg: float = 1.0,
           steps: int = 3, batch: int = 1, seed: int = 0, guider: Guider | None = None) -> torch.Tensor:
    dm = patcher.model.diffusion_model
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, *dm.latent_shape, generator=g)
    guider = guider or Guider(patcher, positive, negative, cfg)
    with torch.no_grad():
        return guider.sample(noise, flow_sigmas(steps))


# --------------------------------------------------------------------------------------------- models
def _init(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.15 if p.ndim > 1 else 0.05))
    return module


class FluxDouble(nn.Module):
    flipped_img_txt = False

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.img_qkv, self.txt_qkv = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.img_out, self.txt_out = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor,
                attn_mask: Any = None, transformer_options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        def qkv(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            return lin(x + vec[:, None]).view(x.shape[0], x.shape[1], 3, self.heads, -1).permute(2, 0, 3, 1, 4)

        iq, ik, iv = qkv(self.img_qkv, img)
        tq, tk, tv = qkv(self.txt_qkv, txt)
        q, k, v = torch.cat((tq, iq), 2) + pe, torch.cat((tk, ik), 2) + pe, torch.cat((tv, iv), 2)
        a = attention(q, k, v, self.heads, skip_reshape=True, mask=attn_mask, transformer_options=transformer_options)
        return img + self.img_out(a[:, txt.shape[1]:]), txt + self.txt_out(a[:, : txt.shape[1]])


class FluxSingle(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor, attn_mask: Any = None,
                transformer_options: dict | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x + vec[:, None]).view(x.shape[0], x.shape[1], 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = attention(q + pe, k + pe, v, self.heads, skip_reshape=True, mask=attn_mask,
                      transformer_options=transformer_options)
        return x + self.out(a)


def _replace(to: dict, key: tuple, honour: bool) -> Callable | None:
    return to.get("patches_replace", {}).get("dit", {}).get(key) if honour else None


class FakeFlux(nn.Module):
    """FLUX-like MM-DiT: text-first joint attention, ``dit`` double/single replaces, zero text positions."""

    def __init__(self, seed: int = 0, dim: int = 16, heads: int = 2, ctx: int = 12, tokens: int = 16,
                 channels: int = 4) -> None:
        super().__init__()
        self.latent_shape = (tokens, channels)
        self.img_in, self.txt_in = nn.Linear(channels, dim), nn.Linear(ctx, dim)
        self.time_in, self.final = nn.Linear(1, dim), nn.Linear(dim, channels)
        self.double_blocks = nn.ModuleList([FluxDouble(dim, heads) for _ in range(2)])
        self.single_blocks = nn.ModuleList([FluxSingle(dim, heads) for _ in range(2)])
        self.honour_replaces = True
        self.head_dim = dim // heads
        _init(self, seed)

    def pe(self, n_txt: int, n_img: int) -> torch.Tensor:
        pos = torch.cat([torch.zeros(n_txt), torch.arange(1, n_img + 1, dtype=torch.float32)])
        freq = torch.arange(self.head_dim, dtype=torch.float32)
        return 0.1 * torch.sin(pos[:, None] * (freq[None] + 1) * 0.3)[None, None]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                transformer_options: dict | None = None) -> torch.Tensor:
        to = transformer_options or {}
        img, txt, vec = self.img_in(x), self.txt_in(context), self.time_in(t.view(-1, 1).to(x.dtype))
        pe = self.pe(txt.shape[1], img.shape[1])
        for i, block in enumerate(self.double_blocks):
            replace = _replace(to, ("double_block", i), self.honour_replaces)
            if replace is None:
                img, txt = block(img, txt, vec, pe, None, to)
            else:
                def original(args: dict, block: nn.Module = block) -> dict:
                    out = block(args["img"], args["txt"], args["vec"], args["pe"], args.get("attn_mask"),
                                args.get("transformer_options"))
                    return {"img": out[0], "txt": out[1]}
                out = replace({"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": None,
                               "transformer_options": to}, {"original_block": original})
                img, txt = out["img"], out["txt"]
        img = torch.cat((txt, img), 1)
        for i, block in enumerate(self.single_blocks):
            replace = _replace(to, ("single_block", i), self.honour_replaces)
            if replace is None:
                img = block(img, vec, pe, None, to)
            else:
                def original(args: dict, block: nn.Module = block) -> dict:
                    return {"img": block(args["img"], args["vec"], args["pe"], args.get("attn_mask"),
                                         args.get("transformer_options"))}
                img = replace({"img": img, "vec": vec, "pe": pe, "attn_mask": None, "transformer_options": to},
                              {"original_block": original})["img"]
        return self.final(img[:, txt.shape[1]:])


class SD3Joint(nn.Module):
    """SD3-like joint block: ``(B, L, H·D)`` attention over ``[ctx; x]`` plus (SD3.5-M) an image-only attention."""

    def __init__(self, dim: int, heads: int, self_attn: bool) -> None:
        super().__init__()
        self.heads = heads
        self.c_qkv, self.x_qkv = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.c_out, self.x_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.x_qkv2 = nn.Linear(dim, 3 * dim) if self_attn else None

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor,
                transformer_options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        cq, ck, cv = self.c_qkv(context + c[:, None]).chunk(3, -1)
        xq, xk, xv = self.x_qkv(x + c[:, None]).chunk(3, -1)
        a = attention(torch.cat((cq, xq), 1), torch.cat((ck, xk), 1),
                      torch.cat((cv, xv), 1).unflatten(-1, (self.heads, -1)),  # v 4-D, as SD3's split_qkv gives it
                      heads=self.heads, transformer_options=transformer_options)
        out = x + self.x_out(a[:, context.shape[1]:])
        if self.x_qkv2 is not None:
            q2, k2, v2 = self.x_qkv2(x).chunk(3, -1)
            out = out + attention(q2, k2, v2, heads=self.heads, transformer_options=transformer_options)
        return context + self.c_out(a[:, : context.shape[1]]), out


class FakeSD3(nn.Module):
    def __init__(self, seed: int = 0, dim: int = 16, heads: int = 2, ctx: int = 12, tokens: int = 16,
                 channels: int = 4) -> None:
        super().__init__()
        self.latent_shape = (tokens, channels)
        self.x_embedder, self.context_embedder = nn.Linear(channels, dim), nn.Linear(ctx, dim)
        self.t_embedder, self.final = nn.Linear(1, dim), nn.Linear(dim, channels)
        self.joint_blocks = nn.ModuleList([SD3Joint(dim, heads, self_attn=i == 0) for i in range(2)])
        self.register_length = 0
        self.context_processor = None
        _init(self, seed)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                transformer_options: dict | None = None) -> torch.Tensor:
        to = transformer_options or {}
        h, ctx, c = self.x_embedder(x), self.context_embedder(context), self.t_embedder(t.view(-1, 1).to(x.dtype))
        for i, block in enumerate(self.joint_blocks):
            replace = _replace(to, ("double_block", i), True)
            if replace is None:
                ctx, h = block(ctx, h, c, to)
            else:
                def original(args: dict, block: nn.Module = block) -> dict:
                    txt, img = block(args["txt"], args["img"], args["vec"], args["transformer_options"])
                    return {"txt": txt, "img": img}
                out = replace({"img": h, "txt": ctx, "vec": c, "transformer_options": to},
                              {"original_block": original})
                ctx, h = out["txt"], out["img"]
        return self.final(h)


class CrossBlock(nn.Module):
    """UNet ``BasicTransformerBlock``-like: self-attention, then cross-attention after the ``attn2_patch`` list."""

    def __init__(self, dim: int, heads: int, ctx: int, index: int) -> None:
        super().__init__()
        self.heads, self.index = heads, index
        self.attn1 = nn.Linear(dim, 3 * dim)
        self.attn2 = nn.ModuleDict({"q": nn.Linear(dim, dim), "k": nn.Linear(ctx, dim), "v": nn.Linear(ctx, dim),
                                    "o": nn.Linear(dim, dim)})

    def forward(self, x: torch.Tensor, context: torch.Tensor, to: dict) -> torch.Tensor:
        extra = {k: v for k, v in to.items() if k not in ("patches", "patches_replace")}
        extra["block"], extra["transformer_index"] = ("input", self.index), 0
        q, k, v = self.attn1(x).chunk(3, -1)
        x = x + attention(q, k, v, self.heads, transformer_options=to)
        n, ctx, val = x, context, context
        for patch in to.get("patches", {}).get("attn2_patch", []):
            n, ctx, val = patch(n, ctx, val, extra)
        a = self.attn2
        return x + a["o"](attention(a["q"](n), a["k"](ctx), a["v"](val), self.heads, transformer_options=to))


class FakeUNet(nn.Module):
    def __init__(self, seed: int = 0, dim: int = 16, heads: int = 2, ctx: int = 12, tokens: int = 16,
                 channels: int = 4) -> None:
        super().__init__()
        self.latent_shape = (tokens, channels)
        self.inp, self.time, self.out = nn.Linear(channels, dim), nn.Linear(1, dim), nn.Linear(dim, channels)
        self.input_blocks = nn.ModuleList([CrossBlock(dim, heads, ctx, 0)])
        self.middle_block = CrossBlock(dim, heads, ctx, 1)
        self.output_blocks = nn.ModuleList([CrossBlock(dim, heads, ctx, 2)])
        _init(self, seed)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                transformer_options: dict | None = None) -> torch.Tensor:
        to = transformer_options or {}
        h = self.inp(x) + self.time(t.view(-1, 1).to(x.dtype))[:, None]
        for block in [*self.input_blocks, self.middle_block, *self.output_blocks]:
            h = block(h, context, to)
        return self.out(h)


class WanCross(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, context: torch.Tensor, to: dict) -> torch.Tensor:
        return self.o(attention(self.q(x), self.k(context), self.v(context), heads=self.heads, transformer_options=to))


class WanBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.self_attn = nn.Linear(dim, 3 * dim)
        self.cross_attn = WanCross(dim, heads)

    def forward(self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor, to: dict) -> torch.Tensor:
        q, k, v = self.self_attn(x + e[:, None]).chunk(3, -1)
        x = x + attention(q, k, v, heads=self.heads, transformer_options=to)
        return x + self.cross_attn(x, context, to)


class FakeWan(nn.Module):
    def __init__(self, seed: int = 0, dim: int = 16, heads: int = 2, ctx: int = 12, tokens: int = 16,
                 channels: int = 4) -> None:
        super().__init__()
        self.latent_shape = (tokens, channels)
        self.patch_embedding, self.time, self.head = nn.Linear(channels, dim), nn.Linear(1, dim), nn.Linear(dim,
                                                                                                             channels)
        self.text_embedding = nn.Sequential(nn.Linear(ctx, dim), nn.GELU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([WanBlock(dim, heads) for _ in range(2)])
        _init(self, seed)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                transformer_options: dict | None = None) -> torch.Tensor:
        to = transformer_options or {}
        h, e = self.patch_embedding(x), self.time(t.view(-1, 1).to(x.dtype))
        context = self.text_embedding(context)
        for i, block in enumerate(self.blocks):
            replace = _replace(to, ("double_block", i), True)
            if replace is None:
                h = block(h, e, context, to)
            else:
                def original(args: dict, block: nn.Module = block) -> dict:
                    return {"img": block(args["img"], args["vec"], args["txt"], args["transformer_options"])}
                h = replace({"img": h, "txt": context, "vec": e, "pe": None, "transformer_options": to},
                            {"original_block": original})["img"]
        return self.head(h)


class QwenAttention(nn.Module):
    """Qwen-Image-like joint attention: separate image/text projections, ``[txt; img]`` in ``(B, L, H·D)``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out, self.to_add_out = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, pe: torch.Tensor,
                to: dict) -> tuple[torch.Tensor, torch.Tensor]:
        def heads(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            return lin(x).unflatten(-1, (self.heads, -1))

        q = torch.cat([heads(self.add_q_proj, txt), heads(self.to_q, img)], 1) + pe
        k = torch.cat([heads(self.add_k_proj, txt), heads(self.to_k, img)], 1) + pe
        v = torch.cat([heads(self.add_v_proj, txt), heads(self.to_v, img)], 1)
        a = attention(q.flatten(2), k.flatten(2), v.flatten(2), self.heads, transformer_options=to)
        return self.to_out(a[:, txt.shape[1]:]), self.to_add_out(a[:, :txt.shape[1]])


class QwenBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = QwenAttention(dim, heads)
        self.img_mlp, self.txt_mlp = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: torch.Tensor, transformer_options: dict) -> tuple[torch.Tensor, torch.Tensor]:
        img, txt = hidden_states + temb[:, None], encoder_hidden_states + temb[:, None]
        a_img, a_txt = self.attn(img, txt, image_rotary_emb, transformer_options)
        img, txt = hidden_states + a_img, encoder_hidden_states + a_txt
        return txt + torch.tanh(self.txt_mlp(txt)), img + torch.tanh(self.img_mlp(img))


class FakeRope(nn.Module):
    """``(B, L, 3)`` positions -> ``(B, 1, L, D)`` (the model squeezes/unsqueezes it like ComfyUI's ``EmbedND``)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        freq = torch.arange(self.head_dim, dtype=torch.float32, device=ids.device)
        pos = ids[..., 0] + 0.5 * ids[..., 1] + 0.25 * ids[..., 2]
        return (0.2 * torch.sin(pos[..., None] * (freq + 1) * 0.37))[:, None]


class FakeQwen(nn.Module):
    """Qwen-Image-like MM-DiT: ``transformer_blocks`` behind ``dit`` double-block replaces, ``txt_norm``/``txt_in``,
    text RoPE positions ``txt_start + j`` with ``txt_start`` from the latent size, latents ``(C, H, W)`` patchified 2x2.
    ``ref_latents`` (set on the module) are appended to the image stream, as Qwen-Image-Edit's reference latents."""

    patch_size = 2

    def __init__(self, seed: int = 0, dim: int = 16, heads: int = 2, ctx: int = 12, tokens: int = 16,
                 channels: int = 4) -> None:
        super().__init__()
        side = 2 * int(math.isqrt(tokens))
        self.latent_shape = (channels, side, side)
        self.img_in, self.txt_in = nn.Linear(4 * channels, dim), nn.Linear(ctx, dim)
        self.txt_norm = nn.LayerNorm(ctx)
        self.time_in, self.proj_out = nn.Linear(1, dim), nn.Linear(dim, 4 * channels)
        self.pe_embedder = FakeRope(dim // heads)
        self.transformer_blocks = nn.ModuleList([QwenBlock(dim, heads) for _ in range(2)])
        self.ref_latents: torch.Tensor | None = None
        _init(self, seed)

    def process_img(self, x: torch.Tensor, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        tokens = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)
        hl, wl = h // 2, w // 2
        ids = torch.zeros(hl, wl, 3)
        ids[..., 0] = index
        ids[..., 1] = torch.arange(hl, dtype=torch.float32)[:, None] - hl // 2
        ids[..., 2] = torch.arange(wl, dtype=torch.float32)[None] - wl // 2
        return tokens, ids.reshape(1, -1, 3).repeat(b, 1, 1)

    def rope(self, x: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(image tokens, RoPE table over [text; image], number of generated image tokens)."""
        img, img_ids = self.process_img(x)
        n = img.shape[1]
        if self.ref_latents is not None:
            ref, ref_ids = self.process_img(self.ref_latents.expand(x.shape[0], -1, -1, -1), index=1)
            img, img_ids = torch.cat([img, ref], 1), torch.cat([img_ids, ref_ids], 1)
        p = self.patch_size
        start = round(max(((x.shape[-1] + p // 2) // p) // 2, ((x.shape[-2] + p // 2) // p) // 2))
        txt_ids = torch.arange(start, start + text_len).reshape(1, -1, 1).repeat(x.shape[0], 1, 3)
        pe = self.pe_embedder(torch.cat([txt_ids, img_ids], 1)).squeeze(1).unsqueeze(2).to(x.dtype)
        return img, pe, n

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                transformer_options: dict | None = None) -> torch.Tensor:
        to = transformer_options or {}
        img, pe, n = self.rope(x, context.shape[1])
        img, txt = self.img_in(img), self.txt_in(self.txt_norm(context))
        temb = self.time_in(t.view(-1, 1).to(x.dtype))
        for i, block in enumerate(self.transformer_blocks):
            replace = _replace(to, ("double_block", i), True)
            if replace is None:
                txt, img = block(img, txt, temb, pe, to)
            else:
                def original(args: dict, block: nn.Module = block) -> dict:
                    out = block(args["img"], args["txt"], args["vec"], args["pe"], args["transformer_options"])
                    return {"txt": out[0], "img": out[1]}
                out = replace({"img": img, "txt": txt, "vec": temb, "pe": pe, "transformer_options": to},
                              {"original_block": original})
                img, txt = out["img"], out["txt"]
        b, c, h, w = x.shape
        out = self.proj_out(img[:, :n]).view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)


class HunyuanDouble(FluxDouble):
    """Image-first double block (``[img; txt]``), as HunyuanVideo's ``flipped_img_txt`` blocks."""

    flipped_img_txt = True

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor,
                attn_mask: Any = None, transformer_options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        def qkv(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            return lin(x + vec[:, None]).view(x.shape[0], x.shape[1], 3, self.heads, -1).permute(2, 0, 3, 1, 4)

        iq, ik, iv = qkv(self.img_qkv, img)
        tq, tk, tv = qkv(self.txt_qkv, txt)
        q, k, v = torch.cat((iq, tq), 2) + pe, torch.cat((ik, tk), 2) + pe, torch.cat((iv, tv), 2)
        a = attention(q, k, v, self.heads, skip_reshape=True, mask=attn_mask, transformer_options=transformer_options)
        n = img.shape[1]
        return img + self.img_out(a[:, :n]), txt + self.txt_out(a[:, n:])


class FakeRefinerBlocks(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, to: dict) -> torch.Tensor:
        q, k, v = self.qkv(x + c[:, None]).chunk(3, -1)
        return x + self.out(attention(q, k, v, self.heads, transformer_options=to))


class FakeTokenRefiner(nn.Module):
    """HunyuanVideo-like text refiner: a pooled (mean) text vector and the timestep condition a self-attention over
    the text tokens, so the prompt's and the negative's tokens cannot be refined together."""

    def __init__(self, ctx: int, dim: int, heads: int) -> None:
        super().__init__()
        self.input_embedder, self.c_embedder, self.t_embedder = nn.Linear(ctx, dim), nn.Linear(ctx, dim), nn.Linear(
            1, dim)
        self.individual_token_refiner = FakeRefinerBlocks(dim, heads)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, mask: Any,
                transformer_options: dict | None = None) -> torch.Tensor:
        c = self.t_embedder(timesteps.view(-1, 1).to(x.dtype)) + self.c_embedder(x.mean(1))
        return self.individual_token_refiner(self.input_embedder(x), c, transformer_options or {})


class FakeHunyuan(FakeFlux):
    """HunyuanVideo-like MM-DiT: image-first double/single blocks behind ``dit`` replaces, a token refiner as
    ``txt_in`` (called with the timesteps), zero text positions after the image's."""

    def __init__(self, seed: int = 0, dim: int = 16, heads: int = 2, ctx: int = 12, tokens: int = 16,
                 channels: int = 4) -> None:
        super().__init__(seed, dim, heads, ctx, tokens, channels)
        self.double_blocks = nn.ModuleList([HunyuanDouble(dim, heads) for _ in range(2)])
        self.txt_in = FakeTokenRefiner(ctx, dim, heads)
        _init(self, seed + 100)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                transformer_options: dict | None = None) -> torch.Tensor:
        to = transformer_options or {}
        img, vec = self.img_in(x), self.time_in(t.view(-1, 1).to(x.dtype))
        txt = self.txt_in(context, t, None, transformer_options=to)
        n = img.shape[1]
        pe = self.pe(txt.shape[1], n)  # text rows first in FakeFlux.pe: reorder to [img; txt]
        pe = torch.cat([pe[:, :, txt.shape[1]:], pe[:, :, :txt.shape[1]]], dim=2)
        for i, block in enumerate(self.double_blocks):
            replace = _replace(to, ("double_block", i), self.honour_replaces)
            if replace is None:
                img, txt = block(img, txt, vec, pe, None, to)
            else:
                def original(args: dict, block: nn.Module = block) -> dict:
                    out = block(args["img"], args["txt"], args["vec"], args["pe"], args.get("attention_mask"),
                                args.get("transformer_options"))
                    return {"img": out[0], "txt": out[1]}
                out = replace({"img": img, "txt": txt, "vec": vec, "pe": pe, "attention_mask": None,
                               "transformer_options": to}, {"original_block": original})
                img, txt = out["img"], out["txt"]
        img = torch.cat((img, txt), 1)
        for i, block in enumerate(self.single_blocks):
            replace = _replace(to, ("single_block", i), self.honour_replaces)
            if replace is None:
                img = block(img, vec, pe, None, to)
            else:
                def original(args: dict, block: nn.Module = block) -> dict:
                    return {"img": block(args["img"], args["vec"], args["pe"], args.get("attention_mask"),
                                         args.get("transformer_options"))}
                img = replace({"img": img, "vec": vec, "pe": pe, "attention_mask": None, "transformer_options": to},
                              {"original_block": original})["img"]
        return self.final(img[:, :n])


class Flux2Double(FluxDouble):
    """FLUX.2-like double block: ``vec`` is the global ``(image, text)`` modulation pair."""

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: tuple, pe: torch.Tensor, attn_mask: Any = None,
                transformer_options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        def qkv(lin: nn.Linear, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
            return lin(x * (1 + mod[:, None])).view(x.shape[0], x.shape[1], 3, self.heads, -1).permute(2, 0, 3, 1, 4)

        iq, ik, iv = qkv(self.img_qkv, img, vec[0])
        tq, tk, tv = qkv(self.txt_qkv, txt, vec[1])
        q, k, v = torch.cat((tq, iq), 2) + pe, torch.cat((tk, ik), 2) + pe, torch.cat((tv, iv), 2)
        a = attention(q, k, v, self.heads, skip_reshape=True, mask=attn_mask, transformer_options=transformer_options)
        return img + self.img_out(a[:, txt.shape[1]:]), txt + self.txt_out(a[:, : txt.shape[1]])


class Flux2Rope(nn.Module):
    """``(B, L, 4)`` positions -> ``(B, 1, L, D)`` additive table (every axis matters; 0 on every axis -> 0)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        freq = torch.arange(self.head_dim, dtype=torch.float32, device=ids.device)
        pos = ids[..., 0] + 0.5 * ids[..., 1] + 0.25 * ids[..., 2] + 0.125 * ids[..., 3]
        return (0.1 * torch.sin(pos[..., None] * (freq + 1) * 0.3))[:, None]


class FakeFlux2(FakeFlux):
    """FLUX.2 / Klein-like: global modulation (``params.global_modulation``; the double blocks get an ``(image, text)``
    modulation pair, the single blocks one), text positions ``0 … L-1`` on RoPE axis 3 (``params.txt_ids_dims``)
    through ``pe_embedder``, and (``pad_text_to``) a text conditioning left-padded with zero tokens by the model's
    conditioning code, as ComfyUI's Flux2 pads to 512."""

    def __init__(self, seed: int = 0, dim: int = 16, heads: int = 2, ctx: int = 12, tokens: int = 16,
                 channels: int = 4, pad_text_to: int | None = None) -> None:
        super().__init__(seed, dim, heads, ctx, tokens, channels)
        self.double_blocks = nn.ModuleList([Flux2Double(dim, heads) for _ in range(2)])
        self.double_stream_modulation_img, self.double_stream_modulation_txt = nn.Linear(dim, dim), nn.Linear(dim,
                                                                                                              dim)
        self.single_stream_modulation = nn.Linear(dim, dim)
        self.pe_embedder = Flux2Rope(self.head_dim)
        self.params = types.SimpleNamespace(txt_ids_dims=[3], global_modulation=True, axes_dim=[2, 2, 2, 2])
        self.pad_text_to = pad_text_to
        _init(self, seed + 200)

    def pe(self, n_txt: int, n_img: int) -> torch.Tensor:
        ids = torch.zeros(1, n_txt + n_img, 4)
        ids[0, :n_txt, 3] = torch.arange(n_txt, dtype=torch.float32)
        ids[0, n_txt:, 1] = torch.arange(1, n_img + 1, dtype=torch.float32)
        return self.pe_embedder(ids)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                transformer_options: dict | None = None) -> torch.Tensor:
        to = transformer_options or {}
        img, txt, vec = self.img_in(x), self.txt_in(context), self.time_in(t.view(-1, 1).to(x.dtype))
        pe = self.pe(txt.shape[1], img.shape[1])
        double = (torch.tanh(self.double_stream_modulation_img(vec)),
                  torch.tanh(self.double_stream_modulation_txt(vec)))
        for i, block in enumerate(self.double_blocks):
            def original(args: dict, block: nn.Module = block) -> dict:
                out = block(args["img"], args["txt"], args["vec"], args["pe"], args.get("attn_mask"),
                            args.get("transformer_options"))
                return {"img": out[0], "txt": out[1]}
            replace = _replace(to, ("double_block", i), self.honour_replaces) or (lambda a, e: e["original_block"](a))
            out = replace({"img": img, "txt": txt, "vec": double, "pe": pe, "attn_mask": None,
                           "transformer_options": to}, {"original_block": original})
            img, txt = out["img"], out["txt"]
        img = torch.cat((txt, img), 1)
        single = self.single_stream_modulation(vec)
        for i, block in enumerate(self.single_blocks):
            def original(args: dict, block: nn.Module = block) -> dict:
                return {"img": block(args["img"], args["vec"], args["pe"], args.get("attn_mask"),
                                     args.get("transformer_options"))}
            replace = _replace(to, ("single_block", i), self.honour_replaces) or (lambda a, e: e["original_block"](a))
            img = replace({"img": img, "vec": single, "pe": pe, "attn_mask": None, "transformer_options": to},
                          {"original_block": original})["img"]
        return self.final(img[:, txt.shape[1]:])


class HiDreamDouble(nn.Module):
    """HiDream-like dual-stream block: joint attention over ``[img; txt]`` in ``(B, L, H·D)``, text with its own
    projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.img_qkv, self.txt_qkv = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.img_out, self.txt_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.img_mlp, self.txt_mlp = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor, pe: torch.Tensor,
                to: dict) -> tuple[torch.Tensor, torch.Tensor]:
        iq, ik, iv = self.img_qkv(img + temb[:, None]).chunk(3, -1)
        tq, tk, tv = self.txt_qkv(txt + temb[:, None]).chunk(3, -1)
        a = attention(torch.cat((iq, tq), 1) + pe, torch.cat((ik, tk), 1) + pe, torch.cat((iv, tv), 1), self.heads,
                      transformer_options=to)
        n = img.shape[1]
        img, txt = img + self.img_out(a[:, :n]), txt + self.txt_out(a[:, n:])
        return img + torch.tanh(self.img_mlp(img)), txt + torch.tanh(self.txt_mlp(txt))


class HiDreamSingle(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out, self.mlp = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, temb: torch.Tensor, pe: torch.Tensor, to: dict) -> torch.Tensor:
        q, k, v = self.qkv(h + temb[:, None]).chunk(3, -1)
        h = h + self.out(attention(q + pe, k + pe, v, self.heads, transformer_options=to))
        return h + torch.tanh(self.mlp(h))


class FakeHiDream(nn.Module):
    """HiDream-I1-like: no block-replace patch point; a T5 context and stacked Llama-3 layers
    (``encoder_hidden_states_llama3``, ``(B, layers, L, C)``); the carried text ``[T5, Llama_last]`` plus a fresh
    projection of Llama layer ``llama_layers[k]`` in block ``k`` (dual-stream blocks, then single-stream blocks on
    ``[img; text]``), cut back after every block; text positions all zero; latents ``(C, H, W)`` patchified 2x2."""

    patch_size = 2
    cond_map = {"conditioning_llama3": "encoder_hidden_states_llama3"}

    def __init__(self, seed: int = 0, dim: int = 16, heads: int = 2, ctx: int = 12, tokens: int = 16,
                 channels: int = 4, llama: int = 10) -> None:
        super().__init__()
        side = 2 * int(math.isqrt(tokens))
        self.latent_shape = (channels, side, side)
        self.x_embedder, self.final = nn.Linear(4 * channels, dim), nn.Linear(dim, 4 * channels)
        self.t_embedder = nn.Linear(1, dim)
        self.double_stream_blocks = nn.ModuleList([HiDreamDouble(dim, heads) for _ in range(2)])
        self.single_stream_blocks = nn.ModuleList([HiDreamSingle(dim, heads) for _ in range(2)])
        self.llama_layers = [0, 1, 1, 1]
        self.caption_projection = nn.ModuleList([nn.Linear(llama, dim) for _ in range(4)] + [nn.Linear(ctx, dim)])
        self.dim = dim
        _init(self, seed)

    def image_pe(self, n: int) -> torch.Tensor:
        pos = torch.arange(1, n + 1, dtype=torch.float32)
        return 0.1 * torch.sin(pos[:, None] * (torch.arange(self.dim) + 1) * 0.3)[None]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, transformer_options: dict | None = None,
                encoder_hidden_states_llama3: torch.Tensor | None = None) -> torch.Tensor:
        to = transformer_options or {}
        b, c, h, w = x.shape
        img = self.x_embedder(x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c))
        temb = self.t_embedder(t.view(-1, 1).to(x.dtype))
        llama = encoder_hidden_states_llama3.movedim(1, 0)
        enc = [self.caption_projection[i](llama[k]) for i, k in enumerate(self.llama_layers)]
        enc.append(self.caption_projection[-1](context))
        n = img.shape[1]

        def pe(total: int) -> torch.Tensor:  # image rows, then zeros for every text token
            return torch.cat([self.image_pe(n), torch.zeros(1, total - n, self.dim)], 1)

        initial = torch.cat([enc[-1], enc[-2]], 1)
        keep = initial.shape[1]
        block_id = 0
        for block in self.double_stream_blocks:
            txt = torch.cat([initial, enc[block_id]], 1)
            img, txt = block(img, txt, temb, pe(n + txt.shape[1]), to)
            initial = txt[:, :keep]
            block_id += 1
        hs = torch.cat([img, initial], 1)
        length = hs.shape[1]
        for block in self.single_stream_blocks:
            hs = torch.cat([hs, enc[block_id]], 1)
            hs = block(hs, temb, pe(hs.shape[1]), to)[:, :length]
            block_id += 1
        out = self.final(hs[:, :n]).view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)


MODELS = {"flux": FakeFlux, "sd3": FakeSD3, "unet": FakeUNet, "wan": FakeWan, "qwen": FakeQwen,
          "hunyuan": FakeHunyuan, "flux2": FakeFlux2, "hidream": FakeHiDream}


def patcher(kind: str, seed: int = 0, **sizes: int) -> Patcher:
    return Patcher(BaseModel(MODELS[kind](seed, **sizes)))


def text(seed: int, length: int = 5, width: int = 12) -> torch.Tensor:
    return torch.randn(1, length, width, generator=torch.Generator().manual_seed(seed))


def hidream_text(seed: int, length: int = 5, llama_length: int | None = None, width: int = 12, llama: int = 10,
                 layers: int = 2) -> tuple[torch.Tensor, dict]:
    """A HiDream-like conditioning: the T5 tensor and ``{"conditioning_llama3": (1, layers, L, C)}``."""
    g = torch.Generator().manual_seed(seed)
    t5 = torch.randn(1, length, width, generator=g)
    states = torch.randn(1, layers, llama_length or length + 1, llama, generator=g)
    return t5, {"conditioning_llama3": states}


def cond_of(kind: str, seed: int, length: int = 5) -> Any:
    """The kind's text conditioning (HiDream: with Llama states)."""
    return hidream_text(seed, length) if kind == "hidream" else text(seed, length)
