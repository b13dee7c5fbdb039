"""LTX-2 pipelines (``tiny-ltx2``): the NAG negative through ``encode_prompt`` + ``pipe.connectors`` (video and audio
text), every denoiser call of a step (``cond_uncond`` on its conditional row, ``uncond_stg`` and ``uncond_modality``
on their positive-text rows) against the independent doubled-batch reference of ``test_ltx2`` (LTX-2.0 connectors with
and without registers; an LTX-2.3-style text path), CFG rows untouched, the STG delta unchanged by NAG, identities,
removal, embedding-form negatives, a shorter negative, per-sample negatives, the I2V / Condition / IC-LoRA / HDR
pipelines, refusals and the command line."""

import inspect

import pytest
import torch
from diffusers import (
    LTX2ConditionPipeline,
    LTX2HDRPipeline,
    LTX2ImageToVideoPipeline,
    LTX2InContextPipeline,
    LTX2Pipeline,
    LTX2VideoTransformer3DModel,
)
from diffusers.pipelines.ltx2 import (
    LTX2HDRReferenceCondition,
    LTX2ReferenceCondition,
    LTX2TextConnectors,
    LTX2VideoCondition,
)

import nagkit
from nagkit.adapters.ltx2 import AUDIO_MASK, AUDIO_TEXT, connect_negative, tiny_ltx2_connectors
from nagkit.core.state import Negative
from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES, tiny_condition_image

from .test_ltx2 import ALPHA, SCALE, TAU, DoubledRef

PROMPT, NEGATIVE, CFG_NEGATIVE = "a red cat walking on a table", "blurry low quality", "dark noisy"
NAG = dict(scale=SCALE, tau=TAU, alpha=ALPHA)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Many tiny ops: one intra-op thread is ~10x faster on a shared CPU (and every comparison is within this file)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    return TINY_PIPELINES["tiny-ltx2"](seed=0)


def build(klass, pipe):
    """``klass`` from ``tiny-ltx2``'s components (those its constructor takes)."""
    params = inspect.signature(klass.__init__).parameters
    return klass(**{k: v for k, v in pipe.components.items() if k in params})


def generate(p, prompt=PROMPT, seeds=(0,), **kwargs):
    """Two steps with the pipeline's default guidance (CFG 3, STG 1 on block 0, modality 3): 3 denoiser calls a step."""
    call = dict(TINY_CALL_KWARGS["tiny-ltx2"], num_inference_steps=2, output_type="latent",
                negative_prompt=CFG_NEGATIVE if isinstance(prompt, str) else [CFG_NEGATIVE] * len(prompt))
    call.update(kwargs)
    out = p(prompt=prompt, generator=[torch.Generator().manual_seed(s) for s in seeds], **call)
    return out.frames, out.audio


def connected(pipe, text):
    """The negative the denoiser should get, made by hand: encode_prompt, then the connectors."""
    embeds, mask, _, _ = pipe.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=16)
    with torch.no_grad():
        video, audio, mask = pipe.connectors(embeds, mask, padding_side="left")
    return {"encoder_hidden_states": video, "encoder_attention_mask": mask, AUDIO_TEXT: audio, AUDIO_MASK: mask}


