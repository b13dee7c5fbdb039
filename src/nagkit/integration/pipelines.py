"""Which diffusers pipelines nagkit drives, and how the NAG negative of a pipeline call is made.

The pipelines and their :class:`PipelineSpec` are registered by each model family's module in :mod:`nagkit.adapters`
(``Adapter.pipelines``) into :data:`PIPELINES`, re-exported here.

The NAG negative is encoded by calling the pipeline's ``encode_prompt`` once more with the *same arguments as the
call* (device, ``num_images_per_prompt``, ``max_sequence_length``, ``clip_skip``, ``lora_scale``…), except that the
prompt is the NAG negative and everything about CFG is switched off. So the negative sees exactly the encoder settings
the prompt saw. A pipeline without its text encoders (``text_encoder=None``, prompts passed as embeddings) takes the
negative in embedding form: from ``nagkit.apply(pipe, negative_prompt_embeds=...)``, else the call's own CFG
``negative_prompt_embeds``.

Two pipeline methods are wrapped (instance attributes, removed by ``Guide.remove``): ``check_inputs``, the first thing
every pipeline call does, starts a call; ``encode_prompt`` makes the negative right after the prompt's.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..adapters.base import PIPELINES, PipelineSpec  # re-exported: filled by the family modules
from ..core.state import NAGState, Negative


def pipeline_spec(pipe: object) -> PipelineSpec:
    """The spec for ``pipe``; raise ``TypeError`` naming its class and the supported pipelines."""
    for klass in type(pipe).__mro__:
        if klass.__name__ in PIPELINES:
            return PIPELINES[klass.__name__]
    raise TypeError(f"nagkit does not support {type(pipe).__name__}; supported pipelines: "
                    f"{', '.join(sorted(PIPELINES))} (or apply NAG to a supported denoiser directly)")


def is_pipeline(obj: object) -> bool:
    """Duck-typed check for a diffusers pipeline."""
    return hasattr(obj, "components") and hasattr(obj, "encode_prompt") and not isinstance(obj, torch.nn.Module)


def pipeline_denoisers(pipe: Any, spec: PipelineSpec) -> list[torch.nn.Module]:
    """The denoisers of ``pipe`` that NAG guides (e.g. both Wan 2.2 experts)."""
    found = [m for m in (getattr(pipe, name, None) for name in spec.denoisers) if m is not None]
    if not found:
        raise TypeError(f"{type(pipe).__name__} has no denoiser ({', '.join(spec.denoisers)})")
    return found


def missing_encoders(pipe: Any, spec: PipelineSpec) -> list[str]:
    """The text encoders ``encode_prompt`` needs to encode a string that ``pipe`` does not have."""
    return [name for name in spec.encoders if getattr(pipe, name, None) is None]


_PROMPT_ONLY = ("prompt_2", "prompt_3", "prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask")


def negative_arguments(arguments: dict[str, Any], negatives: list[str], spec: PipelineSpec,
                       max_length: int | None = None) -> dict[str, Any]:
    """``encode_prompt`` arguments that encode ``negatives`` exactly like the call encoded its prompt (optionally
    with a shorter ``max_sequence_length``)."""
    args = dict(arguments)
    if max_length is not None:
        if "max_sequence_length" not in args:
            raise ValueError("negative_max_length needs a pipeline whose encode_prompt takes max_sequence_length")
        args["max_sequence_length"] = max_length
    args["prompt"] = negatives
    for name in list(args):
        if name.startswith("negative_") or name in _PROMPT_ONLY:
            args[name] = None
    if "do_classifier_free_guidance" in args:
        args["do_classifier_free_guidance"] = False
    args.update(spec.overrides)
    return args


def bind_arguments(fn: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a call to ``fn`` by name, defaults included."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(out.pop(name, {}))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL and out.get(name):
            raise TypeError(f"cannot forward positional varargs of {fn}")
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            out.pop(name, None)
    return out


def _rows(x: torch.Tensor | None, rows: int, name: str, dim: int = 0) -> torch.Tensor | None:
    """``x`` with ``rows`` rows (its batch on ``dim``): as is, or each row repeated (one negative per prompt,
    ``num_*_per_prompt`` > 1). A list (one tensor per row: Z-Image's captions) is repeated as a list."""
    if isinstance(x, (list, tuple)):
        if rows % len(x) != 0:
            raise ValueError(f"{name} has {len(x)} rows, which does not divide the call's {rows} prompt rows; give "
                             "one row (used for every prompt) or one per prompt")
        return [v for v in x for _ in range(rows // len(x))]
    if x is None or x.shape[dim] == rows:
        return x
    if rows % x.shape[dim] != 0:
        raise ValueError(f"{name} has {x.shape[dim]} rows, which does not divide the call's {rows} prompt rows; give "
                         "one row (used for every prompt) or one per prompt")
    return x.repeat_interleave(rows // x.shape[dim], dim=dim)


def negative_from_embeddings(fields: dict[str, torch.Tensor | None], positive: torch.Tensor,
                             names: dict[str, str], batch_dims: dict[str, int] | None = None) -> Negative:
    """A :class:`Negative` for a call whose prompt embeddings are ``positive`` from embedding-form fields
    (``batch_dims``: fields whose batch is not their first dimension, ``Adapter.batch_dims``)."""
    rows, dims = len(positive), batch_dims or {}  # len: a tensor's batch, or a list's rows (Z-Image)
    extras = {k: _rows(v, rows, names.get(k, k), dims.get(k, 0)) for k, v in fields.items()
              if k not in ("embeds", "mask") and v is not None}
    return Negative(embeds=_rows(fields["embeds"], rows, names["embeds"]),
                    mask=_rows(fields.get("mask"), rows, names.get("mask", "mask")), positive=positive,
                    extras=extras)


def encode_negative(pipe: Any, spec: PipelineSpec, state: NAGState, encode: Any, arguments: dict[str, Any],
                    out: tuple, negative_prompt: str | list[str] | None, max_length: int | None,
                    batch_dims: dict[str, int] | None = None) -> Negative:
    """The NAG negative of the pipeline call whose ``encode_prompt`` just returned ``out``.

    Args:
        pipe: the pipeline.
        spec: its spec.
        state: the guide's state (``fixed``: the negative given in embedding form; ``call_arguments``).
        encode: the pipeline's original ``encode_prompt``.
        arguments: the call's ``encode_prompt`` arguments by name.
        out: what it returned for the prompt.
        negative_prompt: the guide's NAG negative prompt, or None for the default (the call's CFG negative, else "").
        max_length: optional shorter ``max_sequence_length`` for the negative.
        batch_dims: embedding-form fields whose batch is not their first dimension (``Adapter.batch_dims``).

    Returns:
        The negative, with as many rows as the prompt embeddings.

    Raises:
        ValueError: when a string negative would have to be encoded by a pipeline without its text encoders, or
            when the number of negatives does not match the prompts.
    """
    positive = out[spec.embeds_index]
    rows = len(positive)  # a tensor's batch, or a list of per-prompt tensors (Z-Image)
    if state.fixed is not None:
        names = {"embeds": "negative_prompt_embeds", "mask": "negative_prompt_attention_mask"}
        fields = {"embeds": state.fixed.embeds, "mask": state.fixed.mask, **state.fixed.extras}
        return _post_encode(pipe, spec, negative_from_embeddings(fields, positive, names, batch_dims))
    text = negative_prompt
    if text is None:  # official default: the call's CFG negative prompt, else ""
        text = arguments.get("negative_prompt") or state.call_arguments.get("negative_prompt")
        if text is None:
            call = {**state.call_arguments, **{k: v for k, v in arguments.items() if v is not None}}
            embeds = call.get(spec.embeds_args["embeds"])
            if embeds is not None:  # the call's CFG negative in embedding form
                fields = {field_: call.get(arg) for field_, arg in spec.embeds_args.items()}
                return _post_encode(pipe, spec, negative_from_embeddings(fields, positive, spec.embeds_args,
                                                                         batch_dims))
            text = ""
    missing = missing_encoders(pipe, spec)
    if missing:
        raise ValueError(f"{type(pipe).__name__} has no {', '.join(missing)}, so it cannot encode the NAG negative "
                         f"{text!r}: give it in embedding form, nagkit.apply(pipe, negative_prompt_embeds=...) "
                         f"(or pass the call's own {spec.embeds_args['embeds']}=...)")
    per_prompt = int(arguments.get(spec.count_arg) or 1)
    prompts = rows // per_prompt
    if isinstance(text, str):
        negatives = [text] * prompts
    else:
        negatives = list(text)
        if len(negatives) != prompts:
            raise ValueError(f"negative_prompt has {len(negatives)} entries but the call has {prompts} prompts; "
                             "give one string (used for every prompt) or exactly one per prompt")
    call = negative_arguments(arguments, negatives, spec, max_length)
    neg = encode(**call) if spec.encode_negative is None else spec.encode_negative(encode, call)
    mask = neg[spec.mask_index] if spec.mask_index is not None else None
    extras = {name: neg[index] for name, index in spec.extras.items()}
    return _post_encode(pipe, spec, Negative(embeds=neg[spec.embeds_index], mask=mask, positive=positive,
                                             extras=extras))


def _post_encode(pipe: Any, spec: PipelineSpec, negative: Negative) -> Negative:
    """``spec.post_encode`` on the negative (LTX-2's connectors), or the negative as it is."""
    return negative if spec.post_encode is None else spec.post_encode(pipe, negative)


class PipelineMethod:
    """An instance-level wrapper of a pipeline method; calls ``on_call(original, args, kwargs)``.

    A plain class (not a closure), so ``inspect.signature`` follows ``__wrapped__`` to the method's own signature.
    """

    def __init__(self, original: Any, on_call: Any) -> None:
        self.__wrapped__ = original
        self.__doc__ = getattr(original, "__doc__", None)
        self.on_call = on_call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.on_call(self.__wrapped__, args, kwargs)

    def __repr__(self) -> str:
        return f"<nagkit-wrapped {self.__wrapped__!r}>"
