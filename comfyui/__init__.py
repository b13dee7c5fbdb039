"""nagkit's ComfyUI nodes: Normalized Attention Guidance (NAG) for FLUX.1/FLUX.2/Chroma, SD3/SD3.5, SD1.x/SDXL, Wan,
Qwen-Image, HunyuanVideo and HiDream-I1.

ComfyUI's custom-node loader imports this package and calls :func:`comfy_entrypoint` (V3 node API). Outside ComfyUI
(tests, tools) only the ComfyUI-free glue in :mod:`.glue` is importable.
"""

try:
    import comfy_api  # noqa: F401 - only present inside ComfyUI
except ImportError:  # imported outside ComfyUI: the glue only
    comfy_entrypoint = None
else:
    from .nodes import NODES, comfy_entrypoint  # noqa: F401

__all__ = ["comfy_entrypoint"]