def assert_same(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def processors(pipe):
    return {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}


def test_guides_every_pass_identities_and_removal(pipe):
    base = generate(pipe)
    before = processors(pipe)
    guide = nagkit.apply(pipe, negative_prompt=NEGATIVE, **NAG)
    video, audio = generate(pipe)
    assert guide.state.calls == {"guided": 6, "unguided": 0}  # cond_uncond, uncond_stg, uncond_modality per step
    assert (video - base[0]).abs().max() > 1e-3 and (audio - base[1]).abs().max() > 1e-3
    guide.update(scale=1.0)
    assert_same(generate(pipe), base)
    guide.update(scale=SCALE, negative_prompt=PROMPT)  # negative == prompt: the plain result up to rounding
    same = generate(pipe)
    torch.testing.assert_close(same[0], base[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(same[1], base[1], atol=1e-5, rtol=1e-5)
    guide.remove()
    assert "encode_prompt" not in pipe.__dict__ and not hasattr(pipe, "_nagkit_guide")
    after = processors(pipe)
    assert all(before[k] is after[k] for k in before)
    assert_same(generate(pipe), base)


class Recorder:
    """The denoiser's inputs and outputs of every call, outside NAG's hook (what the pipeline gives and gets)."""

    def __init__(self, model):
        self.calls = []
        self.handles = [model.register_forward_pre_hook(self.pre, with_kwargs=True),
                        model.register_forward_hook(self.post, with_kwargs=True)]

    def pre(self, module, args, kwargs):
        assert not args
        self.calls.append({"in": {k: v for k, v in kwargs.items() if k != "return_dict"}})

    def post(self, module, args, kwargs, output):
        self.calls[-1]["out"] = output  # (video, audio)

    def remove(self):
        for h in self.handles:
            h.remove()


def _rows(inputs, rows):
    return {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)


def reference(model, inputs, negative):
    """``inputs`` run as ``[prompt rows | negative rows]`` with test_ltx2's two-attention processor on ``attn2`` and
    ``audio_attn2`` (both halves get NAG(Z+, Z-)); the prompt rows' (video, audio) outputs."""
    b = inputs["hidden_states"].shape[0]
    big = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    for key in negative:  # same length (16 slots) for the prompt and the negative
        big[key] = torch.cat([inputs[key], negative[key].expand(b, *negative[key].shape[1:])])
    mods = {n: m for n, m in model.named_modules() if n.endswith((".attn2", ".audio_attn2"))}
    originals = {n: m.processor for n, m in mods.items()}
    try:
        for m in mods.values():
            m.set_processor(DoubledRef())
        video, audio = run(model, big)
        return video[:b], audio[:b]
    finally:
        for n, m in mods.items():
            m.set_processor(originals[n])


def ltx23(pipe):
    """``tiny-ltx2``'s Gemma3 and VAEs with an LTX-2.3-style text path: per-modality connectors (video text 16 wide,
    audio text 8 wide) and a transformer with gated text attention, sigma-modulated text K/V and no caption
    projection (the gates redrawn so they matter)."""
    torch.manual_seed(1)
    connectors = LTX2TextConnectors(
        caption_channels=16, text_proj_in_factor=3, per_modality_projections=True, video_hidden_dim=16,
        audio_hidden_dim=8, video_connector_num_attention_heads=2, video_connector_attention_head_dim=8,
        video_connector_num_layers=1, video_connector_num_learnable_registers=8, video_gated_attn=True,
        audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=4, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=8, audio_gated_attn=True, connector_rope_base_seq_len=32).eval()
    transformer = LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=2, caption_channels=16, perturbed_attn=True, gated_attn=True,
        audio_gated_attn=True, cross_attn_mod=True, audio_cross_attn_mod=True, use_prompt_embeddings=False).eval()
    for block in transformer.transformer_blocks:
        for attn in (block.attn2, block.audio_attn2):
            torch.nn.init.normal_(attn.to_gate_logits.weight, std=0.5)
    return LTX2Pipeline(**{**pipe.components, "connectors": connectors, "transformer": transformer})


@pytest.mark.parametrize("variant", ["ltx2.0", "no-registers", "ltx2.3"])
def test_every_denoiser_call_matches_the_two_attention_reference(pipe, variant):
    """Per call of a guided pipeline run: the conditional row of ``cond_uncond`` and the ``uncond_stg`` /
    ``uncond_modality`` rows equal the doubled-batch reference with the hand-made connector negative (video and audio
    text, one mask); the unconditional row is bit-identical to the plain model on the same inputs."""
    p = {"ltx2.0": lambda: pipe, "ltx2.3": lambda: ltx23(pipe),
         "no-registers": lambda: LTX2Pipeline(**{**pipe.components, "connectors": tiny_ltx2_connectors(0, None)})
         }[variant]()
    negative = connected(p, NEGATIVE)
    # the connectors' mask is all ones, with registers (they fill the padding) and without them (diffusers 0.42.1
    # binarises the additive mask with ``< 1e-6``, true for its −max too): every text slot is a key
    assert bool((negative["encoder_attention_mask"] == 1).all())
    recorder = Recorder(p.transformer)
    try:
        with nagkit.apply(p, negative_prompt=NEGATIVE, **NAG):
            generate(p)
    finally:
        recorder.remove()
    kinds = [("modality" if c["in"]["isolate_modalities"] else "stg" if c["in"]["spatio_temporal_guidance_blocks"]
              else "cfg") for c in recorder.calls]
    assert kinds == ["cfg", "stg", "modality"] * 2
    for kind, call in zip(kinds, recorder.calls, strict=True):
        inputs, out = call["in"], call["out"]
        plain = run(p.transformer, inputs)
        guided = slice(1, 2) if kind == "cfg" else slice(0, 1)
        ref = reference(p.transformer, _rows(inputs, guided), negative)
        for stream in (0, 1):  # video, audio
            if kind == "cfg":  # the CFG row: untouched
                assert out[stream].shape[0] == 2 and torch.equal(out[stream][:1], plain[stream][:1])
            torch.testing.assert_close(out[stream][guided], ref[stream], atol=1e-5, rtol=1e-5)
            assert (out[stream][guided] - plain[stream][guided]).abs().max() > 1e-4


def test_stg_delta_measures_only_the_perturbation(pipe):
    """Why ``uncond_stg`` is guided: with a perturbation that changes nothing (STG on a block the model does not have),
    the STG pass equals the guided conditional row, so the pipeline's ``stg_scale·(cond − stg)`` stays 0 under NAG as
    it is without NAG (a plain STG pass would make it ``stg_scale·Δ_NAG``)."""
    recorder = Recorder(pipe.transformer)
    try:
        with nagkit.apply(pipe, negative_prompt=NEGATIVE, **NAG):
            generate(pipe, spatio_temporal_guidance_blocks=[5], modality_scale=1.0, audio_modality_scale=1.0,
                     num_inference_steps=1)
    finally:
        recorder.remove()
    (cfg, stg) = [c["out"] for c in recorder.calls]
    for stream in (0, 1):
        torch.testing.assert_close(stg[stream], cfg[stream][1:], atol=1e-5, rtol=1e-5)
        assert (stg[stream] - run(pipe.transformer, recorder.calls[1]["in"])[stream]).abs().max() > 1e-4


def test_negative_in_embedding_forms_equals_the_encoded_one(pipe):
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, **NAG):
        encoded = generate(pipe)
    embeds, mask, _, _ = pipe.encode_prompt(NEGATIVE, do_classifier_free_guidance=False, max_sequence_length=16)
    with nagkit.apply(pipe, negative_prompt_embeds=embeds, negative_prompt_attention_mask=mask, **NAG):
        torch.testing.assert_close(generate(pipe), encoded, atol=1e-6, rtol=1e-6)  # Gemma features: connected
    with nagkit.apply(pipe, negative=connected(pipe, NEGATIVE), **NAG):  # the denoiser's names: used as given
        torch.testing.assert_close(generate(pipe), encoded, atol=1e-6, rtol=1e-6)
    # default NAG negative = the call's CFG negative, here in embedding form: through the connectors as well
    with nagkit.apply(pipe, negative_prompt=CFG_NEGATIVE, **NAG):
        by_text = generate(pipe)
    cfg, cfg_mask, _, _ = pipe.encode_prompt(CFG_NEGATIVE, do_classifier_free_guidance=False, max_sequence_length=16)
    with nagkit.apply(pipe, **NAG):
        by_call = generate(pipe, negative_prompt=None, negative_prompt_embeds=cfg,
                           negative_prompt_attention_mask=cfg_mask)
    torch.testing.assert_close(by_call, by_text, atol=1e-6, rtol=1e-6)


def test_shorter_negative_through_the_connectors(pipe):
    """``negative_max_length`` (a multiple of the connectors' register count): the negative is encoded and connected
    at that length, so it costs that many text slots per guided attention instead of ``max_sequence_length``."""
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, negative_max_length=8, **NAG) as guide:
        out = generate(pipe)
        assert guide.state.last_packing.ln == 8 and guide.state.last_packing.lp == 16
    embeds, mask, _, _ = pipe.encode_prompt(NEGATIVE, do_classifier_free_guidance=False, max_sequence_length=8)
    with torch.no_grad():
        video, audio, mask = pipe.connectors(embeds, mask, padding_side="left")
    by_hand = {"encoder_hidden_states": video, "encoder_attention_mask": mask, AUDIO_TEXT: audio, AUDIO_MASK: mask}
    with nagkit.apply(pipe, negative=by_hand, **NAG):
        torch.testing.assert_close(generate(pipe), out, atol=1e-6, rtol=1e-6)


