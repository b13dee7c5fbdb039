"""``nagkit bench``: configs, FLOP counting, the official-style reference, time mode, reports and the CLI.

The default tests use structurally faithful but tiny configs (seconds); the full-size FLOP runs and the full time run
are marked ``bench``. Time mode is tested for structure only: no test asserts on a measured time.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import nagkit
from nagkit.bench import (
    TIME_VARIANTS,
    FamilySpec,
    Geometry,
    attention_count_check,
    build_inputs,
    load_families,
    reduce_for_time,
    run_family,
    run_time,
)
from nagkit.bench import flops as bench_flops
from nagkit.bench.reference import OFFICIAL_WAY, OfficialLayout, official_processors
from nagkit.bench.report import (
    COLUMNS,
    MARKER,
    SHORT_COLUMNS,
    TIME_COLUMNS,
    memory_rows,
    render_markdown,
    render_terminal,
    short_negative_rows,
    table_rows,
    time_rows,
    write_json,
    write_markdown,
)
from nagkit.bench.timing import PeakMemory, build_timing_model, materialize, prime_calls, separate_cfg, variant_calls
from nagkit.cli.main import main

TINY_UNET = FamilySpec(
    name="tiny-unet", title="tiny UNet", source="test", model_class="UNet2DConditionModel", attention="cross",
    inputs="unet",
    config={"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1, "cross_attention_dim": 32,
            "attention_head_dim": 8, "norm_num_groups": 8, "sample_size": 8, "in_channels": 4, "out_channels": 4},
    geometry=Geometry(height=64, width=64, vae_scale=8, latent_channels=4, text_tokens=7, text_dim=32),
)
TINY_PIXART = FamilySpec(
    name="tiny-pixart", title="tiny PixArt", source="test", model_class="PixArtTransformer2DModel", attention="cross",
    inputs="pixart",
    config={"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
            "cross_attention_dim": 16, "caption_channels": 32, "sample_size": 8, "patch_size": 2,
            "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6, "attention_bias": True,
            "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "use_additional_conditions": False},
    geometry=Geometry(height=64, width=64, vae_scale=8, patch=2, latent_channels=4, text_tokens=6, text_dim=32,
                      mask=True),
    text_modules=("caption_projection",),
)
TINY_WAN_I2V = FamilySpec(
    name="tiny-wan-i2v", title="tiny Wan I2V", source="test", model_class="WanTransformer3DModel", attention="cross",
    inputs="wan",
    config={"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 8,
            "out_channels": 4, "text_dim": 32, "freq_dim": 16, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "image_dim": 24, "added_kv_proj_dim": 16, "rope_max_seq_len": 32},
    # WanAttnProcessor hard-codes 512 text tokens for I2V, so the tiny model keeps that length
    geometry=Geometry(height=64, width=64, frames=5, vae_scale=8, vae_scale_t=4, patch=2, latent_channels=8,
                      text_tokens=512, text_dim=32, image_tokens=5, image_dim=24),
    text_modules=("condition_embedder.text_embedder",),
)
TINY = [TINY_UNET, TINY_PIXART, TINY_WAN_I2V]
TINY_SD3 = FamilySpec(
    name="tiny-sd3", title="tiny SD3", source="test", model_class="SD3Transformer2DModel", attention="joint",
    inputs="sd3",
    config={"sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
            "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
            "caption_projection_dim": 32, "pooled_projection_dim": 16, "pos_embed_max_size": 16,
            "qk_norm": "rms_norm"},
    geometry=Geometry(height=64, width=64, vae_scale=8, patch=2, latent_channels=16, text_tokens=6, text_dim=32,
                      pooled_dim=16),
    text_linears=("context_embedder", "transformer_blocks.*.attn.add_q_proj", "transformer_blocks.*.attn.add_k_proj",
                  "transformer_blocks.*.attn.add_v_proj", "transformer_blocks.*.attn.to_add_out",
                  "transformer_blocks.*.ff_context.*"),
    joint_attention=("transformer_blocks.*.attn",),
)
TINY_FLUX = FamilySpec(
    name="tiny-flux", title="tiny FLUX", source="test", model_class="FluxTransformer2DModel", attention="joint",
    inputs="flux",
    config={"patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
            "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16, "guidance_embeds": True,
            "axes_dims_rope": [4, 4, 8]},
    geometry=Geometry(height=64, width=64, vae_scale=8, patch=2, latent_channels=16, text_tokens=8, text_dim=32,
                      pooled_dim=16),
    text_linears=("context_embedder", "transformer_blocks.*.attn.add_q_proj", "transformer_blocks.*.attn.add_k_proj",
                  "transformer_blocks.*.attn.add_v_proj", "transformer_blocks.*.attn.to_add_out",
                  "transformer_blocks.*.ff_context.*", "single_transformer_blocks.*.proj_mlp",
                  "single_transformer_blocks.*.proj_out", "single_transformer_blocks.*.attn.to_q",
                  "single_transformer_blocks.*.attn.to_k", "single_transformer_blocks.*.attn.to_v"),
    joint_attention=("transformer_blocks.*.attn", "single_transformer_blocks.*.attn"),
)
TINY_CHROMA = FamilySpec(
    name="tiny-chroma", title="tiny Chroma", source="test", model_class="ChromaTransformer2DModel", attention="joint",
    inputs="chroma",
    config={"patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
            "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": [4, 4, 8],
            "approximator_num_channels": 8, "approximator_hidden_dim": 16, "approximator_layers": 1},
    geometry=Geometry(height=64, width=64, vae_scale=8, patch=2, latent_channels=16, text_tokens=8, text_dim=32,
                      mask=True),
    text_linears=TINY_FLUX.text_linears,
    joint_attention=TINY_FLUX.joint_attention,
)
VERSIONS = {"nagkit": "x", "diffusers": "y", "torch": "z"}


def test_attention_is_counted_exactly_once():
    for device in ("meta", "cpu"):
        counted, expected = attention_count_check(device)
        assert counted == expected, device


def test_shipped_configs_cover_every_family():
    families = load_families()
    assert list(families)[:9] == ["sd15", "sdxl", "wan21-t2v-14b", "wan21-i2v-14b", "pixart-sigma", "sana-1.6b",
                                  "sd35-large", "flux1-dev", "chroma1-hd"]
    assert {"flux2-dev", "flux2-klein", "hidream-i1", "krea2", "lumina2", "qwen-image", "z-image", "hunyuanvideo",
            "hunyuanvideo15", "ltx-video", "wan22-a14b-t2v", "wan22-ti2v-5b", "sana-video"} <= set(families)
    wan = families["wan21-i2v-14b"].geometry
    assert (wan.latent_frames, wan.image_query_tokens, wan.image_tokens) == (21, 32760, 257)
    assert families["sana-1.6b"].geometry.image_query_tokens == 1024
    assert families["flux1-dev"].geometry.image_query_tokens == 4096
    assert families["chroma1-hd"].geometry.image_query_tokens == 4096
    for spec in families.values():
        spec.geometry.validate()
        assert spec.attention in ("cross", "joint")


def test_sd15_config_is_the_published_model():
    spec = load_families()["sd15"]
    model = bench_flops.build_model(spec)
    assert model.device.type == "meta" and model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == 859_520_964  # the SD1.5 UNet
    inputs = build_inputs(spec)
    assert inputs.kwargs["sample"].shape == (1, 4, 64, 64)
    assert inputs.kwargs["encoder_hidden_states"].shape == (1, 77, 768)


def test_chroma1_hd_config_is_the_published_model():
    spec = load_families()["chroma1-hd"]
    model = bench_flops.build_model(spec)
    assert type(model).__name__ == "ChromaTransformer2DModel" and model.device.type == "meta"
    assert (len(model.transformer_blocks), len(model.single_transformer_blocks)) == (19, 38)
    assert sum(p.numel() for p in model.parameters()) == 8_899_983_424  # "8.9B parameters"
    inputs = build_inputs(spec)
    assert inputs.kwargs["hidden_states"].shape == (1, 4096, 64)
    assert inputs.kwargs["encoder_hidden_states"].shape == (1, 512, 4096)
    assert inputs.kwargs["attention_mask"].shape == (1, 512 + 4096)  # [text | image], as ChromaPipeline passes it
    assert inputs.negative["attention_mask"].shape == (1, 512) and inputs.mask_arg is None


@pytest.mark.parametrize("spec", TINY, ids=lambda s: s.name)
def test_flop_mode_on_a_small_family(spec):
    result = run_family(spec)
    variants = result.variants
    assert set(variants) == set(bench_flops.VARIANTS)
    assert result.base_flops > 0 and variants["none"].overhead == 0
    assert variants["cfg"].overhead == pytest.approx(1.0, abs=1e-9)
    nag = variants["nag"].overhead
    assert result.nag_supported and 0 < nag <= variants["official"].overhead
    assert variants["nag-official"].flops == variants["nag"].flops  # mode only matters on Flux
    assert result.official_check_flops is None
    assert variants["nag+cfg"].flops == variants["none"].flops + variants["nag"].flops
    # nagkit does exactly the minimal work on cross-attention models, and the formula matches a measurement
    assert variants["min"].flops - variants["none"].flops == result.min_check_flops
    assert result.nag_minus_min == 0 and not result.notes


@pytest.mark.parametrize("spec", [TINY_SD3, TINY_FLUX], ids=lambda s: s.name)
def test_flop_mode_official_way_on_joint_attention(spec):
    """The official way (mode="official" + two full joint attentions) costs exactly nagkit's official mode plus the
    image→image attention that log-sum-exp sharing saves; nagkit's fast mode is the analytic minimum."""
    variants = (result := run_family(spec)).variants
    assert set(variants) == set(bench_flops.VARIANTS) and not result.notes
    nag, nag_official, official = (variants[k].flops for k in ("nag", "nag-official", "official"))
    assert variants["none"].flops < nag <= nag_official < official
    assert official - nag_official == result.official_check_flops > 0
    assert result.nag_minus_min == 0
    if spec is TINY_SD3:
        assert nag_official == nag  # SD3: mode makes no difference
    else:
        assert nag_official > nag  # Flux single blocks carry a second image copy in official mode


