"""Contract tests of the ComfyUI pack's glue (``comfyui/glue.py``) against a fake of the ComfyUI interfaces it uses.

No ComfyUI needed. The same behaviours are asserted against real ComfyUI models in ``test_comfyui_integration.py``
(run when ``COMFY_DIR`` points at a ComfyUI checkout).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch

from . import comfy_fake as fake

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

pack = fake.load_pack()
from nagkit_comfyui_pack import glue  # noqa: E402 - registered by load_pack

KINDS = ["flux", "sd3", "unet", "wan", "qwen", "hunyuan"]
#: families added later, covered by one combined contract test each (keeps this file fast)
NEW_KINDS = ["flux2", "hidream"]
ROOT = Path(__file__).resolve().parents[1]


def nag(p: fake.Patcher, negative: torch.Tensor | tuple | None, scale: float = 5.0, **kw: object) -> fake.Patcher:
    """``negative``: a text tensor, or ``(tensor, extras)`` (HiDream's Llama states)."""
    extras = None
    if isinstance(negative, tuple):
        negative, extras = negative
    return glue.patch_model(p, negative, glue.NAGSettings(scale=scale, **kw), extras)


def guided_calls(p: fake.Patcher) -> tuple[fake.Patcher, list]:
    """A clone whose innermost APPLY_MODEL wrapper records (cond_or_uncond, guided?, output) of every call."""
    p = p.clone()
    seen: list = []

    def spy(executor, x, t, c_concat, c_crossattn, control, to, **kw):  # noqa: ANN001, ANN202
        out = executor(x, t, c_concat, c_crossattn, control, to, **kw)
        seen.append((list(to.get("cond_or_uncond", [])), glue.STATE_KEY in to, out.clone()))
        return out

    p.add_wrapper_with_key(glue.APPLY_MODEL, "zz.spy", spy)
    return p, seen


@pytest.mark.parametrize("kind", KINDS)
def test_scale_one_is_bit_identical(kind: str) -> None:
    base = fake.patcher(kind)
    pos, neg, nag_neg = fake.cond_of(kind, 1), fake.cond_of(kind, 2), fake.cond_of(kind, 3, length=7)
    for cfg in (1.0, 3.0):
        ref = fake.sample(base, pos, neg, cfg)
        assert torch.equal(fake.sample(nag(base, nag_neg, scale=1.0), pos, neg, cfg), ref)
        assert torch.equal(fake.sample(nag(base, nag_neg, alpha=0.0), pos, neg, cfg), ref)


@pytest.mark.parametrize("kind", KINDS)
def test_negative_equal_to_prompt_is_close_to_unpatched(kind: str) -> None:
    base = fake.patcher(kind)
    pos, neg = fake.cond_of(kind, 1), fake.cond_of(kind, 2)
    ref = fake.sample(base, pos, neg)
    out = fake.sample(nag(base, pos), pos, neg)
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_contract_of_later_families(kind: str) -> None:
    """The per-family assertions above in one pass: scale 1 bit-identical, negative == prompt ~ unpatched, a different
    negative changes the output and stays finite at cfg 1 and 3, uncond rows bit-identical in a batched call, a
    previous attention override chained, the base model untouched and no tensors in ``model_options``."""
    base = fake.patcher(kind)
    pos, neg, nag_neg = fake.cond_of(kind, 1), fake.cond_of(kind, 2), fake.cond_of(kind, 3, length=7)
    options, params = copy.deepcopy(base.model_options), {k: v.clone() for k, v in base.model.state_dict().items()}
    ref = fake.sample(base, pos, neg, steps=2)
    assert torch.equal(fake.sample(nag(base, nag_neg, scale=1.0), pos, neg, steps=2), ref)
    assert (fake.sample(nag(base, pos), pos, neg, steps=2) - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max())
    patched = nag(base, nag_neg)
    out = fake.sample(patched, pos, neg, steps=2)
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-3
    plain, seen_plain = guided_calls(base)
    ref3 = fake.sample(plain, pos, neg, 3.0, steps=1, batch=2)
    spied, seen = guided_calls(patched)
    out3 = fake.sample(spied, pos, neg, 3.0, steps=1, batch=2)
    assert torch.isfinite(out3).all() and (out3 - ref3).abs().max() > 1e-3
    (cou, guided, first), (_, _, first_ref) = seen[0], seen_plain[0]
    assert cou == [1, 0] and guided
    assert torch.equal(first[:2], first_ref[:2]) and (first[2:] - first_ref[2:]).abs().max() > 1e-4
    calls = []

    def counting(func, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append(1)
        return func(*args, **kwargs)

    with_override = base.clone()
    with_override.model_options["transformer_options"][glue.OVERRIDE] = counting
    chained = fake.sample(nag(with_override, nag_neg), pos, neg, steps=2)
    assert calls and torch.allclose(chained, fake.sample(nag(base, nag_neg, attention="comfy"), pos, neg, steps=2),
                                    atol=1e-5)
    assert torch.allclose(chained, out, atol=1e-4)  # log-sum-exp split == two attentions
    assert base.model_options == options and _tensors(patched.model_options, []) == []
    assert all(torch.equal(v, params[k]) for k, v in base.model.state_dict().items())


@pytest.mark.parametrize("kind", ["wan", "unet"])
def test_cross_attention_when_image_tokens_equal_text_tokens(kind: str) -> None:
    """Image tokens == prompt + negative tokens: self-attention has the cross-attention's key length too; NAG still
    guides the cross-attention (negative == prompt ~ unpatched, a different negative changes the output)."""
    base = fake.patcher(kind, tokens=10)
    pos, neg = fake.text(1), fake.text(2)
    ref = fake.sample(base, pos, neg)
    assert (fake.sample(nag(base, pos), pos, neg) - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert (fake.sample(nag(base, fake.text(3)), pos, neg) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_different_negative_changes_output_and_stays_finite(kind: str, cfg: float) -> None:
    base = fake.patcher(kind)
    pos, neg, nag_neg = fake.cond_of(kind, 1), fake.cond_of(kind, 2), fake.cond_of(kind, 3, length=7)
    ref = fake.sample(base, pos, neg, cfg)
    out = fake.sample(nag(base, nag_neg), pos, neg, cfg)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attention", ["auto", "comfy"])
def test_uncond_rows_bit_identical_in_a_batched_call(kind: str, attention: str) -> None:
    base = fake.patcher(kind)
    pos, neg, nag_neg = fake.cond_of(kind, 1), fake.cond_of(kind, 2), fake.cond_of(kind, 3, length=7)
    plain, seen_plain = guided_calls(base)
    fake.sample(plain, pos, neg, 3.0, steps=1, batch=2)
    patched, seen = guided_calls(nag(base, nag_neg, attention=attention))
    fake.sample(patched, pos, neg, 3.0, steps=1, batch=2)
    (cou, guided, out), (_, _, ref) = seen[0], seen_plain[0]
    assert cou == [1, 0] and guided
    assert torch.equal(out[:2], ref[:2])  # uncond rows: untouched
    assert (out[2:] - ref[2:]).abs().max() > 1e-4  # cond rows: guided


@pytest.mark.parametrize("kind", ["flux", "unet"])
def test_non_contiguous_cond_rows(kind: str) -> None:
    """cond_or_uncond [0, 1, 0] (two prompts around a negative): each cond row as guided alone, uncond untouched."""
    base = fake.patcher(kind)
    p = nag(base, fake.text(3, length=7))
    model = base.model
    x = torch.randn(3, *model.diffusion_model.latent_shape, generator=torch.Generator().manual_seed(0))
    ctx = torch.cat([fake.text(1), fake.text(2), fake.text(4)])
    sigma = torch.full((3,), 0.7)

    def call(patched: fake.Patcher, rows: list[int], cou: list[int]) -> torch.Tensor:
        to = fake.copy_nested(patched.model_options["transformer_options"])
        to["wrappers"] = patched.wrappers
        to["cond_or_uncond"], to["sigmas"] = cou, sigma[rows]
        with torch.no_grad():
            return model.apply_model(x[rows], sigma[rows], c_crossattn=ctx[rows], transformer_options=to)

    together = call(p, [0, 1, 2], [0, 1, 0])
    assert torch.allclose(together[0], call(p, [0], [0])[0], atol=1e-5)
    assert torch.allclose(together[2], call(p, [2], [0])[0], atol=1e-5)
    assert torch.allclose(together[1], call(base, [1], [1])[0], atol=1e-6)


@pytest.mark.parametrize("kind", ["flux", "wan", "qwen"])
def test_latent_batch_two_matches_rows_sampled_alone(kind: str) -> None:
    base = fake.patcher(kind)
    pos, neg, nag_neg = fake.text(1), fake.text(2), fake.text(3, length=7)
    p = nag(base, nag_neg)
    both = fake.sample(p, pos, neg, 3.0, batch=2, seed=5)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2, *base.model.diffusion_model.latent_shape, generator=g)
    for row in range(2):
        guider = fake.Guider(p, pos, neg, 3.0)
        with torch.no_grad():
            alone = guider.sample(noise[row:row + 1], fake.flow_sigmas(3))
        assert torch.allclose(both[row:row + 1], alone, atol=1e-5)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_batched_negative_per_latent(cfg: float) -> None:
    base = fake.patcher("flux")
    pos, neg = fake.text(1), fake.text(2)
    negs = torch.cat([fake.text(3, length=7), fake.text(4, length=7)])
    both = fake.sample(nag(base, negs), pos, neg, cfg, batch=2, seed=5)
    first = fake.sample(nag(base, negs[:1]), pos, neg, cfg, batch=2, seed=5)
    assert torch.allclose(both[0], first[0], atol=1e-6) and not torch.allclose(both[1], first[1], atol=1e-4)


def test_start_end_window_counts() -> None:
    base = fake.patcher("flux")
    pos, neg, nag_neg = fake.text(1), fake.text(2), fake.text(3, length=7)
    sampling = base.get_model_object("model_sampling")
    for start, end, expected in ((0.0, 1.0, 4), (0.0, 0.5, 3), (0.5, 1.0, 2), (0.3, 0.6, 1)):
        start_sigma = sampling.percent_to_sigma(start) if start > 0 else float("inf")
        end_sigma = sampling.percent_to_sigma(end) if end < 1 else float("-inf")
        p, seen = guided_calls(nag(base, nag_neg, sigma_start=start_sigma, sigma_end=end_sigma))
        fake.sample(p, pos, neg, steps=4)
        assert sum(guided for _, guided, _ in seen) == expected, (start, end)  # sigmas 1, .75, .5, .25


def test_window_from_percent_uses_model_sampling() -> None:
    base = fake.patcher("flux")
    assert glue.percent_window(base, 0.0, 1.0) == (float("inf"), float("-inf"))
    assert glue.percent_window(base, 0.25, 0.5) == (0.75, 0.5)
    with pytest.raises(ValueError):
        glue.percent_window(base, 0.6, 0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_previous_attention_override_is_chained(kind: str) -> None:
    base = fake.patcher(kind)
    pos, neg, nag_neg = fake.cond_of(kind, 1), fake.cond_of(kind, 2), fake.cond_of(kind, 3, length=7)
    calls = []

    def counting(func, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append(1)
        return func(*args, **kwargs)

    with_override = base.clone()
    with_override.model_options["transformer_options"][glue.OVERRIDE] = counting
    ref = fake.sample(nag(base, nag_neg, attention="comfy"), pos, neg, steps=2)
    out = fake.sample(nag(with_override, nag_neg), pos, neg, steps=2)
    assert calls, "the previous override was not called"
    assert torch.allclose(out, ref, atol=1e-5)
    fast = fake.sample(nag(base, nag_neg), pos, neg, steps=2)
    assert torch.allclose(fast, ref, atol=1e-4)  # log-sum-exp split == two attentions


def test_previous_block_replace_is_chained_and_nag_replaces_nag() -> None:
    base = fake.patcher("flux")
    pos, neg, nag_neg = fake.text(1), fake.text(2), fake.text(3, length=7)
    calls = []

    def theirs(args, extra):  # noqa: ANN001, ANN202
        calls.append(len(args["txt"][0]))
        return extra["original_block"](args)

    other = base.clone()
    other.set_model_patch_replace(theirs, "dit", "double_block", 0)
    out = fake.sample(nag(other, nag_neg), pos, neg, steps=1)
    assert calls == [5 + 7]  # called once, with the extended text
    assert torch.allclose(out, fake.sample(nag(base, nag_neg), pos, neg, steps=1), atol=1e-6)
    # a second NAG node replaces the first one's patches instead of stacking
    twice = nag(nag(base, fake.text(9, length=3)), nag_neg)
    assert torch.equal(fake.sample(twice, pos, neg, steps=1), fake.sample(nag(base, nag_neg), pos, neg, steps=1))
    assert len(twice.wrappers[glue.APPLY_MODEL][glue.WRAPPER_KEY]) == 1


def _tensors(obj: object, found: list) -> list:
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, found)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
        _tensors(vars(obj), found)
    elif hasattr(obj, "__dict__") and getattr(obj, "nagkit", False):
        _tensors(vars(obj), found)
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_base_model_untouched_and_no_tensors_in_model_options(kind: str) -> None:
    base = fake.patcher(kind)
    pos, neg, nag_neg = fake.cond_of(kind, 1), fake.cond_of(kind, 2), fake.cond_of(kind, 3, length=7)
    options, wrappers = copy.deepcopy(base.model_options), copy.copy(base.wrappers)
    params = {k: v.clone() for k, v in base.model.state_dict().items()}
    ref = fake.sample(base, pos, neg)
    patched = nag(base, nag_neg)
    fake.sample(patched, pos, neg, 3.0)
    assert base.model_options == options and base.wrappers == wrappers
    assert all(torch.equal(v, params[k]) for k, v in base.model.state_dict().items())
    assert torch.equal(fake.sample(base, pos, neg), ref)
    assert _tensors(patched.model_options, []) == []  # clones deep-copy model_options: NAG keeps no tensors there
    clone = patched.clone()
    assert torch.equal(fake.sample(clone, pos, neg), fake.sample(patched, pos, neg))


def test_reuses_the_cfg_negative() -> None:
    base = fake.patcher("flux")
    pos, neg = fake.text(1), fake.text(3, length=5)
    assert torch.equal(fake.sample(nag(base, None), pos, neg), fake.sample(nag(base, neg), pos, neg))
    with pytest.raises(ValueError, match="no NAG negative"):
        fake.sample(nag(base, None), pos, None)


def test_negative_width_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="width 8"):
        fake.sample(nag(fake.patcher("flux"), torch.zeros(1, 4, 8)), fake.text(1), None)


def test_never_silently_off_when_block_patches_are_ignored() -> None:
    base = fake.patcher("flux")
    pos, nag_neg = fake.text(1), fake.text(3, length=7)
    base.model.diffusion_model.honour_replaces = False
    try:
        with pytest.raises(glue.NAGNotApplied, match=r"FakeFlux.*ComfyUI unknown"):
            fake.sample(nag(base, nag_neg), pos, None)
    finally:
        base.model.diffusion_model.honour_replaces = True


def test_never_silently_off_when_the_override_is_bypassed(caplog: pytest.LogCaptureFixture) -> None:
    base = fake.patcher("flux")
    pos, nag_neg = fake.text(1), fake.text(3, length=7)

    def drops_overrides(args, extra):  # noqa: ANN001, ANN202 - another pack's replace that rebuilds the options
        to = {k: v for k, v in args["transformer_options"].items() if k != glue.OVERRIDE}
        return extra["original_block"](dict(args, transformer_options=to))

    other = base.clone()
    other.set_model_patch_replace(drops_overrides, "dit", "double_block", 1)
    with pytest.raises(glue.NAGNotApplied, match="double block 1 did not reach"):
        fake.sample(nag(other, nag_neg), pos, None)
    with caplog.at_level(logging.WARNING, logger="nagkit.comfyui"):
        out = fake.sample(nag(other, nag_neg, on_silent="warn once"), pos, None, steps=3)
    assert torch.isfinite(out).all()
    assert sum("did not reach" in r.message for r in caplog.records) == 1


def test_never_silently_off_when_apply_model_wrapper_is_not_called() -> None:
    base = fake.patcher("unet")
    p = nag(base, fake.text(3, length=7))
    p.wrappers[glue.APPLY_MODEL] = {}  # a ComfyUI that stopped running APPLY_MODEL wrappers
    with pytest.raises(glue.NAGNotApplied, match="apply_model wrapper"):
        fake.sample(p, fake.text(1), None)


def test_unsupported_model_lists_the_supported_families() -> None:
    other = fake.Patcher(fake.BaseModel(torch.nn.Linear(2, 2)))
    with pytest.raises(glue.NAGUnsupportedModel) as err:
        nag(other, fake.text(3))
    message = str(err.value)
    assert "Linear" in message
    for family in glue.FAMILIES:
        assert family.label in message


def test_lumina2_and_z_image_are_refused_by_name() -> None:
    """Lumina2 / Z-Image (ComfyUI's NextDiT: ``layers`` + ``cap_embedder``) get a clear refusal naming the class, why,
    and the supported families, at node execution."""
    class NextDiT(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers, self.cap_embedder = torch.nn.ModuleList([torch.nn.Linear(2, 2)]), torch.nn.Linear(2, 2)

    with pytest.raises(glue.NAGUnsupportedModel) as err:
        glue.nag_model(fake.Patcher(fake.BaseModel(NextDiT())), None, 5.0, 2.5, 0.25)
    message = str(err.value)
    assert "NextDiT" in message and "Lumina2 / Z-Image" in message and "RoPE positions" in message
    assert all(family.label in message for family in glue.FAMILIES)


def test_detection_is_structural() -> None:
    class MyFlux(fake.FakeFlux):
        pass

    class Compiled(torch.nn.Module):  # torch.compile's OptimizedModule keeps the module as _orig_mod
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    assert glue.detect_family(MyFlux()).name == "flux"
    assert glue.detect_family(Compiled(fake.FakeWan())).name == "wan"
    assert glue.detect_family(fake.FakeUNet()).name == "unet"
    assert glue.detect_family(fake.FakeSD3()).name == "sd3"


def test_settings_are_validated() -> None:
    for bad in ({"scale": -1.0}, {"tau": 0.0}, {"alpha": 2.0}, {"on_silent": "ignore"}, {"attention": "x"},
                {"sigma_start": 0.1, "sigma_end": 0.5}):
        with pytest.raises(ValueError):
            glue.NAGSettings(**bad)


def test_node_logic_presets_and_conditioning() -> None:
    base = fake.patcher("flux")
    pos, neg, nag_neg = fake.text(1), fake.text(2), fake.text(3, length=7)
    conditioning = [[nag_neg, {"pooled_output": torch.zeros(1, 4)}]]
    node = glue.nag_model(base, conditioning, 5.0, 2.5, 0.25, 0.0, 1.0)
    assert torch.equal(fake.sample(node, pos, neg), fake.sample(nag(base, nag_neg, sigma_start=float("inf"),
                                                                     sigma_end=float("-inf")), pos, neg))
    auto = glue.nag_model(base, conditioning, 1.0, 1.0, 0.0, preset="auto")  # widgets ignored: flux preset
    assert auto.wrappers[glue.APPLY_MODEL][glue.WRAPPER_KEY][0].__self__.settings.scale == 5.0
    with pytest.raises(ValueError, match="unknown preset"):
        glue.nag_model(base, conditioning, 5.0, 2.5, 0.25, preset="nope")


def test_widget_defaults_match_nagkit_presets() -> None:
    for label, (preset, scale, tau, alpha) in glue.FAMILY_DEFAULTS.items():
        assert glue.preset_values(preset) == (scale, tau, alpha), label
    for name in glue.PRESET_CHOICES[2:]:
        glue.preset_values(name)


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_pack_metadata() -> None:
    meta = tomllib.loads((ROOT / "comfyui" / "pyproject.toml").read_text())
    deps = meta["project"]["dependencies"]
    assert any(d.startswith("nagkit") for d in deps)
    assert not any(d.split("=")[0].split(">")[0].split("<")[0].strip().lower() in ("torch", "torchvision")
                   for d in deps)
    assert {"PublisherId", "DisplayName"} <= set(meta["tool"]["comfy"])
    requirements = [r.strip() for r in (ROOT / "comfyui" / "requirements.txt").read_text().splitlines()
                    if r.strip() and not r.startswith("#")]
    assert any(r.startswith("nagkit") for r in requirements)
    assert not any(r.lower().startswith("torch") for r in requirements)
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert root["tool"]["setuptools"]["packages"]["find"]["where"] == ["src"]  # the pack is not a second package


def test_example_workflows_use_the_nodes_with_valid_inputs() -> None:
    examples = sorted((ROOT / "comfyui" / "examples").glob("*.json"))
    assert len(examples) >= 3
    for path in examples:
        graph = json.loads(path.read_text())
        nags = [n for n in graph.values() if n["class_type"] in ("NagkitNAG", "NagkitNAGGuider")]
        assert nags, path.name
        for node in nags:
            inputs = node["inputs"]
            assert inputs["nag_scale"] >= 1 and 0 <= inputs["nag_alpha"] <= 1 and inputs["nag_tau"] > 0
            assert inputs["preset"] in glue.PRESET_CHOICES
            for value in inputs.values():  # links point at existing nodes
                if isinstance(value, list):
                    assert str(value[0]) in graph, (path.name, value)


# ------------------------------------------------------------------------------------------------ Qwen-Image
def _qwen_reference(dm: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, neg: torch.Tensor,
                    scale: float, tau: float, alpha: float) -> torch.Tensor:
    """NAG on the fake Qwen-Image written out: two full joint attentions per block, the negative's text as its own
    stream with the RoPE positions it has as the prompt, the (single) image stream guided."""
    from nagkit.core.operator import nag_combine

    tokens, pe_p, n = dm.rope(x, ctx.shape[1])
    _, pe_n, _ = dm.rope(x, neg.shape[1])
    img, tp, tn = dm.img_in(tokens), dm.txt_in(dm.txt_norm(ctx)), dm.txt_in(dm.txt_norm(neg))
    temb = dm.time_in(t.view(-1, 1))
    lp, ln = tp.shape[1], tn.shape[1]
    for block in dm.transformer_blocks:
        a = block.attn
        i_ = img + temb[:, None]

        def joint(txt: torch.Tensor, pe: torch.Tensor, a: torch.nn.Module = a, i_: torch.Tensor = i_) -> torch.Tensor:
            def heads(lin: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
                return lin(z).unflatten(-1, (a.heads, -1))

            q = torch.cat([heads(a.add_q_proj, txt), heads(a.to_q, i_)], 1) + pe
            k = torch.cat([heads(a.add_k_proj, txt), heads(a.to_k, i_)], 1) + pe
            v = torch.cat([heads(a.add_v_proj, txt), heads(a.to_v, i_)], 1)
            return fake.sdpa(q.flatten(2), k.flatten(2), v.flatten(2), a.heads)

        zp, zn = joint(tp + temb[:, None], pe_p), joint(tn + temb[:, None], pe_n)
        img = img + a.to_out(nag_combine(zp[:, lp:], zn[:, ln:], scale, tau, alpha, "l1"))
        tp, tn = tp + a.to_add_out(zp[:, :lp]), tn + a.to_add_out(zn[:, :ln])
        tp, tn = tp + torch.tanh(block.txt_mlp(tp)), tn + torch.tanh(block.txt_mlp(tn))
        img = img + torch.tanh(block.img_mlp(img))
    b, c, h, w = x.shape
    v = dm.proj_out(img[:, :n]).view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    return x - t.view(-1, 1, 1, 1) * v


@pytest.mark.parametrize(("edit", "neg_len", "attention"), [(False, 9, "auto"), (True, 3, "comfy"), (True, 9, "auto")])
def test_qwen_matches_a_written_out_reference(edit: bool, neg_len: int, attention: str) -> None:
    """One guided call equals the reference: negatives shorter and longer than the prompt (the negative's text
    positions are those it would have as the prompt), and Qwen-Image-Edit's reference latents in the image stream."""
    base = fake.patcher("qwen")
    dm = base.model.diffusion_model
    x = torch.randn(2, *dm.latent_shape, generator=torch.Generator().manual_seed(0))
    ctx, neg, sigma = torch.cat([fake.text(1), fake.text(4)]), fake.text(3, length=neg_len), torch.full((2,), 0.7)
    p = nag(base, neg, attention=attention)
    dm.ref_latents = torch.randn(1, *dm.latent_shape, generator=torch.Generator().manual_seed(7)) if edit else None
    try:
        to = fake.copy_nested(p.model_options["transformer_options"])
        to["wrappers"], to["cond_or_uncond"], to["sigmas"] = p.wrappers, [0], sigma
        with torch.no_grad():
            out = base.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=to)
            ref = _qwen_reference(dm, x, sigma, ctx, neg, 5.0, 2.5, 0.25)
            plain = base.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options={})
    finally:
        dm.ref_latents = None
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert (out - plain).abs().max() > 1e-3


def test_qwen_negative_positions_follow_comfyui_formula() -> None:
    dm = fake.FakeQwen()
    x = torch.zeros(1, *dm.latent_shape)
    expected = dm.rope(x, 9)[1][:, :9]
    assert torch.equal(glue._qwen_text_pe(dm, tuple(x.shape), 9, 1, x.device, x.dtype), expected)
    assert glue.detect_family(dm).name == "qwen" and glue.detect_family(dm).preset_for(dm) == "qwen-image"


# ------------------------------------------------------------------------------------------------ HunyuanVideo
def _hunyuan_reference(dm: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, neg: torch.Tensor,
                       scale: float, tau: float, alpha: float) -> torch.Tensor:
    """NAG on the fake HunyuanVideo written out: the negative refined alone (its own pooled vector and token
    self-attention), its text as its own stream, two full attentions per block, the image stream guided."""
    from nagkit.core.operator import nag_combine

    img, vec = dm.img_in(x), dm.time_in(t.view(-1, 1))
    neg = neg.expand(x.shape[0], -1, -1)
    tp, tn = dm.txt_in(ctx, t, None), dm.txt_in(neg, t, None)
    n, lp, ln = img.shape[1], tp.shape[1], tn.shape[1]

    def table(length: int) -> torch.Tensor:
        pe = dm.pe(length, n)
        return torch.cat([pe[:, :, length:], pe[:, :, :length]], dim=2)

    pe_p, pe_n = table(lp), table(ln)

    def heads_first(lin: torch.nn.Module, z: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
        return lin(z + vec[:, None]).view(z.shape[0], z.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q + pe, k + pe, v).transpose(1, 2).flatten(2)

    for block in dm.double_blocks:
        iq, ik, iv = heads_first(block.img_qkv, img, block.heads)
        zs = []
        for txt, pe in ((tp, pe_p), (tn, pe_n)):
            tq, tk, tv = heads_first(block.txt_qkv, txt, block.heads)
            zs.append(sdpa(torch.cat((iq, tq), 2), torch.cat((ik, tk), 2), torch.cat((iv, tv), 2), pe))
        zp, zn = zs
        img = img + block.img_out(nag_combine(zp[:, :n], zn[:, :n], scale, tau, alpha, "l1"))
        tp, tn = tp + block.txt_out(zp[:, n:]), tn + block.txt_out(zn[:, n:])
    for block in dm.single_blocks:
        zs = []
        for txt, pe in ((tp, pe_p), (tn, pe_n)):
            q, k, v = heads_first(block.qkv, torch.cat((img, txt), 1), block.heads)
            zs.append(sdpa(q, k, v, pe))
        zp, zn = zs
        img = img + block.out(nag_combine(zp[:, :n], zn[:, :n], scale, tau, alpha, "l1"))
        tp, tn = tp + block.out(zp[:, n:]), tn + block.out(zn[:, n:])
    return x - t.view(-1, 1, 1) * dm.final(img)


@pytest.mark.parametrize(("neg_len", "attention"), [(3, "comfy"), (9, "auto")])
def test_hunyuan_matches_a_written_out_reference(neg_len: int, attention: str) -> None:
    base = fake.patcher("hunyuan")
    dm = base.model.diffusion_model
    x = torch.randn(2, *dm.latent_shape, generator=torch.Generator().manual_seed(0))
    ctx, neg, sigma = torch.cat([fake.text(1), fake.text(4)]), fake.text(3, length=neg_len), torch.full((2,), 0.7)
    p = nag(base, neg, attention=attention)
    to = fake.copy_nested(p.model_options["transformer_options"])
    to["wrappers"], to["cond_or_uncond"], to["sigmas"] = p.wrappers, [0], sigma
    with torch.no_grad():
        out = base.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=to)
        ref = _hunyuan_reference(dm, x, sigma, ctx, neg, 5.0, 2.5, 0.25)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert glue.detect_family(dm).name == "hunyuan"


def test_qwen_text_positions_of_another_comfyui_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """If a ComfyUI version placed Qwen-Image's text positions differently, NAG stops with an error instead of giving
    the negative wrong positions."""
    original = glue._qwen_text_pe
    monkeypatch.setattr(glue, "_qwen_text_pe", lambda *args: original(*args) + 0.5)
    with pytest.raises(glue.NAGNotApplied, match="text positions"):
        fake.sample(nag(fake.patcher("qwen"), fake.text(3, length=7)), fake.text(1), None, steps=1)


# ------------------------------------------------------------------------------------------------ FLUX.2 / Klein
def _flux2_reference(dm: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, neg: torch.Tensor,
                     scale: float, tau: float, alpha: float) -> torch.Tensor:
    """NAG on the fake FLUX.2 written out: the negative's text (as the model sees a prompt: ``neg`` already padded)
    as its own stream with its own text positions ``0 … Ln-1``, the global modulation pair, two full attentions per
    block, the (single) image stream guided."""
    from nagkit.core.operator import nag_combine

    img, vec = dm.img_in(x), dm.time_in(t.view(-1, 1))
    tp, tn = dm.txt_in(ctx), dm.txt_in(neg.expand(x.shape[0], -1, -1))
    n, lp, ln = img.shape[1], tp.shape[1], tn.shape[1]
    pe_p, pe_n = dm.pe(lp, n), dm.pe(ln, n)
    mod_img = torch.tanh(dm.double_stream_modulation_img(vec))
    mod_txt = torch.tanh(dm.double_stream_modulation_txt(vec))

    def heads_first(z: torch.Tensor, heads: int) -> torch.Tensor:
        return z.view(z.shape[0], z.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q + pe, k + pe, v).transpose(1, 2).flatten(2)

    for block in dm.double_blocks:
        iq, ik, iv = heads_first(block.img_qkv(img * (1 + mod_img[:, None])), block.heads)
        zs = []
        for txt, pe in ((tp, pe_p), (tn, pe_n)):
            tq, tk, tv = heads_first(block.txt_qkv(txt * (1 + mod_txt[:, None])), block.heads)
            zs.append(sdpa(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe))
        zp, zn = zs
        img = img + block.img_out(nag_combine(zp[:, lp:], zn[:, ln:], scale, tau, alpha, "l1"))
        tp, tn = tp + block.txt_out(zp[:, :lp]), tn + block.txt_out(zn[:, :ln])
    single = dm.single_stream_modulation(vec)
    for block in dm.single_blocks:
        zs = []
        for txt, pe in ((tp, pe_p), (tn, pe_n)):
            q, k, v = heads_first(block.qkv(torch.cat((txt, img), 1) + single[:, None]), block.heads)
            zs.append(sdpa(q, k, v, pe))
        zp, zn = zs
        img = img + block.out(nag_combine(zp[:, lp:], zn[:, ln:], scale, tau, alpha, "l1"))
        tp, tn = tp + block.out(zp[:, :lp]), tn + block.out(zn[:, :ln])
    return x - t.view(-1, 1, 1) * dm.final(img)


@pytest.mark.parametrize(("pad", "neg_len", "attention"), [(None, 9, "auto"), (None, 3, "comfy"), (512, 7, "auto")])
def test_flux2_matches_a_written_out_reference(pad: int | None, neg_len: int, attention: str) -> None:
    """FLUX.2 / Klein: the negative's text positions are those it would have as the prompt (numbered on RoPE axis 3;
    longer and shorter than the prompt), and with ComfyUI's FLUX.2 text padding (prompt left-padded with zero tokens
    to 512) the NAG negative is padded the same way."""
    base = fake.Patcher(fake.BaseModel(fake.FakeFlux2(pad_text_to=pad)))
    dm = base.model.diffusion_model
    x = torch.randn(2, *dm.latent_shape, generator=torch.Generator().manual_seed(0))
    ctx = base.model.process_text(torch.cat([fake.text(1), fake.text(4)]))
    neg, sigma = fake.text(3, length=neg_len), torch.full((2,), 0.7)
    p = nag(base, neg, attention=attention)
    to = fake.copy_nested(p.model_options["transformer_options"])
    to["wrappers"], to["cond_or_uncond"], to["sigmas"] = p.wrappers, [0], sigma
    with torch.no_grad():
        out = base.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=to)
        ref = _flux2_reference(dm, x, sigma, ctx, base.model.process_text(neg), 5.0, 2.5, 0.25)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    family = glue.detect_family(dm)
    assert family.name == "flux" and family.preset_for(dm) == "flux2"


# ------------------------------------------------------------------------------------------------ HiDream
def _hidream_reference(dm: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, ctx: tuple, neg: tuple, scale: float,
                       tau: float, alpha: float) -> torch.Tensor:
    """NAG on the fake HiDream written out: the negative's carried text ``[T5n, Llama_last,n]`` and per-block Llama
    projections as their own stream, two full attentions per block, the (single) image stream guided."""
    from nagkit.core.operator import nag_combine

    b, c, h, w = x.shape
    img = dm.x_embedder(x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c))
    temb = dm.t_embedder(t.view(-1, 1))
    n = img.shape[1]

    def project(t5: torch.Tensor, llama: torch.Tensor) -> tuple[list, torch.Tensor]:
        states = llama.expand(b, *llama.shape[1:]).movedim(1, 0)
        enc = [dm.caption_projection[i](states[k]) for i, k in enumerate(dm.llama_layers)]
        return enc, torch.cat([dm.caption_projection[-1](t5.expand(b, -1, -1)), enc[-1]], 1)

    (enc_p, init_p), (enc_n, init_n) = project(*ctx), project(*neg)
    streams = {"p": [enc_p, init_p], "n": [enc_n, init_n]}

    def pe(total: int) -> torch.Tensor:
        return torch.cat([dm.image_pe(n), torch.zeros(1, total - n, dm.dim)], 1)

    def mix(z: torch.Tensor, lin: torch.nn.Module) -> torch.Tensor:
        return z + torch.tanh(lin(z))

    for k, block in enumerate(dm.double_stream_blocks):
        iq, ik, iv = block.img_qkv(img + temb[:, None]).chunk(3, -1)
        z = {}
        for who, (enc, init) in streams.items():
            txt = torch.cat([init, enc[k]], 1)
            tq, tk, tv = block.txt_qkv(txt + temb[:, None]).chunk(3, -1)
            p = pe(n + txt.shape[1])
            z[who] = fake.sdpa(torch.cat((iq, tq), 1) + p, torch.cat((ik, tk), 1) + p, torch.cat((iv, tv), 1),
                               block.heads)
            streams[who][1] = mix(txt + block.txt_out(z[who][:, n:]), block.txt_mlp)[:, :init.shape[1]]
        img = mix(img + block.img_out(nag_combine(z["p"][:, :n], z["n"][:, :n], scale, tau, alpha, "l1")),
                  block.img_mlp)
    for j, block in enumerate(dm.single_stream_blocks):
        k = len(dm.double_stream_blocks) + j
        z = {}
        for who, (enc, init) in streams.items():
            hs = torch.cat([img, init, enc[k]], 1)
            q, kk, v = block.qkv(hs + temb[:, None]).chunk(3, -1)
            p = pe(hs.shape[1])
            z[who] = fake.sdpa(q + p, kk + p, v, block.heads)
            streams[who][1] = mix(hs + block.out(z[who]), block.mlp)[:, n:n + init.shape[1]]
        img = mix(img + block.out(nag_combine(z["p"][:, :n], z["n"][:, :n], scale, tau, alpha, "l1")), block.mlp)
    v = dm.final(img).view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    return x - t.view(-1, 1, 1, 1) * v


@pytest.mark.parametrize(("t5_len", "llama_len", "attention"), [(7, 3, "auto"), (3, 9, "comfy")])
def test_hidream_matches_a_written_out_reference(t5_len: int, llama_len: int, attention: str) -> None:
    """HiDream-I1 (no block replace in ComfyUI: the negative rides in the model's own T5/Llama inputs, interleaved
    with the prompt's, and the override splits every joint attention): negatives with T5 and Llama lengths other
    than the prompt's, batch 2 with per-row prompts."""
    base = fake.patcher("hidream")
    dm = base.model.diffusion_model
    x = torch.randn(2, *dm.latent_shape, generator=torch.Generator().manual_seed(0))
    (t1, e1), (t4, e4) = fake.hidream_text(1), fake.hidream_text(4)
    ctx = (torch.cat([t1, t4]), torch.cat([e1["conditioning_llama3"], e4["conditioning_llama3"]]))
    t5n, extra = fake.hidream_text(3, length=t5_len, llama_length=llama_len)
    neg, sigma = (t5n, extra["conditioning_llama3"]), torch.full((2,), 0.7)
    p = nag(base, (t5n, extra), attention=attention)
    to = fake.copy_nested(p.model_options["transformer_options"])
    to["wrappers"], to["cond_or_uncond"], to["sigmas"] = p.wrappers, [0], sigma
    with torch.no_grad():
        out = base.model.apply_model(x, sigma, c_crossattn=ctx[0], transformer_options=to,
                                     encoder_hidden_states_llama3=ctx[1])
        ref = _hidream_reference(dm, x, sigma, ctx, neg, 5.0, 2.5, 0.25)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert glue.detect_family(dm).name == "hidream" and glue.detect_family(dm).preset_for(dm) == "hidream"


def test_hidream_negative_needs_llama_states_and_reuses_the_cfg_negatives() -> None:
    base = fake.patcher("hidream")
    pos, neg = fake.hidream_text(1), fake.hidream_text(3, length=7)
    with pytest.raises(ValueError, match="conditioning_llama3"):
        glue.nag_model(base, [[neg[0], {"pooled_output": torch.zeros(1, 4)}]], 5.0, 2.5, 0.25)
    node = glue.nag_model(base, [[neg[0], {"pooled_output": torch.zeros(1, 4), **neg[1]}]], 5.0, 2.5, 0.25)
    out = fake.sample(node, pos, neg, steps=1)
    assert torch.equal(out, fake.sample(nag(base, neg), pos, neg, steps=1))
    # the CFG negative's Llama states come along when it is reused
    assert torch.equal(fake.sample(nag(base, None), pos, neg, steps=1), out)


def test_hidream_never_silently_off_when_a_block_bypasses_the_override() -> None:
    base = fake.patcher("hidream")
    block = base.model.diffusion_model.single_stream_blocks[1]
    block.forward = lambda h, temb, pe, to: fake.HiDreamSingle.forward(block, h, temb, pe, {})
    try:
        with pytest.raises(glue.NAGNotApplied, match=r"HiDream's blocks \(1 of 4\) did not reach"):
            fake.sample(nag(base, fake.hidream_text(3, length=7)), fake.hidream_text(1), None)
    finally:
        del block.forward
    dm = base.model.diffusion_model
    dm.forward = lambda x, t, context, transformer_options=None, **kw: torch.zeros_like(x)  # a cache reusing outputs
    try:
        with pytest.raises(glue.NAGNotApplied, match="never reached NAG's block patches"):  # judged per step
            fake.sample(nag(base, fake.hidream_text(3, length=7)), fake.hidream_text(1), None, steps=1)
    finally:
        del dm.forward


def test_flux2_text_positions_of_another_comfyui_are_refused() -> None:
    """If the prompt's text rows in the RoPE table are not what NAG computes for position 0, 1, … (a ComfyUI that
    numbers FLUX.2 text differently), NAG stops with an error instead of giving the negative wrong positions."""
    base = fake.Patcher(fake.BaseModel(fake.FakeFlux2()))
    dm = base.model.diffusion_model
    dm.params.txt_ids_dims = [2]  # NAG now numbers the negative on axis 2; the model numbers its text on axis 3
    with pytest.raises(glue.NAGNotApplied, match="FLUX text positions"):
        fake.sample(nag(base, fake.text(3, length=7)), fake.text(1), None, steps=1)
