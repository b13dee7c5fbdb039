"""The V3 nodes (``comfy_api.latest``, falling back to ``comfy_api.v0_0_2``): NAG and NAG Guider.

The nodes are thin: everything they do is :func:`.glue.nag_model` (tested without ComfyUI).
"""

from __future__ import annotations

try:
    from comfy_api.latest import ComfyExtension, io
except ImportError:  # an older ComfyUI whose newest API is 0.0.2
    from comfy_api.v0_0_2 import ComfyExtension, io

from .glue import ATTENTION_PATHS, FAMILY_DEFAULTS, ON_SILENT, PRESET_CHOICES, conditioning_tensor, nag_model

_DEFAULTS_TEXT = "; ".join(f"{label} {s:g} / {t:g} / {a:g}" for label, (_, s, t, a) in FAMILY_DEFAULTS.items())

SCALE_TOOLTIP = ("NAG scale = paper phi + 1 (the official code's nag_scale): 1 = off, 5 = the paper's phi 4. "
                 f"Family defaults (scale / tau / alpha): {_DEFAULTS_TEXT}.")
TAU_TOOLTIP = "tau: cap on how much NAG may grow each image token's attention output (norm ratio)."
ALPHA_TOOLTIP = "alpha: blend between the guided attention (1) and the plain one (0)."
NEGATIVE_TOOLTIP = ("What to steer away from, encoded with the same text encoder as the prompt. Not connected: NAG "
                    "reuses the sampler's negative (KSampler's negative input), also at cfg 1.")
PRESET_TOOLTIP = ("custom: the scale/tau/alpha widgets. auto: the detected family's defaults, replacing the three "
                  f"widgets ({_DEFAULTS_TEXT}). A named preset: its values.")
START_TOOLTIP = "Fraction of the sampling schedule where NAG starts (0 = first step)."
END_TOOLTIP = "Fraction of the sampling schedule where NAG stops (1 = last step)."
ON_SILENT_TOOLTIP = ("If a guided step saw no NAG application (a ComfyUI change, a conflicting patch): error (stop "
                     "sampling) or warn once and sample without NAG.")
ATTENTION_TOOLTIP = ("auto: exact log-sum-exp split (image-image attention computed once) for MM-DiT models when no "
                     "other attention override is registered; comfy: every attention through ComfyUI's attention "
                     "function (and any previous override).")


def _nag_inputs() -> list:
    return [
        io.Float.Input("nag_scale", default=5.0, min=1.0, max=50.0, step=0.1, round=0.01, tooltip=SCALE_TOOLTIP),
        io.Float.Input("nag_tau", default=2.5, min=1.0, max=20.0, step=0.1, round=0.01, tooltip=TAU_TOOLTIP),
        io.Float.Input("nag_alpha", default=0.25, min=0.0, max=1.0, step=0.01, tooltip=ALPHA_TOOLTIP),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=START_TOOLTIP),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=END_TOOLTIP),
        io.Combo.Input("preset", options=list(PRESET_CHOICES), default="custom", tooltip=PRESET_TOOLTIP),
        io.Combo.Input("on_silent", options=list(ON_SILENT), default="error", tooltip=ON_SILENT_TOOLTIP),
        io.Combo.Input("attention", options=list(ATTENTION_PATHS), default="auto", tooltip=ATTENTION_TOOLTIP),
    ]


class NAG(io.ComfyNode):
    """MODEL + NAG negative -> MODEL with Normalized Attention Guidance."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NagkitNAG",
            display_name="NAG (Normalized Attention Guidance)",
            category="advanced/guidance",
            description=("Negative prompts that work at cfg 1 (distilled and few-step models) through Normalized "
                         "Attention Guidance; costs one extra attention over the negative's text, not a second "
                         "model pass. Works with any sampler or guider."),
            inputs=[io.Model.Input("model"),
                    io.Conditioning.Input("nag_negative", optional=True, tooltip=NEGATIVE_TOOLTIP),
                    *_nag_inputs()],
            outputs=[io.Model.Output(tooltip="The model with NAG (the input model is unchanged).")],
        )

    @classmethod
    def execute(cls, model, nag_scale, nag_tau, nag_alpha, start_percent, end_percent, preset="custom",  # noqa: ANN001
                on_silent="error", attention="auto", nag_negative=None) -> io.NodeOutput:
        return io.NodeOutput(nag_model(model, nag_negative, nag_scale, nag_tau, nag_alpha, start_percent,
                                       end_percent, preset, on_silent, attention))


class NAGGuider(io.ComfyNode):
    """A plain CFG guider on the NAG-patched model (for SamplerCustomAdvanced)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NagkitNAGGuider",
            display_name="NAG Guider",
            category="sampling/custom_sampling/guiders",
            description=("CFG guider on a NAG-patched model: cfg 1 gives NAG alone; nag_negative defaults to the "
                         "negative."),
            inputs=[io.Model.Input("model"),
                    io.Conditioning.Input("positive"),
                    io.Conditioning.Input("negative"),
                    io.Conditioning.Input("nag_negative", optional=True, tooltip=NEGATIVE_TOOLTIP),
                    io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01),
                    *_nag_inputs()],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, nag_scale, nag_tau, nag_alpha, start_percent,  # noqa: ANN001
                end_percent, preset="custom", on_silent="error", attention="auto",
                nag_negative=None) -> io.NodeOutput:
        import comfy.samplers

        nag_negative = negative if nag_negative is None else nag_negative
        conditioning_tensor(nag_negative)  # a clear error before sampling when it is not a text conditioning
        patched = nag_model(model, nag_negative, nag_scale, nag_tau, nag_alpha, start_percent, end_percent, preset,
                            on_silent, attention)
        guider = comfy.samplers.CFGGuider(patched)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


NODES = [NAG, NAGGuider]


class NagkitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> NagkitExtension:
    return NagkitExtension()