def test_flop_mode_chroma_official_way_is_the_reference():
    """Chroma: nagkit refuses mode="official" (n/a, not a failure); the official way is the in-repo reference of
    ComfyUI-NAG's computation, which costs exactly nagkit's fast mode with two full attentions plus the single blocks'
    linear layers on the negative row's image copy; nagkit's fast mode is the analytic minimum."""
    result = run_family(TINY_CHROMA)
    variants = result.variants
    assert set(variants) == set(bench_flops.VARIANTS) and result.nag_supported and not result.notes
    nag_official = variants["nag-official"]
    assert nag_official.flops is None and nag_official.overhead is None
    assert nag_official.note.startswith("n/a") and "no official NAG implementation" in nag_official.note
    nag, official = variants["nag"].flops, variants["official"].flops
    assert variants["none"].flops < nag < official
    assert result.official_check_base == "nag" and official - nag == result.official_check_flops > 0
    assert variants["nag+cfg"].flops == variants["none"].flops + nag
    assert result.nag_minus_min == 0
    model, inputs = bench_flops.build_model(TINY_CHROMA), build_inputs(TINY_CHROMA)
    two, why = bench_flops.count_guided(model, inputs, "fast", two_attentions=True)
    assert not why and official - two == bench_flops.image_copy_flops(model, TINY_CHROMA) > 0
    report = {"families": [result.to_dict()], "seconds": 0.0, "versions": VERSIONS}
    row = table_rows(report)[0]
    assert row[COLUMNS.index("nag official-mode")] == "n/a" and row[COLUMNS.index("nag − min")] == "0 (exact)"
    page = render_markdown(report)
    assert "| tiny Chroma (64×64) |" in page and "it matches exactly for tiny Chroma" in page
    # a hand-written GPU run record between its own markers survives regenerating the page
    record = "<!-- nagkit-bench:cuda:begin -->\n## CUDA run\nnumbers\n<!-- nagkit-bench:cuda:end -->"
    again = render_markdown(report, page=page + "\n" + record)
    assert again.count("## CUDA run") == 1 and again.index("nagkit-bench:time:end") < again.index("## CUDA run")