def test_per_sample_negatives_equal_single_runs(pipe):
    prompts, negatives = [PROMPT, "a dog running in the snow"], [NEGATIVE, "oversaturated cartoon"]
    with nagkit.apply(pipe, negative_prompt=negatives, **NAG):
        both = generate(pipe, prompt=prompts, seeds=(0, 1))
    for i in range(2):
        with nagkit.apply(pipe, negative_prompt=negatives[i], **NAG):
            one = generate(pipe, prompt=prompts[i], seeds=(i,))
        torch.testing.assert_close(both[0][i:i + 1], one[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(both[1][i:i + 1], one[1], atol=1e-5, rtol=1e-5)


def _conditioning(klass):
    image = tiny_condition_image(32, 32)
    return {LTX2ImageToVideoPipeline: {"image": image, "image_crf": 0},
            LTX2ConditionPipeline: {"conditions": [LTX2VideoCondition(frames=image, index=0, strength=1.0, crf=0)]},
            LTX2InContextPipeline: {"reference_conditions": [LTX2ReferenceCondition(frames=image)]},
            LTX2HDRPipeline: {"reference_conditions": [LTX2HDRReferenceCondition(frames=image)]}}[klass]


@pytest.mark.parametrize("klass", [LTX2ImageToVideoPipeline, LTX2ConditionPipeline, LTX2InContextPipeline,
                                   LTX2HDRPipeline])
def test_conditioned_pipelines(pipe, klass):
    """Image / video / reference-video conditioned pipelines: every pass guided, scale 1 bit-identical, removal."""
    kwargs = {**_conditioning(klass), "guidance_scale": 3.0, "stg_scale": 1.0, "modality_scale": 3.0}
    p = build(klass, pipe)
    base = [x for x in generate(p, **kwargs) if x is not None]  # LTX2HDRPipeline: video only
    with nagkit.apply(p, negative_prompt=NEGATIVE, **NAG) as guide:
        out = [x for x in generate(p, **kwargs) if x is not None]
        assert guide.state.calls == {"guided": 6, "unguided": 0}
        guide.update(scale=1.0)
        assert all(torch.equal(a, b) for a, b in zip(generate(p, **kwargs), base, strict=False))
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(out, base, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(generate(p, **kwargs), base, strict=False))
    assert "encode_prompt" not in p.__dict__


def test_hdr_connector_embeddings_input_is_refused(pipe):
    """``LTX2HDRPipeline(connector_video_embeds=...)`` skips ``encode_prompt``, so no NAG negative exists: refused."""
    p = build(LTX2HDRPipeline, pipe)
    video = connected(p, PROMPT)
    with nagkit.apply(p, negative_prompt=NEGATIVE, **NAG):
        with pytest.raises(RuntimeError, match="LTX2HDRPipeline, which encodes the negative once per pipeline call"):
            p(connector_video_embeds=video["encoder_hidden_states"], connector_audio_embeds=video[AUDIO_TEXT],
              num_inference_steps=1, output_type="latent", **_conditioning(LTX2HDRPipeline),
              **{k: v for k, v in TINY_CALL_KWARGS["tiny-ltx2"].items() if k != "max_sequence_length"})


def test_refusals_and_errors(pipe):
    import diffusers

    from nagkit.integration.pipelines import PIPELINES, pipeline_spec

    assert {"LTX2Pipeline", "LTX2ImageToVideoPipeline", "LTX2ConditionPipeline", "LTX2InContextPipeline",
            "LTX2HDRPipeline"} <= set(PIPELINES)
    for name in ("LTX2DFRPipeline", "LTX2DFRTemporalRefinePipeline", "LTX2LatentUpsamplePipeline",
                 "LTX2VideoDiffusionDecodePipeline"):
        klass = getattr(diffusers, name)
        with pytest.raises(TypeError, match=f"nagkit does not support {name}; supported pipelines: .*LTX2Pipeline"):
            pipeline_spec(klass.__new__(klass))
    wrong = Negative(embeds=torch.zeros(1, 4, 16), mask=torch.ones(1, 4, dtype=torch.long))  # already connected?
    with pytest.raises(ValueError, match="16 channels.*encode_prompt's output \\(48"):
        connect_negative(pipe, wrong)
    with pytest.raises(ValueError, match="negative_prompt_embeds must be"):
        nagkit.apply(pipe, negative_prompt_embeds=torch.zeros(4, 48))


def test_command_line_info_and_mp4(tmp_path, capsys):
    from nagkit.cli.main import main

    assert main(["info", "tiny-ltx2"]) == 0
    out = capsys.readouterr().out
    assert "tiny-ltx2: supported (LTX2Pipeline, family 'ltx2')" in out and "audio_attn2" in out
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v3 as iio

    mp4 = tmp_path / "clip.mp4"
    assert main(["generate", "tiny-ltx2", "a red cat", "--negative", "blurry", "--steps", "1", "--out", str(mp4),
                 "--quiet"]) == 0
    assert iio.imread(mp4).shape == (5, 32, 32, 3)
