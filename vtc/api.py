"""The public API: apply a method to a loaded model, remove it, inspect its plan and stats."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

from torch import nn

from .errors import UnsupportedConfigurationError, VtcError
from .flops import Stats
from .plan import Plan
from .registry import adapters, get_adapter, get_method, methods

ATTR = "_vtc"


def _make(model: nn.Module, method, budget, params: dict):
    from .methods.composed import create_method

    config = create_method(method, params)
    adapter = get_adapter(model)
    the_plan = config.compile(adapter.info(), budget)
    family = getattr(adapter, "default_positions", None)
    if family and not any(k.rpartition(".")[2] == "positions" for k in params):
        # The family's positions policy (Qwen: original 3-D positions) unless the user chose one.
        the_plan = dataclasses.replace(
            the_plan, stages=tuple(dataclasses.replace(s, positions=family) for s in the_plan.stages))
    return adapter, the_plan


def plan(model: nn.Module, method: str | list[str], budget: int | float | None = None, **params: Any) -> Plan:
    """The plan :func:`apply` would install, without installing it.

    Example:
        >>> print(vtc.plan(model, "fastv", budget=192))  # doctest: +SKIP
        plan fastv: 576 visual tokens per image, 32 layers
        ...
    """
    return _make(model, method, budget, params)[1]


def apply(model: nn.Module, method: str | list[str], budget: int | float | None = None, **params: Any) -> nn.Module:
    """Install ``method`` on this model instance (only); returns the model.

    ``budget`` is visual tokens per image averaged over the LLM's layers (int: a count; float
    in (0, 1]: a fraction); ``params`` are the method's native parameters. ``method`` may
    compose a pre-LLM and an in-LLM method: ``"vtc_cls+pdrop"`` or ``["vtc_cls", "pdrop"]``.

    Example:
        >>> model = vtc.apply(model, "fastv", budget=192)  # doctest: +SKIP
        >>> out = model.generate(**inputs)                  # doctest: +SKIP
        >>> vtc.remove(model)                               # doctest: +SKIP
    """
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise UnsupportedConfigurationError(
            "vtc patches the model instance, which torch.compile has already wrapped: apply vtc first, then "
            "compile (model = vtc.apply(model, ...); model = torch.compile(model))"
        )
    if ATTR in model.__dict__:
        raise VtcError(
            f"vtc method {model.__dict__[ATTR].plan.method!r} is already applied to this model; "
            f"call vtc.remove(model) before applying another"
        )
    if getattr(getattr(model, "generation_config", None), "cache_implementation", None) == "static":
        raise UnsupportedConfigurationError(
            "vtc cannot run with cache_implementation='static': its layers keep different numbers of "
            "tokens. Set model.generation_config.cache_implementation = None (dynamic cache)"
        )
    adapter, the_plan = _make(model, method, budget, params)
    _install(model, adapter, the_plan)
    return model


def _install(model: nn.Module, adapter, the_plan: Plan):
    from vtc import _check_transformers
    from vtc.patches.base import Installation

    _check_transformers()  # the hooks need MIN_TRANSFORMERS (import allows less where vLLM serves)

    installation = Installation(adapter, the_plan)
    installation.install()
    model.__dict__[ATTR] = installation
    # copy.deepcopy looks __deepcopy__ up on the instance first: the copy gets its own patches.
    model.__dict__["__deepcopy__"] = functools.partial(_deepcopy, model)
    return installation


def _deepcopy(model: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a patched model: the unpatched model is copied (its wrappers and hooks
    would otherwise stay bound to this model's modules and state), then the same plan is installed on
    the copy and again on this model. The copy is independent: ``vtc.remove`` on it leaves this
    model patched."""
    installation = model.__dict__[ATTR]
    remove(model)
    try:
        clone = copy.deepcopy(model, memo)
    finally:
        _install(model, installation.adapter, installation.plan).last_stats = installation.last_stats
    _install(clone, type(installation.adapter)(clone), installation.plan).last_stats = installation.last_stats
    return clone


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model computes exactly what it did before; returns the model.

    Example:
        >>> vtc.remove(vtc.apply(model, "vtc_cls", budget=64))  # doctest: +SKIP
    """
    installation = model.__dict__.pop(ATTR, None)
    if installation is None:
        raise VtcError("no vtc method is applied to this model; nothing to remove")
    model.__dict__.pop("__deepcopy__", None)
    installation.remove()
    return model


def is_applied(model: nn.Module) -> bool:
    """Whether a vtc method is installed on ``model``."""
    return ATTR in model.__dict__


@contextlib.contextmanager
def compressed(model: nn.Module, method: str, budget: int | float | None = None, **params: Any) -> Iterator[nn.Module]:
    """Apply ``method`` for the duration of a ``with`` block.

    Example:
        >>> with vtc.compressed(model, "random", budget=64, seed=1):  # doctest: +SKIP
        ...     out = model.generate(**inputs)
    """
    apply(model, method, budget, **params)
    try:
        yield model
    finally:
        remove(model)


def stats(model: nn.Module) -> Stats:
    """What the last prefill of the installed method did (tokens per layer, FLOPs).

    Example:
        >>> model.generate(**inputs); print(vtc.stats(model))  # doctest: +SKIP
        fastv: 1 image(s), 64 text tokens; visual tokens/image 576 -> 576 entering the LLM, ...
    """
    installation = model.__dict__.get(ATTR)
    if installation is None:
        raise VtcError("no vtc method is applied to this model; call vtc.apply(model, ...) first")
    if installation.last_stats is None:
        raise VtcError("the model has not run a forward or generate since vtc.apply; run one first")
    return installation.last_stats


def list_methods(standalone: bool = False, images: bool = False) -> list[str]:
    """Names of the registered methods; ``standalone=True``: only those that run on a budget
    alone (not ``schedule``, which needs a schedule file); ``images=True``: only those that reduce
    images (not ``dycoke``, a video rule).

    Example:
        >>> "fastv" in vtc.list_methods(), "schedule" in vtc.list_methods(standalone=True)
        (True, False)
        >>> "dycoke" in vtc.list_methods(images=True)
        False
    """
    return sorted(name for name, cls in methods().items()
                  if not (standalone and cls.requires) and not (images and cls.video_only))


def list_models() -> list[str]:
    """Model classes vtc has an adapter for.

    Example:
        >>> "LlavaForConditionalGeneration" in vtc.list_models()
        True
    """
    return sorted(name for cls in adapters() for name in cls.class_names)


def _split_params(method, kwargs: dict) -> tuple[dict, dict]:
    """Keyword arguments named like a parameter of the method(s) (or ``method.param``) go to vtc."""
    from .methods.composed import split_spec

    if method is None:
        return {}, kwargs
    names = split_spec(method)
    known = {p for n in names for p in get_method(n).param_names()}
    mine = {k for k in kwargs if k.rpartition(".")[2] in known and k.rpartition(".")[0] in ("", *names)}
    return {k: kwargs[k] for k in mine}, {k: v for k, v in kwargs.items() if k not in mine}


def from_pretrained(
    name_or_path: str, method: str | None = None, budget: int | float | None = None, **kwargs: Any
) -> nn.Module:
    """Load a model with its image-text-to-text auto class and apply ``method``: the load flag.

    Keyword arguments named like the method's native parameters go to the method, the rest
    to Hugging Face's ``from_pretrained`` (``torch_dtype``, ``device_map``, ...). The method
    and its parameters are checked before anything is loaded. The processor is separate:
    :func:`load_processor`.

    Example:
        >>> model = vtc.from_pretrained("llava-hf/llava-1.5-7b-hf", method="fastv", budget=192,
        ...                             dtype="bfloat16")  # doctest: +SKIP
    """
    from transformers import AutoModelForImageTextToText

    from .methods.composed import create_method

    method_params, hf_kwargs = _split_params(method, kwargs)
    if method is not None:
        create_method(method, method_params)  # fail before loading
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, **hf_kwargs)
    model.eval()
    get_adapter(model)  # an unsupported family fails here, whatever the method
    if method is not None:
        apply(model, method, budget, **method_params)
    return model


def load_processor(name_or_path: str, **kwargs: Any):
    """The processor that goes with :func:`from_pretrained` (``AutoProcessor``).

    Example:
        >>> processor = vtc.load_processor("llava-hf/llava-1.5-7b-hf")  # doctest: +SKIP
    """
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(name_or_path, **kwargs)