def test_chroma_official_reference_computes_nag():
    """The Chroma reference is a real NAG implementation: with random weights and padded masks it gives nagkit's
    fast-mode output with the L2 norm (the image copy never drifts: Chroma's modulation ignores the text), the plain
    output at scale 1, and it restores the model's forward."""
    import nagkit

    spec = TINY_CHROMA.with_geometry(negative_tokens=5)
    torch.manual_seed(0)
    model = getattr(__import__("diffusers"), spec.model_class).from_config(spec.config).eval()
    inputs = materialize(build_inputs(spec, dtype=torch.float32), spec, torch.device("cpu"), torch.float32,
                         torch.Generator().manual_seed(1))
    lt = spec.geometry.text_tokens
    mask = inputs.kwargs["attention_mask"]
    assert mask[:, :lt].sum() == lt - lt // 4 and bool(mask[:, lt:].eq(1).all())  # text padded, image tokens kept
    assert inputs.negative["attention_mask"].sum() == 5 - 5 // 4
    kwargs, negative = inputs.kwargs, inputs.negative
    layout = OfficialLayout(lp=lt, ln=5, scale=4.0, tau=2.5, alpha=0.5)
    reference = OFFICIAL_WAY[spec.inputs]
    with torch.no_grad():
        plain = model(**kwargs).sample
        with reference(model, negative, layout):
            official = model(**kwargs).sample
        with reference(model, negative, OfficialLayout(lp=lt, ln=5, scale=1.0)):
            unguided = model(**kwargs).sample
        with nagkit.apply(model, negative=negative, scale=4.0, tau=2.5, alpha=0.5, norm="l2") as guide:
            fast = model(**kwargs).sample
            assert guide.state.calls["guided"] == 1
    assert "forward" not in model.__dict__
    assert not torch.allclose(official, plain, atol=1e-4)
    torch.testing.assert_close(official, fast, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unguided, plain, rtol=1e-5, atol=1e-6)


def test_negative_length_and_batch_scale_the_overhead():
    base = run_family(TINY_PIXART).variants
    longer = run_family(TINY_PIXART.with_geometry(negative_tokens=14)).variants
    batched = run_family(TINY_PIXART.with_geometry(batch=2)).variants
    assert longer["nag"].overhead > base["nag"].overhead
    assert longer["min"].overhead == longer["nag"].overhead
    assert longer["official"].overhead >= longer["nag"].overhead  # the official way pads the prompt to 14 tokens
    assert batched["none"].flops == 2 * base["none"].flops
    assert batched["nag"].overhead == pytest.approx(base["nag"].overhead, rel=1e-12)


def test_short_negative_on_masked_families():
    """Families whose padded negatives nagkit shortens also get NAG with a short negative; the others do not."""
    result = run_family(TINY_PIXART, short_negative=2)
    short = result.short_negative
    assert short is not None and (short.tokens, short.padded_tokens) == (2, TINY_PIXART.geometry.text_tokens)
    assert short.nag_padded == result.variants["nag"].overhead
    assert 0 < short.nag < short.nag_padded and short.nag == pytest.approx(short.min, abs=1e-12)  # still minimal
    assert short.target is None and short.meets_target is None and not result.notes
    # the short count is the count of a negative built at the short length
    spec = TINY_PIXART.with_geometry(negative_tokens=2)
    assert short.nag == run_family(spec, short_negative=None).variants["nag"].overhead
    assert run_family(TINY_UNET).short_negative is None  # no text mask: every negative token is computed
    assert bench_flops.drops_padding(TINY_PIXART) and not bench_flops.drops_padding(TINY_UNET)
    assert TINY_CHROMA.geometry.mask and not bench_flops.drops_padding(TINY_CHROMA)  # Chroma keeps its padding
    assert run_family(TINY_CHROMA, short_negative=2).short_negative is None
    assert run_family(TINY_PIXART, short_negative=None).short_negative is None
    assert run_family(TINY_PIXART, short_negative=6).short_negative is None  # not shorter than the negative
    report = bench_flops.run_flops([TINY_UNET, TINY_PIXART], short_negative=2)
    assert report["short_negative_tokens"] == 2
    rows = short_negative_rows(report)
    assert len(rows) == 1 and len(rows[0]) == len(SHORT_COLUMNS) and rows[0][0].startswith("tiny PixArt")
    assert rows[0][1] == "2 valid, padded to 6" and rows[0][3] == f"+{short.nag * 100:.2f}%"
    json.loads(json.dumps(report))
    assert "NAG with a short negative" in render_terminal(report)
    page = render_markdown(report)
    assert "### Short negatives (PixArt, Sana)" in page and "| tiny PixArt (64×64) | 2 valid, padded to 6 |" in page
    assert "short negative" not in render_terminal(bench_flops.run_flops([TINY_UNET]))


def test_short_negative_target_is_reported(monkeypatch):
    monkeypatch.setitem(bench_flops.SHORT_NEGATIVE_TARGETS, "tiny-pixart", 0.5)
    report = bench_flops.run_flops([TINY_PIXART], short_negative=2)
    assert report["families"][0]["short_negative"]["target"] == 0.5
    assert short_negative_rows(report)[0][-1] == "≤ +50.0%: met"
    monkeypatch.setitem(bench_flops.SHORT_NEGATIVE_TARGETS, "tiny-pixart", 1e-6)
    assert short_negative_rows(bench_flops.run_flops([TINY_PIXART], short_negative=2))[0][-1].endswith("**not met**")


def test_padded_negative_costs_its_valid_tokens():
    """What the short-negative count relies on: a negative padded with masked tokens costs (and gives) exactly what
    the same negative without its padding does (real tensors: the mask values are known here)."""
    model = build_timing_model(TINY_PIXART, torch.device("cpu"), torch.float32, seed=0)
    g = torch.Generator().manual_seed(0)
    inputs = materialize(build_inputs(TINY_PIXART, dtype=torch.float32), TINY_PIXART, torch.device("cpu"),
                         torch.float32, g)
    valid = 2
    padded = inputs.negative["encoder_hidden_states"]
    mask = torch.zeros(padded.shape[:2], dtype=torch.long)
    mask[:, :valid] = 1
    short = {"encoder_hidden_states": padded[:, :valid].clone(), "encoder_attention_mask": mask[:, :valid].clone()}
    counted, outputs = [], []
    for negative in ({"encoder_hidden_states": padded, "encoder_attention_mask": mask}, short):
        with nagkit.apply(model, negative=negative, scale=5.0):
            counted.append(bench_flops.count_flops(lambda: outputs.append(model(**inputs.kwargs).sample)))
    assert counted[0] == counted[1]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        plain = model(**inputs.kwargs).sample
        full = {"encoder_hidden_states": padded, "encoder_attention_mask": torch.ones_like(mask)}
        with nagkit.apply(model, negative=full, scale=5.0):
            unpadded = bench_flops.count_flops(lambda: model(**inputs.kwargs))
    assert unpadded > counted[0] and not torch.allclose(outputs[0], plain, atol=1e-4)


def test_unsupported_nag_is_reported_not_raised(monkeypatch):
    import nagkit

    def refuse(*args, **kwargs):
        raise TypeError("nagkit does not support PixArtTransformer2DModel")

    monkeypatch.setattr(nagkit, "apply", refuse)
    result = run_family(TINY_PIXART)
    assert not result.nag_supported
    assert result.variants["nag"].flops is None and result.variants["nag"].note == bench_flops.NOT_SUPPORTED
    assert any(bench_flops.NOT_SUPPORTED in note for note in result.notes)
    report = {"families": [result.to_dict()], "seconds": 0.0, "versions": VERSIONS}
    assert "not supported yet" in table_rows(report)[0]
    assert "not supported yet" in render_terminal(report)


def test_failing_nag_is_reported_and_the_rest_still_runs(monkeypatch):
    import nagkit

    class Broken:
        state = None

        def __init__(self, model):
            self.handle = model.register_forward_pre_hook(self.boom)

        @staticmethod
        def boom(*args):
            raise RuntimeError("kernel exploded")

        def remove(self):
            self.handle.remove()

    monkeypatch.setattr(nagkit, "apply", lambda model, negative, mode="fast": Broken(model))
    result = run_family(TINY_PIXART)
    assert result.variants["nag"].flops is None and "kernel exploded" in result.variants["nag"].note
    assert result.variants["nag-official"].flops is None
    assert result.variants["official"].flops is not None and result.variants["min"].flops is not None
    report = {"families": [result.to_dict()], "seconds": 0.0, "versions": VERSIONS}
    assert "failed" in table_rows(report)[0]


def _materialize(x, generator):
    if isinstance(x, dict):
        return {k: _materialize(v, generator) for k, v in x.items()}
    if not isinstance(x, torch.Tensor):
        return x
    if x.dtype == torch.long:
        mask = torch.ones(x.shape, dtype=torch.long)
        mask[:, -2:] = 0  # padding at the end of the text
        return mask
    if x.ndim == 1:
        return torch.full(x.shape, 500.0)
    return torch.randn(x.shape, generator=generator)


@pytest.mark.parametrize("spec", TINY, ids=lambda s: s.name)
def test_official_reference_computes_nag(spec):
    """The official-style reference is a real NAG implementation: it agrees with nagkit on random weights."""
    import nagkit

    cls = getattr(__import__("diffusers"), spec.model_class)
    torch.manual_seed(0)
    model = cls.from_config(spec.config).eval()
    g = torch.Generator().manual_seed(1)
    inputs = build_inputs(spec, dtype=torch.float32)
    kwargs = _materialize(inputs.kwargs, g)
    negative = _materialize(inputs.negative, g)
    if "encoder_attention_mask" in negative:
        negative["encoder_attention_mask"][:, -2:] = 1
        negative["encoder_attention_mask"][:, -1:] = 0
    inputs.kwargs, inputs.negative = kwargs, negative
    scale, tau, alpha = 4.0, 2.5, 0.5
    with torch.no_grad():
        plain = model(**kwargs).sample
        with nagkit.apply(model, negative=negative, scale=scale, tau=tau, alpha=alpha):
            guided = model(**kwargs).sample
        layout = OfficialLayout(lp=spec.geometry.text_tokens, ln=spec.geometry.negative_length,
                                image_tokens=spec.geometry.image_tokens, scale=scale, tau=tau, alpha=alpha)
        with official_processors(model, layout):
            official = model(**bench_flops.packed_kwargs(inputs)).sample
    assert not torch.allclose(guided, plain, atol=1e-4)
    torch.testing.assert_close(official, guided, rtol=1e-4, atol=1e-5)


def test_reports_json_markdown_and_terminal(tmp_path):
    report = bench_flops.run_flops([TINY_PIXART])
    text = render_terminal(report)
    assert "tiny PixArt" in text and "+100.0%" in text and "nag official-mode" in text
    path = write_json(report, tmp_path / "out" / "flops.json")
    data = json.loads(path.read_text())
    assert data["mode"] == "flops" and data["families"][0]["variants"]["cfg"]["overhead"] == pytest.approx(1.0)
    page = render_markdown(report, "benchmarks_flops.png")
    assert "nagkit bench --markdown docs/benchmarks.md" in page
    assert "nagkit bench --mode time --markdown docs/benchmarks.md" in page
    assert "TODO" not in page and "Not available for joint-attention" not in page
    assert "Not generated yet" in page  # the time section's placeholder
    assert "| tiny PixArt (64×64) |" in page
    md, chart = write_markdown(report, tmp_path / "docs" / "benchmarks.md")
    assert md.read_text().startswith("# Benchmarks")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert chart is None
    else:
        assert chart == tmp_path / "docs" / "benchmarks_flops.png" and chart.stat().st_size > 1000


def test_cli_bench(tmp_path, monkeypatch, capsys):
    import nagkit.bench

    monkeypatch.setattr(nagkit.bench, "load_families", lambda: {"tiny-pixart": TINY_PIXART})
    rc = main(["bench", "--family", "tiny-pixart", "--negative-length", "9", "--short-negative", "3", "--json",
               str(tmp_path / "r.json"), "--markdown", str(tmp_path / "b.md"), "--quiet"])
    assert rc == 0
    assert "tiny PixArt" in capsys.readouterr().out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["families"][0]["geometry"]["negative_tokens"] == 9
    short = data["families"][0]["short_negative"]
    assert (short["tokens"], short["padded_tokens"]) == (3, 9) and 0 < short["nag"] < short["nag_padded"]
    assert "Short negatives (PixArt, Sana)" in (tmp_path / "b.md").read_text()
    assert main(["bench", "--family", "tiny-pixart", "--short-negative", "0", "--json", str(tmp_path / "s.json"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["families"][0]["short_negative"] is None
    assert main(["bench", "--family", "tiny-pixart", "--short-negative", "-1"]) == 2
    assert main(["bench", "--family", "nope"]) == 2
    assert main(["bench", "--family", "tiny-pixart", "--height", "60"]) == 2
    assert "unknown family nope" in capsys.readouterr().err
    assert main(["bench", "--mode", "time", "--family", "tiny-pixart", "--repeats", "0"]) == 2
    assert main(["bench", "--mode", "time", "--family", "tiny-pixart", "--device", "mps"]) == 2
    if not torch.cuda.is_available():
        assert main(["bench", "--mode", "time", "--family", "tiny-pixart", "--device", "cuda"]) == 2


# ------------------------------------------------------------------------------------------------ time mode
def test_time_configs_are_reduced_and_valid():
    for name, spec in load_families().items():
        reduced, lines = spec.for_time()
        reduced.geometry.validate()
        assert reduced.time == {} and lines != ["none"], name
        assert reduced.geometry.image_query_tokens <= spec.geometry.image_query_tokens, name
        assert any("→" in line for line in lines), name
    flux, lines = load_families()["flux1-dev"].for_time()
    assert (flux.config["num_layers"], flux.config["num_single_layers"]) == (1, 2)
    assert "num_layers: 19 → 1" in lines and any(line.startswith("size: 1024×1024 → 512×512") for line in lines)
    chroma, lines = load_families()["chroma1-hd"].for_time()  # FLUX.1-dev's reduction, and the approximator ÷4
    assert all(chroma.config[key] == flux.config[key] for key in load_families()["flux1-dev"].time["config"])
    assert chroma.geometry == replace(flux.geometry, pooled_dim=0, mask=True, text_encoder="T5-XXL")
    assert "approximator_hidden_dim: 5120 → 1280" in lines
    assert TINY_PIXART.for_time() == (TINY_PIXART, ["none"])
    spec, lines = reduce_for_time(TINY_PIXART, height=32, width=None)
    assert spec.geometry.height == 32 and lines == ["command line: height=32"]
    with pytest.raises(ValueError, match="multiples"):
        reduce_for_time(TINY_PIXART, height=60)


def test_peak_memory_sees_an_allocation():
    memory = PeakMemory(torch.device("cpu"))
    if not memory.available:
        pytest.skip("/proc/self/clear_refs is not writable here")
    memory.start()
    block = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
    growth = memory.growth()
    del block
    assert growth is not None and growth >= 48 * 2 ** 20


def test_time_mode_smoke(tmp_path):
    """Structure of a time run on tiny families (one repeat); nothing about the measured values."""
    report = run_time([reduce_for_time(TINY_PIXART), reduce_for_time(TINY_FLUX), reduce_for_time(TINY_CHROMA)],
                      repeats=1, warmup=0)
    assert report["mode"] == "time" and report["settings"]["repeats"] == 1
    assert report["machine"]["torch_threads"] >= 1 and report["machine"]["cpu"]["logical_cpus"]
    for fam in report["families"]:
        assert fam["reductions"] == ["none"] and not fam["notes"]
        variants = fam["variants"]
        assert list(variants) == list(TIME_VARIANTS)
        for name, v in variants.items():
            assert len(v["seconds"]) == 1 and v["median_s"] > 0, name
            assert v["flops"] > 0 and v["flop_overhead"] is not None, name
            separate = fam["family"] in ("tiny-flux", "tiny-chroma")  # pipelines with two CFG calls
            assert v["calls"] == (2 if name == "nag+cfg" or (name == "cfg" and separate) else 1)
        assert variants["none"]["overhead"] == 0
        assert variants["cfg"]["flop_overhead"] == pytest.approx(1.0)
        assert variants["official"]["flop_overhead"] >= variants["nag"]["flop_overhead"] > 0
    assert report["families"][1]["variants"]["official"]["flop_overhead"] > \
        report["families"][1]["variants"]["nag"]["flop_overhead"]  # Flux: the official way does more
    assert report["families"][2]["variants"]["official"]["flop_overhead"] > \
        report["families"][2]["variants"]["nag"]["flop_overhead"]  # Chroma: the reference does more
    assert [separate_cfg(s) for s in (TINY_UNET, TINY_FLUX, TINY_CHROMA)] == [False, True, True]
    json.loads(json.dumps(report))
    assert len(time_rows(report)) == 3 and len(memory_rows(report)) == 3
    assert all(len(row) == len(TIME_COLUMNS) for row in time_rows(report))
    assert report["settings"]["nag_combine"].startswith(("compiled", "eager"))  # tiny tensors: eager
    # masked text: a quarter of the negative is padding, which nagkit drops: nag FLOPs count the valid tokens
    pixart, flux = report["families"][0]["geometry"], report["families"][1]["geometry"]
    assert (pixart["negative_tokens"], pixart["negative_valid_tokens"]) == (6, 5)
    assert flux["negative_valid_tokens"] == flux["negative_tokens"]
    assert "6 (5 valid)" in time_rows(report)[0][3]
    short = TINY_PIXART.with_geometry(negative_tokens=5)  # counted on the real inputs: the valid tokens only
    meta = bench_flops.count_guided(bench_flops.build_model(short), build_inputs(short), "fast")[0]
    assert report["families"][0]["variants"]["nag"]["flops"] == meta
    assert "tiny FLUX" in render_terminal(report)
    # the time section replaces only its own part of the page
    page = tmp_path / "benchmarks.md"
    write_markdown(bench_flops.run_flops([TINY_PIXART]), page)
    flops_part = page.read_text().split(MARKER.format(mode="flops", edge="end"))[0]
    md, chart = write_markdown(report, page)
    text = md.read_text()
    assert chart is None and text.startswith(flops_part)
    assert "## Wall time per denoising step" in text and "Not generated yet" not in text
    assert "nagkit bench --mode time --markdown docs/benchmarks.md" in text and "| tiny FLUX (64×64) |" in text


def test_time_mode_primes_every_installing_call_once():
    """One-time work (compiling the NAG combination on the first guided call) happens before the rounds."""
    model = build_timing_model(TINY_FLUX, torch.device("cpu"), torch.float32, seed=0)
    g = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    inputs = materialize(build_inputs(TINY_FLUX, dtype=torch.float32), TINY_FLUX, cpu, torch.float32, g)
    cfg = materialize(build_inputs(TINY_FLUX, batch=2, dtype=torch.float32), TINY_FLUX, cpu, torch.float32, g)
    plans = variant_calls(model, TINY_FLUX, inputs, cfg)
    primed = [id(c) for c in prime_calls(plans)]
    guided = [plans["nag"][0], plans["official"][0], plans["nag+cfg"][1]]
    assert primed == [id(c) for c in guided]  # plain calls need no priming


def test_cli_bench_time(tmp_path, monkeypatch, capsys):
    import nagkit.bench

    monkeypatch.setattr(nagkit.bench, "load_families", lambda: {"tiny-sd3": TINY_SD3})
    threads = torch.get_num_threads()
    rc = main(["bench", "--mode", "time", "--repeats", "1", "--warmup", "0", "--threads", "1", "--json",
               str(tmp_path / "t.json"), "--quiet"])
    assert rc == 0 and "tiny SD3" in capsys.readouterr().out
    assert torch.get_num_threads() == threads  # restored
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["mode"] == "time" and data["settings"]["dtype"] == "float32"
    assert data["machine"]["torch_threads"] == 1
    assert main(["bench", "--mode", "time", "--threads", "0"]) == 2
    assert data["families"][0]["variants"]["official"]["calls"] == 1


# ------------------------------------------------------------------------------------------------ full size (slow)
@pytest.mark.bench
def test_full_size_sd15():
    result = run_family(load_families()["sd15"])
    assert result.base_flops == 803_273_441_280
    assert result.variants["nag"].overhead == pytest.approx(0.0081, abs=1e-4)
    assert result.nag_minus_min == 0


@pytest.mark.bench
def test_full_size_every_family():
    report = bench_flops.run_flops(list(load_families().values()))
    for fam in report["families"]:
        variants = fam["variants"]
        assert variants["cfg"]["overhead"] == pytest.approx(1.0), fam["family"]
        if variants["nag"]["overhead"] is not None:
            assert 0 < variants["nag"]["overhead"] < 0.2, fam["family"]
            if variants["nag-official"]["flops"] is not None:  # None: no official NAG code (Chroma, new families)
                assert variants["nag"]["overhead"] <= variants["nag-official"]["overhead"], fam["family"]
            assert variants["nag"]["overhead"] <= variants["official"]["overhead"], fam["family"]
        assert fam["nag_minus_min"] == 0, fam["family"]
        assert not fam["notes"], fam["family"]
    joint = {fam["family"]: fam for fam in report["families"] if fam["attention"] == "joint"}
    flux, sd35 = joint["flux1-dev"]["variants"], joint["sd35-large"]["variants"]
    assert flux["official"]["overhead"] == pytest.approx(0.763, abs=2e-3)  # notes: ≈ +76 %
    assert flux["nag-official"]["overhead"] == pytest.approx(0.710, abs=2e-3)  # notes: ≈ +71 %
    assert sd35["official"]["overhead"] == pytest.approx(0.290, abs=2e-3)  # notes: ≈ +29 %
    assert sd35["nag-official"]["flops"] == sd35["nag"]["flops"]
    chroma = joint["chroma1-hd"]["variants"]
    assert chroma["nag-official"]["flops"] is None and chroma["nag-official"]["note"].startswith("n/a")
    assert chroma["nag"]["overhead"] == pytest.approx(0.1307, abs=2e-4)  # notes: ≈ +13.1 %
    assert chroma["official"]["overhead"] == pytest.approx(0.761, abs=2e-3)  # notes: ≈ +76 % (ComfyUI-NAG's way)
    assert joint["chroma1-hd"]["official_check_base"] == "nag"
    for fam in joint.values():
        v = fam["variants"]
        assert v["official"]["flops"] - v[fam["official_check_base"]]["flops"] == fam["official_check_flops"]


@pytest.mark.bench
def test_time_mode_every_family_reduced():
    """The shipped time-mode configs all run (one repeat; structure only, no assertion on times)."""
    specs = [reduce_for_time(spec) for spec in load_families().values()]
    report = run_time(specs, repeats=1, warmup=0)
    for fam in report["families"]:
        assert not fam["notes"], fam["family"]
        assert all(v["median_s"] and v["median_s"] > 0 for v in fam["variants"].values()), fam["family"]
